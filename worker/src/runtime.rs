//! The worker process's life with the coordinator: register, renew the
//! lease, long-poll for assignments, meet the world's other ranks through
//! the rendezvous, hand each assignment to the trainer, and relay what the
//! trainer reports. Training runs on its own thread; this side is async.
//!
//! ```text
//!   register ──► heartbeat task (lease; ABORT interrupts the collective)
//!      │
//!      └─► GetAssignment (long poll) ──► new world? rendezvous → collective
//!                 ▲                              │
//!                 └──── phase done / aborted ◄── trainer thread ──► progress,
//!                                                                  checkpoints
//! ```
//!
//! A coordinator that restarts is waited for: calls are retried while it is
//! unreachable, and its restart keeps this worker's id and lease. A worker
//! that was declared dead registers again under a new id.
//!
//! A worker asked to leave (SIGTERM, or Slurm's pre-emption SIGUSR1) does
//! not drop its step: the request rides on the step's all-reduce, so every
//! rank of the world stops after the same step, rank 0 commits and reports
//! a checkpoint there, and the leaving worker calls `Leave`. The coordinator
//! ends the world without counting a failure; the others wait for that and
//! stay available for the next world, which starts from that checkpoint.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};
use twinhead_proto::auth::Bearer;
use twinhead_proto::v1::worker_service_client::WorkerServiceClient;
use twinhead_proto::v1::{
    Assignment, Checkpoint, EvalPoint, GetAssignmentRequest, HeartbeatRequest, LeaveRequest,
    RegisterRequest, RendezvousRequest, ReportCheckpointEvalRequest, ReportCheckpointRequest,
    ReportEvalRequest, ReportFailureRequest, ReportProgressRequest, TaskScore, WorkerAction,
};

use twinhead_model::objectives::ObjectiveError;

use crate::checkpoint::CheckpointError;
use crate::collective::{
    AbortHandle, Collective, CollectiveError, CpuRingEngine, RingConfig, SingleProcess,
};
use crate::loader::LoaderError;
use crate::optim::OptimError;

/// How long a leaving worker keeps trying to reach the coordinator, for
/// its last checkpoint's report and for the leave itself: with the
/// coordinator down it exits within a few seconds, its checkpoint committed
/// on storage (the run resumes from the last checkpoint it reported).
const LEAVE_GRACE: Duration = Duration::from_secs(1);

/// Tries of a held-out evaluation report, a second apart.
const EVAL_REPORT_TRIES: usize = 5;

/// How a worker reaches the coordinator and its peers.
#[derive(Clone)]
pub struct WorkerConfig {
    /// Coordinator URL, e.g. `http://127.0.0.1:50051` or `https://…`.
    pub coordinator: String,
    /// Bearer token for the worker API.
    pub token: Option<String>,
    /// CA to trust and client certificate to present over `https://`.
    pub tls: twinhead_proto::tls::ClientTls,
    /// "cpu" or "cuda:N".
    pub device: String,
    pub hostname: String,
    /// Addresses and timeouts of the CPU collective.
    pub ring: RingConfig,
    /// Stop after the first run this worker trains ends (tests, demos).
    pub exit_when_idle: bool,
    /// How long a step may run on after its world has ended before the
    /// worker gives up on it and exits with [`WorkerError::Hung`] (a
    /// deadlock, a stuck device): the coordinator already forms worlds
    /// without it; exiting lets a supervisor restart it.
    pub abort_grace: Duration,
}

impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: say whether there is one, never what it is.
        f.debug_struct("WorkerConfig")
            .field("coordinator", &self.coordinator)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("tls", &self.tls)
            .field("device", &self.device)
            .field("hostname", &self.hostname)
            .field("ring", &self.ring)
            .field("exit_when_idle", &self.exit_when_idle)
            .field("abort_grace", &self.abort_grace)
            .finish()
    }
}

/// Why a worker stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("invalid coordinator URL {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("the coordinator refused this worker: {0}")]
    Refused(String),
    #[error("the trainer thread panicked: {0}")]
    TrainerPanicked(String),
    #[error(
        "the training step has not stopped {seconds:.1}s after world {world} ended ({reason}); \
         exiting so that this worker can be restarted"
    )]
    Hung {
        world: String,
        reason: String,
        seconds: f64,
    },
}

/// How a worker's life ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// Shut down, or idle after its run (`exit_when_idle`).
    Stopped,
    /// Asked to leave: its world committed a checkpoint first (when it had
    /// one) and the coordinator was told. A scheduler may requeue it.
    Left,
}

/// How a phase ended on this rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PhaseEnd {
    /// The assignment's last step is trained (and, on rank 0, its
    /// checkpoint committed and reported).
    Finished,
    /// A rank asked to leave: the world stopped after `step` steps of the
    /// phase, whose checkpoint rank 0 committed and reported.
    Stopped { step: u64 },
    /// The coordinator or a peer ended the world.
    Aborted(String),
}

