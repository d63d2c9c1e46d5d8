//! The data-order log: which rows every rank consumed at every step, and a
//! verifier that a phase consumed each row of `[0, steps·B)` exactly once.
//!
//! # Layout
//!
//! ```text
//! <ckpt_root>/<run_id>/data-order/<phase_index>-<phase_name>/<attempt>/
//!     rank-00000.attempt.json         {"attempt","phase","rank","world_size","resumed_from","opened_ms"}
//!     rank-00000.part-00000.jsonl     {"phase":i,"step":g,"rank":r,"rows":[first,last_exclusive]}
//!     rank-00000.part-00001.jsonl     … (a new part every `segment_lines` lines)
//! ```
//!
//! `<attempt>` is one world incarnation (the coordinator's `world_id`; a
//! rank that reopens the same world's log gets `<world_id>.1`, `.2`, …);
//! `resumed_from` is the step done of the checkpoint it started from (0 for
//! a fresh phase). Object stores cannot append, so the current part is
//! rewritten whole (atomically) on every flush; parts are bounded, so this
//! costs O(segment_lines) per flush.
//!
//! # Which entries count
//!
//! Attempts are ordered by when they started (the earliest `opened_ms` of
//! their ranks, then the attempt name): the coordinator forms a run's
//! worlds one after another, after the previous one was torn down. Replaying
//! attempts in that order, each attempt first **discards every entry with
//! `step >= resumed_from`** gathered so far (those steps were redone from
//! the checkpoint, their updates are lost) and then adds its own entries.
//! What is left is the history of the weights that survived: for every step
//! it is the last attempt that resumed at or before that step.
//!
//! ```text
//! attempt A (from 0):   0 ─────────── 130 ✗ crash (last checkpoint at 100)
//! attempt B (from 100):             100 ─────── 250 ✓
//! history:              A: 0..100 ,  B: 100..250
//! ```

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use twinhead_proto::BatchSchedule;

use super::LoaderError;
use twinhead_data::store::Location;

/// One line of the log: the rows rank `rank` consumed at step `step`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEntry {
    pub phase: u32,
    pub step: u64,
    pub rank: u32,
    /// `[first, last_exclusive]` logical rows.
    pub rows: [u64; 2],
}

/// The header a rank writes when it opens its log in an attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptHeader {
    pub attempt: String,
    pub phase: u32,
    pub rank: u32,
    pub world_size: u32,
    /// Step done of the checkpoint the attempt started from.
    pub resumed_from: u64,
    /// Wall clock when the rank opened its log (ms since the Unix epoch).
    pub opened_ms: u64,
}

/// Where the logs of one phase of one run live.
pub fn phase_dir(run_id: &str, phase_index: u32, phase_name: &str) -> String {
    format!("{run_id}/data-order/{phase_index}-{phase_name}")
}

/// One rank's log writer for one attempt of one phase.
#[derive(Debug)]
pub struct DataOrderLog {
    dir: Location,
    phase: u32,
    rank: u32,
    segment: u32,
    buffer: String,
    lines: usize,
    segment_lines: usize,
    flush_every: usize,
    unflushed: usize,
}

impl DataOrderLog {
    /// Lines per part file.
    pub const SEGMENT_LINES: usize = 1000;

