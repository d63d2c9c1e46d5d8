//! The loader reading a phase from S3 against the local filesystem, in one
//! run: rows/s and bytes fetched per row.
//!
//! Writes a phase of `--rows` rows of `--seq` tokens (vocabulary 50,368,
//! Zipf-like token frequencies, documents of random lengths) as the shards
//! dataprep writes (1,024 rows per shard, 256 per row group, zstd), puts
//! them through an in-process S3 server (`s3s-fs`, loopback, signed
//! requests), then alternates a child process reading every row from
//! `file://` and from `s3://`, `--rounds` times each, the way the training
//! loader's prefetch thread reads: `--batch` rows at a time, in order,
//! with that order given to the reader as its plan so it keeps
//! `--in-flight` reads ahead (`ReadAhead::requests`; 0: none, each row
//! group's read waited for).
//!
//!     cargo build --release -p twinhead-bench --bin loader && target/release/loader \
//!         [--rows 32768] [--seq 1024] [--batch 8] [--rounds 3] [--in-flight 4] \
//!         [--server-nagle] [--server-small-reads] [--reader-cpus LIST] [--out OUT.jsonl]
//!
//! On a small machine the server and the reader share the cores, so the
//! server's CPU time counts against the S3 read; to give each its own,
//! start the bench (the server) on one core and the readers on another:
//! `taskset -c 1 target/release/loader --reader-cpus 0`.
//!
//! The server's sockets set TCP_NODELAY, as S3 and MinIO do; with
//! `--server-nagle` they do not, and each response's last segment waits
//! for the client's delayed ACK (about 40 ms per request on Linux).
//! GetObject bodies leave in one piece, as S3 and MinIO send large
//! buffers ([`WholeBodies`]); `--server-small-reads` streams them as
//! s3s-fs does, in 4 KiB reads.
//!
//! Prints one JSON line per read (with the reader's CPU time and the
//! server's, which is this process's meanwhile) and a summary line with
//! the S3/local ratio of rows/s (target ≥ 0.9) and the bytes fetched per
//! row.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use twinhead_data::formats::{Row, write_rows};
use twinhead_worker::loader::{PhaseReader, ReadAhead, ReaderOptions};

const VOCAB: u32 = 50_368;
const ROWS_PER_SHARD: usize = 1024;
const ROWS_PER_GROUP: usize = 256;
const PHASE: &str = "bench";
const BUCKET: &str = "data";
const ACCESS_KEY: &str = "bench";
const SECRET_KEY: &str = "bench-secret";

