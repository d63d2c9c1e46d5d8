//! Downstream tasks on committed checkpoints (the run's `[eval] tasks`):
//! queued as a checkpoint commits, handed to free workers once worlds are
//! formed (training is served first), given back when their worker dies or
//! leaves, and recorded when it reports. Nothing here touches the run's
//! training: a failed evaluation is recorded, the run goes on.

use twinhead_proto::v1::{
    Assignment, Checkpoint, CheckpointEval, CheckpointEvalJob, CheckpointEvalState,
    ReportCheckpointEvalRequest, RunEventKind, WorkerAction,
};

use super::{Effects, State};
use crate::Error;

/// Workers that may take one checkpoint's tasks (and die or leave with
/// them) before it is marked failed.
const MAX_TRIES: u32 = 3;

impl State {
    /// Queues the run's tasks on a checkpoint that just committed, when the
    /// policy scores it: every phase end, and a checkpoint that crosses a
    /// multiple of `tasks_every_tokens` since the phase's previous one
    /// (`previous_tokens`, 0 for none). Returns whether one was queued.
    pub(super) fn queue_checkpoint_eval(
        &mut self,
        run_id: &str,
        checkpoint: &Checkpoint,
        phase_end: bool,
        previous_tokens: u64,
        fx: &mut Effects,
    ) -> bool {
        let Some(entry) = self.runs.get_mut(run_id) else {
            return false;
        };
        let run = &mut entry.run;
        let Some(policy) = run.spec.as_ref().and_then(|s| s.eval.as_ref()) else {
            return false;
        };
        let every = policy.tasks_every_tokens;
        let due = phase_end || (every > 0 && checkpoint.tokens / every > previous_tokens / every);
        if policy.tasks.is_empty() || !due {
            return false;
        }
        let id = format!("eval-{}", run.checkpoint_evals.len() + 1);
        let message = format!(
            "{id}: {} queued on checkpoint phase {} step {}",
            policy.tasks.join(", "),
            checkpoint.phase_index,
            checkpoint.step
        );
        run.checkpoint_evals.push(CheckpointEval {
            id,
            checkpoint: Some(checkpoint.clone()),
            state: CheckpointEvalState::Pending as i32,
            ..Default::default()
        });
        fx.event(run_id, RunEventKind::CheckpointEval, message);
        true
    }

