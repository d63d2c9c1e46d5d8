//! Load on one coordinator process from many simulated workers.
//!
//! Starts `twinhead coordinator` as a child process on loopback with a
//! SQLite file, submits runs that need every worker (worlds of 8), then
//! runs N workers as tokio tasks, each with its own gRPC connection. All of
//! them register at once (a registration storm, as when a fleet restarts)
//! and then behave as `twinhead worker` does: heartbeat every second from
//! registration on, long-poll for an assignment meanwhile, and once
//! assigned, rank 0 of each world reports progress every two seconds.
//!
//! Measured, during the storm (until every worker holds an assignment) and
//! then for the given time: heartbeat and report latency as the client sees
//! it (p50, p99, max), the coordinator's own heartbeat handling time from its
//! `/metrics` histogram, the longest gap between a worker's acknowledged
//! heartbeats, false deaths (workers declared dead while heartbeating: every
//! simulated worker is alive, so every death is false), and the CPU and
//! memory of both processes from /proc.
//!
//! `--coordinator-cpus` and `--generator-cpus` pin the two processes to
//! disjoint CPUs (`taskset` lists such as `0` or `0-1`), so that the load
//! generator's own scheduling does not count as coordinator latency.
//!
//! A call of the bulk generator can wait behind hundreds of other simulated
//! workers' calls in its runtime's queue, which no real worker (a process
//! of its own) does. So `--probe-workers` of the workers run on a thread of
//! their own at real-time priority: their latency is the network's and the
//! coordinator's only, and the bench reports it beside the bulk figure.
//!
//! Usage: coordinator_load [--workers 1000] [--idle-workers 0] [--seconds 60] [--bin PATH]
//! [--lease-timeout-ms 10000] [--coordinator-cpus LIST] [--generator-cpus LIST]
//! [--storm-timeout-s 120] [--probe-workers 80] [--heartbeat-while-waiting true]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::watch;
use tonic::Code;
use tonic::codegen::http;
use tonic::transport::Endpoint;
use twinhead_proto::v1::run_service_client::RunServiceClient;
use twinhead_proto::v1::worker_service_client::WorkerServiceClient;
use twinhead_proto::v1::{
    GetAssignmentRequest, HeartbeatRequest, RegisterRequest, ReportProgressRequest,
    SubmitRunRequest, WorkerAction,
};

const WORLD: usize = 8;
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// As `twinhead worker` waits before it tries to register again.
const REGISTER_RETRY: Duration = Duration::from_millis(250);
/// The coordinator's server-side heartbeat histogram (see its `/metrics`).
const HANDLING_HISTOGRAM: &str = "twinhead_heartbeat_handling_seconds";

struct Args {
    workers: usize,
    /// Of `workers`, those no run needs: they heartbeat and long-poll for
    /// work through the whole bench, as a fleet larger than its runs does.
    idle_workers: usize,
    seconds: u64,
    bin: PathBuf,
    lease_timeout_ms: u64,
    coordinator_cpus: Option<String>,
    generator_cpus: Option<String>,
    storm_timeout: Duration,
    /// Of the workers, these many (spread evenly over the heartbeat period)
    /// run on a thread of their own at real-time priority.
    probe_workers: usize,
    /// Heartbeat from registration on, as `twinhead worker` does; false:
    /// only once assigned, as this bench did before (a worker waiting for
    /// its world-mates then looks silent to the coordinator).
    heartbeat_while_waiting: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        workers: 1000,
        idle_workers: 0,
        seconds: 60,
        bin: PathBuf::from("target/release/twinhead"),
        lease_timeout_ms: 10_000,
        coordinator_cpus: None,
        generator_cpus: None,
        storm_timeout: Duration::from_secs(120),
        probe_workers: 80,
        heartbeat_while_waiting: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--workers" => args.workers = value.parse().context("--workers")?,
            "--idle-workers" => args.idle_workers = value.parse().context("--idle-workers")?,
            "--seconds" => args.seconds = value.parse().context("--seconds")?,
            "--bin" => args.bin = PathBuf::from(value),
            "--lease-timeout-ms" => {
                args.lease_timeout_ms = value.parse().context("--lease-timeout-ms")?
            }
            "--coordinator-cpus" => args.coordinator_cpus = Some(cpu_list(&flag, value)?),
            "--generator-cpus" => args.generator_cpus = Some(cpu_list(&flag, value)?),
            "--storm-timeout-s" => {
                args.storm_timeout =
                    Duration::from_secs(value.parse().context("--storm-timeout-s")?)
            }
            "--probe-workers" => args.probe_workers = value.parse().context("--probe-workers")?,
            "--heartbeat-while-waiting" => {
                args.heartbeat_while_waiting = value
                    .parse()
                    .context("--heartbeat-while-waiting: true or false")?
            }
            other => bail!(
                "unknown flag {other}; expected --workers, --idle-workers, --seconds, --bin, --lease-timeout-ms, \
                 --coordinator-cpus, --generator-cpus, --storm-timeout-s, --probe-workers, \
                 --heartbeat-while-waiting"
            ),
        }
    }
    if args.idle_workers > args.workers || !(args.workers - args.idle_workers).is_multiple_of(WORLD)
    {
        bail!("--workers less --idle-workers must be a multiple of {WORLD}");
    }
    if args.workers == 0 {
        bail!("--workers must be positive");
    }
    if args.probe_workers > args.workers {
        bail!("--probe-workers must not exceed --workers");
    }
    if args.lease_timeout_ms <= HEARTBEAT_INTERVAL.as_millis() as u64 {
        bail!("--lease-timeout-ms must be longer than the 1000 ms heartbeat interval");
    }
    Ok(args)
}

