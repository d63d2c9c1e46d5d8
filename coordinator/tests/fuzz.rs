//! Every gRPC request message with arbitrary field values (issue 15),
//! sent to a real coordinator on loopback: ids that exist and ids that do
//! not, empty, blank and unicode strings, huge and negative numbers, NaN.
//! The coordinator runs one real run (two workers in a world) and one
//! dataset build, re-made every few hundred cases since some requests end
//! them. No request may panic the server, hang, or be answered INTERNAL or
//! UNKNOWN; every refusal says which field or id was wrong.
//!
//! Short pass: `cargo test -p twinhead-coordinator --test fuzz`. Bench
//! mode: `TWINHEAD_FUZZ_CASES=1000000 cargo test --release -p
//! twinhead-coordinator --test fuzz -- --ignored fuzz_`.

mod common;
#[allow(dead_code)]
#[path = "../../proto/tests/support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Coordinator, SimWorker, tiny_spec};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use support::{edge_float, edge_int, edge_str};
use tonic::Code;
use twinhead_proto::v1::{
    BuildDatasetRequest, CancelRunRequest, Checkpoint, ClaimTaskRequest, CompleteTaskRequest,
    EvalPoint, FailTaskRequest, GetAssignmentRequest, GetDatasetRequest, GetProgressRequest,
    GetRunRequest, HeartbeatRequest, LeaveRequest, ListDatasetsRequest, ListRunsRequest,
    RegisterRequest, RendezvousRequest, RenewTaskRequest, ReportCheckpointEvalRequest,
    ReportCheckpointRequest, ReportEvalRequest, ReportFailureRequest, ReportProgressRequest,
    RunSpec, SubmitRunRequest, TaskScore, WatchRunRequest,
};

const SHORT: u32 = 600;
const LIMIT: Duration = Duration::from_secs(10);
/// Cases between two fresh scenarios (a new run, world and build).
const REFRESH: u32 = 250;

/// The ids a request may name: the scenario's, or anything.
#[derive(Debug, Clone, Default)]
struct Ids {
    run: String,
    workers: Vec<String>,
    world: String,
    dataset: String,
    task: String,
}

/// A string field: one of the scenario's ids (by index), or a wrong one.
#[derive(Debug, Clone)]
enum Id {
    Run,
    Worker(u8),
    World,
    Dataset,
    Task,
    Other(String),
}

fn id() -> impl Strategy<Value = Id> {
    prop_oneof![
        2 => Just(Id::Run),
        3 => any::<u8>().prop_map(Id::Worker),
        2 => Just(Id::World),
        1 => Just(Id::Dataset),
        1 => Just(Id::Task),
        3 => edge_str().prop_map(Id::Other),
    ]
}

impl Id {
    fn get(&self, ids: &Ids) -> String {
        match self {
            Id::Run => ids.run.clone(),
            Id::Worker(i) if !ids.workers.is_empty() => {
                ids.workers[*i as usize % ids.workers.len()].clone()
            }
            Id::Worker(_) => String::new(),
            Id::World => ids.world.clone(),
            Id::Dataset => ids.dataset.clone(),
            Id::Task => ids.task.clone(),
            Id::Other(s) => s.clone(),
        }
    }
}

/// Numbers of every field: at the edges, wrapped into the field's type.
#[derive(Debug, Clone)]
struct Nums {
    ints: [i64; 4],
    floats: [f64; 4],
    flags: [bool; 2],
    /// Long polls wait at most this (they are capped at 30 s, which is
    /// tested elsewhere; here they must answer quickly).
    wait_ms: u32,
}

fn nums() -> impl Strategy<Value = Nums> {
    (
        [edge_int(), edge_int(), edge_int(), edge_int()],
        [edge_float(), edge_float(), edge_float(), edge_float()],
        [any::<bool>(), any::<bool>()],
        prop_oneof![Just(0u32), 1u32..20],
    )
        .prop_map(|(ints, floats, flags, wait_ms)| Nums {
            ints,
            floats,
            flags,
            wait_ms,
        })
}