struct Args {
    rows: usize,
    seq: usize,
    batch: u64,
    rounds: usize,
    /// Reads the reader keeps ahead (`ReadAhead::requests`).
    in_flight: usize,
    /// Leave Nagle's algorithm on on the server's sockets.
    server_nagle: bool,
    /// Stream GetObject bodies in s3s-fs's 4 KiB reads.
    server_small_reads: bool,
    /// CPUs (a `taskset` list) the reading children run on.
    reader_cpus: Option<String>,
    out: Option<PathBuf>,
    /// Child mode: read every row of the dataset at this URL.
    read: Option<String>,
    /// Child mode: put every file of a folder under a URL.
    upload: Option<(PathBuf, String)>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        rows: 32_768,
        seq: 1024,
        batch: 8,
        rounds: 3,
        in_flight: ReadAhead::default().requests,
        server_nagle: false,
        server_small_reads: false,
        reader_cpus: None,
        out: None,
        read: None,
        upload: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--rows" => args.rows = value()?.parse().context("--rows")?,
            "--seq" => args.seq = value()?.parse().context("--seq")?,
            "--batch" => args.batch = value()?.parse().context("--batch")?,
            "--rounds" => args.rounds = value()?.parse().context("--rounds")?,
            "--in-flight" => args.in_flight = value()?.parse().context("--in-flight")?,
            "--server-nagle" => args.server_nagle = true,
            "--server-small-reads" => args.server_small_reads = true,
            "--reader-cpus" => args.reader_cpus = Some(value()?),
            "--out" => args.out = Some(PathBuf::from(value()?)),
            "--read" => args.read = Some(value()?),
            "--upload" => {
                let dir = PathBuf::from(value()?);
                args.upload = Some((dir, value()?));
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    if args.rows == 0 || args.seq == 0 || args.batch == 0 {
        bail!("--rows, --seq and --batch must be positive");
    }
    Ok(args)
}

/// One row: documents of 64..2048 tokens, token ids log-uniform over the
/// vocabulary (frequency ∝ 1/rank, as in text).
fn row(rng: &mut ChaCha8Rng, seq: usize, first_key: &mut u64) -> Row {
    let mut doc_lens = Vec::new();
    let mut left = seq;
    while left > 0 {
        let len = rng.random_range(64..=2048).min(left);
        doc_lens.push(len as u32);
        left -= len;
    }
    let ln_vocab = f64::from(VOCAB).ln();
    let input_ids = (0..seq)
        .map(|_| ((rng.random::<f64>() * ln_vocab).exp() as u32).clamp(1, VOCAB - 1))
        .collect();
    let docs = doc_lens.len();
    let doc_keys = (0..docs as u64).map(|i| *first_key + i).collect();
    *first_key += docs as u64;
    Row {
        input_ids,
        doc_lens,
        source: vec![0; docs],
        doc_keys,
    }
}

/// Writes the phase's shards and manifest under `dir`; returns the bytes
/// written.
fn write_dataset(dir: &Path, rows: usize, seq: usize) -> anyhow::Result<u64> {
    let phase_dir = dir.join("phases").join(PHASE);
    std::fs::create_dir_all(&phase_dir)?;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut key = 0u64;
    let mut shards = Vec::new();
    let mut bytes = 0u64;
    let mut written = 0usize;
    while written < rows {
        let n = ROWS_PER_SHARD.min(rows - written);
        let batch: Vec<Row> = (0..n).map(|_| row(&mut rng, seq, &mut key)).collect();
        let rel = format!("phases/{PHASE}/shard-{:05}.parquet", shards.len());
        let encoded = write_rows(&rel, &batch, ROWS_PER_GROUP)?;
        bytes += encoded.len() as u64;
        let sha256 = sha256_hex(&encoded);
        std::fs::write(dir.join(&rel), &encoded)?;
        shards.push(json!({ "path": rel, "rows": n, "sha256": sha256 }));
        written += n;
    }
    let manifest = json!({
        "format_version": 1,
        "program": "twinhead-bench loader",
        "name": "loader-bench",
        "phases": [{
            "name": PHASE,
            "seq_len": seq,
            "sequences": rows,
            "tokens": rows * seq,
            "shards": shards,
        }],
    });
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    Ok(bytes)
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// CPU seconds (user + system) this process has used so far, from
/// `/proc/self/stat` (clock ticks of 1/100 s); 0 where there is none.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): state is
    // field 3, utime and stime fields 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(user), Some(system)) => (user + system) / 100.0,
        _ => 0.0,
    }
}

/// Child mode: every row of the phase at `url`, `batch` rows per read,
/// `in_flight` reads ahead.
fn read_all(url: &str, batch: u64, in_flight: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let options = ReaderOptions {
        read_ahead: ReadAhead {
            requests: in_flight,
            ..ReadAhead::default()
        },
        ..ReaderOptions::default()
    };
    let mut reader = PhaseReader::open(url, PHASE, phase_seq(url)?, options)?;
    let total = reader.sequences();
    let reads = move |first: u64| first..(first + batch).min(total);
    reader.plan_reads((0..total).step_by(batch as usize).map(reads));
    let mut tokens = 0u64;
    // Each row's token sum, folded in row order, so the parent can check
    // that both stores gave the same rows (a sum, which vectorizes, keeps
    // the check's cost small next to decoding the rows).
    let mut fold = 0u64;
    let mut first = 0;
    while first < total {
        let micro = reader.read_rows(reads(first))?;
        for row in &micro.input_ids {
            tokens += row.len() as u64;
            let sum = row.iter().map(|&id| u64::from(id)).sum::<u64>();
            fold = (fold.rotate_left(5) ^ sum).wrapping_mul(0x0100_0000_01B3);
        }
        first = micro.rows.end;
    }
    let seconds = started.elapsed().as_secs_f64();
    let stats = reader.stats();
    println!(
        "{}",
        json!({
            "rows": total,
            "tokens": tokens,
            "token_fold": fold,
            "seconds": seconds,
            "reader_cpu_s": cpu_seconds(),
            "bytes_fetched": stats.bytes_fetched,
            "groups_decoded": stats.groups_decoded,
            "shards_opened": stats.shards_opened,
            "group_reads": stats.group_reads,
            "groups_read_ahead": stats.groups_read_ahead,
            "peak_reads_ahead": stats.peak_reads_ahead,
            "read_seconds": stats.read_micros as f64 / 1e6,
        })
    );
    Ok(())
}

