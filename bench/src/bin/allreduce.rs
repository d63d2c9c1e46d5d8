//! All-reduce bandwidth of twinhead's CPU ring engine between processes on
//! loopback, for comparison with torch.distributed's gloo
//! (`bench/allreduce_gloo.py`, same sizes, same timing rule); driven by
//! `bench/allreduce.sh`.
//!
//! ```text
//! allreduce [--world N] [--sizes-mb 1,4,16,64,256] [--chunk-kb K] [--sockbuf-kb K]
//! ```
//!
//! This process is rank 0; it starts ranks 1..N as children of itself
//! (rendezvous token passed in the environment, as the coordinator would).
//! For each size: 2 warm-up calls, then `iters` timed calls, each preceded
//! by a barrier; the median time gives algbw = bytes / t and the bus
//! bandwidth busbw = algbw · 2(N−1)/N (the NCCL-tests convention). Output:
//! CSV lines `engine,bytes,iters,median_s,algbw_gbps,busbw_gbps` (GB = 1e9 B).

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use twinhead_worker::collective::{Collective, CpuRingEngine, RingConfig};

const RANK_ENV: &str = "TWINHEAD_BENCH_RANK";
const TOKEN_ENV: &str = "TWINHEAD_BENCH_TOKEN";

struct Args {
    world: usize,
    sizes_mb: Vec<usize>,
    chunk_kb: Option<usize>,
    sockbuf_kb: Option<usize>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        world: 2,
        sizes_mb: vec![1, 4, 16, 64, 256],
        chunk_kb: None,
        sockbuf_kb: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--world" => args.world = value()?.parse().context("--world")?,
            "--sizes-mb" => {
                args.sizes_mb = value()?
                    .split(',')
                    .map(|s| s.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--sizes-mb")?
            }
            "--chunk-kb" => args.chunk_kb = Some(value()?.parse().context("--chunk-kb")?),
            "--sockbuf-kb" => args.sockbuf_kb = Some(value()?.parse().context("--sockbuf-kb")?),
            other => bail!("unknown argument {other}"),
        }
    }
    if args.world < 2 {
        bail!("--world must be at least 2");
    }
    Ok(args)
}

/// Timed calls per size: about 2 GB of buffer per size, 5 to 50 calls.
fn iterations(bytes: usize) -> usize {
    (2_000_000_000 / bytes.max(1)).clamp(5, 50)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        bail!("odd-length hex token");
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).context("hex token"))
        .collect()
}

fn config(args: &Args) -> RingConfig {
    let mut cfg = RingConfig {
        op_timeout: Duration::from_secs(120),
        connect_timeout: Duration::from_secs(60),
        ..RingConfig::default()
    };
    if let Some(kb) = args.chunk_kb {
        cfg.chunk_bytes = kb * 1024;
    }
    if let Some(kb) = args.sockbuf_kb {
        cfg.socket_buffer_bytes = Some(kb * 1024);
    }
    cfg
}

fn run(engine: &mut CpuRingEngine, args: &Args) -> Result<()> {
    let world = engine.world_size();
    let chunk = config(args).chunk_bytes;
    for &mb in &args.sizes_mb {
        let bytes = mb * 1024 * 1024;
        let len = bytes / 4;
        let mut buf: Vec<f32> = (0..len).map(|i| (i % 1000) as f32).collect();
        for _ in 0..2 {
            engine.all_reduce_mean(&mut buf)?;
        }
        let iters = iterations(bytes);
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            engine.barrier()?;
            let t = Instant::now();
            engine.all_reduce_mean(&mut buf)?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let median = times[times.len() / 2];
        let algbw = bytes as f64 / median / 1e9;
        let busbw = algbw * 2.0 * (world - 1) as f64 / world as f64;
        if engine.rank() == 0 {
            println!(
                "twinhead-ring(chunk={}KiB),{bytes},{iters},{median:.6},{algbw:.3},{busbw:.3}",
                chunk / 1024
            );
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let cfg = config(&args);
    if let Ok(rank) = std::env::var(RANK_ENV) {
        let rank: usize = rank.parse().context(RANK_ENV)?;
        let token = unhex(&std::env::var(TOKEN_ENV).context(TOKEN_ENV)?)?;
        let mut engine = CpuRingEngine::connect(&token, rank, args.world, cfg)?;
        return run(&mut engine, &args);
    }

    let host = CpuRingEngine::host(args.world, cfg)?;
    let exe = std::env::current_exe()?;
    let mut children: Vec<Child> = Vec::new();
    for rank in 1..args.world {
        children.push(
            Command::new(&exe)
                .args(std::env::args().skip(1))
                .env(RANK_ENV, rank.to_string())
                .env(TOKEN_ENV, hex(host.token()))
                .spawn()
                .context("start a rank")?,
        );
    }
    let result = host
        .accept()
        .map_err(anyhow::Error::from)
        .and_then(|mut e| run(&mut e, &args));
    if result.is_err() {
        for c in &mut children {
            let _ = c.kill();
        }
    }
    for mut c in children {
        let status = c.wait()?;
        if !status.success() && result.is_ok() {
            bail!("a rank failed: {status}");
        }
    }
    result
}
