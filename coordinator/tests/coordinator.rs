//! The coordinator over real gRPC on loopback with SQLite on disk.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Coordinator, SimWorker, fast_leases, spec_with, tiny_spec};
use tokio_stream::StreamExt;
use twinhead_coordinator::ServerConfig;
use twinhead_proto::v1::{
    CancelRunRequest, GetAssignmentRequest, GetRunRequest, LeaveRequest, ListRunsRequest,
    RendezvousRequest, ReportFailureRequest, Run, RunEventKind, RunState, SubmitRunRequest,
    WatchRunRequest, WorkerAction,
};

async fn get(c: &Coordinator, id: &str) -> Run {
    c.runs()
        .await
        .get_run(GetRunRequest { run_id: id.into() })
        .await
        .expect("get run")
        .into_inner()
}

async fn submit(c: &Coordinator, spec: twinhead_proto::v1::RunSpec) -> String {
    c.runs()
        .await
        .submit_run(SubmitRunRequest { spec: Some(spec) })
        .await
        .expect("submit")
        .into_inner()
        .run_id
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

#[tokio::test]
async fn submit_get_list_and_watch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start(&dir.path().join("c.db")).await;
    let id = submit(&c, tiny_spec("first")).await;
    let run = get(&c, &id).await;
    assert_eq!(run.state, RunState::Pending as i32);
    assert_eq!(run.spec.as_ref().map(|s| s.name.as_str()), Some("first"));
    let steps: Vec<u64> = run.phases.iter().map(|p| p.num_steps).collect();
    assert_eq!(
        steps,
        vec![3, 2],
        "192 tokens / (4 x 16) and 256 / (4 x 32)"
    );

    let other = submit(&c, tiny_spec("second")).await;
    let listed = c
        .runs()
        .await
        .list_runs(ListRunsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .runs;
    let ids: Vec<&str> = listed.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, vec![id.as_str(), other.as_str()], "submission order");
    let pending = c
        .runs()
        .await
        .list_runs(ListRunsRequest {
            states: vec![RunState::Completed as i32],
        })
        .await
        .expect("list")
        .into_inner()
        .runs;
    assert!(pending.is_empty());

    let mut stream = c
        .runs()
        .await
        .watch_run(WatchRunRequest { run_id: id.clone() })
        .await
        .expect("watch")
        .into_inner();
    let first = stream.next().await.expect("snapshot").expect("ok");
    assert_eq!(first.kind, RunEventKind::Snapshot as i32);
    c.runs()
        .await
        .cancel_run(CancelRunRequest {
            run_id: id.clone(),
            reason: "testing".into(),
        })
        .await
        .expect("cancel");
    let event = stream.next().await.expect("event").expect("ok");
    assert_eq!(event.kind, RunEventKind::StateChanged as i32);
    assert_eq!(
        event.run.as_ref().map(|r| r.state),
        Some(RunState::Cancelled as i32)
    );
    assert!(event.message.contains("testing"), "{}", event.message);
    assert!(
        stream.next().await.is_none(),
        "the stream ends with the run"
    );

    let err = c
        .runs()
        .await
        .cancel_run(CancelRunRequest {
            run_id: id.clone(),
            reason: String::new(),
        })
        .await
        .expect_err("already cancelled");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let err = c
        .runs()
        .await
        .get_run(GetRunRequest {
            run_id: "run-999999".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), tonic::Code::NotFound);
    c.stop().await;
}

