//! The data loader: global batches of a phase's packed rows, sliced per
//! rank, read straight from dataprep's parquet shards.
//!
//! # Data order
//!
//! A phase's rows are numbered in shard order (shard 0's rows, then shard
//! 1's, …). Global batch `g` of size `B` holds rows `[g·B, (g+1)·B)`; rank
//! `r` of `N` takes rows `[g·B + r·B/N, g·B + (r+1)·B/N)` (integer
//! division, so an uneven split still covers every row once), cut into
//! micro-batches of `micro_batch` rows (the last may be smaller). The global
//! order does not depend on `N`, so a run resumed with another world size
//! sees the same global batches.
//!
//! With a batch warmup (phase 0 of a run with `batch_warmup`), step `s`
//! takes `b(s)` rows starting at `o(s)`, the sum of the batches before it
//! ([`twinhead_proto::batch`] has the law): global batch `s` is
//! `[o(s), o(s) + b(s))` and rank `r` takes `[o(s) + r·b(s)/N, o(s) +
//! (r+1)·b(s)/N)`. Rows stay contiguous and each is used once.
//!
//! Row numbers past the end of the phase wrap around: logical row `L` is
//! physical row `L mod sequences` (another epoch over the same order). The
//! logical numbers are what [`Batch::rows`] reports and what the data-order
//! log records, so a wrapped run still consumes each *logical* row once.
//! The coordinator's `num_steps` (`tokens / (B × seq_len)` without a
//! warmup) normally fits in one epoch.
//!
//! Reaching a step is O(1) in the number of steps before it: the shard and
//! the row within it come from the manifest's cumulative row counts, and
//! only the row groups holding the wanted rows are fetched (the current
//! shard's footer and one decoded row group are cached). [`Prefetcher`]
//! decodes a few steps ahead on its own thread and, since it knows which
//! rows those steps take, keeps several row-group reads in flight ahead of
//! that ([`ReadAhead`]), so that an object store's latency overlaps the
//! decoding instead of adding to it.
//!
//! # Layout
//!
//! * The manifest is `twinhead_data::manifest`'s, which dataprep writes.
//! * `shard` — footer and row-group reads of one shard.
//! * `ahead` — reads started ahead of the reader, in the order its plan
//!   needs them.
//! * `order` — the data-order log and its verifier.

mod ahead;
pub mod order;
mod shard;

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::Instant;

pub use ahead::ReadAhead;
use ahead::{Ahead, Ctx};
pub use shard::sha256_hex;
use shard::{DecodedGroup, Fetched, OpenShard, PendingOpen};

use twinhead_proto::BatchSchedule;

use twinhead_data::FormatError;
use twinhead_data::manifest::{MANIFEST, Manifest, PhaseStats};
use twinhead_data::store::{Location, StoreError};

/// Errors of the loader and the data-order log, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "dataset {location} has no manifest.json (a dataset without a manifest does not exist)"
    )]
    MissingManifest { location: String },
    /// The manifest does not parse, or lacks the phase.
    #[error(transparent)]
    Manifest(#[from] FormatError),
    #[error("phase `{phase}` of {location} has seq_len {manifest}, the run spec says {spec}")]
    SeqLen {
        location: String,
        phase: String,
        manifest: u32,
        spec: u32,
    },
    #[error("phase `{phase}` of {location}: {message}")]
    Phase {
        location: String,
        phase: String,
        message: String,
    },
    #[error("shard {location} has sha256 {actual}, the manifest says {expected}")]
    ShardHash {
        location: String,
        expected: String,
        actual: String,
    },
    #[error("shard {location} has {actual} rows, the manifest says {expected}")]
    ShardRows {
        location: String,
        expected: u64,
        actual: u64,
    },
    #[error("cannot read shard {location}: {message}")]
    Parquet { location: String, message: String },
    #[error("row {row} of {location} has {got} tokens, expected seq_len {expected}")]
    RowLength {
        location: String,
        row: u64,
        expected: usize,
        got: usize,
    },
    #[error("row {row} of {location}: doc_lens sum to {sum}, not seq_len {seq_len}")]
    DocLens {
        location: String,
        row: u64,
        sum: u64,
        seq_len: usize,
    },
    #[error("bad batch plan: {0}")]
    Plan(String),
    #[error("the prefetch thread stopped before step {step}")]
    PrefetchStopped { step: u64 },
    #[error("bad data-order log {location}: {message}")]
    OrderLog { location: String, message: String },
}

