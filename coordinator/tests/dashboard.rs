//! The coordinator's HTTP port over real sockets with SQLite on disk:
//! `/metrics` through a Prometheus text parser, the JSON API the dashboard
//! polls, bearer-token checks, and the dashboard page itself rendered by
//! headless Chromium.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::http::get;
use common::{Coordinator, SimWorker, spec_with, tiny_spec};
use twinhead_coordinator::{LeaseSettings, ServerConfig};
use twinhead_proto::v1::{GetProgressRequest, ReportProgressRequest, SubmitRunRequest};

fn config(dir: &Path, user_token: Option<&str>) -> ServerConfig {
    ServerConfig {
        tls: None,
        db: dir.join("c.db"),
        user_token: user_token.map(str::to_string),
        worker_token: None,
        leases: LeaseSettings::default(),
    }
}

async fn submit(c: &Coordinator, name: &str, token: Option<&str>) -> String {
    c.runs_with_token(token)
        .await
        .submit_run(SubmitRunRequest {
            spec: Some(tiny_spec(name)),
        })
        .await
        .expect("submit")
        .into_inner()
        .run_id
}

/// Two workers registered and assigned to the first pending run, rank 0
/// first.
async fn world_of_two(c: &Coordinator, hostnames: [&str; 2]) -> (SimWorker, SimWorker) {
    let mut a = SimWorker::register(c, hostnames[0]).await;
    let mut b = SimWorker::register(c, hostnames[1]).await;
    a.next_assignment().await;
    b.next_assignment().await;
    if a.assignment.as_ref().map(|x| x.rank) == Some(0) {
        (a, b)
    } else {
        (b, a)
    }
}

/// Rank 0 reports a step with chosen numbers.
async fn report(worker: &mut SimWorker, step: u64, tokens: u64, loss: f64, tokens_per_sec: f64) {
    let request = ReportProgressRequest {
        tokens_per_sec,
        grad_norm: 0.5,
        mfu: 0.25,
        ..worker.progress_request(step, tokens, loss)
    };
    let ack = worker
        .client
        .report_progress(request)
        .await
        .expect("report progress")
        .into_inner();
    assert_eq!(ack.reason, "", "progress accepted");
}

// ---------------------------------------------------------------- metrics

/// A sample line as the strict reader saw it, label values unescaped.
struct StrictSample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// One sample line of the text format, parsed strictly: a metric name,
/// optional `{k="v",...}` with escapes `\\`, `\"`, `\n` (and nothing else),
/// a value. Panics on anything else.
fn strict_sample(line: &str) -> StrictSample {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    assert!(!name.is_empty(), "no metric name: {line:?}");
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        loop {
            let key_start = chars.peek().map(|(i, _)| *i).expect("label or }");
            if after[key_start..].starts_with('}') {
                chars.next();
                break;
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                assert!(
                    c.is_ascii_alphanumeric() || c == '_',
                    "bad label name in {line:?}"
                );
                key.push(c);
            }
            assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "quote in {line:?}");
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => panic!("bad escape {other:?} in {line:?}"),
                    },
                    Some('"') => break,
                    Some('\n') | None => panic!("unterminated label value in {line:?}"),
                    Some(c) => value.push(c),
                }
            }
            labels.push((key, value));
            match chars.next().map(|(_, c)| c) {
                Some(',') => continue,
                Some('}') => break,
                other => panic!("expected , or }} after a label, got {other:?} in {line:?}"),
            }
        }
        let consumed = chars.peek().map_or(after.len(), |(i, _)| *i);
        rest = &after[consumed..];
    }
    let value_text = rest.strip_prefix(' ').expect("space before the value");
    let value = match value_text {
        "NaN" => f64::NAN,
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|_| panic!("bad value {v:?} in {line:?}")),
    };
    StrictSample {
        name: name.to_string(),
        labels,
        value,
    }
}