#[tokio::test]
async fn invalid_specs_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start(&dir.path().join("c.db")).await;
    let valid = tiny_spec("bad");
    let mut cases: Vec<(twinhead_proto::v1::RunSpec, &str)> = Vec::new();
    let mut s = valid.clone();
    s.phases[1].tokens = 0;
    cases.push((s, "spec.phases[1].tokens"));
    let mut s = valid.clone();
    s.phases[0].seq_len = 8;
    cases.push((s, "spec.phases[0].seq_len"));
    let mut s = valid.clone();
    s.phases[0].seq_len = 4096; // tiny's max_position_embeddings is 1024
    cases.push((s, "spec.phases[0].seq_len"));
    let mut s = valid.clone();
    s.phases.clear();
    cases.push((s, "spec.phases"));
    let mut s = valid.clone();
    s.world_size = 3; // does not divide global_batch 4
    cases.push((s, "spec.world_size"));
    let mut s = valid.clone();
    s.objective = 0;
    cases.push((s, "spec.objective"));
    let mut s = valid.clone();
    s.model = None;
    cases.push((s, "spec.model"));
    for (spec, key) in cases {
        let err = c
            .runs()
            .await
            .submit_run(SubmitRunRequest { spec: Some(spec) })
            .await
            .expect_err(key);
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{key}: {}",
            err.message()
        );
        assert!(
            err.message().starts_with(&format!("{key}:")),
            "{key}: {}",
            err.message()
        );
    }
    let err = c
        .runs()
        .await
        .submit_run(SubmitRunRequest { spec: None })
        .await
        .expect_err("no spec");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let runs = c
        .runs()
        .await
        .list_runs(ListRunsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .runs;
    assert!(runs.is_empty(), "no refused spec was stored");
    c.stop().await;
}

