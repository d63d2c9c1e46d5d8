//! Read-ahead: the shard footers and row groups a [`super::PhaseReader`]
//! will need next, fetched on the storage runtime while it decodes, so
//! that a step does not wait on the store.
//!
//! The reader is given its plan (the logical rows it will read, in order).
//! The pump walks the plan ahead of the reader with two cursors: the first
//! splits it into visits of shards and starts each shard's footer read a
//! few shards ahead; the second, once a shard's footer is there, finds the
//! row groups the visit needs and starts their reads, in the order the
//! reader will need them, consecutive groups of one shard in one request,
//! bounded by [`ReadAhead`]. The pump never blocks, except when the reader
//! itself waits for the next row group and the footer that locates it has
//! not arrived. The reader takes the reads in order: a footer when it
//! enters a shard, a row group when it leaves the cached one.
//!
//! ```text
//! plan      | step 7 rows | step 8 rows | step 9 rows | step 10 …
//! footers   |  shard 2    |             |  shard 3    |  shard 4   ← in flight
//! reads     | (2,1) (2,2) (2,3)         | (3,0) …                 ← one request
//! reader      ^ decoding (2,1)
//! ```
//!
//! Which rows a step gets never depends on the read-ahead: a read is
//! matched to the reader's request by its shard and row group, and a reader
//! that leaves its plan drops the reads ahead and reads by itself again.
//! A read that failed reports its error when the reader takes it, i.e. in
//! the first step that needs bytes from it. Dropping the reader drops every
//! read in flight, which cancels it.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use twinhead_data::manifest::PhaseStats;
use twinhead_data::store::{Location, Pending, StoreError};

use super::shard::{Fetched, OpenShard, PendingOpen};
use super::{LoaderError, ReaderStats};

/// How far a reader given a plan reads ahead of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadAhead {
    /// Reads (each of one or more consecutive row groups of one shard) in
    /// flight or fetched and not yet decoded, at most; also how many
    /// shards' footers are read ahead. 0: no read-ahead, each read is made
    /// when its rows are needed.
    pub requests: usize,
    /// Bytes of those reads, at most (one read is always allowed); one
    /// read covers at most `bytes / requests`.
    pub bytes: u64,
}

impl ReadAhead {
    /// No read-ahead.
    pub const OFF: Self = Self {
        requests: 0,
        bytes: 0,
    };
}

impl Default for ReadAhead {
    /// 4 reads, 64 MiB at most: with dataprep's shards (1,024 rows in row
    /// groups of 256, about 2 MB per 1,024-token row length) one rank
    /// reading every row keeps about 4 shards in flight, which hides an S3
    /// server's latency (see BENCHMARKS.md, "loader").
    fn default() -> Self {
        Self {
            requests: 4,
            bytes: 64 << 20,
        }
    }
}

/// Most plan entries the pump looks at in one call (a plan that stays in
/// one row group for many steps costs no reads, and no unbounded loop).
const MAX_PUMP_STEPS: usize = 4096;

/// Most pieces of the plan (row ranges within one shard) held ahead of the
/// row-group cursor.
const MAX_PIECES: usize = 4096;

/// How often a reader waiting for a read checks whether it was stopped.
const STOP_POLL: Duration = Duration::from_millis(20);

/// What the pump needs of the reader.
pub(super) struct Ctx<'a> {
    pub root: &'a Location,
    pub phase: &'a PhaseStats,
    /// First row of every shard, and the phase's rows last.
    pub shard_starts: &'a [u64],
    pub verify_sha256: bool,
    /// Set when the reader's prefetcher is dropped: waits give up.
    pub stop: Option<&'a AtomicBool>,
    /// The step being read, for [`LoaderError::PrefetchStopped`].
    pub step: u64,
}

