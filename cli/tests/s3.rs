//! Datasets and checkpoints on a real S3 API: an in-process `s3s-fs`
//! server on loopback (object_store's put, get, range get, list and
//! multipart against a folder), reached by `twinhead` processes through the
//! standard `AWS_*` variables, as a user points twinhead at MinIO or Ceph.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{CoordinatorProcess, assert_clean_error, fixture_data_config, json, tree, twinhead};

const ACCESS_KEY: &str = "twinhead-test";
const SECRET_KEY: &str = "twinhead-test-secret";
const BUCKET: &str = "twinhead";

/// An S3 server serving folder `root` (bucket `twinhead` is
/// `root/twinhead`) on a loopback port, on a thread of its own; stopped
/// when dropped.
struct S3Server {
    addr: SocketAddr,
    root: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    tripwire: Tripwire,
}

/// Once armed, the server stops at the next PUT of a checkpoint object
/// other than `COMMITTED`: that request never gets an answer and every
/// connection drops, as when a store goes away in the middle of a
/// checkpoint upload.
#[derive(Clone, Default)]
struct Tripwire {
    armed: Arc<AtomicBool>,
    /// The path of the request the server stopped at.
    tripped: Arc<Mutex<Option<String>>>,
    fire: Arc<tokio::sync::Notify>,
}

impl Tripwire {
    fn catches(&self, request: &hyper::Request<hyper::body::Incoming>) -> bool {
        let path = request.uri().path();
        let caught = request.method() == hyper::Method::PUT
            && path.contains("/checkpoints/")
            && !path.ends_with("/COMMITTED")
            && self.armed.swap(false, Ordering::SeqCst);
        if caught {
            *self.tripped.lock().expect("tripwire") = Some(path.to_string());
            self.fire.notify_one();
        }
        caught
    }

