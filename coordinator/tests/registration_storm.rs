//! Liveness under load, over real gRPC on loopback: a worker is declared
//! dead for its own silence, never for the time the coordinator itself was
//! too busy (or not scheduled) to hear its heartbeats.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Coordinator, SimWorker, fast_leases, spec_with};
use tokio::sync::watch;
use twinhead_coordinator::{LeaseSettings, ServerConfig};
use twinhead_proto::v1::{
    GetAssignmentRequest, HeartbeatRequest, ListRunsRequest, RegisterRequest, SubmitRunRequest,
    WorkerAction,
};

async fn start(dir: &tempfile::TempDir, leases: LeaseSettings) -> Coordinator {
    Coordinator::start_with(ServerConfig {
        tls: None,
        db: dir.path().join("c.db"),
        user_token: None,
        worker_token: None,
        leases,
    })
    .await
}

/// Runs of `world_size` ranks, enough for `workers` workers.
async fn submit_runs(c: &Coordinator, workers: usize, world_size: usize) {
    let mut runs = c.runs().await;
    for i in 0..workers / world_size {
        let spec = spec_with(
            &format!("storm-{i}"),
            &[&format!("world_size={world_size}")],
        );
        runs.submit_run(SubmitRunRequest { spec: Some(spec) })
            .await
            .expect("submit");
    }
}

/// Every world formed once and none ended: no member was declared dead.
async fn assert_no_world_ended(c: &Coordinator) {
    let runs = c
        .runs()
        .await
        .list_runs(ListRunsRequest::default())
        .await
        .expect("list runs")
        .into_inner()
        .runs;
    for run in runs {
        let ended: Vec<&str> = run
            .attempts
            .iter()
            .filter(|a| a.ended_ms != 0)
            .map(|a| a.end_reason.as_str())
            .collect();
        assert!(ended.is_empty(), "run {} lost a world: {ended:?}", run.id);
        assert_eq!(run.attempts.len(), 1, "run {} formed one world", run.id);
    }
}

/// The coordinator's runtime (here the test's only thread) blocked for
/// three lease timeouts, as when the process is not scheduled or a burst of
/// calls keeps every worker thread busy: the heartbeats sent meanwhile
/// could not be read, and nobody is dead for it.
#[tokio::test]
async fn a_coordinator_stalled_past_the_lease_declares_no_worker_dead() {
    let dir = tempfile::tempdir().expect("tempdir");
    let leases = fast_leases();
    let c = start(&dir, leases).await;
    submit_runs(&c, 2, 2).await;
    let mut a = SimWorker::register(&c, "a").await;
    let mut b = SimWorker::register(&c, "b").await;
    a.next_assignment().await;
    b.next_assignment().await;
    for _ in 0..3 {
        a.heartbeat().await.expect("heartbeat a");
        b.heartbeat().await.expect("heartbeat b");
        tokio::time::sleep(leases.heartbeat_interval).await;
    }

    // Deliberately blocking: nothing on this runtime runs, the lease reaper
    // and the gRPC server included.
    std::thread::sleep(leases.lease_timeout * 3);

    for _ in 0..(leases.lease_timeout * 3).as_millis() / leases.heartbeat_interval.as_millis() {
        for (name, worker) in [("a", &mut a), ("b", &mut b)] {
            let (action, reason) = worker
                .heartbeat()
                .await
                .unwrap_or_else(|s| panic!("{name} declared dead after the stall: {s:?}"));
            assert_eq!(
                action,
                WorkerAction::Continue as i32,
                "{name} told to abort: {reason}"
            );
        }
        tokio::time::sleep(leases.heartbeat_interval).await;
    }
    assert_no_world_ended(&c).await;
    c.stop().await;
}

/// What one simulated worker of the storm saw.
#[derive(Default)]
struct Seen {
    assigned: bool,
    /// The coordinator's answer when it no longer knew the worker.
    declared_dead: Option<String>,
}

