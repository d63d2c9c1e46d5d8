//! A real coordinator on a loopback port with a SQLite file in a temporary
//! directory, and real tonic clients talking to it.

#![allow(dead_code)]

pub mod http;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use twinhead_coordinator::{LeaseSettings, ServeError, ServerConfig};
use twinhead_proto::auth::Bearer;
use twinhead_proto::v1::run_service_client::RunServiceClient;
use twinhead_proto::v1::worker_service_client::WorkerServiceClient;
use twinhead_proto::v1::{
    Assignment, Checkpoint, EvalPoint, GetAssignmentRequest, HeartbeatRequest, RegisterRequest,
    ReportCheckpointRequest, ReportEvalRequest, ReportProgressRequest, RunSpec, WorkerAck,
};

pub struct Coordinator {
    pub addr: SocketAddr,
    /// The HTTP port (dashboard, JSON, /metrics), when started with one.
    pub http_addr: Option<SocketAddr>,
    pub db: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), ServeError>>>,
}

pub fn fast_leases() -> LeaseSettings {
    LeaseSettings {
        heartbeat_interval: Duration::from_millis(50),
        lease_timeout: Duration::from_millis(400),
    }
}

impl Coordinator {
    pub async fn start(db: &Path) -> Coordinator {
        Self::start_with(ServerConfig {
            tls: None,
            db: db.to_path_buf(),
            user_token: None,
            worker_token: None,
            leases: LeaseSettings::default(),
        })
        .await
    }

    pub async fn start_with(config: ServerConfig) -> Coordinator {
        Self::start_on("127.0.0.1:0".parse().expect("addr"), config).await
    }