/// A field edit of a submitted spec (the spec's own rules are fuzzed
/// field by field in proto's tests; here they travel through the server).
#[derive(Debug, Clone)]
enum SpecEdit {
    None,
    Missing,
    Name(String),
    Dataset(String),
    WorldSize(i64),
    GlobalBatch(i64),
    SeqLen(i64),
    Tokens(i64),
    MaskRatio(f64),
    PeakLr(f64),
    NoModel,
    NoPhases,
}

fn spec_edit() -> impl Strategy<Value = SpecEdit> {
    prop_oneof![
        Just(SpecEdit::None),
        Just(SpecEdit::Missing),
        edge_str().prop_map(SpecEdit::Name),
        edge_str().prop_map(SpecEdit::Dataset),
        edge_int().prop_map(SpecEdit::WorldSize),
        edge_int().prop_map(SpecEdit::GlobalBatch),
        edge_int().prop_map(SpecEdit::SeqLen),
        edge_int().prop_map(SpecEdit::Tokens),
        edge_float().prop_map(SpecEdit::MaskRatio),
        edge_float().prop_map(SpecEdit::PeakLr),
        Just(SpecEdit::NoModel),
        Just(SpecEdit::NoPhases),
    ]
}

fn spec(edit: &SpecEdit, n: u64) -> Option<RunSpec> {
    let mut s = tiny_spec(&format!("fuzz-{n}"));
    match edit {
        SpecEdit::None => {}
        SpecEdit::Missing => return None,
        SpecEdit::Name(v) => s.name = v.clone(),
        SpecEdit::Dataset(v) => s.dataset = v.clone(),
        SpecEdit::WorldSize(v) => s.world_size = *v as u32,
        SpecEdit::GlobalBatch(v) => s.global_batch = *v as u32,
        SpecEdit::SeqLen(v) => s.phases[0].seq_len = *v as u32,
        SpecEdit::Tokens(v) => s.phases[1].tokens = *v as u64,
        SpecEdit::MaskRatio(v) => s.phases[0].mask_ratio = *v,
        SpecEdit::PeakLr(v) => {
            if let Some(o) = s.optimizer.as_mut() {
                o.peak_lr = *v;
            }
        }
        SpecEdit::NoModel => s.model = None,
        SpecEdit::NoPhases => s.phases.clear(),
    }
    Some(s)
}

/// One request of any type.
#[derive(Debug, Clone)]
enum Call {
    SubmitRun(SpecEdit),
    GetRun(Id),
    ListRuns,
    WatchRun(Id),
    CancelRun(Id, String),
    GetProgress(Id),
    Register(String, String),
    Heartbeat(Id, Id),
    GetAssignment(Id, Id),
    Rendezvous(Id, Id, Vec<u8>),
    ReportProgress(Id, Id),
    ReportEval(Id, Id, bool, String),
    ReportCheckpoint(Id, Id, bool, String),
    ReportCheckpointEval(Id, Id, Id, Vec<String>, String),
    ReportFailure(Id, Id, String, String),
    Leave(Id, String),
    BuildDataset(String, u8),
    GetDataset(Id),
    ListDatasets,
    ClaimTask(String),
    RenewTask(Id, Id, String),
    CompleteTask(Id, Id, String, Vec<u32>),
    FailTask(Id, Id, String, String),
}

