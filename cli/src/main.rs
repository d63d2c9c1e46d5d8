//! `twinhead`: the one binary. Thin: parses arguments and hands off to the
//! crates that do the work, prints tables for people and JSON for scripts,
//! and turns every error into one line and a non-zero exit.

mod checkpoint_eval;
mod client;
mod compare;
mod dataprep;
mod dataset;
mod demo;
mod eval;
mod export;
mod model;
mod output;
mod plot;
mod raster;
mod runs;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "twinhead",
    version,
    about = "Train paired encoder and decoder transformers with the Ettin recipe"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the coordinator is and how to authenticate to it.
#[derive(Args, Clone)]
pub struct Connection {
    /// Coordinator URL.
    #[arg(
        long,
        env = "TWINHEAD_COORDINATOR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub coordinator: String,
    /// Bearer token sent with every call.
    #[arg(long, env = "TWINHEAD_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// File holding the bearer token (its first line), instead of --token.
    #[arg(long, env = "TWINHEAD_TOKEN_FILE", value_name = "FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// PEM file with the CA that signed the coordinator's certificate, for
    /// an https:// coordinator (default: the system's trusted roots).
    #[arg(long, env = "TWINHEAD_CA_CERT", value_name = "FILE", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate presented to a coordinator that requires one
    /// (workers and dataprep processes under --client-ca).
    #[arg(long, env = "TWINHEAD_CLIENT_CERT", value_name = "FILE", global = true)]
    pub client_cert: Option<PathBuf>,
    /// PEM key of --client-cert.
    #[arg(long, env = "TWINHEAD_CLIENT_KEY", value_name = "FILE", global = true)]
    pub client_key: Option<PathBuf>,
}

impl Connection {
    /// A connection to `url` with no token and no TLS settings.
    pub fn plain(url: &str) -> Connection {
        Connection {
            coordinator: url.to_string(),
            token: None,
            token_file: None,
            ca_cert: None,
            client_cert: None,
            client_key: None,
        }
    }

