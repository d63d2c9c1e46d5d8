//! The coordinator over TLS, with workers and dataprep processes held to
//! client certificates (mTLS) and tokens read from files: plaintext and
//! untrusting clients are refused with messages that say what to fix, a
//! worker without a certificate is refused, and a dataset build and a
//! training run go through end to end. Certificates are made here.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_clean_error, fixture_data_config, json, twinhead};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

const USER_TOKEN: &str = "user-secret-5f1c";
const WORKER_TOKEN: &str = "worker-secret-9a7e";

/// A CA, the coordinator's certificate for 127.0.0.1 and localhost, and a
/// worker certificate, all as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn make_pki(dir: &Path) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "twinhead test CA");
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key")).expect("ca");
    let issue = |names: Vec<String>, stem: &str| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &ca)
            .expect("sign");
        let (cert_path, key_path) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}-key.pem")),
        );
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    };
    let (server_cert, server_key) = issue(vec!["127.0.0.1".into(), "localhost".into()], "server");
    let (client_cert, client_key) = issue(vec!["worker".into()], "worker");
    let ca_path = dir.join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).expect("write ca");
    Pki {
        ca: ca_path,
        server_cert,
        server_key,
        client_cert,
        client_key,
    }
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A TLS coordinator with mTLS for workers, tokens from files and debug
/// logging to `log`; returns it with its gRPC and HTTP URLs.
fn start_coordinator(dir: &Path, pki: &Pki, log: &Path) -> (Proc, String, String) {
    let user_token = dir.join("user.token");
    let worker_token = dir.join("worker.token");
    std::fs::write(&user_token, format!("{USER_TOKEN}\n")).expect("token");
    std::fs::write(&worker_token, format!("{WORKER_TOKEN}\n")).expect("token");
    let mut child = twinhead()
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ])
        .arg("--db")
        .arg(dir.join("c.db"))
        .arg("--tls-cert")
        .arg(&pki.server_cert)
        .arg("--tls-key")
        .arg(&pki.server_key)
        .arg("--client-ca")
        .arg(&pki.ca)
        .arg("--user-token-file")
        .arg(&user_token)
        .arg("--worker-token-file")
        .arg(&worker_token)
        .env("TWINHEAD_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).expect("log"))
        .spawn()
        .expect("spawn coordinator");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut url = || {
        let line = lines.next().expect("a line").expect("read");
        line.rsplit(' ')
            .next()
            .filter(|u| u.starts_with("https://"))
            .unwrap_or_else(|| panic!("unexpected line {line:?}"))
            .trim_end_matches('/')
            .to_string()
    };
    let grpc = url();
    let http = url();
    (Proc(child), grpc, http)
}

/// `twinhead` as a user: trusting the CA, with the user token from a file.
fn as_user(dir: &Path, pki: &Pki, url: &str) -> std::process::Command {
    let mut command = twinhead();
    command
        .env("TWINHEAD_COORDINATOR", url)
        .env("TWINHEAD_CA_CERT", &pki.ca)
        .env("TWINHEAD_TOKEN_FILE", dir.join("user.token"));
    command
}

/// `twinhead` as a worker or dataprep process: the CA, the worker token and
/// the client certificate, all through the environment.
fn as_worker(dir: &Path, pki: &Pki, url: &str) -> std::process::Command {
    let mut command = twinhead();
    command
        .env("TWINHEAD_COORDINATOR", url)
        .env("TWINHEAD_CA_CERT", &pki.ca)
        .env("TWINHEAD_TOKEN_FILE", dir.join("worker.token"))
        .env("TWINHEAD_CLIENT_CERT", &pki.client_cert)
        .env("TWINHEAD_CLIENT_KEY", &pki.client_key)
        .env("TWINHEAD_LOG", "debug");
    command
}

