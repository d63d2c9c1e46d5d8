//! `twinhead compare RUN_OR_MODEL…`: the side-by-side table Ettin shows
//! (rows tasks, columns models, the best of each row marked). A column is
//! a model folder, scored here, or a run on the coordinator, whose newest
//! scored checkpoint's stored scores are read (its `[eval] tasks`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Map, Value, json};
use twinhead_proto::v1::{CheckpointEval, CheckpointEvalState, GetRunRequest, Run};

use crate::Connection;
use crate::client::run_client;
use crate::eval::{TaskSource, evaluate, read_tasks};
use crate::model::load;
use crate::output::table;

/// The tasks `twinhead compare` runs unless told otherwise: the multiple-
/// choice tasks of Ettin's decoder table that both flavours can score.
pub(crate) const COMPARE_TASKS: &str =
    "arc_easy,arc_challenge,hellaswag,piqa,sciq,openbookqa,socialiqa,winogrande";

#[derive(Args)]
pub struct CompareArgs {
    /// Model folders (encoders and decoders) or run ids, one column each. A
    /// run contributes the stored scores of its newest scored checkpoint.
    #[arg(required = true, value_name = "RUN_OR_MODEL")]
    pub(crate) models: Vec<String>,
    /// Tasks, comma-separated, as `twinhead eval --task` takes them
    /// (default: the runs' `[eval] tasks` when every column is a run, else
    /// the multiple-choice tasks of Ettin's table).
    #[arg(long, value_delimiter = ',')]
    pub(crate) tasks: Vec<String>,
    #[command(flatten)]
    pub(crate) source: TaskSource,
    /// Print `{task: {model: value}}` (each task's primary metric).
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) connection: Connection,
}

/// One row of the comparison: a task, its primary metric, the value for
/// each model.
pub(crate) type CompareRow = (String, String, Vec<f64>);

/// Where a column's scores come from.
enum Column {
    Folder(PathBuf),
    Run(Box<Run>),
}

impl Column {
    fn name(&self) -> String {
        match self {
            Column::Folder(dir) => dir.file_name().map_or_else(
                || dir.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            ),
            Column::Run(run) => {
                let name = run.spec.as_ref().map_or("", |s| s.name.as_str());
                format!("{name} ({})", run.id)
            }
        }
    }
}

/// Folders as they are; anything else is looked up as a run.
async fn columns(args: &CompareArgs) -> anyhow::Result<Vec<Column>> {
    let mut columns = Vec::new();
    for model in &args.models {
        if Path::new(model).is_dir() {
            columns.push(Column::Folder(PathBuf::from(model)));
            continue;
        }
        let mut client = run_client(&args.connection).await.with_context(|| {
            format!("{model:?} is not a model folder, and the coordinator to look it up as a run is unreachable")
        })?;
        let run = client
            .get_run(GetRunRequest {
                run_id: model.clone(),
            })
            .await
            .map_err(|s| {
                anyhow::anyhow!(
                    "{model:?} is neither a model folder nor a run on {}: {}",
                    args.connection.coordinator,
                    s.message()
                )
            })?
            .into_inner();
        columns.push(Column::Run(Box::new(run)));
    }
    Ok(columns)
}

/// The newest checkpoint of `run` whose tasks were scored.
fn newest_scored(run: &Run) -> anyhow::Result<&CheckpointEval> {
    run.checkpoint_evals
        .iter()
        .rev()
        .find(|e| e.state == CheckpointEvalState::Done as i32)
        .with_context(|| {
            let tasks = run
                .spec
                .as_ref()
                .and_then(|s| s.eval.as_ref())
                .map(|e| e.tasks.join(", "))
                .unwrap_or_default();
            if tasks.is_empty() {
                format!(
                    "run {} scores no tasks on its checkpoints (its recipe has no [eval] tasks)",
                    run.id
                )
            } else {
                format!(
                    "run {} has no scored checkpoint yet (its tasks: {tasks}; `twinhead status {}` shows them)",
                    run.id, run.id
                )
            }
        })
}

/// The tasks to compare: as given, else the runs' own when every column
/// is a run, else Ettin's multiple-choice set.
fn task_names(args: &CompareArgs, columns: &[Column]) -> Vec<String> {
    if !args.tasks.is_empty() {
        return args.tasks.clone();
    }
    if let Some(Column::Run(run)) = columns.first()
        && columns.iter().all(|c| matches!(c, Column::Run(_)))
        && let Some(policy) = run.spec.as_ref().and_then(|s| s.eval.as_ref())
        && !policy.tasks.is_empty()
    {
        return policy.tasks.clone();
    }
    COMPARE_TASKS.split(',').map(str::to_string).collect()
}

/// The columns' names and each task's row.
fn compare_scores(
    columns: &[Column],
    tasks: &[String],
    source: &TaskSource,
) -> anyhow::Result<(Vec<String>, Vec<CompareRow>)> {
    let folders = columns.iter().any(|c| matches!(c, Column::Folder(_)));
    // Task files are needed only to score folders.
    let read = if folders {
        read_tasks(source, tasks)?
    } else {
        Vec::new()
    };
    let mut rows: Vec<CompareRow> = tasks
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let metric = read
                .get(i)
                .map(|(_, task)| task.primary_metric().to_string())
                .unwrap_or_default();
            (name.clone(), metric, Vec::new())
        })
        .collect();
    for column in columns {
        match column {
            Column::Folder(dir) => {
                let loaded = load(dir)?;
                for (row, (_, summary)) in rows.iter_mut().zip(evaluate(&loaded, &read, None)?) {
                    row.2.push(summary[&row.1].as_f64().unwrap_or(f64::NAN));
                }
            }
            Column::Run(run) => {
                let scored = newest_scored(run)?;
                let at = scored.checkpoint.clone().unwrap_or_default();
                for row in rows.iter_mut() {
                    let score = scored.scores.iter().find(|s| s.task == row.0).with_context(|| {
                        let stored: Vec<&str> =
                            scored.scores.iter().map(|s| s.task.as_str()).collect();
                        format!(
                            "run {}'s newest scored checkpoint ({}, phase {} step {}) has no score for {:?} (it has: {})",
                            run.id,
                            scored.id,
                            at.phase_index,
                            at.step,
                            row.0,
                            stored.join(", ")
                        )
                    })?;
                    if row.1.is_empty() {
                        row.1 = score.primary_metric.clone();
                    }
                    row.2
                        .push(score.metrics.get(&row.1).copied().unwrap_or(f64::NAN));
                }
            }
        }
    }
    let names = columns.iter().map(Column::name).collect();
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
    let columns = columns(&args).await?;
    let tasks = task_names(&args, &columns);
    if tasks.is_empty() {
        bail!("no task to compare (give --tasks)");
    }
    let json_out = args.json;
    let source = args.source;
    let (names, rows) =
        tokio::task::spawn_blocking(move || compare_scores(&columns, &tasks, &source))
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