    /// The token from --token or --token-file.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        twinhead_proto::tls::token_from(
            self.token.as_deref(),
            self.token_file.as_deref(),
            (
                "--token (TWINHEAD_TOKEN)",
                "--token-file (TWINHEAD_TOKEN_FILE)",
            ),
        )
        .map_err(anyhow::Error::from)
    }

    pub fn tls(&self) -> twinhead_proto::tls::ClientTls {
        twinhead_proto::tls::ClientTls {
            ca_cert: self.ca_cert.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// The whole system on this machine in one command: sample dataset,
    /// coordinator, two workers, a tiny encoder and decoder through three
    /// phases, Hugging Face exports, and examples of both at work.
    Demo {
        /// Folder for everything the demo makes.
        #[arg(long, default_value = "twinhead-demo")]
        out: PathBuf,
        /// Threads for building the dataset.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Override a key of both training recipes, e.g. a smaller budget:
        /// --set phases[0].tokens=8K.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
    },
    /// Run the coordinator: the gRPC server that users and workers talk to.
    Coordinator(CoordinatorArgs),
    /// Run a worker: one per GPU (or CPU process); it trains what the
    /// coordinator assigns until stopped.
    Worker(WorkerArgs),
    /// Submit a run from a recipe file.
    Submit {
        /// Run recipe (e.g. configs/runs/ettin-encoder-17m.toml).
        file: PathBuf,
        /// Override any key of the recipe, e.g. --set world_size=2 --set phases[0].tokens=1M.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Check the recipe and print the resolved spec without submitting.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// List runs.
    Runs {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show one run: state, phases, attempts, checkpoints.
    Status {
        run: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Follow a run live until it ends (exit status 0 only if it completed).
    Watch {
        run: String,
        /// One JSON event per line instead of progress bars.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Write a run's last committed checkpoint as a Hugging Face folder
    /// (config.json, model.safetensors, tokenizer.json).
    Export {
        run: String,
        /// Output folder.
        #[arg(long)]
        hf: PathBuf,
        /// A checkpoint URL of the run instead of its last one.
        #[arg(long)]
        checkpoint: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Bring in a Hugging Face folder (Ettin or ModernBERT, f32 or bf16):
    /// every tensor is checked against twinhead's architecture, and the
    /// folder is written back as twinhead exports it, ready for `init_from`.
    Import {
        /// Folder with config.json and model.safetensors.
        hf: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Draw a run's loss curve (x: tokens, one colour per phase) as a PNG.
    Plot {
        run: String,
        /// PNG file to write.
        #[arg(long)]
        out: PathBuf,
        /// Image width in pixels.
        #[arg(long, default_value_t = 1000)]
        width: u32,
        /// Image height in pixels.
        #[arg(long, default_value_t = 600)]
        height: u32,
        /// Draw the run's task scores on its checkpoints (`[eval] tasks`,
        /// each task's primary metric) instead of the loss.
        #[arg(long)]
        eval: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Cancel a run; its workers are released.
    Cancel {
        run: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Run a dataprep process: it takes dataset-build tasks from the
    /// coordinator until stopped (run one per machine that should help).
    Dataprep(dataprep::DataprepArgs),
    /// Build, verify and summarize tokenized datasets.
    #[command(subcommand)]
    Dataset(dataset::DatasetCommand),
    /// Model shapes: built-in sizes, model TOML files, Hugging Face folders.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Top tokens for each [MASK] of a text, with an encoder folder.
    FillMask(model::FillMaskArgs),
    /// Continue a prompt with a decoder folder.
    Generate(model::GenerateArgs),
    /// Score a model folder (encoder or decoder) on downstream tasks from
    /// OLMo's request files: ARC, HellaSwag, PIQA, SciQ, … (accuracies).
    Eval(eval::EvalArgs),
    /// Model folders side by side on downstream tasks: rows tasks, columns
    /// models, the best of each row marked (the encoder-vs-decoder table).
    Compare(compare::CompareArgs),
}

/// The exit status of a worker that was asked to leave (SIGTERM, SIGUSR1)
/// and did: its world committed a checkpoint and the coordinator knows. It
/// is sysexits' EX_TEMPFAIL, "try again later": a scheduler may requeue it.
const EXIT_LEFT: u8 = 75;

/// `twinhead worker`: SIGTERM or SIGUSR1 finish the step, commit a
/// checkpoint and leave (exit 75); Ctrl-C stops at once (exit 0).
#[derive(Args)]
struct WorkerArgs {
    /// Device to train on: `cpu`, or `cuda:N` in a build with `--features cuda`
    /// (ranks of a GPU world all-reduce through NCCL).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Address the CPU collective listens on when this worker is rank 0.
    #[arg(long, default_value = "127.0.0.1")]
    bind_ip: std::net::IpAddr,
    /// Address other ranks use to reach this one (default: --bind-ip).
    #[arg(long)]
    advertise_ip: Option<std::net::IpAddr>,
    /// Exit once the run this worker trained has ended and nothing is left.
    #[arg(long)]
    exit_when_idle: bool,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Args)]
struct CoordinatorArgs {
    /// Address to listen on for gRPC.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Address for the HTTP port: the dashboard at /, JSON under /api, and
    /// Prometheus metrics at /metrics (off unless given).
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// SQLite database holding all durable state (created if missing).
    #[arg(long, default_value = "twinhead.db")]
    db: PathBuf,
    /// Token users must present (RunService).
    #[arg(long, env = "TWINHEAD_USER_TOKEN", hide_env_values = true)]
    user_token: Option<String>,
    /// File holding the user token (its first line), instead of --user-token.
    #[arg(long, env = "TWINHEAD_USER_TOKEN_FILE", value_name = "FILE")]
    user_token_file: Option<PathBuf>,
    /// Token workers must present (WorkerService).
    #[arg(long, env = "TWINHEAD_WORKER_TOKEN", hide_env_values = true)]
    worker_token: Option<String>,
    /// File holding the worker token, instead of --worker-token.
    #[arg(long, env = "TWINHEAD_WORKER_TOKEN_FILE", value_name = "FILE")]
    worker_token_file: Option<PathBuf>,
    /// PEM certificate (chain) to serve gRPC and the HTTP port over TLS.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA whose certificates workers and dataprep processes must
    /// present (mTLS); user commands keep bearer tokens. Needs --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// How often workers heartbeat, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    heartbeat_interval_ms: u64,
    /// Silence after which a worker is declared dead, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    lease_timeout_ms: u64,
}

/// A panic is a bug, but the user still gets one line, not a backtrace; a
/// closed stdout (`twinhead runs | head`) ends the program quietly.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        // A reader's panic that the code turns into an error is not a crash.
        if twinhead_data::caught::is_catching() {
            return;
        }
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        if message.contains("failed printing to stdout") {
            std::process::exit(141);
        }
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "error: internal error: {}{place}; please report it",
            message.replace('\n', " ")
        );
    }));
}

fn main() -> ExitCode {
    install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with success; usage errors exit 2.
            let _ = e.print();
            return ExitCode::from(e.exit_code().clamp(0, 255) as u8);
        }
    };
    // The demo narrates itself; the services it runs in-process stay quiet.
    let default_log = if matches!(cli.command, Command::Demo { .. }) {
        "warn"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TWINHEAD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if matches!(cli.command, Command::Worker(_) | Command::Demo { .. }) {
        twinhead_worker::host_memory::keep_freed_memory();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", output::one_line(&e));
            ExitCode::FAILURE
        }
    };
    // A worker giving up on a hung step leaves its thread behind: do not
    // wait for it.
    runtime.shutdown_timeout(Duration::from_secs(5));
    code
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Coordinator(args) => coordinator(args).await,
        Command::Demo {
            out,
            threads,
            overrides,
        } => demo::demo(&out, threads, &overrides).await,
        Command::Export {
            run,
            hf,
            checkpoint,
            json,
            connection,
        } => export::export(&connection, &run, checkpoint.as_deref(), &hf, json).await,
        Command::Import { hf, out, json } => export::import(&hf, &out, json).await,
        Command::Worker(args) => worker(args).await,
        Command::Submit {
            file,
            overrides,
            dry_run,
            json,
            connection,
        } => runs::submit(&connection, &file, &overrides, dry_run, json).await,
        Command::Runs { json, connection } => runs::list(&connection, json).await,
        Command::Status {
            run,
            json,
            connection,
        } => runs::status(&connection, &run, json).await,
        Command::Watch {
            run,
            json,
            connection,
        } => runs::watch(&connection, &run, json).await,
        Command::Cancel {
            run,
            reason,
            json,
            connection,
        } => runs::cancel(&connection, &run, &reason, json).await,
        Command::Dataprep(args) => dataprep::serve(args, shutdown_signal()).await,
        Command::Plot {
            run,
            out,
            width,
            height,
            eval,
            json,
            connection,
        } => {
            if eval {
                plot::plot_task_scores(&connection, &run, &out, (width, height), json).await
            } else {
                plot::plot(&connection, &run, &out, (width, height), json).await
            }
        }
        Command::Dataset(command) => dataset::run(command).await,
        Command::Model(command) => model::run(command),
        Command::FillMask(args) => model::fill_mask(args).await,
        Command::Generate(args) => model::generate(args).await,
        Command::Eval(args) => eval::eval(args).await,
        Command::Compare(args) => compare::compare(args).await,
    }
}

