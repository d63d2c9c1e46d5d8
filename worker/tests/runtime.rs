//! The worker runtime against a real coordinator on loopback: registration,
//! rendezvous into a real CPU ring collective, phase transitions, and a
//! world re-formed after a worker vanishes. The trainer here all-reduces a
//! small buffer per step instead of training a model, so the test checks
//! the protocol and the collective wiring, not the numerics.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use twinhead_coordinator::{LeaseSettings, ServerConfig};
use twinhead_proto::v1::run_service_client::RunServiceClient;
use twinhead_proto::v1::{
    Assignment, Checkpoint, GetRunRequest, RunSpec, RunState, SubmitRunRequest,
};
use twinhead_worker::collective::{Collective, RingConfig};
use twinhead_worker::runtime::{
    Link, PhaseEnd, Progress, TrainError, Trainer, WorkerConfig, run_worker,
};

/// What each rank saw: (world id, rank, phase, step, reduced value).
type Seen = Arc<Mutex<Vec<(String, u32, u32, u64, f32)>>>;

struct ReduceTrainer {
    seen: Seen,
    step_delay: Duration,
}

impl Trainer for ReduceTrainer {
    fn train(
        &mut self,
        a: &Assignment,
        collective: &mut dyn Collective,
        link: &Link,
    ) -> Result<PhaseEnd, TrainError> {
        for step in a.first_step..=a.last_step {
            if let Some(reason) = link.aborted() {
                return Ok(PhaseEnd::Aborted(reason));
            }
            // Every rank contributes its rank; the mean is (n-1)/2.
            let mut buf = vec![collective.rank() as f32; 3];
            collective.all_reduce_mean(&mut buf)?;
            self.seen.lock().expect("lock").push((
                a.world_id.clone(),
                a.rank,
                a.phase_index,
                step,
                buf[0],
            ));
            link.progress(Progress {
                step: step + 1,
                tokens: (step + 1) * 100,
                loss: 1.0 / (step + 1) as f64,
                ..Default::default()
            });
            std::thread::sleep(self.step_delay);
            if a.rank == 0 && (step + 1 == a.num_steps || (step + 1) % 2 == 0) {
                link.checkpoint(Checkpoint {
                    phase_index: a.phase_index,
                    step: step + 1,
                    tokens: (step + 1) * 100,
                    url: format!("mem://{}/{}/{}", a.run_id, a.phase_index, step + 1),
                    ..Default::default()
                })?;
            }
        }
        Ok(PhaseEnd::Finished)
    }
}

fn spec(overrides: &[&str]) -> RunSpec {
    let text = r#"
name = "runtime"
model = "tiny"
objective = "clm"
dataset = "tests/fixtures/runtime-dataset"
world_size = 2
global_batch = 4
[optimizer]
peak_lr = 1e-3
[checkpoint]
root = "mem://ckpt"
[[phases]]
name = "one"
tokens = 384
seq_len = 16
[[phases]]
name = "two"
tokens = 256
seq_len = 32
"#;
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    twinhead_proto::config::parse_run("runtime.toml", text, &overrides, Path::new("."))
        .expect("spec")
}

