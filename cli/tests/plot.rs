//! `twinhead coordinator --http` and `twinhead plot` as a user runs them: a
//! real coordinator process, a worker simulated over the real gRPC worker
//! API, and the PNG decoded pixel by pixel.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use tonic::transport::Channel;
use twinhead_proto::v1::worker_service_client::WorkerServiceClient;
use twinhead_proto::v1::{
    Assignment, Checkpoint, GetAssignmentRequest, RegisterRequest, ReportCheckpointRequest,
    ReportProgressRequest,
};

/// The colours of phases 0, 1 and 2 in `twinhead plot` (its palette).
const PHASE_COLOURS: [[u8; 3]; 3] = [[0x1f, 0x77, 0xb4], [0xff, 0x7f, 0x0e], [0x2c, 0xa0, 0x2c]];

fn twinhead() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_twinhead"));
    command
        .env_remove("TWINHEAD_COORDINATOR")
        .env_remove("TWINHEAD_TOKEN")
        .env_remove("TWINHEAD_TOKEN_FILE")
        .env("TWINHEAD_LOG", "warn")
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    command
}

/// `twinhead coordinator --http 127.0.0.1:0`, killed on drop.
struct CoordinatorProcess {
    child: Child,
    grpc_url: String,
    http_addr: String,
}

impl CoordinatorProcess {
    fn start(db: &Path) -> CoordinatorProcess {
        let mut child = twinhead()
            .args([
                "coordinator",
                "--listen",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--db",
            ])
            .arg(db)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn coordinator");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut url_on_line = || {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("read address line");
            line.trim()
                .rsplit(' ')
                .next()
                .filter(|u| u.starts_with("http://"))
                .unwrap_or_else(|| panic!("unexpected line {line:?}"))
                .to_string()
        };
        let grpc_url = url_on_line();
        let http_url = url_on_line();
        let http_addr = http_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        CoordinatorProcess {
            child,
            grpc_url,
            http_addr,
        }
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(args: &[&str], url: &str) -> Output {
    twinhead()
        .args(args)
        .env("TWINHEAD_COORDINATOR", url)
        .output()
        .expect("run twinhead")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Submits tiny-cpu.toml with a manifest-only dataset in `dir`.
fn submit(url: &str, dir: &Path, name: &str) -> String {
    let dataset = common::manifest_only_dataset(dir, "configs/runs/tiny-cpu.toml");
    let output = run(
        &[
            "submit",
            "configs/runs/tiny-cpu.toml",
            "--set",
            &format!("dataset={}", dataset.display()),
            "--set",
            "world_size=1",
            "--set",
            &format!("name={name}"),
            "--json",
        ],
        url,
    );
    assert!(output.status.success(), "submit: {}", stderr(&output));
    let value: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("submit --json prints JSON");
    value["run_id"].as_str().expect("run_id").to_string()
}

/// A one-rank world simulated over the worker API.
struct FakeWorker {
    id: String,
    client: WorkerServiceClient<Channel>,
    assignment: Option<Assignment>,
}

impl FakeWorker {
    async fn register(url: &str) -> FakeWorker {
        let mut client = WorkerServiceClient::connect(url.to_string())
            .await
            .expect("connect");
        let id = client
            .register(RegisterRequest {
                hostname: "plot-test".into(),
                device: "cpu".into(),
                pid: std::process::id(),
            })
            .await
            .expect("register")
            .into_inner()
            .worker_id;
        FakeWorker {
            id,
            client,
            assignment: None,
        }
    }

    async fn next_assignment(&mut self) -> Assignment {
        let known = self
            .assignment
            .as_ref()
            .map(|a| a.assignment_id.clone())
            .unwrap_or_default();
        let assignment = self
            .client
            .get_assignment(GetAssignmentRequest {
                worker_id: self.id.clone(),
                known_assignment_id: known,
                wait_ms: 10_000,
            })
            .await
            .expect("get assignment")
            .into_inner()
            .assignment
            .expect("an assignment within 10 s");
        self.assignment = Some(assignment.clone());
        assignment
    }

    async fn progress(&mut self, step: u64, tokens: u64, loss: f64) {
        let a = self.assignment.clone().expect("assigned");
        self.client
            .report_progress(ReportProgressRequest {
                worker_id: self.id.clone(),
                world_id: a.world_id,
                phase_index: a.phase_index,
                step,
                tokens,
                loss,
                tokens_per_sec: 5000.0,
                lr: 1e-3,
                grad_norm: 1.0,
                mfu: 0.0,
            })
            .await
            .expect("report progress");
    }

    async fn checkpoint(&mut self, step: u64, tokens: u64) {
        let a = self.assignment.clone().expect("assigned");
        self.client
            .report_checkpoint(ReportCheckpointRequest {
                worker_id: self.id.clone(),
                world_id: a.world_id.clone(),
                checkpoint: Some(Checkpoint {
                    phase_index: a.phase_index,
                    step,
                    tokens,
                    url: format!(
                        "file:///tmp/plot-test/{}/p{}/s{step}",
                        a.run_id, a.phase_index
                    ),
                    ..Default::default()
                }),
            })
            .await
            .expect("report checkpoint");
    }
}

/// Decodes an RGB(A) PNG: (width, height, pixels as RGB).
fn decode(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let bytes = std::fs::read(path).expect("read png");
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected colour type {other:?}"),
    };
    let mut pixels = Vec::new();
    for y in 0..info.height as usize {
        let row = &buf[y * info.line_size..][..info.width as usize * channels];
        pixels.extend(row.chunks(channels).map(|p| [p[0], p[1], p[2]]));
    }
    (info.width, info.height, pixels)
}

#[tokio::test]
async fn plot_draws_each_phase_in_its_colour() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = CoordinatorProcess::start(&dir.path().join("c.db"));
    let url = coordinator.grpc_url.clone();
    let run_id = submit(&url, dir.path(), "plotted");
    let mut worker = FakeWorker::register(&url).await;
    worker.next_assignment().await;
    // tiny-cpu: phase 0 is 256 steps of 1,024 tokens, phase 1 is 4 of 8,192.
    for (step, loss) in [(1, 9.0), (64, 7.0), (128, 6.2), (192, 5.9), (256, 5.7)] {
        worker.progress(step, step * 1024, loss).await;
    }
    worker.checkpoint(256, 256 * 1024).await;
    let second = worker.next_assignment().await;
    assert_eq!(second.phase_index, 1, "the checkpoint ended phase 0");
    for (step, loss) in [(1, 5.9), (2, 5.5), (3, 5.3), (4, 5.2)] {
        worker.progress(step, step * 8192, loss).await;
    }

