//! `twinhead export RUN --hf DIR`: a run's last committed checkpoint as a
//! Hugging Face folder (`config.json`, `model.safetensors`, `tokenizer.json`).
//! `twinhead import HF_DIR --out DIR`: an Ettin or ModernBERT folder (f32 or
//! bf16) checked against twinhead's architecture and written back in the
//! form twinhead exports (f32, Ettin key names), ready for `init_from`.

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
    export_checkpoint(spec, &url, out)
}

/// Writes the committed checkpoint at `url` of a run with `spec` to `out`
/// as a Hugging Face folder, with the dataset's tokenizer.
pub fn export_checkpoint(
    spec: &twinhead_proto::v1::RunSpec,
    url: &str,
    out: &Path,
) -> anyhow::Result<PathBuf> {
    let device = Default::default();
    let model = twinhead_worker::train::model_from_checkpoint::<twinhead_model::CpuBackend>(
        spec, url, &device,
    )?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    twinhead_model::hf::save(&model, out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    // The dataset's tokenizer travels with the model.
    let dataset = twinhead_data::store::Location::open(&spec.dataset, false)?;
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

/// Files copied as they are from an imported folder: the tokenizer and its
/// settings travel with the weights.
const TOKENIZER_FILES: [&str; 3] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// What [`import_folder`] did.
pub struct Imported {
    pub flavour: twinhead_model::Flavour,
    pub config: twinhead_model::ModelConfig,
    pub parameters: usize,
    pub copied: Vec<&'static str>,
}

/// Loads `src` (every tensor checked for name, shape and dtype), then
/// writes it to `out` and copies the tokenizer files.
pub fn import_folder(src: &Path, out: &Path) -> anyhow::Result<Imported> {
    use burn::module::Module;
    let (config, flavour) = twinhead_model::hf::read_config(src)
        .map_err(|e| anyhow::anyhow!(twinhead_proto::error_chain(&e)))?;
    let device = Default::default();
    let model = twinhead_model::hf::load::<twinhead_model::CpuBackend>(src, &device)
        .map_err(|e| anyhow::anyhow!(twinhead_proto::error_chain(&e)))?;
    if src.canonicalize().ok() == out.canonicalize().ok() {
        anyhow::bail!(
            "--out {} is the folder being imported; choose another",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    twinhead_model::hf::save(&model, out)
        .map_err(|e| anyhow::anyhow!(twinhead_proto::error_chain(&e)))
        .with_context(|| format!("cannot write {}", out.display()))?;
    let mut copied = Vec::new();
    for file in TOKENIZER_FILES {
        let from = src.join(file);
        if from.is_file() {
            std::fs::copy(&from, out.join(file))
                .with_context(|| format!("cannot copy {}", from.display()))?;
            copied.push(file);
        }
    }
    Ok(Imported {
        flavour,
        config,
        parameters: model.num_params(),
        copied,
    })
}

pub async fn import(src: &Path, out: &Path, json: bool) -> anyhow::Result<std::process::ExitCode> {
    let (from, to) = (src.to_path_buf(), out.to_path_buf());
    let imported = tokio::task::spawn_blocking(move || import_folder(&from, &to)).await??;
    let flavour = match imported.flavour {
        twinhead_model::Flavour::Encoder => "encoder",
        twinhead_model::Flavour::Decoder => "decoder",
    };
    let c = &imported.config;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "source": src.display().to_string(),
                "dir": out.display().to_string(),
                "flavour": flavour,
                "parameters": imported.parameters,
                "num_layers": c.num_layers,
                "hidden_size": c.hidden_size,
                "vocab_size": c.vocab_size,
                "copied": imported.copied,
            })
        );
    } else {
        println!(
            "imported {flavour} ({} parameters, {} layers, hidden {}, vocab {}) to {}",
            crate::output::human(imported.parameters as f64),
            c.num_layers,
            c.hidden_size,
            c.vocab_size,
            out.display()
        );
        if !imported.copied.contains(&"tokenizer.json") {
            println!(
                "note: {} has no tokenizer.json; add one before fill-mask or generate",
                src.display()
            );
        }
        println!(
            "start a run from it with: init_from = \"{}\"",
            out.display()
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}
