//! `/metrics`: runs and workers in the Prometheus text exposition format
//! (version 0.0.4). A pure function of a state snapshot, so it is cheap to
//! test and never touches the store.
//!
//! Per-run series carry `run` and `name` labels; per-worker series exist for
//! live workers only (dead ones are counted in `twinhead_workers`), so the
//! number of series does not grow with every worker that ever registered.
//!
//! [`Liveness`] adds what a snapshot cannot hold: how long the coordinator
//! took to handle heartbeats, and how long its lease checks ran late.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use twinhead_proto::v1::{
    CheckpointEval, CheckpointEvalState, EvalPoint, PhaseProgress, Run, RunState,
};

use crate::state::WorkerView;
use crate::store::WorkerStatus;

/// Every run state, in lifecycle order, for the per-state counts.
const RUN_STATES: [RunState; 5] = [
    RunState::Pending,
    RunState::Running,
    RunState::Completed,
    RunState::Failed,
    RunState::Cancelled,
];

/// What a live worker is doing (scoring a checkpoint's tasks is
/// `evaluating`); dead is the last state of the count.
const WORKER_STATES: [&str; 4] = ["idle", "training", "evaluating", "dead"];

/// The state monitoring reports for a worker.
pub(crate) fn worker_state(worker: &WorkerView) -> &'static str {
    match (worker.row.status, &worker.placement, &worker.job) {
        (WorkerStatus::Dead, _, _) => "dead",
        (WorkerStatus::Alive, Some(_), _) => "training",
        (WorkerStatus::Alive, None, Some(_)) => "evaluating",
        (WorkerStatus::Alive, None, None) => "idle",
    }
}

/// The phase whose last report describes the run now: the current phase if
/// it has reported, else the latest earlier one that has (a run that has
/// just moved to a new phase still shows its last loss).
pub(crate) fn reported_phase(run: &Run) -> Option<&PhaseProgress> {
    let current = run.phase_index as usize;
    run.phases
        .iter()
        .take(current + 1)
        .rev()
        .find(|p| p.steps_done > 0 || p.tokens_done > 0)
}

/// The run's latest held-out evaluation that succeeded.
pub(crate) fn last_eval(run: &Run) -> Option<&EvalPoint> {
    run.evals.iter().rev().find(|e| e.error.is_empty())
}

/// The run's newest checkpoint whose tasks were scored.
pub(crate) fn last_scored_checkpoint(run: &Run) -> Option<&CheckpointEval> {
    run.checkpoint_evals
        .iter()
        .rev()
        .find(|e| e.state == CheckpointEvalState::Done as i32)
}

/// Every checkpoint evaluation state.
const CHECKPOINT_EVAL_STATES: [CheckpointEvalState; 4] = [
    CheckpointEvalState::Pending,
    CheckpointEvalState::Running,
    CheckpointEvalState::Done,
    CheckpointEvalState::Failed,
];

/// Tokens trained in all phases of the run.
pub(crate) fn run_tokens(run: &Run) -> u64 {
    run.phases.iter().map(|p| p.tokens_done).sum()
}

/// A per-run gauge: its name, help, and value (none: no sample).
struct RunGauge {
    name: &'static str,
    help: &'static str,
    value: fn(&Run) -> Option<f64>,
}

