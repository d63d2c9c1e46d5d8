//! Presentation: tables for people, JSON for scripts, one-line errors.

use serde_json::{Value, json};
use twinhead_proto::names;
use twinhead_proto::v1::{
    Attempt, Checkpoint, CheckpointEval, EvalPoint, LrShape, PhaseProgress, Run, RunSpec, RunState,
    TaskScore,
};

/// An error and its causes on one line, with gRPC statuses shown as
/// "message (code)".
pub fn one_line(error: &anyhow::Error) -> String {
    if let Some(status) = error.downcast_ref::<tonic::Status>() {
        return status_line(status);
    }
    let mut parts: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = match cause.downcast_ref::<tonic::Status>() {
            // A wrapper that already quoted the status's message.
            Some(status)
                if !status.message().is_empty()
                    && parts.iter().any(|p| p.contains(status.message())) =>
            {
                continue;
            }
            Some(status) => status_line(status),
            None => cause.to_string(),
        };
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ").replace('\n', " ")
}

fn status_line(status: &tonic::Status) -> String {
    let code = match status.code() {
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::Unauthenticated => "unauthenticated",
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::Unavailable => "coordinator unavailable",
        tonic::Code::DeadlineExceeded => "deadline exceeded",
        _ => "coordinator error",
    };
    format!("{}: {}", code, status.message()).replace('\n', " ")
}

/// A plain text table with left-aligned columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let pad = widths[i] - cell.chars().count();
                out.push_str(cell);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// 1234567 → "1.23M".
pub fn human(n: f64) -> String {
    let (value, suffix) = match n.abs() {
        x if x >= 1e12 => (n / 1e12, "T"),
        x if x >= 1e9 => (n / 1e9, "B"),
        x if x >= 1e6 => (n / 1e6, "M"),
        x if x >= 1e3 => (n / 1e3, "k"),
        _ => return format!("{n:.0}"),
    };
    format!("{value:.2}{suffix}")
}

/// "running (phase 2/3 extension)" for people.
pub fn run_state_line(run: &Run) -> String {
    let state = names::run_state(run.state);
    if run.state == RunState::Running as i32 {
        let name = run
            .phases
            .get(run.phase_index as usize)
            .map_or("", |p| p.name.as_str());
        format!(
            "{state} (phase {}/{} {name})",
            run.phase_index + 1,
            run.phases.len()
        )
    } else {
        state.to_string()
    }
}

fn age(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let secs = (now - ms).max(0) / 1000;
    match secs {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86_400),
    }
}

pub fn runs_table(runs: &[Run]) -> String {
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|run| {
            let spec = run.spec.clone().unwrap_or_default();
            let (done, budget) = run.phases.iter().fold((0u64, 0u64), |(d, b), p| {
                (d + p.tokens_done, b + p.token_budget)
            });
            let loss = run
                .phases
                .get(run.phase_index as usize)
                .map(|p| p.loss)
                .filter(|l| *l != 0.0)
                .map_or("-".to_string(), |l| format!("{l:.4}"));
            vec![
                run.id.clone(),
                spec.name.clone(),
                spec.model.map(|m| m.name).unwrap_or_default(),
                names::objective(spec.objective).to_string(),
                run_state_line(run),
                format!("{}/{}", human(done as f64), human(budget as f64)),
                loss,
                age(run.created_ms),
            ]
        })
        .collect();
    table(
        &[
            "RUN",
            "NAME",
            "MODEL",
            "OBJECTIVE",
            "STATE",
            "TOKENS",
            "LOSS",
            "SUBMITTED",
        ],
        &rows,
    )
}

