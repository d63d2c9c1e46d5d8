//! Loader tests on real parquet shards written to a temporary folder.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::builder::{ListBuilder, UInt16Builder, UInt32Builder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::*;
use probe::{Counts, Probe};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Token `j` of phase row `i`.
fn token(i: u64, j: usize) -> u32 {
    (i * 1000 + j as u64) as u32
}

/// Document lengths of phase row `i` (varies with the row).
fn docs(i: u64, seq_len: usize) -> Vec<u32> {
    let first = (i as usize % (seq_len - 1)) + 1;
    vec![first as u32, (seq_len - first) as u32]
}

fn list_field(name: &str, item: DataType) -> Field {
    Field::new(
        name,
        DataType::List(Arc::new(Field::new("item", item, false))),
        false,
    )
}

/// Shard bytes holding phase rows `rows`, `per_group` rows per row group.
fn shard_bytes(
    rows: Range<u64>,
    seq_len: usize,
    per_group: usize,
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let item = |dt: DataType| Arc::new(Field::new("item", dt, false));
    let mut ids = ListBuilder::new(UInt32Builder::new()).with_field(item(DataType::UInt32));
    let mut lens = ListBuilder::new(UInt32Builder::new()).with_field(item(DataType::UInt32));
    let mut src = ListBuilder::new(UInt16Builder::new()).with_field(item(DataType::UInt16));
    for i in rows {
        for j in 0..seq_len {
            ids.values().append_value(token(i, j));
        }
        ids.append(true);
        for d in docs(i, seq_len) {
            lens.values().append_value(d);
            src.values().append_value((i % 3) as u16);
        }
        lens.append(true);
        src.append(true);
    }
    let schema = Arc::new(Schema::new(vec![
        list_field("input_ids", DataType::UInt32),
        list_field("doc_lens", DataType::UInt32),
        list_field("source", DataType::UInt16),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids.finish()),
        Arc::new(lens.finish()),
        Arc::new(src.finish()),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .set_max_row_group_row_count(Some(per_group))
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, schema, Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(out)
}

pub(crate) struct Fixture {
    pub dir: tempfile::TempDir,
    pub seq_len: usize,
    pub rows: u64,
}

impl Fixture {
    pub fn url(&self) -> String {
        format!("file://{}", self.dir.path().display())
    }
}

/// A dataset with phase `pretrain` of `rows` rows, `per_shard` rows per
/// shard and `per_group` per row group.
pub(crate) fn fixture(
    rows: u64,
    seq_len: usize,
    per_shard: u64,
    per_group: usize,
) -> Result<Fixture, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut shards = Vec::new();
    let mut start = 0;
    while start < rows {
        let end = (start + per_shard).min(rows);
        let path = format!("phases/pretrain/shard-{:05}.parquet", shards.len());
        let bytes = shard_bytes(start..end, seq_len, per_group)?;
        let file = dir.path().join(&path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&file, &bytes)?;
        shards.push(
            serde_json::json!({"path": path, "rows": end - start, "sha256": sha256_hex(&bytes)}),
        );
        start = end;
    }
    let manifest = serde_json::json!({
        "format_version": 1,
        "program": "test",
        "tokenizer": {"vocab_size": 100},
        "phases": [
            {"name": "other", "seq_len": 4, "sequences": 0, "tokens": 0, "shards": []},
            {"name": "pretrain", "seq_len": seq_len, "sequences": rows,
             "tokens": rows * seq_len as u64, "shards": shards, "draws": []}
        ]
    });
    std::fs::write(
        dir.path().join(MANIFEST),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    Ok(Fixture { dir, seq_len, rows })
}

/// The tokens and doc lengths phase rows `rows` must have (with wrap).
fn expected(rows: Range<u64>, seq_len: usize, phase_rows: u64) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let mut ids = Vec::new();
    let mut lens = Vec::new();
    for l in rows {
        let i = l % phase_rows;
        ids.push((0..seq_len).map(|j| token(i, j)).collect());
        lens.push(docs(i, seq_len));
    }
    (ids, lens)
}

fn open(f: &Fixture) -> Result<PhaseReader, LoaderError> {
    PhaseReader::open(
        &f.url(),
        "pretrain",
        f.seq_len as u32,
        ReaderOptions::default(),
    )
}

#[test]
fn batch_plan_splits_a_global_batch_without_gaps() -> Result<(), LoaderError> {
    let plan = BatchPlan::new(10, 3, 1, 2)?;
    assert_eq!(plan.global_rows(2), 20..30);
    assert_eq!(plan.rank_rows(2), 23..26);
    assert_eq!(plan.micro_ranges(2), vec![23..25, 25..26]);
    let all: Vec<_> = (0..3)
        .map(|r| BatchPlan::new(10, 3, r, 0).map(|p| p.rank_rows(2)))
        .collect::<Result<_, _>>()?;
    assert_eq!(all, vec![20..23, 23..26, 26..30]);
    assert!(BatchPlan::new(2, 3, 0, 0).is_err());
    assert!(BatchPlan::new(8, 2, 2, 0).is_err());
    Ok(())
}

#[test]
fn ranks_get_exactly_their_rows_for_several_plans() -> TestResult {
    let f = fixture(100, 8, 23, 5)?;
    for (n, b, micro) in [
        (1u32, 12u64, 0u64),
        (2, 12, 4),
        (4, 12, 2),
        (3, 12, 0),
        (4, 16, 3),
        (3, 10, 1),
    ] {
        for r in 0..n {
            let plan = BatchPlan::new(b, n, r, micro)?;
            let mut reader = open(&f)?;
            for step in [0u64, 1, 3, 7] {
                let batch = reader.batch(&plan, step)?;
                let want = step * b + u64::from(r) * b / u64::from(n)
                    ..step * b + (u64::from(r) + 1) * b / u64::from(n);
                assert_eq!(batch.rows, want, "n={n} r={r} b={b} step={step}");
                assert_eq!(batch.step, step);
                let mut covered = batch.rows.start;
                for mb in &batch.micro_batches {
                    assert_eq!(mb.rows.start, covered);
                    if micro > 0 {
                        assert!(mb.rows.end - mb.rows.start <= micro);
                    }
                    covered = mb.rows.end;
                    let (ids, lens) = expected(mb.rows.clone(), f.seq_len, f.rows);
                    assert_eq!(mb.input_ids, ids, "n={n} r={r} b={b} step={step}");
                    assert_eq!(mb.doc_lens, lens);
                }
                assert_eq!(covered, batch.rows.end);
            }
        }
    }
    Ok(())
}

#[test]
fn global_batches_do_not_depend_on_world_size() -> TestResult {
    let f = fixture(96, 6, 20, 7)?;
    let b = 8u64;
    let global = |n: u32| -> Result<Vec<Vec<Vec<u32>>>, LoaderError> {
        let mut out = Vec::new();
        for step in 0..12 {
            let mut ids = Vec::new();
            for r in 0..n {
                let plan = BatchPlan::new(b, n, r, 3)?;
                let mut reader = open(&f)?;
                for mb in reader.batch(&plan, step)?.micro_batches {
                    ids.extend(mb.input_ids);
                }
            }
            out.push(ids);
        }
        Ok(out)
    };
    let one = global(1)?;
    assert_eq!(one[5], expected(40..48, 6, 96).0);
    assert_eq!(global(2)?, one);
    assert_eq!(global(4)?, one);
    Ok(())
}

#[test]
fn seeking_to_a_step_equals_iterating_to_it() -> TestResult {
    let f = fixture(64, 4, 10, 3)?;
    let plan = BatchPlan::new(6, 2, 1, 2)?;
    let mut walked = open(&f)?;
    let mut last = None;
    for step in 0..=9 {
        last = Some(walked.batch(&plan, step)?);
    }
    let mut fresh = open(&f)?;
    assert_eq!(Some(fresh.batch(&plan, 9)?), last);
    Ok(())
}

#[test]
fn a_small_shard_is_read_whole_in_one_fetch_with_its_footer() -> TestResult {
    // 4 shards of 40 rows of 16 tokens: a few KiB each, inside the read
    // that brings the footer.
    let f = fixture(160, 16, 40, 8)?;
    let mut reader = open(&f)?;
    reader.read_rows(40..80)?;
    let stats = reader.stats();
    assert_eq!((stats.shards_opened, stats.groups_decoded), (1, 5));
    let shard_len =
        std::fs::metadata(f.dir.path().join("phases/pretrain/shard-00001.parquet"))?.len();
    assert_eq!(
        stats.bytes_fetched, shard_len,
        "one read, every group inside it"
    );
    Ok(())
}

#[test]
fn seeking_reads_only_the_row_groups_it_needs() -> TestResult {
    // 10 shards of 40 rows in row groups of 8, rows of 4,096 tokens: each
    // shard is larger than the read that brings its footer.
    let f = fixture(400, 4096, 40, 8)?;
    let plan = BatchPlan::new(8, 2, 1, 0)?;
    let mut reader = open(&f)?;
    // Step 37: rows 296..304, rank 1 takes 300..304: shard 7, group 2.
    let batch = reader.batch(&plan, 37)?;
    assert_eq!(batch.rows, 300..304);
    let stats = reader.stats();
    assert_eq!((stats.shards_opened, stats.groups_decoded), (1, 1));
    let shard_len =
        std::fs::metadata(f.dir.path().join("phases/pretrain/shard-00007.parquet"))?.len();
    assert!(
        stats.bytes_fetched < shard_len,
        "{} of {shard_len}",
        stats.bytes_fetched
    );
    // The next step of the same row group is served from the cache.
    reader.batch(&plan, 38)?;
    assert_eq!(reader.stats().groups_decoded, 2, "step 38 is in group 3");
    let mut again = open(&f)?;
    again.read_rows(300..302)?;
    again.read_rows(302..304)?;
    assert_eq!(again.stats().groups_decoded, 1);
    Ok(())
}

#[test]
fn rows_past_the_phase_wrap_into_another_epoch() -> TestResult {
    let f = fixture(10, 4, 4, 3)?;
    let mut reader = open(&f)?;
    let mb = reader.read_rows(8..13)?;
    assert_eq!(mb.rows, 8..13);
    let (ids, lens) = expected(8..13, 4, 10);
    assert_eq!(mb.input_ids, ids);
    assert_eq!(mb.doc_lens, lens);
    assert_eq!(mb.input_ids[2], [0, 1, 2, 3], "row 10 is row 0 again");
    Ok(())
}

#[test]
fn prefetch_delivers_steps_in_order_and_stops() -> TestResult {
    let f = fixture(50, 4, 7, 2)?;
    let plan = BatchPlan::new(4, 2, 0, 0)?;
    let mut direct = open(&f)?;
    let pre = Prefetcher::spawn(open(&f)?, plan.clone(), 3..15, 2)?;
    let mut steps = Vec::new();
    for batch in pre {
        let batch = batch?;
        assert_eq!(batch, direct.batch(&plan, batch.step)?);
        steps.push(batch.step);
    }
    assert_eq!(steps, (3..15).collect::<Vec<_>>());
    // Dropping a prefetcher half-way stops its thread.
    let mut early = Prefetcher::spawn(open(&f)?, plan, 0..1000, 2)?;
    assert!(early.next_batch().is_some());
    drop(early);
    Ok(())
}

#[test]
fn prefetch_reports_a_read_error_once() -> TestResult {
    let f = fixture(20, 4, 10, 5)?;
    let reader = open(&f)?;
    std::fs::write(
        f.dir.path().join("phases/pretrain/shard-00001.parquet"),
        b"not parquet",
    )?;
    let plan = BatchPlan::new(5, 1, 0, 0)?;
    let got: Vec<_> = Prefetcher::spawn(reader, plan, 0..4, 2)?.collect();
    assert_eq!(got.len(), 3);
    assert!(got[0].is_ok() && got[1].is_ok());
    let err = got[2]
        .as_ref()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("shard-00001.parquet"), "{err}");
    Ok(())
}

