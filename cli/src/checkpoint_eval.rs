//! A worker's second kind of work: the run's tasks (`[eval] tasks`) scored
//! on a committed checkpoint, when the coordinator hands it a
//! `checkpoint_eval` assignment. The checkpoint is exported to a scratch
//! folder exactly as `twinhead export` writes it and scored by the code of
//! `twinhead eval`, so stored scores equal what a user gets by hand.

use std::path::PathBuf;

use anyhow::Context;
use twinhead_proto::v1::{Assignment, TaskScore};
use twinhead_worker::collective::Collective;
use twinhead_worker::runtime::{Link, PhaseEnd, TrainError, Trainer};

use crate::eval::{TaskSource, evaluate, read_tasks};

/// A trainer that also scores checkpoints.
pub struct ScoringTrainer {
    inner: Box<dyn Trainer>,
}

impl ScoringTrainer {
    pub fn new(inner: Box<dyn Trainer>) -> Self {
        Self { inner }
    }
}

impl Trainer for ScoringTrainer {
    fn train(
        &mut self,
        assignment: &Assignment,
        collective: &mut dyn Collective,
        link: &Link,
    ) -> Result<PhaseEnd, TrainError> {
        self.inner.train(assignment, collective, link)
    }

    fn evaluate_checkpoint(&mut self, assignment: &Assignment) -> Result<Vec<TaskScore>, String> {
        score(assignment).map_err(|e| format!("{e:#}"))
    }
}

fn score(assignment: &Assignment) -> anyhow::Result<Vec<TaskScore>> {
    let spec = assignment
        .spec
        .as_ref()
        .context("the assignment carries no run spec")?;
    let policy = spec.eval.as_ref().context("the run has no [eval] table")?;
    let checkpoint = assignment
        .checkpoint_eval
        .as_ref()
        .and_then(|job| job.checkpoint.as_ref())
        .context("the assignment names no checkpoint")?;
    let source = TaskSource {
        limit: (policy.task_limit > 0).then_some(policy.task_limit as usize),
        tasks_dir: (!policy.tasks_dir.is_empty()).then(|| PathBuf::from(&policy.tasks_dir)),
    };
    // The task files first: a missing one fails before any model work.
    let tasks = read_tasks(&source, &policy.tasks)?;
    let scratch = tempfile::tempdir().context("creating a scratch folder")?;
    crate::export::export_checkpoint(spec, &checkpoint.url, scratch.path())?;
    let loaded = crate::model::load(scratch.path())?;
    let results = evaluate(&loaded, &tasks, None)?;
    Ok(results
        .into_iter()
        .map(|(task, value)| task_score(task, &value))
        .collect())
}

/// `twinhead eval --json`'s object for one task as a [`TaskScore`].
fn task_score(task: String, value: &serde_json::Value) -> TaskScore {
    let metrics = value
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "docs" | "primary_metric"))
                .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
                .collect()
        })
        .unwrap_or_default();
    TaskScore {
        task,
        primary_metric: value["primary_metric"].as_str().unwrap_or("").to_string(),
        metrics,
        docs: value["docs"].as_u64().unwrap_or(0),
    }
}
