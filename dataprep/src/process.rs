//! A dataprep process: claims a build's tasks from the coordinator
//! (`DataprepService`), runs each on its thread pool while renewing the
//! task's lease, and reports the outcome; a failure is classified as worth
//! retrying (storage, threads) or not (config, input, file) where it is
//! made. `twinhead dataprep` runs [`serve`].

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use twinhead_proto::auth::Bearer;
use twinhead_proto::build_tasks::Task;
use twinhead_proto::dataset::DatasetConfig;
use twinhead_proto::v1::dataprep_service_client::DataprepServiceClient;
use twinhead_proto::v1::{
    ClaimTaskRequest, CompleteTaskRequest, DataprepTask, FailTaskRequest, RenewTaskRequest,
};

use crate::ProgressSink;
use crate::error::Error;
use crate::tasks::{Build, Outcome};

/// The coordinator's dataprep API, with the bearer token.
pub type DataprepClient = DataprepServiceClient<InterceptedService<Channel, Bearer>>;

/// How a dataprep process runs.
#[derive(Debug, Clone, Default)]
pub struct ProcessOptions {
    /// Threads for each task (at least 1).
    pub threads: usize,
    /// Exit once no task has come up for this long (`None`: never).
    pub exit_when_idle: Option<Duration>,
}

