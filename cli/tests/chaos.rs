//! Chaos: a distributed dataset build by two `dataprep` processes and one
//! run of a tiny encoder through three phases on three workers, under a
//! seeded schedule of faults: SIGKILL of a worker, of the coordinator (back
//! on the same port after a pause) and of a dataprep process; SIGSTOP of a
//! worker for longer than its lease; SIGKILL of rank 0 while a checkpoint
//! is half written; a truncated latest checkpoint; a ring link between two
//! live workers stalled or cut (every link goes through a proxy in this
//! test). Killed processes come back after a random delay. Afterwards: the dataset equals a
//! single-process build byte for byte, every row of every phase was
//! consumed exactly once across all attempts, every checkpoint the
//! coordinator recorded (and every committed folder on disk) loads whole,
//! and per fault kind the time to detection and until training resumed.
//!
//! CI runs 10 faults. The bench run (`BENCHMARKS.md`, "chaos"):
//!
//!     TWINHEAD_CHAOS_FAULTS=100 cargo test --release -p twinhead --test chaos \
//!         -- --ignored --nocapture
//!
//! with `TWINHEAD_CHAOS_SEED` choosing the schedule and
//! `TWINHEAD_CHAOS_OUT=FILE` writing the summary as JSON.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{fixture_data_config, json, tree_differences, twinhead};
use serde_json::Value;

const HEARTBEAT_MS: u64 = 200;
const LEASE_MS: u64 = 2000;
const WORKERS: usize = 3;
const GLOBAL_BATCH: u64 = 12;

/// A child process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.0.id().to_string())
            .status();
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A seeded xorshift: the same schedule for the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `lo..hi` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo).max(1))
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next() % items.len() as u64) as usize]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    KillWorker,
    StopWorker,
    KillCoordinator,
    KillDuringCheckpoint,
    CorruptCheckpoint,
    KillDataprep,
    StallRingLink,
    CutRingLink,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::KillWorker => "SIGKILL worker",
            Kind::StopWorker => "SIGSTOP worker past its lease",
            Kind::KillCoordinator => "SIGKILL coordinator",
            Kind::KillDuringCheckpoint => "SIGKILL rank 0 mid-checkpoint",
            Kind::CorruptCheckpoint => "truncate latest checkpoint, then SIGKILL a worker",
            Kind::KillDataprep => "SIGKILL dataprep process",
            Kind::StallRingLink => "stall a ring link (proxy stops forwarding)",
            Kind::CutRingLink => "cut a ring link (proxy closes it)",
        }
    }
}

/// One injected fault and what followed it.
#[derive(Debug, Clone)]
struct Fault {
    kind: Kind,
    at_ms: i64,
    /// The attempt a fault on the run's world struck.
    attempt: Option<usize>,
    detected_ms: Option<i64>,
    resumed_ms: Option<i64>,
    /// Steps done in the phase when it struck, to measure recomputation.
    steps_at_fault: Option<(u64, u64)>,
    recomputed_steps: u64,
}

/// A proxy on loopback that every ring link goes through (the workers'
/// `TWINHEAD_TEST_RING_PROXY`), so that a link between two live workers
/// can be stalled or cut.
struct RingProxy {
    addr: String,
    links: Arc<Mutex<Vec<Arc<ProxyLink>>>>,
}

/// One proxied link: the dialing rank's socket and its right neighbour's.
struct ProxyLink {
    ends: [TcpStream; 2],
    stalled: AtomicBool,
    closed: AtomicBool,
}

impl ProxyLink {
    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for end in &self.ends {
            let _ = end.shutdown(Shutdown::Both);
        }
    }
}