    /// Waits until the server stopped at a checkpoint object; its path.
    fn wait(&self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(path) = self.tripped.lock().expect("tripwire").clone() {
                return path;
            }
            assert!(
                Instant::now() < deadline,
                "no checkpoint upload within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl S3Server {
    fn start(root: &Path) -> S3Server {
        Self::start_on(root, "127.0.0.1:0".parse().expect("addr"))
    }

    fn start_on(root: &Path, addr: SocketAddr) -> S3Server {
        std::fs::create_dir_all(root.join(BUCKET)).expect("bucket folder");
        let listener = std::net::TcpListener::bind(addr).expect("bind the S3 port");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let folder = root.to_path_buf();
        let tripwire = Tripwire::default();
        let trip = tripwire.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("S3 runtime");
            runtime.block_on(async move {
                let fs = s3s_fs::FileSystem::new(&folder).expect("s3s-fs root");
                let mut builder = s3s::service::S3ServiceBuilder::new(fs);
                builder.set_auth(s3s::auth::SimpleAuth::from_single(
                    ACCESS_KEY,
                    SECRET_KEY.to_string(),
                ));
                let s3 = builder.build();
                let watched = trip.clone();
                let service = hyper::service::service_fn(move |request| {
                    let (s3, trip) = (s3.clone(), watched.clone());
                    async move {
                        if trip.catches(&request) {
                            std::future::pending::<()>().await;
                        }
                        hyper::service::Service::call(&s3, request).await
                    }
                });
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let http = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((socket, _)) = accepted else { continue };
                            let conn = http
                                .serve_connection(hyper_util::rt::TokioIo::new(socket), service.clone())
                                .into_owned();
                            tokio::spawn(async move {
                                let _ = conn.await;
                            });
                        }
                        _ = &mut stopped => break,
                        _ = trip.fire.notified() => break,
                    }
                }
            });
            // Dropping the runtime drops every open connection.
        });
        S3Server {
            addr,
            root: root.to_path_buf(),
            stop: Some(stop),
            thread: Some(thread),
            tripwire,
        }
    }

    /// The variables a twinhead process needs to reach this server.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT", format!("http://{}", self.addr)),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
    }

    /// The folder behind `s3://twinhead/<key>`.
    fn folder(&self, key: &str) -> PathBuf {
        self.root.join(BUCKET).join(key)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `twinhead` with the S3 server's variables.
fn on_s3(s3: &S3Server) -> Command {
    let mut command = twinhead();
    command.envs(s3.env());
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

/// Builds the fixture dataset to folder `out`; returns `out`.
fn build_locally(config: &Path, out: &Path) -> PathBuf {
    ok(twinhead()
        .args(["dataset", "build"])
        .arg(config)
        .arg("--out")
        .arg(out)
        .output()
        .expect("build"));
    out.to_path_buf()
}

/// Builds the fixture dataset to `s3://twinhead/data`; returns its URL.
fn build_on_s3(s3: &S3Server, config: &Path) -> String {
    let built = json(&ok(on_s3(s3)
        .args(["dataset", "build"])
        .arg(config)
        .args(["--out", "s3://twinhead/data", "--json"])
        .output()
        .expect("build on S3")));
    built["url"].as_str().expect("url").to_string()
}

/// The objects of a dataset on S3 equal the files of the same dataset
/// built locally, byte for byte (s3s-fs keeps each object as a file).
fn assert_same_objects(local: &Path, on_s3: &Path) {
    let want = tree(local);
    assert!(want.contains_key("manifest.json"), "{:?}", want.keys());
    let got = tree(on_s3);
    for (rel, bytes) in &want {
        let found = got
            .get(rel)
            .unwrap_or_else(|| panic!("{rel} is missing on S3"));
        assert!(found == bytes, "{rel} differs on S3");
    }
}

/// A tiny encoder through both fixture phases, data and checkpoints on S3.
fn recipe(dir: &Path, name: &str, world: u32, dataset: &str) -> PathBuf {
    recipe_with(dir, name, world, dataset, "")
}

/// [`recipe`] with more top-level keys.
fn recipe_with(dir: &Path, name: &str, world: u32, dataset: &str, extra: &str) -> PathBuf {
    let text = format!(
        r#"
name = "{name}"
{extra}
model = "tiny"
objective = "mlm"
dataset = "{dataset}"
seed = 7
world_size = {world}
global_batch = 8
micro_batch = 2
[optimizer]
peak_lr = 3e-3
[checkpoint]
root = "s3://{BUCKET}/checkpoints"
every_tokens = 1024
[[phases]]
name = "short"
tokens = 3072
seq_len = 64
mask_ratio = 0.3
[[phases]]
name = "long"
tokens = 4096
seq_len = 256
mask_ratio = 0.15
"#
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("recipe");
    path
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn worker(s3: &S3Server, url: &str, log: &Path) -> Proc {
    let log = std::fs::File::create(log).expect("log");
    Proc(
        on_s3(s3)
            .args(["worker", "--exit-when-idle", "--coordinator", url])
            .env("TWINHEAD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("worker"),
    )
}

fn status(url: &str, run: &str) -> serde_json::Value {
    json(&ok(twinhead()
        .args(["status", "--json", "--coordinator", url, run])
        .output()
        .expect("status")))
}

fn wait_for(
    url: &str,
    run: &str,
    logs: &[PathBuf],
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s = status(url, run);
        if done(&s) {
            return s;
        }
        let dump: String = logs
            .iter()
            .map(|l| std::fs::read_to_string(l).unwrap_or_default())
            .collect();
        assert!(
            s["state"] != "failed" && s["state"] != "cancelled",
            "{s}\n{dump}"
        );
        assert!(Instant::now() < deadline, "timed out: {s}\n{dump}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn submit(url: &str, recipe: &Path) -> String {
    let out = ok(twinhead()
        .args(["submit", "--json", "--coordinator", url])
        .arg(recipe)
        .output()
        .expect("submit"));
    json(&out)["run_id"].as_str().expect("run_id").to_string()
}

#[test]
fn datasets_and_checkpoints_live_on_s3_through_build_verify_training_resume_and_export() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s3 = S3Server::start(&dir.path().join("s3"));
    let config = fixture_data_config(dir.path());

    // The same dataset locally and on S3: the same bytes.
    let local = build_locally(&config, &dir.path().join("local"));
    let dataset = build_on_s3(&s3, &config);
    assert_eq!(dataset, "s3://twinhead/data/train-fixture");
    assert_same_objects(
        &local.join("train-fixture"),
        &s3.folder("data/train-fixture"),
    );
    let verified = json(&ok(on_s3(&s3)
        .args(["dataset", "verify", &dataset, "--json"])
        .output()
        .expect("verify")));
    assert_eq!(verified["ok"], true, "{verified}");

    // A missing dataset and a wrong key: clear errors naming the URL.
    let missing = on_s3(&s3)
        .args(["dataset", "verify", "s3://twinhead/no-such-dataset"])
        .output()
        .expect("verify");
    assert_clean_error(&missing, &["s3://twinhead/no-such-dataset"]);
    let refused = on_s3(&s3)
        .env("AWS_SECRET_ACCESS_KEY", "not-the-key")
        .args(["dataset", "verify", &dataset])
        .output()
        .expect("verify");
    assert_clean_error(&refused, &[dataset.as_str()]);

    // Two workers train from the S3 shards and write checkpoints there.
    let coordinator = CoordinatorProcess::start_with_env(
        &dir.path().join("c.db"),
        &[
            "--heartbeat-interval-ms",
            "300",
            "--lease-timeout-ms",
            "1500",
        ],
        &s3.env(),
    );
    let url = coordinator.url.clone();
    let logs: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("w{i}.log")))
        .collect();
    let run = submit(&url, &recipe(dir.path(), "on-s3", 2, &dataset));
    let workers = vec![worker(&s3, &url, &logs[0]), worker(&s3, &url, &logs[1])];
    let trained = wait_for(&url, &run, &logs, |s| s["state"] == "completed");
    drop(workers);
    let checkpoints = trained["checkpoints"].as_array().expect("checkpoints");
    assert!(checkpoints.len() >= 4, "{trained}");
    for c in checkpoints {
        let at = c["url"].as_str().unwrap_or("");
        assert!(at.starts_with("s3://twinhead/checkpoints/"), "{c}");
        let key = at.trim_start_matches("s3://twinhead/");
        assert!(
            s3.folder(key).join("COMMITTED").is_file(),
            "{at} has no COMMITTED object"
        );
    }

    // One worker, killed once a checkpoint is on S3: a new one resumes
    // from it and the run ends.
    let run = submit(&url, &recipe(dir.path(), "resumed", 1, &dataset));
    let mut first = worker(&s3, &url, &logs[2]);
    wait_for(&url, &run, &logs, |s| {
        s["checkpoints"].as_array().is_some_and(|c| !c.is_empty())
    });
    first.0.kill().expect("kill");
    let _ = first.0.wait();
    let _second = worker(&s3, &url, &logs[0]);
    let resumed = wait_for(&url, &run, &logs, |s| s["state"] == "completed");
    let attempts = resumed["attempts"].as_array().expect("attempts");
    assert!(attempts.len() >= 2, "{resumed}");
    let from = attempts[attempts.len() - 1]["start_checkpoint"]["url"]
        .as_str()
        .unwrap_or("");
    assert!(from.starts_with("s3://twinhead/checkpoints/"), "{resumed}");

    // Export reads the last checkpoint and the tokenizer from S3.
    let hf = dir.path().join("hf");
    ok(on_s3(&s3)
        .args(["export", "--coordinator", &url, &run, "--hf"])
        .arg(&hf)
        .output()
        .expect("export"));
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(hf.join(file).is_file(), "{file} exported");
    }
}

#[test]
fn dataprep_processes_build_to_s3_the_bytes_of_one_local_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s3 = S3Server::start(&dir.path().join("s3"));
    let config = fixture_data_config(dir.path());
    let local = build_locally(&config, &dir.path().join("local"));

    let coordinator = CoordinatorProcess::start(&dir.path().join("c.db"), &[]);
    let url = coordinator.url.clone();
    let dataprep: Vec<Proc> = (0..2)
        .map(|_| {
            Proc(
                on_s3(&s3)
                    .args(["dataprep", "--threads", "1", "--coordinator", &url])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("dataprep"),
            )
        })
        .collect();
    let done = json(&ok(on_s3(&s3)
        .args(["dataset", "submit"])
        .arg(&config)
        .args([
            "--out",
            "s3://twinhead/shared",
            "--json",
            "--coordinator",
            &url,
        ])
        .output()
        .expect("submit")));
    assert_eq!(done["state"], "complete", "{done}");
    assert_eq!(done["url"], "s3://twinhead/shared/train-fixture");
    drop(dataprep);
    assert_same_objects(
        &local.join("train-fixture"),
        &s3.folder("shared/train-fixture"),
    );
}

#[test]
fn an_s3_server_stopped_during_a_checkpoint_upload_is_ridden_out_and_no_partial_checkpoint_is_used()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("s3");
    let s3 = S3Server::start(&root);
    let config = fixture_data_config(dir.path());
    let dataset = build_on_s3(&s3, &config);
    let coordinator = CoordinatorProcess::start_with_env(
        &dir.path().join("c.db"),
        &[
            "--heartbeat-interval-ms",
            "300",
            "--lease-timeout-ms",
            "1500",
        ],
        &s3.env(),
    );
    let url = coordinator.url.clone();
    let logs = vec![dir.path().join("w0.log")];
    let run = submit(
        &url,
        &recipe_with(dir.path(), "outage", 1, &dataset, "max_restarts = 30"),
    );
    let _worker = worker(&s3, &url, &logs[0]);
    wait_for(&url, &run, &logs, |s| {
        s["checkpoints"].as_array().is_some_and(|c| !c.is_empty())
    });

    // The store goes away in the middle of the next checkpoint's upload
    // (row reads and checkpoint writes fail, or wait in the store client's
    // retries) and comes back 4 s later on the same address.
    s3.tripwire.armed.store(true, Ordering::SeqCst);
    let tripped = s3.tripwire.wait(Duration::from_secs(120));
    let object = tripped
        .trim_start_matches(&format!("/{BUCKET}/"))
        .to_string();
    let checkpoint = object
        .rsplit_once('/')
        .map(|(folder, _)| folder.to_string())
        .expect("a checkpoint folder");
    assert!(
        !s3.folder(&checkpoint).join("COMMITTED").exists(),
        "{checkpoint} was committed before all its objects were written"
    );
    let addr = s3.addr;
    drop(s3);
    std::thread::sleep(Duration::from_secs(4));
    let s3 = S3Server::start_on(&root, addr);
    let done = wait_for(&url, &run, &logs, |s| s["state"] == "completed");

    // Whether the store client's own retries finished the upload or a
    // world failed and was re-formed, no checkpoint may look bad, every
    // recorded one is whole, and the interrupted one was used only if its
    // upload was completed and committed.
    let log = std::fs::read_to_string(&logs[0]).unwrap_or_default();
    assert!(
        !log.contains("is unusable"),
        "an unreachable store made a checkpoint look bad:\n{log}"
    );
    let key = |c: &serde_json::Value| {
        c["url"]
            .as_str()
            .unwrap_or("")
            .trim_start_matches(&format!("s3://{BUCKET}/"))
            .trim_end_matches('/')
            .to_string()
    };
    for c in done["checkpoints"].as_array().expect("checkpoints") {
        assert!(s3.folder(&key(c)).join("COMMITTED").is_file(), "{c}");
    }
    if !s3.folder(&checkpoint).join("COMMITTED").is_file() {
        for attempt in done["attempts"].as_array().expect("attempts") {
            assert_ne!(key(&attempt["start_checkpoint"]), checkpoint, "{attempt}");
        }
    } else {
        assert!(
            s3.folder(&object).is_file(),
            "{object} is missing from a committed checkpoint"
        );
    }
    let phases = done["phases"].as_array().expect("phases");
    assert_eq!(phases[1]["tokens_done"], 4096, "{done}");
}
