//! The coordinator over TLS: its certificate and key, the CA whose client
//! certificates workers and dataprep processes must present (mTLS), the
//! gRPC port's split between TLS connections and plaintext ones (answered
//! with a status that says to use `https://`), and the HTTP port's TLS.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// What a TLS coordinator serves with: PEM bytes, checked when loaded.
#[derive(Clone)]
pub struct ServerTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    /// Workers and dataprep processes must present a certificate signed by
    /// this CA; user calls keep bearer tokens.
    client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ServerTls")
            .field("client_ca", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// How long a connection may take to send its first byte or finish its
/// handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first byte of a TLS record carrying a handshake (ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

impl ServerTls {
    /// Reads and checks the certificate chain, its key and the optional
    /// client CA, naming the file that is wrong.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<ServerTls, String> {
        let read = |path: &Path, flag: &str| {
            std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
        };
        let cert_pem = read(cert, "--tls-cert")?;
        let key_pem = read(key, "--tls-key")?;
        let client_ca_pem = client_ca.map(|p| read(p, "--client-ca")).transpose()?;
        let tls = ServerTls {
            cert_pem,
            key_pem,
            client_ca_pem,
        };
        certificates(&tls.cert_pem).map_err(|e| format!("--tls-cert {}: {e}", cert.display()))?;
        PrivateKeyDer::from_pem_slice(&tls.key_pem)
            .map_err(|e| format!("--tls-key {}: no private key in PEM ({e})", key.display()))?;
        if let (Some(pem), Some(path)) = (&tls.client_ca_pem, client_ca) {
            certificates(pem).map_err(|e| format!("--client-ca {}: {e}", path.display()))?;
        }
        // Whether the key belongs to the certificate, and every other check
        // rustls makes, before any client connects.
        tls.http_acceptor().map_err(|e| {
            let e = if e.contains("KeyMismatch") {
                "the key does not belong to the certificate".to_string()
            } else {
                e
            };
            format!(
                "--tls-cert {} with --tls-key {}: {e}",
                cert.display(),
                key.display()
            )
        })?;
        Ok(tls)
    }

    pub fn requires_client_certs(&self) -> bool {
        self.client_ca_pem.is_some()
    }

    /// tonic's TLS for the gRPC port. Client certificates are optional at
    /// the handshake (users have none); the worker and dataprep APIs refuse
    /// calls without one.
    pub(crate) fn grpc_config(&self) -> ServerTlsConfig {
        let mut config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.client_ca_pem {
            config = config
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(true);
        }
        config
    }

    /// rustls for the HTTP port (dashboard, JSON, /metrics): no client
    /// certificates, since browsers and Prometheus present none.
    fn http_acceptor(&self) -> Result<TlsAcceptor, String> {
        let certs = certificates(&self.cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| e.to_string())?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

fn certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("unreadable PEM ({e})"))?;
    if certs.is_empty() {
        return Err("no certificate in PEM".into());
    }
    Ok(certs)
}

/// Accepts on the gRPC port until `stop` resolves: connections that open
/// with a TLS handshake go to `tls` (tonic's TLS server), plaintext ones to
/// `plaintext` (see [`plaintext_router`]), so a plaintext client hears why
/// instead of seeing a bare reset it would report as a protocol error.
pub(crate) async fn split_plaintext(
    listener: TcpListener,
    tls: mpsc::Sender<std::io::Result<TcpStream>>,
    plaintext: axum::Router,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // As on the plaintext ports (`server::grpc_connections`).
                    let _ = stream.set_nodelay(true);
                    stream
                }
                Err(e) => {
                    // Out of file descriptors and the like: pass the error
                    // on (tonic logs and goes on) and keep accepting.
                    if tls.send(Err(e)).await.is_err() {
                        break;
                    }
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let (tls, plaintext) = (tls.clone(), plaintext.clone());
        connections.spawn(async move {
            let mut first = [0u8; 1];
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
                Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => {
                    let _ = tls.send(Ok(stream)).await;
                }
                Ok(Ok(1)) => {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(plaintext))
                        .await;
                }
                _ => {}
            }
        });
    }
}

/// What plaintext connections to a TLS gRPC port get: `health` (gRPC
/// health checks, which reveal nothing and which Kubernetes' gRPC probes
/// can only make in the clear), and FAILED_PRECONDITION for every other
/// call.
pub(crate) fn plaintext_router(health: tonic::service::Routes) -> axum::Router {
    health.into_axum_router().fallback(|| async {
        let mut response = StatusCode::OK.into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        // 9: FAILED_PRECONDITION. The message is plain ASCII, as grpc-message
        // allows without percent-encoding.
        headers.insert("grpc-status", HeaderValue::from_static("9"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static(
                "this coordinator serves TLS: connect with an https:// URL \
                 (and --ca-cert if its certificate is not signed by a system root)",
            ),
        );
        response
    })
}

/// Serves `app` over TLS on `listener` until `stop` resolves.
pub(crate) async fn serve_http(
    tls: &ServerTls,
    listener: TcpListener,
    app: axum::Router,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = tls.http_acceptor().map_err(std::io::Error::other)?;
    let mut connections = JoinSet::new();
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // As on the plaintext ports (`server::grpc_connections`).
                    let _ = stream.set_nodelay(true);
                    stream
                }
                Err(e) => {
                    tracing::warn!(error = %e, "http port: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        let (acceptor, app) = (acceptor.clone(), app.clone());
        connections.spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
            else {
                return;
            };
            let service = TowerToHyperService::new(app);
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
