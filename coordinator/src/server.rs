//! Wiring: the gRPC server with bearer-token auth, health and reflection
//! services, the optional HTTP port (dashboard, JSON, `/metrics`), and the
//! lease reaper, all stopped by one shutdown future.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::service::Interceptor;
use tonic::{Request, Status};
use twinhead_proto::v1::FILE_DESCRIPTOR_SET;
use twinhead_proto::v1::dataprep_service_server::DataprepServiceServer;
use twinhead_proto::v1::dataset_service_server::DatasetServiceServer;
use twinhead_proto::v1::run_service_server::RunServiceServer;
use twinhead_proto::v1::worker_service_server::WorkerServiceServer;

use twinhead_proto::auth::{TokenProblem, check_bearer};

use crate::service::Services;
use crate::store::{SqliteStore, StoreError};
use crate::tls::ServerTls;
use crate::{Coordinator, LeaseSettings, reaper_tick};

/// How a coordinator is started.
#[derive(Clone)]
pub struct ServerConfig {
    /// SQLite database file, created if missing.
    pub db: PathBuf,
    /// Bearer token for RunService calls; none: open.
    pub user_token: Option<String>,
    /// Bearer token for WorkerService calls; none: open.
    pub worker_token: Option<String>,
    pub leases: LeaseSettings,
    /// TLS on both ports (and mTLS for workers); none: plaintext.
    pub tls: Option<ServerTls>,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens are secrets: say whether one is set, never what it is.
        f.debug_struct("ServerConfig")
            .field("db", &self.db)
            .field("user_token", &self.user_token.as_ref().map(|_| "<set>"))
            .field("worker_token", &self.worker_token.as_ref().map(|_| "<set>"))
            .field("leases", &self.leases)
            .field("tls", &self.tls)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("http server: {0}")]
    Http(#[source] std::io::Error),
    #[error("reflection service: {0}")]
    Reflection(String),
}

/// Accepts calls that carry `authorization: Bearer <token>`, and under
/// mTLS only from clients that presented a certificate (rustls has already
/// checked it against the client CA during the handshake).
#[derive(Clone)]
struct BearerAuth {
    token: Option<Arc<str>>,
    api: &'static str,
    client_cert: bool,
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.client_cert && request.peer_certs().is_none_or(|certs| certs.is_empty()) {
            return Err(Status::unauthenticated(format!(
                "the {} API needs a client certificate signed by the coordinator's --client-ca \
                 (pass --client-cert and --client-key, or TWINHEAD_CLIENT_CERT and TWINHEAD_CLIENT_KEY)",
                self.api
            )));
        }
        let Some(expected) = self.token.as_deref() else {
            return Ok(request);
        };
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match check_bearer(header, expected) {
            Ok(()) => Ok(request),
            Err(TokenProblem::Wrong) => Err(Status::unauthenticated(format!(
                "wrong token for the {} API",
                self.api
            ))),
            Err(TokenProblem::Missing) => Err(Status::unauthenticated(format!(
                "the {} API needs a bearer token (set TWINHEAD_TOKEN or pass --token or --token-file)",
                self.api
            ))),
        }
    }
}

/// Serves the coordinator's gRPC API on `listener` until `shutdown` resolves.
pub async fn serve(
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_with_http(config, listener, None, shutdown).await
}

/// [`serve`], and the HTTP port (dashboard, JSON API, `/metrics`) on
/// `http` when given; both stop when `shutdown` resolves, and an error of
/// either stops both.
pub async fn serve_with_http(
    config: ServerConfig,
    grpc: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let store = Arc::new(SqliteStore::open(&config.db)?);
    let coordinator = Coordinator::open(store, config.leases)?;
    serve_coordinator(coordinator, config, grpc, http, shutdown).await
}