/// A training failure; the world is reported failed and re-formed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The assignment's run spec cannot be trained (a part missing or
    /// invalid); names the key.
    #[error("run spec: {0}")]
    Spec(String),
    #[error("collective: {0}")]
    Collective(#[from] CollectiveError),
    /// The dataset, its rows or the data-order log.
    #[error("data: {0}")]
    Data(#[from] LoaderError),
    /// Writing or reading a checkpoint.
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("optimizer: {0}")]
    Optimizer(#[from] OptimError),
    /// A batch the model or the objective refused.
    #[error("batch: {0}")]
    Objective(#[from] ObjectiveError),
    #[error("aborted: {0}")]
    Aborted(String),
    /// The checkpoint to start from cannot be used; the coordinator drops
    /// it and the world restarts from the one before.
    #[error("checkpoint {url} is unusable: {message}")]
    BadCheckpoint { url: String, message: String },
    #[error("{0}")]
    Failed(String),
}

impl TrainError {
    /// Whether a retry cannot fix it: a spec, data or optimizer state that
    /// is wrong, or a store that refuses the credentials. The run fails at
    /// once instead of burning its restarts.
    pub fn permanent(&self) -> bool {
        match self {
            TrainError::Spec(_) | TrainError::Optimizer(_) | TrainError::Objective(_) => true,
            TrainError::Data(e) => match e {
                LoaderError::Store(store) => !store.is_transient(),
                LoaderError::PrefetchStopped { .. } | LoaderError::OrderLog { .. } => false,
                _ => true,
            },
            TrainError::Checkpoint(CheckpointError::Store(store)) => !store.is_transient(),
            TrainError::Checkpoint(_)
            | TrainError::Collective(_)
            | TrainError::Aborted(_)
            | TrainError::BadCheckpoint { .. }
            | TrainError::Failed(_) => false,
        }
    }
}

/// The training side of a worker. It runs on a thread of its own and talks
/// to the coordinator only through the [`Link`].
pub trait Trainer: Send + 'static {
    /// Trains steps `first_step..=last_step` of the assignment's phase with
    /// the world's collective. Returns when the last step is done, when
    /// [`Link::aborted`] says so, or with an error.
    fn train(
        &mut self,
        assignment: &Assignment,
        collective: &mut dyn Collective,
        link: &Link,
    ) -> Result<PhaseEnd, TrainError>;

    /// Scores the run's tasks (`spec.eval.tasks`) on the committed
    /// checkpoint of a `checkpoint_eval` assignment, outside any world.
    /// The error says why it could not; the coordinator records it as the
    /// evaluation's failure, and the run goes on.
    fn evaluate_checkpoint(&mut self, assignment: &Assignment) -> Result<Vec<TaskScore>, String> {
        let _ = assignment;
        Err("this worker cannot score tasks".into())
    }
}

/// A progress report from the trainer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub step: u64,
    pub tokens: u64,
    pub loss: f64,
    pub tokens_per_sec: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub mfu: f64,
}

enum LinkMessage {
    Progress(Progress),
    Eval(EvalPoint),
    Checkpoint(Checkpoint, oneshot::Sender<Result<(), TrainError>>),
}

/// The trainer's line to the coordinator, usable from a plain thread.
pub struct Link {
    messages: mpsc::UnboundedSender<LinkMessage>,
    abort: Arc<AbortState>,
    leave: watch::Receiver<bool>,
    /// This worker's rank in the world.
    rank: u32,
}

impl Link {
    /// Why the world ended, once it has.
    pub fn aborted(&self) -> Option<String> {
        self.abort.reason()
    }

    /// The check a checkpoint of this world passes just before its
    /// `COMMITTED` marker: the world is still the live one, not aborted,
    /// and this worker's lease has not lapsed. A worker stopped (SIGSTOP, a
    /// hung host) in the middle of a write and continued after its world
    /// was re-formed therefore does not commit a checkpoint the
    /// coordinator never hears of.
    pub fn commit_fence(&self) -> crate::checkpoint::Fence {
        let abort = self.abort.clone();
        let world = abort.world();
        Arc::new(move || {
            if abort.world() != world {
                return Err(format!("world {world} has ended"));
            }
            if let Some(reason) = abort.reason() {
                return Err(format!("world {world} was aborted: {reason}"));
            }
            abort.lease_lapsed().map_or(Ok(()), Err)
        })
    }

    /// Whether this worker was asked to leave: the trainer stops the whole
    /// world after the current step, with a checkpoint.
    pub fn leave_requested(&self) -> bool {
        *self.leave.borrow()
    }

    /// Sends a progress report without waiting for it, from rank 0 only.
    /// Rank 0's reports make the run's curve and the coordinator checks and
    /// drops the others': at fleet scale they were seven calls in eight of
    /// every world's reports, load and nothing else. Every rank still learns
    /// of an abort from its heartbeats.
    pub fn progress(&self, progress: Progress) {
        if self.rank == 0 {
            let _ = self.messages.send(LinkMessage::Progress(progress));
        }
    }

    /// Sends a held-out evaluation (rank 0's) without waiting for it.
    pub fn eval(&self, point: EvalPoint) {
        let _ = self.messages.send(LinkMessage::Eval(point));
    }

    /// Reports a committed checkpoint and waits until the coordinator has
    /// recorded it (retrying while the coordinator is unreachable).
    pub fn checkpoint(&self, checkpoint: Checkpoint) -> Result<(), TrainError> {
        let (done, answer) = oneshot::channel();
        self.messages
            .send(LinkMessage::Checkpoint(checkpoint, done))
            .map_err(|_| TrainError::Failed("the worker's coordinator link has closed".into()))?;
        answer
            .blocking_recv()
            .map_err(|_| TrainError::Failed("the worker's coordinator link has closed".into()))?
    }
}

