//! Dataset builds through the coordinator: `twinhead dataprep` (a process
//! that takes build tasks until stopped; run as many as there are machines)
//! and `twinhead dataset submit|list|show` (ask for a build and follow it).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use twinhead_dataprep::DatasetConfig;
use twinhead_dataprep::process::ProcessOptions;
use twinhead_proto::v1::{
    BuildDatasetRequest, Dataset, DatasetState, GetDatasetRequest, ListDatasetsRequest,
};

use twinhead_proto::names;

use crate::Connection;
use crate::client::{dataprep_client, dataset_client};
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
    let client = dataprep_client(&args.connection).await?;
    tracing::info!(coordinator = %args.connection.coordinator, threads, "dataprep process starting");
    let options = ProcessOptions {
        threads,
        exit_when_idle: (args.exit_when_idle_s > 0)
            .then(|| Duration::from_secs(args.exit_when_idle_s)),
    };
    twinhead_dataprep::process::serve(client, options, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

fn dataset_json(d: &Dataset) -> Value {
    json!({
        "id": d.id,
        "name": d.name,
        "state": names::dataset_state(d.state),
        "step": names::dataprep_step(d.step),
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
        .map_err(|e| anyhow::anyhow!(twinhead_proto::error_chain(&e)))?;
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
                bar.set_prefix(names::dataprep_step(dataset.step));
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
    let mut out = format!("{} {} ({})\n", d.id, d.name, names::dataset_state(d.state));
    let progress = if d.state == DatasetState::Building as i32 {
        format!(
            "step {} ({}/{} tasks)",
            names::dataprep_step(d.step),
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
                names::dataset_state(d.state).to_string(),
                if d.state == DatasetState::Building as i32 {
                    format!(
                        "{} {}/{}",
                        names::dataprep_step(d.step),
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