impl Ctx<'_> {
    /// Waits for a read through `poll` (a wait of at most the given time),
    /// giving up once the reader is stopped.
    pub fn wait<T>(
        &self,
        mut poll: impl FnMut(Duration) -> Option<Result<T, StoreError>>,
    ) -> Result<T, LoaderError> {
        let limit = match self.stop {
            Some(_) => STOP_POLL,
            None => Duration::from_secs(3600),
        };
        loop {
            if self.stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
                return Err(LoaderError::PrefetchStopped { step: self.step });
            }
            if let Some(result) = poll(limit) {
                return result.map_err(LoaderError::from);
            }
        }
    }

    fn shard_of(&self, physical: u64) -> usize {
        self.shard_starts.partition_point(|&s| s <= physical) - 1
    }

    /// Opens shard `index` from what was fetched for it, checking its row
    /// count against the manifest.
    pub fn finish_open(
        &self,
        index: usize,
        fetched: Fetched,
        stats: &mut ReaderStats,
    ) -> Result<Arc<OpenShard>, LoaderError> {
        let entry = &self.phase.shards[index];
        let sha = self.verify_sha256.then_some(entry.sha256.as_str());
        let opened = OpenShard::from_fetched(self.root, index, &entry.path, fetched, sha)?;
        stats.shards_opened += 1;
        stats.bytes_fetched += opened.bytes_fetched;
        if opened.rows() != entry.rows {
            return Err(LoaderError::ShardRows {
                actual: opened.rows(),
                location: opened.name.clone(),
                expected: entry.rows,
            });
        }
        Ok(Arc::new(opened))
    }
}

enum ShardState {
    Opening(PendingOpen),
    Open(Arc<OpenShard>),
    /// Opening failed; the error waits for the reader to enter the shard.
    Failed(Option<LoaderError>),
}

/// One visit of the plan to a shard.
struct ShardSlot {
    index: usize,
    state: ShardState,
    /// Physical rows of the visit the row-group cursor has not passed, in
    /// order.
    rows: VecDeque<Range<u64>>,
}

impl ShardSlot {
    /// Waits for the footer if it is still coming.
    fn resolve(&mut self, ctx: &Ctx<'_>, stats: &mut ReaderStats) {
        let state = std::mem::replace(&mut self.state, ShardState::Failed(None));
        self.state = match state {
            ShardState::Opening(mut pending) => {
                match ctx
                    .wait(|limit| pending.wait_for(limit))
                    .and_then(|f| ctx.finish_open(self.index, f, stats))
                {
                    Ok(open) => ShardState::Open(open),
                    Err(e) => ShardState::Failed(Some(e)),
                }
            }
            other => other,
        };
    }
}

/// Most bytes between two row groups' column chunks (other columns) that a
/// read spanning both fetches for nothing.
const MAX_GAP: u64 = 64 * 1024;

/// One read of consecutive row groups of one shard, which the plan needs
/// one after the other (one request instead of one per group).
struct Run {
    shard: usize,
    /// The groups not taken yet, each with the bytes of it to fetch.
    groups: VecDeque<(usize, Range<u64>)>,
    /// The bytes the read covers (the groups, and the gaps between them).
    range: Range<u64>,
    read: RunRead,
}

enum RunRead {
    /// Still growing: the pump may add the next group.
    Open,
    Started(Pending<Bytes>),
    Done(Bytes),
}

/// The reads ahead of one reader (see the module docs).
pub(super) struct Ahead {
    limits: ReadAhead,
    plan: Box<dyn Iterator<Item = Range<u64>> + Send>,
    /// The plan has no more rows.
    planned: bool,
    /// Visits from the reader's current one to the shard cursor's, in plan
    /// order.
    shards: VecDeque<ShardSlot>,
    /// Row ranges held in `shards`.
    pieces: usize,
    /// Reads not fully taken yet, in plan order.
    runs: VecDeque<Run>,
    /// Bytes of `runs`.
    bytes: u64,
    /// The row group the pump passed last.
    last: Option<(usize, usize)>,
}

impl Ahead {
    pub fn new(limits: ReadAhead, plan: Box<dyn Iterator<Item = Range<u64>> + Send>) -> Self {
        Self {
            limits,
            plan,
            planned: false,
            shards: VecDeque::new(),
            pieces: 0,
            runs: VecDeque::new(),
            bytes: 0,
            last: None,
        }
    }

    /// Starts the reads the plan needs next, within the limits. Stops at a
    /// footer still on its way, unless `block` and nothing is in flight
    /// (the reader waits for what follows it).
    pub fn pump(&mut self, ctx: &Ctx<'_>, stats: &mut ReaderStats, block: bool) {
        self.walk(ctx, stats, block);
        // The last read stops growing when the pump stops.
        if let Some(run) = self.runs.back_mut()
            && matches!(run.read, RunRead::Open)
        {
            let rel = &ctx.phase.shards[run.shard].path;
            run.read = RunRead::Started(ctx.root.start_get_range(rel, run.range.clone()));
            stats.peak_reads_ahead = stats.peak_reads_ahead.max(self.runs.len() as u64);
        }
    }