/// Renders the exposition text.
pub(crate) fn render(runs: &[Run], workers: &[WorkerView]) -> String {
    let mut out = String::with_capacity(4096);

    family(
        &mut out,
        "twinhead_runs",
        "Runs known to the coordinator, by state.",
    );
    for state in RUN_STATES {
        let count = runs.iter().filter(|r| r.state == state as i32).count();
        sample(
            &mut out,
            "twinhead_runs",
            &[("state", twinhead_proto::names::run_state(state as i32))],
            count as f64,
        );
    }

    let per_run = [
        RunGauge {
            name: "twinhead_run_phase_index",
            help: "Index of the phase the run is in (0-based).",
            value: |r| Some(f64::from(r.phase_index)),
        },
        RunGauge {
            name: "twinhead_run_step",
            help: "Steps done in the run's current phase.",
            value: |r| {
                r.phases
                    .get(r.phase_index as usize)
                    .map(|p| p.steps_done as f64)
            },
        },
        RunGauge {
            name: "twinhead_run_tokens",
            help: "Tokens trained in all phases of the run.",
            value: |r| Some(run_tokens(r) as f64),
        },
        RunGauge {
            name: "twinhead_run_loss",
            help: "Training loss last reported by the run's rank 0.",
            value: |r| reported_phase(r).map(|p| p.loss),
        },
        RunGauge {
            name: "twinhead_run_tokens_per_second",
            help: "Training throughput of the run's world last reported, in tokens per second.",
            value: |r| reported_phase(r).map(|p| p.tokens_per_sec),
        },
        RunGauge {
            name: "twinhead_run_mfu_ratio",
            help: "Model FLOPs utilisation last reported (0..1); absent when workers do not report it.",
            value: |r| reported_phase(r).map(|p| p.mfu).filter(|mfu| *mfu > 0.0),
        },
        RunGauge {
            name: "twinhead_run_eval_loss",
            help: "Held-out loss (nats per predicted token) of the run's latest evaluation.",
            value: |r| last_eval(r).map(|e| e.loss),
        },
        RunGauge {
            name: "twinhead_run_eval_accuracy",
            help: "Share of held-out predicted tokens ranked first, at the latest evaluation.",
            value: |r| last_eval(r).map(|e| e.accuracy),
        },
        RunGauge {
            name: "twinhead_run_eval_failures",
            help: "Held-out evaluations of the run that failed (training went on).",
            value: |r| {
                let failed = r.evals.iter().filter(|e| !e.error.is_empty()).count();
                (!r.evals.is_empty()).then_some(failed as f64)
            },
        },
        RunGauge {
            name: "twinhead_run_checkpoints",
            help: "Checkpoints committed by the run.",
            value: |r| Some(r.checkpoints.len() as f64),
        },
    ];
    for RunGauge { name, help, value } in per_run {
        family(&mut out, name, help);
        for run in runs {
            if let Some(v) = value(run) {
                let run_name = run.spec.as_ref().map_or("", |s| s.name.as_str());
                sample(&mut out, name, &[("run", &run.id), ("name", run_name)], v);
            }
        }
    }

    family(
        &mut out,
        "twinhead_run_task_score",
        "Primary metric of each task on the run's latest scored checkpoint.",
    );
    for run in runs {
        let Some(scored) = last_scored_checkpoint(run) else {
            continue;
        };
        let run_name = run.spec.as_ref().map_or("", |s| s.name.as_str());
        for score in &scored.scores {
            if let Some(value) = score.metrics.get(&score.primary_metric) {
                sample(
                    &mut out,
                    "twinhead_run_task_score",
                    &[
                        ("run", &run.id),
                        ("name", run_name),
                        ("task", &score.task),
                        ("metric", &score.primary_metric),
                    ],
                    *value,
                );
            }
        }
    }
    family(
        &mut out,
        "twinhead_run_checkpoint_evals",
        "Checkpoint evaluations of the run's tasks, by state (pending, running, done, failed).",
    );
    for run in runs.iter().filter(|r| !r.checkpoint_evals.is_empty()) {
        let run_name = run.spec.as_ref().map_or("", |s| s.name.as_str());
        for state in CHECKPOINT_EVAL_STATES {
            let label = twinhead_proto::names::checkpoint_eval_state(state as i32);
            let count = run
                .checkpoint_evals
                .iter()
                .filter(|e| e.state == state as i32)
                .count();
            sample(
                &mut out,
                "twinhead_run_checkpoint_evals",
                &[("run", &run.id), ("name", run_name), ("state", label)],
                count as f64,
            );
        }
    }

    family(
        &mut out,
        "twinhead_workers",
        "Registered workers, by state (idle, training, evaluating, dead).",
    );
    for state in WORKER_STATES {
        let count = workers.iter().filter(|w| worker_state(w) == state).count();
        sample(
            &mut out,
            "twinhead_workers",
            &[("state", state)],
            count as f64,
        );
    }

    let live: Vec<&WorkerView> = workers
        .iter()
        .filter(|w| w.row.status == WorkerStatus::Alive)
        .collect();
    family(
        &mut out,
        "twinhead_worker_heartbeat_age_seconds",
        "Seconds since a live worker's last heartbeat (or since the coordinator started).",
    );
    for w in &live {
        sample(
            &mut out,
            "twinhead_worker_heartbeat_age_seconds",
            &[("worker", &w.row.id), ("hostname", &w.row.hostname)],
            w.heartbeat_age.as_secs_f64(),
        );
    }
    family(
        &mut out,
        "twinhead_worker_state",
        "1 for a live worker's current state (idle, training or evaluating), 0 for the others.",
    );
    for w in &live {
        let current = worker_state(w);
        for state in ["idle", "training", "evaluating"] {
            sample(
                &mut out,
                "twinhead_worker_state",
                &[
                    ("worker", &w.row.id),
                    ("hostname", &w.row.hostname),
                    ("state", state),
                ],
                if state == current { 1.0 } else { 0.0 },
            );
        }
    }
    out
}

/// Upper bounds, in seconds, of the heartbeat handling histogram's buckets.
const HANDLING_BOUNDS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// How well the coordinator keeps up with heartbeats, counted as they
/// happen; atomics, so that a heartbeat never waits on monitoring.
#[derive(Default)]
pub(crate) struct Liveness {
    /// Heartbeats per handling-time bucket (not cumulative); the last one
    /// counts those beyond every bound.
    handled: [AtomicU64; HANDLING_BOUNDS.len() + 1],
    handled_nanos: AtomicU64,
    /// Lease checks that ran late, and their delay in total.
    stalls: AtomicU64,
    stalled_nanos: AtomicU64,
}

