//! The twinhead coordinator: users submit and watch runs, workers register,
//! form worlds, meet at a rendezvous and report progress, checkpoints and
//! failures. Every change is committed to a durable store before the call
//! that made it is answered, so the coordinator can be killed and restarted
//! at any moment.
//!
//! # Layout
//! - [`scheduler`]: pure decisions (which workers form which world).
//! - `state`: the in-memory state and every operation on it.
//! - [`store`]: the durable store trait and its SQLite implementation.
//! - `service`: the tonic services, translating calls and errors.
//! - [`datasets`]: dataset builds handed to dataprep processes task by task.
//! - [`dataset_check`]: a submitted run against its dataset's manifest.
//! - [`progress`]: loss curves as served: thinned, on a run-wide token axis.
//! - `metrics`: the Prometheus text exposition of runs and workers.
//! - `web`: the HTTP port: dashboard page, JSON API, `/metrics`.
//! - [`server`]: wiring: listeners, auth, health, reflection, lease reaper.
//! - [`tls`]: certificates, mTLS, the TLS ports.
//!
//! Run lifecycle: `pending → running(phase i) → completed`, or `failed`
//! (too many world failures) or `cancelled`. A world is one incarnation of a
//! run on a set of workers; when a member dies the world ends and a new one
//! is formed from the last committed checkpoint.

pub mod dataset_check;
pub mod datasets;
mod metrics;
pub mod progress;
pub mod scheduler;
pub mod server;
mod service;
mod state;
pub mod store;
pub mod tls;
mod web;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, broadcast, watch};
use twinhead_proto::v1::{Assignment, DataprepTask, Dataset, RunEvent, WorkerAction};

use datasets::Builds;
pub use datasets::MAX_TASK_ATTEMPTS;
use metrics::Liveness;
pub use server::{ServeError, ServerConfig, serve, serve_with_http};
use state::{Effects, State};
use store::{ProgressRow, Store, StoreError, Write};
pub use tls::ServerTls;

/// A failed coordinator operation, mapped onto one gRPC status each.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Store(String),
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument(m) => tonic::Status::invalid_argument(status_message(m)),
            Error::NotFound(m) => tonic::Status::not_found(status_message(m)),
            Error::FailedPrecondition(m) => tonic::Status::failed_precondition(status_message(m)),
            Error::Store(m) => tonic::Status::internal(status_message(m)),
        }
    }
}

/// The longest status message sent, in bytes. Messages quote what a
/// client sent (a config line, a name, an id); the message travels in an
/// HTTP/2 header, percent-encoded, and one beyond the client's header
/// limit (16 KiB in tonic) reaches it as an opaque "h2 protocol error".
pub const MAX_STATUS_MESSAGE: usize = 2048;

/// `message`, cut to [`MAX_STATUS_MESSAGE`] bytes at a character boundary
/// with a note of how much was cut.
pub fn status_message(message: String) -> String {
    if message.len() <= MAX_STATUS_MESSAGE {
        return message;
    }
    let mut cut = MAX_STATUS_MESSAGE;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} more bytes)", &message[..cut], message.len() - cut)
}

/// Lease timing for workers.
#[derive(Debug, Clone, Copy)]
pub struct LeaseSettings {
    /// How often workers are told to heartbeat.
    pub heartbeat_interval: Duration,
    /// Silence after which a worker is declared dead.
    pub lease_timeout: Duration,
}

impl Default for LeaseSettings {
    /// Heartbeat every second; a worker silent for 5 s is dead, so a dead
    /// worker is found within about 5.5 s (well inside 10 s).
    fn default() -> Self {
        LeaseSettings {
            heartbeat_interval: Duration::from_secs(1),
            lease_timeout: Duration::from_secs(5),
        }
    }
}

