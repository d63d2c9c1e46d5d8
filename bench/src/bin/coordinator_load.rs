//! Load on one coordinator process from many simulated workers.
//!
//! Starts `twinhead coordinator` as a child process on loopback with a
//! SQLite file, submits runs that need every worker (worlds of 8), then
//! runs N workers as tokio tasks, each with its own gRPC connection:
//! register, long-poll for an assignment, heartbeat every second and report
//! progress every two seconds. After a warm-up, it measures for the given
//! time: heartbeat and report latency (p50, p99, max), reports per second,
//! and the coordinator's CPU and resident memory from /proc.
//!
//! Usage: coordinator_load [--workers 1000] [--seconds 60] [--bin PATH]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tonic::transport::Endpoint;
use twinhead_proto::v1::run_service_client::RunServiceClient;
use twinhead_proto::v1::worker_service_client::WorkerServiceClient;
use twinhead_proto::v1::{
    GetAssignmentRequest, HeartbeatRequest, RegisterRequest, ReportProgressRequest,
    SubmitRunRequest, WorkerAction,
};

const WORLD: usize = 8;

struct Args {
    workers: usize,
    seconds: u64,
    bin: PathBuf,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        workers: 1000,
        seconds: 60,
        bin: PathBuf::from("target/release/twinhead"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--workers" => args.workers = value.parse().context("--workers")?,
            "--seconds" => args.seconds = value.parse().context("--seconds")?,
            "--bin" => args.bin = PathBuf::from(value),
            other => bail!("unknown flag {other}; expected --workers, --seconds, --bin"),
        }
    }
    if !args.workers.is_multiple_of(WORLD) {
        bail!("--workers must be a multiple of {WORLD}");
    }
    Ok(args)
}

/// (user + system CPU seconds, resident KiB, peak resident KiB) of a process.
fn process_usage(pid: u32) -> anyhow::Result<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit(')').next().context("stat format")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are at 11 and 12 after the name.
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((ticks / 100.0, kib("VmRSS:"), kib("VmHWM:")))
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index] as f64 / 1000.0
}

fn spec_text(name: &str, dataset: &Path) -> String {
    let dataset = dataset.display();
    format!(
        r#"
name = "{name}"
model = "tiny"
objective = "mlm"
dataset = "file://{dataset}"
world_size = {WORLD}
global_batch = {WORLD}
[optimizer]
peak_lr = 1e-3
[checkpoint]
root = "file:///tmp/ckpt"
[[phases]]
name = "pretrain"
tokens = "1T"
seq_len = 128
mask_ratio = 0.3
"#
    )
}