fn ok(output: Output) -> Output {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Waits for a child with a deadline; its exit status and stderr file.
fn wait_exit(mut child: Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET `path` on the HTTPS port, trusting `ca`; the whole response.
fn https_get(http_url: &str, ca: &Path, path: &str, token: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("ca file") {
        roots.add(cert.expect("ca cert")).expect("add root");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let address = http_url.trim_start_matches("https://");
    let tcp = std::net::TcpStream::connect(address).expect("connect");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let connection = rustls::ClientConnection::new(Arc::new(config), name).expect("tls");
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut response = Vec::new();
    // A peer that closes without close_notify ends the read with an error
    // after the whole response has arrived.
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

fn recipe(dir: &Path, dataset: &str) -> PathBuf {
    let checkpoints = dir.join("checkpoints");
    let text = format!(
        r#"
name = "over-tls"
model = "tiny"
objective = "mlm"
dataset = "{dataset}"
seed = 7
world_size = 2
global_batch = 8
micro_batch = 2
[optimizer]
peak_lr = 3e-3
[checkpoint]
root = "file://{}"
every_tokens = 2048
[[phases]]
name = "short"
tokens = 2048
seq_len = 64
mask_ratio = 0.3
[[phases]]
name = "long"
tokens = 2048
seq_len = 256
mask_ratio = 0.15
"#,
        checkpoints.display()
    );
    let path = dir.join("over-tls.toml");
    std::fs::write(&path, text).expect("recipe");
    path
}

#[test]
fn a_tls_coordinator_refuses_plaintext_untrusting_and_certless_clients_and_runs_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pki = make_pki(d);
    let coordinator_log = d.join("coordinator.log");
    let (_coordinator, url, http_url) = start_coordinator(d, &pki, &coordinator_log);
    let plain_url = url.replace("https://", "http://");

    // A plaintext client is told to use https://.
    let plain = twinhead()
        .args(["runs", "--coordinator", &plain_url])
        .output()
        .expect("runs");
    assert_clean_error(&plain, &["serves TLS", "https://"]);
    // Health checks alone are answered in the clear: Kubernetes' gRPC
    // probes cannot speak TLS.
    let health = tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let channel = tonic::transport::Endpoint::from_shared(plain_url.clone())?
                .connect()
                .await?;
            let reply = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await?;
            Ok::<_, Box<dyn std::error::Error>>(reply.into_inner().status)
        })
        .expect("plaintext health check");
    assert_eq!(
        health,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // A client that does not trust the coordinator's CA is refused, and
    // told how to trust it.
    let untrusting = twinhead()
        .args(["runs", "--coordinator", &url])
        .env("TWINHEAD_TOKEN_FILE", d.join("user.token"))
        .output()
        .expect("runs");
    assert_clean_error(&untrusting, &[&url, "--ca-cert"]);
    // TLS settings with an http:// URL are refused, not ignored.
    let mixed = as_user(d, &pki, &plain_url)
        .arg("runs")
        .output()
        .expect("runs");
    assert_clean_error(&mixed, &["need an https:// URL"]);
    // Trusted, but without the token: the user API still wants it.
    let tokenless = twinhead()
        .args(["runs", "--coordinator", &url, "--ca-cert"])
        .arg(&pki.ca)
        .output()
        .expect("runs");
    assert_clean_error(&tokenless, &["needs a bearer token"]);
    ok(as_user(d, &pki, &url)
        .args(["runs", "--json"])
        .output()
        .expect("runs"));

    // Under mTLS a worker without a client certificate is refused with a
    // message naming the flags; so is a dataprep process.
    let certless_log = d.join("certless-worker.log");
    let certless = twinhead()
        .args(["worker", "--coordinator", &url, "--ca-cert"])
        .arg(&pki.ca)
        .arg("--token-file")
        .arg(d.join("worker.token"))
        .stderr(std::fs::File::create(&certless_log).expect("log"))
        .spawn()
        .expect("worker");
    let status = wait_exit(certless, Duration::from_secs(30));
    let certless_err = std::fs::read_to_string(&certless_log).expect("log");
    assert!(!status.success(), "{certless_err}");
    assert!(
        certless_err.contains("needs a client certificate")
            && certless_err.contains("--client-cert"),
        "{certless_err}"
    );
    let certless_dataprep = twinhead()
        .args(["dataprep", "--coordinator", &url, "--ca-cert"])
        .arg(&pki.ca)
        .arg("--token-file")
        .arg(d.join("worker.token"))
        .output()
        .expect("dataprep");
    assert_clean_error(&certless_dataprep, &["needs a client certificate"]);

    // A dataset built by a dataprep process with a certificate, submitted
    // by a user over TLS.
    let dataprep_log = d.join("dataprep.log");
    let _dataprep = Proc(
        as_worker(d, &pki, &url)
            .args(["dataprep", "--threads", "1"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&dataprep_log).expect("log"))
            .spawn()
            .expect("dataprep"),
    );
    let config = fixture_data_config(d);
    let built = json(&ok(as_user(d, &pki, &url)
        .args(["dataset", "submit"])
        .arg(&config)
        .arg("--out")
        .arg(d.join("data"))
        .arg("--json")
        .output()
        .expect("dataset submit")));
    assert_eq!(built["state"], "complete", "{built}");
    let dataset = built["url"].as_str().expect("url").to_string();

    // A tiny run on two workers with certificates, to completion.
    let submitted = json(&ok(as_user(d, &pki, &url)
        .args(["submit", "--json"])
        .arg(recipe(d, &dataset))
        .output()
        .expect("submit")));
    let run = submitted["run_id"].as_str().expect("run_id").to_string();
    let worker_logs: Vec<PathBuf> = (0..2).map(|i| d.join(format!("worker-{i}.log"))).collect();
    let workers: Vec<Child> = worker_logs
        .iter()
        .map(|log| {
            as_worker(d, &pki, &url)
                .args(["worker", "--exit-when-idle"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(log).expect("log"))
                .spawn()
                .expect("worker")
        })
        .collect();
    for worker in workers {
        let status = wait_exit(worker, Duration::from_secs(300));
        let logs: String = worker_logs
            .iter()
            .map(|l| std::fs::read_to_string(l).unwrap_or_default())
            .collect();
        assert!(status.success(), "{logs}");
    }
    let state = json(&ok(as_user(d, &pki, &url)
        .args(["status", "--json", &run])
        .output()
        .expect("status")));
    assert_eq!(state["state"], "completed", "{state}");

    // The HTTP port serves the dashboard's data over TLS too.
    let metrics = https_get(&http_url, &pki.ca, "/metrics", USER_TOKEN);
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(metrics.contains("twinhead_run_step{"), "{metrics}");

    // Debug logs of every process name no token.
    for log in [&coordinator_log, &dataprep_log]
        .into_iter()
        .chain(worker_logs.iter())
    {
        let text = std::fs::read_to_string(log).expect("log");
        assert!(!text.is_empty(), "{} is empty", log.display());
        for token in [USER_TOKEN, WORKER_TOKEN] {
            assert!(!text.contains(token), "{} shows a token", log.display());
        }
    }
}

#[test]
fn a_coordinator_names_the_tls_file_that_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let pki = make_pki(d);
    let coordinator = |cert: &Path, key: &Path, client_ca: Option<&Path>| {
        let mut command = twinhead();
        command
            .args(["coordinator", "--listen", "127.0.0.1:0", "--db"])
            .arg(d.join("c.db"))
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key);
        if let Some(ca) = client_ca {
            command.arg("--client-ca").arg(ca);
        }
        command.output().expect("coordinator")
    };
    let missing = d.join("missing.pem");
    assert_clean_error(
        &coordinator(&missing, &pki.server_key, None),
        &["--tls-cert", "missing.pem"],
    );
    assert_clean_error(
        &coordinator(&pki.server_key, &pki.server_key, None),
        &["--tls-cert", "server-key.pem", "no certificate"],
    );
    assert_clean_error(
        &coordinator(&pki.server_cert, &pki.server_cert, None),
        &["--tls-key", "server.pem", "no private key"],
    );
    assert_clean_error(
        &coordinator(&pki.server_cert, &pki.client_key, None),
        &["worker-key.pem", "does not belong to the certificate"],
    );
    assert_clean_error(
        &coordinator(&pki.server_cert, &pki.server_key, Some(&pki.server_key)),
        &["--client-ca", "server-key.pem"],
    );
    let keyless = twinhead()
        .args(["coordinator", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&pki.server_cert)
        .output()
        .expect("coordinator");
    assert!(!keyless.status.success());
    assert!(
        common::stderr(&keyless).contains("--tls-key"),
        "{}",
        common::stderr(&keyless)
    );
}