#[tokio::test]
async fn calls_without_the_right_token_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start_with(ServerConfig {
        tls: None,
        db: dir.path().join("c.db"),
        user_token: Some("user-secret".into()),
        worker_token: Some("worker-secret".into()),
        leases: Default::default(),
    })
    .await;
    for token in [None, Some("wrong"), Some("worker-secret")] {
        let err = c
            .runs_with_token(token)
            .await
            .submit_run(SubmitRunRequest {
                spec: Some(tiny_spec("x")),
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{token:?}");
        assert!(!err.message().contains('\n'));
    }
    let err = c
        .workers_with_token(Some("user-secret"))
        .await
        .register(twinhead_proto::v1::RegisterRequest::default())
        .await
        .expect_err("user token is not a worker token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("worker"), "{}", err.message());

    let mut runs = c.runs_with_token(Some("user-secret")).await;
    let listed = runs
        .list_runs(ListRunsRequest::default())
        .await
        .expect("authorised")
        .into_inner()
        .runs;
    assert!(listed.is_empty(), "refused submissions left nothing behind");
    runs.submit_run(SubmitRunRequest {
        spec: Some(tiny_spec("ok")),
    })
    .await
    .expect("authorised submit");
    c.workers_with_token(Some("worker-secret"))
        .await
        .register(twinhead_proto::v1::RegisterRequest::default())
        .await
        .expect("authorised register");
    c.stop().await;
}

#[tokio::test]
async fn a_world_trains_through_both_phases_to_completion() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start(&dir.path().join("c.db")).await;
    let id = submit(&c, tiny_spec("life")).await;
    let mut watch = c
        .runs()
        .await
        .watch_run(WatchRunRequest { run_id: id.clone() })
        .await
        .expect("watch")
        .into_inner();

    let mut a = SimWorker::register(&c, "a").await;
    assert!(
        a.client
            .get_assignment(GetAssignmentRequest {
                worker_id: a.id.clone(),
                known_assignment_id: String::new(),
                wait_ms: 100
            })
            .await
            .expect("poll")
            .into_inner()
            .assignment
            .is_none(),
        "one worker cannot form a world of two"
    );
    let mut b = SimWorker::register(&c, "b").await;
    let (first_a, first_b) = (a.next_assignment().await, b.next_assignment().await);
    assert_eq!(
        (first_a.rank, first_b.rank),
        (0, 1),
        "ranks follow registration order"
    );
    assert_eq!(first_a.world_id, first_b.world_id);
    assert_eq!(
        (
            first_a.world_size,
            first_a.phase_index,
            first_a.first_step,
            first_a.last_step
        ),
        (2, 0, 0, 2)
    );
    assert!(first_a.start_checkpoint.is_none());
    assert_eq!(first_a.spec.as_ref().map(|s| s.name.as_str()), Some("life"));

    // Rendezvous: rank 1 waits for the token that rank 0 publishes.
    let world = first_a.world_id.clone();
    let mut fetcher = b.client.clone();
    let (bid, bworld) = (b.id.clone(), world.clone());
    let fetch = tokio::spawn(async move {
        fetcher
            .rendezvous(RendezvousRequest {
                worker_id: bid,
                world_id: bworld,
                publish: Vec::new(),
                wait_ms: 5000,
            })
            .await
            .expect("fetch")
            .into_inner()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let err = b
        .client
        .rendezvous(RendezvousRequest {
            worker_id: b.id.clone(),
            world_id: world.clone(),
            publish: b"x".to_vec(),
            wait_ms: 0,
        })
        .await
        .expect_err("only rank 0 publishes");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    let token = vec![7u8; 128];
    a.client
        .rendezvous(RendezvousRequest {
            worker_id: a.id.clone(),
            world_id: world.clone(),
            publish: token.clone(),
            wait_ms: 0,
        })
        .await
        .expect("publish");
    let fetched = fetch.await.expect("task");
    assert!(fetched.ready);
    assert_eq!(fetched.token, token);

    for step in 1..=3 {
        assert_eq!(
            a.progress(step, 5.0 - step as f64).await.action,
            WorkerAction::Continue as i32
        );
        b.progress(step, 9.0).await;
    }
    let run = get(&c, &id).await;
    assert_eq!(run.phases[0].steps_done, 3);
    assert_eq!(run.phases[0].loss, 2.0, "rank 0's loss is the run's");
    assert_eq!(run.phase_index, 0, "progress alone does not end a phase");
    let err = a.checkpoint(4).await.expect_err("past the phase");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    a.checkpoint(3).await.expect("phase end checkpoint");

    let second_a = a.next_assignment().await;
    let second_b = b.next_assignment().await;
    assert_eq!(
        second_a.world_id, world,
        "the world carries on into the next phase"
    );
    assert_eq!(
        (
            second_a.phase_index,
            second_a.first_step,
            second_a.last_step
        ),
        (1, 0, 1)
    );
    assert!(second_a.phase_start);
    assert_eq!(
        second_a
            .start_checkpoint
            .as_ref()
            .map(|c| (c.phase_index, c.step)),
        Some((0, 3))
    );
    assert_eq!(second_b.rank, 1);
    a.progress(2, 1.5).await;
    a.checkpoint(2).await.expect("final checkpoint");

    let run = get(&c, &id).await;
    assert_eq!(run.state, RunState::Completed as i32);
    assert_eq!(run.checkpoints.len(), 2);
    assert!(run.phases.iter().all(|p| p.finished_ms > 0));
    let (action, reason) = a.heartbeat().await.expect("heartbeat");
    assert_eq!(action, WorkerAction::Abort as i32, "the world is over");
    assert!(reason.contains("run completed"), "{reason}");

    let mut kinds = Vec::new();
    while let Some(event) = watch.next().await {
        kinds.push(RunEventKind::try_from(event.expect("event").kind).expect("kind"));
    }
    let position = |k: RunEventKind| {
        kinds
            .iter()
            .position(|x| *x == k)
            .unwrap_or_else(|| panic!("{k:?} in {kinds:?}"))
    };
    assert_eq!(kinds[0], RunEventKind::Snapshot);
    assert!(position(RunEventKind::WorldFormed) < position(RunEventKind::Progress));
    assert!(position(RunEventKind::Checkpoint) < position(RunEventKind::PhaseStarted));
    assert!(position(RunEventKind::PhaseStarted) < position(RunEventKind::WorldEnded));
    assert_eq!(
        kinds.last(),
        Some(&RunEventKind::StateChanged),
        "the stream ends with completion"
    );
    c.stop().await;
}

#[tokio::test]
async fn a_silent_worker_is_declared_dead_and_the_world_reforms_from_the_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let leases = fast_leases();
    let c = Coordinator::start_with(ServerConfig {
        tls: None,
        db: dir.path().join("c.db"),
        user_token: None,
        worker_token: None,
        leases,
    })
    .await;
    let id = submit(&c, tiny_spec("dead")).await;
    let mut a = SimWorker::register(&c, "a").await;
    let mut b = SimWorker::register(&c, "b").await;
    let first = a.next_assignment().await;
    b.next_assignment().await;
    a.progress(1, 3.0).await;
    a.checkpoint(1).await.expect("checkpoint");
    let mut spare = SimWorker::register(&c, "spare").await;

    // a and the spare keep heartbeating; b falls silent now.
    let silent_since = Instant::now();
    b.heartbeat().await.expect("last heartbeat");
    let mut aborted_after = None;
    while silent_since.elapsed() < Duration::from_secs(5) {
        let (action, reason) = a.heartbeat().await.expect("heartbeat");
        spare.heartbeat().await.expect("spare heartbeat");
        if action == WorkerAction::Abort as i32 {
            assert!(
                reason.contains(&b.id) && reason.contains("no heartbeat"),
                "{reason}"
            );
            aborted_after = Some(silent_since.elapsed());
            break;
        }
        tokio::time::sleep(leases.heartbeat_interval).await;
    }
    let after = aborted_after.expect("the world was torn down");
    assert!(
        after >= leases.lease_timeout,
        "declared dead after {after:?}, before the timeout"
    );
    assert!(
        after < leases.lease_timeout * 2,
        "declared dead only after {after:?}"
    );
    let err = b
        .heartbeat()
        .await
        .expect_err("a dead worker must register again");
    assert_eq!(err.code(), tonic::Code::NotFound);

    let again = a.next_assignment().await;
    let spare_assignment = spare.next_assignment().await;
    assert_ne!(again.world_id, first.world_id, "a new world incarnation");
    assert_eq!(spare_assignment.world_id, again.world_id);
    assert_eq!(
        (again.phase_index, again.first_step),
        (0, 1),
        "resumes after the committed step"
    );
    assert_eq!(again.start_checkpoint.as_ref().map(|c| c.step), Some(1));
    let run = get(&c, &id).await;
    assert_eq!(run.attempts.len(), 2);
    assert!(run.attempts[0].failed && run.attempts[0].end_reason.contains(&b.id));
    assert_eq!(run.state, RunState::Running as i32);
    c.stop().await;
}

#[tokio::test]
async fn a_leaving_worker_ends_its_world_without_a_failure_and_the_run_reforms_from_its_checkpoint()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start(&dir.path().join("c.db")).await;
    // No restarts allowed: a leave must not count as one.
    let id = submit(&c, spec_with("leave", &["max_restarts=0"])).await;
    let mut a = SimWorker::register(&c, "a").await;
    let mut b = SimWorker::register(&c, "b").await;
    a.next_assignment().await;
    b.next_assignment().await;
    let world = a.world();
    a.checkpoint(1).await.expect("checkpoint");
    b.client
        .leave(LeaveRequest {
            worker_id: b.id.clone(),
            reason: "SIGTERM".into(),
        })
        .await
        .expect("leave");
    let (action, reason) = a.heartbeat().await.expect("heartbeat");
    assert_eq!(action, WorkerAction::Abort as i32, "{reason}");
    let run = get(&c, &id).await;
    assert_eq!(run.state, RunState::Running as i32, "{}", run.message);
    let ended = &run.attempts[0];
    assert!(!ended.failed, "{ended:?}");
    assert!(
        ended.end_reason.contains(&b.id) && ended.end_reason.contains("left: SIGTERM"),
        "{}",
        ended.end_reason
    );
    // The one who left is gone; a newcomer and the one who stayed re-form
    // the run from the checkpoint committed before the leave.
    let gone = b.heartbeat().await.expect_err("b left");
    assert_eq!(gone.code(), tonic::Code::NotFound, "{gone}");
    let mut newcomer = SimWorker::register(&c, "c").await;
    let (again, joined) = (a.next_assignment().await, newcomer.next_assignment().await);
    assert_eq!(again.world_id, joined.world_id);
    assert_ne!(again.world_id, world);
    let from = again.start_checkpoint.expect("a start checkpoint");
    assert_eq!((from.phase_index, from.step), (0, 1));
    c.stop().await;
}

#[tokio::test]
async fn failures_reform_the_world_elastically_until_max_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start(&dir.path().join("c.db")).await;
    // Two ranks wanted, one enough after a failure; one restart allowed.
    let id = submit(
        &c,
        spec_with("elastic", &["min_world_size=1", "max_restarts=1"]),
    )
    .await;
    let mut a = SimWorker::register(&c, "a").await;
    let mut b = SimWorker::register(&c, "b").await;
    a.next_assignment().await;
    b.next_assignment().await;
    let world = a.world();
    let ack = b
        .client
        .report_failure(ReportFailureRequest {
            worker_id: b.id.clone(),
            world_id: world.clone(),
            message: "out of memory".into(),
            ..Default::default()
        })
        .await
        .expect("failure")
        .into_inner();
    assert_eq!(ack.action, WorkerAction::Abort as i32);
    // Both are free again and re-form a world of two.
    let (a2, b2) = (a.next_assignment().await, b.next_assignment().await);
    assert_eq!(a2.world_id, b2.world_id);
    assert_ne!(a2.world_id, world);
    // Now b leaves for good; with min_world_size 1 the world goes on with a
    // alone... but that would be a second failure, beyond max_restarts 1.
    b.client
        .report_failure(ReportFailureRequest {
            worker_id: b.id.clone(),
            world_id: b2.world_id.clone(),
            message: "disk full".into(),
            ..Default::default()
        })
        .await
        .expect("failure");
    let run = get(&c, &id).await;
    assert_eq!(run.state, RunState::Failed as i32);
    assert!(
        run.message.contains("max_restarts 1") && run.message.contains("disk full"),
        "{}",
        run.message
    );
    c.stop().await;

    // With min_world_size 1, a lone survivor carries the run on when its
    // peer dies and no replacement is there.
    let dir = tempfile::tempdir().expect("tempdir");
    let leases = fast_leases();
    let c = Coordinator::start_with(ServerConfig {
        tls: None,
        db: dir.path().join("c.db"),
        user_token: None,
        worker_token: None,
        leases,
    })
    .await;
    let id = submit(&c, spec_with("shrink", &["min_world_size=1"])).await;
    let mut a = SimWorker::register(&c, "a").await;
    let mut b = SimWorker::register(&c, "b").await;
    let before = a.next_assignment().await;
    b.next_assignment().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (action, _) = a.heartbeat().await.expect("heartbeat");
        if action == WorkerAction::Abort as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "b was never declared dead");
        tokio::time::sleep(leases.heartbeat_interval).await;
    }
    let alone = a.next_assignment().await;
    assert_ne!(alone.world_id, before.world_id);
    assert_eq!((alone.world_size, alone.rank), (1, 0));
    assert_eq!(get(&c, &id).await.attempts.len(), 2);
    c.stop().await;
}