fn call() -> impl Strategy<Value = Call> {
    prop_oneof![
        2 => spec_edit().prop_map(Call::SubmitRun),
        1 => id().prop_map(Call::GetRun),
        1 => Just(Call::ListRuns),
        1 => id().prop_map(Call::WatchRun),
        1 => (id(), edge_str()).prop_map(|(a, b)| Call::CancelRun(a, b)),
        1 => id().prop_map(Call::GetProgress),
        1 => (edge_str(), edge_str()).prop_map(|(a, b)| Call::Register(a, b)),
        2 => (id(), id()).prop_map(|(a, b)| Call::Heartbeat(a, b)),
        1 => (id(), id()).prop_map(|(a, b)| Call::GetAssignment(a, b)),
        2 => (id(), id(), prop::collection::vec(any::<u8>(), 0..3000))
            .prop_map(|(a, b, c)| Call::Rendezvous(a, b, c)),
        3 => (id(), id()).prop_map(|(a, b)| Call::ReportProgress(a, b)),
        2 => (id(), id(), any::<bool>(), edge_str())
            .prop_map(|(a, b, c, d)| Call::ReportEval(a, b, c, d)),
        3 => (id(), id(), any::<bool>(), edge_str())
            .prop_map(|(a, b, c, d)| Call::ReportCheckpoint(a, b, c, d)),
        1 => (id(), id(), id(), prop::collection::vec(edge_str(), 0..3), edge_str())
            .prop_map(|(a, b, c, d, e)| Call::ReportCheckpointEval(a, b, c, d, e)),
        1 => (id(), id(), edge_str(), edge_str())
            .prop_map(|(a, b, c, d)| Call::ReportFailure(a, b, c, d)),
        1 => (id(), edge_str()).prop_map(|(a, b)| Call::Leave(a, b)),
        2 => (edge_str(), any::<u8>()).prop_map(|(a, b)| Call::BuildDataset(a, b)),
        1 => id().prop_map(Call::GetDataset),
        1 => Just(Call::ListDatasets),
        1 => edge_str().prop_map(Call::ClaimTask),
        1 => (id(), id(), edge_str()).prop_map(|(a, b, c)| Call::RenewTask(a, b, c)),
        2 => (id(), id(), edge_str(), prop::collection::vec(any::<u32>(), 0..8))
            .prop_map(|(a, b, c, d)| Call::CompleteTask(a, b, c, d)),
        1 => (id(), id(), edge_str(), edge_str())
            .prop_map(|(a, b, c, d)| Call::FailTask(a, b, c, d)),
    ]
}

/// The dataset config of builds: valid, or mangled by `how`.
fn data_config(how: u8, junk: &str) -> (String, String) {
    let valid = r#"
name = "fuzz"
[tokenizer]
train = { vocab_size = 512 }
[[sources]]
name = "web"
input = "web/*.jsonl"
format = "jsonl"
[[phases]]
name = "pretrain"
seq_len = 16
tokens = 4096
seed = 1
weights = { web = 1.0 }
"#;
    match how % 6 {
        0 => ("configs/data/fuzz.toml".into(), valid.into()),
        1 => (junk.into(), valid.into()),
        2 => ("d.toml".into(), junk.into()),
        3 => (
            "d.toml".into(),
            valid.replace("seq_len = 16", "seq_len = -1"),
        ),
        4 => (
            "d.toml".into(),
            valid.replace("format = \"jsonl\"", &format!("format = {junk:?}")),
        ),
        _ => ("d.toml".into(), valid[..junk.len().min(valid.len())].into()),
    }
}

/// Words a refusal may name: fields of the requests and what they point at.
const FIELDS: &[&str] = &[
    "spec",
    "tokens",
    "loss",
    "lr",
    "grad_norm",
    "mfu",
    "run_id",
    "run ",
    "worker_id",
    "worker ",
    "world_id",
    "world ",
    "publish",
    "eval",
    "checkpoint",
    "process",
    "dataset",
    "key",
    "config",
    "out_url",
    "parts_per_source",
    "task",
    "phase",
    "step",
    "rank",
];

fn check(result: Result<(), tonic::Status>, sent: &[String]) -> Result<(), TestCaseError> {
    let Err(status) = result else {
        return Ok(());
    };
    let message = status.message();
    prop_assert!(
        !matches!(status.code(), Code::Internal | Code::Unknown),
        "bad input answered {:?}: {message}",
        status.code()
    );
    prop_assert!(message.trim().len() >= 8, "vague: {status:?}");
    let names_field = FIELDS.iter().any(|f| message.contains(f))
        || sent
            .iter()
            .any(|s| s.trim().len() >= 3 && message.contains(s.trim()));
    prop_assert!(names_field, "names no field or id: {status:?}");
    Ok(())
}