async fn coordinator(args: CoordinatorArgs) -> anyhow::Result<ExitCode> {
    if args.heartbeat_interval_ms == 0 || args.lease_timeout_ms <= args.heartbeat_interval_ms {
        anyhow::bail!(
            "--lease-timeout-ms ({}) must be longer than --heartbeat-interval-ms ({}), which must be positive",
            args.lease_timeout_ms,
            args.heartbeat_interval_ms
        );
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr().context("listener address")?;
    let http = match args.http {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("--http: cannot listen on {addr}"))?,
        ),
        None => None,
    };
    let http_address = http
        .as_ref()
        .map(|l| l.local_addr().context("http listener address"))
        .transpose()?;
    let user_token = twinhead_proto::tls::token_from(
        args.user_token.as_deref(),
        args.user_token_file.as_deref(),
        ("--user-token", "--user-token-file"),
    )?;
    let worker_token = twinhead_proto::tls::token_from(
        args.worker_token.as_deref(),
        args.worker_token_file.as_deref(),
        ("--worker-token", "--worker-token-file"),
    )?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            twinhead_coordinator::ServerTls::from_files(cert, key, args.client_ca.as_deref())
                .map_err(anyhow::Error::msg)?,
        ),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let config = twinhead_coordinator::ServerConfig {
        db: args.db.clone(),
        user_token,
        worker_token,
        tls,
        leases: twinhead_coordinator::LeaseSettings {
            heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms),
            lease_timeout: Duration::from_millis(args.lease_timeout_ms),
        },
    };
    // On stdout, so scripts that start it on port 0 can read the addresses:
    // gRPC on the first line, the HTTP port (if any) on the second.
    println!("twinhead coordinator listening on {scheme}://{address}");
    if let Some(http_address) = http_address {
        println!("twinhead dashboard and /metrics on {scheme}://{http_address}/");
        tracing::info!(%http_address, "http port listening");
    }
    tracing::info!(%address, db = %args.db.display(), "coordinator listening");
    twinhead_coordinator::serve_with_http(config, listener, http, shutdown_signal()).await?;
    tracing::info!("coordinator stopped");
    Ok(ExitCode::SUCCESS)
}