/// Checks the whole exposition strictly: every sample's family has HELP
/// and TYPE lines before it (gauges, counters, and histograms whose samples
/// are its `_bucket`, `_sum` and `_count`), no family is declared twice,
/// every sample line parses. Returns the samples.
fn strict_exposition(text: &str) -> Vec<StrictSample> {
    let mut helped = Vec::new();
    let mut typed = Vec::new();
    let mut histograms: Vec<String> = Vec::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().expect("name").to_string();
            assert!(!helped.contains(&name), "HELP twice for {name}");
            helped.push(name);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().expect("name").to_string();
            match parts.next() {
                Some("gauge" | "counter") => {}
                Some("histogram") => histograms.push(name.clone()),
                _ => panic!("unexpected type in {line:?}"),
            }
            assert!(!typed.contains(&name), "TYPE twice for {name}");
            typed.push(name);
        } else {
            assert!(!line.starts_with('#'), "stray comment {line:?}");
            let sample = strict_sample(line);
            let family = histograms
                .iter()
                .find(|h| {
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|suffix| sample.name == format!("{h}{suffix}"))
                })
                .cloned()
                .unwrap_or_else(|| sample.name.clone());
            assert!(helped.contains(&family), "no HELP before {line:?}");
            assert!(typed.contains(&family), "no TYPE before {line:?}");
            assert!(!sample.value.is_nan(), "NaN in {line:?}");
            samples.push(sample);
        }
    }
    samples
}

fn labels_of(sample: &prometheus_parse::Sample) -> HashMap<&str, &str> {
    sample
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// The gauge value of the one sample of `metric` whose labels include all
/// of `want`.
fn gauge(scrape: &prometheus_parse::Scrape, metric: &str, want: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| {
            let labels = labels_of(s);
            want.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) => v,
            ref other => panic!("{metric} is not a gauge: {other:?}"),
        })
        .collect();
    assert!(
        matching.len() <= 1,
        "{metric} {want:?} matches {matching:?}"
    );
    matching.first().copied()
}