#[test]
fn open_errors_name_the_file() -> TestResult {
    let f = fixture(20, 4, 10, 5)?;
    let msg =
        |r: Result<PhaseReader, LoaderError>| r.err().map(|e| e.to_string()).unwrap_or_default();

    let err = msg(PhaseReader::open(
        &f.url(),
        "decay",
        4,
        ReaderOptions::default(),
    ));
    assert!(
        err.contains("no phase `decay`") && err.contains("manifest.json"),
        "{err}"
    );

    let err = msg(PhaseReader::open(
        &f.url(),
        "pretrain",
        8,
        ReaderOptions::default(),
    ));
    assert!(err.contains("seq_len 4") && err.contains("says 8"), "{err}");

    let missing = tempfile::tempdir()?;
    let err = msg(PhaseReader::open(
        &missing.path().display().to_string(),
        "pretrain",
        4,
        ReaderOptions::default(),
    ));
    assert!(err.contains("no manifest.json"), "{err}");
    Ok(())
}

#[test]
fn a_corrupted_shard_fails_the_hash_check() -> TestResult {
    let f = fixture(20, 4, 10, 5)?;
    let path = f.dir.path().join("phases/pretrain/shard-00001.parquet");
    let mut bytes = std::fs::read(&path)?;
    bytes[10] ^= 0xff;
    std::fs::write(&path, bytes)?;
    let verify = ReaderOptions {
        verify_sha256: true,
        ..ReaderOptions::default()
    };
    let mut reader = PhaseReader::open(&f.url(), "pretrain", 4, verify)?;
    assert!(reader.read_rows(0..10).is_ok());
    let err = reader
        .read_rows(10..12)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("shard-00001.parquet") && err.contains("sha256"),
        "{err}"
    );
    Ok(())
}