/// Workers registering all at once on separate connections, each one
/// heartbeating from registration on while it long-polls for its
/// assignment, as `twinhead worker` does; more workers than the runs need,
/// so that some wait idle through the whole storm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_storm_declares_no_live_worker_dead() {
    const WORKERS: usize = 400;
    const BUSY: usize = 200;
    const WORLD: usize = 4;
    let dir = tempfile::tempdir().expect("tempdir");
    let leases = LeaseSettings {
        heartbeat_interval: Duration::from_millis(100),
        lease_timeout: Duration::from_millis(600),
    };
    let c = start(&dir, leases).await;
    submit_runs(&c, BUSY, WORLD).await;

    let (stop_tx, stop) = watch::channel(false);
    let assigned = Arc::new(AtomicUsize::new(0));
    let url = c.url();
    let mut tasks = Vec::new();
    for i in 0..WORKERS {
        let (url, stop, assigned) = (url.clone(), stop.clone(), assigned.clone());
        tasks.push(tokio::spawn(async move {
            storm_worker(&url, i, leases, stop, &assigned).await
        }));
    }
    // Through the storm, then several lease timeouts of steady heartbeats.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while assigned.load(Ordering::Relaxed) < BUSY && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(leases.lease_timeout * 3).await;
    let _ = stop_tx.send(true);
    let mut dead = Vec::new();
    let mut busy = 0;
    for task in tasks {
        let seen = task.await.expect("worker task");
        busy += usize::from(seen.assigned);
        dead.extend(seen.declared_dead);
    }
    assert!(
        dead.is_empty(),
        "{} live workers declared dead, first: {:?}",
        dead.len(),
        dead.first()
    );
    assert_eq!(busy, BUSY, "every run's world formed");
    assert_no_world_ended(&c).await;
    c.stop().await;
}

async fn storm_worker(
    url: &str,
    index: usize,
    leases: LeaseSettings,
    mut stop: watch::Receiver<bool>,
    assigned: &AtomicUsize,
) -> Seen {
    let mut seen = Seen::default();
    let (mut client, worker_id) = register_retrying(url, index).await;
    let (world_tx, world) = watch::channel(String::new());

    let mut poller = client.clone();
    let mut stop_polling = stop.clone();
    let poll = async {
        loop {
            let request = GetAssignmentRequest {
                worker_id: worker_id.clone(),
                known_assignment_id: String::new(),
                wait_ms: 10_000,
            };
            let reply = tokio::select! {
                reply = poller.get_assignment(request) => reply,
                _ = stop_polling.wait_for(|s| *s) => return false,
            };
            match reply {
                Ok(r) => {
                    if let Some(a) = r.into_inner().assignment {
                        assigned.fetch_add(1, Ordering::Relaxed);
                        let _ = world_tx.send(a.world_id);
                        return true;
                    }
                }
                // Its heartbeats report the death.
                Err(_) => return false,
            }
        }
    };
    let beat = async {
        let mut ticker = tokio::time::interval(leases.heartbeat_interval);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|s| *s) => return None,
            }
            let request = HeartbeatRequest {
                worker_id: worker_id.clone(),
                world_id: world.borrow().clone(),
            };
            match client.heartbeat(request).await {
                Ok(r) if r.get_ref().action == WorkerAction::Continue as i32 => {}
                Ok(r) => return Some(format!("{worker_id} told to abort: {}", r.get_ref().reason)),
                Err(s) => return Some(format!("{worker_id}: {}", s.message())),
            }
        }
    };
    let (got_one, death) = tokio::join!(poll, beat);
    seen.assigned = got_one;
    seen.declared_dead = death;
    seen
}

/// A connection and a worker id. Like `twinhead worker`, a connection or
/// registration that fails (a storm of connections can see a few of them
/// reset before they are served) is tried again.
async fn register_retrying(
    url: &str,
    index: usize,
) -> (
    twinhead_proto::v1::worker_service_client::WorkerServiceClient<tonic::transport::Channel>,
    String,
) {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string()).expect("url");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let error = match endpoint.connect().await {
            Ok(channel) => {
                let mut client =
                    twinhead_proto::v1::worker_service_client::WorkerServiceClient::new(channel);
                let request = RegisterRequest {
                    hostname: format!("storm-{index}"),
                    device: "cpu".into(),
                    pid: index as u32,
                };
                match client.register(request).await {
                    Ok(reply) => return (client, reply.into_inner().worker_id),
                    Err(status) => format!("{status:?}"),
                }
            }
            Err(e) => e.to_string(),
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker {index} could not register: {error}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