/// How each step's global batch is split across ranks and micro-batches.
/// Pure arithmetic; see the module docs for the rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    schedule: Arc<BatchSchedule>,
    world_size: u32,
    rank: u32,
    micro_batch: u64,
}

impl BatchPlan {
    /// `global_batch` rows per step split across `world_size` ranks; this
    /// is `rank`; `micro_batch` rows per forward pass (0: all at once).
    pub fn new(
        global_batch: u64,
        world_size: u32,
        rank: u32,
        micro_batch: u64,
    ) -> Result<Self, LoaderError> {
        Self::with_schedule(
            BatchSchedule::constant(global_batch),
            world_size,
            rank,
            micro_batch,
        )
    }

    /// Like [`BatchPlan::new`], with step sizes from `schedule` (a batch
    /// warmup).
    pub fn with_schedule(
        schedule: BatchSchedule,
        world_size: u32,
        rank: u32,
        micro_batch: u64,
    ) -> Result<Self, LoaderError> {
        if world_size == 0 || rank >= world_size {
            return Err(LoaderError::Plan(format!(
                "rank {rank} is not in a world of {world_size}"
            )));
        }
        let smallest = schedule.smallest_batch();
        if smallest < u64::from(world_size) {
            return Err(LoaderError::Plan(format!(
                "global batch {smallest} has fewer rows than the {world_size} ranks"
            )));
        }
        Ok(Self {
            schedule: Arc::new(schedule),
            world_size,
            rank,
            micro_batch,
        })
    }

    /// Sizes and offsets of the steps.
    pub fn schedule(&self) -> &BatchSchedule {
        &self.schedule
    }

    pub fn world_size(&self) -> u32 {
        self.world_size
    }

    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// Logical rows of global batch `step`.
    pub fn global_rows(&self, step: u64) -> Range<u64> {
        self.schedule.rows(step)
    }

    /// Logical rows this rank takes from global batch `step`.
    pub fn rank_rows(&self, step: u64) -> Range<u64> {
        let base = self.schedule.offset(step);
        let batch = self.schedule.batch(step);
        let n = u64::from(self.world_size);
        let r = u64::from(self.rank);
        base + r * batch / n..base + (r + 1) * batch / n
    }

    /// This rank's rows of `step`, cut into micro-batches.
    pub fn micro_ranges(&self, step: u64) -> Vec<Range<u64>> {
        let rows = self.rank_rows(step);
        let size = if self.micro_batch == 0 {
            rows.end - rows.start
        } else {
            self.micro_batch
        };
        let mut out = Vec::new();
        let mut start = rows.start;
        while start < rows.end {
            let end = (start + size).min(rows.end);
            out.push(start..end);
            start = end;
        }
        out
    }

    /// Rows consumed by the whole world once `steps` steps are done (the
    /// checkpoint's data cursor).
    pub fn cursor_after(&self, steps: u64) -> u64 {
        self.schedule.offset(steps)
    }
}

/// One forward pass worth of rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MicroBatch {
    /// Logical phase rows held (see the module docs on wrap-around).
    pub rows: Range<u64>,
    /// The token ids of each row (`seq_len` each).
    pub input_ids: Vec<Vec<u32>>,
    /// Per row, the lengths of the documents packed in it (summing to
    /// seq_len).
    pub doc_lens: Vec<Vec<u32>>,
}

/// This rank's share of one global batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Global step (batch index) within the phase.
    pub step: u64,
    /// Logical phase rows this rank holds, for the data-order log.
    pub rows: Range<u64>,
    pub seq_len: usize,
    pub micro_batches: Vec<MicroBatch>,
}

