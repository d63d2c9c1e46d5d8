//! `twinhead model info|list`, `twinhead fill-mask` and `twinhead generate`:
//! model shapes from configs, and inference on a Hugging Face folder
//! (`config.json`, `model.safetensors`, `tokenizer.json`) on the CPU.
//!
//! Loading and running a model is CPU-bound, so it happens in
//! `spawn_blocking`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tokenizers::Tokenizer;
use twinhead_model::CpuBackend;
use twinhead_model::config::builtin_names;
use twinhead_model::hf;
use twinhead_model::infer::{self, GenerateConfig};
use twinhead_model::{Flavour, ModelConfig, ModernBert};

use crate::output::{human, table};

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Shape and parameter count of a built-in, a model TOML or an HF folder.
    Info {
        /// `ettin-150m`, `configs/models/x.toml` or a folder with config.json.
        name_or_file: String,
        #[arg(long)]
        json: bool,
    },
    /// The built-in model sizes and their parameter counts.
    List {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: ModelCommand) -> anyhow::Result<ExitCode> {
    match command {
        ModelCommand::Info { name_or_file, json } => info(&name_or_file, json),
        ModelCommand::List { json } => list(json),
    }
}

#[derive(Args)]
pub struct FillMaskArgs {
    /// Encoder folder: config.json, model.safetensors, tokenizer.json.
    pub(crate) model_dir: PathBuf,
    /// Text with one or more [MASK].
    pub(crate) text: String,
    /// Candidates per [MASK].
    #[arg(long, default_value_t = 5)]
    pub(crate) top_k: usize,
    /// Print a list of {token, token_id, probability} (one list per [MASK] when several).
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// Decoder folder: config.json, model.safetensors, tokenizer.json.
    pub(crate) model_dir: PathBuf,
    pub(crate) prompt: String,
    /// Tokens to add at most.
    #[arg(long, default_value_t = 32)]
    pub(crate) max_new_tokens: usize,
    /// 0 = greedy (deterministic); otherwise sample with this temperature.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub(crate) temperature: f32,
    /// Sample only among the K most likely tokens.
    #[arg(long)]
    pub(crate) top_k: Option<usize>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Keep going after the end-of-text token ([SEP]).
    #[arg(long)]
    pub(crate) ignore_eos: bool,
    /// Print {text, token_ids} with the new tokens' ids.
    #[arg(long)]
    pub(crate) json: bool,
}

/// The literal mask marker users type in fill-mask inputs.
const MASK: &str = "[MASK]";

/// A built-in name, a model TOML file, or a Hugging Face folder holding
/// `config.json`.
fn resolve_config(name_or_file: &str) -> anyhow::Result<(ModelConfig, Option<Flavour>)> {
    let path = Path::new(name_or_file);
    if path.is_dir() {
        let (config, flavour) =
            hf::read_config(path).map_err(|e| anyhow::anyhow!(twinhead_proto::error_chain(&e)))?;
        return Ok((config, Some(flavour)));
    }
    let config = ModelConfig::load(name_or_file)
        .map_err(|e| anyhow::anyhow!(twinhead_proto::error_chain(&e)))?;
    Ok((config, None))
}

fn global_layers(c: &ModelConfig) -> Vec<usize> {
    (0..c.num_layers)
        .filter(|&i| c.is_global_layer(i))
        .collect()
}

fn config_json(c: &ModelConfig, flavour: Option<Flavour>) -> Value {
    json!({
        "name": c.name,
        "flavour": flavour.map(flavour_name),
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "num_heads": c.num_heads,
        "head_dim": c.head_dim(),
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "global_layers": global_layers(c),
        "global_attn_every_n_layers": c.global_attn_every_n_layers,
        "local_attention": c.local_attention,
        "global_rope_theta": c.global_rope_theta,
        "local_rope_theta": c.local_rope_theta,
        "special_token_ids": {
            "pad": c.pad_token_id,
            "cls": c.cls_token_id,
            "sep": c.sep_token_id,
            "mask": c.mask_token_id,
            "unk": c.unk_token_id,
        },
        "parameters": c.num_params(),
    })
}

fn flavour_name(f: Flavour) -> &'static str {
    match f {
        Flavour::Encoder => "encoder",
        Flavour::Decoder => "decoder",
    }
}