#[tokio::test]
async fn a_restarted_coordinator_keeps_runs_leases_checkpoints_and_progress() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("c.db");
    let c = Coordinator::start(&db).await;
    let id = submit(&c, tiny_spec("durable")).await;
    let pending = submit(&c, spec_with("waiting", &["world_size=4"])).await;
    let mut a = SimWorker::register(&c, "a").await;
    let mut b = SimWorker::register(&c, "b").await;
    let first = a.next_assignment().await;
    b.next_assignment().await;
    a.progress(2, 2.5).await;
    a.checkpoint(2).await.expect("checkpoint");
    let before = get(&c, &id).await;
    // Abrupt stop: no graceful shutdown of the server task.
    let c = c.crash_and_restart().await;
    let after = get(&c, &id).await;
    assert_eq!(after, before, "the whole run record survives");
    assert_eq!(after.state, RunState::Running as i32);
    assert_eq!(after.checkpoints.len(), 1);
    assert_eq!(after.phases[0].loss, 2.5);
    assert_eq!(get(&c, &pending).await.state, RunState::Pending as i32);
    // Workers' leases survive: they carry on in the same world.
    // Clients reconnect on their own: the same channel works again.
    let mut retries = 0;
    let (action, _) = loop {
        match a.heartbeat().await {
            Ok(reply) => break reply,
            Err(e) if e.code() == tonic::Code::Unavailable && retries < 50 => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("lease kept: {e}"),
        }
    };
    assert_eq!(action, WorkerAction::Continue as i32);
    let mut a_client = c.workers().await;
    let resumed = a_client
        .get_assignment(GetAssignmentRequest {
            worker_id: a.id.clone(),
            known_assignment_id: String::new(),
            wait_ms: 1000,
        })
        .await
        .expect("assignment")
        .into_inner()
        .assignment
        .expect("still assigned");
    assert_eq!(resumed.world_id, first.world_id);
    assert_eq!(resumed.first_step, 2);
    // New ids do not collide with the old ones.
    let newer = submit(&c, tiny_spec("after-restart")).await;
    assert!(newer != id && newer != pending);
    c.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_submissions_all_land_with_distinct_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start(&dir.path().join("c.db")).await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let client = c.runs().await;
        tasks.push(tokio::spawn(async move {
            let mut client = client;
            client
                .submit_run(SubmitRunRequest {
                    spec: Some(tiny_spec(&format!("r{i}"))),
                })
                .await
                .expect("submit")
                .into_inner()
                .run_id
        }));
    }
    let mut ids = HashSet::new();
    for task in tasks {
        ids.insert(task.await.expect("task"));
    }
    assert_eq!(ids.len(), 50);
    let listed = c
        .runs()
        .await
        .list_runs(ListRunsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .runs;
    assert_eq!(listed.len(), 50);
    let names: HashSet<String> = listed
        .iter()
        .filter_map(|r| r.spec.as_ref().map(|s| s.name.clone()))
        .collect();
    assert_eq!(names.len(), 50);
    c.stop().await;
    let c = Coordinator::start(&dir.path().join("c.db")).await;
    let listed = c
        .runs()
        .await
        .list_runs(ListRunsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .runs;
    assert_eq!(listed.len(), 50, "all durable");
    c.stop().await;
}

#[tokio::test]
async fn cancelling_a_running_run_frees_its_workers_for_the_next() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start(&dir.path().join("c.db")).await;
    let first = submit(&c, tiny_spec("first")).await;
    let second = submit(&c, tiny_spec("second")).await;
    let mut a = SimWorker::register(&c, "a").await;
    let mut b = SimWorker::register(&c, "b").await;
    assert_eq!(a.next_assignment().await.run_id, first);
    b.next_assignment().await;
    c.runs()
        .await
        .cancel_run(CancelRunRequest {
            run_id: first.clone(),
            reason: String::new(),
        })
        .await
        .expect("cancel");
    let (action, reason) = a.heartbeat().await.expect("heartbeat");
    assert_eq!(action, WorkerAction::Abort as i32);
    assert!(reason.contains("cancelled"), "{reason}");
    assert_eq!(a.next_assignment().await.run_id, second);
    assert_eq!(b.next_assignment().await.run_id, second);
    wait_until(
        "the second run to run",
        Duration::from_secs(2),
        async || get(&c, &second).await.state == RunState::Running as i32,
    )
    .await;
    c.stop().await;
}