/// A `taskset` CPU list: digits, commas and dashes only, as it is passed
/// on to a command line.
fn cpu_list(flag: &str, value: String) -> anyhow::Result<String> {
    if value.is_empty()
        || !value
            .chars()
            .all(|c| c.is_ascii_digit() || c == ',' || c == '-')
    {
        bail!("{flag}: {value:?} is not a CPU list such as 0 or 0-1 or 0,2");
    }
    Ok(value)
}

/// Pins every thread of this process (the tokio workers already exist;
/// threads started later inherit the mask).
fn pin_self(cpus: &str) -> anyhow::Result<()> {
    let status = Command::new("taskset")
        .args(["--all-tasks", "--cpu-list", "--pid", cpus])
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .status()
        .context("run taskset (util-linux) to pin the load generator")?;
    if !status.success() {
        bail!("taskset could not pin the load generator to CPUs {cpus}: {status}");
    }
    Ok(())
}

/// A simulated worker's gRPC connection: the generated client over hyper's
/// HTTP/2 connection handle, without the buffer task that tonic's `Channel`
/// adds to every connection (10,000 more tasks on the generator's CPU). The
/// coordinator sees the same HTTP/2 requests either way; the generator's
/// CPU per call hardly changed (BENCHMARKS.md).
#[derive(Clone)]
struct Connection(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

type ConnectionResponse = http::Response<hyper::body::Incoming>;

impl tower_service::Service<http::Request<tonic::body::Body>> for Connection {
    type Response = ConnectionResponse;
    type Error = hyper::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<ConnectionResponse, hyper::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}

/// Where the simulated workers connect.
#[derive(Clone)]
struct Target {
    address: SocketAddr,
    origin: http::Uri,
}

impl Target {
    async fn connect(&self) -> anyhow::Result<WorkerServiceClient<Connection>> {
        let stream = tokio::net::TcpStream::connect(self.address).await?;
        stream.set_nodelay(true)?;
        let (send, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await?;
        tokio::spawn(connection);
        Ok(WorkerServiceClient::with_origin(
            Connection(send),
            self.origin.clone(),
        ))
    }
}

/// A runtime on a thread of its own at real-time priority (`SCHED_FIFO`),
/// for the probe workers. The bulk generator runs thousands of simulated
/// workers on one CPU, and a call of theirs can wait behind hundreds of
/// others in its queue; a probe never does, so its latency is what a
/// worker process of its own would see: network and coordinator only.
struct ProbeRuntime {
    handle: tokio::runtime::Handle,
    /// False where this process may not raise a thread's priority: the
    /// probes then take turns with the generator like any thread.
    realtime: bool,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl ProbeRuntime {
    fn start() -> anyhow::Result<ProbeRuntime> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("probe-workers".into())
            .spawn(move || {
                let realtime = raise_to_realtime();
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => {
                        let _ = ready_tx.send(Ok((runtime.handle().clone(), realtime)));
                        runtime.block_on(async {
                            let _ = stopped.await;
                        });
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        let (handle, realtime) = ready_rx
            .recv()
            .context("the probe thread ended before its runtime started")??;
        Ok(ProbeRuntime {
            handle,
            realtime,
            stop,
            thread,
        })
    }

    fn shut_down(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Puts the calling thread under `SCHED_FIFO` at the lowest real-time
/// priority; whether that was allowed.
fn raise_to_realtime() -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    #[allow(unsafe_code)] // one system call on the calling thread (pid 0); param outlives it
    let status = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    status == 0
}

/// (user + system CPU seconds, resident KiB, peak resident KiB) of a process.
fn process_usage(pid: &str) -> anyhow::Result<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit(')').next().context("stat format")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are at 11 and 12 after the name.
    let field = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("stat: too few fields")?
            .parse::<f64>()?)
    };
    let ticks = field(11)? + field(12)?;
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

// ------------------------------------------------- the coordinator's side

/// The body of `GET path` on a plain HTTP/1.0 port.
fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("http response without a header end")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!(
            "GET {path}: {}",
            head.lines().next().unwrap_or("no status line")
        );
    }
    Ok(body.to_string())
}

/// What the bench reads from the coordinator's `/metrics`.
#[derive(Debug, Default, Clone)]
struct CoordinatorMetrics {
    dead_workers: f64,
    /// Lease checks that ran late, and by how long in all (s): time the
    /// coordinator extended every lease by.
    late_lease_checks: f64,
    lease_check_delay: f64,
    /// Cumulative (upper bound in seconds, count) of the heartbeat
    /// handling histogram; empty when the coordinator has none.
    handling: Vec<(f64, f64)>,
}

async fn scrape(addr: SocketAddr) -> anyhow::Result<CoordinatorMetrics> {
    let text = tokio::task::spawn_blocking(move || http_get(addr, "/metrics")).await??;
    let mut metrics = CoordinatorMetrics::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value: f64 = value.parse().unwrap_or(f64::NAN);
        if series == r#"twinhead_workers{state="dead"}"# {
            metrics.dead_workers = value;
        } else if series == "twinhead_lease_checks_late_total" {
            metrics.late_lease_checks = value;
        } else if series == "twinhead_lease_check_delay_seconds_total" {
            metrics.lease_check_delay = value;
        } else if let Some(labels) = series.strip_prefix(&format!("{HANDLING_HISTOGRAM}_bucket{{"))
        {
            let bound = labels
                .strip_prefix("le=\"")
                .and_then(|l| l.strip_suffix("\"}"))
                .map(|b| {
                    if b == "+Inf" {
                        f64::INFINITY
                    } else {
                        b.parse().unwrap_or(f64::NAN)
                    }
                });
            if let Some(bound) = bound {
                metrics.handling.push((bound, value));
            }
        }
    }
    Ok(metrics)
}

