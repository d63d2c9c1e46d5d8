//! The tonic services: translate requests into coordinator operations and
//! errors into gRPC statuses. No decisions are made here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::instrument;
use twinhead_proto::v1::dataprep_service_server::DataprepService;
use twinhead_proto::v1::dataset_service_server::DatasetService;
use twinhead_proto::v1::run_service_server::RunService;
use twinhead_proto::v1::worker_service_server::WorkerService;
use twinhead_proto::v1::{
    BuildDatasetRequest, ClaimTaskRequest, ClaimTaskResponse, CompleteTaskRequest,
    CompleteTaskResponse, Dataset, FailTaskRequest, FailTaskResponse, GetDatasetRequest,
    ListDatasetsRequest, ListDatasetsResponse, RenewTaskRequest, RenewTaskResponse,
};
use twinhead_proto::v1::{
    CancelRunRequest, GetAssignmentRequest, GetAssignmentResponse, GetProgressRequest,
    GetProgressResponse, GetRunRequest, HeartbeatRequest, HeartbeatResponse, LeaveRequest,
    ListRunsRequest, ListRunsResponse, ProgressPoint, RegisterRequest, RegisterResponse,
    RendezvousRequest, RendezvousResponse, ReportCheckpointEvalRequest, ReportCheckpointRequest,
    ReportEvalRequest, ReportFailureRequest, ReportProgressRequest, Run, RunEvent, RunEventKind,
    RunState, SubmitRunRequest, SubmitRunResponse, WatchRunRequest, WorkerAck, WorkerAction,
};

use crate::Coordinator;

/// Both services share one coordinator.
#[derive(Clone)]
pub struct Services {
    pub coordinator: Arc<Coordinator>,
}

fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.trim().is_empty() {
        Err(Status::invalid_argument(format!("{field}: is required")))
    } else {
        Ok(())
    }
}

fn ack((action, reason): (WorkerAction, String)) -> Response<WorkerAck> {
    Response::new(WorkerAck {
        action: action as i32,
        reason,
    })
}

fn is_final(run: &Run) -> bool {
    matches!(
        RunState::try_from(run.state),
        Ok(RunState::Completed | RunState::Failed | RunState::Cancelled)
    )
}

#[tonic::async_trait]
impl RunService for Services {
    #[instrument(skip_all)]
    async fn submit_run(
        &self,
        request: Request<SubmitRunRequest>,
    ) -> Result<Response<SubmitRunResponse>, Status> {
        let spec = request
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: is required"))?;
        // The spec's own rules first (no storage read for a malformed
        // spec), then the dataset it names.
        twinhead_proto::validate_run_spec(&spec)
            .map_err(|e| Status::invalid_argument(crate::status_message(format!("spec.{e}"))))?;
        crate::dataset_check::check_run_dataset(&spec)
            .await
            .map_err(|s| Status::new(s.code(), crate::status_message(s.message().to_string())))?;
        let run_id = self
            .coordinator
            .apply(|s, now, fx| s.submit(spec, now, fx))
            .await?;
        tracing::info!(run = %run_id, "run submitted");
        Ok(Response::new(SubmitRunResponse { run_id }))
    }

    async fn get_run(&self, request: Request<GetRunRequest>) -> Result<Response<Run>, Status> {
        let id = request.into_inner().run_id;
        required("run_id", &id)?;
        let run = self.coordinator.read(|s| s.run(&id).cloned())?;
        Ok(Response::new(run))
    }

    async fn list_runs(
        &self,
        request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        let states = request.into_inner().states;
        let runs = self.coordinator.read(|s| s.list_runs(&states));
        Ok(Response::new(ListRunsResponse { runs }))
    }

    type WatchRunStream = ReceiverStream<Result<RunEvent, Status>>;