#[tokio::test]
async fn an_unusable_checkpoint_is_dropped_and_the_run_steps_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start(&dir.path().join("c.db")).await;
    let id = submit(&c, tiny_spec("steps-back")).await;
    let mut a = SimWorker::register(&c, "a").await;
    let mut b = SimWorker::register(&c, "b").await;
    a.next_assignment().await;
    b.next_assignment().await;
    a.checkpoint(2).await.expect("mid-phase checkpoint");
    a.checkpoint(3).await.expect("phase end");
    assert_eq!(get(&c, &id).await.phase_index, 1);
    let bad = get(&c, &id).await.checkpoints[1].url.clone();
    let next = a.next_assignment().await;
    a.client
        .report_failure(ReportFailureRequest {
            worker_id: a.id.clone(),
            world_id: next.world_id.clone(),
            message: "checkpoint unreadable".into(),
            bad_checkpoint: bad.clone(),
            ..Default::default()
        })
        .await
        .expect("failure");
    let run = get(&c, &id).await;
    assert_eq!(
        run.phase_index, 0,
        "back in the phase of the dropped checkpoint"
    );
    assert_eq!(run.checkpoints.len(), 1);
    assert_eq!(run.phases[0].finished_ms, 0);
    assert_eq!(run.phases[0].steps_done, 2);
    // Both ranks ask for work again (a world waits for the members of a
    // failed one).
    let (again, _) = tokio::join!(a.next_assignment(), b.next_assignment());
    assert_ne!(again.world_id, next.world_id);
    assert_eq!((again.phase_index, again.first_step), (0, 2));
    assert_eq!(again.start_checkpoint.map(|c| c.step), Some(2));
    c.stop().await;
}