/// Options of [`PhaseReader::open`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderOptions {
    /// Fetch every shard whole and check its sha256 against the manifest
    /// before using it (costs a full read per shard).
    pub verify_sha256: bool,
    /// How far to read ahead once given a plan
    /// ([`PhaseReader::plan_reads`]; the [`Prefetcher`] gives one).
    pub read_ahead: ReadAhead,
}

/// What a [`PhaseReader`] has fetched so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Shard footers read.
    pub shards_opened: u64,
    /// Row groups fetched and decoded.
    pub groups_decoded: u64,
    /// Bytes fetched from storage and taken by the reader (footers, column
    /// chunks, whole shards when verifying); reads ahead that the reader
    /// never took are not counted.
    pub bytes_fetched: u64,
    /// Range reads made for row groups (a read ahead of several
    /// consecutive row groups counts once).
    pub group_reads: u64,
    /// Row groups whose reads were started ahead of the reader.
    pub groups_read_ahead: u64,
    /// Most row-group reads ahead outstanding at once.
    pub peak_reads_ahead: u64,
    /// Microseconds the reader spent getting footers and row-group bytes
    /// (waiting for the store, or reading locally), not decoding.
    pub read_micros: u64,
}

/// The dataset at `dataset_url` and its manifest's entry for `phase`.
fn manifest_phase(dataset_url: &str, phase: &str) -> Result<(Location, PhaseStats), LoaderError> {
    let root = Location::open(dataset_url, false)?;
    let manifest_name = root.name(MANIFEST);
    let bytes = root
        .get_opt(MANIFEST)?
        .ok_or_else(|| LoaderError::MissingManifest {
            location: root.url().to_string(),
        })?;
    let manifest = Manifest::parse(&manifest_name, &bytes)?;
    let found = manifest.phase(&manifest_name, phase)?.clone();
    Ok((root, found))
}

/// Reads rows of one phase of a dataset. Synchronous: run it on a thread
/// of its own (see [`Prefetcher`]).
pub struct PhaseReader {
    root: Location,
    phase: PhaseStats,
    /// First logical row of every shard, and the phase's row count last.
    shard_starts: Vec<u64>,
    options: ReaderOptions,
    open: Option<Arc<OpenShard>>,
    group: Option<DecodedGroup>,
    /// Reads started ahead, once given a plan.
    ahead: Option<Ahead>,
    /// Set by the [`Prefetcher`] when dropped: waits for reads give up.
    stop: Option<Arc<AtomicBool>>,
    /// The step [`PhaseReader::batch`] reads.
    step: u64,
    stats: ReaderStats,
}

impl std::fmt::Debug for PhaseReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PhaseReader")
            .field("root", &self.root)
            .field("phase", &self.phase.name)
            .finish_non_exhaustive()
    }
}

impl PhaseReader {
    /// Opens phase `phase` of the dataset at `dataset_url` (a local path,
    /// `file://` or cloud URL of the folder holding `manifest.json`),
    /// checking that its rows are `seq_len` tokens long.
    pub fn open(
        dataset_url: &str,
        phase: &str,
        seq_len: u32,
        options: ReaderOptions,
    ) -> Result<Self, LoaderError> {
        let (root, found) = manifest_phase(dataset_url, phase)?;
        Self::from_manifest_phase(root, found, seq_len, options)
    }

    /// Opens the held-out split of phase `phase` (its eval shards), the
    /// same way as [`PhaseReader::open`]; a phase built without one is an
    /// error that says how to get one.
    pub fn open_eval(
        dataset_url: &str,
        phase: &str,
        seq_len: u32,
        options: ReaderOptions,
    ) -> Result<Self, LoaderError> {
        let (root, found) = manifest_phase(dataset_url, phase)?;
        let Some(eval) = found.eval.clone().filter(|e| e.sequences > 0) else {
            return Err(LoaderError::Phase {
                location: root.name(MANIFEST),
                phase: phase.to_string(),
                message: "has no held-out rows (build the dataset with \
                          `eval = { fraction = …, max_docs = … }` in its data config)"
                    .into(),
            });
        };
        let held_out = PhaseStats {
            sequences: eval.sequences,
            tokens: eval.tokens,
            tokens_per_source: eval.tokens_per_source,
            tail_tokens_dropped: eval.tail_tokens_dropped,
            draws: Vec::new(),
            shards: eval.shards,
            eval: None,
            ..found
        };
        Self::from_manifest_phase(root, held_out, seq_len, options)
    }