    /// Starts on a given address: a restarted coordinator keeps its address
    /// so that clients reconnect to it.
    pub async fn start_on(addr: SocketAddr, config: ServerConfig) -> Coordinator {
        let mut attempts = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(e) if attempts < 100 => {
                    attempts += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("bind {addr}: {e}"),
            }
        };
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let db = config.db.clone();
        let handle = tokio::spawn(twinhead_coordinator::serve(config, listener, async {
            let _ = rx.await;
        }));
        Coordinator {
            addr,
            http_addr: None,
            db,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// Starts with the HTTP port too, both on free loopback ports.
    pub async fn start_with_http(config: ServerConfig) -> Coordinator {
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind grpc");
        let http = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind http");
        let addr = grpc.local_addr().expect("addr");
        let http_addr = http.local_addr().expect("http addr");
        let (tx, rx) = oneshot::channel::<()>();
        let db = config.db.clone();
        let handle = tokio::spawn(twinhead_coordinator::serve_with_http(
            config,
            grpc,
            Some(http),
            async {
                let _ = rx.await;
            },
        ));
        Coordinator {
            addr,
            http_addr: Some(http_addr),
            db,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    /// Base URL of the HTTP port.
    pub fn http_url(&self) -> String {
        format!(
            "http://{}",
            self.http_addr.expect("started with start_with_http")
        )
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn channel(&self) -> Channel {
        let endpoint = Channel::from_shared(self.url()).expect("url");
        for _ in 0..100 {
            if let Ok(channel) = endpoint.connect().await {
                return channel;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("coordinator at {} never accepted a connection", self.url());
    }

    pub async fn runs(&self) -> RunServiceClient<Channel> {
        RunServiceClient::new(self.channel().await)
    }

    pub async fn workers(&self) -> WorkerServiceClient<Channel> {
        WorkerServiceClient::new(self.channel().await)
    }

    pub async fn datasets(
        &self,
    ) -> twinhead_proto::v1::dataset_service_client::DatasetServiceClient<Channel> {
        twinhead_proto::v1::dataset_service_client::DatasetServiceClient::new(self.channel().await)
    }

    pub async fn dataprep(
        &self,
    ) -> twinhead_proto::v1::dataprep_service_client::DataprepServiceClient<Channel> {
        twinhead_proto::v1::dataprep_service_client::DataprepServiceClient::new(
            self.channel().await,
        )
    }

    pub async fn runs_with_token(
        &self,
        token: Option<&str>,
    ) -> RunServiceClient<InterceptedService<Channel, Bearer>> {
        RunServiceClient::with_interceptor(
            self.channel().await,
            Bearer::new(token).expect("ascii token"),
        )
    }

    pub async fn workers_with_token(
        &self,
        token: Option<&str>,
    ) -> WorkerServiceClient<InterceptedService<Channel, Bearer>> {
        WorkerServiceClient::with_interceptor(
            self.channel().await,
            Bearer::new(token).expect("ascii token"),
        )
    }

    /// Stops the server and surfaces any error it ended with.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            let result = tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .expect("coordinator stops within 10 s")
                .expect("server task");
            result.expect("server ended cleanly");
        }
    }

    /// Kills the server task without a graceful shutdown.
    pub async fn abort(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
            let _ = handle.await;
        }
    }

    /// Kills the server abruptly and starts a new one on the same address
    /// and database (default leases, no tokens): a crash and a restart.
    pub async fn crash_and_restart(self) -> Coordinator {
        let (addr, db) = (self.addr, self.db.clone());
        self.abort().await;
        Coordinator::start_on(
            addr,
            ServerConfig {
                tls: None,
                db,
                user_token: None,
                worker_token: None,
                leases: LeaseSettings::default(),
            },
        )
        .await
    }
}

/// A small valid run: tiny model, 2 ranks, global batch 4, two phases of
/// 3 and 2 steps.
pub fn tiny_spec(name: &str) -> RunSpec {
    spec_with(name, &[])
}

pub fn spec_with(name: &str, overrides: &[&str]) -> RunSpec {
    let text = include_str!("../tiny-run.toml");
    let overrides: Vec<String> = std::iter::once(format!("name={name:?}"))
        .chain(overrides.iter().map(|s| s.to_string()))
        .collect();
    twinhead_proto::config::parse_run("tiny-run.toml", text, &overrides, Path::new("."))
        .expect("valid spec")
}

/// A simulated worker: a real gRPC client speaking the worker protocol.
pub struct SimWorker {
    pub id: String,
    pub client: WorkerServiceClient<Channel>,
    pub assignment: Option<Assignment>,
}

impl SimWorker {
    pub async fn register(coordinator: &Coordinator, name: &str) -> SimWorker {
        let mut client = coordinator.workers().await;
        let id = client
            .register(RegisterRequest {
                hostname: name.into(),
                device: "cpu".into(),
                pid: std::process::id(),
            })
            .await
            .expect("register")
            .into_inner()
            .worker_id;
        SimWorker {
            id,
            client,
            assignment: None,
        }
    }

    /// Waits for an assignment different from the current one.
    pub async fn next_assignment(&mut self) -> Assignment {
        let known = self
            .assignment
            .as_ref()
            .map(|a| a.assignment_id.clone())
            .unwrap_or_default();
        let reply = self
            .client
            .get_assignment(GetAssignmentRequest {
                worker_id: self.id.clone(),
                known_assignment_id: known,
                wait_ms: 10_000,
            })
            .await
            .expect("get assignment")
            .into_inner();
        let assignment = reply.assignment.expect("an assignment within 10 s");
        self.assignment = Some(assignment.clone());
        assignment
    }

    pub fn world(&self) -> String {
        self.assignment
            .as_ref()
            .map(|a| a.world_id.clone())
            .unwrap_or_default()
    }

    pub async fn heartbeat(&mut self) -> Result<(i32, String), tonic::Status> {
        let world_id = self.world();
        self.client
            .heartbeat(HeartbeatRequest {
                worker_id: self.id.clone(),
                world_id,
            })
            .await
            .map(|r| {
                let r = r.into_inner();
                (r.action, r.reason)
            })
    }

    /// A progress report of the current assignment at `step`.
    pub fn progress_request(&self, step: u64, tokens: u64, loss: f64) -> ReportProgressRequest {
        let a = self.assignment.clone().expect("assigned");
        ReportProgressRequest {
            worker_id: self.id.clone(),
            world_id: a.world_id,
            phase_index: a.phase_index,
            step,
            tokens,
            loss,
            tokens_per_sec: 1234.0,
            lr: 1e-3,
            grad_norm: 1.0,
            mfu: 0.1,
        }
    }

    pub async fn progress(&mut self, step: u64, loss: f64) -> WorkerAck {
        let request = self.progress_request(step, step * 1000, loss);
        self.client
            .report_progress(request)
            .await
            .expect("progress")
            .into_inner()
    }

    /// Reports a held-out evaluation of the current phase at `step`
    /// (`error` non-empty: a failed one).
    pub async fn eval(
        &mut self,
        step: u64,
        loss: f64,
        error: &str,
    ) -> Result<WorkerAck, tonic::Status> {
        let a = self.assignment.clone().expect("assigned");
        self.client
            .report_eval(ReportEvalRequest {
                worker_id: self.id.clone(),
                world_id: a.world_id,
                eval: Some(EvalPoint {
                    phase_index: a.phase_index,
                    step,
                    tokens: step * 1000,
                    loss,
                    accuracy: 0.25,
                    rows: 8,
                    targets: 100,
                    seconds: 0.5,
                    error: error.into(),
                    ..Default::default()
                }),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn checkpoint(&mut self, step: u64) -> Result<WorkerAck, tonic::Status> {
        let a = self.assignment.clone().expect("assigned");
        self.client
            .report_checkpoint(ReportCheckpointRequest {
                worker_id: self.id.clone(),
                world_id: a.world_id.clone(),
                checkpoint: Some(Checkpoint {
                    phase_index: a.phase_index,
                    step,
                    tokens: step * 1000,
                    url: format!("file:///tmp/ckpt/{}/p{}/s{step}", a.run_id, a.phase_index),
                    ..Default::default()
                }),
            })
            .await
            .map(|r| r.into_inner())
    }
}