    let out = dir.path().join("loss.png");
    let output = run(
        &[
            "plot",
            &run_id,
            "--out",
            out.to_str().expect("utf-8 path"),
            "--width",
            "640",
            "--height",
            "400",
        ],
        &url,
    );
    assert!(output.status.success(), "plot: {}", stderr(&output));
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("9 points, 2 phases"), "{said}");

    // Keep a copy to look at when asked (e.g. after a failure in CI).
    if let Some(keep) = std::env::var_os("TWINHEAD_SCREENSHOT_DIR") {
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::copy(&out, Path::new(&keep).join("plot.png"));
    }
    let (width, height, pixels) = decode(&out);
    assert_eq!((width, height), (640, 400));
    let count = |colour: [u8; 3]| pixels.iter().filter(|p| **p == colour).count();
    assert!(
        count(PHASE_COLOURS[0]) > 300,
        "phase 0 line: {}",
        count(PHASE_COLOURS[0])
    );
    assert!(
        count(PHASE_COLOURS[1]) > 100,
        "phase 1 line: {}",
        count(PHASE_COLOURS[1])
    );
    assert_eq!(count(PHASE_COLOURS[2]), 0, "phase 2 has no reports");
    // Tick labels and the axes are drawn in dark ink.
    assert!(
        pixels
            .iter()
            .filter(|p| p[0] < 130 && p[0] == p[1] && p[1] == p[2])
            .count()
            > 500
    );

    // The HTTP port of the same process serves the same run.
    let metrics = http_get(&coordinator.http_addr, "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains(&format!(
            "twinhead_run_loss{{run=\"{run_id}\",name=\"plotted\"}} 5.2\n"
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn plot_fails_cleanly_for_an_unknown_run_or_one_without_progress() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = CoordinatorProcess::start(&dir.path().join("c.db"));
    let url = coordinator.grpc_url.clone();
    let out: PathBuf = dir.path().join("never.png");
    let out_arg = out.to_str().expect("utf-8 path");

    let unknown = run(&["plot", "run-999999", "--out", out_arg], &url);
    assert_clean_error(&unknown, "no run \"run-999999\"");

    let run_id = submit(&url, dir.path(), "quiet");
    let quiet = run(&["plot", &run_id, "--out", out_arg], &url);
    assert_clean_error(&quiet, "has no progress reports yet");

    let tiny = run(&["plot", &run_id, "--out", out_arg, "--width", "10"], &url);
    assert_clean_error(
        &tiny,
        "--width: must be between 200 and 8000 pixels, got 10",
    );
    assert!(!out.exists(), "no file is written on failure");
}

fn assert_clean_error(output: &Output, needle: &str) {
    let err = stderr(output);
    assert!(!output.status.success(), "expected failure");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "{needle:?} not in {err}");
}

/// One GET with `Connection: close`; the raw response.
fn http_get(addr: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the http port");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    response
}