    /// Opens rank `rank`'s log for `attempt` (the world id) of phase
    /// `phase_index`/`phase_name` of run `run_id` under the checkpoint root
    /// `ckpt_root` (a URL), writing its header. `resumed_from` is the step
    /// done of the checkpoint this attempt starts from (0: a fresh phase).
    /// Every `flush_every` records (at least 1) the current part is written.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        ckpt_root: &str,
        run_id: &str,
        phase_index: u32,
        phase_name: &str,
        attempt: &str,
        rank: u32,
        world_size: u32,
        resumed_from: u64,
        flush_every: usize,
    ) -> Result<Self, LoaderError> {
        let root = Location::open(ckpt_root, true)?;
        let phase = root.child(&phase_dir(run_id, phase_index, phase_name));
        // A rank that opens the log of the same world twice (its process
        // restarted) gets a fresh attempt folder `<attempt>.<k>`, so earlier
        // entries are superseded by the rule instead of overwritten.
        let header_name = format!("rank-{rank:05}.attempt.json");
        let mut k = 0u32;
        let attempt = loop {
            let name = if k == 0 {
                attempt.to_string()
            } else {
                format!("{attempt}.{k}")
            };
            if !phase.exists(&format!("{name}/{header_name}"))? {
                break name;
            }
            k += 1;
        };
        let dir = phase.child(&attempt);
        let opened_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let header = AttemptHeader {
            attempt,
            phase: phase_index,
            rank,
            world_size,
            resumed_from,
            opened_ms,
        };
        Self::open_in(dir, &header, flush_every)
    }

    /// Like [`DataOrderLog::open`] with an explicit header (tests set the
    /// clock).
    pub fn open_in(
        dir: Location,
        header: &AttemptHeader,
        flush_every: usize,
    ) -> Result<Self, LoaderError> {
        let json = serde_json::to_vec(header).map_err(|e| LoaderError::OrderLog {
            location: dir.url().to_string(),
            message: e.to_string(),
        })?;
        dir.put(&format!("rank-{:05}.attempt.json", header.rank), json)?;
        Ok(Self {
            dir,
            phase: header.phase,
            rank: header.rank,
            segment: 0,
            buffer: String::new(),
            lines: 0,
            segment_lines: Self::SEGMENT_LINES,
            flush_every: flush_every.max(1),
            unflushed: 0,
        })
    }

    /// Sets the lines per part file (tests use small parts).
    pub fn with_segment_lines(mut self, lines: usize) -> Self {
        self.segment_lines = lines.max(1);
        self
    }

    /// Records that this rank consumed logical rows `rows` at `step`. Call
    /// it once the step's optimizer update is done.
    pub fn record(&mut self, step: u64, rows: Range<u64>) -> Result<(), LoaderError> {
        let entry = OrderEntry {
            phase: self.phase,
            step,
            rank: self.rank,
            rows: [rows.start, rows.end],
        };
        let line = serde_json::to_string(&entry).map_err(|e| LoaderError::OrderLog {
            location: self.dir.url().to_string(),
            message: e.to_string(),
        })?;
        self.buffer.push_str(&line);
        self.buffer.push('\n');
        self.lines += 1;
        self.unflushed += 1;
        if self.lines >= self.segment_lines {
            self.flush()?;
            self.segment += 1;
            self.buffer.clear();
            self.lines = 0;
        } else if self.unflushed >= self.flush_every {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the current part (call before reporting a checkpoint and at
    /// the end of the attempt).
    pub fn flush(&mut self) -> Result<(), LoaderError> {
        if self.unflushed == 0 {
            return Ok(());
        }
        let name = format!("rank-{:05}.part-{:05}.jsonl", self.rank, self.segment);
        self.dir.put(&name, self.buffer.clone().into_bytes())?;
        self.unflushed = 0;
        Ok(())
    }
}

/// All ranks' logs of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptLog {
    pub attempt: String,
    /// Earliest `opened_ms` of its ranks.
    pub opened_ms: u64,
    pub resumed_from: u64,
    pub entries: Vec<OrderEntry>,
}

/// Reads every attempt's logs of one phase of a run.
pub fn read_attempts(
    ckpt_root: &str,
    run_id: &str,
    phase_index: u32,
    phase_name: &str,
) -> Result<Vec<AttemptLog>, LoaderError> {
    let root = Location::open(ckpt_root, false)?;
    let dir = root.child(&phase_dir(run_id, phase_index, phase_name));
    let mut out = Vec::new();
    for attempt in dir.list_dirs("")? {
        let adir = dir.child(&attempt);
        let mut log = AttemptLog {
            attempt: attempt.clone(),
            opened_ms: u64::MAX,
            resumed_from: 0,
            entries: Vec::new(),
        };
        // The first header's `resumed_from`, and its file.
        let mut resumed: Option<(u64, String)> = None;
        for file in adir.list("")?.into_iter().map(|listed| listed.rel) {
            let bytes = adir.get(&file)?;
            let bad = |message: String| LoaderError::OrderLog {
                location: adir.name(&file),
                message,
            };
            if file.ends_with(".attempt.json") {
                let header: AttemptHeader = parse_json(&bytes).map_err(bad)?;
                match &resumed {
                    Some((r, first)) if *r != header.resumed_from => {
                        return Err(bad(format!(
                            "ranks disagree on resumed_from: {} here, {r} in {}",
                            header.resumed_from,
                            adir.name(first)
                        )));
                    }
                    Some(_) => {}
                    None => resumed = Some((header.resumed_from, file.clone())),
                }
                log.opened_ms = log.opened_ms.min(header.opened_ms);
            } else if file.ends_with(".jsonl") {
                // Line by line on bytes: a damaged line (bad UTF-8 included)
                // is reported by its number.
                for (n, line) in bytes
                    .split(|&b| b == b'\n')
                    .enumerate()
                    .filter(|(_, l)| !l.trim_ascii().is_empty())
                {
                    let at = |e: String| bad(format!("line {}: {e}", n + 1));
                    // serde_json does not check the bytes of fields it skips.
                    std::str::from_utf8(line).map_err(|e| at(e.to_string()))?;
                    let entry: OrderEntry = parse_json(line).map_err(at)?;
                    log.entries.push(entry);
                }
            }
        }
        log.resumed_from = resumed
            .map(|(r, _)| r)
            .ok_or_else(|| LoaderError::OrderLog {
                location: adir.url().to_string(),
                message: "no rank-*.attempt.json header".into(),
            })?;
        out.push(log);
    }
    Ok(out)
}

/// `bytes` as one JSON value of type `T`; an error names the field at
/// fault (serde_json's own message names only a column).
fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            e.inner().to_string()
        } else {
            format!("`{path}`: {}", e.inner())
        }
    })?;
    // As serde_json::from_slice: nothing may follow the value.
    de.end().map_err(|e| e.to_string())?;
    Ok(value)
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataOrderReport {
    /// Rows of `[0, steps·B)` no step consumed.
    pub missing: Vec<Range<u64>>,
    /// Rows consumed more than once.
    pub duplicated: Vec<Range<u64>>,
    /// Rows at or past `steps·B` that were consumed.
    pub extra: Vec<Range<u64>>,
    /// Entries inconsistent with the batch rule (rows outside their step's
    /// global batch, another phase, a step before the attempt's resume).
    pub problems: Vec<String>,
}

