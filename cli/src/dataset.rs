//! `twinhead dataset build|verify|stats`: the dataprep crate behind
//! progress bars, tables and `--json`.
//!
//! Dataprep is synchronous and CPU-bound, so every call runs in
//! `spawn_blocking`; Ctrl-C during a build flips a flag the build polls
//! through [`ProgressSink::cancelled`], so it stops between files and a
//! rerun resumes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use twinhead_dataprep::{BuildReport, ProgressSink, Stats, VerifyReport};

use crate::output::{human, table};

#[derive(Subcommand)]
pub enum DatasetCommand {
    /// Build a dataset from a config (configs/data/*.toml); a rerun resumes.
    Build {
        /// Dataset config file.
        config: PathBuf,
        /// Where to write: a path or file:// URL; the dataset goes to OUT/<name>.
        #[arg(long)]
        out: String,
        /// Worker threads (0 = all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long)]
        json: bool,
    },
    /// Queue a build on the coordinator, where `twinhead dataprep` processes
    /// (on any number of machines) run it; follows it until it ends.
    Submit {
        /// Dataset config file (inputs must be reachable from every dataprep process).
        config: PathBuf,
        /// Where to write (a path all processes share, or a cloud URL); the dataset goes to OUT/<name>.
        #[arg(long)]
        out: String,
        /// Return once queued instead of following the build.
        #[arg(long)]
        detach: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: crate::Connection,
    },
    /// Dataset builds known to the coordinator.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: crate::Connection,
    },
    /// One dataset build: state, step, processes, error.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: crate::Connection,
    },
    /// Re-hash every file of a dataset against its manifest; exit 1 on any problem.
    Verify {
        /// The dataset folder (holding manifest.json).
        url: String,
        #[arg(long)]
        json: bool,
    },
    /// Tokens per source and phase, and what each filter dropped.
    Stats {
        /// The dataset folder (holding manifest.json).
        url: String,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(command: DatasetCommand) -> anyhow::Result<ExitCode> {
    match command {
        DatasetCommand::Build {
            config,
            out,
            threads,
            json,
        } => build(&config, &out, threads, json).await,
        DatasetCommand::Submit {
            config,
            out,
            detach,
            json,
            connection,
        } => crate::dataprep::submit(&connection, &config, &out, detach, json).await,
        DatasetCommand::List { json, connection } => crate::dataprep::list(&connection, json).await,
        DatasetCommand::Show {
            id,
            json,
            connection,
        } => crate::dataprep::show(&connection, &id, json).await,
        DatasetCommand::Verify { url, json } => verify(&url, json).await,
        DatasetCommand::Stats { url, json } => stats(&url, json).await,
    }
}

/// Exit status of a build stopped by Ctrl-C (128 + SIGINT).
const EXIT_CANCELLED: u8 = 130;

/// One `indicatif` bar per dataprep stage (`scan`, `dedup + tokenizer`,
/// `tokenize`, `phase <name>`), showing the stage's units (parts, shards)
/// per second; the scan bar also shows documents and megabytes of text
/// read per second. Stages run one after another; `inc` goes to the most
/// recently started unfinished one.
pub(crate) struct Bars {
    multi: MultiProgress,
    open: Mutex<Vec<(String, ProgressBar)>>,
    cancel: Arc<AtomicBool>,
    read: Mutex<ReadRate>,
}

/// Documents and bytes read since the scan stage began.
#[derive(Default)]
struct ReadRate {
    since: Option<std::time::Instant>,
    docs: u64,
    bytes: u64,
}

impl Bars {
    pub(crate) fn new(cancel: Arc<AtomicBool>, visible: bool) -> Bars {
        let target = if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Bars {
            multi: MultiProgress::with_draw_target(target),
            open: Mutex::new(Vec::new()),
            cancel,
            read: Mutex::new(ReadRate::default()),
        }
    }

    /// `parts/s` for stage-1 stages, `shards/s` for phases.
    fn style(stage: &str) -> ProgressStyle {
        let unit = if stage.starts_with("phase ") {
            "shards"
        } else if stage == "scan" || stage == "tokenize" {
            "parts"
        } else {
            "steps"
        };
        ProgressStyle::with_template(
            "{prefix:>24} [{bar:30}] {pos}/{len} {rate:.dim} {elapsed:.dim} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .with_key(
            "rate",
            move |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.1} {unit}/s", state.per_sec());
            },
        )
        .progress_chars("=> ")
    }
}