impl Liveness {
    /// A heartbeat took `took` from its handler's start to its answer.
    pub(crate) fn heartbeat_handled(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = HANDLING_BOUNDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(HANDLING_BOUNDS.len());
        self.handled[bucket].fetch_add(1, Ordering::Relaxed);
        self.handled_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// A lease check ran `late`; leases were extended by as much.
    pub(crate) fn stalled(&self, late: Duration) {
        self.stalls.fetch_add(1, Ordering::Relaxed);
        self.stalled_nanos
            .fetch_add(late.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Appends the [`Liveness`] families.
pub(crate) fn render_liveness(out: &mut String, liveness: &Liveness) {
    let name = "twinhead_heartbeat_handling_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time the coordinator took to handle a heartbeat, from its handler's start to \
         its answer (waiting for the state lock included)."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    let mut cumulative = 0;
    for (i, count) in liveness.handled.iter().enumerate() {
        cumulative += count.load(Ordering::Relaxed);
        let bound = HANDLING_BOUNDS.get(i).copied().unwrap_or(f64::INFINITY);
        sample(
            out,
            &format!("{name}_bucket"),
            &[("le", &format_value(bound))],
            cumulative as f64,
        );
    }
    let seconds = |nanos: &AtomicU64| nanos.load(Ordering::Relaxed) as f64 / 1e9;
    sample(
        out,
        &format!("{name}_sum"),
        &[],
        seconds(&liveness.handled_nanos),
    );
    sample(out, &format!("{name}_count"), &[], cumulative as f64);
    for (name, help, value) in [
        (
            "twinhead_lease_checks_late_total",
            "Lease checks that ran late enough to extend every lease (the coordinator too busy, or not scheduled).",
            liveness.stalls.load(Ordering::Relaxed) as f64,
        ),
        (
            "twinhead_lease_check_delay_seconds_total",
            "Total delay of those late lease checks: time by which leases were extended.",
            seconds(&liveness.stalled_nanos),
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(out, "# TYPE {name} counter");
        sample(out, name, &[], value);
    }
}

fn family(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} gauge");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (key, val)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{key}=\"{}\"", escape_label_value(val));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", format_value(value));
}

/// Label values escape backslash, double quote and line feed.
fn escape_label_value(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// HELP text escapes backslash and line feed.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Go's float syntax: `NaN`, `+Inf`, `-Inf`, else a plain decimal.
fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_and_help_are_escaped() {
        assert_eq!(escape_label_value("a\\b \"c\"\nd"), "a\\\\b \\\"c\\\"\\nd");
        assert_eq!(escape_help("x\\y\nz \"q\""), "x\\\\y\\nz \"q\"");
    }

    #[test]
    fn special_floats_use_go_syntax() {
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(2.5), "2.5");
        assert_eq!(format_value(1e-7), "0.0000001");
    }

    #[test]
    fn heartbeat_handling_is_a_cumulative_histogram() {
        let liveness = Liveness::default();
        liveness.heartbeat_handled(Duration::from_micros(30));
        liveness.heartbeat_handled(Duration::from_micros(700));
        liveness.heartbeat_handled(Duration::from_secs(20));
        liveness.stalled(Duration::from_millis(1500));
        let mut text = String::new();
        render_liveness(&mut text, &liveness);
        for line in [
            "twinhead_heartbeat_handling_seconds_bucket{le=\"0.00005\"} 1\n",
            "twinhead_heartbeat_handling_seconds_bucket{le=\"0.0005\"} 1\n",
            "twinhead_heartbeat_handling_seconds_bucket{le=\"0.001\"} 2\n",
            "twinhead_heartbeat_handling_seconds_bucket{le=\"10\"} 2\n",
            "twinhead_heartbeat_handling_seconds_bucket{le=\"+Inf\"} 3\n",
            "twinhead_heartbeat_handling_seconds_count 3\n",
            "twinhead_lease_checks_late_total 1\n",
            "twinhead_lease_check_delay_seconds_total 1.5\n",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn empty_state_still_names_every_family_once() {
        let text = render(&[], &[]);
        for name in [
            "twinhead_runs",
            "twinhead_run_loss",
            "twinhead_run_mfu_ratio",
            "twinhead_workers",
            "twinhead_worker_heartbeat_age_seconds",
        ] {
            let type_line = format!("# TYPE {name} gauge\n");
            assert_eq!(text.matches(&type_line).count(), 1, "{name} in\n{text}");
        }
        assert!(
            text.contains("twinhead_runs{state=\"pending\"} 0\n"),
            "{text}"
        );
    }
}