    fn from_manifest_phase(
        root: Location,
        phase: PhaseStats,
        seq_len: u32,
        options: ReaderOptions,
    ) -> Result<Self, LoaderError> {
        let location = root.name(MANIFEST);
        let bad = |message: String| LoaderError::Phase {
            location: location.clone(),
            phase: phase.name.clone(),
            message,
        };
        if phase.seq_len != seq_len {
            return Err(LoaderError::SeqLen {
                location: location.clone(),
                phase: phase.name.clone(),
                manifest: phase.seq_len,
                spec: seq_len,
            });
        }
        let mut shard_starts = Vec::with_capacity(phase.shards.len() + 1);
        let mut total = 0u64;
        for (i, shard) in phase.shards.iter().enumerate() {
            shard_starts.push(total);
            // The counts come from the manifest: any number may be there.
            total = total.checked_add(shard.rows).ok_or_else(|| {
                bad(format!(
                    "`shards[{i}].rows` = {}: the shards' rows add up past 2^64",
                    shard.rows
                ))
            })?;
        }
        shard_starts.push(total);
        if total != phase.sequences {
            return Err(bad(format!(
                "shards hold {total} rows, `sequences` says {}",
                phase.sequences
            )));
        }
        if total == 0 {
            return Err(bad("the phase has no rows".into()));
        }
        Ok(Self {
            root,
            phase,
            shard_starts,
            options,
            open: None,
            group: None,
            ahead: None,
            stop: None,
            step: 0,
            stats: ReaderStats::default(),
        })
    }

    /// The phase as the manifest describes it.
    pub fn phase(&self) -> &PhaseStats {
        &self.phase
    }

    /// What has been fetched so far.
    pub fn stats(&self) -> ReaderStats {
        self.stats
    }

    /// Rows in one epoch of the phase.
    pub fn sequences(&self) -> u64 {
        self.phase.sequences
    }

    pub fn seq_len(&self) -> usize {
        self.phase.seq_len as usize
    }

    /// Tells the reader which logical rows it will be asked for next, in
    /// order (e.g. this rank's rows of the coming steps), so that it reads
    /// their row groups ahead within [`ReaderOptions::read_ahead`]. Reads
    /// outside the plan stay correct; they stop the read-ahead.
    pub fn plan_reads<I>(&mut self, rows: I)
    where
        I: IntoIterator<Item = Range<u64>>,
        I::IntoIter: Send + 'static,
    {
        let limits = self.options.read_ahead;
        if limits.requests == 0 {
            self.ahead = None;
            return;
        }
        self.ahead = Some(Ahead::new(limits, Box::new(rows.into_iter())));
        let (ctx, ahead, stats) = self.parts();
        if let Some(ahead) = ahead {
            ahead.pump(&ctx, stats, false);
        }
    }

    /// The reader's fields, borrowed apart for the read-ahead.
    fn parts(&mut self) -> (Ctx<'_>, Option<&mut Ahead>, &mut ReaderStats) {
        let ctx = Ctx {
            root: &self.root,
            phase: &self.phase,
            shard_starts: &self.shard_starts,
            verify_sha256: self.options.verify_sha256,
            stop: self.stop.as_deref(),
            step: self.step,
        };
        (ctx, self.ahead.as_mut(), &mut self.stats)
    }

    /// Stops reading ahead: the reader left its plan, or a read failed.
    fn drop_read_ahead(&mut self, why: &str) {
        if self.ahead.take().is_some() {
            tracing::debug!(phase = %self.phase.name, why, "read-ahead stopped");
        }
    }