/// The phase's `seq_len` from the manifest (the reader checks it).
fn phase_seq(url: &str) -> anyhow::Result<u32> {
    let root = twinhead_data::store::Location::open(url, false)?;
    let manifest = twinhead_data::manifest::Manifest::parse(
        &root.name("manifest.json"),
        &root.get("manifest.json")?,
    )?;
    Ok(manifest.phase(url, PHASE)?.seq_len)
}

/// s3s-fs with GetObject bodies read in one piece: s3s-fs streams a file
/// in 4 KiB reads through tokio's blocking pool, so a 1.7 MB row-group
/// read leaves as about 400 writes of 4 KiB (about 5.5 ms of the server's
/// CPU per MB, and as many small segments for the reader to receive),
/// where S3 and MinIO send large buffers. Everything else, headers and
/// checks included, is s3s-fs's own.
struct WholeBodies {
    fs: s3s_fs::FileSystem,
    root: PathBuf,
}

/// Bytes `range` of the file at `path` (all of it without one), read with
/// one positioned read.
fn read_range(path: &Path, range: Option<s3s::dto::Range>) -> s3s::S3Result<bytes::Bytes> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).map_err(|e| s3s::s3_error!(e, NoSuchKey))?;
    let size = file
        .metadata()
        .map_err(|e| s3s::s3_error!(e, InternalError))?
        .len();
    let range = match range {
        Some(r) => r.check(size).map_err(|_| s3s::s3_error!(InvalidRange))?,
        None => 0..size,
    };
    let len =
        usize::try_from(range.end - range.start).map_err(|e| s3s::s3_error!(e, InternalError))?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, range.start)
        .map_err(|e| s3s::s3_error!(e, InternalError))?;
    Ok(buf.into())
}

#[async_trait::async_trait]
impl s3s::S3 for WholeBodies {
    async fn get_object(
        &self,
        req: s3s::S3Request<s3s::dto::GetObjectInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::GetObjectOutput>> {
        let path = self.root.join(&req.input.bucket).join(&req.input.key);
        let range = req.input.range;
        // s3s-fs answers first (its checks, headers and errors); only the
        // body it would stream is replaced.
        let mut response = self.fs.get_object(req).await?;
        let bytes = tokio::task::spawn_blocking(move || read_range(&path, range))
            .await
            .map_err(|e| s3s::s3_error!(e, InternalError))??;
        response.output.body = Some(s3s::Body::from(bytes).into());
        Ok(response)
    }

    async fn put_object(
        &self,
        req: s3s::S3Request<s3s::dto::PutObjectInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::PutObjectOutput>> {
        self.fs.put_object(req).await
    }

    async fn head_object(
        &self,
        req: s3s::S3Request<s3s::dto::HeadObjectInput>,
    ) -> s3s::S3Result<s3s::S3Response<s3s::dto::HeadObjectOutput>> {
        self.fs.head_object(req).await
    }
}

/// An S3 server on loopback serving `root` (bucket `data` is
/// `root/data`), on a runtime of its own. Objects are put through it (not
/// copied in): s3s-fs keeps their checksums then, instead of hashing the
/// whole file on every ranged GET. With `small_reads`, GetObject bodies
/// stream as s3s-fs sends them (4 KiB reads) instead of [`WholeBodies`].
fn serve_s3(
    root: &Path,
    nagle: bool,
    small_reads: bool,
) -> anyhow::Result<(std::net::SocketAddr, tokio::runtime::Runtime)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let fs = s3s_fs::FileSystem::new(root).map_err(|e| anyhow::anyhow!("s3s-fs: {e:?}"))?;
    let root = root.to_path_buf();
    runtime.spawn(async move {
        let mut builder = if small_reads {
            s3s::service::S3ServiceBuilder::new(fs)
        } else {
            s3s::service::S3ServiceBuilder::new(WholeBodies { fs, root })
        };
        builder.set_auth(s3s::auth::SimpleAuth::from_single(
            ACCESS_KEY,
            SECRET_KEY.to_string(),
        ));
        let service = builder.build();
        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
            return;
        };
        let http =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        while let Ok((socket, _)) = listener.accept().await {
            if !nagle {
                let _ = socket.set_nodelay(true);
            }
            let conn = http
                .serve_connection(hyper_util::rt::TokioIo::new(socket), service.clone())
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    });
    Ok((addr, runtime))
}

/// Child mode: every file under `dir` put at `url`/its relative path, as a
/// dataset build to `s3://` writes it.
fn upload(dir: &Path, url: &str) -> anyhow::Result<()> {
    let target = twinhead_data::store::Location::open(url, false)?;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir)?.to_string_lossy().replace('\\', "/");
                target.put(&rel, std::fs::read(&path)?)?;
            }
        }
    }
    Ok(())
}