#[tokio::test]
async fn held_out_evaluations_are_kept_in_order_per_step_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("c.db");
    let c = Coordinator::start(&db).await;
    let id = submit(&c, tiny_spec("evals")).await;
    let mut a = SimWorker::register(&c, "a").await;
    let mut b = SimWorker::register(&c, "b").await;
    a.next_assignment().await;
    b.next_assignment().await;
    let (mut rank0, mut rank1) = if a.assignment.as_ref().map(|x| x.rank) == Some(0) {
        (a, b)
    } else {
        (b, a)
    };
    for (step, loss) in [(2, 3.0), (1, 3.5), (2, 2.9)] {
        let ack = rank0.eval(step, loss, "").await.expect("eval accepted");
        assert_eq!(ack.action, WorkerAction::Continue as i32);
    }
    // Rank 1's report is not the world's: ignored.
    rank1.eval(3, 9.9, "").await.expect("rank 1 answered");
    rank0
        .eval(3, 0.0, "phase `pretrain` has no held-out rows")
        .await
        .expect("a failed evaluation is recorded");
    let past = rank0.eval(99, 1.0, "").await.expect_err("past the phase");
    assert_eq!(past.code(), tonic::Code::InvalidArgument);
    assert!(past.message().contains("eval.step"), "{}", past.message());
    let nan = rank0.eval(1, f64::NAN, "").await.expect_err("NaN loss");
    assert_eq!(nan.code(), tonic::Code::InvalidArgument);

    let run = get(&c, &id).await;
    let seen: Vec<(u64, f64, &str)> = run
        .evals
        .iter()
        .map(|e| (e.step, e.loss, e.error.as_str()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (1, 3.5, ""),
            (2, 2.9, ""),
            (3, 0.0, "phase `pretrain` has no held-out rows")
        ]
    );
    assert!(run.evals.iter().all(|e| e.world_id == rank0.world()));
    assert!(run.evals.iter().all(|e| e.time_ms > 0));
    let progress = c
        .runs()
        .await
        .get_progress(twinhead_proto::v1::GetProgressRequest {
            run_id: id.clone(),
            max_points: 0,
        })
        .await
        .expect("progress")
        .into_inner();
    assert_eq!(progress.evals, run.evals);

    let c = c.crash_and_restart().await;
    assert_eq!(get(&c, &id).await.evals, run.evals);
    c.stop().await;
}