fn layer_list(layers: &[usize]) -> String {
    layers
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

pub fn info(name_or_file: &str, json: bool) -> anyhow::Result<ExitCode> {
    let (c, flavour) = resolve_config(name_or_file)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&config_json(&c, flavour))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![vec!["name".to_string(), c.name.clone()]];
    if let Some(f) = flavour {
        rows.push(vec!["flavour".into(), flavour_name(f).into()]);
    }
    rows.extend([
        vec!["layers".into(), c.num_layers.to_string()],
        vec!["hidden".into(), c.hidden_size.to_string()],
        vec![
            "heads".into(),
            format!("{} (head dim {})", c.num_heads, c.head_dim()),
        ],
        vec!["intermediate".into(), c.intermediate_size.to_string()],
        vec!["vocab".into(), c.vocab_size.to_string()],
        vec![
            "max positions".into(),
            c.max_position_embeddings.to_string(),
        ],
        vec![
            "global layers".into(),
            format!(
                "{} (every {})",
                layer_list(&global_layers(&c)),
                c.global_attn_every_n_layers
            ),
        ],
        vec![
            "local window".into(),
            format!("{} ({} each side)", c.local_attention, c.half_window()),
        ],
        vec![
            "rope theta".into(),
            format!(
                "global {}, local {}",
                c.global_rope_theta, c.local_rope_theta
            ),
        ],
        vec![
            "special ids".into(),
            format!(
                "pad {}, cls {}, sep {}, mask {}{}",
                c.pad_token_id,
                c.cls_token_id,
                c.sep_token_id,
                c.mask_token_id,
                c.unk_token_id
                    .map(|u| format!(", unk {u}"))
                    .unwrap_or_default()
            ),
        ],
        vec![
            "parameters".into(),
            format!("{} ({})", human(c.num_params() as f64), c.num_params()),
        ],
    ]);
    print!("{}", table(&["key", "value"], &rows));
    Ok(ExitCode::SUCCESS)
}

pub fn list(json: bool) -> anyhow::Result<ExitCode> {
    let mut configs = Vec::new();
    for name in builtin_names() {
        configs.push(
            ModelConfig::builtin(name)
                .map_err(|e| anyhow::anyhow!(twinhead_proto::error_chain(&e)))?,
        );
    }
    if json {
        let list: Vec<Value> = configs.iter().map(|c| config_json(c, None)).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = configs
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.num_layers.to_string(),
                c.hidden_size.to_string(),
                c.num_heads.to_string(),
                c.intermediate_size.to_string(),
                c.vocab_size.to_string(),
                human(c.num_params() as f64),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &[
                "name",
                "layers",
                "hidden",
                "heads",
                "intermediate",
                "vocab",
                "parameters"
            ],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}

/// A model folder's weights and tokenizer, checked before any work.
pub(crate) struct Loaded {
    pub(crate) model: ModernBert<CpuBackend>,
    pub(crate) tokenizer: Tokenizer,
}

pub(crate) fn load(dir: &Path) -> anyhow::Result<Loaded> {
    if !dir.is_dir() {
        bail!("model folder {} not found", dir.display());
    }
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        bail!(
            "{} not found: a model folder needs tokenizer.json next to config.json",
            tok_path.display()
        );
    }
    let bytes = std::fs::read(&tok_path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", tok_path.display()))?;
    // The tokenizers library panics on some malformed tables; this names
    // the file instead.
    let tokenizer = twinhead_dataprep::tokenizer::parse_tokenizer(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tok_path.display()))?;
    let model = hf::load::<CpuBackend>(dir, &Default::default())
        .map_err(|e| anyhow::anyhow!(twinhead_proto::error_chain(&e)))?;
    let vocab = model.config().vocab_size;
    let tok_vocab = tokenizer.get_vocab_size(true);
    if tok_vocab > vocab {
        bail!(
            "{} has {tok_vocab} tokens but the model's vocab_size is {vocab}",
            tok_path.display()
        );
    }
    Ok(Loaded { model, tokenizer })
}

fn tok_err(e: tokenizers::Error) -> anyhow::Error {
    anyhow::anyhow!("tokenizer: {e}")
}

/// Token ids of `text` with the model's `[CLS]`/`[SEP]`, every literal
/// `[MASK]` becoming the mask id. When the tokenizer knows `[MASK]` as a
/// special token it splits the text itself (keeping its whitespace rules,
/// e.g. Ettin's `lstrip`); otherwise the text is split on the literal and
/// the pieces are encoded separately.
fn encode_masked(loaded: &Loaded, text: &str) -> anyhow::Result<Vec<u32>> {
    let c = loaded.model.config();
    let tok = &loaded.tokenizer;
    if let Some(id) = tok.token_to_id(MASK) {
        if id != c.mask_token_id {
            bail!(
                "tokenizer.json has {MASK} as id {id} but the model's mask_token_id is {}",
                c.mask_token_id
            );
        }
        let enc = tok.encode(text, true).map_err(tok_err)?;
        let mut ids = enc.get_ids().to_vec();
        if ids.first() != Some(&c.cls_token_id) {
            ids.insert(0, c.cls_token_id);
        }
        if ids.last() != Some(&c.sep_token_id) {
            ids.push(c.sep_token_id);
        }
        return Ok(ids);
    }
    let mut ids = vec![c.cls_token_id];
    for (i, piece) in text.split(MASK).enumerate() {
        if i > 0 {
            ids.push(c.mask_token_id);
        }
        if !piece.is_empty() {
            let enc = tok.encode(piece, false).map_err(tok_err)?;
            ids.extend_from_slice(enc.get_ids());
        }
    }
    ids.push(c.sep_token_id);
    Ok(ids)
}