/// The longest a long-polling call waits before answering.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// The coordinator's state, its store, and the channels that tell
/// watchers and long-polling workers about changes.
pub struct Coordinator {
    state: Mutex<State>,
    datasets: Mutex<datasets::Builds>,
    store: Arc<dyn Store>,
    events: broadcast::Sender<Arc<RunEvent>>,
    /// Bumped on every change; wakes rendezvous and dataprep long-polls.
    version: watch::Sender<u64>,
    /// Long-polling `GetAssignment` calls, by worker id: woken only when
    /// that worker's assignment may have changed. Waking every waiting
    /// worker on every change (as `version` does) makes a registration
    /// storm of N workers cost N² wake-ups, all taking the state lock.
    assignment_waiters: Mutex<HashMap<String, Arc<Notify>>>,
    leases: LeaseSettings,
    liveness: Liveness,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Coordinator {
    /// Loads state from `store`; live workers get a fresh lease.
    pub fn open(
        store: Arc<dyn Store>,
        leases: LeaseSettings,
    ) -> Result<Arc<Coordinator>, StoreError> {
        let snapshot = store.load()?;
        let datasets = datasets::Builds::load(&snapshot, leases.lease_timeout);
        let state = State::load(snapshot, Instant::now());
        let (events, _) = broadcast::channel(4096);
        let (version, _) = watch::channel(0);
        Ok(Arc::new(Coordinator {
            state: Mutex::new(state),
            datasets: Mutex::new(datasets),
            store,
            events,
            version,
            assignment_waiters: Mutex::new(HashMap::new()),
            leases,
            liveness: Liveness::default(),
        }))
    }

    pub fn leases(&self) -> LeaseSettings {
        self.leases
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves state that was valid before
        // the panicking operation's first mutation at worst; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads state without changing it.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.lock())
    }

    /// Applies one operation: mutate under the lock, queue its writes in
    /// order, then wait for them to commit before publishing its events.
    pub(crate) async fn apply<R>(
        &self,
        f: impl FnOnce(&mut State, i64, &mut Effects) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let now = now_ms();
        let (result, finished, committed) = {
            let mut state = self.lock();
            let mut effects = Effects::default();
            let result = f(&mut state, now, &mut effects)?;
            let mut finished = state.finish(effects, now);
            let writes = std::mem::take(&mut finished.writes);
            let committed = (!writes.is_empty()).then(|| self.store.submit(writes));
            (result, finished, committed)
        };
        if let Some(committed) = committed {
            committed
                .await
                .map_err(|_| Error::Store("the store's writer has stopped".into()))?
                .map_err(Error::Store)?;
        }
        self.wake_assignment_waiters(&finished.reassigned);
        for event in finished.events {
            let _ = self.events.send(Arc::new(event));
        }
        self.version.send_modify(|v| *v = v.wrapping_add(1));
        Ok(result)
    }

    /// Declares workers with expired leases dead; run by the lease reaper
    /// for its check due at `due`.
    ///
    /// A check that starts late (the runtime busy with other calls, the
    /// process not scheduled, the state lock held) was late for the same
    /// reason the heartbeats that arrived meanwhile wait unprocessed: every
    /// lease is extended by the delay first, so the coordinator's own
    /// slowness never counts as a worker's silence.
    pub async fn expire_leases(&self, due: Instant) -> Result<(), Error> {
        let timeout = self.leases.lease_timeout;
        let tolerance = reaper_tick(self.leases) / 2;
        let mut stall = Duration::ZERO;
        let result = self
            .apply(|state, now_ms, fx| {
                let now = Instant::now();
                let late = now.saturating_duration_since(due);
                if late > tolerance {
                    state.extend_leases(late, now);
                    stall = late;
                }
                state.expire_leases(now, timeout, now_ms, fx);
                Ok(())
            })
            .await;
        if !stall.is_zero() {
            self.liveness.stalled(stall);
            tracing::warn!(
                late_ms = stall.as_millis() as u64,
                "lease check ran late; leases extended by the delay"
            );
        }
        result
    }

    /// Renews the worker's lease from `arrived`, when its heartbeat reached
    /// the handler (waiting for the state lock counts as the coordinator's
    /// time, not the worker's).
    pub(crate) fn heartbeat(
        &self,
        worker_id: &str,
        world_id: &str,
        arrived: Instant,
    ) -> Result<(WorkerAction, String), Error> {
        let answer = self.lock().heartbeat(worker_id, world_id, arrived);
        self.liveness.heartbeat_handled(arrived.elapsed());
        answer
    }

    pub(crate) fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    /// Wakes the `GetAssignment` long-polls of these workers.
    fn wake_assignment_waiters(&self, workers: &[String]) {
        if workers.is_empty() {
            return;
        }
        let waiters = self.assignment_waiters();
        for worker in workers {
            if let Some(waiter) = waiters.get(worker) {
                waiter.notify_waiters();
            }
        }
    }

    fn assignment_waiters(&self) -> MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        // The map holds no invariant a panic could break halfway.
        self.assignment_waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The worker's assignment, waiting up to `wait` for one whose id
    /// differs from `known`.
    pub async fn wait_for_assignment(
        &self,
        worker_id: &str,
        known: &str,
        wait: Duration,
    ) -> Result<Option<Assignment>, Error> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        let waiter = AssignmentWaiter::register(self, worker_id);
        if self.read(|s| s.draining(worker_id)) {
            self.apply(|s, now_ms, fx| {
                s.drained(worker_id, now_ms, fx);
                Ok(())
            })
            .await?;
        }
        loop {
            let Some(woken) = waiter.woken() else {
                return Ok(None);
            };
            tokio::pin!(woken);
            // Listening before looking: a change between the look and the
            // wait still wakes this call.
            woken.as_mut().enable();
            if let Some(a) = self.read(|s| s.assignment(worker_id))?
                && a.assignment_id != known
            {
                return Ok(Some(a));
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return Ok(None);
            }
        }
    }