/// Sends `call`; the strings it carried.
async fn send(
    c: &Coordinator,
    ids: &Ids,
    call: &Call,
    nums: &Nums,
    n: u64,
) -> (Result<(), tonic::Status>, Vec<String>) {
    let [i0, i1, i2, _] = nums.ints;
    let [f0, f1, f2, f3] = nums.floats;
    let mut sent = Vec::new();
    let mut take = |id: &Id| {
        let s = id.get(ids);
        sent.push(s.clone());
        s
    };
    let result = match call {
        Call::SubmitRun(edit) => {
            let request = SubmitRunRequest {
                spec: spec(edit, n),
            };
            c.runs().await.submit_run(request).await.map(drop)
        }
        Call::GetRun(id) => {
            let run_id = take(id);
            c.runs()
                .await
                .get_run(GetRunRequest { run_id })
                .await
                .map(drop)
        }
        Call::ListRuns => {
            let states = vec![i0 as i32, i1 as i32];
            c.runs()
                .await
                .list_runs(ListRunsRequest { states })
                .await
                .map(drop)
        }
        Call::WatchRun(id) => {
            let run_id = take(id);
            match c.runs().await.watch_run(WatchRunRequest { run_id }).await {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    tokio::time::timeout(Duration::from_secs(5), stream.message())
                        .await
                        .map_err(|_| tonic::Status::deadline_exceeded("no snapshot in 5 s"))
                        .and_then(|first| first.map(drop))
                }
                Err(e) => Err(e),
            }
        }
        Call::CancelRun(id, reason) => {
            let run_id = take(id);
            c.runs()
                .await
                .cancel_run(CancelRunRequest {
                    run_id,
                    reason: reason.clone(),
                })
                .await
                .map(drop)
        }
        Call::GetProgress(id) => {
            let run_id = take(id);
            c.runs()
                .await
                .get_progress(GetProgressRequest {
                    run_id,
                    max_points: i0 as u32,
                })
                .await
                .map(drop)
        }
        Call::Register(hostname, device) => c
            .workers()
            .await
            .register(RegisterRequest {
                hostname: hostname.clone(),
                device: device.clone(),
                pid: i0 as u32,
            })
            .await
            .map(drop),
        Call::Heartbeat(w, world) => {
            let (worker_id, world_id) = (take(w), take(world));
            c.workers()
                .await
                .heartbeat(HeartbeatRequest {
                    worker_id,
                    world_id,
                })
                .await
                .map(drop)
        }
        Call::GetAssignment(w, known) => {
            let (worker_id, known_assignment_id) = (take(w), take(known));
            c.workers()
                .await
                .get_assignment(GetAssignmentRequest {
                    worker_id,
                    known_assignment_id,
                    wait_ms: u64::from(nums.wait_ms),
                })
                .await
                .map(drop)
        }
        Call::Rendezvous(w, world, publish) => {
            let (worker_id, world_id) = (take(w), take(world));
            c.workers()
                .await
                .rendezvous(RendezvousRequest {
                    worker_id,
                    world_id,
                    publish: publish.clone(),
                    wait_ms: u64::from(nums.wait_ms),
                })
                .await
                .map(drop)
        }
        Call::ReportProgress(w, world) => {
            let (worker_id, world_id) = (take(w), take(world));
            c.workers()
                .await
                .report_progress(ReportProgressRequest {
                    worker_id,
                    world_id,
                    phase_index: i0 as u32,
                    step: i1 as u64,
                    tokens: i2 as u64,
                    loss: f0,
                    tokens_per_sec: f1,
                    lr: f2,
                    grad_norm: f3,
                    mfu: f0,
                })
                .await
                .map(drop)
        }
        Call::ReportEval(w, world, some, error) => {
            let (worker_id, world_id) = (take(w), take(world));
            let eval = some.then(|| EvalPoint {
                phase_index: i0 as u32,
                step: i1 as u64,
                tokens: i2 as u64,
                loss: f0,
                accuracy: f1,
                rows: i2 as u64,
                targets: i1 as u64,
                seconds: f2,
                error: error.clone(),
                ..EvalPoint::default()
            });
            c.workers()
                .await
                .report_eval(ReportEvalRequest {
                    worker_id,
                    world_id,
                    eval,
                })
                .await
                .map(drop)
        }
        Call::ReportCheckpoint(w, world, some, url) => {
            let (worker_id, world_id) = (take(w), take(world));
            let checkpoint = some.then(|| Checkpoint {
                phase_index: i0 as u32,
                step: i1 as u64,
                tokens: i2 as u64,
                url: url.clone(),
                world_id: String::new(),
                committed_ms: i0,
            });
            c.workers()
                .await
                .report_checkpoint(ReportCheckpointRequest {
                    worker_id,
                    world_id,
                    checkpoint,
                })
                .await
                .map(drop)
        }
        Call::ReportCheckpointEval(w, run, eval, tasks, error) => {
            let (worker_id, run_id, eval_id) = (take(w), take(run), take(eval));
            let scores = tasks
                .iter()
                .map(|t| TaskScore {
                    task: t.clone(),
                    primary_metric: t.clone(),
                    metrics: [(t.clone(), f0)].into(),
                    docs: i1 as u64,
                })
                .collect();
            c.workers()
                .await
                .report_checkpoint_eval(ReportCheckpointEvalRequest {
                    worker_id,
                    run_id,
                    eval_id,
                    scores,
                    error: error.clone(),
                })
                .await
                .map(drop)
        }
        Call::ReportFailure(w, world, message, bad_checkpoint) => {
            let (worker_id, world_id) = (take(w), take(world));
            c.workers()
                .await
                .report_failure(ReportFailureRequest {
                    worker_id,
                    world_id,
                    message: message.clone(),
                    bad_checkpoint: bad_checkpoint.clone(),
                    permanent: nums.flags[0],
                })
                .await
                .map(drop)
        }
        Call::Leave(w, reason) => {
            let worker_id = take(w);
            c.workers()
                .await
                .leave(LeaveRequest {
                    worker_id,
                    reason: reason.clone(),
                })
                .await
                .map(drop)
        }
        Call::BuildDataset(junk, how) => {
            let (config_path, config_text) = data_config(*how, junk);
            let out_url = if nums.flags[1] {
                junk.clone()
            } else {
                "file:///tmp/twinhead-fuzz-out".into()
            };
            sent.push(config_path.clone());
            c.datasets()
                .await
                .build_dataset(BuildDatasetRequest {
                    config_path,
                    config_text,
                    out_url,
                })
                .await
                .map(drop)
        }
        Call::GetDataset(id) => {
            let id = take(id);
            c.datasets()
                .await
                .get_dataset(GetDatasetRequest { id })
                .await
                .map(drop)
        }
        Call::ListDatasets => c
            .datasets()
            .await
            .list_datasets(ListDatasetsRequest {})
            .await
            .map(drop),
        Call::ClaimTask(process) => c
            .dataprep()
            .await
            .claim_task(ClaimTaskRequest {
                process: process.clone(),
                wait_ms: nums.wait_ms,
            })
            .await
            .map(drop),
        Call::RenewTask(ds, key, process) => {
            let (dataset_id, key) = (take(ds), take(key));
            c.dataprep()
                .await
                .renew_task(RenewTaskRequest {
                    dataset_id,
                    key,
                    process: process.clone(),
                })
                .await
                .map(drop)
        }
        Call::CompleteTask(ds, key, process, parts) => {
            let (dataset_id, key) = (take(ds), take(key));
            c.dataprep()
                .await
                .complete_task(CompleteTaskRequest {
                    dataset_id,
                    key,
                    process: process.clone(),
                    parts_per_source: parts.clone(),
                    already_complete: nums.flags[0],
                    tokens: i0 as u64,
                })
                .await
                .map(drop)
        }
        Call::FailTask(ds, key, process, error) => {
            let (dataset_id, key) = (take(ds), take(key));
            c.dataprep()
                .await
                .fail_task(FailTaskRequest {
                    dataset_id,
                    key,
                    process: process.clone(),
                    error: error.clone(),
                    retry: nums.flags[1],
                })
                .await
                .map(drop)
        }
    };
    (result, sent)
}

