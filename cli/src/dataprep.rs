//! Dataset builds through the coordinator: `twinhead dataprep` (a process
//! that takes build tasks until stopped; run as many as there are machines)
//! and `twinhead dataset submit|list|show` (ask for a build and follow it).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use twinhead_dataprep::tasks::{Build, Outcome};
use twinhead_dataprep::{DatasetConfig, ProgressSink};
use twinhead_proto::build_tasks::Task;
use twinhead_proto::v1::{
    BuildDatasetRequest, ClaimTaskRequest, CompleteTaskRequest, DataprepTask, Dataset,
    DatasetState, FailTaskRequest, GetDatasetRequest, ListDatasetsRequest, RenewTaskRequest,
};

use twinhead_coordinator::datasets::{state_name, step_name};

use crate::Connection;
use crate::client::{DataprepClient, dataprep_client, dataset_client};
use crate::output::{human, table};

#[derive(Args)]
pub struct DataprepArgs {
    #[command(flatten)]
    pub connection: Connection,
    /// Threads for each task (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Exit once no task has come up for this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    pub exit_when_idle_s: u64,
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

/// `twinhead dataprep`: claim, run, report, until stopped.
pub async fn serve(
    args: DataprepArgs,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<ExitCode> {
    let threads = if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        args.threads
    };
    let pool = Arc::new(twinhead_dataprep::thread_pool(threads).map_err(|e| anyhow::anyhow!(e))?);
    let mut client = dataprep_client(&args.connection).await?;
    let process = process_name();
    tracing::info!(coordinator = %args.connection.coordinator, %process, threads, "dataprep process ready");
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
            if args.exit_when_idle_s > 0 && idle >= Duration::from_secs(args.exit_when_idle_s) {
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
    Ok(ExitCode::SUCCESS)
}

/// A build owns a blocking I/O runtime, which must not be dropped on an
/// async thread.
async fn drop_off_runtime<T: Send + 'static>(value: T) {
    let _ = tokio::task::spawn_blocking(move || drop(value)).await;
}

fn open_build(task: &DataprepTask) -> twinhead_dataprep::Result<Build> {
    let cfg = DatasetConfig::parse(Path::new(&task.config_path), &task.config_text)?;
    Build::new(cfg, &task.out_url)
}

/// Runs one task while renewing its lease; `true` when the process was
/// asked to stop meanwhile.
async fn run_task(
    client: &mut DataprepClient,
    process: &str,
    task: &DataprepTask,
    build: Arc<Build>,
    pool: &Arc<rayon::ThreadPool>,
    stop: Arc<AtomicBool>,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> anyhow::Result<bool> {
    let Some(which) = Task::from_key(&task.key) else {
        let e = anyhow::anyhow!(
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
        tokio::task::spawn_blocking(move || pool.install(|| build.run(which, &StopFlag(stop))))
    };
    tokio::pin!(handle);
    let renew_every = Duration::from_millis(u64::from(task.lease_ms.max(300)) / 3);
    let mut renew =
        tokio::time::interval_at(tokio::time::Instant::now() + renew_every, renew_every);
    let mut stopping = false;
    let result = loop {
        tokio::select! {
            r = &mut handle => break r.context("dataprep task panicked")?,
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
        Err(twinhead_dataprep::Error::Cancelled) => {
            tracing::info!(task = %task.key, "task stopped");
        }
        Err(e) => {
            let retry = e.is_transient();
            let message = crate::output::source_chain(&e);
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
) -> anyhow::Result<()> {
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

fn dataset_json(d: &Dataset) -> Value {
    json!({
        "id": d.id,
        "name": d.name,
        "state": state_name(d.state),
        "step": step_name(d.step),
        "step_tasks": d.step_tasks,
        "step_tasks_done": d.step_tasks_done,
        "url": d.url,
        "config_path": d.config_path,
        "config_sha256": d.config_sha256,
        "parts_per_source": d.parts_per_source,
        "phases": d.phases,
        "tokens": d.tokens,
        "processes": d.processes,
        "error": d.error,
        "created_ms": d.created_ms,
        "finished_ms": d.finished_ms,
    })
}

/// `twinhead dataset submit`: queue a build on the coordinator, then follow
/// it (unless `detach`) until it completes (exit 0) or fails (exit 1).
pub async fn submit(
    connection: &Connection,
    config: &Path,
    out: &str,
    detach: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    // Checked here too, so a bad config fails before anything is queued.
    DatasetConfig::parse(config, &text)
        .map_err(|e| anyhow::anyhow!(crate::output::source_chain(&e)))?;
    // Relative inputs resolve against the config's folder on every machine.
    let config_path = std::path::absolute(config)
        .with_context(|| format!("cannot resolve {}", config.display()))?;
    let out_url = match out.contains("://") {
        true => out.to_string(),
        false => std::path::absolute(out)
            .with_context(|| format!("cannot resolve {out}"))?
            .to_string_lossy()
            .into_owned(),
    };
    let mut client = dataset_client(connection).await?;
    let mut dataset = client
        .build_dataset(BuildDatasetRequest {
            config_path: config_path.to_string_lossy().into_owned(),
            config_text: text,
            out_url,
        })
        .await?
        .into_inner();
    if !json {
        eprintln!("dataset build {} → {}", dataset.id, dataset.url);
    }
    if !detach {
        let bar = (!json && std::io::IsTerminal::is_terminal(&std::io::stderr())).then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>20} [{bar:30}] {pos}/{len} tasks {elapsed:.dim}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar
        });
        while dataset.state == DatasetState::Building as i32 {
            if let Some(bar) = &bar {
                bar.set_prefix(step_name(dataset.step));
                bar.set_length(u64::from(dataset.step_tasks));
                bar.set_position(u64::from(dataset.step_tasks_done));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            dataset = client
                .get_dataset(GetDatasetRequest {
                    id: dataset.id.clone(),
                })
                .await?
                .into_inner();
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
    }
    if json {
        println!("{}", dataset_json(&dataset));
    } else {
        print!("{}", dataset_report(&dataset));
        if detach && dataset.state == DatasetState::Building as i32 {
            println!("follow it with: twinhead dataset show {}", dataset.id);
        }
    }
    Ok(if dataset.state == DatasetState::Failed as i32 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn dataset_report(d: &Dataset) -> String {
    let mut out = format!("{} {} ({})\n", d.id, d.name, state_name(d.state));
    let progress = if d.state == DatasetState::Building as i32 {
        format!(
            "step {} ({}/{} tasks)",
            step_name(d.step),
            d.step_tasks_done,
            d.step_tasks
        )
    } else {
        String::new()
    };
    if !progress.is_empty() {
        out.push_str(&format!("  {progress}\n"));
    }
    out.push_str(&format!("  url:       {}\n", d.url));
    out.push_str(&format!("  config:    {}\n", d.config_path));
    if d.tokens > 0 {
        out.push_str(&format!("  tokens:    {}\n", human(d.tokens as f64)));
    }
    if !d.processes.is_empty() {
        out.push_str(&format!("  processes: {}\n", d.processes.join(", ")));
    }
    if !d.error.is_empty() {
        out.push_str(&format!("  error:     {}\n", d.error));
    }
    out
}

/// `twinhead dataset list`.
pub async fn list(connection: &Connection, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = dataset_client(connection).await?;
    let datasets = client
        .list_datasets(ListDatasetsRequest {})
        .await?
        .into_inner()
        .datasets;
    if json {
        println!(
            "{}",
            Value::Array(datasets.iter().map(dataset_json).collect())
        );
        return Ok(ExitCode::SUCCESS);
    }
    if datasets.is_empty() {
        println!("no dataset builds yet; queue one with: twinhead dataset submit CONFIG --out URL");
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = datasets
        .iter()
        .map(|d| {
            vec![
                d.id.clone(),
                d.name.clone(),
                state_name(d.state).to_string(),
                if d.state == DatasetState::Building as i32 {
                    format!(
                        "{} {}/{}",
                        step_name(d.step),
                        d.step_tasks_done,
                        d.step_tasks
                    )
                } else {
                    String::new()
                },
                if d.tokens > 0 {
                    human(d.tokens as f64)
                } else {
                    String::new()
                },
                d.url.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["id", "name", "state", "step", "tokens", "url"], &rows)
    );
    Ok(ExitCode::SUCCESS)
}

/// `twinhead dataset show ID`.
pub async fn show(connection: &Connection, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = dataset_client(connection).await?;
    let d = client
        .get_dataset(GetDatasetRequest { id: id.to_string() })
        .await?
        .into_inner();
    if json {
        println!("{}", dataset_json(&d));
    } else {
        print!("{}", dataset_report(&d));
    }
    Ok(ExitCode::SUCCESS)
}