/// The bucket bound (ms) under which a share `p` of the heartbeats handled
/// between two scrapes fell; NaN without the histogram.
fn handling_quantile(before: &CoordinatorMetrics, after: &CoordinatorMetrics, p: f64) -> f64 {
    let count = |m: &CoordinatorMetrics, bound: f64| {
        m.handling
            .iter()
            .find(|(b, _)| *b == bound)
            .map_or(0.0, |(_, c)| *c)
    };
    let deltas: Vec<(f64, f64)> = after
        .handling
        .iter()
        .map(|(bound, c)| (*bound, c - count(before, *bound)))
        .collect();
    let Some(total) = deltas.last().map(|(_, c)| *c).filter(|t| *t > 0.0) else {
        return f64::NAN;
    };
    deltas
        .iter()
        .find(|(_, c)| *c >= p * total)
        .map_or(f64::NAN, |(bound, _)| bound * 1000.0)
}

// ------------------------------------------------------------------- main

#[derive(Default)]
struct Samples {
    register_us: Vec<u32>,
    /// Heartbeats before every worker held an assignment.
    storm_heartbeat_us: Vec<u32>,
    heartbeat_us: Vec<u32>,
    report_us: Vec<u32>,
    /// Longest time between a worker's registration or acknowledged
    /// heartbeat and its next acknowledged one.
    longest_gap: Duration,
    /// Told it is unknown or dead while it was heartbeating.
    declared_dead: bool,
    errors: usize,
}

/// Where the run is: workers record samples by phase.
const STORM: usize = 0;
const SETTLING: usize = 1;
const MEASURING: usize = 2;
const DONE: usize = 3;

