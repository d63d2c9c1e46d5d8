//! `submit`, `runs`, `status`, `watch`, `cancel`.

use std::collections::HashMap;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;
use tokio_stream::StreamExt;
use twinhead_proto::v1::{
    CancelRunRequest, GetRunRequest, ListRunsRequest, Run, RunEventKind, RunState,
    SubmitRunRequest, WatchRunRequest,
};

use crate::Connection;
use crate::client::run_client;
use crate::output::{self, human, run_json};

pub async fn submit(
    connection: &Connection,
    file: &Path,
    overrides: &[String],
    dry_run: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let spec = twinhead_proto::config::load_run(file, overrides)?;
    if dry_run {
        let value = output::spec_json(&spec);
        if json {
            println!("{value}");
        } else {
            println!(
                "{} is valid; the coordinator would receive:",
                file.display()
            );
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut client = run_client(connection).await?;
    let name = spec.name.clone();
    let response = client
        .submit_run(SubmitRunRequest { spec: Some(spec) })
        .await?;
    let run_id = response.into_inner().run_id;
    if json {
        println!("{}", json!({ "run_id": run_id }));
    } else {
        println!("submitted {name} as {run_id}");
        println!("follow it with: twinhead watch {run_id}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn list(connection: &Connection, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = run_client(connection).await?;
    let runs = client
        .list_runs(ListRunsRequest::default())
        .await?
        .into_inner()
        .runs;
    if json {
        println!(
            "{}",
            serde_json::Value::Array(runs.iter().map(run_json).collect())
        );
    } else if runs.is_empty() {
        println!("no runs yet; submit one with: twinhead submit configs/runs/tiny-cpu.toml");
    } else {
        print!("{}", output::runs_table(&runs));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn status(connection: &Connection, run_id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = run_client(connection).await?;
    let run = client
        .get_run(GetRunRequest {
            run_id: run_id.to_string(),
        })
        .await?
        .into_inner();
    if json {
        println!("{}", run_json(&run));
    } else {
        print!("{}", output::run_report(&run));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn cancel(
    connection: &Connection,
    run_id: &str,
    reason: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let mut client = run_client(connection).await?;
    let run = client
        .cancel_run(CancelRunRequest {
            run_id: run_id.to_string(),
            reason: reason.to_string(),
        })
        .await?
        .into_inner();
    if json {
        println!("{}", run_json(&run));
    } else {
        println!("cancelled {}", run.id);
    }
    Ok(ExitCode::SUCCESS)
}

fn exit_for(run: &Run) -> ExitCode {
    if run.state == RunState::Completed as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn is_final(run: &Run) -> bool {
    matches!(
        RunState::try_from(run.state),
        Ok(RunState::Completed | RunState::Failed | RunState::Cancelled)
    )
}

pub async fn watch(connection: &Connection, run_id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let mut client = run_client(connection).await?;
    let mut stream = client
        .watch_run(WatchRunRequest {
            run_id: run_id.to_string(),
        })
        .await?
        .into_inner();
    let mut bars = PhaseBars::new(json);
    let mut last: Option<Run> = None;
    while let Some(event) = stream.next().await {
        let event = event?;
        let Some(run) = event.run else { continue };
        if json {
            let kind = RunEventKind::try_from(event.kind)
                .map(|k| {
                    k.as_str_name()
                        .trim_start_matches("RUN_EVENT_KIND_")
                        .to_ascii_lowercase()
                })
                .unwrap_or_default();
            println!(
                "{}",
                json!({ "event": kind, "message": event.message, "run": run_json(&run) })
            );
        } else {
            bars.update(&run);
            if !event.message.is_empty() && event.kind != RunEventKind::Progress as i32 {
                bars.println(&format!("{}: {}", run.id, event.message));
            }
        }
        let done = is_final(&run);
        last = Some(run);
        if done {
            break;
        }
    }
    bars.finish();
    match last {
        Some(run) if is_final(&run) => {
            if !json {
                println!(
                    "{} {}{}",
                    run.id,
                    twinhead_proto::names::run_state(run.state),
                    if run.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", run.message)
                    }
                );
            }
            Ok(exit_for(&run))
        }
        _ => anyhow::bail!("the coordinator closed the watch of {run_id} before the run ended"),
    }
}

/// One progress bar per phase: tokens done of the budget, loss, tokens/s, ETA.
struct PhaseBars {
    multi: MultiProgress,
    bars: HashMap<usize, ProgressBar>,
    quiet: bool,
}

impl PhaseBars {
    fn new(quiet: bool) -> PhaseBars {
        PhaseBars {
            multi: MultiProgress::new(),
            bars: HashMap::new(),
            quiet,
        }
    }

    fn update(&mut self, run: &Run) {
        if self.quiet {
            return;
        }
        for (i, phase) in run.phases.iter().enumerate() {
            let started = phase.started_ms != 0
                || (i as u32) <= run.phase_index && run.state == RunState::Running as i32;
            if !started && !self.bars.contains_key(&i) {
                continue;
            }
            let bar = self.bars.entry(i).or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(phase.token_budget.max(1)));
                let style = ProgressStyle::with_template(
                    "{prefix:>14} [{bar:32.cyan/blue}] {percent:>3}% {msg} eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
                bar.set_style(style);
                bar.set_prefix(format!("{}/{} {}", i + 1, run.phases.len(), phase.name));
                bar.enable_steady_tick(Duration::from_millis(500));
                bar
            });
            bar.set_position(phase.tokens_done.min(phase.token_budget));
            let mut message = format!(
                "{}/{} tok",
                human(phase.tokens_done as f64),
                human(phase.token_budget as f64)
            );
            if phase.loss != 0.0 {
                message.push_str(&format!(" · loss {:.4}", phase.loss));
            }
            if phase.tokens_per_sec != 0.0 {
                message.push_str(&format!(" · {} tok/s", human(phase.tokens_per_sec)));
            }
            bar.set_message(message);
            if phase.finished_ms != 0 && !bar.is_finished() {
                bar.set_position(phase.token_budget);
                bar.finish();
            }
        }
    }

    fn println(&self, line: &str) {
        if self.bars.is_empty() {
            println!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }

    fn finish(&self) {
        for bar in self.bars.values() {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}