    /// Shard `index`, opened: from the read-ahead when it has it.
    fn open_shard(&mut self, index: usize) -> Result<Arc<OpenShard>, LoaderError> {
        let (ctx, ahead, stats) = self.parts();
        let taken = ahead.and_then(|a| a.take_shard(&ctx, stats, index));
        match taken {
            Some(Ok(open)) => return Ok(open),
            Some(Err(e)) => {
                self.drop_read_ahead("a shard failed to open");
                return Err(e);
            }
            None => self.drop_read_ahead("the reader left its plan"),
        }
        let (ctx, _, stats) = self.parts();
        let (rel, whole) = (&ctx.phase.shards[index].path, ctx.verify_sha256);
        let fetched = match ctx.stop {
            Some(_) => {
                let mut pending = PendingOpen::start(ctx.root, rel, whole);
                ctx.wait(|limit| pending.wait_for(limit))?
            }
            None => Fetched::fetch(ctx.root, rel, whole)?,
        };
        ctx.finish_open(index, fetched, stats)
    }

    /// Bytes `range` of `open` for row group `group`: from the read-ahead
    /// when it has them.
    fn fetch_group(
        &mut self,
        open: &OpenShard,
        group: usize,
        range: Range<u64>,
    ) -> Result<bytes::Bytes, LoaderError> {
        let (ctx, ahead, stats) = self.parts();
        match ahead.and_then(|a| a.take_group(&ctx, stats, open.index, group)) {
            Some(Ok(bytes)) => return Ok(bytes),
            Some(Err(e)) => {
                self.drop_read_ahead("a read failed");
                return Err(e);
            }
            None => {}
        }
        self.drop_read_ahead("the reader left its plan");
        let (ctx, _, stats) = self.parts();
        let bytes = match ctx.stop {
            Some(_) => {
                let mut pending = ctx.root.start_get_range(open.rel(), range.clone());
                ctx.wait(|limit| pending.wait_for(limit))?
            }
            None => ctx.root.get_range(open.rel(), range.clone())?,
        };
        stats.bytes_fetched += range.end - range.start;
        stats.group_reads += 1;
        Ok(bytes)
    }

    /// Makes the row group holding physical row `row` the cached one.
    fn load(&mut self, row: u64) -> Result<&DecodedGroup, LoaderError> {
        let shard = self.shard_starts.partition_point(|&s| s <= row) - 1;
        let in_shard = row - self.shard_starts[shard];
        let open = match &self.open {
            Some(open) if open.index == shard => open.clone(),
            _ => {
                self.group = None;
                self.open = None;
                let started = Instant::now();
                let open = self.open_shard(shard);
                self.stats.read_micros += started.elapsed().as_micros() as u64;
                let open = open?;
                self.open = Some(open.clone());
                open
            }
        };
        let group = open.group_of(in_shard);
        let cached = self
            .group
            .as_ref()
            .is_some_and(|g| g.shard == shard && g.group == group);
        if !cached {
            self.group = None;
            let read = open.group_read(group)?;
            let fetched = match &read.fetch {
                Some(range) => {
                    let started = Instant::now();
                    let fetched = self.fetch_group(&open, group, range.clone());
                    self.stats.read_micros += started.elapsed().as_micros() as u64;
                    Some(fetched?)
                }
                None => None,
            };
            let decoded = open.decode_group(group, &read, fetched, self.seq_len())?;
            self.stats.groups_decoded += 1;
            self.group = Some(decoded);
        }
        self.group
            .as_ref()
            .ok_or_else(|| LoaderError::Plan("no row group cached".into()))
    }

    /// Reads logical rows `rows` (wrapping past the end of the phase).
    pub fn read_rows(&mut self, rows: Range<u64>) -> Result<MicroBatch, LoaderError> {
        let seq_len = self.seq_len();
        let sequences = self.sequences();
        let count = rows.end.saturating_sub(rows.start) as usize;
        let mut input_ids = Vec::with_capacity(count);
        let mut doc_lens = Vec::with_capacity(count);
        let mut logical = rows.start;
        while logical < rows.end {
            let physical = logical % sequences;
            let shard_first = {
                let shard = self.shard_starts.partition_point(|&s| s <= physical) - 1;
                self.shard_starts[shard]
            };
            let group = self.load(physical)?;
            let from = (physical - shard_first - group.first_row) as usize;
            // Rows available in this group, not crossing the phase's end.
            let available = (group.rows() as usize - from).min((sequences - physical) as usize);
            let take = available.min((rows.end - logical) as usize);
            input_ids.extend(
                group.input_ids[from * seq_len..(from + take) * seq_len]
                    .chunks(seq_len)
                    .map(<[u32]>::to_vec),
            );
            doc_lens.extend_from_slice(&group.doc_lens[from..from + take]);
            logical += take as u64;
        }
        Ok(MicroBatch {
            rows,
            input_ids,
            doc_lens,
        })
    }