struct Shared {
    phase: AtomicUsize,
    registered: AtomicUsize,
    assigned: AtomicUsize,
    /// Declared dead by the coordinator.
    dead: AtomicUsize,
    /// Could not connect or register within the storm's time.
    failed: AtomicUsize,
    /// Connections or registrations that failed and were tried again.
    retries: AtomicUsize,
    first_error: std::sync::Mutex<Option<String>>,
    storm_timeout: Duration,
    stop: watch::Receiver<bool>,
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    // Pinned before the runtime starts, so that it sizes its worker threads
    // to the CPUs it may use: two threads on one CPU take turns in the
    // scheduler's slices of several milliseconds, which the calls waiting
    // on the other thread would count as latency.
    if let Some(cpus) = &args.generator_cpus {
        pin_self(cpus)?;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(generate(args))
}

async fn generate(args: Args) -> anyhow::Result<()> {
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
    let mut command = match &args.coordinator_cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["--cpu-list", cpus]).arg(&args.bin);
            c
        }
        None => Command::new(&args.bin),
    };
    let mut child = command
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--lease-timeout-ms",
            &args.lease_timeout_ms.to_string(),
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
    // taskset execs the coordinator, so the pid is the coordinator's.
    let pid = child.id().to_string();
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?);
    let address = |line: &str| line.trim().rsplit(' ').next().map(str::to_string);
    let (mut grpc_line, mut http_line) = (String::new(), String::new());
    stdout.read_line(&mut grpc_line)?;
    stdout.read_line(&mut http_line)?;
    let result = match (address(&grpc_line), address(&http_line)) {
        (Some(url), Some(http)) => {
            let http: SocketAddr = http
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .parse()
                .with_context(|| format!("http address in {http_line:?}"))?;
            drive(&args, &url, http, &pid, &dataset).await
        }
        _ => Err(anyhow::anyhow!(
            "the coordinator printed no addresses: {grpc_line:?} {http_line:?}"
        )),
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn drive(
    args: &Args,
    url: &str,
    http: SocketAddr,
    pid: &str,
    dataset: &Path,
) -> anyhow::Result<()> {
    let endpoint = Endpoint::from_shared(url.to_string())?;
    let mut runs = RunServiceClient::new(endpoint.connect().await?);
    let origin: http::Uri = url.parse()?;
    let target = Target {
        address: origin
            .authority()
            .context("the coordinator's address has no host and port")?
            .as_str()
            .parse()
            .with_context(|| format!("the coordinator's address {url}"))?,
        origin,
    };
    let busy = args.workers - args.idle_workers;
    for i in 0..busy / WORLD {
        let spec = twinhead_proto::config::parse_run(
            "load.toml",
            &spec_text(&format!("load-{i}"), dataset),
            &[],
            Path::new("."),
        )?;
        runs.submit_run(SubmitRunRequest { spec: Some(spec) })
            .await?;
    }

    let (stop_tx, stop) = watch::channel(false);
    let shared = Arc::new(Shared {
        phase: AtomicUsize::new(STORM),
        registered: AtomicUsize::new(0),
        assigned: AtomicUsize::new(0),
        dead: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        retries: AtomicUsize::new(0),
        first_error: std::sync::Mutex::new(None),
        storm_timeout: args.storm_timeout,
        stop,
    });
    let self_pid = std::process::id().to_string();
    let (generator_cpu0, _, _) = process_usage(&self_pid)?;
    let (coordinator_cpu0, _, _) = process_usage(pid)?;
    let probes = ProbeRuntime::start()?;
    // Probes spread evenly over the workers, so over the heartbeat period.
    let probe_every = args.workers / args.probe_workers.max(1);
    let is_probe = |i: usize| i.is_multiple_of(probe_every) && i / probe_every < args.probe_workers;
    let started = Instant::now();
    let base = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(args.workers);
    for i in 0..args.workers {
        let (target, shared) = (target.clone(), shared.clone());
        // Heartbeats spread evenly over the period, as real workers' are.
        let offset = HEARTBEAT_INTERVAL.mul_f64(i as f64 / args.workers as f64);
        let schedule = base + offset;
        let while_waiting = args.heartbeat_while_waiting;
        let simulated = worker(target, i, schedule, while_waiting, shared);
        tasks.push(if is_probe(i) {
            (true, probes.handle.spawn(simulated))
        } else {
            (false, tokio::spawn(simulated))
        });
    }
    let mut all_registered = None;
    // Over once every worker has registered and every run's world formed.
    let over = |s: &Shared| {
        s.assigned.load(Ordering::Relaxed) >= busy
            && s.registered.load(Ordering::Relaxed) + s.failed.load(Ordering::Relaxed)
                == args.workers
    };
    while !over(&shared) && started.elapsed() < args.storm_timeout {
        if all_registered.is_none() && shared.registered.load(Ordering::Relaxed) == args.workers {
            all_registered = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if all_registered.is_none() && shared.registered.load(Ordering::Relaxed) == args.workers {
        all_registered = Some(started.elapsed());
    }
    let storm = started.elapsed();
    let storm_over = over(&shared);
    let (coordinator_storm_cpu, _, storm_peak) = process_usage(pid)?;
    let (generator_storm_cpu, _, _) = process_usage(&self_pid)?;
    let storm_metrics = scrape(http).await?;
    shared.phase.store(SETTLING, Ordering::Relaxed);
    // Let the staggered loops settle before measuring.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (coordinator_cpu1, _, _) = process_usage(pid)?;
    let (generator_cpu1, _, _) = process_usage(&self_pid)?;
    let before = scrape(http).await?;
    let t0 = Instant::now();
    shared.phase.store(MEASURING, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    shared.phase.store(DONE, Ordering::Relaxed);
    let window = t0.elapsed().as_secs_f64();
    let (coordinator_cpu2, rss, peak) = process_usage(pid)?;
    let (generator_cpu2, _, _) = process_usage(&self_pid)?;
    let after = scrape(http).await?;
    let _ = stop_tx.send(true);

    let mut all = Samples::default();
    let mut false_deaths = 0;
    let mut probe_heartbeat_us = Vec::new();
    for (probe, task) in tasks {
        let s = task.await?;
        if probe {
            probe_heartbeat_us.extend_from_slice(&s.heartbeat_us);
        }
        all.register_us.extend(s.register_us);
        all.storm_heartbeat_us.extend(s.storm_heartbeat_us);
        all.heartbeat_us.extend(s.heartbeat_us);
        all.report_us.extend(s.report_us);
        all.longest_gap = all.longest_gap.max(s.longest_gap);
        all.errors += s.errors;
        false_deaths += usize::from(s.declared_dead);
    }
    // Read again once the workers have stopped (well within a lease of
    // their last heartbeat): deaths after the window's end count too.
    let stopped = scrape(http).await?;
    let probes_realtime = probes.realtime;
    probes.shut_down();
    for v in [
        &mut probe_heartbeat_us,
        &mut all.register_us,
        &mut all.storm_heartbeat_us,
        &mut all.heartbeat_us,
        &mut all.report_us,
    ] {
        v.sort_unstable();
    }
    let ms = |v: &[u32]| {
        format!(
            "{:.2} / {:.2} / {:.2}",
            percentile(v, 0.5),
            percentile(v, 0.99),
            percentile(v, 1.0)
        )
    };
    let assigned = shared.assigned.load(Ordering::Relaxed);
    let pinning = match (&args.coordinator_cpus, &args.generator_cpus) {
        (None, None) => "unpinned".to_string(),
        (c, g) => format!(
            "coordinator on CPUs {}, generator on CPUs {}",
            c.as_deref().unwrap_or("any"),
            g.as_deref().unwrap_or("any")
        ),
    };
    println!(
        "coordinator_load: {} workers ({} idle, the others in worlds of {WORLD}), lease {} ms, {pinning}, {:.0} s measured",
        args.workers, args.idle_workers, args.lease_timeout_ms, window
    );
    println!("| metric | value |");
    println!("|---|---|");
    println!(
        "| storm: all registered / all assigned after (s) | {} / {} |",
        all_registered.map_or("not all".into(), |d| format!("{:.1}", d.as_secs_f64())),
        if storm_over {
            format!("{:.1}", storm.as_secs_f64())
        } else {
            format!("{assigned} of {busy} in {:.0}", storm.as_secs_f64())
        }
    );
    println!(
        "| storm: register p50 / p99 / max (ms) | {} |",
        ms(&all.register_us)
    );
    println!(
        "| storm: heartbeat p50 / p99 / max (ms) | {} |",
        ms(&all.storm_heartbeat_us)
    );
    println!(
        "| storm: coordinator / generator CPU (cores), coordinator peak RSS (MB) | {:.2} / {:.2}, {:.1} |",
        (coordinator_storm_cpu - coordinator_cpu0) / storm.as_secs_f64(),
        (generator_storm_cpu - generator_cpu0) / storm.as_secs_f64(),
        storm_peak as f64 / 1024.0
    );
    println!(
        "| longest gap between a worker's acknowledged heartbeats (s) | {:.2} |",
        all.longest_gap.as_secs_f64()
    );
    println!(
        "| false deaths: told dead while heartbeating / dead in coordinator's /metrics | {false_deaths} / {} (after the storm: {}) |",
        stopped.dead_workers, storm_metrics.dead_workers
    );
    println!(
        "| lease checks late (leases extended) / their delay in all (s) | {} / {:.1} |",
        stopped.late_lease_checks, stopped.lease_check_delay
    );
    println!(
        "| heartbeats/s | {:.0} |",
        all.heartbeat_us.len() as f64 / window
    );
    println!(
        "| heartbeat p50 / p99 / max (ms) | {} |",
        ms(&all.heartbeat_us)
    );
    println!(
        "| heartbeat p50 / p99 / max of the {} probe workers{} (ms) | {} |",
        args.probe_workers,
        if probes_realtime {
            ", on a real-time thread"
        } else {
            " (normal priority: not allowed a real-time thread)"
        },
        ms(&probe_heartbeat_us)
    );
    println!(
        "| coordinator-side heartbeat handling p50 / p99 (ms, bucket bound) | ≤ {} / ≤ {} |",
        handling_quantile(&before, &after, 0.5),
        handling_quantile(&before, &after, 0.99)
    );
    println!(
        "| progress reports/s | {:.0} |",
        all.report_us.len() as f64 / window
    );
    println!("| report p50 / p99 / max (ms) | {} |", ms(&all.report_us));
    println!(
        "| coordinator / generator CPU (cores) | {:.2} / {:.2} |",
        (coordinator_cpu2 - coordinator_cpu1) / window,
        (generator_cpu2 - generator_cpu1) / window
    );
    println!(
        "| coordinator RSS / peak (MB) | {:.1} / {:.1} |",
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    println!(
        "| errors in measured calls; registrations retried; workers never registered | {} ; {} ; {} |",
        all.errors,
        shared.retries.load(Ordering::Relaxed),
        shared.failed.load(Ordering::Relaxed)
    );
    if let Ok(first) = shared.first_error.lock()
        && let Some(error) = first.as_ref()
    {
        println!("first registration error: {error}");
    }
    Ok(())
}

/// The world a simulated worker was assigned to, and its rank there.
#[derive(Clone)]
struct World {
    id: String,
    rank: u32,
}

/// One simulated worker: registers, then heartbeats on its own schedule
/// while it long-polls for an assignment, as `twinhead worker` does; once
/// assigned, a rank 0 also reports progress every other heartbeat.
async fn worker(
    target: Target,
    index: usize,
    schedule: tokio::time::Instant,
    heartbeat_while_waiting: bool,
    shared: Arc<Shared>,
) -> Samples {
    let mut samples = Samples::default();
    let t = Instant::now();
    // Like `twinhead worker`, retry a connection or registration that
    // failed until the storm is over.
    let (client, worker_id) = loop {
        match register(&target, index).await {
            Ok(registered) => break registered,
            Err(error) => {
                shared.retries.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = shared.first_error.lock() {
                    first.get_or_insert(error);
                }
                if t.elapsed() > shared.storm_timeout {
                    shared.failed.fetch_add(1, Ordering::Relaxed);
                    return samples;
                }
                tokio::time::sleep(REGISTER_RETRY).await;
            }
        }
    };
    samples.register_us.push(t.elapsed().as_micros() as u32);
    shared.registered.fetch_add(1, Ordering::Relaxed);

    let (world_tx, world) = watch::channel(None::<World>);
    let assignment = wait_for_assignment(client.clone(), &worker_id, world_tx, &shared);
    let beats = heartbeat(
        client,
        &worker_id,
        schedule,
        heartbeat_while_waiting,
        world,
        &shared,
        &mut samples,
    );
    tokio::join!(assignment, beats);
    samples
}

/// A new connection and a worker id, or why not.
async fn register(
    target: &Target,
    index: usize,
) -> Result<(WorkerServiceClient<Connection>, String), String> {
    let mut client = target
        .connect()
        .await
        .map_err(|e| format!("connect: {e:#}"))?;
    let reply = client
        .register(RegisterRequest {
            hostname: format!("sim-{index}"),
            device: "cpu".into(),
            pid: index as u32,
        })
        .await
        .map_err(|s| format!("register: {}", s.message()))?;
    Ok((client, reply.into_inner().worker_id))
}

/// Long-polls until assigned, told the worker is unknown (its heartbeats
/// count that death), or stopped.
async fn wait_for_assignment(
    mut client: WorkerServiceClient<Connection>,
    worker_id: &str,
    world: watch::Sender<Option<World>>,
    shared: &Shared,
) {
    let mut stop = shared.stop.clone();
    loop {
        let request = GetAssignmentRequest {
            worker_id: worker_id.to_string(),
            known_assignment_id: String::new(),
            wait_ms: 10_000,
        };
        let reply = tokio::select! {
            reply = client.get_assignment(request) => reply,
            _ = stop.wait_for(|s| *s) => return,
        };
        match reply {
            Ok(reply) => {
                if let Some(a) = reply.into_inner().assignment {
                    shared.assigned.fetch_add(1, Ordering::Relaxed);
                    let _ = world.send(Some(World {
                        id: a.world_id,
                        rank: a.rank,
                    }));
                    return;
                }
            }
            Err(s) if s.code() == Code::NotFound => return,
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn heartbeat(
    mut client: WorkerServiceClient<Connection>,
    worker_id: &str,
    schedule: tokio::time::Instant,
    while_waiting: bool,
    mut world: watch::Receiver<Option<World>>,
    shared: &Shared,
    samples: &mut Samples,
) {
    let mut stop = shared.stop.clone();
    let first = if while_waiting {
        // The first beat of this worker's slot after registration.
        let now = tokio::time::Instant::now();
        let periods = now.saturating_duration_since(schedule).as_nanos()
            / HEARTBEAT_INTERVAL.as_nanos()
            + u128::from(now > schedule);
        schedule + HEARTBEAT_INTERVAL * periods as u32
    } else {
        tokio::select! {
            _ = world.wait_for(|w| w.is_some()) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        schedule.max(tokio::time::Instant::now())
    };
    let mut ticker = tokio::time::interval_at(first, HEARTBEAT_INTERVAL);
    // A tick this process saw late (its runtime busy with other simulated
    // workers) keeps the worker's slot: with `Delay` every worker held up by
    // one stall of the generator would beat in the same instant from then on,
    // a burst no fleet of separate processes makes.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_ack = Instant::now();
    let mut tick: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        tick += 1;
        let assigned = world.borrow().clone();
        let phase = shared.phase.load(Ordering::Relaxed);
        let t = Instant::now();
        let beat = client
            .heartbeat(HeartbeatRequest {
                worker_id: worker_id.to_string(),
                world_id: assigned.as_ref().map(|w| w.id.clone()).unwrap_or_default(),
            })
            .await;
        let took = t.elapsed().as_micros() as u32;
        match beat {
            Ok(r) if r.get_ref().action == WorkerAction::Continue as i32 => {
                samples.longest_gap = samples.longest_gap.max(last_ack.elapsed());
                last_ack = Instant::now();
                match phase {
                    STORM => samples.storm_heartbeat_us.push(took),
                    MEASURING => samples.heartbeat_us.push(took),
                    _ => {}
                }
            }
            Err(s) if s.code() == Code::NotFound => {
                // A live worker told it is dead: the false death the bench
                // counts. A real worker would register again.
                samples.declared_dead = true;
                shared.dead.fetch_add(1, Ordering::Relaxed);
                return;
            }
            _ => samples.errors += usize::from(phase == MEASURING),
        }
        // Rank 0 reports for its world, as `twinhead worker` does.
        let Some(World {
            id: world_id,
            rank: 0,
        }) = assigned
        else {
            continue;
        };
        if tick.is_multiple_of(2) {
            let t = Instant::now();
            let report = client
                .report_progress(ReportProgressRequest {
                    worker_id: worker_id.to_string(),
                    world_id,
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
                Ok(_) if phase == MEASURING => samples.report_us.push(took),
                Ok(_) => {}
                Err(_) => samples.errors += usize::from(phase == MEASURING),
            }
        }
    }
}