impl DataOrderReport {
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty()
            && self.duplicated.is_empty()
            && self.extra.is_empty()
            && self.problems.is_empty()
    }
}

/// The surviving entries of `attempts` (see the module docs for the rule),
/// by step.
pub fn history(attempts: &[AttemptLog]) -> BTreeMap<u64, Vec<OrderEntry>> {
    let mut ordered: Vec<&AttemptLog> = attempts.iter().collect();
    ordered.sort_by(|a, b| (a.opened_ms, &a.attempt).cmp(&(b.opened_ms, &b.attempt)));
    let mut steps: BTreeMap<u64, Vec<OrderEntry>> = BTreeMap::new();
    for attempt in ordered {
        let _superseded = steps.split_off(&attempt.resumed_from);
        for entry in &attempt.entries {
            steps.entry(entry.step).or_default().push(*entry);
        }
    }
    steps
}

/// Checks that the surviving history of `attempts` of phase `phase_index`
/// consumed every row of `[0, schedule.offset(steps))` exactly once, each
/// within its step's global batch.
pub fn verify(
    attempts: &[AttemptLog],
    phase_index: u32,
    steps: u64,
    schedule: &BatchSchedule,
) -> DataOrderReport {
    let mut report = DataOrderReport::default();
    for attempt in attempts {
        for e in attempt
            .entries
            .iter()
            .filter(|e| e.step < attempt.resumed_from)
        {
            report.problems.push(format!(
                "attempt {} resumed from step {} but logged step {} (rank {})",
                attempt.attempt, attempt.resumed_from, e.step, e.rank
            ));
        }
    }
    let mut events: Vec<(u64, i64)> = Vec::new();
    for (step, entries) in history(attempts) {
        let batch = schedule.rows(step);
        for e in entries {
            let [first, last] = e.rows;
            if e.phase != phase_index {
                report.problems.push(format!(
                    "step {step} rank {}: logged phase {}, expected {phase_index}",
                    e.rank, e.phase
                ));
            }
            if first > last || first < batch.start || last > batch.end {
                report.problems.push(format!(
                    "step {step} rank {}: rows {first}..{last} are not within its global batch {}..{}",
                    e.rank, batch.start, batch.end
                ));
            }
            if first < last {
                events.push((first, 1));
                events.push((last, -1));
            }
        }
    }
    let end = schedule.offset(steps);
    events.sort_unstable();
    let mut count = 0i64;
    let mut at = 0u64;
    let push = |list: &mut Vec<Range<u64>>, r: Range<u64>| {
        if r.is_empty() {
            return;
        }
        match list.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => list.push(r),
        }
    };
    let classify = |from: u64, to: u64, count: i64, report: &mut DataOrderReport| {
        // Part inside [0, end).
        let inside = from.min(end)..to.min(end);
        let outside = from.max(end)..to.max(end);
        match count {
            0 => push(&mut report.missing, inside),
            1 => {}
            _ => push(&mut report.duplicated, inside),
        }
        if count > 0 {
            push(&mut report.extra, outside);
        }
    };
    for (pos, delta) in events {
        if pos > at {
            classify(at, pos, count, &mut report);
            at = pos;
        }
        count += delta;
    }
    if at < end {
        classify(at, end, count, &mut report);
    }
    report
}