#[test]
fn verified_reads_return_the_same_rows() -> TestResult {
    let f = fixture(30, 4, 11, 4)?;
    let verify = ReaderOptions {
        verify_sha256: true,
        ..ReaderOptions::default()
    };
    let mut a = PhaseReader::open(&f.url(), "pretrain", 4, verify)?;
    let mut b = open(&f)?;
    assert_eq!(a.read_rows(5..29)?, b.read_rows(5..29)?);
    Ok(())
}

/// The flow the training loop follows: prefetch, log every step, write a
/// checkpoint, crash, resume from the newest committed checkpoint with
/// another world size, and verify the phase's data order at the end.
#[test]
fn a_resumed_run_with_another_world_size_consumes_every_row_once() -> TestResult {
    use crate::checkpoint::{
        self, CheckpointInfo, CheckpointSnapshot, CheckpointWriter, OptimizerState,
    };
    use order::DataOrderLog;

    let f = fixture(120, 4, 25, 5)?;
    let ckpt = tempfile::tempdir()?;
    let ckpt_url = format!("file://{}", ckpt.path().display());
    let b = 8u64;
    let steps = f.rows / b; // 15
    let run = |world: &str, n: u32, first: u64, crash_at: u64, every: u64| -> TestResult {
        let writer = CheckpointWriter::spawn(&ckpt_url, 1)?;
        for r in 0..n {
            let plan = BatchPlan::new(b, n, r, 3)?;
            let mut log =
                DataOrderLog::open(&ckpt_url, "run", 0, "pretrain", world, r, n, first, 1)?;
            let loader = Prefetcher::spawn(open(&f)?, plan.clone(), first..steps, 2)?;
            for batch in loader {
                let batch = batch?;
                if batch.step == crash_at {
                    break; // the process dies before finishing this step
                }
                log.record(batch.step, batch.rows.clone())?;
                let done = batch.step + 1;
                if r == 0 && (done % every == 0 || done == steps) {
                    log.flush()?;
                    let snapshot = CheckpointSnapshot {
                        info: CheckpointInfo {
                            run_id: "run".into(),
                            phase_index: 0,
                            phase_name: "pretrain".into(),
                            step: done,
                            tokens: done * b * 4,
                            rng: vec![1, done],
                            data_cursor: plan.cursor_after(done),
                            world_size: n,
                            spec_name: "tiny".into(),
                            attempt: world.into(),
                            phase_end: done == steps,
                        },
                        model: vec![("w".into(), vec![1], vec![done as f32])],
                        optimizer: OptimizerState {
                            step: done,
                            tensors: Vec::new(),
                        },
                    };
                    writer.write_async(snapshot)?.wait()?;
                }
            }
        }
        writer.wait()?;
        Ok(())
    };
    // World a: 4 ranks, checkpoints every 4 steps, dies in step 10 (after
    // logging steps 8 and 9, whose updates are lost).
    run("world-a", 4, 0, 10, 4)?;
    let resume = checkpoint::latest_committed(&ckpt_url, "run")?.ok_or("no checkpoint")?;
    assert_eq!(resume.step, 8);
    let loaded = checkpoint::load(&resume.url)?;
    assert_eq!(loaded.state.info.data_cursor, 64);
    // World b: 3 ranks, resumes from step 8 and finishes.
    std::thread::sleep(std::time::Duration::from_millis(5));
    run("world-b", 3, loaded.state.info.step, u64::MAX, 4)?;
    let report = order::verify_run(
        &ckpt_url,
        "run",
        0,
        "pretrain",
        steps,
        &BatchSchedule::constant(b),
    )?;
    assert!(report.is_ok(), "{report:?}");
    // keep_last = 1 kept the newest non-final checkpoint and the phase end.
    let kept: Vec<u64> = checkpoint::committed(&ckpt_url, "run")?
        .iter()
        .map(|c| c.step)
        .collect();
    assert_eq!(kept, vec![12, 15]);
    Ok(())
}

