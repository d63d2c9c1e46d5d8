//! `twinhead export RUN --hf DIR`: a run's last committed checkpoint as a
//! Hugging Face folder (`config.json`, `model.safetensors`, `tokenizer.json`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use twinhead_proto::v1::{GetRunRequest, Run};

use crate::Connection;
use crate::client::run_client;

/// Writes `run`'s newest checkpoint (or `checkpoint`, a URL) to `out`.
pub fn export_run(run: &Run, checkpoint: Option<&str>, out: &Path) -> anyhow::Result<PathBuf> {
    let spec = run.spec.as_ref().context("the run has no spec")?;
    let url = match checkpoint {
        Some(url) => url.to_string(),
        None => run
            .checkpoints
            .last()
            .map(|c| c.url.clone())
            .with_context(|| format!("run {} has no committed checkpoint yet", run.id))?,
    };
    let device = Default::default();
    let model = twinhead_worker::train::model_from_checkpoint::<twinhead_worker::CpuBackend>(
        spec, &url, &device,
    )?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    twinhead_worker::hf::save(&model, out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    // The dataset's tokenizer travels with the model.
    let dataset = twinhead_worker::store::Location::open(&spec.dataset, false)?;
    let tokenizer = dataset
        .get("tokenizer.json")
        .with_context(|| format!("the dataset {} has no tokenizer.json", spec.dataset))?;
    let target = out.join("tokenizer.json");
    std::fs::write(&target, &tokenizer)
        .with_context(|| format!("cannot write {}", target.display()))?;
    Ok(out.to_path_buf())
}

pub async fn export(
    connection: &Connection,
    run_id: &str,
    checkpoint: Option<&str>,
    out: &Path,
    json: bool,
) -> anyhow::Result<std::process::ExitCode> {
    let mut client = run_client(connection).await?;
    let run = client
        .get_run(GetRunRequest {
            run_id: run_id.to_string(),
        })
        .await?
        .into_inner();
    let (run, checkpoint, out_dir) = (
        run.clone(),
        checkpoint.map(str::to_string),
        out.to_path_buf(),
    );
    let dir =
        tokio::task::spawn_blocking(move || export_run(&run, checkpoint.as_deref(), &out_dir))
            .await??;
    if json {
        println!(
            "{}",
            serde_json::json!({ "run_id": run_id, "dir": dir.display().to_string() })
        );
    } else {
        println!("exported {run_id} to {}", dir.display());
    }
    Ok(std::process::ExitCode::SUCCESS)
}