/// The abort flag shared by the heartbeat task, the link and the collective.
#[derive(Default)]
struct AbortState {
    aborted: AtomicBool,
    reason: Mutex<Option<String>>,
    /// The live world and the handle that interrupts its collective.
    world: Mutex<Option<(String, Option<AbortHandle>)>>,
    /// When the last heartbeat (or the registration) the coordinator
    /// answered was sent, and the lease it grants; see [`AbortState::lease_lapsed`].
    lease: Mutex<Option<(Instant, Duration)>>,
}

impl AbortState {
    /// Records that the coordinator answered a call sent at `sent`.
    fn acknowledged(&self, sent: Instant, lease: Duration) {
        let mut slot = lock(&self.lease);
        if slot.is_none_or(|(last, _)| sent > last) {
            *slot = Some((sent, lease));
        }
    }

    /// Why this worker can no longer be sure the coordinator counts it
    /// alive: no call it sent in the last lease period was answered (it was
    /// stopped, or cut off, for that long), so its world may already have
    /// been re-formed without it.
    fn lease_lapsed(&self) -> Option<String> {
        let (sent, lease) = (*lock(&self.lease))?;
        let silent = sent.elapsed();
        (silent >= lease).then(|| {
            format!(
                "no heartbeat answered for {:.1}s, the lease is {:.1}s",
                silent.as_secs_f64(),
                lease.as_secs_f64()
            )
        })
    }

    fn reason(&self) -> Option<String> {
        if !self.aborted.load(Ordering::Acquire) {
            return None;
        }
        Some(
            lock(&self.reason)
                .clone()
                .unwrap_or_else(|| "aborted".into()),
        )
    }

    fn world(&self) -> String {
        lock(&self.world)
            .as_ref()
            .map(|(w, _)| w.clone())
            .unwrap_or_default()
    }

    /// Enters a new world: clears the flag.
    fn enter(&self, world_id: &str) {
        *lock(&self.world) = Some((world_id.to_string(), None));
        *lock(&self.reason) = None;
        self.aborted.store(false, Ordering::Release);
    }

    fn set_handle(&self, handle: AbortHandle) {
        if let Some((_, slot)) = lock(&self.world).as_mut() {
            *slot = Some(handle.clone());
        }
        if self.aborted.load(Ordering::Acquire) {
            handle.abort();
        }
    }

    fn leave(&self) {
        *lock(&self.world) = None;
    }