impl RingProxy {
    fn start() -> RingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listener");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let links: Arc<Mutex<Vec<Arc<ProxyLink>>>> = Arc::default();
        let registry = links.clone();
        std::thread::spawn(move || {
            for dialed in listener.incoming().flatten() {
                let registry = registry.clone();
                std::thread::spawn(move || {
                    let _ = proxy_link(dialed, &registry);
                });
            }
        });
        RingProxy { addr, links }
    }

    /// A link that carries traffic now, if any.
    fn pick_live(&self, rng: &mut Rng) -> Option<Arc<ProxyLink>> {
        let live: Vec<Arc<ProxyLink>> = self
            .links
            .lock()
            .expect("links")
            .iter()
            .filter(|l| !l.closed.load(Ordering::SeqCst) && !l.stalled.load(Ordering::SeqCst))
            .cloned()
            .collect();
        if live.is_empty() {
            return None;
        }
        Some(live[(rng.next() % live.len() as u64) as usize].clone())
    }
}

/// Reads the target's address (one line), dials it and forwards both ways.
fn proxy_link(dialed: TcpStream, registry: &Mutex<Vec<Arc<ProxyLink>>>) -> std::io::Result<()> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 100 {
        (&dialed).read_exact(&mut byte)?;
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    let target = TcpStream::connect(String::from_utf8_lossy(&line).as_ref())?;
    target.set_nodelay(true)?;
    dialed.set_nodelay(true)?;
    let link = Arc::new(ProxyLink {
        ends: [dialed, target],
        stalled: AtomicBool::new(false),
        closed: AtomicBool::new(false),
    });
    registry.lock().expect("links").push(link.clone());
    for (from, to) in [(0, 1), (1, 0)] {
        let link = link.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                // A stalled link neither reads nor writes: the senders'
                // buffers fill and the readers hear nothing.
                while link.stalled.load(Ordering::SeqCst) && !link.closed.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                match (&link.ends[from]).read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if (&link.ends[to]).write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            link.close();
        });
    }
    Ok(())
}

/// The processes of the test and how to restart them.
struct Cluster {
    dir: PathBuf,
    db: PathBuf,
    listen: String,
    url: String,
    coordinator: Option<Proc>,
    workers: Vec<Option<Proc>>,
    dataprep: Vec<Option<Proc>>,
    started: BTreeMap<String, usize>,
    /// Checkpoint folders this test truncated.
    corrupted: Vec<PathBuf>,
    proxy: RingProxy,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        let db = dir.join("c.db");
        let (coordinator, url) =
            spawn_coordinator(&db, "127.0.0.1:0", &dir.join("coordinator-0.log"));
        let listen = url.trim_start_matches("http://").to_string();
        Cluster {
            dir: dir.to_path_buf(),
            db,
            listen,
            url,
            coordinator: Some(coordinator),
            workers: (0..WORKERS).map(|_| None).collect(),
            dataprep: vec![None, None],
            started: BTreeMap::new(),
            corrupted: Vec::new(),
            proxy: RingProxy::start(),
        }
    }

    fn log(&mut self, what: &str) -> PathBuf {
        let n = self.started.entry(what.to_string()).or_insert(0);
        *n += 1;
        self.dir.join(format!("{what}-{n}.log"))
    }

    fn restart_coordinator(&mut self) {
        let log = self.log("coordinator");
        let (proc, _) = spawn_coordinator(&self.db, &self.listen, &log);
        self.coordinator = Some(proc);
    }

    fn start_worker(&mut self, slot: usize) {
        let log = self.log(&format!("worker{slot}"));
        let file = std::fs::File::create(&log).expect("log");
        let child = twinhead()
            .args(["worker", "--coordinator", &self.url])
            .env("TWINHEAD_LOG", "info")
            // Checkpoint writes pause before their marker, so a kill can
            // land inside one.
            .env("TWINHEAD_TEST_STALL_CHECKPOINT_MS", "300")
            .env("TWINHEAD_TEST_RING_PROXY", &self.proxy.addr)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("worker");
        self.workers[slot] = Some(Proc(child));
    }

    fn start_dataprep(&mut self, slot: usize) {
        let log = self.log(&format!("dataprep{slot}"));
        let file = std::fs::File::create(&log).expect("log");
        let child = twinhead()
            .args(["dataprep", "--threads", "1", "--coordinator", &self.url])
            .env("TWINHEAD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("dataprep");
        self.dataprep[slot] = Some(Proc(child));
    }

    /// The worker slot whose process registered as `worker_id` last.
    fn slot_of(&self, worker_id: &str) -> Option<usize> {
        (0..WORKERS).find(|slot| {
            let n = self
                .started
                .get(&format!("worker{slot}"))
                .copied()
                .unwrap_or(0);
            let log = self.dir.join(format!("worker{slot}-{n}.log"));
            std::fs::read_to_string(log).is_ok_and(|text| {
                text.lines()
                    .rev()
                    .filter(|l| l.contains(" registered "))
                    .filter_map(|l| l.split("worker=").nth(1))
                    .find_map(|r| r.split_whitespace().next())
                    == Some(worker_id)
            })
        })
    }
}

