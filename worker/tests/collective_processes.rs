//! The CPU ring engine across real OS processes on loopback.
//!
//! Each test plays the coordinator: it starts rank 0 as a child process
//! (this test binary again, running only `child_process` with
//! `TWINHEAD_CHILD` set), reads the rendezvous token from its stdout, starts
//! the other ranks with the token, and checks what every rank reports
//! (lines starting with `@@`).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use twinhead_worker::collective::{Collective, CollectiveError, CpuRingEngine, RingConfig};

const CHILD_ENV: &str = "TWINHEAD_CHILD";

// ---------------------------------------------------------------- children

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

fn env_usize(name: &str) -> usize {
    std::env::var(name).expect(name).parse().expect("a number")
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis()
}

/// The value rank `rank` contributes at index `i`: not exactly
/// representable sums, so the summation order shows in the bits.
fn messy(rank: usize, i: usize) -> f32 {
    ((i as f32 * 0.37 + rank as f32 * 1.618).sin() * 1000.0) / (1.0 + rank as f32 * 0.3)
}

/// Small integers: sums are exact, so the mean is known exactly.
fn exact(rank: usize, i: usize) -> f32 {
    ((i % 17) as f32) * (rank as f32 + 1.0) - rank as f32
}

fn fnv(values: &[f32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for b in v.to_bits().to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

const LENGTHS: &[usize] = &[0, 1, 2, 3, 5, 7, 13, 31, 97, 1000, 65_537, 262_147];

fn child_config() -> RingConfig {
    let chunk_bytes = std::env::var("CHUNK_BYTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(RingConfig::default().chunk_bytes);
    let op_timeout_ms = std::env::var("OP_TIMEOUT_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60_000);
    RingConfig {
        op_timeout: Duration::from_millis(op_timeout_ms),
        connect_timeout: Duration::from_secs(60),
        chunk_bytes,
        ..RingConfig::default()
    }
}

fn child_connect(rank: usize, world: usize) -> CpuRingEngine {
    let cfg = child_config();
    if rank == 0 {
        let host = CpuRingEngine::host(world, cfg).expect("host");
        println!("@@TOKEN {}", hex(host.token()));
        host.accept().expect("accept")
    } else {
        let token = unhex(&std::env::var("TOKEN").expect("TOKEN"));
        CpuRingEngine::connect(&token, rank, world, cfg).expect("connect")
    }
}

fn run_child(scenario: &str) {
    let rank = env_usize("RANK");
    let world = env_usize("WORLD");
    let mut c = child_connect(rank, world);
    assert_eq!((c.rank(), c.world_size()), (rank, world));
    match scenario {
        "allreduce" => {
            for &len in LENGTHS {
                let mut v: Vec<f32> = (0..len).map(|i| exact(rank, i)).collect();
                c.all_reduce_mean(&mut v).expect("all-reduce");
                for (i, x) in v.iter().enumerate() {
                    let sum: f32 = (0..world).map(|r| exact(r, i)).sum();
                    let want = sum / world as f32;
                    if x.to_bits() != want.to_bits() {
                        println!("@@FAIL len {len} index {i}: got {x}, want {want}");
                        return;
                    }
                }
                let mut m: Vec<f32> = (0..len).map(|i| messy(rank, i)).collect();
                c.all_reduce_mean(&mut m).expect("all-reduce");
                println!("@@HASH {len} {:016x}", fnv(&m));
            }
            println!("@@OK");
        }
        "broadcast" => {
            for root in 0..world {
                for len in [0usize, 1, 3, 1 << 20 | 3] {
                    let fill = |r: usize| {
                        (0..len)
                            .map(|i| (i * 7 + r * 13) as u8)
                            .collect::<Vec<u8>>()
                    };
                    let mut b = if rank == root {
                        fill(root)
                    } else {
                        vec![0xAA; len]
                    };
                    c.broadcast_bytes(&mut b, root).expect("broadcast");
                    if b != fill(root) {
                        println!("@@FAIL bytes root {root} len {len}");
                        return;
                    }
                    let mut f: Vec<f32> = (0..len % 1000)
                        .map(|i| if rank == root { i as f32 * 0.5 } else { -1.0 })
                        .collect();
                    c.broadcast(&mut f, root).expect("broadcast f32");
                    if f.iter().enumerate().any(|(i, x)| *x != i as f32 * 0.5) {
                        println!("@@FAIL f32 root {root} len {len}");
                        return;
                    }
                }
            }
            match c.broadcast_bytes(&mut [0u8; 4], world) {
                Err(CollectiveError::InvalidArgument(_)) => {}
                other => {
                    println!("@@FAIL root out of range gave {other:?}");
                    return;
                }
            }
            println!("@@OK");
        }
        "barrier" => {
            for round in 0..3 {
                thread::sleep(Duration::from_millis(150 * ((rank + round) % world) as u64));
                let enter = now_ms();
                c.barrier().expect("barrier");
                println!("@@BARRIER {round} {enter} {}", now_ms());
            }
            println!("@@OK");
        }
        "fingerprint" => {
            c.check_fingerprint(0xfeed).expect("same fingerprints");
            let fp = if rank == 1 { 0xbad } else { 0xfeed };
            match c.check_fingerprint(fp) {
                Err(e @ CollectiveError::FingerprintMismatch { .. }) => println!("@@ERR {e}"),
                other => println!("@@FAIL {other:?}"),
            }
        }
        "mismatch" => {
            let mut v = vec![1.0f32; 10 + rank];
            match c.all_reduce_mean(&mut v) {
                Err(e @ CollectiveError::CallMismatch { .. }) => println!("@@ERR {e}"),
                other => println!("@@FAIL {other:?}"),
            }
        }
        "death" => {
            let mut v = vec![1.0f32; 1000];
            c.all_reduce_mean(&mut v).expect("first all-reduce");
            println!("@@READY");
            if rank == world - 1 {
                // Waits to be killed by the parent.
                thread::sleep(Duration::from_secs(600));
                return;
            }
            let start = Instant::now();
            let mut big = vec![1.0f32; 1 << 20];
            match c.all_reduce_mean(&mut big) {
                Err(e) => println!("@@ERR {} {e}", start.elapsed().as_millis()),
                Ok(()) => println!("@@FAIL all-reduce succeeded without rank {}", world - 1),
            }
        }
        "abort" => {
            let mut v = vec![1.0f32; 1 << 16];
            if rank == 0 {
                let h = c.abort_handle();
                let t = thread::spawn(move || {
                    thread::sleep(Duration::from_millis(300));
                    h.abort();
                });
                let start = Instant::now();
                let r = c.all_reduce_mean(&mut v);
                t.join().expect("join");
                match r {
                    Err(e @ CollectiveError::Aborted { .. }) => {
                        println!("@@ERR {} {e}", start.elapsed().as_millis())
                    }
                    other => println!("@@FAIL {other:?}"),
                }
            } else {
                // Arrives after rank 0 has aborted.
                thread::sleep(Duration::from_millis(1500));
                let start = Instant::now();
                match c.all_reduce_mean(&mut v) {
                    Err(e) => println!("@@ERR {} {e}", start.elapsed().as_millis()),
                    Ok(()) => println!("@@FAIL all-reduce succeeded after rank 0 aborted"),
                }
            }
        }
        "timeout" => {
            if rank == 1 {
                thread::sleep(Duration::from_secs(3));
                println!("@@OK");
                return;
            }
            let start = Instant::now();
            let mut v = vec![0.0f32; 8];
            match c.all_reduce_mean(&mut v) {
                Err(e @ CollectiveError::Timeout { .. }) => {
                    println!("@@ERR {} {e}", start.elapsed().as_millis())
                }
                other => println!("@@FAIL {other:?}"),
            }
        }
        other => panic!("unknown scenario {other}"),
    }
}

/// Entry point of the child processes; does nothing in a normal test run.
#[test]
fn child_process() {
    if let Ok(scenario) = std::env::var(CHILD_ENV) {
        run_child(&scenario);
    }
}

// ------------------------------------------------------------------ parent

struct Rank {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Rank {
    fn spawn(scenario: &str, rank: usize, world: usize, env: &[(&str, String)]) -> Self {
        let exe = std::env::current_exe().expect("current exe");
        let mut cmd = Command::new(exe);
        cmd.args([
            "--exact",
            "child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, scenario)
        .env("RANK", rank.to_string())
        .env("WORLD", world.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                // The harness may print "test child_process ... " first.
                if let Some(at) = line.find("@@") {
                    let _ = tx.send(line[at + 2..].to_string());
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next `@@` line, within `timeout`.
    fn next_line(&mut self, timeout: Duration) -> String {
        let line = self.lines.recv_timeout(timeout).unwrap_or_else(|e| {
            panic!(
                "no line from child after {timeout:?} ({e}); seen {:?}",
                self.seen
            )
        });
        self.seen.push(line.clone());
        line
    }

    /// Waits for the child to exit and returns all its remaining lines.
    fn finish(&mut self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait().expect("wait") {
                Some(status) => {
                    assert!(
                        status.success(),
                        "child failed: {status}; lines {:?}",
                        self.seen
                    );
                    break;
                }
                None if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    panic!(
                        "child still running after {timeout:?}; lines {:?}",
                        self.seen
                    );
                }
                None => thread::sleep(Duration::from_millis(10)),
            }
        }
        // The reader thread ends at EOF, closing the channel.
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        self.seen.clone()
    }
}

impl Drop for Rank {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a world of `world` child processes running `scenario`.
fn start_world(scenario: &str, world: usize, env: &[(&str, String)]) -> Vec<Rank> {
    let mut r0 = Rank::spawn(scenario, 0, world, env);
    let line = r0.next_line(Duration::from_secs(60));
    let token = line.strip_prefix("TOKEN ").expect("token line").to_string();
    let mut ranks = vec![r0];
    for r in 1..world {
        let mut env = env.to_vec();
        env.push(("TOKEN", token.clone()));
        ranks.push(Rank::spawn(scenario, r, world, &env));
    }
    ranks
}

fn finish_all(ranks: &mut [Rank]) -> Vec<Vec<String>> {
    ranks
        .iter_mut()
        .map(|r| r.finish(Duration::from_secs(120)))
        .collect()
}

fn hashes(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.starts_with("HASH"))
        .cloned()
        .collect()
}

/// The documented order: element i of segment c is
/// ((x_c + x_{c+1}) + ... + x_{c+n-1}) / n, ranks mod n.
fn documented_mean(len: usize, world: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let c = (0..world)
                .find(|&c| i < (c + 1) * len / world)
                .expect("segment");
            let mut acc = messy(c, i);
            for k in 1..world {
                acc += messy((c + k) % world, i);
            }
            acc / world as f32
        })
        .collect()
}

#[test]
fn all_reduce_exact_deterministic_and_identical_across_ranks() {
    for world in [2usize, 3] {
        let mut runs = Vec::new();
        for chunk in ["4096", "524288", "4096"] {
            let mut ranks = start_world("allreduce", world, &[("CHUNK_BYTES", chunk.to_string())]);
            let out = finish_all(&mut ranks);
            for lines in &out {
                assert!(lines.iter().any(|l| l == "OK"), "world {world}: {lines:?}");
                assert!(!lines.iter().any(|l| l.starts_with("FAIL")), "{lines:?}");
            }
            // Bitwise identical on every rank.
            let h0 = hashes(&out[0]);
            assert_eq!(h0.len(), LENGTHS.len());
            for lines in &out[1..] {
                assert_eq!(hashes(lines), h0, "world {world}: ranks disagree");
            }
            runs.push(h0);
        }
        // Identical across runs and chunk sizes, and equal to the documented order.
        assert_eq!(
            runs[0], runs[1],
            "world {world}: chunk size changed the bits"
        );
        assert_eq!(runs[0], runs[2], "world {world}: runs differ");
        let want: Vec<String> = LENGTHS
            .iter()
            .map(|&len| format!("HASH {len} {:016x}", fnv(&documented_mean(len, world))))
            .collect();
        assert_eq!(
            runs[0], want,
            "world {world}: not the documented summation order"
        );
    }
}

#[test]
fn broadcast_from_every_root() {
    for world in [2usize, 3] {
        let mut ranks = start_world("broadcast", world, &[("CHUNK_BYTES", "65536".into())]);
        for lines in finish_all(&mut ranks) {
            assert_eq!(lines.last().map(String::as_str), Some("OK"), "{lines:?}");
        }
    }
}

#[test]
fn barrier_waits_for_the_last_rank() {
    for world in [2usize, 3] {
        let mut ranks = start_world("barrier", world, &[]);
        let out = finish_all(&mut ranks);
        for round in 0..3 {
            let mut enters = Vec::new();
            let mut exits = Vec::new();
            for lines in &out {
                let l = lines
                    .iter()
                    .find(|l| l.starts_with(&format!("BARRIER {round} ")))
                    .expect("barrier line");
                let f: Vec<u128> = l
                    .split(' ')
                    .skip(2)
                    .map(|x| x.parse().expect("ms"))
                    .collect();
                enters.push(f[0]);
                exits.push(f[1]);
            }
            let last_enter = enters.iter().max().expect("ranks");
            let first_exit = exits.iter().min().expect("ranks");
            assert!(
                first_exit >= last_enter,
                "round {round}: left at {first_exit} before {last_enter}"
            );
            // The ranks really did arrive apart.
            assert!(last_enter - enters.iter().min().expect("ranks") >= 100);
        }
    }
}

#[test]
fn fingerprint_mismatch_names_the_ranks() {
    let mut ranks = start_world("fingerprint", 3, &[]);
    for lines in finish_all(&mut ranks) {
        let l = lines
            .iter()
            .find(|l| l.starts_with("ERR"))
            .unwrap_or_else(|| panic!("{lines:?}"));
        assert!(l.contains("0x000000000000feed on ranks [0, 2]"), "{l}");
        assert!(l.contains("0x0000000000000bad on ranks [1]"), "{l}");
    }
}

#[test]
fn mismatched_calls_fail_instead_of_mixing_data() {
    let mut ranks = start_world("mismatch", 2, &[]);
    for lines in finish_all(&mut ranks) {
        let l = lines
            .iter()
            .find(|l| l.starts_with("ERR"))
            .unwrap_or_else(|| panic!("{lines:?}"));
        assert!(l.contains("call mismatch"), "{l}");
        assert!(
            l.contains("10 elements") && l.contains("11 elements"),
            "{l}"
        );
    }
}

/// Parses "ERR <elapsed ms> <message>".
fn err_line(lines: &[String]) -> (u128, String) {
    let l = lines
        .iter()
        .find(|l| l.starts_with("ERR "))
        .unwrap_or_else(|| panic!("no error reported: {lines:?}"));
    let mut parts = l.splitn(3, ' ').skip(1);
    let ms = parts.next().and_then(|s| s.parse().ok()).expect("elapsed");
    (ms, parts.next().unwrap_or_default().to_string())
}

#[test]
fn killed_peer_fails_the_others_promptly() {
    for world in [2usize, 3] {
        // The op timeout is 60 s: only connection loss can explain a fast error.
        let mut ranks = start_world("death", world, &[]);
        for r in ranks.iter_mut() {
            assert_eq!(r.next_line(Duration::from_secs(60)), "READY");
        }
        thread::sleep(Duration::from_millis(300));
        let victim = ranks.last_mut().expect("ranks");
        victim.child.kill().expect("kill");
        let _ = victim.child.wait();
        let survivors = ranks.len() - 1;
        for r in ranks.iter_mut().take(survivors) {
            let lines = r.finish(Duration::from_secs(20));
            let (ms, msg) = err_line(&lines);
            assert!(ms < 10_000, "took {ms} ms: {msg}");
            assert!(
                !msg.contains("no progress"),
                "failed by timeout, not by the closed peer: {msg}"
            );
        }
    }
}

#[test]
fn abort_on_one_rank_fails_the_others_promptly() {
    for world in [2usize, 3] {
        let mut ranks = start_world("abort", world, &[]);
        let out = finish_all(&mut ranks);
        let (ms, msg) = err_line(&out[0]);
        assert!(msg.contains("aborted"), "{msg}");
        assert!((250..5_000).contains(&ms), "abort took {ms} ms");
        for lines in &out[1..] {
            let (ms, msg) = err_line(lines);
            assert!(ms < 5_000, "took {ms} ms: {msg}");
        }
    }
}

#[test]
fn silent_peer_times_out() {
    let mut ranks = start_world("timeout", 2, &[("OP_TIMEOUT_MS", "500".into())]);
    let out = finish_all(&mut ranks);
    let (ms, msg) = err_line(&out[0]);
    assert!(msg.contains("no progress with rank 1"), "{msg}");
    assert!((400..2_500).contains(&ms), "timed out after {ms} ms");
}