/// Runs this program as a child with the S3 server's variables, on
/// `cpus` (a `taskset` list) when given.
fn child(
    me: &Path,
    addr: std::net::SocketAddr,
    args: &[&str],
    cpus: Option<&str>,
) -> anyhow::Result<Vec<u8>> {
    let mut command = match cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpus]).arg(me);
            c
        }
        None => Command::new(me),
    };
    let output = command
        .args(args)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ENDPOINT", format!("http://{addr}"))
        .env("AWS_ALLOW_HTTP", "true")
        .output()?;
    if !output.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output.stdout)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if let Some(url) = &args.read {
        // The allocator settings of a worker process, whose loader this is
        // (without them glibc returns the reader's freed buffers to the
        // system and faults them back in, and local reads swing 2x).
        twinhead_worker::host_memory::keep_freed_memory();
        return read_all(url, args.batch, args.in_flight);
    }
    if let Some((dir, url)) = &args.upload {
        return upload(dir, url);
    }
    let root = tempfile::tempdir()?;
    let dataset = root.path().join("local").join("ds");
    let bytes = write_dataset(&dataset, args.rows, args.seq)?;
    let s3_root = root.path().join("s3");
    std::fs::create_dir_all(s3_root.join(BUCKET))?;
    eprintln!(
        "wrote {} rows of {} tokens: {:.1} MB of shards",
        args.rows,
        args.seq,
        bytes as f64 / 1e6
    );
    let (addr, _server) = serve_s3(&s3_root, args.server_nagle, args.server_small_reads)?;
    let me = std::env::current_exe()?;
    // Through the S3 API, as a dataset build to s3:// puts its files.
    let dataset_arg = dataset.display().to_string();
    let target = format!("s3://{BUCKET}/ds");
    child(&me, addr, &["--upload", &dataset_arg, &target], None)?;
    let sources = [
        ("local", format!("file://{}", dataset.display())),
        ("s3", format!("s3://{BUCKET}/ds")),
    ];
    let mut out = match &args.out {
        Some(path) => Some(std::fs::File::create(path)?),
        None => None,
    };
    let mut rows_per_s: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut bytes_per_row = [0f64; 2];
    let mut folds = [None, None];
    for round in 0..args.rounds {
        for (i, (name, url)) in sources.iter().enumerate() {
            let (batch, in_flight) = (args.batch.to_string(), args.in_flight.to_string());
            let server_cpu = cpu_seconds();
            let stdout = child(
                &me,
                addr,
                &["--read", url, "--batch", &batch, "--in-flight", &in_flight],
                args.reader_cpus.as_deref(),
            )?;
            let server_cpu = cpu_seconds() - server_cpu;
            let mut line: serde_json::Value = serde_json::from_slice(&stdout)?;
            let rows = line["rows"].as_f64().unwrap_or(0.0);
            let seconds = line["seconds"].as_f64().unwrap_or(f64::NAN);
            let fetched = line["bytes_fetched"].as_f64().unwrap_or(0.0);
            folds[i] = line["token_fold"].as_u64();
            if i == 1 && folds[0] != folds[1] {
                bail!("round {round}: the rows read from S3 differ from the local ones");
            }
            rows_per_s[i].push(rows / seconds);
            bytes_per_row[i] = fetched / rows.max(1.0);
            line["source"] = json!(name);
            line["server_cpu_s"] = json!(server_cpu);
            line["round"] = json!(round);
            line["rows_per_s"] = json!(rows / seconds);
            line["bytes_per_row"] = json!(bytes_per_row[i]);
            println!("{line}");
            if let Some(f) = out.as_mut() {
                use std::io::Write;
                writeln!(f, "{line}")?;
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (local, s3) = (median(&mut rows_per_s[0]), median(&mut rows_per_s[1]));
    println!(
        "{}",
        json!({
            "summary": true,
            "rows": args.rows,
            "seq": args.seq,
            "in_flight": args.in_flight,
            "reader_cpus": args.reader_cpus,
            "server_nagle": args.server_nagle,
            "server_small_reads": args.server_small_reads,
            "shard_bytes_per_row": bytes as f64 / args.rows as f64,
            "local_rows_per_s": local,
            "s3_rows_per_s": s3,
            "ratio": s3 / local,
            "local_bytes_per_row": bytes_per_row[0],
            "s3_bytes_per_row": bytes_per_row[1],
        })
    );
    Ok(())
}