#[tokio::test]
async fn metrics_expose_runs_and_workers_after_progress() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start_with_http(config(dir.path(), None)).await;
    let run = submit(&c, "metrics-run", None).await;
    // The second hostname needs every escape of the text format.
    let odd_host = "rack \"7\" \\ slot\nB";
    let (mut rank0, rank1) = world_of_two(&c, ["node-a", odd_host]).await;
    let waiting = submit(&c, "waiting-run", None).await;
    let idle = SimWorker::register(&c, "node-idle").await;
    report(&mut rank0, 1, 64, 3.0, 900.0).await;
    report(&mut rank0, 2, 128, 2.5, 1234.5).await;

    let response = get(&c.http_url(), "/metrics", None).await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        response.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = response.body;
    let strict = strict_exposition(&text);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("prometheus text");

    for family in [
        "twinhead_runs",
        "twinhead_run_phase_index",
        "twinhead_run_step",
        "twinhead_run_tokens",
        "twinhead_run_loss",
        "twinhead_run_tokens_per_second",
        "twinhead_run_mfu_ratio",
        "twinhead_run_checkpoints",
        "twinhead_workers",
        "twinhead_worker_heartbeat_age_seconds",
        "twinhead_worker_state",
    ] {
        assert!(scrape.docs.contains_key(family), "no HELP for {family}");
    }

    assert_eq!(
        gauge(&scrape, "twinhead_runs", &[("state", "running")]),
        Some(1.0)
    );
    assert_eq!(
        gauge(&scrape, "twinhead_runs", &[("state", "pending")]),
        Some(1.0)
    );
    assert_eq!(
        gauge(&scrape, "twinhead_runs", &[("state", "completed")]),
        Some(0.0)
    );
    let this_run = [("run", run.as_str()), ("name", "metrics-run")];
    assert_eq!(gauge(&scrape, "twinhead_run_loss", &this_run), Some(2.5));
    assert_eq!(
        gauge(&scrape, "twinhead_run_tokens_per_second", &this_run),
        Some(1234.5)
    );
    assert_eq!(
        gauge(&scrape, "twinhead_run_mfu_ratio", &this_run),
        Some(0.25)
    );
    assert_eq!(gauge(&scrape, "twinhead_run_step", &this_run), Some(2.0));
    assert_eq!(
        gauge(&scrape, "twinhead_run_tokens", &this_run),
        Some(128.0)
    );
    assert_eq!(
        gauge(&scrape, "twinhead_run_phase_index", &this_run),
        Some(0.0)
    );
    // A run that has not trained has no loss, throughput or MFU yet.
    let other = [("run", waiting.as_str())];
    assert_eq!(gauge(&scrape, "twinhead_run_loss", &other), None);
    assert_eq!(gauge(&scrape, "twinhead_run_mfu_ratio", &other), None);
    assert_eq!(gauge(&scrape, "twinhead_run_tokens", &other), Some(0.0));

    assert_eq!(
        gauge(&scrape, "twinhead_workers", &[("state", "training")]),
        Some(2.0)
    );
    assert_eq!(
        gauge(&scrape, "twinhead_workers", &[("state", "idle")]),
        Some(1.0)
    );
    assert_eq!(
        gauge(&scrape, "twinhead_workers", &[("state", "dead")]),
        Some(0.0)
    );
    let busy = [("worker", rank0.id.as_str()), ("state", "training")];
    assert_eq!(gauge(&scrape, "twinhead_worker_state", &busy), Some(1.0));
    let not_idle = [("worker", rank0.id.as_str()), ("state", "idle")];
    assert_eq!(
        gauge(&scrape, "twinhead_worker_state", &not_idle),
        Some(0.0)
    );
    let idle_now = [("worker", idle.id.as_str()), ("state", "idle")];
    assert_eq!(
        gauge(&scrape, "twinhead_worker_state", &idle_now),
        Some(1.0)
    );
    for w in [&rank0.id, &rank1.id, &idle.id] {
        let age = gauge(
            &scrape,
            "twinhead_worker_heartbeat_age_seconds",
            &[("worker", w.as_str())],
        )
        .unwrap_or_else(|| panic!("no heartbeat age for {w}"));
        assert!((0.0..30.0).contains(&age), "{w}: {age}");
    }

    // The strict reading gets the odd hostname back exactly.
    let odd = strict
        .iter()
        .find(|sample| {
            sample.name == "twinhead_worker_heartbeat_age_seconds"
                && sample
                    .labels
                    .iter()
                    .any(|(k, v)| k == "worker" && *v == rank1.id)
        })
        .expect("rank 1's heartbeat age");
    assert!(
        odd.labels
            .iter()
            .any(|(k, v)| k == "hostname" && v == odd_host),
        "{:?}",
        odd.labels
    );
    c.stop().await;
}

#[tokio::test]
async fn http_api_requires_the_user_token_when_one_is_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start_with_http(config(dir.path(), Some("s3cret"))).await;
    let base = c.http_url();
    for path in ["/metrics", "/api/runs", "/api/workers", "/api/datasets"] {
        let missing = get(&base, path, None).await;
        assert_eq!(missing.status, 401, "{path}: {}", missing.body);
        assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
        assert!(
            missing.json()["error"]
                .as_str()
                .is_some_and(|e| e.contains("needs the user token")),
            "{}",
            missing.body
        );
        let wrong = get(&base, path, Some("guess")).await;
        assert_eq!(wrong.status, 401, "{path}");
        let right = get(&base, path, Some("s3cret")).await;
        assert_eq!(right.status, 200, "{path}: {}", right.body);
    }
    // The page holds no data, so it loads without the token and asks for it.
    let page = get(&base, "/", None).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<title>twinhead</title>"));
    assert!(
        page.header("content-type")
            .is_some_and(|t| t.starts_with("text/html"))
    );
    c.stop().await;
}

// ------------------------------------------------------------------- JSON