fn spawn_coordinator(db: &Path, listen: &str, log: &Path) -> (Proc, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut child = twinhead()
            .args(["coordinator", "--listen", listen, "--db"])
            .arg(db)
            .args(["--heartbeat-interval-ms", &HEARTBEAT_MS.to_string()])
            .args(["--lease-timeout-ms", &LEASE_MS.to_string()])
            .env("TWINHEAD_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).expect("log"))
            .spawn()
            .expect("coordinator");
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
        if let Some(url) = line
            .trim()
            .rsplit(' ')
            .next()
            .filter(|u| u.starts_with("http://"))
        {
            return (Proc(child), url.to_string());
        }
        // The old process's port may not be free yet.
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            Instant::now() < deadline,
            "the coordinator does not start on {listen}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The run's status, or `None` while the coordinator is down.
fn status(url: &str, run: &str) -> Option<Value> {
    let out = twinhead()
        .args(["status", "--json", "--coordinator", url, run])
        .output()
        .ok()?;
    out.status.success().then(|| json(&out))
}

fn data_config(dir: &Path, scale: u64) -> PathBuf {
    let config = fixture_data_config(dir);
    let text = std::fs::read_to_string(&config).expect("config");
    // Phase budgets sized for the run: sources repeat to fill them.
    let text = text
        .replacen("tokens = 8192", &format!("tokens = {}", 160_000 * scale), 1)
        .replacen("tokens = 8192", &format!("tokens = {}", 200_000 * scale), 1);
    std::fs::write(&config, text).expect("config");
    config
}

fn recipe(dir: &Path, dataset: &str, scale: u64) -> PathBuf {
    let ckpt = dir.join("ckpt");
    let text = format!(
        r#"
name = "chaos"
model = "tiny"
objective = "mlm"
dataset = "{dataset}"
seed = 11
world_size = {WORKERS}
min_world_size = 2
max_restarts = 100000
global_batch = {GLOBAL_BATCH}
micro_batch = 2
[optimizer]
peak_lr = 3e-3
[checkpoint]
root = "file://{ckpt}"
every_tokens = 4608
[[phases]]
name = "pretrain"
dataset_phase = "short"
tokens = {pretrain}
seq_len = 64
mask_ratio = 0.3
[[phases]]
name = "extension"
dataset_phase = "long"
tokens = {extension}
seq_len = 256
mask_ratio = 0.3
[[phases]]
name = "decay"
dataset_phase = "long"
tokens = {decay}
seq_len = 256
mask_ratio = 0.15
lr = {{ shape = "one_minus_sqrt", start_factor = 1.0, end_factor = 0.0 }}
"#,
        ckpt = ckpt.display(),
        pretrain = 64 * GLOBAL_BATCH * 70 * scale,
        extension = 256 * GLOBAL_BATCH * 14 * scale,
        decay = 256 * GLOBAL_BATCH * 7 * scale,
    );
    let path = dir.join("chaos.toml");
    std::fs::write(&path, text).expect("recipe");
    path
}

/// Status samples taken every 500 ms by a thread of their own (each is a
/// `twinhead status` process: more often would load the machine).
type Samples = Arc<Mutex<Vec<(i64, Value)>>>;

fn monitor(
    url: String,
    run: String,
    stop: Arc<Mutex<bool>>,
) -> (Samples, std::thread::JoinHandle<()>) {
    let samples: Samples = Arc::default();
    let out = samples.clone();
    let handle = std::thread::spawn(move || {
        while !*stop.lock().expect("stop") {
            if let Some(s) = status(&url, &run) {
                out.lock().expect("samples").push((now_ms(), s));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    (samples, handle)
}

fn latest(samples: &Samples) -> Option<Value> {
    samples
        .lock()
        .expect("samples")
        .last()
        .map(|(_, s)| s.clone())
}

/// The (phase, steps done) the run reports.
fn position(s: &Value) -> (u64, u64) {
    let phase = s["phase_index"].as_u64().unwrap_or(0);
    (
        phase,
        s["phases"][phase as usize]["steps_done"]
            .as_u64()
            .unwrap_or(0),
    )
}

/// The folders under the run's checkpoint root, per phase.
fn checkpoint_folders(ckpt: &Path, run: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for phase in std::fs::read_dir(ckpt.join(run))
        .into_iter()
        .flatten()
        .flatten()
    {
        for step in std::fs::read_dir(phase.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if step.file_name().to_string_lossy().starts_with("step-") {
                out.push(step.path());
            }
        }
    }
    out.sort();
    out
}

/// The live attempt (its index) and the slots of its members, waiting up to
/// 20 s for a world to be live.
fn live_world(cluster: &Cluster, samples: &Samples) -> Option<(usize, Vec<usize>)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = latest(samples).and_then(|s| {
            let attempts = s["attempts"].as_array()?;
            let index = attempts.len().checked_sub(1)?;
            let live = &attempts[index];
            if live["ended_ms"].as_i64() != Some(0) {
                return None;
            }
            let slots: Vec<usize> = live["workers"]
                .as_array()?
                .iter()
                .filter_map(|id| id.as_str().and_then(|id| cluster.slot_of(id)))
                .filter(|&slot| cluster.workers[slot].is_some())
                .collect();
            (!slots.is_empty()).then_some((index, slots))
        });
        if found.is_some() || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the run's attempt `index` has ended, at most `limit`.
fn wait_for_end(samples: &Samples, index: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let ended = latest(samples)
            .and_then(|s| s["attempts"][index]["ended_ms"].as_i64())
            .is_some_and(|ended| ended > 0);
        if ended {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Injects `kind`; for a fault on the run's world, the index of the
/// attempt it struck. `None`: nothing to strike.
fn inject(
    kind: Kind,
    cluster: &mut Cluster,
    samples: &Samples,
    run: &str,
    rng: &mut Rng,
) -> Option<Option<usize>> {
    let mut struck = None;
    match kind {
        Kind::KillWorker => {
            let (attempt, members) = live_world(cluster, samples)?;
            let slot = rng.pick(&members);
            struck = Some(attempt);
            cluster.workers[slot] = None;
            let delay = rng.millis(300, 1500);
            std::thread::sleep(delay);
            cluster.start_worker(slot);
        }
        Kind::StopWorker => {
            let (attempt, members) = live_world(cluster, samples)?;
            let slot = rng.pick(&members);
            struck = Some(attempt);
            if let Some(p) = &cluster.workers[slot] {
                p.signal("STOP");
                std::thread::sleep(Duration::from_millis(LEASE_MS + 500));
                p.signal("CONT");
            }
        }
        Kind::KillCoordinator => {
            cluster.coordinator = None;
            std::thread::sleep(rng.millis(300, 1500));
            cluster.restart_coordinator();
        }
        Kind::KillDuringCheckpoint => {
            // Rank 0 of the live world, caught with a folder written but not
            // yet committed.
            let ckpt = cluster.dir.join("ckpt");
            let deadline = Instant::now() + Duration::from_secs(20);
            let (attempt, slot) = loop {
                let (attempt, members) = live_world(cluster, samples)?;
                let torn = checkpoint_folders(&ckpt, run)
                    .into_iter()
                    .any(|f| f.join("state.json").exists() && !f.join("COMMITTED").exists());
                // Rank 0 is the world's first member.
                if torn && let Some(&slot) = members.first() {
                    break (attempt, slot);
                }
                if Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            struck = Some(attempt);
            cluster.workers[slot] = None;
            std::thread::sleep(rng.millis(300, 1500));
            cluster.start_worker(slot);
        }
        Kind::CorruptCheckpoint => {
            let ckpt = cluster.dir.join("ckpt");
            let newest = checkpoint_folders(&ckpt, run)
                .into_iter()
                .filter(|f| f.join("COMMITTED").exists())
                .max_by_key(|f| {
                    std::fs::metadata(f.join("COMMITTED"))
                        .and_then(|m| m.modified())
                        .ok()
                })?;
            let model = newest.join("model.safetensors");
            let Ok(len) = std::fs::metadata(&model).map(|m| m.len()) else {
                return None;
            };
            if let Ok(file) = std::fs::OpenOptions::new().write(true).open(&model) {
                let _ = file.set_len(len / 2);
            }
            cluster.corrupted.push(newest);
            // A restart makes the next world load it (and refuse it).
            let (attempt, members) = live_world(cluster, samples)?;
            let slot = rng.pick(&members);
            struck = Some(attempt);
            cluster.workers[slot] = None;
            std::thread::sleep(rng.millis(300, 1500));
            cluster.start_worker(slot);
        }
        Kind::StallRingLink => {
            let (attempt, _) = live_world(cluster, samples)?;
            let link = cluster.proxy.pick_live(rng)?;
            struck = Some(attempt);
            link.stalled.store(true, Ordering::SeqCst);
            // Nothing else strikes until the world has noticed, so the
            // detection measured is the stall's own.
            wait_for_end(samples, attempt, Duration::from_secs(30));
            link.close();
        }
        Kind::CutRingLink => {
            let (attempt, _) = live_world(cluster, samples)?;
            let link = cluster.proxy.pick_live(rng)?;
            struck = Some(attempt);
            link.close();
        }
        Kind::KillDataprep => {
            let slot = (rng.next() % 2) as usize;
            cluster.dataprep[slot] = None;
            std::thread::sleep(rng.millis(300, 1500));
            cluster.start_dataprep(slot);
        }
    }
    Some(struck)
}

/// One measurement of each fault that has it, in seconds, ascending.
fn sorted_seconds(faults: &[Fault], ms: impl Fn(&Fault) -> Option<i64>) -> Vec<f64> {
    let mut v: Vec<f64> = faults
        .iter()
        .filter_map(ms)
        .map(|ms| ms as f64 / 1000.0)
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Fills in detection, resumption and recomputation from the samples.
fn measure(faults: &mut [Fault], samples: &[(i64, Value)]) {
    for fault in faults.iter_mut() {
        let after: Vec<&(i64, Value)> = samples.iter().filter(|(t, _)| *t >= fault.at_ms).collect();
        let Some((_, first)) = after.first() else {
            continue;
        };
        if let Some(index) = fault.attempt {
            // When the coordinator ended the attempt the fault struck.
            fault.detected_ms = after.iter().find_map(|(_, s)| {
                let ended = s["attempts"][index]["ended_ms"].as_i64().unwrap_or(0);
                (ended > 0).then_some((ended - fault.at_ms).max(0))
            });
            // Resumed: a later attempt has moved past where it started.
            fault.resumed_ms = after.iter().find_map(|(t, s)| {
                let attempts = s["attempts"].as_array()?;
                let newer = attempts.get(index + 1..)?.last()?;
                let start = &newer["start_checkpoint"];
                let start_pos = (
                    start["phase_index"].as_u64().unwrap_or(0),
                    start["step"].as_u64().unwrap_or(0),
                );
                let moved = position(s) > start_pos
                    && s["updated_ms"].as_i64().unwrap_or(0)
                        > newer["started_ms"].as_i64().unwrap_or(i64::MAX);
                if moved || s["state"] == "completed" {
                    if let Some((phase, step)) = fault.steps_at_fault
                        && phase == start_pos.0
                    {
                        fault.recomputed_steps = step.saturating_sub(start_pos.1);
                    }
                    Some(t - fault.at_ms)
                } else {
                    None
                }
            });
        } else {
            // The coordinator or a dataprep process: training (or the
            // build) goes on; resumed when the run reports progress again.
            let before = position(first);
            fault.resumed_ms = after
                .iter()
                .find(|(_, s)| position(s) != before || s["state"] == "completed")
                .map(|(t, _)| t - fault.at_ms);
        }
    }
}

fn chaos(faults_wanted: usize, seed: u64) -> Value {
    let mut dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    let d = d.as_path();
    let scale = (faults_wanted as u64).div_ceil(10).max(1);
    let mut rng = Rng(seed.max(1));
    let config = data_config(d, scale);

    // The reference: one process, locally.
    let local = d.join("local");
    let built = twinhead()
        .args(["dataset", "build"])
        .arg(&config)
        .arg("--out")
        .arg(&local)
        .output()
        .expect("local build");
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );

    let mut cluster = Cluster::start(d);
    cluster.start_dataprep(0);
    cluster.start_dataprep(1);
    let shared = d.join("shared");
    let queued = json(
        &twinhead()
            .args(["dataset", "submit"])
            .arg(&config)
            .arg("--out")
            .arg(&shared)
            .args(["--detach", "--json", "--coordinator", &cluster.url])
            .output()
            .expect("dataset submit"),
    );
    let build_id = queued["id"].as_str().expect("build id").to_string();
    let mut faults: Vec<Fault> = Vec::new();
    // Faults during the build: dataprep processes and the coordinator.
    let build_faults = (faults_wanted / 10).max(1);
    let show = |url: &str| {
        twinhead()
            .args(["dataset", "show", &build_id, "--json", "--coordinator", url])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| json(&o))
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut injected_in_build = 0;
    let dataset = loop {
        if let Some(d) = show(&cluster.url)
            && d["state"] != "building"
        {
            assert_eq!(d["state"], "complete", "{d}");
            break d["url"].as_str().expect("url").to_string();
        }
        if injected_in_build < build_faults {
            std::thread::sleep(rng.millis(200, 800));
            let kind = if injected_in_build % 2 == 0 {
                Kind::KillDataprep
            } else {
                Kind::KillCoordinator
            };
            let at_ms = now_ms();
            let dummy: Samples = Arc::default();
            if let Some(attempt) = inject(kind, &mut cluster, &dummy, "", &mut rng) {
                faults.push(Fault {
                    kind,
                    at_ms,
                    attempt,
                    detected_ms: None,
                    resumed_ms: None,
                    steps_at_fault: None,
                    recomputed_steps: 0,
                });
                injected_in_build += 1;
            }
        }
        assert!(Instant::now() < deadline, "the build did not finish");
        std::thread::sleep(Duration::from_millis(200));
    };
    let differences = tree_differences(&shared.join("train-fixture"), &local.join("train-fixture"));
    let same_bytes = differences.is_empty();
    if !same_bytes {
        // The folder is the finding: keep it for a look.
        dir.disable_cleanup(true);
        eprintln!(
            "the distributed build differs from one process (kept in {}): {differences:#?}",
            d.display()
        );
    }
    cluster.dataprep = vec![None, None];

    // The run.
    let submitted = json(
        &twinhead()
            .args(["submit", "--json", "--coordinator", &cluster.url])
            .arg(recipe(d, &dataset, scale))
            .output()
            .expect("submit"),
    );
    let run = submitted["run_id"].as_str().expect("run id").to_string();
    for slot in 0..WORKERS {
        cluster.start_worker(slot);
    }
    let stop = Arc::new(Mutex::new(false));
    let (samples, monitor) = monitor(cluster.url.clone(), run.clone(), stop.clone());
    let kinds = [
        Kind::KillWorker,
        Kind::StopWorker,
        Kind::KillCoordinator,
        Kind::KillDuringCheckpoint,
        Kind::CorruptCheckpoint,
        Kind::StallRingLink,
        Kind::CutRingLink,
    ];
    let run_started = Instant::now();
    while faults.len() < faults_wanted {
        std::thread::sleep(rng.millis(600, 1800));
        let s = latest(&samples);
        if s.as_ref().is_some_and(|s| s["state"] == "completed") {
            break;
        }
        let kind = rng.pick(&kinds);
        let at_ms = now_ms();
        let steps_at_fault = s.as_ref().map(position);
        if let Some(attempt) = inject(kind, &mut cluster, &samples, &run, &mut rng) {
            faults.push(Fault {
                kind,
                at_ms,
                attempt,
                detected_ms: None,
                resumed_ms: None,
                steps_at_fault,
                recomputed_steps: 0,
            });
        }
    }
    let deadline = Instant::now() + Duration::from_secs(900);
    let done = loop {
        if let Some(s) = latest(&samples)
            && s["state"] != "running"
            && s["state"] != "pending"
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the run did not finish: {:?}",
            latest(&samples)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let wall = run_started.elapsed();
    *stop.lock().expect("stop") = true;
    let _ = monitor.join();
    assert_eq!(done["state"], "completed", "{done}");

    // Every row of every phase exactly once, across all attempts.
    let ckpt = d.join("ckpt");
    let spec = twinhead_proto::config::load_run(&d.join("chaos.toml"), &[]).expect("recipe");
    let mut rows_ok = true;
    let (mut useful_rows, mut computed_rows) = (0u64, 0u64);
    for (i, phase) in spec.phases.iter().enumerate() {
        let steps = twinhead_proto::num_steps(&spec, i);
        let schedule = twinhead_proto::BatchSchedule::for_phase(&spec, i);
        let report = twinhead_worker::loader::order::verify_run(
            &format!("file://{}", ckpt.display()),
            &run,
            i as u32,
            &phase.name,
            steps,
            &schedule,
        )
        .expect("data-order logs read");
        rows_ok &= report.is_ok();
        assert!(report.is_ok(), "phase {}: {report:?}", phase.name);
        useful_rows += steps * GLOBAL_BATCH;
        let attempts = twinhead_worker::loader::order::read_attempts(
            &format!("file://{}", ckpt.display()),
            &run,
            i as u32,
            &phase.name,
        )
        .expect("attempt logs");
        computed_rows += attempts
            .iter()
            .flat_map(|a| &a.entries)
            .map(|e| e.rows[1] - e.rows[0])
            .sum::<u64>();
    }
    // Every recorded checkpoint and every committed folder loads whole,
    // but the ones this test truncated; an attempt that started from one of
    // those refused it and failed.
    let corrupted: Vec<String> = cluster
        .corrupted
        .iter()
        .map(|f| format!("file://{}", f.display()))
        .collect();
    let is_corrupted = |url: &str| corrupted.iter().any(|c| c == url.trim_end_matches('/'));
    let mut bad_checkpoints = 0;
    for c in done["checkpoints"].as_array().into_iter().flatten() {
        let url = c["url"].as_str().unwrap_or("");
        if !is_corrupted(url) && twinhead_worker::checkpoint::load(url).is_err() {
            bad_checkpoints += 1;
        }
    }
    for folder in checkpoint_folders(&ckpt, &run) {
        let url = format!("file://{}", folder.display());
        if folder.join("COMMITTED").exists() && !is_corrupted(&url) {
            twinhead_worker::checkpoint::load(&url)
                .unwrap_or_else(|e| panic!("{url} is committed but does not load: {e}"));
        }
    }
    let mut corrupt_loads = 0;
    for a in done["attempts"].as_array().into_iter().flatten() {
        if let Some(url) = a["start_checkpoint"]["url"].as_str()
            && is_corrupted(url)
            && twinhead_worker::checkpoint::load(url).is_err()
            && a["failed"] != true
        {
            corrupt_loads += 1;
        }
    }
    assert_eq!(
        corrupt_loads, 0,
        "an attempt trained from a truncated checkpoint"
    );
    assert_eq!(bad_checkpoints, 0, "recorded checkpoints that do not load");
    assert!(same_bytes, "the distributed build differs from one process");

    let all = samples.lock().expect("samples").clone();
    measure(&mut faults, &all);
    let mut table = BTreeMap::new();
    for fault in &faults {
        table
            .entry(fault.kind)
            .or_insert_with(Vec::new)
            .push(fault.clone());
    }
    let seq_for = |phase: u64| {
        spec.phases
            .get(phase as usize)
            .map_or(0, |p| u64::from(p.seq_len))
    };
    let mut kinds_json = Vec::new();
    for (kind, list) in &table {
        let detected = sorted_seconds(list, |f| f.detected_ms);
        let resumed = sorted_seconds(list, |f| f.resumed_ms);
        let recomputed: u64 = list
            .iter()
            .map(|f| {
                f.recomputed_steps * GLOBAL_BATCH * seq_for(f.steps_at_fault.map_or(0, |p| p.0))
            })
            .sum();
        let stats = |v: &[f64]| {
            serde_json::json!({
                "n": v.len(),
                "p50_s": percentile(v, 0.5),
                "p99_s": percentile(v, 0.99),
                "max_s": v.last().copied().unwrap_or(f64::NAN),
            })
        };
        kinds_json.push(serde_json::json!({
            "kind": kind.name(),
            "count": list.len(),
            "detection": stats(&detected),
            "resumed": stats(&resumed),
            "tokens_recomputed": recomputed,
        }));
    }
    let all_detected = sorted_seconds(&faults, |f| f.detected_ms);
    let all_resumed = sorted_seconds(&faults, |f| f.resumed_ms);
    serde_json::json!({
        "seed": seed,
        "faults": faults.len(),
        "faults_wanted": faults_wanted,
        "run_wall_s": wall.as_secs_f64(),
        "attempts": done["attempts"].as_array().map_or(0, Vec::len),
        "rows_once": rows_ok,
        "bad_checkpoints_recorded": bad_checkpoints,
        "truncated_checkpoints_trained_from": corrupt_loads,
        "dataset_same_bytes": same_bytes,
        "goodput": useful_rows as f64 / computed_rows.max(1) as f64,
        "detection_p99_s": percentile(&all_detected, 0.99),
        "resumed_p99_s": percentile(&all_resumed, 0.99),
        "kinds": kinds_json,
    })
}

fn faults_from_env(default: usize) -> usize {
    std::env::var("TWINHEAD_CHAOS_FAULTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn report(summary: &Value) {
    eprintln!(
        "{}",
        serde_json::to_string_pretty(summary).unwrap_or_default()
    );
    if let Ok(path) = std::env::var("TWINHEAD_CHAOS_OUT") {
        let _ = std::fs::write(path, summary.to_string());
    }
}

fn check_targets(summary: &Value) {
    let wanted = summary["faults_wanted"].as_u64().unwrap_or(0);
    let got = summary["faults"].as_u64().unwrap_or(0);
    assert!(
        got * 10 >= wanted * 8,
        "only {got} of {wanted} faults struck before the run ended"
    );
    let detection = summary["detection_p99_s"].as_f64().unwrap_or(f64::NAN);
    let resumed = summary["resumed_p99_s"].as_f64().unwrap_or(f64::NAN);
    assert!(detection < 10.0, "detection p99 {detection} s");
    assert!(resumed < 60.0, "training resumed p99 {resumed} s");
}

#[test]
fn a_build_and_a_run_under_ten_seeded_faults_lose_nothing() {
    let seed = std::env::var("TWINHEAD_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261206);
    let summary = chaos(10, seed);
    report(&summary);
    check_targets(&summary);
}

#[test]
#[ignore = "the chaos bench: minutes; TWINHEAD_CHAOS_FAULTS (100)"]
fn chaos_bench() {
    let seed = std::env::var("TWINHEAD_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let summary = chaos(faults_from_env(100), seed);
    report(&summary);
    check_targets(&summary);
}