/// A fresh run with a live world of two workers, and a build with a
/// claimed task: ids for requests to name.
async fn scenario(c: &Coordinator, n: u64) -> Ids {
    let run = c
        .runs()
        .await
        .submit_run(SubmitRunRequest {
            spec: Some(tiny_spec(&format!("scenario-{n}"))),
        })
        .await
        .expect("submit")
        .into_inner()
        .run_id;
    let a = SimWorker::register(c, &format!("a{n}")).await;
    let b = SimWorker::register(c, &format!("b{n}")).await;
    // Their world: with the runs fuzzed submissions left pending, it may
    // be another run's, or none yet (then the run's world id stays empty).
    let world = c
        .workers()
        .await
        .get_assignment(GetAssignmentRequest {
            worker_id: a.id.clone(),
            known_assignment_id: String::new(),
            wait_ms: 2000,
        })
        .await
        .ok()
        .and_then(|r| r.into_inner().assignment)
        .map(|a| a.world_id)
        .unwrap_or_default();
    let dataset = c
        .datasets()
        .await
        .build_dataset(BuildDatasetRequest {
            config_path: "configs/data/fuzz.toml".into(),
            config_text: data_config(0, "").1,
            out_url: format!("file:///tmp/twinhead-fuzz-{n}"),
        })
        .await
        .expect("build")
        .into_inner()
        .id;
    let task = c
        .dataprep()
        .await
        .claim_task(ClaimTaskRequest {
            process: "fuzz".into(),
            wait_ms: 0,
        })
        .await
        .expect("claim")
        .into_inner()
        .task
        .map(|t| t.key)
        .unwrap_or_default();
    Ids {
        run,
        workers: vec![a.id, b.id],
        world,
        dataset,
        task,
    }
}