impl ProgressSink for Bars {
    fn start(&self, stage: &str, total: u64) {
        let bar = self.multi.add(ProgressBar::new(total));
        bar.set_style(Bars::style(stage));
        bar.set_prefix(stage.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        if stage == "scan"
            && let Ok(mut read) = self.read.lock()
        {
            *read = ReadRate {
                since: Some(std::time::Instant::now()),
                ..ReadRate::default()
            };
        }
        if let Ok(mut open) = self.open.lock() {
            open.push((stage.to_string(), bar));
        }
    }

    fn inc(&self, n: u64) {
        if let Ok(open) = self.open.lock()
            && let Some((_, bar)) = open.last()
        {
            bar.inc(n);
        }
    }

    fn read(&self, docs: u64, bytes: u64) {
        let Ok(mut read) = self.read.lock() else {
            return;
        };
        read.docs += docs;
        read.bytes += bytes;
        let secs = read
            .since
            .map_or(0.0, |t| t.elapsed().as_secs_f64())
            .max(1e-3);
        let message = format!(
            "{:.0} docs/s {:.1} MB/s",
            read.docs as f64 / secs,
            read.bytes as f64 / 1e6 / secs
        );
        if let Ok(open) = self.open.lock()
            && let Some((_, bar)) = open.iter().rev().find(|(s, _)| s == "scan")
        {
            bar.set_message(message);
        }
    }

    fn finish(&self, stage: &str) {
        if let Ok(mut open) = self.open.lock()
            && let Some(i) = open.iter().rposition(|(s, _)| s == stage)
        {
            let (_, bar) = open.remove(i);
            bar.finish();
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

impl Bars {
    /// Leaves unfinished bars where they stopped (on error or cancel).
    pub(crate) fn abandon(&self) {
        if let Ok(mut open) = self.open.lock() {
            for (_, bar) in open.drain(..) {
                bar.abandon();
            }
        }
    }
}

/// Runs a blocking dataprep call off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> twinhead_dataprep::Result<T> + Send + 'static,
) -> anyhow::Result<twinhead_dataprep::Result<T>> {
    tokio::task::spawn_blocking(f)
        .await
        .context("dataprep task failed")
}

/// A dataprep error as one line with its causes.
fn dataprep_error(e: twinhead_dataprep::Error) -> anyhow::Error {
    anyhow::anyhow!(twinhead_proto::error_chain(&e))
}

pub async fn build(
    config: &Path,
    out: &str,
    threads: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let watcher = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.store(true, Ordering::Relaxed);
                eprintln!("\nstopping after the files in progress (Ctrl-C again to abort)…");
                // A second Ctrl-C aborts at once; finished files still resume.
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(EXIT_CANCELLED.into());
                }
            }
        })
    };
    let bars = Arc::new(Bars::new(
        cancel.clone(),
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    ));
    let config_path: PathBuf = config.to_path_buf();
    let out_url = out.to_string();
    let sink = bars.clone();
    let result =
        blocking(move || twinhead_dataprep::build(&config_path, &out_url, threads, sink.as_ref()))
            .await?;
    watcher.abort();
    bars.abandon();
    let report = match result {
        Ok(report) => report,
        Err(twinhead_dataprep::Error::Cancelled) => {
            eprintln!(
                "error: build cancelled; finished files are kept, rerun the same command to resume"
            );
            return Ok(ExitCode::from(EXIT_CANCELLED));
        }
        Err(e) => return Err(dataprep_error(e)),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", build_summary(&report));
    }
    Ok(ExitCode::SUCCESS)
}

fn build_summary(report: &BuildReport) -> String {
    let m = &report.manifest;
    let mut out = String::new();
    if report.up_to_date {
        out.push_str("dataset already built with this config; nothing to do\n\n");
    }
    out.push_str(&sources_table(m));
    out.push('\n');
    out.push_str(&table(
        &["phase", "seq_len", "rows", "tokens", "shards"],
        &m.phases
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.seq_len.to_string(),
                    p.sequences.to_string(),
                    human(p.tokens as f64),
                    p.shards.len().to_string(),
                ]
            })
            .collect::<Vec<_>>(),
    ));
    out.push('\n');
    for note in &report.notes {
        out.push_str(&format!("note: {note}\n"));
    }
    if !report.up_to_date {
        out.push_str(&format!(
            "{} files written, {} reused, {:.1}s ({:.0} docs/s)\n",
            report.files_written, report.files_skipped, report.seconds, report.docs_per_second
        ));
    }
    out.push_str(&format!("dataset: {}\n", report.url));
    out
}