/// [`serve_with_http`] for an already opened coordinator.
pub async fn serve_coordinator(
    coordinator: Arc<Coordinator>,
    config: ServerConfig,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    // One shutdown future, two servers: fan it out through a watch channel.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let _fan_out = AbortOnDrop(tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    }));
    let stop_signal = move || {
        let mut stopped = stopped.clone();
        async move {
            // An error means the sender is gone: the fan-out was dropped with us.
            let _ = stopped.wait_for(|s| *s).await;
        }
    };
    let user_token: Option<Arc<str>> = config.user_token.clone().map(Arc::from);
    let services = Services {
        coordinator: coordinator.clone(),
    };
    let user_auth = BearerAuth {
        token: user_token.clone(),
        api: "run",
        client_cert: false,
    };
    let worker_auth = BearerAuth {
        token: config.worker_token.clone().map(Arc::from),
        api: "worker",
        client_cert: config
            .tls
            .as_ref()
            .is_some_and(ServerTls::requires_client_certs),
    };
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<RunServiceServer<Services>>()
        .await;
    health_reporter
        .set_serving::<WorkerServiceServer<Services>>()
        .await;
    health_reporter
        .set_serving::<DatasetServiceServer<Services>>()
        .await;
    health_reporter
        .set_serving::<DataprepServiceServer<Services>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServeError::Reflection(e.to_string()))?;

    // Aborted on drop, so a server future that is itself dropped (cancelled)
    // leaves no reaper writing behind it.
    let _reaper = AbortOnDrop(tokio::spawn(reap_leases(coordinator.clone())));
    // Under TLS the gRPC port's connections go through a splitter that
    // answers plaintext clients itself (see `tls::split_plaintext`).
    let (incoming, _splitter) = match &config.tls {
        Some(_) => {
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            let plaintext =
                crate::tls::plaintext_router(tonic::service::Routes::new(health.clone()));
            let splitter = tokio::spawn(crate::tls::split_plaintext(
                listener,
                tx,
                plaintext,
                stop_signal(),
            ));
            (
                GrpcIncoming::Tls(tokio_stream::wrappers::ReceiverStream::new(rx)),
                Some(AbortOnDrop(splitter)),
            )
        }
        None => (GrpcIncoming::Plain(listener), None),
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(tls.grpc_config())?;
    }
    let grpc = async {
        let router = builder
            .add_service(health)
            .add_service(reflection)
            .add_service(RunServiceServer::with_interceptor(
                services.clone(),
                user_auth.clone(),
            ))
            .add_service(DatasetServiceServer::with_interceptor(
                services.clone(),
                user_auth,
            ))
            .add_service(WorkerServiceServer::with_interceptor(
                services.clone(),
                worker_auth.clone(),
            ))
            .add_service(DataprepServiceServer::with_interceptor(
                services,
                BearerAuth {
                    api: "dataprep",
                    ..worker_auth
                },
            ));
        match incoming {
            GrpcIncoming::Tls(stream) => {
                router
                    .serve_with_incoming_shutdown(stream, stop_signal())
                    .await
            }
            GrpcIncoming::Plain(listener) => {
                router
                    .serve_with_incoming_shutdown(grpc_connections(listener), stop_signal())
                    .await
            }
        }
        .map_err(ServeError::from)
    };
    let http_server = async {
        let Some(listener) = http else {
            return Ok(());
        };
        let app = crate::web::router(coordinator.clone(), user_token);
        match &config.tls {
            Some(tls) => crate::tls::serve_http(tls, listener, app, stop_signal())
                .await
                .map_err(ServeError::Http),
            None => axum::serve(http_connections(listener), app)
                .with_graceful_shutdown(stop_signal())
                .await
                .map_err(ServeError::Http),
        }
    };
    tokio::try_join!(grpc, http_server).map(|_| ())
}

/// The plaintext gRPC port's connections, with TCP_NODELAY. Without it a
/// response's last segment waits for the client's delayed ACK (40 ms on
/// Linux): every call took that long. tonic sets it only on listeners it
/// binds itself.
fn grpc_connections(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// The plaintext HTTP port's connections, with TCP_NODELAY (as
/// [`grpc_connections`]).
fn http_connections(
    listener: TcpListener,
) -> axum::serve::TapIo<TcpListener, fn(&mut tokio::net::TcpStream)> {
    fn no_nagle(tcp: &mut tokio::net::TcpStream) {
        let _ = tcp.set_nodelay(true);
    }
    axum::serve::ListenerExt::tap_io(listener, no_nagle)
}

/// The gRPC port's connections: straight from the listener, or TLS ones
/// handed over by the splitter.
enum GrpcIncoming {
    Plain(TcpListener),
    Tls(tokio_stream::wrappers::ReceiverStream<std::io::Result<tokio::net::TcpStream>>),
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Checks leases a few times per timeout (see [`reaper_tick`]); dataprep
/// task leases on the same tick.
async fn reap_leases(coordinator: Arc<Coordinator>) {
    let mut interval = tokio::time::interval(reaper_tick(coordinator.leases()));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // A tick missed while this loop itself waited (on the store) is
        // due from when the loop came back, not from its schedule.
        let back = tokio::time::Instant::now();
        let due = interval.tick().await.max(back);
        // A timer's task may run ahead of the tasks already queued (the
        // connections holding heartbeats); going once to the back of the
        // queue makes the check's delay include theirs.
        tokio::task::yield_now().await;
        if let Err(e) = coordinator.expire_leases(due.into_std()).await {
            tracing::error!(error = %e, "lease check failed");
        }
        if let Err(e) = coordinator.expire_tasks().await {
            tracing::error!(error = %e, "dataprep task lease check failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    async fn listener() -> (TcpListener, std::net::SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("address");
        (l, addr)
    }

    #[tokio::test]
    async fn grpc_connections_are_accepted_without_nagle() {
        let (l, addr) = listener().await;
        let mut incoming = grpc_connections(l);
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let accepted = incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        assert!(accepted.nodelay().expect("TCP_NODELAY readable"));
    }

    #[tokio::test]
    async fn http_connections_are_accepted_without_nagle() {
        let (l, addr) = listener().await;
        let mut incoming = http_connections(l);
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = axum::serve::Listener::accept(&mut incoming).await;
        assert!(accepted.nodelay().expect("TCP_NODELAY readable"));
    }
}