/// A batch warmup (2 → 12 sequences over 160 tokens of 4-token rows, in
/// moves of 2): every row of the phase is read once and in order, with one
/// rank, with two, and when a world of two dies mid-ramp and a world of one
/// resumes from its last checkpoint.
#[test]
fn a_batch_warmup_consumes_every_row_once_and_resumes_mid_ramp() -> TestResult {
    use order::DataOrderLog;

    let f = fixture(100, 4, 25, 5)?;
    let schedule = BatchSchedule::ramped(12, 4, 2, 160, 2);
    // By hand: batches 2, 2, 2, 2, 4, 4, 6, 6, 8, 10 (46 rows), then 12s;
    // 100 rows hold the ramp and 4 global batches.
    let steps = schedule.steps_within(f.rows);
    assert_eq!((schedule.ramp_steps(), steps), (10, 14));
    let run = |ckpt_url: &str, world: &str, n: u32, range: Range<u64>| -> TestResult {
        for r in 0..n {
            let plan = BatchPlan::with_schedule(schedule.clone(), n, r, 1)?;
            let mut log =
                DataOrderLog::open(ckpt_url, "run", 0, "pretrain", world, r, n, range.start, 1)?;
            for batch in Prefetcher::spawn(open(&f)?, plan.clone(), range.clone(), 2)? {
                let batch = batch?;
                assert_eq!(batch.rows, plan.rank_rows(batch.step));
                for mb in &batch.micro_batches {
                    assert_eq!(mb.input_ids, expected(mb.rows.clone(), f.seq_len, f.rows).0);
                }
                log.record(batch.step, batch.rows.clone())?;
            }
            log.flush()?;
        }
        // Attempts are ordered by the time their logs were opened.
        std::thread::sleep(std::time::Duration::from_millis(5));
        Ok(())
    };
    let one_rank = tempfile::tempdir()?;
    let two_ranks = tempfile::tempdir()?;
    let resumed = tempfile::tempdir()?;
    let url = |d: &tempfile::TempDir| format!("file://{}", d.path().display());
    run(&url(&one_rank), "one", 1, 0..steps)?;
    run(&url(&two_ranks), "two", 2, 0..steps)?;
    // Two ranks log steps 0..7 but checkpointed after step 5 only; one rank
    // takes over mid-ramp from step 5 (and its batch of 4 rows at 12..16).
    run(&url(&resumed), "a", 2, 0..7)?;
    run(&url(&resumed), "b", 1, 5..steps)?;
    for dir in [&one_rank, &two_ranks, &resumed] {
        let report = order::verify_run(&url(dir), "run", 0, "pretrain", steps, &schedule)?;
        assert!(report.is_ok(), "{report:?}");
    }
    // The rows really were consumed in ramp-sized batches: a verifier that
    // expects 12-row batches throughout finds them out of place.
    let constant = BatchSchedule::constant(12);
    let report = order::verify_run(&url(&two_ranks), "run", 0, "pretrain", steps, &constant)?;
    assert!(!report.is_ok(), "{report:?}");
    let two = BatchPlan::with_schedule(schedule.clone(), 2, 1, 1)?;
    assert_eq!(two.rank_rows(0), 1..2);
    assert_eq!(two.rank_rows(5), 14..16);
    assert_eq!(
        two.micro_ranges(9),
        vec![41..42, 42..43, 43..44, 44..45, 45..46]
    );
    assert_eq!(two.cursor_after(steps), 46 + 4 * 12);
    Ok(())
}