#[tokio::test]
async fn json_endpoints_return_what_was_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start_with_http(config(dir.path(), None)).await;
    let base = c.http_url();
    let run = submit(&c, "json-run", None).await;
    let (mut rank0, mut rank1) = world_of_two(&c, ["node-a", "node-b"]).await;
    // Phase 0 has 3 steps of 64 tokens; its last checkpoint starts phase 1.
    report(&mut rank0, 1, 64, 4.0, 1000.0).await;
    report(&mut rank0, 2, 128, 3.5, 1100.0).await;
    report(&mut rank0, 3, 192, 3.0, 1200.0).await;
    rank0.checkpoint(3).await.expect("checkpoint ends phase 0");
    rank0.next_assignment().await;
    rank1.next_assignment().await;
    report(&mut rank0, 1, 128, 2.75, 800.0).await;

    let runs = get(&base, "/api/runs", None).await.json();
    let listed = runs.as_array().expect("array");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], run.as_str());
    assert_eq!(listed[0]["name"], "json-run");
    assert_eq!(listed[0]["state"], "running");
    assert_eq!(listed[0]["phase_index"], 1);
    assert_eq!(listed[0]["phase"], "decay");
    assert_eq!(listed[0]["step"], 1);
    assert_eq!(listed[0]["num_steps"], 2);
    // Phase 0's committed checkpoint counts 3,000 tokens (SimWorker's
    // numbers), phase 1 has reported 128.
    assert_eq!(listed[0]["tokens"], 3000 + 128);
    assert_eq!(listed[0]["loss"], 2.75);
    assert_eq!(listed[0]["tokens_per_sec"], 800.0);
    assert_eq!(listed[0]["mfu"], 0.25);

    let detail = get(&base, &format!("/api/runs/{run}"), None).await.json();
    let phases = detail["phases"].as_array().expect("phases");
    assert_eq!(phases.len(), 2);
    assert_eq!(phases[0]["name"], "pretrain");
    assert_eq!(phases[0]["steps_done"], 3);
    assert_eq!(phases[0]["loss"], 3.0);
    assert!(phases[0]["finished_ms"].as_i64().is_some_and(|t| t > 0));
    assert_eq!(phases[1]["steps_done"], 1);
    let checkpoints = detail["checkpoints"].as_array().expect("checkpoints");
    assert_eq!(checkpoints.len(), 1);
    assert_eq!(checkpoints[0]["step"], 3);
    assert_eq!(checkpoints[0]["phase_index"], 0);
    let attempts = detail["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 1);
    assert_eq!(
        attempts[0]["workers"],
        serde_json::json!([rank0.id.clone(), rank1.id.clone()])
    );
    assert_eq!(attempts[0]["ended_ms"], 0);

    let progress = get(&base, &format!("/api/runs/{run}/progress"), None)
        .await
        .json();
    assert_eq!(progress["phases"], serde_json::json!(["pretrain", "decay"]));
    let points = progress["points"].as_array().expect("points");
    let column =
        |key: &str| serde_json::Value::Array(points.iter().map(|p| p[key].clone()).collect());
    assert_eq!(column("phase_index"), serde_json::json!([0, 0, 0, 1]));
    assert_eq!(column("loss"), serde_json::json!([4.0, 3.5, 3.0, 2.75]));
    assert_eq!(column("tokens"), serde_json::json!([64, 128, 192, 128]));
    // Phase 1 starts where phase 0 ended on the run's token axis.
    assert_eq!(column("run_tokens"), serde_json::json!([64, 128, 192, 320]));
    assert!(
        points
            .iter()
            .all(|p| p["world_id"] == rank0.world().as_str())
    );

    // Thinning keeps each phase's ends.
    let thin = get(
        &base,
        &format!("/api/runs/{run}/progress?max_points=2"),
        None,
    )
    .await
    .json();
    let steps: Vec<(u64, u64)> = thin["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| {
            (
                p["phase_index"].as_u64().unwrap_or(99),
                p["step"].as_u64().unwrap_or(99),
            )
        })
        .collect();
    assert_eq!(steps, vec![(0, 1), (0, 3), (1, 1)]);
    let bad = get(
        &base,
        &format!("/api/runs/{run}/progress?max_points=many"),
        None,
    )
    .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body.contains("max_points"), "{}", bad.body);

    // The same curve over gRPC.
    let grpc = c
        .runs()
        .await
        .get_progress(GetProgressRequest {
            run_id: run.clone(),
            max_points: 0,
        })
        .await
        .expect("get progress")
        .into_inner()
        .points;
    let losses: Vec<f64> = grpc.iter().map(|p| p.loss).collect();
    assert_eq!(losses, vec![4.0, 3.5, 3.0, 2.75]);

    // Held-out evaluations: on the run's token axis, with the perplexity,
    // and the latest successful one on /metrics.
    rank0.eval(1, 2.5, "").await.expect("eval");
    rank0
        .eval(2, 0.0, "unreadable shard")
        .await
        .expect("failed eval");
    let progress = get(&base, &format!("/api/runs/{run}/progress"), None)
        .await
        .json();
    let evals = progress["evals"].as_array().expect("evals");
    assert_eq!(evals.len(), 2, "{progress}");
    assert_eq!(evals[0]["phase_index"], 1);
    assert_eq!(evals[0]["step"], 1);
    // Phase 0 reported up to 192 tokens; this one is 1,000 into phase 1.
    assert_eq!(evals[0]["run_tokens"], 192 + 1000);
    assert_eq!(evals[0]["loss"], 2.5);
    let perplexity = evals[0]["perplexity"].as_f64().expect("perplexity");
    assert!((perplexity - 2.5f64.exp()).abs() < 1e-9, "{perplexity}");
    assert_eq!(evals[0]["error"], "");
    assert_eq!(evals[1]["error"], "unreadable shard");
    let text = get(&base, "/metrics", None).await.body;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("prometheus text");
    let labels = [("run", run.as_str()), ("name", "json-run")];
    assert_eq!(gauge(&scrape, "twinhead_run_eval_loss", &labels), Some(2.5));
    assert_eq!(
        gauge(&scrape, "twinhead_run_eval_accuracy", &labels),
        Some(0.25)
    );
    assert_eq!(
        gauge(&scrape, "twinhead_run_eval_failures", &labels),
        Some(1.0)
    );

    let workers = get(&base, "/api/workers", None).await.json();
    let workers = workers.as_array().expect("workers");
    assert_eq!(workers.len(), 2);
    for (w, rank) in [(&rank0, 0), (&rank1, 1)] {
        let entry = workers
            .iter()
            .find(|x| x["id"] == w.id.as_str())
            .unwrap_or_else(|| panic!("{} listed", w.id));
        assert_eq!(entry["state"], "training");
        assert_eq!(entry["run_id"], run.as_str());
        assert_eq!(entry["rank"], rank);
        assert_eq!(entry["world_size"], 2);
        assert_eq!(entry["device"], "cpu");
        assert!(
            entry["heartbeat_age_s"]
                .as_f64()
                .is_some_and(|a| (0.0..30.0).contains(&a))
        );
    }

    let datasets = get(&base, "/api/datasets", None).await;
    assert_eq!(datasets.status, 200);
    assert_eq!(datasets.json(), serde_json::json!([]));

    let unknown = get(&base, "/api/runs/run-999999", None).await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.body.contains("no run"), "{}", unknown.body);
    let unknown = get(&base, "/api/runs/run-999999/progress", None).await;
    assert_eq!(unknown.status, 404);
    let err = c
        .runs()
        .await
        .get_progress(GetProgressRequest {
            run_id: "run-999999".into(),
            max_points: 0,
        })
        .await
        .expect_err("unknown run");
    assert_eq!(err.code(), tonic::Code::NotFound);
    c.stop().await;
}