    /// This rank's batch of `step` under `plan`.
    pub fn batch(&mut self, plan: &BatchPlan, step: u64) -> Result<Batch, LoaderError> {
        self.step = step;
        let micro_batches = plan
            .micro_ranges(step)
            .into_iter()
            .map(|rows| self.read_rows(rows))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Batch {
            step,
            rows: plan.rank_rows(step),
            seq_len: self.seq_len(),
            micro_batches,
        })
    }
}

/// Reads batches of consecutive steps on a background thread, at most
/// `depth` steps ahead of the consumer, delivering them in step order.
/// Dropping it stops the thread.
pub struct Prefetcher {
    rx: Option<Receiver<Result<Batch, LoaderError>>>,
    handle: Option<JoinHandle<()>>,
    /// Tells the thread's reader to stop waiting for reads.
    stop: Arc<AtomicBool>,
    next: u64,
    end: u64,
}

impl Prefetcher {
    /// Starts reading steps `steps` (e.g. `first_step..last_step + 1`).
    pub fn spawn(
        mut reader: PhaseReader,
        plan: BatchPlan,
        steps: Range<u64>,
        depth: usize,
    ) -> Result<Self, LoaderError> {
        let needed = plan.cursor_after(steps.end);
        if needed > reader.sequences() {
            tracing::warn!(
                phase = %reader.phase().name,
                rows = reader.sequences(),
                needed,
                "the steps need more rows than the phase holds: wrapping around for another epoch"
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        reader.stop = Some(stop.clone());
        let (tx, rx) = sync_channel(depth.max(1));
        let range = steps.clone();
        let handle = std::thread::Builder::new()
            .name("twinhead-prefetch".into())
            .spawn(move || prefetch(reader, plan, range, tx))
            .map_err(|e| LoaderError::Plan(format!("cannot start the prefetch thread: {e}")))?;
        Ok(Self {
            rx: Some(rx),
            handle: Some(handle),
            stop,
            next: steps.start,
            end: steps.end,
        })
    }

    /// The next step's batch; `None` after the last step. Blocks only when
    /// the reader has fallen behind.
    pub fn next_batch(&mut self) -> Option<Result<Batch, LoaderError>> {
        if self.next >= self.end {
            return None;
        }
        let step = self.next;
        let got = self.rx.as_ref()?.recv();
        match got {
            Ok(Ok(batch)) => {
                self.next += 1;
                Some(Ok(batch))
            }
            Ok(Err(e)) => {
                // The thread stops after an error.
                self.next = self.end;
                Some(Err(e))
            }
            Err(_) => {
                self.next = self.end;
                Some(Err(LoaderError::PrefetchStopped { step }))
            }
        }
    }
}

impl Iterator for Prefetcher {
    type Item = Result<Batch, LoaderError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_batch()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Dropping the receiver makes the thread's next send fail; the stop
        // flag ends a wait for a read (within STOP_POLL); the reader,
        // dropped with the thread, cancels its reads in flight.
        self.stop.store(true, Ordering::Relaxed);
        self.rx = None;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn prefetch(
    mut reader: PhaseReader,
    plan: BatchPlan,
    steps: Range<u64>,
    tx: SyncSender<Result<Batch, LoaderError>>,
) {
    // The rows of the coming steps, in the order `batch` reads them.
    let ahead = plan.clone();
    reader.plan_reads(steps.clone().map(move |step| ahead.rank_rows(step)));
    for step in steps {
        let batch = reader.batch(&plan, step);
        let failed = batch.is_err();
        if tx.send(batch).is_err() || failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
