//! The HTTP port: the dashboard page, the JSON API it polls, and
//! `/metrics` for Prometheus. Read-only: nothing here changes state.
//!
//! `GET /` is a static page with no data in it, so it is always served;
//! `/api/*` and `/metrics` need `Authorization: Bearer <user token>` when the
//! coordinator has a user token (the page takes the token from its URL
//! fragment, `/#token=...`, which browsers never send to the server).

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use twinhead_proto::v1::{Attempt, Checkpoint, CheckpointEval, PhaseProgress, Run};

use twinhead_proto::auth::{TokenProblem, check_bearer};

use crate::metrics::{self, reported_phase, worker_state};
use crate::state::WorkerView;
use crate::store::ProgressRow;
use crate::{Coordinator, Error};
use twinhead_proto::names;

/// The dashboard: one self-contained file (no CDN, no build step).
const DASHBOARD: &str = include_str!("dashboard.html");

/// Points per progress answer unless the caller asks otherwise: plenty for
/// a chart a few thousand pixels wide.
const DEFAULT_MAX_POINTS: usize = 2000;

#[derive(Clone)]
struct Shared {
    coordinator: Arc<Coordinator>,
    user_token: Option<Arc<str>>,
}

/// The routes of the HTTP port.
pub(crate) fn router(coordinator: Arc<Coordinator>, user_token: Option<Arc<str>>) -> Router {
    let shared = Shared {
        coordinator,
        user_token,
    };
    let protected = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/api/runs", get(list_runs))
        .route("/api/runs/{id}", get(get_run))
        .route("/api/runs/{id}/progress", get(get_progress))
        .route("/api/workers", get(list_workers))
        .route("/api/datasets", get(list_datasets))
        .route_layer(middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ));
    Router::new()
        .route("/", get(dashboard))
        .merge(protected)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such page".into()) })
        .with_state(shared)
}