#[test]
fn shards_that_disagree_with_the_manifest_are_named() -> TestResult {
    let f = fixture(20, 4, 10, 5)?;
    // Shard 1 rewritten with 5-token rows: a seq_len mismatch inside the file.
    let path = f.dir.path().join("phases/pretrain/shard-00001.parquet");
    std::fs::write(&path, shard_bytes(10..20, 5, 5)?)?;
    let mut reader = open(&f)?;
    let err = reader
        .read_rows(12..13)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("shard-00001.parquet") && err.contains("5 tokens, expected seq_len 4"),
        "{err}"
    );
    // Shard 1 rewritten with 9 rows where the manifest says 10.
    std::fs::write(&path, shard_bytes(10..19, 4, 5)?)?;
    let mut reader = open(&f)?;
    let err = reader
        .read_rows(12..13)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("shard-00001.parquet has 9 rows, the manifest says 10"),
        "{err}"
    );
    // A missing shard file.
    std::fs::remove_file(&path)?;
    let mut reader = open(&f)?;
    let err = reader
        .read_rows(12..13)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("shard-00001.parquet does not exist"), "{err}");
    Ok(())
}

/// An object store in front of another that delays every get, counts the
/// gets in flight, and fails the reads that cover one byte of one file.
mod probe {
    use std::future::Future;
    use std::ops::Range;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use futures::stream::BoxStream;
    use object_store::path::Path;
    use object_store::{
        CopyOptions, GetOptions, GetRange, GetResult, ListResult, MultipartUpload, ObjectMeta,
        ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
    };

    /// What the probe saw.
    #[derive(Debug, Default)]
    pub struct Counts {
        /// Gets started (heads and reads).
        pub started: AtomicU64,
        /// Ranged reads started.
        pub ranges: AtomicU64,
        pub in_flight: AtomicU64,
        /// Most gets in flight at once.
        pub peak: AtomicU64,
        /// Reads started that will fail.
        pub failing: AtomicU64,
    }

    impl Counts {
        pub fn get(counter: &AtomicU64) -> u64 {
            counter.load(Ordering::SeqCst)
        }
    }

    /// Counts a get in flight until dropped (also when the get is
    /// cancelled).
    struct InFlight<'a>(&'a Counts);

    impl<'a> InFlight<'a> {
        fn enter(counts: &'a Counts) -> Self {
            counts.started.fetch_add(1, Ordering::SeqCst);
            let now = counts.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            counts.peak.fetch_max(now, Ordering::SeqCst);
            Self(counts)
        }
    }

    impl Drop for InFlight<'_> {
        fn drop(&mut self) {
            self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[derive(Debug)]
    pub struct Probe {
        pub inner: Arc<dyn ObjectStore>,
        /// Every get of a shard waits this long first…
        pub delay: Duration,
        /// …but those of shards whose path holds this.
        pub fast: Option<String>,
        /// Adds 0–4 ms, varying with the range, so reads finish out of order.
        pub jitter: bool,
        /// Reads of a file whose path ends so, covering this byte, fail.
        pub fail: Option<(String, u64)>,
        pub counts: Arc<Counts>,
    }

    impl std::fmt::Display for Probe {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Probe({})", self.inner)
        }
    }

    type Fut<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

    // The methods as `#[async_trait]` writes them (no async-trait here).
    impl ObjectStore for Probe {
        fn put_opts<'life0, 'life1, 'async_trait>(
            &'life0 self,
            location: &'life1 Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> Fut<'async_trait, PutResult>
        where
            'life0: 'async_trait,
            'life1: 'async_trait,
            Self: 'async_trait,
        {
            self.inner.put_opts(location, payload, opts)
        }

        fn put_multipart_opts<'life0, 'life1, 'async_trait>(
            &'life0 self,
            location: &'life1 Path,
            opts: PutMultipartOptions,
        ) -> Fut<'async_trait, Box<dyn MultipartUpload>>
        where
            'life0: 'async_trait,
            'life1: 'async_trait,
            Self: 'async_trait,
        {
            self.inner.put_multipart_opts(location, opts)
        }

        fn get_opts<'life0, 'life1, 'async_trait>(
            &'life0 self,
            location: &'life1 Path,
            options: GetOptions,
        ) -> Fut<'async_trait, GetResult>
        where
            'life0: 'async_trait,
            'life1: 'async_trait,
            Self: 'async_trait,
        {
            Box::pin(async move {
                let _in_flight = InFlight::enter(&self.counts);
                let range: Option<Range<u64>> = match &options.range {
                    Some(GetRange::Bounded(r)) => Some(r.clone()),
                    _ => None,
                };
                if range.is_some() {
                    self.counts.ranges.fetch_add(1, Ordering::SeqCst);
                }
                let fails = match (&self.fail, &range) {
                    (Some((suffix, byte)), Some(r)) => {
                        location.as_ref().ends_with(suffix.as_str()) && r.contains(byte)
                    }
                    _ => false,
                };
                if fails {
                    self.counts.failing.fetch_add(1, Ordering::SeqCst);
                }
                let path = location.as_ref();
                let fast = self
                    .fast
                    .as_ref()
                    .is_some_and(|f| path.contains(f.as_str()));
                let mut delay = if path.contains("shard-") && !fast {
                    self.delay
                } else {
                    Duration::ZERO
                };
                if self.jitter {
                    let start = range.as_ref().map_or(0, |r| r.start);
                    delay += Duration::from_millis(start % 5);
                }
                tokio::time::sleep(delay).await;
                if fails {
                    return Err(object_store::Error::Generic {
                        store: "probe",
                        source: "injected failure".into(),
                    });
                }
                self.inner.get_opts(location, options).await
            })
        }

        fn delete_stream(
            &self,
            locations: BoxStream<'static, Result<Path>>,
        ) -> BoxStream<'static, Result<Path>> {
            self.inner.delete_stream(locations)
        }

        fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
            self.inner.list(prefix)
        }

        fn list_with_delimiter<'life0, 'life1, 'async_trait>(
            &'life0 self,
            prefix: Option<&'life1 Path>,
        ) -> Fut<'async_trait, ListResult>
        where
            'life0: 'async_trait,
            'life1: 'async_trait,
            Self: 'async_trait,
        {
            self.inner.list_with_delimiter(prefix)
        }

        fn copy_opts<'life0, 'life1, 'life2, 'async_trait>(
            &'life0 self,
            from: &'life1 Path,
            to: &'life2 Path,
            options: CopyOptions,
        ) -> Fut<'async_trait, ()>
        where
            'life0: 'async_trait,
            'life1: 'async_trait,
            'life2: 'async_trait,
            Self: 'async_trait,
        {
            self.inner.copy_opts(from, to, options)
        }
    }
}