pub fn run_report(run: &Run) -> String {
    let spec = run.spec.clone().unwrap_or_default();
    let mut out = String::new();
    out.push_str(&format!("run        {} ({})\n", run.id, spec.name));
    out.push_str(&format!(
        "model      {} {}, world size {}, global batch {}\n",
        spec.model.as_ref().map_or("", |m| m.name.as_str()),
        names::objective(spec.objective),
        spec.world_size,
        spec.global_batch
    ));
    out.push_str(&format!("dataset    {}\n", spec.dataset));
    out.push_str(&format!("state      {}\n", run_state_line(run)));
    if !run.message.is_empty() {
        out.push_str(&format!("message    {}\n", run.message));
    }
    out.push('\n');
    let phases: Vec<Vec<String>> = run
        .phases
        .iter()
        .enumerate()
        .map(|(i, p)| {
            vec![
                i.to_string(),
                p.name.clone(),
                format!("{}/{}", p.steps_done, p.num_steps),
                format!(
                    "{}/{}",
                    human(p.tokens_done as f64),
                    human(p.token_budget as f64)
                ),
                if p.loss == 0.0 {
                    "-".into()
                } else {
                    format!("{:.4}", p.loss)
                },
                if p.tokens_per_sec == 0.0 {
                    "-".into()
                } else {
                    human(p.tokens_per_sec)
                },
                last_eval(run, i).map_or("-".into(), |e| format!("{:.4}", e.loss)),
                phase_state(run, i, p).into(),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "PHASE", "NAME", "STEPS", "TOKENS", "LOSS", "TOK/S", "HELD-OUT", "STATE",
        ],
        &phases,
    ));
    if !run.evals.is_empty() {
        out.push('\n');
        let evals: Vec<Vec<String>> = run
            .evals
            .iter()
            .rev()
            .take(10)
            .map(|e| {
                let failed = !e.error.is_empty();
                let number = |v: String| if failed { "-".to_string() } else { v };
                vec![
                    e.phase_index.to_string(),
                    e.step.to_string(),
                    human(e.tokens as f64),
                    number(format!("{:.4}", e.loss)),
                    number(format!("{:.2}", e.loss.exp())),
                    number(format!("{:.4}", e.accuracy)),
                    e.rows.to_string(),
                    format!("{:.1}", e.seconds),
                    if failed {
                        format!("failed: {}", e.error)
                    } else {
                        String::new()
                    },
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "PHASE",
                "STEP",
                "TOKENS",
                "HELD-OUT LOSS",
                "PERPLEXITY",
                "ACCURACY",
                "ROWS",
                "SECONDS",
                "",
            ],
            &evals,
        ));
    }
    if !run.checkpoint_evals.is_empty() {
        out.push('\n');
        out.push_str(&checkpoint_evals_table(run));
    }
    if !run.attempts.is_empty() {
        out.push('\n');
        let attempts: Vec<Vec<String>> = run
            .attempts
            .iter()
            .enumerate()
            .map(|(i, a)| {
                vec![
                    (i + 1).to_string(),
                    a.world_id.clone(),
                    a.workers.len().to_string(),
                    a.phase_index.to_string(),
                    a.start_checkpoint.as_ref().map_or("initial".into(), |c| {
                        format!("phase {} step {}", c.phase_index, c.step)
                    }),
                    if a.ended_ms == 0 {
                        "live".into()
                    } else {
                        a.end_reason.clone()
                    },
                ]
            })
            .collect();
        out.push_str(&table(
            &["ATTEMPT", "WORLD", "RANKS", "FROM PHASE", "FROM", "ENDED"],
            &attempts,
        ));
    }
    if !run.checkpoints.is_empty() {
        out.push('\n');
        let checkpoints: Vec<Vec<String>> = run
            .checkpoints
            .iter()
            .rev()
            .take(10)
            .map(|c| {
                vec![
                    c.phase_index.to_string(),
                    c.step.to_string(),
                    human(c.tokens as f64),
                    c.url.clone(),
                    age(c.committed_ms),
                ]
            })
            .collect();
        out.push_str(&table(
            &["PHASE", "STEP", "TOKENS", "CHECKPOINT", "COMMITTED"],
            &checkpoints,
        ));
    }
    out
}

fn phase_state(run: &Run, index: usize, phase: &PhaseProgress) -> &'static str {
    if phase.finished_ms != 0 {
        "done"
    } else if index as u32 == run.phase_index && run.state == RunState::Running as i32 {
        "training"
    } else if index as u32 > run.phase_index || run.state == RunState::Pending as i32 {
        "waiting"
    } else {
        "stopped"
    }
}