async fn require_token(State(shared): State<Shared>, request: Request, next: Next) -> Response {
    let Some(expected) = shared.user_token.as_deref() else {
        return next.run(request).await;
    };
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let problem = match check_bearer(header, expected) {
        Ok(()) => return next.run(request).await,
        Err(TokenProblem::Wrong) => "wrong token for the HTTP API",
        Err(TokenProblem::Missing) => {
            "the HTTP API needs the user token: Authorization: Bearer <token>"
        }
    };
    let mut response = error(StatusCode::UNAUTHORIZED, problem.into());
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

fn error(status: StatusCode, message: String) -> Response {
    (status, axum::Json(ErrorBody { error: message })).into_response()
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = match &self {
            Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::FailedPrecondition(_) => StatusCode::CONFLICT,
            Error::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error(status, self.to_string())
    }
}

async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

async fn metrics_text(State(shared): State<Shared>) -> Response {
    let runs = shared.coordinator.read(|s| s.list_runs(&[]));
    let workers = shared.coordinator.read(|s| s.workers(Instant::now()));
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    let mut text = metrics::render(&runs, &workers);
    metrics::render_liveness(&mut text, shared.coordinator.liveness());
    (headers, text).into_response()
}

// ------------------------------------------------------------------ runs

/// One line of the runs table.
#[derive(Serialize)]
struct RunSummary {
    id: String,
    name: String,
    model: String,
    objective: String,
    state: &'static str,
    /// Why the run failed or was cancelled.
    message: String,
    phase_index: u32,
    phase: String,
    phases: usize,
    /// Steps done and planned in the current phase.
    step: u64,
    num_steps: u64,
    /// Tokens trained in all phases.
    tokens: u64,
    /// Last reported (current phase, or the last one that reported).
    loss: Option<f64>,
    tokens_per_sec: Option<f64>,
    mfu: Option<f64>,
    world_size: u32,
    created_ms: i64,
    updated_ms: i64,
}

impl RunSummary {
    fn of(run: &Run) -> RunSummary {
        let spec = run.spec.as_ref();
        let current = run.phases.get(run.phase_index as usize);
        let reported = reported_phase(run);
        RunSummary {
            id: run.id.clone(),
            name: spec.map(|s| s.name.clone()).unwrap_or_default(),
            model: spec
                .and_then(|s| s.model.as_ref())
                .map(|m| m.name.clone())
                .unwrap_or_default(),
            objective: spec
                .map(|s| names::objective(s.objective).to_string())
                .unwrap_or_default(),
            state: names::run_state(run.state),
            message: run.message.clone(),
            phase_index: run.phase_index,
            phase: current.map(|p| p.name.clone()).unwrap_or_default(),
            phases: run.phases.len(),
            step: current.map_or(0, |p| p.steps_done),
            num_steps: current.map_or(0, |p| p.num_steps),
            tokens: metrics::run_tokens(run),
            loss: reported.map(|p| p.loss),
            tokens_per_sec: reported.map(|p| p.tokens_per_sec),
            mfu: reported.map(|p| p.mfu).filter(|m| *m > 0.0),
            world_size: spec.map_or(0, |s| s.world_size),
            created_ms: run.created_ms,
            updated_ms: run.updated_ms,
        }
    }
}

#[derive(Serialize)]
struct PhaseView {
    index: usize,
    name: String,
    token_budget: u64,
    num_steps: u64,
    steps_done: u64,
    tokens_done: u64,
    loss: f64,
    tokens_per_sec: f64,
    lr: f64,
    grad_norm: f64,
    mfu: f64,
    started_ms: i64,
    finished_ms: i64,
}

impl PhaseView {
    fn of(index: usize, p: &PhaseProgress) -> PhaseView {
        PhaseView {
            index,
            name: p.name.clone(),
            token_budget: p.token_budget,
            num_steps: p.num_steps,
            steps_done: p.steps_done,
            tokens_done: p.tokens_done,
            loss: p.loss,
            tokens_per_sec: p.tokens_per_sec,
            lr: p.lr,
            grad_norm: p.grad_norm,
            mfu: p.mfu,
            started_ms: p.started_ms,
            finished_ms: p.finished_ms,
        }
    }
}

#[derive(Serialize)]
struct CheckpointView {
    phase_index: u32,
    step: u64,
    tokens: u64,
    url: String,
    world_id: String,
    committed_ms: i64,
}

impl CheckpointView {
    fn of(c: &Checkpoint) -> CheckpointView {
        CheckpointView {
            phase_index: c.phase_index,
            step: c.step,
            tokens: c.tokens,
            url: c.url.clone(),
            world_id: c.world_id.clone(),
            committed_ms: c.committed_ms,
        }
    }
}

#[derive(Serialize)]
struct AttemptView {
    world_id: String,
    /// Worker ids by rank.
    workers: Vec<String>,
    phase_index: u32,
    start_checkpoint: Option<CheckpointView>,
    started_ms: i64,
    ended_ms: i64,
    end_reason: String,
    failed: bool,
}

impl AttemptView {
    fn of(a: &Attempt) -> AttemptView {
        AttemptView {
            world_id: a.world_id.clone(),
            workers: a.workers.clone(),
            phase_index: a.phase_index,
            start_checkpoint: a.start_checkpoint.as_ref().map(CheckpointView::of),
            started_ms: a.started_ms,
            ended_ms: a.ended_ms,
            end_reason: a.end_reason.clone(),
            failed: a.failed,
        }
    }
}

/// A task's scores on a checkpoint, as `twinhead eval --json` has them.
#[derive(Serialize)]
struct TaskScoreView {
    primary_metric: String,
    docs: u64,
    metrics: std::collections::BTreeMap<String, f64>,
}

#[derive(Serialize)]
struct CheckpointEvalView {
    id: String,
    checkpoint: Option<CheckpointView>,
    /// Tokens since the start of the run at the checkpoint (earlier phases'
    /// tokens trained, then this one's).
    run_tokens: u64,
    /// pending, running, done or failed.
    state: &'static str,
    worker_id: String,
    tries: u32,
    error: String,
    /// By task, in the spec's order.
    scores: Vec<(String, TaskScoreView)>,
}

impl CheckpointEvalView {
    fn of(run: &Run, e: &CheckpointEval) -> CheckpointEvalView {
        let c = e.checkpoint.clone().unwrap_or_default();
        let earlier: u64 = run
            .phases
            .iter()
            .take(c.phase_index as usize)
            .map(|p| p.tokens_done)
            .sum();
        CheckpointEvalView {
            id: e.id.clone(),
            run_tokens: earlier + c.tokens,
            checkpoint: e.checkpoint.as_ref().map(CheckpointView::of),
            state: twinhead_proto::names::checkpoint_eval_state(e.state),
            worker_id: e.worker_id.clone(),
            tries: e.tries,
            error: e.error.clone(),
            scores: e
                .scores
                .iter()
                .map(|s| {
                    (
                        s.task.clone(),
                        TaskScoreView {
                            primary_metric: s.primary_metric.clone(),
                            docs: s.docs,
                            metrics: s.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                        },
                    )
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
struct RunDetail {
    #[serde(flatten)]
    summary: RunSummary,
    phases: Vec<PhaseView>,
    attempts: Vec<AttemptView>,
    checkpoints: Vec<CheckpointView>,
    /// The run's tasks on its checkpoints (`[eval] tasks`).
    tasks: Vec<String>,
    checkpoint_evals: Vec<CheckpointEvalView>,
}

async fn list_runs(State(shared): State<Shared>) -> axum::Json<Vec<RunSummary>> {
    let runs = shared.coordinator.read(|s| s.list_runs(&[]));
    axum::Json(runs.iter().map(RunSummary::of).collect())
}

async fn get_run(
    State(shared): State<Shared>,
    Path(id): Path<String>,
) -> Result<axum::Json<RunDetail>, Error> {
    let run = shared.coordinator.read(|s| s.run(&id).cloned())?;
    Ok(axum::Json(RunDetail {
        summary: RunSummary::of(&run),
        phases: run
            .phases
            .iter()
            .enumerate()
            .map(|(i, p)| PhaseView::of(i, p))
            .collect(),
        attempts: run.attempts.iter().map(AttemptView::of).collect(),
        checkpoints: run.checkpoints.iter().map(CheckpointView::of).collect(),
        tasks: run
            .spec
            .as_ref()
            .and_then(|s| s.eval.as_ref())
            .map(|e| e.tasks.clone())
            .unwrap_or_default(),
        checkpoint_evals: run
            .checkpoint_evals
            .iter()
            .map(|e| CheckpointEvalView::of(&run, e))
            .collect(),
    }))
}

// -------------------------------------------------------------- progress

#[derive(Serialize)]
struct ProgressPoint {
    phase_index: u32,
    world_id: String,
    step: u64,
    /// Tokens trained in the phase.
    tokens: u64,
    /// Tokens since the start of the run (phases side by side).
    run_tokens: u64,
    loss: f64,
    tokens_per_sec: f64,
    lr: f64,
    grad_norm: f64,
    mfu: f64,
    time_ms: i64,
}

/// A held-out evaluation on the run's token axis.
#[derive(Serialize)]
struct EvalPointJson {
    phase_index: u32,
    world_id: String,
    step: u64,
    /// Tokens trained in the phase.
    tokens: u64,
    /// Tokens since the start of the run (phases side by side).
    run_tokens: u64,
    loss: f64,
    perplexity: f64,
    accuracy: f64,
    rows: u64,
    targets: u64,
    seconds: f64,
    time_ms: i64,
    /// Why it failed; empty when it did not.
    error: String,
}

#[derive(Serialize)]
struct ProgressBody {
    run_id: String,
    /// Phase names by index, for legends.
    phases: Vec<String>,
    points: Vec<ProgressPoint>,
    /// Held-out evaluations (all of them).
    evals: Vec<EvalPointJson>,
}

/// `?max_points=N` (0: all); anything else in the query is ignored.
fn max_points(query: Option<&str>) -> Result<usize, Error> {
    let Some(value) = query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("max_points="))
    else {
        return Ok(DEFAULT_MAX_POINTS);
    };
    value.parse().map_err(|_| {
        Error::InvalidArgument(format!("max_points: must be a whole number, got {value:?}"))
    })
}

async fn get_progress(
    State(shared): State<Shared>,
    Path(id): Path<String>,
    uri: axum::http::Uri,
) -> Result<axum::Json<ProgressBody>, Error> {
    let limit = max_points(uri.query())?;
    let (phases, evals) = shared.coordinator.read(|s| {
        s.run(&id).map(|r| {
            (
                r.phases.iter().map(|p| p.name.clone()).collect::<Vec<_>>(),
                r.evals.clone(),
            )
        })
    })?;
    let rows: Vec<ProgressRow> = shared.coordinator.progress(&id, limit).await?;
    let starts = crate::progress::phase_starts(&rows);
    let evals = evals
        .into_iter()
        .map(|e| EvalPointJson {
            run_tokens: crate::progress::on_run_axis(&starts, e.phase_index, e.tokens),
            perplexity: e.loss.exp(),
            phase_index: e.phase_index,
            world_id: e.world_id,
            step: e.step,
            tokens: e.tokens,
            loss: e.loss,
            accuracy: e.accuracy,
            rows: e.rows,
            targets: e.targets,
            seconds: e.seconds,
            time_ms: e.time_ms,
            error: e.error,
        })
        .collect();
    let run_tokens = crate::progress::run_tokens(&rows);
    let points = rows
        .into_iter()
        .zip(run_tokens)
        .map(|(r, run_tokens)| ProgressPoint {
            phase_index: r.phase_index,
            world_id: r.world_id,
            step: r.step,
            tokens: r.tokens,
            run_tokens,
            loss: r.loss,
            tokens_per_sec: r.tokens_per_sec,
            lr: r.lr,
            grad_norm: r.grad_norm,
            mfu: r.mfu,
            time_ms: r.time_ms,
        })
        .collect();
    Ok(axum::Json(ProgressBody {
        run_id: id,
        phases,
        points,
        evals,
    }))
}

// --------------------------------------------------------------- workers

#[derive(Serialize)]
struct WorkerJson {
    id: String,
    hostname: String,
    device: String,
    pid: u32,
    /// idle, training or dead.
    state: &'static str,
    dead_reason: String,
    heartbeat_age_s: f64,
    registered_ms: i64,
    /// The run it trains in, or whose checkpoint it scores.
    run_id: Option<String>,
    world_id: Option<String>,
    rank: Option<u32>,
    world_size: Option<u32>,
    /// The checkpoint evaluation it is scoring (`eval-N` of `run_id`).
    eval_id: Option<String>,
}

impl WorkerJson {
    fn of(w: &WorkerView) -> WorkerJson {
        let p = w.placement.as_ref();
        WorkerJson {
            id: w.row.id.clone(),
            hostname: w.row.hostname.clone(),
            device: w.row.device.clone(),
            pid: w.row.pid,
            state: worker_state(w),
            dead_reason: w.row.dead_reason.clone(),
            heartbeat_age_s: w.heartbeat_age.as_secs_f64(),
            registered_ms: w.row.registered_ms,
            run_id: p
                .map(|p| p.run_id.clone())
                .or_else(|| w.job.as_ref().map(|(run, _)| run.clone())),
            world_id: p.map(|p| p.world_id.clone()),
            rank: p.map(|p| p.rank),
            world_size: p.map(|p| p.world_size),
            eval_id: w.job.as_ref().map(|(_, eval)| eval.clone()),
        }
    }
}

async fn list_workers(State(shared): State<Shared>) -> axum::Json<Vec<WorkerJson>> {
    let workers = shared.coordinator.read(|s| s.workers(Instant::now()));
    axum::Json(workers.iter().map(WorkerJson::of).collect())
}

// -------------------------------------------------------------- datasets

/// One dataset build, as the dashboard shows it.
#[derive(Serialize)]
struct DatasetJson {
    id: String,
    name: String,
    state: &'static str,
    step: &'static str,
    step_tasks: u32,
    step_tasks_done: u32,
    tokens: u64,
    processes: usize,
    url: String,
    error: String,
}

/// Dataset builds for the dashboard's Datasets section, oldest first.
async fn list_datasets(State(shared): State<Shared>) -> axum::Json<Vec<DatasetJson>> {
    let builds = shared.coordinator.dataset_builds();
    axum::Json(
        builds
            .into_iter()
            .map(|d| DatasetJson {
                state: names::dataset_state(d.state),
                step: names::dataprep_step(d.step),
                step_tasks: d.step_tasks,
                step_tasks_done: d.step_tasks_done,
                tokens: d.tokens,
                processes: d.processes.len(),
                id: d.id,
                name: d.name,
                url: d.url,
                error: d.error,
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_points_defaults_parses_and_names_a_bad_value() {
        assert_eq!(max_points(None).ok(), Some(DEFAULT_MAX_POINTS));
        assert_eq!(max_points(Some("a=1&max_points=7")).ok(), Some(7));
        let err = max_points(Some("max_points=lots"))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("max_points: must be a whole number, got \"lots\"")
        );
    }
}