struct Coordinator {
    url: String,
    _shutdown: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn coordinator(leases: LeaseSettings) -> Coordinator {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = oneshot::channel::<()>();
    let config = ServerConfig {
        tls: None,
        db: dir.path().join("c.db"),
        user_token: None,
        worker_token: None,
        leases,
    };
    tokio::spawn(twinhead_coordinator::serve(config, listener, async {
        let _ = rx.await;
    }));
    Coordinator {
        url,
        _shutdown: tx,
        _dir: dir,
    }
}

fn worker_config(url: &str, name: &str) -> WorkerConfig {
    WorkerConfig {
        coordinator: url.to_string(),
        token: None,
        tls: Default::default(),
        device: "cpu".into(),
        hostname: name.into(),
        ring: RingConfig {
            op_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(20),
            ..RingConfig::default()
        },
        exit_when_idle: true,
        abort_grace: Duration::from_secs(60),
    }
}

async fn wait_for_state(
    url: &str,
    run_id: &str,
    state: RunState,
    timeout: Duration,
) -> twinhead_proto::v1::Run {
    let mut client = RunServiceClient::connect(url.to_string())
        .await
        .expect("connect");
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let run = client
            .get_run(GetRunRequest {
                run_id: run_id.to_string(),
            })
            .await
            .expect("get")
            .into_inner();
        if run.state == state as i32 {
            return run;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run stuck in {:?}: {run:?}",
            run.state
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn submit(url: &str, spec: RunSpec) -> String {
    let mut client = RunServiceClient::connect(url.to_string())
        .await
        .expect("connect");
    client
        .submit_run(SubmitRunRequest { spec: Some(spec) })
        .await
        .expect("submit")
        .into_inner()
        .run_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_train_both_phases_over_a_real_collective() {
    let c = coordinator(LeaseSettings::default()).await;
    let run_id = submit(&c.url, spec(&[])).await;
    let seen: Seen = Arc::default();
    let mut workers = Vec::new();
    for name in ["a", "b"] {
        let trainer = Box::new(ReduceTrainer {
            seen: seen.clone(),
            step_delay: Duration::ZERO,
        });
        workers.push(tokio::spawn(run_worker(
            worker_config(&c.url, name),
            trainer,
            std::future::pending(),
            std::future::pending(),
        )));
    }
    let run = wait_for_state(
        &c.url,
        &run_id,
        RunState::Completed,
        Duration::from_secs(30),
    )
    .await;
    for w in workers {
        tokio::time::timeout(Duration::from_secs(15), w)
            .await
            .expect("workers exit when their run is over")
            .expect("task")
            .expect("worker");
    }
    // 384 / (4 x 16) = 6 steps, then 256 / (4 x 32) = 2 steps, on 2 ranks.
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2 * (6 + 2));
    assert!(
        seen.iter().all(|(_, _, _, _, mean)| *mean == 0.5),
        "mean of ranks 0 and 1"
    );
    assert!(
        seen.iter().all(|(world, ..)| *world == seen[0].0),
        "one world for the whole run"
    );
    assert_eq!(run.attempts.len(), 1);
    assert_eq!(
        run.phases[0].loss,
        1.0 / 6.0,
        "rank 0's last progress of phase 0"
    );
    let phase_ends: Vec<(u32, u64)> = run
        .checkpoints
        .iter()
        .map(|c| (c.phase_index, c.step))
        .collect();
    assert_eq!(phase_ends, vec![(0, 2), (0, 4), (0, 6), (1, 2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vanished_worker_is_replaced_and_training_resumes_from_the_checkpoint() {
    let leases = LeaseSettings {
        heartbeat_interval: Duration::from_millis(50),
        lease_timeout: Duration::from_millis(500),
    };
    let c = coordinator(leases).await;
    let run_id = submit(&c.url, spec(&["phases[0].tokens=1280"])).await; // 20 steps
    let seen: Seen = Arc::default();
    let start = |name: &'static str| {
        let trainer = Box::new(ReduceTrainer {
            seen: seen.clone(),
            step_delay: Duration::from_millis(40),
        });
        tokio::spawn(run_worker(
            worker_config(&c.url, name),
            trainer,
            std::future::pending(),
            std::future::pending(),
        ))
    };
    let a = start("a");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = start("b");
    // Let the world get past its first checkpoint, then make b vanish: its
    // task is dropped, so it neither heartbeats nor all-reduces again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.lock().expect("lock").len() < 10 {
        assert!(tokio::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.abort();
    let spare = start("spare");
    let run = wait_for_state(
        &c.url,
        &run_id,
        RunState::Completed,
        Duration::from_secs(60),
    )
    .await;
    assert!(
        run.attempts.len() >= 2,
        "the world was re-formed: {:?}",
        run.attempts
    );
    assert!(run.attempts[0].failed, "{:?}", run.attempts[0]);
    let second = &run.attempts[1];
    let resumed_from = second
        .start_checkpoint
        .as_ref()
        .map(|c| c.step)
        .unwrap_or(0);
    assert!(
        resumed_from >= 2,
        "resumed from a committed checkpoint, not from scratch"
    );
    let seen = seen.lock().expect("lock").clone();
    let first_step_of_second = seen
        .iter()
        .filter(|(world, ..)| *world == second.world_id)
        .map(|(_, _, phase, step, _)| (*phase, *step))
        .min()
        .expect("the second world trained");
    assert_eq!(
        first_step_of_second,
        (0, resumed_from),
        "the new world starts at the checkpoint's step"
    );
    for w in [a, spare] {
        tokio::time::timeout(Duration::from_secs(15), w)
            .await
            .expect("exit")
            .expect("task")
            .expect("worker");
    }
}

/// A trainer whose second step never finishes until `release` is set (a
/// deadlock, a stuck device): it ignores its world's end.
struct HangingTrainer {
    release: Arc<std::sync::atomic::AtomicBool>,
}

impl Trainer for HangingTrainer {
    fn train(
        &mut self,
        a: &Assignment,
        collective: &mut dyn Collective,
        _link: &Link,
    ) -> Result<PhaseEnd, TrainError> {
        let mut buf = vec![0.0f32; 3];
        collective.all_reduce_mean(&mut buf)?;
        while !self.release.load(std::sync::atomic::Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = a;
        Ok(PhaseEnd::Finished)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_whose_step_hangs_after_its_world_ended_gives_up_and_exits() {
    let leases = LeaseSettings {
        heartbeat_interval: Duration::from_millis(50),
        lease_timeout: Duration::from_millis(2000),
    };
    let c = coordinator(leases).await;
    let _run_id = submit(&c.url, spec(&["phases[0].tokens=1280"])).await;
    let release = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut hung_config = worker_config(&c.url, "hung");
    hung_config.abort_grace = Duration::from_millis(1500);
    // Short collective timeouts: the healthy rank gives up on the hung one
    // quickly and reports the failure, which ends the world.
    let short = |mut config: WorkerConfig| {
        config.ring.op_timeout = Duration::from_secs(2);
        config
    };
    let hung = tokio::spawn(run_worker(
        short(hung_config),
        Box::new(HangingTrainer {
            release: release.clone(),
        }),
        std::future::pending(),
        std::future::pending(),
    ));
    let healthy = tokio::spawn(run_worker(
        short(worker_config(&c.url, "healthy")),
        Box::new(ReduceTrainer {
            seen: Seen::default(),
            step_delay: Duration::ZERO,
        }),
        std::future::pending(),
        std::future::pending(),
    ));
    // Heartbeats keep flowing (its lease never lapses), but the step never
    // returns: after the grace the worker exits with an error saying so.
    let outcome = tokio::time::timeout(Duration::from_secs(30), hung)
        .await
        .expect("the hung worker exits within its grace")
        .expect("task");
    let err = outcome.expect_err("a hung step is an error");
    assert!(
        matches!(&err, twinhead_worker::runtime::WorkerError::Hung { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("has not stopped 1.5s after world"),
        "{err}"
    );
    release.store(true, std::sync::atomic::Ordering::Release);
    healthy.abort();
}