/// How a probed reader's store behaves.
#[derive(Default)]
struct ProbeSetup {
    delay: Duration,
    fast: Option<String>,
    jitter: bool,
    fail: Option<(String, u64)>,
}

/// `f`'s phase read through a [`Probe`].
fn probed(
    f: &Fixture,
    setup: ProbeSetup,
    read_ahead: ReadAhead,
) -> Result<(PhaseReader, Arc<Counts>), Box<dyn std::error::Error>> {
    let counts = Arc::new(Counts::default());
    let probe_counts = counts.clone();
    let root = Location::open(&f.url(), false)?.map_store(move |inner| {
        Arc::new(Probe {
            inner,
            delay: setup.delay,
            fast: setup.fast,
            jitter: setup.jitter,
            fail: setup.fail,
            counts: probe_counts,
        })
    });
    let name = root.name(MANIFEST);
    let manifest = Manifest::parse(&name, &root.get(MANIFEST)?)?;
    let phase = manifest.phase(&name, "pretrain")?.clone();
    let options = ReaderOptions {
        read_ahead,
        ..ReaderOptions::default()
    };
    let reader = PhaseReader::from_manifest_phase(root, phase, f.seq_len as u32, options)?;
    Ok((reader, counts))
}

/// The first byte of row group `group`'s column chunks in shard `shard`.
fn group_start(f: &Fixture, shard: usize, group: usize) -> Result<u64, Box<dyn std::error::Error>> {
    let root = Location::open(&f.url(), false)?;
    let rel = format!("phases/pretrain/shard-{shard:05}.parquet");
    let fetched = shard::Fetched::fetch(&root, &rel, false)?;
    let open = shard::OpenShard::from_fetched(&root, shard, &rel, fetched, None)?;
    Ok(open.group_read(group)?.range.start)
}

/// Waits up to 5 s for `done`.
fn eventually(what: &str, done: impl Fn() -> bool) -> TestResult {
    within(Duration::from_secs(5), what, done)
}