    /// Publishes (rank 0) or fetches the world's rendezvous token, waiting
    /// up to `wait` for it to appear.
    pub async fn rendezvous(
        &self,
        worker_id: &str,
        world_id: &str,
        publish: Vec<u8>,
        wait: Duration,
    ) -> Result<Option<Vec<u8>>, Error> {
        if !publish.is_empty() {
            return self
                .apply(|s, _, fx| s.rendezvous(worker_id, world_id, publish, fx))
                .await;
        }
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        let mut changes = self.version.subscribe();
        loop {
            changes.borrow_and_update();
            let token = {
                let mut effects = Effects::default();
                self.lock()
                    .rendezvous(worker_id, world_id, Vec::new(), &mut effects)?
            };
            if token.is_some() {
                return Ok(token);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Ok(None);
            }
        }
    }

    /// The run's progress reports in order, at most about `max_points` of
    /// them (0: all); an unknown run is `NotFound`.
    pub async fn progress(
        &self,
        run_id: &str,
        max_points: usize,
    ) -> Result<Vec<ProgressRow>, Error> {
        self.read(|s| s.run(run_id).map(|_| ()))?;
        let store = self.store.clone();
        let id = run_id.to_string();
        // SQLite reads block; keep them off the async workers.
        let rows = tokio::task::spawn_blocking(move || store.progress(&id))
            .await
            .map_err(|e| Error::Store(format!("progress read of run {run_id} stopped: {e}")))?
            .map_err(|e| Error::Store(e.to_string()))?;
        Ok(progress::thin(rows, max_points))
    }

    /// Run events as they are committed.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<RunEvent>> {
        self.events.subscribe()
    }
}

/// How often the lease reaper checks: a few times per lease, so a dead
/// worker is found within the timeout plus a fraction of it.
pub(crate) fn reaper_tick(leases: LeaseSettings) -> Duration {
    (leases.lease_timeout / 8)
        .min(leases.heartbeat_interval)
        .max(Duration::from_millis(20))
}

/// One long-polling `GetAssignment` call's place in
/// `Coordinator::assignment_waiters`; the entry goes with the worker's last
/// waiting call, even one cancelled by its client.
struct AssignmentWaiter<'a> {
    coordinator: &'a Coordinator,
    worker_id: &'a str,
    /// Taken back under the map's lock when the call ends.
    notify: Option<Arc<Notify>>,
}

impl<'a> AssignmentWaiter<'a> {
    fn register(coordinator: &'a Coordinator, worker_id: &'a str) -> Self {
        let notify = coordinator
            .assignment_waiters()
            .entry(worker_id.to_string())
            .or_default()
            .clone();
        AssignmentWaiter {
            coordinator,
            worker_id,
            notify: Some(notify),
        }
    }

    /// A wake-up of this call, listening once enabled.
    fn woken(&self) -> Option<tokio::sync::futures::Notified<'_>> {
        self.notify.as_deref().map(Notify::notified)
    }
}

impl Drop for AssignmentWaiter<'_> {
    fn drop(&mut self) {
        let mut waiters = self.coordinator.assignment_waiters();
        // References are taken and given back under this lock: two (the
        // map's and ours) mean no other call of this worker waits.
        if let Some(notify) = self.notify.take()
            && Arc::strong_count(&notify) == 2
        {
            waiters.remove(self.worker_id);
        }
    }
}

// ---------------------------------------------------------- dataset builds

impl Coordinator {
    /// Every dataset build, oldest first.
    pub(crate) fn dataset_builds(&self) -> Vec<Dataset> {
        self.builds().list()
    }

    fn builds(&self) -> MutexGuard<'_, Builds> {
        self.datasets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Mutates the builds, commits the writes, then wakes long-polling
    /// claimers.
    async fn apply_builds<R>(
        &self,
        f: impl FnOnce(&mut Builds, i64, &mut Vec<Write>) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let now = now_ms();
        let (result, committed) = {
            let mut builds = self.builds();
            let mut writes = Vec::new();
            let result = f(&mut builds, now, &mut writes)?;
            let committed = (!writes.is_empty()).then(|| self.store.submit(writes));
            (result, committed)
        };
        if let Some(committed) = committed {
            committed
                .await
                .map_err(|_| Error::Store("the store's writer has stopped".into()))?
                .map_err(Error::Store)?;
            // Only a change can free a task for a waiting claimer.
            self.version.send_modify(|v| *v = v.wrapping_add(1));
        }
        Ok(result)
    }

    /// Takes back lapsed dataprep tasks; run by the lease reaper.
    pub async fn expire_tasks(&self) -> Result<(), Error> {
        self.apply_builds(|b, now_ms, writes| {
            b.expire(Instant::now(), now_ms, writes);
            Ok(())
        })
        .await
    }

    async fn claim_task(&self, process: &str, wait: Duration) -> Option<DataprepTask> {
        let deadline = tokio::time::Instant::now() + wait.min(MAX_WAIT);
        let mut changes = self.version.subscribe();
        loop {
            changes.borrow_and_update();
            if let Some(task) = self.builds().claim(process, Instant::now()) {
                return Some(task);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }
}