/// The run's tasks on its checkpoints: one row per checkpoint scored, one
/// column per task (its primary metric).
fn checkpoint_evals_table(run: &Run) -> String {
    let tasks: Vec<String> = run
        .spec
        .as_ref()
        .and_then(|s| s.eval.as_ref())
        .map(|e| e.tasks.clone())
        .unwrap_or_default();
    let rows: Vec<Vec<String>> = run
        .checkpoint_evals
        .iter()
        .map(|e| {
            let c = e.checkpoint.clone().unwrap_or_default();
            let mut row = vec![
                e.id.clone(),
                c.phase_index.to_string(),
                c.step.to_string(),
                human(c.tokens as f64),
                names::checkpoint_eval_state(e.state).to_string(),
            ];
            for task in &tasks {
                row.push(
                    e.scores
                        .iter()
                        .find(|s| &s.task == task)
                        .and_then(|s| s.metrics.get(&s.primary_metric).map(|v| (s, v)))
                        .map_or("-".into(), |(s, v)| format!("{v:.3} {}", s.primary_metric)),
                );
            }
            row.push(e.error.clone());
            row
        })
        .collect();
    let mut headers: Vec<&str> = vec!["EVAL", "PHASE", "STEP", "TOKENS", "TASKS"];
    headers.extend(tasks.iter().map(String::as_str));
    headers.push("");
    table(&headers, &rows)
}

/// A task's scores as `twinhead eval --json` prints them.
pub fn task_score_json(score: &TaskScore) -> Value {
    let mut fields = serde_json::Map::new();
    for (metric, value) in &score.metrics {
        fields.insert(metric.clone(), json!(value));
    }
    fields.insert("docs".into(), json!(score.docs));
    fields.insert("primary_metric".into(), json!(score.primary_metric));
    Value::Object(fields)
}

fn checkpoint_eval_json(e: &CheckpointEval) -> Value {
    let scores: serde_json::Map<String, Value> = e
        .scores
        .iter()
        .map(|s| (s.task.clone(), task_score_json(s)))
        .collect();
    json!({
        "id": e.id,
        "checkpoint": e.checkpoint.as_ref().map(checkpoint_json),
        "state": names::checkpoint_eval_state(e.state),
        "worker_id": e.worker_id,
        "scores": scores,
        "error": e.error,
        "tries": e.tries,
        "started_ms": e.started_ms,
        "finished_ms": e.finished_ms,
    })
}

/// The latest successful held-out evaluation of phase `index`.
fn last_eval(run: &Run, index: usize) -> Option<&EvalPoint> {
    run.evals
        .iter()
        .rev()
        .find(|e| e.phase_index as usize == index && e.error.is_empty())
}

pub fn eval_json(e: &EvalPoint) -> Value {
    json!({
        "phase_index": e.phase_index,
        "world_id": e.world_id,
        "step": e.step,
        "tokens": e.tokens,
        "loss": e.loss,
        "perplexity": e.loss.exp(),
        "accuracy": e.accuracy,
        "rows": e.rows,
        "targets": e.targets,
        "seconds": e.seconds,
        "time_ms": e.time_ms,
        "error": e.error,
    })
}

fn checkpoint_json(c: &Checkpoint) -> Value {
    json!({
        "phase_index": c.phase_index,
        "step": c.step,
        "tokens": c.tokens,
        "url": c.url,
        "world_id": c.world_id,
        "committed_ms": c.committed_ms,
    })
}

fn attempt_json(a: &Attempt) -> Value {
    json!({
        "world_id": a.world_id,
        "workers": a.workers,
        "phase_index": a.phase_index,
        "start_checkpoint": a.start_checkpoint.as_ref().map(checkpoint_json),
        "started_ms": a.started_ms,
        "ended_ms": a.ended_ms,
        "end_reason": a.end_reason,
        "failed": a.failed,
    })
}