/// Waits up to `limit` for `done`.
fn within(limit: Duration, what: &str, done: impl Fn() -> bool) -> TestResult {
    let until = Instant::now() + limit;
    while !done() {
        if Instant::now() > until {
            return Err(format!("timed out waiting for {what}").into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

#[test]
fn read_ahead_delivers_the_same_rows_in_the_same_order() -> TestResult {
    // Small shards (read whole with their footers) and shards of 5 row
    // groups larger than that read; plans past the end of the phase.
    let small = fixture(100, 8, 23, 5)?;
    let large = fixture(120, 2048, 40, 8)?;
    let limits = [
        ReadAhead::default(),
        ReadAhead {
            requests: 1,
            bytes: 1,
        },
        ReadAhead {
            requests: 3,
            bytes: 200_000,
        },
    ];
    for (f, plans) in [
        (
            &small,
            vec![(1u32, 0u32, 12u64, 0u64), (3, 2, 10, 1), (4, 1, 16, 3)],
        ),
        (&large, vec![(1, 0, 8, 3), (2, 1, 16, 0), (3, 0, 12, 5)]),
    ] {
        for (n, r, b, micro) in plans {
            let plan = BatchPlan::new(b, n, r, micro)?;
            let steps = 2..f.rows * 2 / b; // two epochs
            let mut direct = open(f)?;
            let want: Vec<Batch> = steps
                .clone()
                .map(|s| direct.batch(&plan, s))
                .collect::<Result<_, _>>()?;
            for limits in limits {
                let setup = ProbeSetup {
                    jitter: true,
                    ..ProbeSetup::default()
                };
                let (reader, _) = probed(f, setup, limits)?;
                let got: Vec<Batch> = Prefetcher::spawn(reader, plan.clone(), steps.clone(), 2)?
                    .collect::<Result<_, _>>()?;
                assert_eq!(got, want, "n={n} r={r} b={b} {limits:?}");
                // The same through the reader alone, which counts.
                let (mut reader, _) = probed(f, ProbeSetup::default(), limits)?;
                let ranks = plan.clone();
                reader.plan_reads(steps.clone().map(move |s| ranks.rank_rows(s)));
                for (s, want) in steps.clone().zip(&want) {
                    assert_eq!(&reader.batch(&plan, s)?, want);
                }
                // It never left its plan, so every read was made ahead.
                assert!(reader.ahead.is_some(), "n={n} r={r} b={b} {limits:?}");
                if std::ptr::eq(f, &large) {
                    assert!(reader.stats().groups_read_ahead > 0);
                }
            }
        }
    }
    Ok(())
}

#[test]
fn several_row_group_reads_are_in_flight_at_once() -> TestResult {
    // 10 shards of 5 row groups; rank 1 of 2 reads every other group, so
    // no two of its groups share a read.
    let f = fixture(400, 4096, 40, 8)?;
    let plan = BatchPlan::new(16, 2, 1, 0)?;
    let steps = 0..f.rows / 16;
    for requests in [1, 4] {
        let setup = ProbeSetup {
            delay: Duration::from_millis(20),
            ..ProbeSetup::default()
        };
        let limits = ReadAhead {
            requests,
            ..ReadAhead::default()
        };
        let (mut reader, counts) = probed(&f, setup, limits)?;
        let ranks = plan.clone();
        reader.plan_reads(steps.clone().map(move |s| ranks.rank_rows(s)));
        for step in steps.clone() {
            let batch = reader.batch(&plan, step)?;
            assert_eq!(batch.rows, plan.rank_rows(step));
        }
        let peak = Counts::get(&counts.peak);
        let stats = reader.stats();
        // At most `requests` row-group reads and `requests + 1` footer
        // reads at once.
        assert!(peak <= 2 * requests as u64 + 1, "{peak} in flight");
        assert_eq!(stats.peak_reads_ahead, requests as u64, "{stats:?}");
        if requests > 1 {
            assert!(peak >= 2, "only {peak} read in flight at once");
        }
    }
    // The whole phase in order: a shard's row groups come in one read, and
    // nothing is read twice or for nothing.
    let (mut reader, counts) = probed(&f, ProbeSetup::default(), ReadAhead::default())?;
    reader.plan_reads((0..f.rows).step_by(8).map(|r| r..r + 8));
    for r in (0..f.rows).step_by(8) {
        reader.read_rows(r..r + 8)?;
    }
    let shards: u64 = (0..10)
        .map(|i| {
            std::fs::metadata(
                f.dir
                    .path()
                    .join(format!("phases/pretrain/shard-{i:05}.parquet")),
            )
        })
        .map(|m| m.map(|m| m.len()))
        .sum::<Result<u64, _>>()?;
    let stats = reader.stats();
    assert!(
        stats.bytes_fetched <= shards,
        "{} > {shards}",
        stats.bytes_fetched
    );
    // 10 footers and, instead of 50 row-group reads, one or two per shard.
    let ranges = Counts::get(&counts.ranges);
    assert!(
        ranges <= 10 + 20,
        "{ranges} range reads for 10 shards of 5 groups"
    );
    Ok(())
}

#[test]
fn a_failed_read_ahead_is_reported_in_the_step_that_needs_it() -> TestResult {
    // Rank 1 of 2 reads rows 88..96 (shard 2, group 1) in step 5 and rows
    // 104..112 (shard 2, group 3) in step 6; the read of group 3 fails.
    let f = fixture(400, 4096, 40, 8)?;
    let plan = BatchPlan::new(16, 2, 1, 0)?;
    assert_eq!((plan.rank_rows(5), plan.rank_rows(6)), (88..96, 104..112));
    let fail = Some(("shard-00002.parquet".to_string(), group_start(&f, 2, 3)?));
    let setup = || ProbeSetup {
        delay: Duration::from_millis(5),
        fail: fail.clone(),
        ..ProbeSetup::default()
    };
    let (mut reader, counts) = probed(&f, setup(), ReadAhead::default())?;
    let ranks = plan.clone();
    reader.plan_reads((0..20).map(move |s| ranks.rank_rows(s)));
    for step in 0..=5 {
        reader.batch(&plan, step)?;
    }
    // The failing read went out ahead of step 6…
    eventually("the failing read", || Counts::get(&counts.failing) == 1)?;
    std::thread::sleep(Duration::from_millis(20));
    // …and fails step 6, naming the shard.
    let err = reader
        .batch(&plan, 6)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("phases/pretrain/shard-00002.parquet") && err.contains("injected failure"),
        "{err}"
    );
    // Through the prefetcher: steps 0..6, then the error once, then nothing.
    let (reader, _) = probed(&f, setup(), ReadAhead::default())?;
    let got: Vec<_> = Prefetcher::spawn(reader, plan.clone(), 0..20, 2)?.collect();
    assert_eq!(got.len(), 7);
    assert!(got[..6].iter().all(Result::is_ok));
    let err = got[6]
        .as_ref()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("shard-00002.parquet"), "{err}");
    // One rank reading every row: shard 2's groups come in one read, so
    // its first step is the one that needs the failed read.
    let whole = BatchPlan::new(8, 1, 0, 0)?;
    let (reader, _) = probed(&f, setup(), ReadAhead::default())?;
    let got: Vec<_> = Prefetcher::spawn(reader, whole, 0..20, 2)?.collect();
    assert_eq!(got.len(), 11, "steps 0..10 and the error");
    assert!(got[..10].iter().all(Result::is_ok));
    assert!(got[10].is_err());
    Ok(())
}

#[test]
fn dropping_a_prefetcher_mid_way_cancels_its_reads() -> TestResult {
    let f = fixture(400, 4096, 40, 8)?;
    // A step per shard: step 0 is shard 0, which reads at once; a read of
    // any other shard takes 5 s.
    let plan = BatchPlan::new(40, 1, 0, 8)?;
    let setup = ProbeSetup {
        delay: Duration::from_secs(5),
        fast: Some("shard-00000".into()),
        ..ProbeSetup::default()
    };
    let (reader, counts) = probed(&f, setup, ReadAhead::default())?;
    let mut pre = Prefetcher::spawn(reader, plan, 0..1000, 2)?;
    assert!(pre.next_batch().transpose()?.is_some());
    // The thread waits for shard 1 (step 1); footers of the next shards
    // are on their way.
    eventually("reads of the next shards", || {
        Counts::get(&counts.in_flight) >= 2
    })?;
    let dropping = Instant::now();
    drop(pre);
    // Neither the wait nor the reads in flight take their 5 s.
    let took = dropping.elapsed();
    assert!(took < Duration::from_secs(1), "dropping took {took:?}");
    within(Duration::from_secs(1), "the reads to be cancelled", || {
        Counts::get(&counts.in_flight) == 0
    })?;
    let started = Counts::get(&counts.started);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(Counts::get(&counts.started), started, "reads went on");
    Ok(())
}

#[test]
fn a_reader_that_leaves_its_plan_still_reads_the_right_rows() -> TestResult {
    let f = fixture(400, 4096, 40, 8)?;
    let (mut reader, _) = probed(&f, ProbeSetup::default(), ReadAhead::default())?;
    reader.plan_reads((0..50).map(|s| s * 8..s * 8 + 8));
    assert_eq!(
        reader.read_rows(0..8)?.input_ids,
        expected(0..8, 4096, 400).0
    );
    // Off the plan: rows from another shard, then back.
    for rows in [300..310, 8..16, 399..403] {
        let got = reader.read_rows(rows.clone())?;
        assert_eq!(got.input_ids, expected(rows, 4096, 400).0);
    }
    Ok(())
}

#[test]
fn verified_reads_ahead_return_the_same_rows_and_name_a_bad_hash() -> TestResult {
    // Shards of 11 rows: step 7 (rows 21..24) is the first to enter shard 2.
    let f = fixture(30, 4, 11, 4)?;
    let verify = ReaderOptions {
        verify_sha256: true,
        ..ReaderOptions::default()
    };
    let plan = BatchPlan::new(3, 1, 0, 2)?;
    let mut direct = open(&f)?;
    let want: Vec<Batch> = (0..10)
        .map(|s| direct.batch(&plan, s))
        .collect::<Result<_, _>>()?;
    let reader = PhaseReader::open(&f.url(), "pretrain", 4, verify)?;
    let got: Vec<Batch> =
        Prefetcher::spawn(reader, plan.clone(), 0..10, 2)?.collect::<Result<_, _>>()?;
    assert_eq!(got, want);
    let path = f.dir.path().join("phases/pretrain/shard-00002.parquet");
    let mut bytes = std::fs::read(&path)?;
    bytes[10] ^= 0xff;
    std::fs::write(&path, bytes)?;
    let reader = PhaseReader::open(&f.url(), "pretrain", 4, verify)?;
    let got: Vec<_> = Prefetcher::spawn(reader, plan, 0..10, 2)?.collect();
    assert_eq!(got.len(), 8, "steps 0..7, then the error");
    assert!(got[..7].iter().all(Result::is_ok));
    let err = got[7]
        .as_ref()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("shard-00002.parquet") && err.contains("sha256"),
        "{err}"
    );
    Ok(())
}