fn grpc(short: u32) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let c = rt.block_on(Coordinator::start(&dir.path().join("c.db")));
    let ids = Arc::new(Mutex::new(Ids::default()));
    // The scenario's workers heartbeat as real ones do, so that they stay
    // alive however long the fuzzing between two scenarios takes.
    let mut client = rt.block_on(c.workers());
    let beating = ids.clone();
    let heart = rt.spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let now = beating.lock().unwrap_or_else(|p| p.into_inner()).clone();
            for worker_id in now.workers {
                let _ = client
                    .heartbeat(HeartbeatRequest {
                        worker_id,
                        world_id: now.world.clone(),
                    })
                    .await;
            }
        }
    });
    let count = Mutex::new(0u64);
    // No shrinking: the server's state moves on with every case, so a
    // smaller input replayed later is not the same experiment.
    support::run_with(
        "grpc",
        short,
        LIMIT,
        false,
        (call(), nums()),
        |(call, nums)| {
            let n = {
                let mut n = count.lock().unwrap_or_else(|p| p.into_inner());
                *n += 1;
                *n
            };
            if n % u64::from(REFRESH) == 1 {
                let fresh = rt.block_on(scenario(&c, n));
                *ids.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
            }
            let now = ids.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let (result, sent) = rt.block_on(send(&c, &now, &call, &nums, n));
            check(result, &sent)
        },
    );
    heart.abort();
    rt.block_on(c.stop());
}

// Findings kept as regression tests.