/// A token as people read it: its decoded text, or the raw vocabulary
/// entry when it is a fragment of a multi-byte character.
fn token_text(tok: &Tokenizer, id: u32) -> String {
    match tok.decode(&[id], false) {
        Ok(s) if !s.is_empty() && !s.contains('\u{FFFD}') => s,
        _ => tok.id_to_token(id).unwrap_or_default(),
    }
}

pub async fn fill_mask(args: FillMaskArgs) -> anyhow::Result<ExitCode> {
    let FillMaskArgs {
        model_dir: dir,
        text,
        top_k,
        json,
    } = args;
    if top_k == 0 {
        bail!("--top-k must be at least 1");
    }
    if !text.contains(MASK) {
        bail!("the input has no {MASK}: write it where the model should fill in a word");
    }
    let rows = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Vec<Value>>> {
        let loaded = load(&dir)?;
        if loaded.model.flavour() != Flavour::Encoder {
            bail!(
                "{} holds a decoder; fill-mask needs an encoder (try `twinhead generate`)",
                dir.display()
            );
        }
        let ids = encode_masked(&loaded, &text)?;
        let max = loaded.model.config().max_position_embeddings;
        if ids.len() > max {
            bail!(
                "the input is {} tokens, the model takes at most {max}",
                ids.len()
            );
        }
        let predictions = infer::fill_mask(&loaded.model, &ids, top_k)
            .map_err(|e| anyhow::anyhow!(twinhead_proto::error_chain(&e)))?;
        Ok(predictions
            .iter()
            .map(|p| {
                p.candidates
                    .iter()
                    .map(|&(id, prob)| {
                        json!({
                            "token": token_text(&loaded.tokenizer, id).trim(),
                            "token_id": id,
                            "probability": prob,
                        })
                    })
                    .collect()
            })
            .collect())
    })
    .await
    .context("fill-mask task failed")??;
    if json {
        // One [MASK]: a flat list; several: a list per mask, in order.
        let value = if rows.len() == 1 {
            Value::Array(rows.into_iter().next().unwrap_or_default())
        } else {
            Value::Array(rows.into_iter().map(Value::Array).collect())
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    for (n, candidates) in rows.iter().enumerate() {
        if rows.len() > 1 {
            println!("{MASK} #{}", n + 1);
        }
        let table_rows: Vec<Vec<String>> = candidates
            .iter()
            .map(|c| {
                vec![
                    c["token"].as_str().unwrap_or_default().to_string(),
                    c["token_id"].to_string(),
                    format!("{:.4}", c["probability"].as_f64().unwrap_or_default()),
                ]
            })
            .collect();
        print!("{}", table(&["token", "id", "probability"], &table_rows));
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn generate(args: GenerateArgs) -> anyhow::Result<ExitCode> {
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        bail!(
            "--temperature must be 0 (greedy) or positive, got {}",
            args.temperature
        );
    }
    if args.top_k == Some(0) {
        bail!("--top-k must be at least 1");
    }
    let json_out = args.json;
    let prompt_text = args.prompt.clone();
    let (text, new_ids) =
        tokio::task::spawn_blocking(move || -> anyhow::Result<(String, Vec<u32>)> {
            let loaded = load(&args.model_dir)?;
            let c = loaded.model.config().clone();
            if loaded.model.flavour() != Flavour::Decoder {
                bail!(
                    "{} holds an encoder; generate needs a decoder (try `twinhead fill-mask`)",
                    args.model_dir.display()
                );
            }
            let enc = loaded
                .tokenizer
                .encode(args.prompt.as_str(), true)
                .map_err(tok_err)?;
            let mut prompt = enc.get_ids().to_vec();
            // A prompt continues: it must not end with the end-of-text token
            // that a BERT-style post-processor appends.
            if prompt.len() > 1 && prompt.last() == Some(&c.sep_token_id) {
                prompt.pop();
            }
            if prompt.is_empty() {
                prompt.push(c.cls_token_id);
            }
            let total = prompt.len() + args.max_new_tokens;
            if total > c.max_position_embeddings {
                bail!(
                    "prompt ({} tokens) plus --max-new-tokens {} exceeds the model's {} positions",
                    prompt.len(),
                    args.max_new_tokens,
                    c.max_position_embeddings
                );
            }
            if args.max_new_tokens == 0 {
                return Ok((String::new(), Vec::new()));
            }
            let cfg = GenerateConfig {
                max_new_tokens: args.max_new_tokens,
                temperature: args.temperature,
                top_k: args.top_k,
                seed: args.seed,
                stop_token: (!args.ignore_eos).then_some(c.sep_token_id),
            };
            let ids = infer::generate(&loaded.model, &prompt, &cfg)
                .map_err(|e| anyhow::anyhow!(twinhead_proto::error_chain(&e)))?;
            let text = loaded.tokenizer.decode(&ids, true).map_err(tok_err)?;
            Ok((text, ids))
        })
        .await
        .context("generate task failed")??;
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "text": text, "token_ids": new_ids }))?
        );
    } else {
        println!("{prompt_text}{text}");
    }
    Ok(ExitCode::SUCCESS)
}