#[derive(Default)]
struct Samples {
    heartbeat_us: Vec<u32>,
    report_us: Vec<u32>,
    errors: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let dir = std::env::temp_dir().join(format!("twinhead-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("coordinator.db");
    // The coordinator checks a submitted run against its dataset's
    // manifest; the load needs no rows, only the phase it names.
    let dataset = dir.join("dataset");
    std::fs::create_dir_all(&dataset)?;
    std::fs::write(
        dataset.join("manifest.json"),
        r#"{"tokenizer": {"vocab_size": 512, "cls_id": 1, "sep_id": 2},
            "phases": [{"name": "pretrain", "seq_len": 128, "sequences": 0, "shards": []}]}"#,
    )?;
    let mut child = Command::new(&args.bin)
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--lease-timeout-ms",
            "10000",
            "--db",
        ])
        .arg(&db)
        .env("TWINHEAD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| {
            format!(
                "start {} (build it with cargo build --release -p twinhead)",
                args.bin.display()
            )
        })?;
    let pid = child.id();
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let url = line
        .trim()
        .rsplit(' ')
        .next()
        .context("address line")?
        .to_string();
    let result = drive(&args, &url, pid, &dataset).await;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn drive(args: &Args, url: &str, pid: u32, dataset: &Path) -> anyhow::Result<()> {
    let endpoint = Endpoint::from_shared(url.to_string())?;
    let mut runs = RunServiceClient::new(endpoint.connect().await?);
    for i in 0..args.workers / WORLD {
        let spec = twinhead_proto::config::parse_run(
            "load.toml",
            &spec_text(&format!("load-{i}"), dataset),
            &[],
            Path::new("."),
        )?;
        runs.submit_run(SubmitRunRequest { spec: Some(spec) })
            .await?;
    }

    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let assigned = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let base = tokio::time::Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::with_capacity(args.workers);
    for i in 0..args.workers {
        let endpoint = endpoint.clone();
        let (measuring, stop, assigned) = (measuring.clone(), stop.clone(), assigned.clone());
        // Spread workers evenly over the heartbeat period, as real ones are.
        let offset = Duration::from_micros((i as u64 * 1_000_000) / args.workers as u64);
        tasks.push(tokio::spawn(async move {
            worker(endpoint, i, base + offset, measuring, stop, assigned).await
        }));
    }
    while assigned.load(Ordering::Relaxed) < args.workers {
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "only {} of {} workers got an assignment in 120 s",
                assigned.load(Ordering::Relaxed),
                args.workers
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = started.elapsed();
    // Let the staggered loops settle before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu0, _, _) = process_usage(pid)?;
    let t0 = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    measuring.store(false, Ordering::Relaxed);
    let window = t0.elapsed().as_secs_f64();
    let (cpu1, rss, peak) = process_usage(pid)?;
    stop.store(true, Ordering::Relaxed);

    let mut all = Samples::default();
    for task in tasks {
        let s = task.await??;
        all.heartbeat_us.extend(s.heartbeat_us);
        all.report_us.extend(s.report_us);
        all.errors += s.errors;
    }
    all.heartbeat_us.sort_unstable();
    all.report_us.sort_unstable();
    let cpu = (cpu1 - cpu0) / window;
    println!(
        "coordinator_load: {} workers (worlds of {WORLD}), {:.0} s measured, all assigned after {:.1} s",
        args.workers,
        window,
        ready.as_secs_f64()
    );
    println!("| metric | value |");
    println!("|---|---|");
    println!(
        "| heartbeats/s | {:.0} |",
        all.heartbeat_us.len() as f64 / window
    );
    println!(
        "| heartbeat p50 / p99 / max (ms) | {:.2} / {:.2} / {:.2} |",
        percentile(&all.heartbeat_us, 0.5),
        percentile(&all.heartbeat_us, 0.99),
        percentile(&all.heartbeat_us, 1.0)
    );
    println!(
        "| progress reports/s | {:.0} |",
        all.report_us.len() as f64 / window
    );
    println!(
        "| report p50 / p99 / max (ms) | {:.2} / {:.2} / {:.2} |",
        percentile(&all.report_us, 0.5),
        percentile(&all.report_us, 0.99),
        percentile(&all.report_us, 1.0)
    );
    println!("| coordinator CPU (cores) | {cpu:.2} |");
    println!(
        "| coordinator RSS / peak (MB) | {:.1} / {:.1} |",
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    println!("| errors | {} |", all.errors);
    Ok(())
}

async fn worker(
    endpoint: Endpoint,
    index: usize,
    start: tokio::time::Instant,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    assigned: Arc<AtomicUsize>,
) -> anyhow::Result<Samples> {
    let mut client = WorkerServiceClient::new(endpoint.connect().await?);
    let worker_id = client
        .register(RegisterRequest {
            hostname: format!("sim-{index}"),
            device: "cpu".into(),
            pid: index as u32,
        })
        .await?
        .into_inner()
        .worker_id;
    let assignment = loop {
        let reply = client
            .get_assignment(GetAssignmentRequest {
                worker_id: worker_id.clone(),
                known_assignment_id: String::new(),
                wait_ms: 10_000,
            })
            .await?
            .into_inner();
        if let Some(a) = reply.assignment {
            break a;
        }
    };
    assigned.fetch_add(1, Ordering::Relaxed);
    let mut samples = Samples::default();
    let mut ticker = tokio::time::interval_at(
        start.max(tokio::time::Instant::now()),
        Duration::from_secs(1),
    );
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        tick += 1;
        let t = Instant::now();
        let beat = client
            .heartbeat(HeartbeatRequest {
                worker_id: worker_id.clone(),
                world_id: assignment.world_id.clone(),
            })
            .await;
        let took = t.elapsed().as_micros() as u32;
        let record = measuring.load(Ordering::Relaxed);
        match beat {
            Ok(r) if r.get_ref().action == WorkerAction::Continue as i32 => {
                if record {
                    samples.heartbeat_us.push(took);
                }
            }
            _ => samples.errors += usize::from(record),
        }
        if tick.is_multiple_of(2) {
            let t = Instant::now();
            let report = client
                .report_progress(ReportProgressRequest {
                    worker_id: worker_id.clone(),
                    world_id: assignment.world_id.clone(),
                    phase_index: 0,
                    step: tick,
                    tokens: tick * 1024,
                    loss: 10.0 / tick as f64,
                    tokens_per_sec: 1000.0,
                    lr: 1e-3,
                    grad_norm: 1.0,
                    mfu: 0.3,
                })
                .await;
            let took = t.elapsed().as_micros() as u32;
            match report {
                Ok(_) if record => samples.report_us.push(took),
                Ok(_) => {}
                Err(_) => samples.errors += usize::from(record),
            }
        }
    }
    Ok(samples)
}