    /// The shard cursor: takes rows from the plan, split at shard bounds,
    /// and starts the footer read of each new visit, until `requests`
    /// visits are ahead of the reader's (one when verifying hashes, which
    /// reads whole shards).
    fn scan(&mut self, ctx: &Ctx<'_>) {
        let sequences = ctx.phase.sequences;
        let ahead = if ctx.verify_sha256 {
            1
        } else {
            self.limits.requests.max(1)
        };
        for _ in 0..MAX_PUMP_STEPS {
            if self.planned || self.shards.len() > ahead || self.pieces >= MAX_PIECES {
                return;
            }
            let Some(rows) = self.plan.next() else {
                self.planned = true;
                return;
            };
            let mut logical = rows.start;
            while logical < rows.end {
                let physical = logical % sequences;
                let shard = ctx.shard_of(physical);
                let take = (ctx.shard_starts[shard + 1] - physical).min(rows.end - logical);
                self.push_piece(ctx, shard, physical..physical + take);
                logical += take;
            }
        }
    }

    fn push_piece(&mut self, ctx: &Ctx<'_>, shard: usize, piece: Range<u64>) {
        if let Some(slot) = self.shards.back_mut()
            && slot.index == shard
        {
            match slot.rows.back_mut() {
                Some(last) if last.end == piece.start => last.end = piece.end,
                _ => {
                    slot.rows.push_back(piece);
                    self.pieces += 1;
                }
            }
            return;
        }
        let entry = &ctx.phase.shards[shard];
        self.shards.push_back(ShardSlot {
            index: shard,
            state: ShardState::Opening(PendingOpen::start(
                ctx.root,
                &entry.path,
                ctx.verify_sha256,
            )),
            rows: VecDeque::from([piece]),
        });
        self.pieces += 1;
    }

    /// The row-group cursor (see [`Ahead::pump`]).
    fn walk(&mut self, ctx: &Ctx<'_>, stats: &mut ReaderStats, block: bool) {
        // The most one read may cover.
        let run_cap = (self.limits.bytes / self.limits.requests.max(1) as u64).max(1);
        for _ in 0..MAX_PUMP_STEPS {
            self.scan(ctx);
            let may_block = block && self.runs.is_empty();
            let Some(at) = self.shards.iter().position(|s| !s.rows.is_empty()) else {
                return;
            };
            let slot = &mut self.shards[at];
            if let ShardState::Opening(pending) = &slot.state
                && !(may_block || pending.is_finished())
            {
                return;
            }
            slot.resolve(ctx, stats);
            let ShardState::Open(open) = &slot.state else {
                return; // the error waits for the reader
            };
            let (open, shard) = (open.clone(), slot.index);
            let Some(physical) = slot.rows.front().map(|r| r.start) else {
                return;
            };
            let group = open.group_of(physical - ctx.shard_starts[shard]);
            if self.last != Some((shard, group)) {
                let Ok(read) = open.group_read(group) else {
                    return; // the reader meets the error when it gets there
                };
                // `None`: fetched with the footer, nothing to read.
                if let Some(range) = read.fetch
                    && !self.add(ctx, stats, shard, group, range, run_cap)
                {
                    return;
                }
                self.last = Some((shard, group));
            }
            let group_end = ctx.shard_starts[shard] + open.group_starts[group + 1];
            let slot = &mut self.shards[at];
            if let Some(piece) = slot.rows.front_mut() {
                piece.start = group_end.min(piece.end);
                if piece.is_empty() {
                    slot.rows.pop_front();
                    self.pieces -= 1;
                }
            }
        }
    }

    /// Adds row group `group` of `shard` (bytes `range`) to the last read
    /// or to a new one; false when the limits leave no room.
    fn add(
        &mut self,
        ctx: &Ctx<'_>,
        stats: &mut ReaderStats,
        shard: usize,
        group: usize,
        range: Range<u64>,
        run_cap: u64,
    ) -> bool {
        if let Some(run) = self.runs.back_mut()
            && matches!(run.read, RunRead::Open)
        {
            let follows = run.shard == shard
                && run.groups.back().is_some_and(|(g, _)| g + 1 == group)
                && range.start >= run.range.end
                && range.start - run.range.end <= MAX_GAP;
            let added = range.end.saturating_sub(run.range.end);
            if follows
                && range.end - run.range.start <= run_cap
                && self.bytes + added <= self.limits.bytes
            {
                run.groups.push_back((group, range.clone()));
                run.range.end = range.end;
                self.bytes += added;
                return true;
            }
            let rel = &ctx.phase.shards[run.shard].path;
            run.read = RunRead::Started(ctx.root.start_get_range(rel, run.range.clone()));
            stats.peak_reads_ahead = stats.peak_reads_ahead.max(self.runs.len() as u64);
        }
        let len = range.end - range.start;
        if self.runs.len() >= self.limits.requests
            || (!self.runs.is_empty() && self.bytes + len > self.limits.bytes)
        {
            return false;
        }
        self.runs.push_back(Run {
            shard,
            groups: VecDeque::from([(group, range.clone())]),
            range,
            read: RunRead::Open,
        });
        self.bytes += len;
        true
    }