/// Sources with read, kept, rejected and one column per drop reason.
fn sources_table(m: &twinhead_data::manifest::Manifest) -> String {
    let reasons: BTreeSet<&String> = m.sources.iter().flat_map(|s| s.dropped.keys()).collect();
    let mut headers = vec!["source", "read", "kept", "rejected"];
    let reason_headers: Vec<String> = reasons.iter().map(|r| format!("drop:{r}")).collect();
    headers.extend(reason_headers.iter().map(String::as_str));
    headers.push("tokens");
    let rows: Vec<Vec<String>> = m
        .sources
        .iter()
        .map(|s| {
            let mut row = vec![
                s.name.clone(),
                s.read.to_string(),
                s.kept.to_string(),
                s.rejected.values().sum::<u64>().to_string(),
            ];
            row.extend(
                reasons
                    .iter()
                    .map(|r| s.dropped.get(*r).copied().unwrap_or(0).to_string()),
            );
            row.push(human(s.tokens as f64));
            row
        })
        .collect();
    table(&headers, &rows)
}

pub async fn verify(url: &str, json: bool) -> anyhow::Result<ExitCode> {
    let target = url.to_string();
    let report: VerifyReport = blocking(move || twinhead_dataprep::verify(&target))
        .await?
        .map_err(dataprep_error)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.ok {
        println!(
            "ok: {} files match the manifest of {}",
            report.files_checked, report.url
        );
    } else {
        for p in &report.problems {
            println!("{}: {}: {}", p.path, p.kind, p.detail);
        }
    }
    if report.ok {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "error: {} problem(s) in {} of {} files checked",
            report.problems.len(),
            report.url,
            report.files_checked
        );
        Ok(ExitCode::FAILURE)
    }
}

pub async fn stats(url: &str, json: bool) -> anyhow::Result<ExitCode> {
    let target = url.to_string();
    let stats: Stats = blocking(move || twinhead_dataprep::stats(&target))
        .await?
        .map_err(dataprep_error)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        print!("{}", stats_report(&stats));
    }
    Ok(ExitCode::SUCCESS)
}

fn stats_report(s: &Stats) -> String {
    let mut out = format!(
        "dataset {} (config sha256 {}, vocabulary {})\n\n",
        s.name,
        short(&s.config_sha256),
        s.vocab_size
    );
    out.push_str(&table(
        &[
            "source",
            "read",
            "rejected",
            "dropped",
            "kept",
            "tokens",
            "tokens/doc",
        ],
        &s.sources
            .iter()
            .map(|l| {
                vec![
                    l.name.clone(),
                    l.read.to_string(),
                    l.rejected.to_string(),
                    l.dropped.to_string(),
                    l.kept.to_string(),
                    human(l.tokens as f64),
                    format!("{:.0}", l.mean_doc_tokens),
                ]
            })
            .collect::<Vec<_>>(),
    ));
    let reasons: BTreeSet<&String> = s.sources.iter().flat_map(|l| l.dropped_by.keys()).collect();
    if !reasons.is_empty() {
        out.push('\n');
        let mut headers = vec!["dropped by"];
        headers.extend(s.sources.iter().map(|l| l.name.as_str()));
        let rows: Vec<Vec<String>> = reasons
            .iter()
            .map(|r| {
                let mut row = vec![(*r).clone()];
                row.extend(
                    s.sources
                        .iter()
                        .map(|l| l.dropped_by.get(*r).copied().unwrap_or(0).to_string()),
                );
                row
            })
            .collect();
        out.push_str(&table(&headers, &rows));
    }
    out.push('\n');
    let names: Vec<&str> = s.sources.iter().map(|l| l.name.as_str()).collect();
    let mut headers = vec!["phase", "seq_len", "rows", "tokens", "shards", "docs/row"];
    headers.extend(names.iter().copied());
    let rows: Vec<Vec<String>> = s
        .phases
        .iter()
        .map(|p| {
            let mut row = vec![
                p.name.clone(),
                p.seq_len.to_string(),
                p.sequences.to_string(),
                human(p.tokens as f64),
                p.shards.to_string(),
                format!("{:.2}", p.mean_docs_per_row),
            ];
            row.extend(names.iter().map(|n| {
                p.share
                    .get(*n)
                    .map_or("-".to_string(), |x| format!("{:.1}%", x * 100.0))
            }));
            row
        })
        .collect();
    out.push_str(&table(&headers, &rows));
    let held_out: Vec<Vec<String>> = s
        .phases
        .iter()
        .filter_map(|p| {
            let e = p.eval.as_ref()?;
            Some(vec![
                p.name.clone(),
                e.docs.to_string(),
                e.sequences.to_string(),
                human(e.tokens as f64),
                e.shards.to_string(),
            ])
        })
        .collect();
    if !held_out.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &["held out", "docs", "rows", "tokens", "shards"],
            &held_out,
        ));
    }
    out
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}