    async fn watch_run(
        &self,
        request: Request<WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let id = request.into_inner().run_id;
        required("run_id", &id)?;
        // Subscribe before the snapshot so no change falls between them.
        let mut events = self.coordinator.subscribe();
        let snapshot = self.coordinator.read(|s| s.run(&id).cloned())?;
        let (tx, rx) = mpsc::channel(64);
        let coordinator = self.coordinator.clone();
        tokio::spawn(async move {
            let done = is_final(&snapshot);
            let first = RunEvent {
                kind: RunEventKind::Snapshot as i32,
                run: Some(snapshot),
                message: String::new(),
            };
            if tx.send(Ok(first)).await.is_err() || done {
                return;
            }
            loop {
                let event = match events.recv().await {
                    Ok(event) if event.run.as_ref().is_some_and(|r| r.id == id) => (*event).clone(),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind: start again from the current state.
                        let Ok(run) = coordinator.read(|s| s.run(&id).cloned()) else {
                            return;
                        };
                        RunEvent {
                            kind: RunEventKind::Snapshot as i32,
                            run: Some(run),
                            message: "some events were skipped".into(),
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                // Events of one change all carry its final snapshot; the
                // state change that ends a run is the last of them.
                let done = event.kind != RunEventKind::Progress as i32
                    && matches!(
                        RunEventKind::try_from(event.kind),
                        Ok(RunEventKind::StateChanged | RunEventKind::Snapshot)
                    )
                    && event.run.as_ref().is_some_and(is_final);
                if tx.send(Ok(event)).await.is_err() || done {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    #[instrument(skip_all)]
    async fn cancel_run(
        &self,
        request: Request<CancelRunRequest>,
    ) -> Result<Response<Run>, Status> {
        let CancelRunRequest { run_id, reason } = request.into_inner();
        required("run_id", &run_id)?;
        let run = self
            .coordinator
            .apply(|s, now, fx| s.cancel(&run_id, &reason, now, fx))
            .await?;
        tracing::info!(run = %run_id, "run cancelled");
        Ok(Response::new(run))
    }

    async fn get_progress(
        &self,
        request: Request<GetProgressRequest>,
    ) -> Result<Response<GetProgressResponse>, Status> {
        let GetProgressRequest { run_id, max_points } = request.into_inner();
        required("run_id", &run_id)?;
        let evals = self
            .coordinator
            .read(|s| s.run(&run_id).map(|r| r.evals.clone()))?;
        let rows = self
            .coordinator
            .progress(&run_id, max_points as usize)
            .await?;
        let points = rows
            .into_iter()
            .map(|r| ProgressPoint {
                phase_index: r.phase_index,
                world_id: r.world_id,
                step: r.step,
                tokens: r.tokens,
                loss: r.loss,
                tokens_per_sec: r.tokens_per_sec,
                lr: r.lr,
                grad_norm: r.grad_norm,
                mfu: r.mfu,
                time_ms: r.time_ms,
            })
            .collect();
        Ok(Response::new(GetProgressResponse { points, evals }))
    }
}

#[tonic::async_trait]
impl WorkerService for Services {
    #[instrument(skip_all)]
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let RegisterRequest {
            hostname,
            device,
            pid,
        } = request.into_inner();
        let worker_id = self
            .coordinator
            .apply(|s, now, fx| Ok(s.register(hostname, device, pid, Instant::now(), now, fx)))
            .await?;
        tracing::info!(worker = %worker_id, "worker registered");
        let leases = self.coordinator.leases();
        Ok(Response::new(RegisterResponse {
            worker_id,
            heartbeat_interval_ms: leases.heartbeat_interval.as_millis() as u64,
            lease_timeout_ms: leases.lease_timeout.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let HeartbeatRequest {
            worker_id,
            world_id,
        } = request.into_inner();
        let arrived = Instant::now();
        required("worker_id", &worker_id)?;
        // Heartbeats only renew an in-memory lease: a restarted coordinator
        // gives every live worker a fresh lease, so nothing is persisted.
        let (action, reason) = self.coordinator.heartbeat(&worker_id, &world_id, arrived)?;
        Ok(Response::new(HeartbeatResponse {
            action: action as i32,
            reason,
        }))
    }

    async fn get_assignment(
        &self,
        request: Request<GetAssignmentRequest>,
    ) -> Result<Response<GetAssignmentResponse>, Status> {
        let GetAssignmentRequest {
            worker_id,
            known_assignment_id,
            wait_ms,
        } = request.into_inner();
        required("worker_id", &worker_id)?;
        let assignment = self
            .coordinator
            .wait_for_assignment(
                &worker_id,
                &known_assignment_id,
                Duration::from_millis(wait_ms),
            )
            .await?;
        let work_pending = self.coordinator.read(|s| s.work_pending(&worker_id));
        Ok(Response::new(GetAssignmentResponse {
            assignment,
            work_pending,
        }))
    }

    async fn rendezvous(
        &self,
        request: Request<RendezvousRequest>,
    ) -> Result<Response<RendezvousResponse>, Status> {
        let RendezvousRequest {
            worker_id,
            world_id,
            publish,
            wait_ms,
        } = request.into_inner();
        required("worker_id", &worker_id)?;
        required("world_id", &world_id)?;
        let token = self
            .coordinator
            .rendezvous(
                &worker_id,
                &world_id,
                publish,
                Duration::from_millis(wait_ms),
            )
            .await?;
        Ok(Response::new(RendezvousResponse {
            ready: token.is_some(),
            token: token.unwrap_or_default(),
        }))
    }

    async fn report_progress(
        &self,
        request: Request<ReportProgressRequest>,
    ) -> Result<Response<WorkerAck>, Status> {
        let report = request.into_inner();
        required("worker_id", &report.worker_id)?;
        required("world_id", &report.world_id)?;
        let result = self
            .coordinator
            .apply(|s, now, fx| s.progress(&report, now, fx))
            .await?;
        Ok(ack(result))
    }

    async fn report_eval(
        &self,
        request: Request<ReportEvalRequest>,
    ) -> Result<Response<WorkerAck>, Status> {
        let report = request.into_inner();
        required("worker_id", &report.worker_id)?;
        required("world_id", &report.world_id)?;
        let result = self
            .coordinator
            .apply(|s, now, fx| s.eval(&report, now, fx))
            .await?;
        Ok(ack(result))
    }

    async fn report_checkpoint_eval(
        &self,
        request: Request<ReportCheckpointEvalRequest>,
    ) -> Result<Response<WorkerAck>, Status> {
        let report = request.into_inner();
        required("worker_id", &report.worker_id)?;
        required("run_id", &report.run_id)?;
        required("eval_id", &report.eval_id)?;
        let result = self
            .coordinator
            .apply(|s, now, fx| s.checkpoint_eval_report(&report, now, fx))
            .await?;
        Ok(ack(result))
    }

    #[instrument(skip_all)]
    async fn report_checkpoint(
        &self,
        request: Request<ReportCheckpointRequest>,
    ) -> Result<Response<WorkerAck>, Status> {
        let ReportCheckpointRequest {
            worker_id,
            world_id,
            checkpoint,
        } = request.into_inner();
        required("worker_id", &worker_id)?;
        required("world_id", &world_id)?;
        let result = self
            .coordinator
            .apply(|s, now, fx| s.checkpoint(&worker_id, &world_id, checkpoint, now, fx))
            .await?;
        Ok(ack(result))
    }

    #[instrument(skip_all)]
    async fn report_failure(
        &self,
        request: Request<ReportFailureRequest>,
    ) -> Result<Response<WorkerAck>, Status> {
        let report = request.into_inner();
        required("worker_id", &report.worker_id)?;
        required("world_id", &report.world_id)?;
        let result = self
            .coordinator
            .apply(|s, now, fx| s.failure(&report, now, fx))
            .await?;
        Ok(ack(result))
    }

    #[instrument(skip_all)]
    async fn leave(&self, request: Request<LeaveRequest>) -> Result<Response<WorkerAck>, Status> {
        let LeaveRequest { worker_id, reason } = request.into_inner();
        required("worker_id", &worker_id)?;
        self.coordinator
            .apply(|s, now, fx| s.leave(&worker_id, &reason, now, fx))
            .await?;
        Ok(ack((WorkerAction::Continue, String::new())))
    }
}

// ---------------------------------------------------------- dataset builds

#[tonic::async_trait]
impl DatasetService for Services {
    async fn build_dataset(
        &self,
        request: Request<BuildDatasetRequest>,
    ) -> Result<Response<Dataset>, Status> {
        let request = request.into_inner();
        let record = self
            .coordinator
            .apply_builds(|b, now, writes| b.submit(request, now, writes))
            .await?;
        tracing::info!(dataset = %record.id, url = %record.url, "dataset build queued");
        Ok(Response::new(record))
    }

    async fn get_dataset(
        &self,
        request: Request<GetDatasetRequest>,
    ) -> Result<Response<Dataset>, Status> {
        let id = request.into_inner().id;
        Ok(Response::new(self.coordinator.builds().get(&id)?))
    }

    async fn list_datasets(
        &self,
        _request: Request<ListDatasetsRequest>,
    ) -> Result<Response<ListDatasetsResponse>, Status> {
        let datasets = self.coordinator.builds().list();
        Ok(Response::new(ListDatasetsResponse { datasets }))
    }
}

fn process_name(process: &str) -> Result<&str, Status> {
    if process.trim().is_empty() {
        return Err(Status::invalid_argument("process: is required"));
    }
    Ok(process)
}

#[tonic::async_trait]
impl DataprepService for Services {
    async fn claim_task(
        &self,
        request: Request<ClaimTaskRequest>,
    ) -> Result<Response<ClaimTaskResponse>, Status> {
        let request = request.into_inner();
        let process = process_name(&request.process)?;
        let wait = Duration::from_millis(u64::from(request.wait_ms));
        let task = self.coordinator.claim_task(process, wait).await;
        if let Some(t) = &task {
            tracing::info!(dataset = %t.dataset_id, task = %t.key, %process, "task handed out");
        }
        Ok(Response::new(ClaimTaskResponse { task }))
    }

    async fn renew_task(
        &self,
        request: Request<RenewTaskRequest>,
    ) -> Result<Response<RenewTaskResponse>, Status> {
        let r = request.into_inner();
        let process = process_name(&r.process)?;
        let wanted =
            self.coordinator
                .builds()
                .renew(&r.dataset_id, &r.key, process, Instant::now())?;
        Ok(Response::new(RenewTaskResponse { wanted }))
    }

    async fn complete_task(
        &self,
        request: Request<CompleteTaskRequest>,
    ) -> Result<Response<CompleteTaskResponse>, Status> {
        let r = request.into_inner();
        process_name(&r.process)?;
        self.coordinator
            .apply_builds(|b, now, writes| b.complete(&r, now, writes))
            .await?;
        Ok(Response::new(CompleteTaskResponse {}))
    }

    async fn fail_task(
        &self,
        request: Request<FailTaskRequest>,
    ) -> Result<Response<FailTaskResponse>, Status> {
        let r = request.into_inner();
        process_name(&r.process)?;
        tracing::warn!(dataset = %r.dataset_id, task = %r.key, process = %r.process, retry = r.retry, error = %r.error, "task failed");
        self.coordinator
            .apply_builds(|b, now, writes| b.fail(&r, now, writes))
            .await?;
        Ok(Response::new(FailTaskResponse {}))
    }
}