/// Reads the logs of one phase of a run and verifies them.
pub fn verify_run(
    ckpt_root: &str,
    run_id: &str,
    phase_index: u32,
    phase_name: &str,
    steps: u64,
    schedule: &BatchSchedule,
) -> Result<DataOrderReport, LoaderError> {
    let attempts = read_attempts(ckpt_root, run_id, phase_index, phase_name)?;
    Ok(verify(&attempts, phase_index, steps, schedule))
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// What ranks `0..n` of an attempt log for `steps` under batch `b`.
    fn entries(steps: Range<u64>, b: u64, n: u32) -> Vec<OrderEntry> {
        let mut out = Vec::new();
        for step in steps {
            for r in 0..n {
                let base = step * b;
                let (r64, n64) = (u64::from(r), u64::from(n));
                out.push(OrderEntry {
                    phase: 0,
                    step,
                    rank: r,
                    rows: [base + r64 * b / n64, base + (r64 + 1) * b / n64],
                });
            }
        }
        out
    }

    fn attempt(
        name: &str,
        opened_ms: u64,
        resumed_from: u64,
        entries: Vec<OrderEntry>,
    ) -> AttemptLog {
        AttemptLog {
            attempt: name.into(),
            opened_ms,
            resumed_from,
            entries,
        }
    }

    #[test]
    fn a_complete_run_passes() {
        let report = verify(
            &[attempt("a", 1, 0, entries(0..10, 6, 3))],
            0,
            10,
            &BatchSchedule::constant(6),
        );
        assert!(report.is_ok(), "{report:?}");
    }

    #[test]
    fn a_missing_row_range_is_reported() {
        let mut log = entries(0..10, 6, 3);
        // Rank 1 of step 4 (rows 26..28) never logged.
        log.retain(|e| !(e.step == 4 && e.rank == 1));
        let report = verify(
            &[attempt("a", 1, 0, log)],
            0,
            10,
            &BatchSchedule::constant(6),
        );
        assert_eq!(report.missing, vec![26..28]);
        assert!(report.duplicated.is_empty());
        // Stopping early misses the tail.
        let report = verify(
            &[attempt("a", 1, 0, entries(0..8, 6, 3))],
            0,
            10,
            &BatchSchedule::constant(6),
        );
        assert_eq!(report.missing, vec![48..60]);
    }

    #[test]
    fn a_duplicated_row_range_is_reported() {
        let mut log = entries(0..10, 6, 3);
        let mut dup = log[7];
        dup.rank = 9;
        log.push(dup);
        let report = verify(
            &[attempt("a", 1, 0, log)],
            0,
            10,
            &BatchSchedule::constant(6),
        );
        assert_eq!(report.duplicated, vec![dup.rows[0]..dup.rows[1]]);
        assert!(report.missing.is_empty());
        // Rows outside the step's global batch are a problem too.
        let mut log = entries(0..10, 6, 3);
        log[0].rows = [6, 8];
        let report = verify(
            &[attempt("a", 1, 0, log)],
            0,
            10,
            &BatchSchedule::constant(6),
        );
        assert_eq!(report.duplicated, vec![6..8]);
        assert_eq!(report.missing, vec![0..2]);
        assert_eq!(report.problems.len(), 1);
    }

    #[test]
    fn a_resumed_history_supersedes_the_crashed_tail() {
        // Attempt a (3 ranks) crashed after step 12; its last checkpoint was
        // at step 8. Attempt b (2 ranks, another world size) resumed from 8
        // and crashed at 15 with a checkpoint at 14; c (4 ranks) finished.
        let attempts = [
            attempt("w-c", 300, 14, entries(14..20, 12, 4)),
            attempt("w-a", 100, 0, entries(0..13, 12, 3)),
            attempt("w-b", 200, 8, entries(8..16, 12, 2)),
        ];
        let report = verify(&attempts, 0, 20, &BatchSchedule::constant(12));
        assert!(report.is_ok(), "{report:?}");
        let h = history(&attempts);
        assert_eq!(h[&9].len(), 2, "step 9 comes from w-b's two ranks");
        assert_eq!(h[&15].len(), 4, "step 15 comes from w-c's four ranks");
        // Without the supersession rule the crashed tails would duplicate.
        let naive: Vec<OrderEntry> = attempts.iter().flat_map(|a| a.entries.clone()).collect();
        assert!(
            !verify(
                &[attempt("all", 0, 0, naive)],
                0,
                20,
                &BatchSchedule::constant(12)
            )
            .duplicated
            .is_empty()
        );
    }

    #[test]
    fn a_resumed_attempt_that_skips_steps_leaves_them_missing() {
        // a logged steps 0..9 only, yet b resumed from step 10: nobody
        // consumed step 9.
        let attempts = [
            attempt("a", 1, 0, entries(0..9, 4, 1)),
            attempt("b", 2, 10, entries(10..12, 4, 1)),
        ];
        let report = verify(&attempts, 0, 12, &BatchSchedule::constant(4));
        assert_eq!(report.missing, vec![36..40]);
    }

    #[test]
    fn logs_round_trip_through_the_store() -> TestResult {
        let dir = tempfile::tempdir()?;
        let url = format!("file://{}", dir.path().display());
        // Attempt a: ranks 0 and 1, steps 0..6, crash (last checkpoint 4).
        for rank in 0..2u32 {
            let mut log = DataOrderLog::open(&url, "run", 0, "pretrain", "world-a", rank, 2, 0, 1)?
                .with_segment_lines(4);
            for step in 0..6u64 {
                let base = step * 8;
                log.record(
                    step,
                    base + u64::from(rank) * 4..base + u64::from(rank) * 4 + 4,
                )?;
            }
            log.flush()?;
        }
        // Attempt b: one rank, from step 4 to the end (step 10).
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mut log = DataOrderLog::open(&url, "run", 0, "pretrain", "world-b", 0, 1, 4, 3)?;
        for step in 4..10u64 {
            log.record(step, step * 8..step * 8 + 8)?;
        }
        log.flush()?;
        let attempts = read_attempts(&url, "run", 0, "pretrain")?;
        assert_eq!(attempts.len(), 2);
        assert_eq!(attempts[0].entries.len(), 12);
        let report = verify_run(&url, "run", 0, "pretrain", 10, &BatchSchedule::constant(8))?;
        assert!(report.is_ok(), "{report:?}");
        // A rank process of world b that restarts and redoes steps 8..10
        // writes a new attempt folder instead of overwriting its log.
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mut again = DataOrderLog::open(&url, "run", 0, "pretrain", "world-b", 0, 1, 8, 1)?;
        again.record(8, 64..72)?;
        again.record(9, 72..80)?;
        assert!(
            dir.path()
                .join("run/data-order/0-pretrain/world-b.1/rank-00000.part-00000.jsonl")
                .exists()
        );
        let report = verify_run(&url, "run", 0, "pretrain", 10, &BatchSchedule::constant(8))?;
        assert!(report.is_ok(), "{report:?}");
        // The lines are the documented JSON.
        let text = std::fs::read_to_string(
            dir.path()
                .join("run/data-order/0-pretrain/world-b/rank-00000.part-00000.jsonl"),
        )?;
        assert_eq!(
            text.lines().next(),
            Some(r#"{"phase":0,"step":4,"rank":0,"rows":[32,40]}"#)
        );
        // Losing a part file shows up as missing rows.
        std::fs::remove_file(
            dir.path()
                .join("run/data-order/0-pretrain/world-a/rank-00001.part-00000.jsonl"),
        )?;
        let report = verify_run(&url, "run", 0, "pretrain", 10, &BatchSchedule::constant(8))?;
        assert_eq!(report.missing, vec![4..8, 12..16, 20..24, 28..32]);
        Ok(())
    }
}