    /// Hands pending checkpoint evaluations, oldest run first, to live
    /// workers that are in no world and hold no evaluation.
    pub(super) fn assign_checkpoint_evals(&mut self, now_ms: i64, fx: &mut Effects) {
        let free = self.free_workers();
        if free.is_empty() {
            return;
        }
        let mut pending: Vec<(u64, String, usize)> = self
            .runs
            .values()
            .flat_map(|e| {
                e.run
                    .checkpoint_evals
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.state == CheckpointEvalState::Pending as i32)
                    .map(|(i, _)| (e.seq, e.run.id.clone(), i))
            })
            .collect();
        pending.sort();
        for (worker_id, (_, run_id, index)) in free.into_iter().zip(pending) {
            let Some(job) = self
                .runs
                .get_mut(&run_id)
                .and_then(|e| e.run.checkpoint_evals.get_mut(index))
            else {
                continue;
            };
            job.state = CheckpointEvalState::Running as i32;
            job.worker_id = worker_id.clone();
            job.tries += 1;
            job.started_ms = now_ms;
            let message = format!("{}: scoring on worker {worker_id}", job.id);
            let eval_id = job.id.clone();
            if let Some(w) = self.workers.get_mut(&worker_id) {
                w.job = Some((run_id.clone(), eval_id));
            }
            fx.event(&run_id, RunEventKind::CheckpointEval, message);
        }
    }

    /// The assignment of a worker holding a checkpoint evaluation.
    pub(super) fn checkpoint_eval_assignment(
        &self,
        worker_id: &str,
        run_id: &str,
        eval_id: &str,
    ) -> Option<Assignment> {
        let run = &self.runs.get(run_id)?.run;
        let job = run.checkpoint_evals.iter().find(|c| c.id == eval_id)?;
        let checkpoint = job.checkpoint.clone()?;
        Some(Assignment {
            assignment_id: format!("{run_id}/{eval_id}/{worker_id}/{}", job.tries),
            run_id: run_id.to_string(),
            world_size: 1,
            spec: run.spec.clone(),
            phase_index: checkpoint.phase_index,
            checkpoint_eval: Some(CheckpointEvalJob {
                eval_id: eval_id.to_string(),
                checkpoint: Some(checkpoint),
            }),
            ..Default::default()
        })
    }

    /// Gives back the evaluation a worker held when it died or left: pending
    /// again, or failed once `MAX_TRIES` workers took it.
    pub(super) fn release_checkpoint_eval(
        &mut self,
        worker_id: &str,
        why: &str,
        now_ms: i64,
        fx: &mut Effects,
    ) {
        let Some((run_id, eval_id)) = self.workers.get_mut(worker_id).and_then(|w| w.job.take())
        else {
            return;
        };
        let Some(job) = self
            .runs
            .get_mut(&run_id)
            .and_then(|e| e.run.checkpoint_evals.iter_mut().find(|c| c.id == eval_id))
        else {
            return;
        };
        let message = if job.tries >= MAX_TRIES {
            job.state = CheckpointEvalState::Failed as i32;
            job.error = format!(
                "{} workers took it; the last, {worker_id}, {why}",
                job.tries
            );
            job.finished_ms = now_ms;
            format!("{eval_id} failed: {}", job.error)
        } else {
            job.state = CheckpointEvalState::Pending as i32;
            format!("{eval_id}: worker {worker_id} {why}; queued again")
        };
        fx.event(&run_id, RunEventKind::CheckpointEval, message);
    }

    /// Records a worker's scores of its checkpoint evaluation (or why it
    /// could not score it) and frees the worker.
    pub fn checkpoint_eval_report(
        &mut self,
        req: &ReportCheckpointEvalRequest,
        now_ms: i64,
        fx: &mut Effects,
    ) -> Result<(WorkerAction, String), Error> {
        self.live_worker(&req.worker_id)?;
        let held = self.workers.get(&req.worker_id).and_then(|w| w.job.clone());
        if held.as_ref() != Some(&(req.run_id.clone(), req.eval_id.clone())) {
            return Err(Error::FailedPrecondition(format!(
                "worker {} does not hold {} of run {} (it was given back or to another worker)",
                req.worker_id, req.eval_id, req.run_id
            )));
        }
        if req.error.is_empty() {
            for (i, score) in req.scores.iter().enumerate() {
                if let Some((name, value)) = score.metrics.iter().find(|(_, v)| !v.is_finite()) {
                    return Err(Error::InvalidArgument(format!(
                        "scores[{i}].metrics[{name:?}]: {value} is not a finite number"
                    )));
                }
            }
        }
        let Some(job) = self.runs.get_mut(&req.run_id).and_then(|e| {
            e.run
                .checkpoint_evals
                .iter_mut()
                .find(|c| c.id == req.eval_id)
        }) else {
            return Err(Error::NotFound(format!(
                "run {} has no {}",
                req.run_id, req.eval_id
            )));
        };
        job.finished_ms = now_ms;
        let message = if req.error.is_empty() {
            job.state = CheckpointEvalState::Done as i32;
            job.scores = req.scores.clone();
            let scores: Vec<String> = req
                .scores
                .iter()
                .map(|s| {
                    let value = s
                        .metrics
                        .get(&s.primary_metric)
                        .copied()
                        .unwrap_or(f64::NAN);
                    format!("{} {} {value:.3}", s.task, s.primary_metric)
                })
                .collect();
            format!("{}: {}", job.id, scores.join(", "))
        } else {
            job.state = CheckpointEvalState::Failed as i32;
            job.error = req.error.trim().to_string();
            format!("{} failed: {}", job.id, job.error)
        };
        if let Some(w) = self.workers.get_mut(&req.worker_id) {
            w.job = None;
        }
        fx.event(&req.run_id, RunEventKind::CheckpointEval, message);
        self.form_worlds(now_ms, fx);
        Ok((WorkerAction::Continue, String::new()))
    }
}