/// Scores sent back for a checkpoint evaluation.
fn scores(task: &str, acc: f64) -> Vec<twinhead_proto::v1::TaskScore> {
    vec![twinhead_proto::v1::TaskScore {
        task: task.into(),
        primary_metric: "acc_raw".into(),
        metrics: [("acc_raw".to_string(), acc)].into_iter().collect(),
        docs: 20,
    }]
}

#[tokio::test]
async fn checkpoints_are_scored_by_free_workers_handed_on_when_one_leaves_and_kept_across_a_restart()
 {
    use twinhead_proto::v1::{CheckpointEvalState, ReportCheckpointEvalRequest};
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("c.db");
    let c = Coordinator::start(&db).await;
    // Tasks on phase ends and on checkpoints crossing 2,000 tokens
    // (SimWorker's checkpoints are 1,000 tokens a step).
    let id = submit(
        &c,
        spec_with(
            "scored",
            &[
                r#"eval.tasks=["arc_easy"]"#,
                "eval.limit=20",
                "eval.at=2000",
            ],
        ),
    )
    .await;
    let mut a = SimWorker::register(&c, "a").await;
    let mut b = SimWorker::register(&c, "b").await;
    a.next_assignment().await;
    b.next_assignment().await;
    let mut rank0 = if a.assignment.as_ref().map(|x| x.rank) == Some(0) {
        a
    } else {
        b
    };
    let mut spare = SimWorker::register(&c, "spare").await;
    rank0.checkpoint(1).await.expect("checkpoint 1");
    assert!(
        get(&c, &id).await.checkpoint_evals.is_empty(),
        "1,000 tokens: not due"
    );
    rank0.checkpoint(2).await.expect("checkpoint 2");

    // The spare worker gets the job, not a world.
    let job = spare.next_assignment().await;
    let eval = job
        .checkpoint_eval
        .clone()
        .expect("a checkpoint evaluation");
    assert_eq!(eval.eval_id, "eval-1");
    assert_eq!(eval.checkpoint.as_ref().map(|c| c.step), Some(2));
    assert!(job.world_id.is_empty());
    assert_eq!(
        job.spec
            .as_ref()
            .and_then(|s| s.eval.as_ref())
            .map(|e| e.task_limit),
        Some(20)
    );
    let report =
        |worker: &SimWorker, eval_id: &str, scores, error: &str| ReportCheckpointEvalRequest {
            worker_id: worker.id.clone(),
            run_id: id.clone(),
            eval_id: eval_id.into(),
            scores,
            error: error.into(),
        };
    // Only the holder may report, and only finite numbers.
    let stranger = rank0
        .client
        .report_checkpoint_eval(report(&rank0, "eval-1", scores("arc_easy", 0.5), ""))
        .await
        .expect_err("rank 0 does not hold it");
    assert_eq!(stranger.code(), tonic::Code::FailedPrecondition);
    let nan = spare
        .client
        .report_checkpoint_eval(report(&spare, "eval-1", scores("arc_easy", f64::NAN), ""))
        .await
        .expect_err("NaN");
    assert_eq!(nan.code(), tonic::Code::InvalidArgument);
    spare
        .client
        .report_checkpoint_eval(report(&spare, "eval-1", scores("arc_easy", 0.4), ""))
        .await
        .expect("scores recorded");
    let run = get(&c, &id).await;
    let first = &run.checkpoint_evals[0];
    assert_eq!(first.state, CheckpointEvalState::Done as i32);
    assert_eq!(first.worker_id, spare.id);
    assert_eq!(first.scores, scores("arc_easy", 0.4));

    // The phase end queues the next; its worker leaves with it.
    rank0.checkpoint(3).await.expect("phase end");
    let job = spare.next_assignment().await;
    assert_eq!(
        job.checkpoint_eval.as_ref().map(|e| e.eval_id.as_str()),
        Some("eval-2")
    );
    spare
        .client
        .leave(LeaveRequest {
            worker_id: spare.id.clone(),
            reason: "pre-empted".into(),
        })
        .await
        .expect("leave");
    let run = get(&c, &id).await;
    assert_eq!(
        run.checkpoint_evals[1].state,
        CheckpointEvalState::Pending as i32
    );
    assert_eq!(run.state, RunState::Running as i32, "training is untouched");
    let mut next = SimWorker::register(&c, "next").await;
    let job = next.next_assignment().await;
    assert_eq!(
        job.checkpoint_eval.as_ref().map(|e| e.eval_id.as_str()),
        Some("eval-2")
    );

    // The coordinator restarts while the job is out; its worker reports to
    // the new one, and a failure is recorded without touching the run.
    let c = c.crash_and_restart().await;
    let mut retries = 0;
    loop {
        let sent = next
            .client
            .report_checkpoint_eval(report(
                &next,
                "eval-2",
                Vec::new(),
                "no task folder arc_easy",
            ))
            .await;
        match sent {
            Ok(_) => break,
            Err(e)
                if matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Cancelled)
                    && retries < 50 =>
            {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("report after the restart: {e}"),
        }
    }
    let run = get(&c, &id).await;
    let second = &run.checkpoint_evals[1];
    assert_eq!(second.state, CheckpointEvalState::Failed as i32);
    assert_eq!(second.tries, 2);
    assert_eq!(second.error, "no task folder arc_easy");
    assert_eq!(run.state, RunState::Running as i32);
    c.stop().await;
}