/// Why a dataprep process stopped before it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The coordinator refused or failed a call.
    #[error("coordinator: {}", .0.message())]
    Coordinator(#[from] tonic::Status),
    /// The thread pool could not be built, or a task's thread panicked.
    #[error(transparent)]
    Local(#[from] Error),
}

/// Polled by a running task: set when the coordinator no longer wants it
/// or the process is stopping.
struct StopFlag(Arc<AtomicBool>);

impl ProgressSink for StopFlag {
    fn cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

fn process_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}

/// Claims, runs and reports tasks until `shutdown` resolves (the task in
/// hand stops at its next check and is handed out again) or, with
/// [`ProcessOptions::exit_when_idle`], until no task has come up for that
/// long.
pub async fn serve(
    mut client: DataprepClient,
    options: ProcessOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ProcessError> {
    let threads = options.threads.max(1);
    let pool = Arc::new(crate::thread_pool(threads)?);
    let process = process_name();
    tracing::info!(%process, threads, "dataprep process ready");
    // The last build's state, so its tokenizer is loaded once per process.
    let mut current: Option<(String, Arc<Build>)> = None;
    let mut idle_since = tokio::time::Instant::now();
    tokio::pin!(shutdown);
    loop {
        let claim = client.claim_task(ClaimTaskRequest {
            process: process.clone(),
            wait_ms: 5_000,
        });
        let task = tokio::select! {
            _ = &mut shutdown => break,
            r = claim => r?.into_inner().task,
        };
        let Some(task) = task else {
            let idle = idle_since.elapsed();
            if options.exit_when_idle.is_some_and(|limit| idle >= limit) {
                tracing::info!("no task for {}s; exiting", idle.as_secs());
                break;
            }
            continue;
        };
        let build = match &current {
            Some((id, build)) if *id == task.dataset_id => build.clone(),
            _ => match open_build(&task) {
                Ok(build) => {
                    let build = Arc::new(build);
                    let old = current.replace((task.dataset_id.clone(), build.clone()));
                    drop_off_runtime(old).await;
                    build
                }
                Err(e) => {
                    report_failure(&mut client, &task, &process, &e).await?;
                    continue;
                }
            },
        };
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = run_task(
            &mut client,
            &process,
            &task,
            build,
            &pool,
            stop,
            &mut shutdown,
        )
        .await?;
        idle_since = tokio::time::Instant::now();
        if stopping {
            break;
        }
    }
    drop_off_runtime(current).await;
    tracing::info!("dataprep process stopped");
    Ok(())
}

/// A build owns a blocking I/O runtime, which must not be dropped on an
/// async thread.
async fn drop_off_runtime<T: Send + 'static>(value: T) {
    let _ = tokio::task::spawn_blocking(move || drop(value)).await;
}

fn open_build(task: &DataprepTask) -> crate::Result<Build> {
    let cfg = DatasetConfig::parse(Path::new(&task.config_path), &task.config_text)?;
    Build::new(cfg, &task.out_url)
}

/// Runs one task while renewing its lease; `true` when the process was
/// asked to stop meanwhile.
/// Test hook, off unless set: `TWINHEAD_TEST_STALL_TASK_MS=N` makes every
/// task wait N ms before its work (its lease still renewed), so a
/// process-level test can stop or kill a process that holds a task.
const STALL_TASK_ENV: &str = "TWINHEAD_TEST_STALL_TASK_MS";

fn stall_task() {
    let stall = std::env::var(STALL_TASK_ENV)
        .ok()
        .and_then(|ms| ms.parse::<u64>().ok());
    if let Some(ms) = stall {
        tracing::warn!(ms, "test hook {STALL_TASK_ENV}: stalling the task");
        std::thread::sleep(Duration::from_millis(ms));
    }
}

async fn run_task(
    client: &mut DataprepClient,
    process: &str,
    task: &DataprepTask,
    build: Arc<Build>,
    pool: &Arc<rayon::ThreadPool>,
    stop: Arc<AtomicBool>,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Result<bool, ProcessError> {
    let Some(which) = Task::from_key(&task.key) else {
        let e = format!(
            "unknown task {:?}; is this twinhead older than the coordinator?",
            task.key
        );
        report_failure(client, task, process, &e).await?;
        return Ok(false);
    };
    tracing::info!(dataset = %task.dataset_id, task = %task.key, "task started");
    let started = std::time::Instant::now();
    let handle = {
        let (pool, stop) = (pool.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            stall_task();
            pool.install(|| build.run(which, &StopFlag(stop)))
        })
    };
    tokio::pin!(handle);
    let renew_every = Duration::from_millis(u64::from(task.lease_ms.max(300)) / 3);
    let mut renew =
        tokio::time::interval_at(tokio::time::Instant::now() + renew_every, renew_every);
    let mut stopping = false;
    let result = loop {
        tokio::select! {
            r = &mut handle => break r.map_err(|e| Error::ThreadPool(format!("the task's thread stopped: {e}")))?,
            _ = renew.tick() => {
                let wanted = client
                    .renew_task(RenewTaskRequest {
                        dataset_id: task.dataset_id.clone(),
                        key: task.key.clone(),
                        process: process.to_string(),
                    })
                    .await
                    .map(|r| r.into_inner().wanted)
                    // The coordinator may be restarting: keep working.
                    .unwrap_or(true);
                if !wanted {
                    stop.store(true, Ordering::Relaxed);
                }
            }
            _ = shutdown.as_mut(), if !stopping => {
                stopping = true;
                stop.store(true, Ordering::Relaxed);
            }
        }
    };
    match result {
        Ok(outcome) => {
            let mut done = CompleteTaskRequest {
                dataset_id: task.dataset_id.clone(),
                key: task.key.clone(),
                process: process.to_string(),
                ..Default::default()
            };
            match outcome {
                Outcome::Planned {
                    parts_per_source,
                    complete,
                } => {
                    done.parts_per_source = parts_per_source.iter().map(|&n| n as u32).collect();
                    if let Some(m) = complete {
                        done.already_complete = true;
                        done.tokens = m.phases.iter().map(|p| p.tokens).sum();
                    }
                }
                Outcome::Finished(m) => done.tokens = m.phases.iter().map(|p| p.tokens).sum(),
                Outcome::Files(_) | Outcome::Done => {}
            }
            client.complete_task(done).await?;
            tracing::info!(task = %task.key, seconds = started.elapsed().as_secs_f64(), "task done");
        }
        // Stopped on purpose: the coordinator hands the task out again.
        Err(Error::Cancelled) => {
            tracing::info!(task = %task.key, "task stopped");
        }
        Err(e) => {
            let retry = e.is_transient();
            let message = twinhead_proto::error_chain(&e);
            tracing::error!(task = %task.key, retry, error = %message, "task failed");
            client
                .fail_task(FailTaskRequest {
                    dataset_id: task.dataset_id.clone(),
                    key: task.key.clone(),
                    process: process.to_string(),
                    error: message,
                    retry,
                })
                .await?;
        }
    }
    Ok(stopping)
}

async fn report_failure(
    client: &mut DataprepClient,
    task: &DataprepTask,
    process: &str,
    error: &dyn std::fmt::Display,
) -> Result<(), ProcessError> {
    tracing::error!(task = %task.key, error = %error, "task failed");
    client
        .fail_task(FailTaskRequest {
            dataset_id: task.dataset_id.clone(),
            key: task.key.clone(),
            process: process.to_string(),
            error: error.to_string(),
            retry: false,
        })
        .await?;
    Ok(())
}