async fn worker(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let device =
        twinhead_worker::device::Device::parse(&args.device).map_err(anyhow::Error::msg)?;
    let ring = twinhead_worker::collective::RingConfig {
        bind_ip: args.bind_ip,
        advertise_ip: args.advertise_ip,
        ..Default::default()
    };
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let config = twinhead_worker::runtime::WorkerConfig {
        coordinator: args.connection.coordinator.clone(),
        token: args.connection.token()?,
        tls: args.connection.tls(),
        device: args.device.clone(),
        hostname,
        ring,
        exit_when_idle: args.exit_when_idle,
        abort_grace: Duration::from_secs(60),
    };
    let trainer: Box<dyn twinhead_worker::runtime::Trainer> = match device {
        twinhead_worker::device::Device::Cpu => Box::new(twinhead_worker::train::BurnTrainer::<
            twinhead_model::CpuAutodiff,
        >::new(Default::default())),
        #[cfg(feature = "cuda")]
        twinhead_worker::device::Device::Cuda(ordinal) => {
            twinhead_worker::device::check_cuda(ordinal).map_err(anyhow::Error::msg)?;
            Box::new(twinhead_worker::train::BurnTrainer::<
                twinhead_model::CudaAutodiff,
            >::new(burn::backend::cuda::CudaDevice::new(
                ordinal,
            )))
        }
        #[cfg(not(feature = "cuda"))]
        twinhead_worker::device::Device::Cuda(_) => {
            anyhow::bail!("this twinhead was built without CUDA")
        }
    };
    let trainer = Box::new(checkpoint_eval::ScoringTrainer::new(trainer));
    tracing::info!(coordinator = %config.coordinator, device = %config.device, "worker starting");
    let exit = twinhead_worker::runtime::run_worker(
        config,
        trainer,
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
        leave_signal(),
    )
    .await?;
    match exit {
        twinhead_worker::runtime::WorkerExit::Stopped => {
            tracing::info!("worker stopped");
            Ok(ExitCode::SUCCESS)
        }
        twinhead_worker::runtime::WorkerExit::Left => {
            tracing::info!(status = EXIT_LEFT, "worker left after checkpointing");
            Ok(ExitCode::from(EXIT_LEFT))
        }
    }
}

/// Resolves on SIGTERM (Slurm, Kubernetes, systemd stopping the worker) or
/// SIGUSR1 (Slurm's `--signal=B:USR1@SECONDS` warning before a time limit).
async fn leave_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut usr1)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::user_defined1()),
        ) else {
            tracing::warn!("cannot listen for SIGTERM and SIGUSR1; only Ctrl-C stops this worker");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = usr1.recv() => {},
        }
    }
    #[cfg(not(unix))]
    std::future::pending::<()>().await
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