/// A refusal that quoted a long input (a 5000-character config line, run
/// name or id) was too long for an HTTP/2 header once percent-encoded: the
/// client got INTERNAL "h2 protocol error" instead of the message.
#[tokio::test]
async fn refusals_quoting_long_inputs_reach_the_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start(&dir.path().join("c.db")).await;
    let long = "x".repeat(5000);
    let status = c
        .datasets()
        .await
        .build_dataset(BuildDatasetRequest {
            config_path: "d.toml".into(),
            config_text: long.clone(),
            out_url: "file:///tmp/out".into(),
        })
        .await
        .expect_err("not a config");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("d.toml") && status.message().contains("more bytes)"),
        "{status:?}"
    );
    let mut spec = tiny_spec("long");
    spec.name = "é".repeat(5000);
    let status = c
        .runs()
        .await
        .submit_run(SubmitRunRequest { spec: Some(spec) })
        .await
        .expect_err("bad name");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("spec.name: "), "{status:?}");
    let mut spec = tiny_spec("long-dataset");
    spec.dataset = format!("/nonexistent/{long}");
    let status = c
        .runs()
        .await
        .submit_run(SubmitRunRequest { spec: Some(spec) })
        .await
        .expect_err("no dataset");
    assert_ne!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("dataset"), "{status:?}");
    let status = c
        .workers()
        .await
        .heartbeat(HeartbeatRequest {
            worker_id: long,
            world_id: String::new(),
        })
        .await
        .expect_err("no such worker");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    c.stop().await;
}

/// Finding 18: a plan's `parts_per_source` was taken as reported, and the
/// coordinator listed a task per part: `[u32::MAX, …]` made it allocate
/// 57 GB and abort (found by the first 1,000,000-case gRPC run). A plan of
/// more than a million parts is refused and the build stays where it was.
#[tokio::test]
async fn a_plan_of_billions_of_parts_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start(&dir.path().join("c.db")).await;
    let ids = scenario(&c, 1).await;
    assert_eq!(ids.task, "plan", "{ids:?}");
    let complete = |parts: Vec<u32>| CompleteTaskRequest {
        dataset_id: ids.dataset.clone(),
        key: ids.task.clone(),
        process: "fuzz".into(),
        parts_per_source: parts,
        ..Default::default()
    };
    let status = c
        .dataprep()
        .await
        .complete_task(complete(vec![u32::MAX]))
        .await
        .expect_err("too many parts");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("parts_per_source: 4294967295 parts"),
        "{status:?}"
    );
    // Still serving, and the plan can still be completed.
    c.dataprep()
        .await
        .complete_task(complete(vec![2]))
        .await
        .expect("a plan of 2 parts");
    c.stop().await;
}

/// Findings 20 and 22: a progress report of more than 2^63 − 1 tokens, or
/// with a NaN loss (stored as NULL), reached the store, which refused it:
/// INTERNAL, and the commit it shared with other calls failed with it.
/// Both are refused at the door.
#[tokio::test]
async fn progress_the_store_cannot_hold_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start(&dir.path().join("c.db")).await;
    c.runs()
        .await
        .submit_run(SubmitRunRequest {
            spec: Some(tiny_spec("huge-tokens")),
        })
        .await
        .expect("submit");
    let mut a = SimWorker::register(&c, "a").await;
    let mut b = SimWorker::register(&c, "b").await;
    a.next_assignment().await;
    b.next_assignment().await;
    for w in [&mut a, &mut b] {
        for (tokens, loss, named) in [
            (
                13_872_134_233_781_010_482,
                2.5,
                "tokens: 13872134233781010482",
            ),
            (1000, f64::NAN, "loss: NaN"),
        ] {
            let request = w.progress_request(1, tokens, loss);
            let status = w
                .client
                .report_progress(request)
                .await
                .expect_err("a report the store cannot hold");
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(status.message().starts_with(named), "{status:?}");
        }
    }
    // The store still takes reports.
    a.progress(1, 2.5).await;
    b.progress(1, 2.5).await;
    c.stop().await;
}

#[test]
fn grpc_short() {
    grpc(SHORT);
}

#[test]
#[ignore = "bench mode: TWINHEAD_FUZZ_CASES cases, release build"]
fn fuzz_grpc() {
    grpc(SHORT);
}