    /// The opened shard `index` the reader enters, waiting for its footer
    /// if needed; `None` when the plan does not reach it (the reader left
    /// its plan).
    pub fn take_shard(
        &mut self,
        ctx: &Ctx<'_>,
        stats: &mut ReaderStats,
        index: usize,
    ) -> Option<Result<Arc<OpenShard>, LoaderError>> {
        if !self.shards.iter().any(|s| s.index == index) {
            self.pump(ctx, stats, false);
        }
        let at = self.shards.iter().position(|s| s.index == index)?;
        for passed in self.shards.drain(..at) {
            self.pieces -= passed.rows.len();
        }
        let slot = self.shards.front_mut()?;
        slot.resolve(ctx, stats);
        let taken = match &mut slot.state {
            ShardState::Open(open) => Ok(open.clone()),
            ShardState::Failed(e) => Err(e.take().unwrap_or_else(|| {
                LoaderError::Plan(format!("shard {index} failed to open before"))
            })),
            ShardState::Opening(_) => {
                Err(LoaderError::Plan(format!("shard {index} is still opening")))
            }
        };
        self.pump(ctx, stats, false);
        Some(taken)
    }

    /// The bytes of row group `group` of `shard` (its `fetch` range), which
    /// the reader needs now, waiting for them if needed; the reads before
    /// it are dropped. `None` when the plan does not have it next (the
    /// reader left its plan); an error when its read failed.
    pub fn take_group(
        &mut self,
        ctx: &Ctx<'_>,
        stats: &mut ReaderStats,
        shard: usize,
        group: usize,
    ) -> Option<Result<Bytes, LoaderError>> {
        if self.runs.is_empty() {
            self.pump(ctx, stats, true);
        }
        let has = |r: &Run| r.shard == shard && r.groups.iter().any(|(g, _)| *g == group);
        let at = self.runs.iter().position(has)?;
        for skipped in self.runs.drain(..at) {
            self.bytes -= skipped.range.end - skipped.range.start;
        }
        let run = self.runs.front_mut()?;
        while run.groups.front().is_some_and(|(g, _)| *g != group) {
            run.groups.pop_front();
        }
        let (_, fetch) = run.groups.pop_front()?;
        if matches!(run.read, RunRead::Open) {
            // Not started yet (the pump had not stopped): start it now.
            let rel = &ctx.phase.shards[run.shard].path;
            run.read = RunRead::Started(ctx.root.start_get_range(rel, run.range.clone()));
        }
        if matches!(run.read, RunRead::Started(_)) {
            // Refill before the reader waits.
            self.pump(ctx, stats, false);
        }
        let run = self.runs.front_mut()?;
        if let RunRead::Started(_) = &run.read {
            let RunRead::Started(mut pending) = std::mem::replace(&mut run.read, RunRead::Open)
            else {
                return None;
            };
            match ctx.wait(|limit| pending.wait_for(limit)) {
                Ok(bytes) => {
                    stats.bytes_fetched += bytes.len() as u64;
                    stats.group_reads += 1;
                    run.read = RunRead::Done(bytes);
                }
                Err(e) => return Some(Err(e)),
            }
        }
        let RunRead::Done(bytes) = &run.read else {
            return None;
        };
        let (from, to) = (fetch.start - run.range.start, fetch.end - run.range.start);
        let got = if to as usize <= bytes.len() {
            Ok(bytes.slice(from as usize..to as usize))
        } else {
            Ok(Bytes::new()) // a short read: decoding names it
        };
        if run.groups.is_empty() {
            self.bytes -= run.range.end - run.range.start;
            self.runs.pop_front();
        }
        stats.groups_read_ahead += 1;
        // Footers that arrived meanwhile let the reads go on.
        self.pump(ctx, stats, false);
        Some(got)
    }
}