    /// Ends `world_id` (if it is the live one): flag, reason, and interrupt
    /// whatever collective call is blocked.
    fn abort(&self, world_id: &str, reason: &str) {
        let world = lock(&self.world);
        let Some((live, handle)) = world.as_ref() else {
            return;
        };
        if live != world_id {
            return;
        }
        let mut slot = lock(&self.reason);
        if slot.is_none() {
            *slot = Some(reason.to_string());
        }
        self.aborted.store(true, Ordering::Release);
        if let Some(handle) = handle {
            handle.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

type Client = WorkerServiceClient<InterceptedService<Channel, Bearer>>;

/// Whether a failed call should be retried: the coordinator is restarting
/// or the network hiccuped.
fn transient(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Internal
    )
}

const RETRY: Duration = Duration::from_millis(250);

/// Runs a worker until `shutdown` resolves (abandoning any step in flight),
/// `leave` resolves (finishing the step, committing a checkpoint and leaving
/// the coordinator), or, with `exit_when_idle`, until its run has ended.
pub async fn run_worker(
    config: WorkerConfig,
    trainer: Box<dyn Trainer>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    leave: impl Future<Output = ()> + Send + 'static,
) -> Result<WorkerExit, WorkerError> {
    let bearer = Bearer::new(config.token.as_deref()).map_err(|e| WorkerError::Url {
        url: config.coordinator.clone(),
        message: e.to_string(),
    })?;
    let endpoint =
        twinhead_proto::tls::endpoint(&config.coordinator, &config.tls).map_err(|e| {
            WorkerError::Url {
                url: config.coordinator.clone(),
                message: e.to_string(),
            }
        })?;
    // Lazy: the coordinator may not be up yet; calls retry until it is.
    let client: Client = WorkerServiceClient::with_interceptor(endpoint.connect_lazy(), bearer);
    let stop = Arc::new(AtomicBool::new(false));
    let abort = Arc::new(AbortState::default());
    {
        let (stop, abort) = (stop.clone(), abort.clone());
        tokio::spawn(async move {
            shutdown.await;
            stop.store(true, Ordering::Release);
            let world = abort.world();
            abort.abort(&world, "worker shutting down");
        });
    }
    let (leave_tx, leave_rx) = watch::channel(false);
    tokio::spawn(async move {
        leave.await;
        tracing::info!("asked to leave: finishing the step and checkpointing");
        let _ = leave_tx.send(true);
        // Keep the sender: a dropped one would wake waiters spuriously.
        std::future::pending::<()>().await;
    });
    let mut trainer = Some(trainer);
    while !stop.load(Ordering::Acquire) {
        if *leave_rx.borrow() {
            // Never registered (or forgotten): nothing to hand over.
            return Ok(WorkerExit::Left);
        }
        let session = Session::register(
            &config,
            client.clone(),
            abort.clone(),
            stop.clone(),
            leave_rx.clone(),
        )
        .await?;
        let Some(session) = session else { break };
        match session.serve(&mut trainer).await? {
            SessionEnd::Stopped => break,
            SessionEnd::Left => return Ok(WorkerExit::Left),
            SessionEnd::Forgotten => {
                tracing::warn!("the coordinator no longer knows this worker; registering again");
            }
        }
    }
    Ok(WorkerExit::Stopped)
}

enum SessionEnd {
    Stopped,
    /// Asked to leave, and the coordinator was told.
    Left,
    /// The coordinator declared this worker dead or lost it: register again.
    Forgotten,
}

/// One registration of this worker with the coordinator.
struct Session<'a> {
    config: &'a WorkerConfig,
    client: Client,
    worker_id: String,
    abort: Arc<AbortState>,
    stop: Arc<AtomicBool>,
    leave: watch::Receiver<bool>,
    forgotten: Arc<AtomicBool>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl<'a> Session<'a> {
    async fn register(
        config: &'a WorkerConfig,
        mut client: Client,
        abort: Arc<AbortState>,
        stop: Arc<AtomicBool>,
        leave: watch::Receiver<bool>,
    ) -> Result<Option<Session<'a>>, WorkerError> {
        let request = RegisterRequest {
            hostname: config.hostname.clone(),
            device: config.device.clone(),
            pid: std::process::id(),
        };
        let mut waited = false;
        let (reply, registering) = loop {
            if stop.load(Ordering::Acquire) {
                return Ok(None);
            }
            let sent = Instant::now();
            match client.register(request.clone()).await {
                Ok(reply) => break (reply.into_inner(), sent),
                Err(s) if transient(&s) => {
                    if !waited {
                        let error = twinhead_proto::error_chain(&s);
                        match twinhead_proto::tls::hint(&config.coordinator, &error) {
                            Some(hint) => {
                                tracing::warn!(coordinator = %config.coordinator, %error, hint, "waiting for the coordinator")
                            }
                            None => {
                                tracing::info!(coordinator = %config.coordinator, %error, "waiting for the coordinator")
                            }
                        }
                        waited = true;
                    }
                    tokio::time::sleep(RETRY).await;
                }
                Err(s) => return Err(WorkerError::Refused(s.message().to_string())),
            }
        };
        let worker_id = reply.worker_id;
        tracing::info!(worker = %worker_id, "registered");
        let interval = Duration::from_millis(reply.heartbeat_interval_ms.max(10));
        // A coordinator that names no lease (0) is not fenced against.
        let lease = match reply.lease_timeout_ms {
            0 => Duration::MAX,
            ms => Duration::from_millis(ms),
        };
        abort.acknowledged(registering, lease);
        let forgotten = Arc::new(AtomicBool::new(false));
        let heartbeat = tokio::spawn(heartbeat(
            client.clone(),
            worker_id.clone(),
            interval,
            lease,
            abort.clone(),
            forgotten.clone(),
        ));
        Ok(Some(Session {
            config,
            client,
            worker_id,
            abort,
            stop,
            leave,
            forgotten,
            heartbeat,
        }))
    }

    fn ended(&self) -> Option<SessionEnd> {
        if self.stop.load(Ordering::Acquire) {
            Some(SessionEnd::Stopped)
        } else if self.forgotten.load(Ordering::Acquire) {
            Some(SessionEnd::Forgotten)
        } else {
            None
        }
    }

    async fn serve(
        self,
        trainer: &mut Option<Box<dyn Trainer>>,
    ) -> Result<SessionEnd, WorkerError> {
        let mut known = String::new();
        let mut world: Option<(String, Box<dyn Collective>)> = None;
        let mut trained_any = false;
        loop {
            if let Some(end) = self.ended() {
                return Ok(end);
            }
            if self.leave_requested() {
                // Idle, or between phases (whose end is committed).
                return Ok(self.leave("asked to stop between steps").await);
            }
            let assignment = match self.next_assignment(&known).await {
                Ok((Some(a), _)) => a,
                Ok((None, work_pending)) => {
                    if world.is_some() && self.abort.reason().is_some() {
                        // The world ended between phases (run completed,
                        // cancelled, or a peer died): let its collective go.
                        world = None;
                        self.abort.leave();
                        known.clear();
                    }
                    if self.config.exit_when_idle
                        && trained_any
                        && !work_pending
                        && world.is_none()
                        && !self.leave_requested()
                    {
                        // Deregister, so no run waits on a lease to expire.
                        self.deregister("idle after its run (--exit-when-idle)")
                            .await;
                        return Ok(SessionEnd::Stopped);
                    }
                    continue;
                }
                Err(end) => return Ok(end),
            };
            known = assignment.assignment_id.clone();
            if assignment.checkpoint_eval.is_some() {
                // Not a world's rank: any collective kept between phases
                // belongs to a world that has ended.
                world = None;
                self.abort.leave();
                trained_any = true;
                if let Some(end) = self.score_checkpoint(trainer, &assignment).await? {
                    return Ok(end);
                }
                continue;
            }
            if world
                .as_ref()
                .is_none_or(|(id, _)| *id != assignment.world_id)
            {
                world = None;
                self.abort.enter(&assignment.world_id);
                match self.join_world(&assignment).await {
                    Ok(collective) => world = Some((assignment.world_id.clone(), collective)),
                    Err(_) if self.leave_requested() => {
                        return Ok(self.leave("asked to stop while joining a world").await);
                    }
                    Err(e) => {
                        self.fail(
                            &assignment.world_id,
                            &format!("joining world {}: {e}", assignment.world_id),
                        )
                        .await;
                        self.abort.leave();
                        continue;
                    }
                }
            }
            let Some((world_id, collective)) = world.take() else {
                continue;
            };
            let Some(owned) = trainer.take() else {
                return Err(WorkerError::TrainerPanicked("the trainer was lost".into()));
            };
            tracing::info!(run = %assignment.run_id, world = %world_id, rank = assignment.rank, phase = assignment.phase_index, first = assignment.first_step, last = assignment.last_step, "training");
            trained_any = true;
            let (outcome, owned, collective) =
                self.train(owned, collective, assignment.clone()).await?;
            *trainer = Some(owned);
            match outcome {
                Ok(PhaseEnd::Finished) => {
                    world = Some((world_id, collective));
                }
                Ok(PhaseEnd::Stopped { step }) if self.leave_requested() => {
                    let reason = format!(
                        "asked to stop; phase {} checkpoint at step {step} committed",
                        assignment.phase_index
                    );
                    drop(collective);
                    return Ok(self.leave(&reason).await);
                }
                Ok(PhaseEnd::Stopped { step }) => {
                    // A peer is leaving: it ends the world once rank 0's
                    // checkpoint is recorded. Wait for that, so this worker
                    // is not handed the old world again.
                    tracing::info!(world = %world_id, step, "a peer is leaving; waiting for the world to end");
                    drop(collective);
                    while self.abort.reason().is_none() && self.ended().is_none() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    self.abort.leave();
                }
                Ok(PhaseEnd::Aborted(reason)) | Err(TrainError::Aborted(reason)) => {
                    tracing::warn!(world = %world_id, %reason, "world ended");
                    self.abort.leave();
                }
                Err(e) => {
                    tracing::error!(world = %world_id, error = %e, "training failed");
                    // The coordinator ends the world and tells the peers.
                    let bad = match &e {
                        TrainError::BadCheckpoint { url, .. } => url.clone(),
                        _ => String::new(),
                    };
                    self.fail_with(&world_id, &e.to_string(), &bad, e.permanent())
                        .await;
                    self.abort.leave();
                }
            }
            if world.is_none() {
                known.clear();
            }
        }
    }

    fn leave_requested(&self) -> bool {
        *self.leave.borrow()
    }

    /// Runs a checkpoint evaluation on a blocking thread and reports its
    /// scores (or why there are none). A stop or a leave request abandons
    /// it: the coordinator gives it to another worker.
    async fn score_checkpoint(
        &self,
        trainer: &mut Option<Box<dyn Trainer>>,
        assignment: &Assignment,
    ) -> Result<Option<SessionEnd>, WorkerError> {
        let Some(mut owned) = trainer.take() else {
            return Err(WorkerError::TrainerPanicked("the trainer was lost".into()));
        };
        let eval_id = assignment
            .checkpoint_eval
            .as_ref()
            .map(|j| j.eval_id.clone())
            .unwrap_or_default();
        tracing::info!(run = %assignment.run_id, eval = %eval_id, "scoring a checkpoint's tasks");
        let job = assignment.clone();
        let mut thread = tokio::task::spawn_blocking(move || {
            let result = owned.evaluate_checkpoint(&job);
            (result, owned)
        });
        let result = loop {
            tokio::select! {
                finished = &mut thread => {
                    let (result, owned) =
                        finished.map_err(|e| WorkerError::TrainerPanicked(e.to_string()))?;
                    *trainer = Some(owned);
                    break result;
                }
                _ = tokio::time::sleep(RETRY) => {
                    if let Some(end) = self.ended() {
                        return Ok(Some(end));
                    }
                    if self.leave_requested() {
                        return Ok(Some(self.leave("asked to stop while scoring a checkpoint").await));
                    }
                }
            }
        };
        let (scores, error) = match result {
            Ok(scores) => (scores, String::new()),
            Err(e) => {
                tracing::warn!(eval = %eval_id, error = %e, "checkpoint evaluation failed");
                (Vec::new(), e)
            }
        };
        let request = ReportCheckpointEvalRequest {
            worker_id: self.worker_id.clone(),
            run_id: assignment.run_id.clone(),
            eval_id,
            scores,
            error,
        };
        loop {
            match self
                .client
                .clone()
                .report_checkpoint_eval(request.clone())
                .await
            {
                Ok(_) => return Ok(None),
                Err(s) if transient(&s) => {
                    if let Some(end) = self.ended() {
                        return Ok(Some(end));
                    }
                    tokio::time::sleep(RETRY).await;
                }
                Err(s) => {
                    tracing::warn!(error = %s.message(), "checkpoint evaluation report refused");
                    return Ok(None);
                }
            }
        }
    }

    /// Leaves for good after a leave request.
    async fn leave(&self, reason: &str) -> SessionEnd {
        self.deregister(reason).await;
        SessionEnd::Left
    }

    /// Tells the coordinator this worker is gone (retrying while it is
    /// unreachable, until the lease would have ended it anyway).
    async fn deregister(&self, reason: &str) {
        let mut client = self.client.clone();
        let request = LeaveRequest {
            worker_id: self.worker_id.clone(),
            reason: reason.to_string(),
        };
        // Asked to leave, the process is on its way out: a few seconds, not
        // the half minute an idle worker may wait for a restarting
        // coordinator.
        let patience = if self.leave_requested() {
            LEAVE_GRACE
        } else {
            Duration::from_secs(30)
        };
        let give_up = tokio::time::Instant::now() + patience;
        loop {
            let left = tokio::time::timeout_at(give_up, client.leave(request.clone()))
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer in time")));
            match left {
                Ok(_) => {
                    tracing::info!(worker = %self.worker_id, %reason, "left the coordinator");
                    break;
                }
                Err(s) if transient(&s) && tokio::time::Instant::now() < give_up => {
                    tokio::time::sleep(RETRY).await;
                }
                Err(s) => {
                    tracing::warn!(error = %s.message(), "could not leave; the lease will end this worker");
                    break;
                }
            }
        }
        self.abort.leave();
    }

    /// The next assignment (none yet: ask again), and whether work of this
    /// worker's runs is still pending (unknown counts as pending).
    async fn next_assignment(&self, known: &str) -> Result<(Option<Assignment>, bool), SessionEnd> {
        let mut client = self.client.clone();
        let request = GetAssignmentRequest {
            worker_id: self.worker_id.clone(),
            known_assignment_id: known.to_string(),
            wait_ms: 10_000,
        };
        let mut leave = self.leave.clone();
        let reply = tokio::select! {
            reply = client.get_assignment(request) => reply,
            // An idle worker leaves at once rather than after the long poll.
            _ = leave.wait_for(|asked| *asked) => return Ok((None, true)),
        };
        match reply {
            Ok(reply) => {
                let reply = reply.into_inner();
                Ok((reply.assignment, reply.work_pending))
            }
            Err(s) if s.code() == Code::NotFound => Err(SessionEnd::Forgotten),
            Err(s) => {
                if transient(&s) {
                    tracing::debug!(error = %s.message(), "coordinator unreachable; retrying");
                } else {
                    tracing::warn!(error = %s.message(), "assignment request failed; retrying");
                }
                tokio::time::sleep(RETRY).await;
                Ok((None, true))
            }
        }
    }

    /// Builds the world's collective: rank 0 listens and publishes its
    /// token, the others fetch it and connect.
    async fn join_world(&self, a: &Assignment) -> Result<Box<dyn Collective>, String> {
        let (rank, size) = (a.rank as usize, a.world_size as usize);
        if size == 1 {
            return Ok(Box::new(SingleProcess::new()));
        }
        #[cfg(feature = "cuda")]
        if let crate::device::Device::Cuda(ordinal) =
            crate::device::Device::parse(&self.config.device)?
        {
            return self.join_nccl_world(a, ordinal).await;
        }
        let ring = self.config.ring.clone();
        if rank == 0 {
            let host = CpuRingEngine::host(size, ring).map_err(|e| e.to_string())?;
            self.abort.set_handle(host.abort_handle());
            self.rendezvous(&a.world_id, host.token().to_vec()).await?;
            let engine = tokio::task::spawn_blocking(move || host.accept())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            self.abort.set_handle(engine.abort_handle());
            return Ok(Box::new(engine));
        }
        let token = self.rendezvous(&a.world_id, Vec::new()).await?;
        let peer = CpuRingEngine::peer(rank, size, ring).map_err(|e| e.to_string())?;
        self.abort.set_handle(peer.abort_handle());
        let engine = tokio::task::spawn_blocking(move || peer.join(&token))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        self.abort.set_handle(engine.abort_handle());
        Ok(Box::new(engine))
    }

    /// Builds an NCCL world: rank 0 publishes a fresh unique id, every rank
    /// joins the communicator with it on its GPU.
    #[cfg(feature = "cuda")]
    async fn join_nccl_world(
        &self,
        a: &Assignment,
        ordinal: usize,
    ) -> Result<Box<dyn Collective>, String> {
        use crate::collective::NcclEngine;
        let (rank, size) = (a.rank as usize, a.world_size as usize);
        let token = if rank == 0 {
            let id = NcclEngine::unique_id().map_err(|e| e.to_string())?.to_vec();
            self.rendezvous(&a.world_id, id.clone()).await?;
            id
        } else {
            self.rendezvous(&a.world_id, Vec::new()).await?
        };
        let timeout = self.config.ring.op_timeout;
        let engine = tokio::task::spawn_blocking(move || {
            NcclEngine::new(ordinal, rank, size, &token, timeout)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        self.abort.set_handle(engine.abort_handle());
        Ok(Box::new(engine))
    }

    /// Publishes (non-empty `publish`) or waits for the world's token.
    async fn rendezvous(&self, world_id: &str, publish: Vec<u8>) -> Result<Vec<u8>, String> {
        let mut client = self.client.clone();
        loop {
            if let Some(reason) = self.abort.reason() {
                return Err(reason);
            }
            if self.leave_requested() {
                return Err("asked to leave".into());
            }
            let request = RendezvousRequest {
                worker_id: self.worker_id.clone(),
                world_id: world_id.to_string(),
                publish: publish.clone(),
                wait_ms: 2_000,
            };
            match client.rendezvous(request).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    if reply.ready {
                        return Ok(reply.token);
                    }
                }
                Err(s) if transient(&s) => tokio::time::sleep(RETRY).await,
                Err(s) => return Err(s.message().to_string()),
            }
        }
    }

    /// Runs the trainer on a blocking thread while relaying its reports.
    async fn train(
        &self,
        mut trainer: Box<dyn Trainer>,
        mut collective: Box<dyn Collective>,
        assignment: Assignment,
    ) -> Result<
        (
            Result<PhaseEnd, TrainError>,
            Box<dyn Trainer>,
            Box<dyn Collective>,
        ),
        WorkerError,
    > {
        let (messages, mut inbox) = mpsc::unbounded_channel();
        let link = Link {
            messages,
            abort: self.abort.clone(),
            leave: self.leave.clone(),
            rank: assignment.rank,
        };
        let job = assignment.clone();
        let mut thread = tokio::task::spawn_blocking(move || {
            let outcome = trainer.train(&job, collective.as_mut(), &link);
            (outcome, trainer, collective)
        });
        // When this worker first saw its world ended, for the grace period.
        let mut ended_at: Option<tokio::time::Instant> = None;
        let mut check = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                finished = &mut thread => {
                    // Relay what the trainer sent just before it returned.
                    while let Ok(message) = inbox.try_recv() {
                        self.relay(&assignment, message).await;
                    }
                    return finished.map_err(|e| WorkerError::TrainerPanicked(e.to_string()));
                }
                Some(message) = inbox.recv() => self.relay(&assignment, message).await,
                _ = check.tick() => {
                    let Some(reason) = self.abort.reason() else { continue };
                    let since = *ended_at.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= self.config.abort_grace {
                        return Err(WorkerError::Hung {
                            world: assignment.world_id.clone(),
                            reason,
                            seconds: self.config.abort_grace.as_secs_f64(),
                        });
                    }
                }
            }
        }
    }

    async fn relay(&self, a: &Assignment, message: LinkMessage) {
        let mut client = self.client.clone();
        match message {
            LinkMessage::Progress(p) => {
                let request = ReportProgressRequest {
                    worker_id: self.worker_id.clone(),
                    world_id: a.world_id.clone(),
                    phase_index: a.phase_index,
                    step: p.step,
                    tokens: p.tokens,
                    loss: p.loss,
                    tokens_per_sec: p.tokens_per_sec,
                    lr: p.lr,
                    grad_norm: p.grad_norm,
                    mfu: p.mfu,
                };
                // Progress is best effort: a coordinator that is restarting
                // misses a point of the curve, not a checkpoint.
                match client.report_progress(request).await {
                    Ok(ack) => {
                        let ack = ack.into_inner();
                        if ack.action == WorkerAction::Abort as i32 {
                            self.abort.abort(&a.world_id, &ack.reason);
                        }
                    }
                    Err(s) => tracing::debug!(error = %s.message(), "progress report lost"),
                }
            }
            LinkMessage::Eval(point) => self.report_eval(a, point).await,
            LinkMessage::Checkpoint(checkpoint, done) => {
                let result = self.report_checkpoint(a, checkpoint).await;
                let _ = done.send(result);
            }
        }
    }

    /// Reports a held-out evaluation, retrying a few times while the
    /// coordinator is unreachable: an evaluation is rarer and costlier
    /// than a progress point.
    async fn report_eval(&self, a: &Assignment, point: EvalPoint) {
        let request = ReportEvalRequest {
            worker_id: self.worker_id.clone(),
            world_id: a.world_id.clone(),
            eval: Some(point),
        };
        for attempt in 0..EVAL_REPORT_TRIES {
            if attempt > 0 {
                if self.leave_requested() {
                    // Leaving: the checkpoint report behind it matters more.
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            match self.client.clone().report_eval(request.clone()).await {
                Ok(ack) => {
                    let ack = ack.into_inner();
                    if ack.action == WorkerAction::Abort as i32 {
                        self.abort.abort(&a.world_id, &ack.reason);
                    }
                    return;
                }
                Err(s) if transient(&s) => continue,
                Err(s) => {
                    tracing::warn!(error = %s.message(), "held-out evaluation report refused");
                    return;
                }
            }
        }
        tracing::warn!("held-out evaluation report lost: the coordinator is unreachable");
    }

    async fn report_checkpoint(
        &self,
        a: &Assignment,
        checkpoint: Checkpoint,
    ) -> Result<(), TrainError> {
        let mut client = self.client.clone();
        let mut leaving_since: Option<tokio::time::Instant> = None;
        loop {
            let request = ReportCheckpointRequest {
                worker_id: self.worker_id.clone(),
                world_id: a.world_id.clone(),
                checkpoint: Some(checkpoint.clone()),
            };
            if self.leave_requested() {
                let since = *leaving_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= LEAVE_GRACE {
                    tracing::warn!(checkpoint = %checkpoint.url, "committed but not reported: the coordinator is unreachable and this worker is leaving; the run resumes from the last checkpoint it knows");
                    return Ok(());
                }
            }
            let call = client.report_checkpoint(request);
            let answer = if self.leave_requested() {
                match tokio::time::timeout(LEAVE_GRACE, call).await {
                    Ok(answer) => answer,
                    Err(_) => Err(Status::unavailable("no answer while leaving")),
                }
            } else {
                call.await
            };
            match answer {
                Ok(ack) => {
                    let ack = ack.into_inner();
                    if ack.action == WorkerAction::Abort as i32 {
                        self.abort.abort(&a.world_id, &ack.reason);
                        return Err(TrainError::Aborted(ack.reason));
                    }
                    return Ok(());
                }
                Err(s) if transient(&s) => {
                    if let Some(reason) = self.abort.reason() {
                        return Err(TrainError::Aborted(reason));
                    }
                    tokio::time::sleep(RETRY).await;
                }
                Err(s) => {
                    return Err(TrainError::Failed(format!(
                        "checkpoint report refused: {}",
                        s.message()
                    )));
                }
            }
        }
    }

    async fn fail(&self, world_id: &str, message: &str) {
        self.fail_with(world_id, message, "", false).await;
    }

    async fn fail_with(
        &self,
        world_id: &str,
        message: &str,
        bad_checkpoint: &str,
        permanent: bool,
    ) {
        let mut client = self.client.clone();
        let request = ReportFailureRequest {
            worker_id: self.worker_id.clone(),
            world_id: world_id.to_string(),
            message: message.to_string(),
            bad_checkpoint: bad_checkpoint.to_string(),
            permanent,
        };
        if let Err(s) = client.report_failure(request).await {
            tracing::warn!(error = %s.message(), "could not report the failure; the lease will end the world");
        }
    }
}

/// Renews the lease; an ABORT for the live world interrupts training.
async fn heartbeat(
    mut client: Client,
    worker_id: String,
    interval: Duration,
    lease: Duration,
    abort: Arc<AbortState>,
    forgotten: Arc<AtomicBool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let world_id = abort.world();
        let request = HeartbeatRequest {
            worker_id: worker_id.clone(),
            world_id: world_id.clone(),
        };
        let sent = Instant::now();
        match client.heartbeat(request).await {
            Ok(reply) => {
                abort.acknowledged(sent, lease);
                let reply = reply.into_inner();
                if reply.action == WorkerAction::Abort as i32 {
                    abort.abort(&world_id, &reply.reason);
                }
            }
            Err(s) if s.code() == Code::NotFound => {
                tracing::warn!(reason = %s.message(), "lease lost");
                abort.abort(&world_id, s.message());
                forgotten.store(true, Ordering::Release);
                return;
            }
            Err(s) => tracing::debug!(error = %s.message(), "heartbeat failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinhead_data::store::StoreError;

    fn store(source: object_store::Error) -> StoreError {
        StoreError::Store {
            location: "s3://bucket/run-1".into(),
            source,
        }
    }

    #[test]
    fn only_rank_0_sends_progress() {
        for (rank, sent) in [(0, 1), (1, 0), (7, 0)] {
            let (messages, mut inbox) = mpsc::unbounded_channel();
            let (_leave_tx, leave) = watch::channel(false);
            let link = Link {
                messages,
                abort: Arc::new(AbortState::default()),
                leave,
                rank,
            };
            link.progress(Progress {
                step: 1,
                ..Default::default()
            });
            drop(link);
            let mut received = 0;
            while let Ok(message) = inbox.try_recv() {
                assert!(matches!(message, LinkMessage::Progress(_)));
                received += 1;
            }
            assert_eq!(received, sent, "rank {rank}");
        }
    }

    #[test]
    fn a_commit_is_fenced_once_the_lease_lapses_or_the_world_ends() {
        let abort = Arc::new(AbortState::default());
        abort.enter("world-1");
        let (messages, _rx) = mpsc::unbounded_channel();
        let (_leave_tx, leave) = watch::channel(false);
        let link = Link {
            messages,
            abort: abort.clone(),
            leave,
            rank: 0,
        };
        let fence = link.commit_fence();
        // No answer yet: nothing to judge by.
        assert_eq!(fence(), Ok(()));
        abort.acknowledged(Instant::now(), Duration::from_secs(10));
        assert_eq!(fence(), Ok(()));
        // The last answered call was sent longer ago than the lease.
        let old = Instant::now()
            .checked_sub(Duration::from_secs(3))
            .expect("an instant 3 s ago");
        let lapsed = Arc::new(AbortState::default());
        lapsed.enter("world-1");
        lapsed.acknowledged(old, Duration::from_secs(2));
        let reason = lapsed.lease_lapsed().expect("lapsed");
        assert!(reason.contains("the lease is 2.0s"), "{reason}");
        // An aborted or replaced world is fenced too.
        abort.abort("world-1", "peer died");
        let err = fence().expect_err("aborted");
        assert!(err.contains("peer died"), "{err}");
        abort.enter("world-2");
        let err = fence().expect_err("replaced");
        assert!(err.contains("world-1 has ended"), "{err}");
    }

    #[test]
    fn failures_a_retry_cannot_fix_are_permanent_and_the_rest_are_not() {
        let timeout = || {
            store(object_store::Error::Generic {
                store: "S3",
                source: "connection reset".into(),
            })
        };
        let denied = || {
            store(object_store::Error::PermissionDenied {
                path: "run-1/manifest.json".into(),
                source: "403 Forbidden".into(),
            })
        };
        let permanent = [
            TrainError::Spec("phases[0].seq_len: 0".into()),
            TrainError::Data(LoaderError::SeqLen {
                location: "s3://bucket/data/manifest.json".into(),
                phase: "pretrain".into(),
                manifest: 1024,
                spec: 512,
            }),
            TrainError::Data(LoaderError::Store(denied())),
            TrainError::Checkpoint(CheckpointError::Store(denied())),
        ];
        for e in &permanent {
            assert!(e.permanent(), "{e}");
        }
        let transient = [
            TrainError::Data(LoaderError::Store(timeout())),
            TrainError::Checkpoint(CheckpointError::Store(timeout())),
            TrainError::Aborted("a peer died".into()),
            TrainError::BadCheckpoint {
                url: "s3://bucket/ckpt".into(),
                message: "sha256 mismatch".into(),
            },
        ];
        for e in &transient {
            assert!(!e.permanent(), "{e}");
        }
    }
}