/// The resolved spec: what the coordinator received.
pub fn spec_json(spec: &RunSpec) -> Value {
    let optimizer = spec.optimizer.clone().unwrap_or_default();
    let checkpoint = spec.checkpoint.clone().unwrap_or_default();
    json!({
        "name": spec.name,
        "model": spec.model.as_ref().map(|m| json!({
            "name": m.name,
            "vocab_size": m.vocab_size,
            "hidden_size": m.hidden_size,
            "num_layers": m.num_layers,
            "num_heads": m.num_heads,
            "intermediate_size": m.intermediate_size,
            "max_position_embeddings": m.max_position_embeddings,
        })),
        "objective": names::objective(spec.objective),
        "dataset": spec.dataset,
        "seed": spec.seed,
        "world_size": spec.world_size,
        "min_world_size": spec.min_world_size,
        "global_batch": spec.global_batch,
        "micro_batch": spec.micro_batch,
        "batch_warmup": spec.batch_warmup.map(|w| json!({"start": w.start, "tokens": w.tokens})),
        "init_from": spec.init_from,
        "max_restarts": spec.max_restarts,
        "optimizer": {
            "name": optimizer.name,
            "peak_lr": optimizer.peak_lr,
            "beta1": optimizer.beta1,
            "beta2": optimizer.beta2,
            "eps": optimizer.eps,
            "weight_decay": optimizer.weight_decay,
            "grad_clip": optimizer.grad_clip,
        },
        "checkpoint": {
            "root": checkpoint.root,
            "every_tokens": checkpoint.every_tokens,
            "keep_last": checkpoint.keep_last,
        },
        "eval": spec.eval.as_ref().map(|e| json!({
            "every_tokens": e.every_tokens,
            "max_rows": e.max_rows,
            "mask_ratio": e.mask_ratio,
            "tasks": e.tasks,
            "limit": e.task_limit,
            "at": if e.tasks_every_tokens == 0 { json!("phase_end") } else { json!(e.tasks_every_tokens) },
            "tasks_dir": e.tasks_dir,
        })),
        "phases": spec.phases.iter().enumerate().map(|(i, p)| {
            let lr = p.lr.unwrap_or_default();
            json!({
                "name": p.name,
                "dataset_phase": p.dataset_phase,
                "tokens": p.tokens,
                "steps": twinhead_proto::num_steps(spec, i),
                "seq_len": p.seq_len,
                "mask_ratio": p.mask_ratio,
                "global_rope_theta": p.global_rope_theta,
                "local_rope_theta": p.local_rope_theta,
                "lr": {
                    "shape": LrShape::try_from(lr.shape).map(|s| s.as_str_name().trim_start_matches("LR_SHAPE_").to_ascii_lowercase()).unwrap_or_default(),
                    "warmup_tokens": lr.warmup_tokens,
                    "start_factor": lr.start_factor,
                    "end_factor": lr.end_factor,
                    "decay_tokens": lr.decay_tokens,
                },
            })
        }).collect::<Vec<_>>(),
    })
}

pub fn run_json(run: &Run) -> Value {
    let spec = run.spec.clone().unwrap_or_default();
    json!({
        "run_id": run.id,
        "name": spec.name,
        "model": spec.model.as_ref().map(|m| m.name.clone()),
        "objective": names::objective(spec.objective),
        "dataset": spec.dataset,
        "world_size": spec.world_size,
        "global_batch": spec.global_batch,
        "state": names::run_state(run.state),
        "phase_index": run.phase_index,
        "message": run.message,
        "created_ms": run.created_ms,
        "updated_ms": run.updated_ms,
        "phases": run.phases.iter().enumerate().map(|(i, p)| json!({
            "name": p.name,
            "token_budget": p.token_budget,
            "num_steps": p.num_steps,
            "steps_done": p.steps_done,
            "tokens_done": p.tokens_done,
            "loss": p.loss,
            "tokens_per_sec": p.tokens_per_sec,
            "lr": p.lr,
            "grad_norm": p.grad_norm,
            "mfu": p.mfu,
            "started_ms": p.started_ms,
            "finished_ms": p.finished_ms,
            "eval_loss": last_eval(run, i).map(|e| e.loss),
        })).collect::<Vec<_>>(),
        "attempts": run.attempts.iter().map(attempt_json).collect::<Vec<_>>(),
        "checkpoints": run.checkpoints.iter().map(checkpoint_json).collect::<Vec<_>>(),
        "evals": run.evals.iter().map(eval_json).collect::<Vec<_>>(),
        "checkpoint_evals": run.checkpoint_evals.iter().map(checkpoint_eval_json).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["A", "LONG"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONG\nxyz  1\nq    22\n");
    }

    #[test]
    fn human_counts() {
        assert_eq!(human(999.0), "999");
        assert_eq!(human(1_700_000_000_000.0), "1.70T");
        assert_eq!(human(65_536.0), "65.54k");
    }

    #[test]
    fn status_errors_are_one_line() {
        let e = anyhow::Error::new(tonic::Status::invalid_argument(
            "spec.world_size: must\ndivide",
        ));
        assert_eq!(
            one_line(&e),
            "invalid argument: spec.world_size: must divide"
        );
        // An error type quoting its source status's message says it once.
        #[derive(Debug)]
        struct Wrapper(tonic::Status);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "coordinator: {}", self.0.message())
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let wrapped = anyhow::Error::new(Wrapper(tonic::Status::unauthenticated(
            "needs a certificate",
        )));
        assert_eq!(one_line(&wrapped), "coordinator: needs a certificate");
    }
}