// --------------------------------------------------------------- dashboard

/// The loss line of phase 0 on the dashboard (and in `twinhead plot`).
const PHASE0_COLOUR: [u8; 3] = [0x1f, 0x77, 0xb4];

fn find_chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TWINHEAD_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
}

/// Chromium, installing it with apt-get when TWINHEAD_INSTALL_CHROMIUM=1.
fn chromium() -> Option<PathBuf> {
    if let Some(found) = find_chromium() {
        return Some(found);
    }
    if std::env::var("TWINHEAD_INSTALL_CHROMIUM").as_deref() == Ok("1") {
        let status = std::process::Command::new("apt-get")
            .args(["install", "-y", "-q", "chromium"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
        eprintln!("apt-get install chromium: {status:?}");
    }
    find_chromium()
}

/// Loads the page in headless Chromium and returns its screenshot.
async fn screenshot(browser: &Path, url: &str, dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let profile = dir.join(format!("{name}-profile"));
    let mut child = tokio::process::Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--window-size=1280,900",
            // Polling timers run in virtual time; the fetches still complete.
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", out.display()))
        .arg(url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromium");
    let status = tokio::time::timeout(Duration::from_secs(90), child.wait())
        .await
        .expect("chromium finishes within 90 s")
        .expect("chromium exit status");
    assert!(status.success(), "chromium failed: {status}");
    assert!(out.is_file(), "chromium wrote no screenshot");
    // Keep a copy to look at when asked (e.g. after a failure in CI).
    if let Some(keep) = std::env::var_os("TWINHEAD_SCREENSHOT_DIR") {
        let _ = std::fs::create_dir_all(&keep);
        let _ = std::fs::copy(&out, Path::new(&keep).join(name));
    }
    out
}

/// Pixels within a small distance of `colour`: how many, and the width of
/// the band of columns they span.
fn colour_extent(png_path: &Path, colour: [u8; 3]) -> (usize, u32) {
    let bytes = std::fs::read(png_path).expect("read screenshot");
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    let channels = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("unexpected screenshot colour type {other:?}"),
    };
    let (mut count, mut min_x, mut max_x) = (0, u32::MAX, 0);
    for y in 0..info.height as usize {
        let row = &buf[y * info.line_size..][..info.width as usize * channels];
        for x in 0..info.width as usize {
            let px = &row[x * channels..x * channels + 3];
            if px.iter().zip(colour).all(|(a, b)| a.abs_diff(b) <= 8) {
                count += 1;
                min_x = min_x.min(x as u32);
                max_x = max_x.max(x as u32);
            }
        }
    }
    (count, if count == 0 { 0 } else { max_x - min_x + 1 })
}

#[tokio::test]
async fn dashboard_draws_the_loss_curve_in_headless_chromium() {
    let Some(browser) = chromium() else {
        eprintln!(
            "skipped: chromium not found (apt-get install chromium, \
             or set TWINHEAD_INSTALL_CHROMIUM=1)"
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start_with_http(config(dir.path(), Some("page-token"))).await;
    submit(&c, "dashboard-run", Some("page-token")).await;
    let (mut rank0, _rank1) = world_of_two(&c, ["node-a", "node-b"]).await;
    let url = format!("{}/#token=page-token", c.http_url());

    // Before any progress the page shows the run but no curve.
    let before = screenshot(&browser, &url, dir.path(), "before.png").await;
    let (count, span) = colour_extent(&before, PHASE0_COLOUR);
    assert!(
        count < 30 && span < 60,
        "the loss colour is on the page before any progress: {count} pixels over {span} columns"
    );

    for (step, loss) in [(1, 5.0), (2, 4.1), (3, 3.6)] {
        report(&mut rank0, step, step * 64, loss, 1000.0 + step as f64).await;
    }
    let after = screenshot(&browser, &url, dir.path(), "after.png").await;
    let (count, span) = colour_extent(&after, PHASE0_COLOUR);
    // Two charts (loss and throughput), each ~500 px wide: a legend swatch
    // alone could never span this far.
    assert!(
        count > 400 && span > 300,
        "no loss curve drawn: {count} pixels of the phase colour over {span} columns"
    );

    // Held-out evaluations get a chart of their own.
    for (step, loss) in [(1, 5.5), (3, 3.9)] {
        rank0.eval(step, loss, "").await.expect("eval");
    }
    let with_evals = screenshot(&browser, &url, dir.path(), "evals.png").await;
    let (more, _) = colour_extent(&with_evals, PHASE0_COLOUR);
    assert!(
        more > count + 200,
        "no held-out curve drawn: {more} pixels of the phase colour, {count} before"
    );
    c.stop().await;
}

/// A dataset build queued over gRPC, taken task by task through the
/// dataprep API, survives a restart with its finished tasks, and shows on
/// the dashboard's JSON API.
#[tokio::test]
async fn dataset_builds_survive_a_restart_and_show_on_the_dashboard() {
    use twinhead_proto::v1::{
        BuildDatasetRequest, ClaimTaskRequest, CompleteTaskRequest, GetDatasetRequest,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start_with_http(config(dir.path(), None)).await;
    let config_text = r#"
name = "dash"
[tokenizer]
train = { vocab_size = 300 }
[[sources]]
name = "a"
input = "a/*.txt"
format = "text"
[[phases]]
name = "p"
seq_len = 16
tokens = 1000
seed = 1
[phases.weights]
a = 1.0
"#;
    let request = BuildDatasetRequest {
        config_path: "/cfg/dash.toml".into(),
        config_text: config_text.into(),
        out_url: "/data".into(),
    };
    let bad = c
        .datasets()
        .await
        .build_dataset(BuildDatasetRequest {
            config_text: config_text.replace("seq_len = 16", "seq_len = 0"),
            ..request.clone()
        })
        .await
        .expect_err("a bad config is refused");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("seq_len"), "{}", bad.message());
    let id = c
        .datasets()
        .await
        .build_dataset(request)
        .await
        .expect("build")
        .into_inner()
        .id;
    let mut prep = c.dataprep().await;
    let finish = |key: &str, parts: Vec<u32>| CompleteTaskRequest {
        dataset_id: id.clone(),
        key: key.into(),
        process: "p1".into(),
        parts_per_source: parts,
        ..Default::default()
    };
    let claim = ClaimTaskRequest {
        process: "p1".into(),
        wait_ms: 1000,
    };
    let task = prep
        .claim_task(claim.clone())
        .await
        .expect("claim")
        .into_inner()
        .task;
    assert_eq!(task.map(|t| t.key).as_deref(), Some("plan"));
    prep.complete_task(finish("plan", vec![2]))
        .await
        .expect("plan done");
    prep.complete_task(finish("scan/0/1", vec![]))
        .await
        .expect("scan done");

    // Restart on the same database: the build is where it was.
    c.stop().await;
    let c = Coordinator::start_with_http(config(dir.path(), None)).await;
    let d = c
        .datasets()
        .await
        .get_dataset(GetDatasetRequest { id: id.clone() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(d.parts_per_source, [2]);
    assert_eq!(d.done_tasks, ["scan/0/1"]);
    let mut prep = c.dataprep().await;
    let task = prep
        .claim_task(claim)
        .await
        .expect("claim")
        .into_inner()
        .task;
    assert_eq!(
        task.map(|t| t.key).as_deref(),
        Some("scan/0/0"),
        "only the unfinished scan"
    );

    let listed = get(&c.http_url(), "/api/datasets", None).await.json();
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["state"], "building");
    assert_eq!(listed[0]["step"], "scan");
    assert_eq!(listed[0]["step_tasks_done"], 1);
    assert_eq!(listed[0]["url"], "/data/dash");
    c.stop().await;
}

/// Task scores of checkpoints: in the run's JSON (on the run's token axis)
/// and on /metrics.
#[tokio::test]
async fn checkpoint_task_scores_are_served_as_json_and_metrics() {
    use twinhead_proto::v1::{ReportCheckpointEvalRequest, TaskScore};
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Coordinator::start_with_http(config(dir.path(), None)).await;
    let base = c.http_url();
    let run = c
        .runs()
        .await
        .submit_run(SubmitRunRequest {
            spec: Some(spec_with("scored-run", &[r#"eval.tasks=["arc_easy"]"#])),
        })
        .await
        .expect("submit")
        .into_inner()
        .run_id;
    let (mut rank0, _rank1) = world_of_two(&c, ["node-a", "node-b"]).await;
    let mut spare = SimWorker::register(&c, "node-spare").await;
    // Phase 0's end (3 steps of 1,000 tokens as SimWorker counts them).
    rank0.checkpoint(3).await.expect("phase end");
    let job = spare.next_assignment().await;
    let eval_id = job
        .checkpoint_eval
        .expect("a checkpoint evaluation")
        .eval_id;
    // While it scores, the worker is `evaluating`, with the run it scores.
    let workers = get(&base, "/api/workers", None).await.json();
    let listed = workers
        .as_array()
        .and_then(|w| w.iter().find(|x| x["id"] == spare.id.as_str()).cloned())
        .expect("the spare worker listed");
    assert_eq!(listed["state"], "evaluating", "{listed}");
    assert_eq!(listed["run_id"], run.as_str());
    assert_eq!(listed["eval_id"], eval_id.as_str());
    let text = get(&base, "/metrics", None).await.body;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("prometheus text");
    assert_eq!(
        gauge(&scrape, "twinhead_workers", &[("state", "evaluating")]),
        Some(1.0)
    );
    let evaluating = [("worker", spare.id.as_str()), ("state", "evaluating")];
    assert_eq!(
        gauge(&scrape, "twinhead_worker_state", &evaluating),
        Some(1.0)
    );
    spare
        .client
        .report_checkpoint_eval(ReportCheckpointEvalRequest {
            worker_id: spare.id.clone(),
            run_id: run.clone(),
            eval_id,
            scores: vec![TaskScore {
                task: "arc_easy".into(),
                primary_metric: "acc_raw".into(),
                metrics: [
                    ("acc_raw".to_string(), 0.4),
                    ("acc_per_char".to_string(), 0.45),
                ]
                .into_iter()
                .collect(),
                docs: 20,
            }],
            error: String::new(),
        })
        .await
        .expect("scores");

    let detail = get(&base, &format!("/api/runs/{run}"), None).await.json();
    assert_eq!(detail["tasks"], serde_json::json!(["arc_easy"]));
    let scored = &detail["checkpoint_evals"][0];
    assert_eq!(scored["state"], "done", "{detail}");
    assert_eq!(scored["checkpoint"]["step"], 3);
    assert_eq!(scored["run_tokens"], 3000);
    assert_eq!(scored["scores"][0][0], "arc_easy");
    assert_eq!(scored["scores"][0][1]["metrics"]["acc_raw"], 0.4);
    assert_eq!(scored["scores"][0][1]["primary_metric"], "acc_raw");

    let text = get(&base, "/metrics", None).await.body;
    strict_exposition(&text);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("prometheus text");
    let score = [
        ("run", run.as_str()),
        ("task", "arc_easy"),
        ("metric", "acc_raw"),
    ];
    assert_eq!(gauge(&scrape, "twinhead_run_task_score", &score), Some(0.4));
    let done = [("run", run.as_str()), ("state", "done")];
    assert_eq!(
        gauge(&scrape, "twinhead_run_checkpoint_evals", &done),
        Some(1.0)
    );
    let pending = [("run", run.as_str()), ("state", "pending")];
    assert_eq!(
        gauge(&scrape, "twinhead_run_checkpoint_evals", &pending),
        Some(0.0)
    );
    c.stop().await;
}
