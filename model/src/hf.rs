//! Hugging Face folders in and out: `config.json` + `model.safetensors`.
//!
//! - Encoders are `ModernBertForMaskedLM` (`model_type: modernbert`): fused
//!   `attn.Wqkv`, head `head.dense` / `head.norm`.
//! - Decoders are `ModernBertDecoderForCausalLM` (`model_type:
//!   modernbert-decoder`): separate `attn.q_proj/k_proj/v_proj`, head
//!   `lm_head.dense` / `lm_head.norm`.
//! - Both: `decoder.weight` is tied to `model.embeddings.tok_embeddings`
//!   (optional on import, where it must equal the embeddings; not written
//!   on export, as transformers itself saves it) and `decoder.bias`.
//!
//! Import reads f32, bf16 or f16 tensors, converts to f32 and insists on
//! full coverage: a missing key, a key of the wrong shape, or a key left
//! unused is an error that names it. Export writes f32, safetensors
//! metadata `format = "pt"` (transformers refuses files without it) and a
//! `config.json` with explicit `layer_types` (some transformers versions
//! default the decoder's global layers to 2, 5, 8… instead of 0, 3, 6…).
//!
//! Config values not in HF's schema: `mask_token_id` is written as an
//! extra key; on import it defaults to `pad_token_id + 1` (the ModernBERT /
//! Ettin tokenizer's `[MASK]` follows `[PAD]`). The model name is the
//! folder's name.
//!
//! Decoder window: transformers' decoder lets a local layer see
//! `local_attention / 2` keys (itself and the previous `w − 1`), while
//! Ettin trained with one more (`i − w ..= i`) and twinhead keeps that. The
//! key `local_attention` is written unchanged, so a model exported here and
//! run by transformers differs slightly at positions beyond the window, as
//! Ettin's released decoders do.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use serde_json::json;

use crate::{ConfigError, Flavour, ModelConfig, ModernBert};
use twinhead_proto::v1::ModelSpec;

/// Errors from reading or writing an HF folder.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON of the expected shape.
    #[error("{path}: {message}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// The config describes a model twinhead cannot represent.
    #[error("{path}: key `{key}`: {message}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The offending key.
        key: String,
        /// Why.
        message: String,
    },
    /// The resulting model config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The safetensors file is malformed.
    #[error("{path}: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// A tensor the model needs is absent.
    #[error("missing tensor `{key}` (expected shape {expected:?})")]
    Missing {
        /// The key.
        key: String,
        /// Its expected shape.
        expected: Vec<usize>,
    },
    /// A tensor has the wrong shape.
    #[error("tensor `{key}` has shape {found:?}, expected {expected:?}")]
    Shape {
        /// The key.
        key: String,
        /// Its expected shape.
        expected: Vec<usize>,
        /// Its shape in the file.
        found: Vec<usize>,
    },
    /// A tensor has a dtype other than f32, bf16, f16.
    #[error("tensor `{key}` has dtype {dtype}, expected F32, BF16 or F16")]
    DType {
        /// The key.
        key: String,
        /// Its dtype.
        dtype: String,
    },
    /// Tensors in the file that the model does not use.
    #[error("unused tensors in checkpoint: {0:?}")]
    Unused(Vec<String>),
    /// `decoder.weight` is present and differs from the embeddings.
    #[error(
        "`decoder.weight` differs from `model.embeddings.tok_embeddings.weight`: untied output embeddings are not supported"
    )]
    Untied,
}

/// The fields of an HF ModernBERT / ModernBertDecoder `config.json` that
/// matter (unknown keys are ignored: HF configs carry many).
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: String,
    vocab_size: u32,
    hidden_size: u32,
    num_hidden_layers: u32,
    num_attention_heads: u32,
    intermediate_size: u32,
    #[serde(default = "d_max_pos")]
    max_position_embeddings: u32,
    #[serde(default = "d_local")]
    local_attention: u32,
    #[serde(default = "d_every")]
    global_attn_every_n_layers: u32,
    layer_types: Option<Vec<String>>,
    global_rope_theta: Option<f64>,
    local_rope_theta: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<HashMap<String, RopeParams>>,
    #[serde(default = "d_eps")]
    norm_eps: f64,
    #[serde(default = "d_init")]
    initializer_range: f64,
    #[serde(default)]
    attention_dropout: f64,
    #[serde(default)]
    embedding_dropout: f64,
    #[serde(default)]
    mlp_dropout: f64,
    pad_token_id: Option<u32>,
    cls_token_id: Option<u32>,
    sep_token_id: Option<u32>,
    mask_token_id: Option<u32>,
    /// Not in transformers' schema; twinhead writes it (see `config_json`).
    #[serde(default)]
    unk_token_id: Option<u32>,
    #[serde(default)]
    norm_bias: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default)]
    classifier_bias: bool,
    #[serde(default = "d_true")]
    decoder_bias: bool,
    #[serde(default = "d_true")]
    tie_word_embeddings: bool,
    #[serde(default = "d_gelu")]
    hidden_activation: String,
    #[serde(default = "d_gelu")]
    classifier_activation: String,
}

#[derive(Debug, Deserialize)]
struct RopeParams {
    rope_type: Option<String>,
    rope_theta: Option<f64>,
}

fn d_max_pos() -> u32 {
    8192
}
fn d_local() -> u32 {
    128
}
fn d_every() -> u32 {
    3
}
fn d_eps() -> f64 {
    1e-5
}
fn d_init() -> f64 {
    0.02
}
fn d_true() -> bool {
    true
}
fn d_gelu() -> String {
    "gelu".into()
}

const ENCODER_TYPE: &str = "modernbert";
const DECODER_TYPE: &str = "modernbert-decoder";

fn layer_type(config: &ModelConfig, i: usize) -> &'static str {
    if config.is_global_layer(i) {
        "full_attention"
    } else {
        "sliding_attention"
    }
}

fn layer_types(config: &ModelConfig) -> Vec<&'static str> {
    (0..config.num_layers)
        .map(|i| layer_type(config, i))
        .collect()
}

/// The `config.json` key of a `ModelSpec` field (most are spelled alike).
fn hf_key(spec_key: &str) -> &str {
    match spec_key {
        "num_layers" => "num_hidden_layers",
        "num_heads" => "num_attention_heads",
        other => other,
    }
}

/// Reads `dir/config.json` into a validated config and the flavour.
pub fn read_config(dir: &Path) -> Result<(ModelConfig, Flavour), HfError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| HfError::Io {
        path: path.clone(),
        source,
    })?;
    let mut de = serde_json::Deserializer::from_str(&text);
    let hf: HfConfig = serde_path_to_error::deserialize(&mut de).map_err(|e| HfError::Json {
        path: path.clone(),
        message: format!("key `{}`: {}", e.path(), e.inner()),
    })?;
    let unsupported = |key: &str, message: String| HfError::Unsupported {
        path: path.clone(),
        key: key.to_string(),
        message,
    };
    let flavour = match hf.model_type.as_str() {
        ENCODER_TYPE => Flavour::Encoder,
        DECODER_TYPE => Flavour::Decoder,
        other => {
            return Err(unsupported(
                "model_type",
                format!("`{other}`; expected `{ENCODER_TYPE}` or `{DECODER_TYPE}`"),
            ));
        }
    };
    for (key, value, wanted) in [
        ("norm_bias", hf.norm_bias, false),
        ("attention_bias", hf.attention_bias, false),
        ("mlp_bias", hf.mlp_bias, false),
        ("classifier_bias", hf.classifier_bias, false),
        ("decoder_bias", hf.decoder_bias, true),
        ("tie_word_embeddings", hf.tie_word_embeddings, true),
    ] {
        if value != wanted {
            return Err(unsupported(key, format!("only {wanted} is supported")));
        }
    }
    for (key, value) in [
        ("hidden_activation", &hf.hidden_activation),
        ("classifier_activation", &hf.classifier_activation),
    ] {
        if value != "gelu" {
            return Err(unsupported(
                key,
                format!("`{value}`; only exact `gelu` is supported"),
            ));
        }
    }
    // RoPE θ: v5 `rope_parameters` first, then the legacy keys, then the
    // defaults of transformers (160k global, 10k local).
    let from_params = |kind: &str| -> Result<Option<f64>, HfError> {
        let Some(p) = hf.rope_parameters.as_ref().and_then(|m| m.get(kind)) else {
            return Ok(None);
        };
        if let Some(t) = &p.rope_type
            && t != "default"
        {
            return Err(unsupported(
                &format!("rope_parameters.{kind}.rope_type"),
                format!("`{t}`; only `default` RoPE is supported"),
            ));
        }
        Ok(p.rope_theta)
    };
    let global_rope_theta = from_params("full_attention")?
        .or(hf.global_rope_theta)
        .or(hf.rope_theta)
        .unwrap_or(160_000.0);
    let local_rope_theta = from_params("sliding_attention")?
        .or(hf.local_rope_theta)
        .unwrap_or(10_000.0);
    let pad_token_id = hf.pad_token_id.unwrap_or(50283);
    let spec = ModelSpec {
        name: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "hf".into()),
        vocab_size: hf.vocab_size,
        hidden_size: hf.hidden_size,
        num_layers: hf.num_hidden_layers,
        num_heads: hf.num_attention_heads,
        intermediate_size: hf.intermediate_size,
        max_position_embeddings: hf.max_position_embeddings,
        local_attention: hf.local_attention,
        global_attn_every_n_layers: hf.global_attn_every_n_layers,
        global_rope_theta,
        local_rope_theta,
        norm_eps: hf.norm_eps,
        initializer_range: hf.initializer_range,
        attention_dropout: hf.attention_dropout,
        embedding_dropout: hf.embedding_dropout,
        mlp_dropout: hf.mlp_dropout,
        pad_token_id,
        cls_token_id: hf.cls_token_id.unwrap_or(50281),
        sep_token_id: hf.sep_token_id.unwrap_or(50282),
        // Saturating: a pad_token_id of u32::MAX is refused by validation.
        mask_token_id: hf.mask_token_id.unwrap_or(pad_token_id.saturating_add(1)),
        unk_token_id: hf.unk_token_id,
    };
    let config =
        ModelConfig::from_spec_in(&spec, &path.display().to_string()).map_err(|e| match e {
            // Name the key as config.json spells it.
            ConfigError::Invalid { file, key, message } => ConfigError::Invalid {
                file,
                key: hf_key(&key).to_string(),
                message,
            },
            other => other,
        })?;
    if let Some(types) = &hf.layer_types {
        // Compared entry by entry: `num_hidden_layers` comes from the file
        // and may be huge, so the expected list is never built whole.
        let every = config.global_attn_every_n_layers;
        if types.len() != config.num_layers {
            return Err(unsupported(
                "layer_types",
                format!(
                    "has {} entries, num_hidden_layers is {}",
                    types.len(),
                    config.num_layers
                ),
            ));
        }
        if let Some((i, found)) = types
            .iter()
            .enumerate()
            .find(|(i, t)| t.as_str() != layer_type(&config, *i))
        {
            return Err(unsupported(
                "layer_types",
                format!(
                    "entry {i} is {found:?}, expected {:?}: twinhead's layers are global every {every} layers from layer 0",
                    layer_type(&config, i)
                ),
            ));
        }
    }
    Ok((config, flavour))
}

/// Tensors of a safetensors file, converted to f32, by key.
struct Tensors {
    map: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Tensors {
    fn read(path: &Path) -> Result<Self, HfError> {
        let bytes = std::fs::read(path).map_err(|source| HfError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| HfError::Safetensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let mut map = BTreeMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            let values: Vec<f32> = match view.dtype() {
                Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                other => {
                    return Err(HfError::DType {
                        key: name,
                        dtype: format!("{other:?}"),
                    });
                }
            };
            map.insert(name, (view.shape().to_vec(), values));
        }
        Ok(Self { map })
    }

    /// Removes and returns `key`, checking its shape.
    fn take(&mut self, key: &str, expected: &[usize]) -> Result<Vec<f32>, HfError> {
        let (shape, values) = self.map.remove(key).ok_or_else(|| HfError::Missing {
            key: key.to_string(),
            expected: expected.to_vec(),
        })?;
        if shape != expected {
            return Err(HfError::Shape {
                key: key.to_string(),
                expected: expected.to_vec(),
                found: shape,
            });
        }
        Ok(values)
    }
}

impl Tensors {
    /// Checks `key` is present with shape `expected` (without taking it).
    fn check(&self, key: &str, expected: &[usize]) -> Result<(), HfError> {
        match self.map.get(key) {
            None => Err(HfError::Missing {
                key: key.to_string(),
                expected: expected.to_vec(),
            }),
            Some((shape, _)) if shape != expected => Err(HfError::Shape {
                key: key.to_string(),
                expected: expected.to_vec(),
                found: shape.clone(),
            }),
            Some(_) => Ok(()),
        }
    }

    /// Checks that every tensor [`load`] takes is present with its shape,
    /// in the order it takes them (so the same first error is reported).
    fn check_coverage(&self, config: &ModelConfig, flavour: Flavour) -> Result<(), HfError> {
        let (v, h, i) = (
            config.vocab_size,
            config.hidden_size,
            config.intermediate_size,
        );
        self.check("model.embeddings.tok_embeddings.weight", &[v, h])?;
        if self.map.contains_key("decoder.weight") {
            self.check("decoder.weight", &[v, h])?;
        }
        self.check("model.embeddings.norm.weight", &[h])?;
        for l in 0..config.num_layers {
            let p = format!("model.layers.{l}");
            if l > 0 {
                self.check(&format!("{p}.attn_norm.weight"), &[h])?;
            }
            match flavour {
                Flavour::Encoder => self.check(&format!("{p}.attn.Wqkv.weight"), &[3 * h, h])?,
                Flavour::Decoder => {
                    for proj in ["q_proj", "k_proj", "v_proj"] {
                        self.check(&format!("{p}.attn.{proj}.weight"), &[h, h])?;
                    }
                }
            }
            self.check(&format!("{p}.attn.Wo.weight"), &[h, h])?;
            self.check(&format!("{p}.mlp_norm.weight"), &[h])?;
            self.check(&format!("{p}.mlp.Wi.weight"), &[2 * i, h])?;
            self.check(&format!("{p}.mlp.Wo.weight"), &[h, i])?;
        }
        self.check("model.final_norm.weight", &[h])?;
        let hp = head_prefix(flavour);
        self.check(&format!("{hp}.dense.weight"), &[h, h])?;
        self.check(&format!("{hp}.norm.weight"), &[h])?;
        self.check("decoder.bias", &[v])
    }
}

/// `[rows, cols]` row-major → `[cols, rows]` row-major.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

fn param1<B: Backend>(values: Vec<f32>, device: &B::Device) -> Param<Tensor<B, 1>> {
    let n = values.len();
    Param::from_tensor(Tensor::from_data(TensorData::new(values, [n]), device))
}

/// A PyTorch `[out, in]` weight as a Burn `[in, out]` linear weight.
fn linear_param<B: Backend>(
    values: Vec<f32>,
    d_out: usize,
    d_in: usize,
    device: &B::Device,
) -> Param<Tensor<B, 2>> {
    let t = transpose(&values, d_out, d_in);
    Param::from_tensor(Tensor::from_data(TensorData::new(t, [d_in, d_out]), device))
}

/// Key names of the two HF layouts.
fn head_prefix(flavour: Flavour) -> &'static str {
    match flavour {
        Flavour::Encoder => "head",
        Flavour::Decoder => "lm_head",
    }
}

/// Loads an HF folder (`config.json` + `model.safetensors`) into a model.
pub fn load<B: Backend>(dir: &Path, device: &B::Device) -> Result<ModernBert<B>, HfError> {
    let (config, flavour) = read_config(dir)?;
    let st_path = dir.join("model.safetensors");
    if !st_path.is_file() && dir.join("model.safetensors.index.json").is_file() {
        return Err(HfError::Safetensors {
            path: st_path,
            message: "sharded checkpoints (model.safetensors.index.json) are not supported".into(),
        });
    }
    let mut t = Tensors::read(&st_path)?;
    // Before allocating the model: its sizes come from config.json, and
    // only a file that holds every tensor is worth that memory.
    t.check_coverage(&config, flavour)?;
    let (v, h, i) = (
        config.vocab_size,
        config.hidden_size,
        config.intermediate_size,
    );
    let mut model = ModernBert::<B>::zeroed(&config, flavour, device);

    let emb = t.take("model.embeddings.tok_embeddings.weight", &[v, h])?;
    if t.map.contains_key("decoder.weight") {
        let tied = t.take("decoder.weight", &[v, h])?;
        if tied != emb {
            return Err(HfError::Untied);
        }
    }
    model.tok_embeddings =
        Param::from_tensor(Tensor::from_data(TensorData::new(emb, [v, h]), device));
    model.emb_norm.gamma = param1(t.take("model.embeddings.norm.weight", &[h])?, device);
    for (l, layer) in model.layers.iter_mut().enumerate() {
        let p = format!("model.layers.{l}");
        if let Some(norm) = layer.attn_norm.as_mut() {
            norm.gamma = param1(t.take(&format!("{p}.attn_norm.weight"), &[h])?, device);
        }
        let wqkv = match flavour {
            Flavour::Encoder => t.take(&format!("{p}.attn.Wqkv.weight"), &[3 * h, h])?,
            Flavour::Decoder => {
                let mut rows = t.take(&format!("{p}.attn.q_proj.weight"), &[h, h])?;
                rows.extend(t.take(&format!("{p}.attn.k_proj.weight"), &[h, h])?);
                rows.extend(t.take(&format!("{p}.attn.v_proj.weight"), &[h, h])?);
                rows
            }
        };
        layer.attn.wqkv.weight = linear_param(wqkv, 3 * h, h, device);
        layer.attn.wo.weight = linear_param(
            t.take(&format!("{p}.attn.Wo.weight"), &[h, h])?,
            h,
            h,
            device,
        );
        layer.mlp_norm.gamma = param1(t.take(&format!("{p}.mlp_norm.weight"), &[h])?, device);
        layer.mlp.wi.weight = linear_param(
            t.take(&format!("{p}.mlp.Wi.weight"), &[2 * i, h])?,
            2 * i,
            h,
            device,
        );
        layer.mlp.wo.weight = linear_param(
            t.take(&format!("{p}.mlp.Wo.weight"), &[h, i])?,
            h,
            i,
            device,
        );
    }
    model.final_norm.gamma = param1(t.take("model.final_norm.weight", &[h])?, device);
    let hp = head_prefix(flavour);
    model.head_dense.weight = linear_param(
        t.take(&format!("{hp}.dense.weight"), &[h, h])?,
        h,
        h,
        device,
    );
    model.head_norm.gamma = param1(t.take(&format!("{hp}.norm.weight"), &[h])?, device);
    model.decoder_bias = param1(t.take("decoder.bias", &[v])?, device);
    if !t.map.is_empty() {
        return Err(HfError::Unused(t.map.into_keys().collect()));
    }
    Ok(model)
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    let data = t.into_data().convert::<f32>();
    // Converted to f32 just above, so the typed view cannot fail.
    data.to_vec::<f32>().unwrap_or_default()
}

/// The HF `config.json` for `model`.
pub fn config_json(config: &ModelConfig, flavour: Flavour) -> serde_json::Value {
    let (model_type, architecture) = match flavour {
        Flavour::Encoder => (ENCODER_TYPE, "ModernBertForMaskedLM"),
        Flavour::Decoder => (DECODER_TYPE, "ModernBertDecoderForCausalLM"),
    };
    json!({
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "max_position_embeddings": config.max_position_embeddings,
        "local_attention": config.local_attention,
        "global_attn_every_n_layers": config.global_attn_every_n_layers,
        "layer_types": layer_types(config),
        "global_rope_theta": config.global_rope_theta,
        "local_rope_theta": config.local_rope_theta,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": config.global_rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": config.local_rope_theta},
        },
        "norm_eps": config.norm_eps,
        "norm_bias": false,
        "initializer_range": config.initializer_range,
        "initializer_cutoff_factor": 2.0,
        "attention_dropout": config.attention_dropout,
        "embedding_dropout": config.embedding_dropout,
        "mlp_dropout": config.mlp_dropout,
        "attention_bias": false,
        "mlp_bias": false,
        "decoder_bias": true,
        "classifier_bias": false,
        "classifier_activation": "gelu",
        "hidden_activation": "gelu",
        "tie_word_embeddings": true,
        "pad_token_id": config.pad_token_id,
        "cls_token_id": config.cls_token_id,
        "bos_token_id": config.cls_token_id,
        "sep_token_id": config.sep_token_id,
        "eos_token_id": config.sep_token_id,
        "mask_token_id": config.mask_token_id,
        "unk_token_id": config.unk_token_id,
        "dtype": "float32",
    })
}

/// Writes `model` as an HF folder (`config.json`, `model.safetensors`),
/// creating `dir` if needed.
pub fn save<B: Backend>(model: &ModernBert<B>, dir: &Path) -> Result<(), HfError> {
    let io = |path: PathBuf| move |source| HfError::Io { path, source };
    std::fs::create_dir_all(dir).map_err(io(dir.to_path_buf()))?;
    let config = model.config();
    let flavour = model.flavour();
    let (h, i) = (config.hidden_size, config.intermediate_size);
    // (key, shape, values) in PyTorch layout.
    let mut out: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let linear = |w: &Param<Tensor<B, 2>>| {
        let [d_in, d_out] = w.val().dims();
        (vec![d_out, d_in], transpose(&host(w.val()), d_in, d_out))
    };
    out.push((
        "model.embeddings.tok_embeddings.weight".into(),
        vec![config.vocab_size, h],
        host(model.tok_embeddings.val()),
    ));
    out.push((
        "model.embeddings.norm.weight".into(),
        vec![h],
        host(model.emb_norm.gamma.val()),
    ));
    for (l, layer) in model.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        if let Some(norm) = &layer.attn_norm {
            out.push((
                format!("{p}.attn_norm.weight"),
                vec![h],
                host(norm.gamma.val()),
            ));
        }
        let (shape, wqkv) = linear(&layer.attn.wqkv.weight);
        match flavour {
            Flavour::Encoder => out.push((format!("{p}.attn.Wqkv.weight"), shape, wqkv)),
            Flavour::Decoder => {
                for (k, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                    let part = wqkv[k * h * h..(k + 1) * h * h].to_vec();
                    out.push((format!("{p}.attn.{name}.weight"), vec![h, h], part));
                }
            }
        }
        let (shape, wo) = linear(&layer.attn.wo.weight);
        out.push((format!("{p}.attn.Wo.weight"), shape, wo));
        out.push((
            format!("{p}.mlp_norm.weight"),
            vec![h],
            host(layer.mlp_norm.gamma.val()),
        ));
        let (shape, wi) = linear(&layer.mlp.wi.weight);
        debug_assert_eq!(shape, vec![2 * i, h]);
        out.push((format!("{p}.mlp.Wi.weight"), shape, wi));
        let (shape, wo) = linear(&layer.mlp.wo.weight);
        out.push((format!("{p}.mlp.Wo.weight"), shape, wo));
    }
    out.push((
        "model.final_norm.weight".into(),
        vec![h],
        host(model.final_norm.gamma.val()),
    ));
    let hp = head_prefix(flavour);
    let (shape, dense) = linear(&model.head_dense.weight);
    out.push((format!("{hp}.dense.weight"), shape, dense));
    out.push((
        format!("{hp}.norm.weight"),
        vec![h],
        host(model.head_norm.gamma.val()),
    ));
    out.push((
        "decoder.bias".into(),
        vec![config.vocab_size],
        host(model.decoder_bias.val()),
    ));

    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = out
        .into_iter()
        .map(|(k, shape, v)| (k, shape, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views = bytes
        .iter()
        .map(|(k, shape, b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b)
                .map(|view| (k.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| HfError::Safetensors {
            path: dir.join("model.safetensors"),
            message: e.to_string(),
        })?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let st_path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(metadata), &st_path).map_err(|e| {
        HfError::Safetensors {
            path: st_path.clone(),
            message: e.to_string(),
        }
    })?;
    let cfg_path = dir.join("config.json");
    let text =
        serde_json::to_string_pretty(&config_json(config, flavour)).map_err(|e| HfError::Json {
            path: cfg_path.clone(),
            message: e.to_string(),
        })?;
    std::fs::write(&cfg_path, text + "\n").map_err(io(cfg_path.clone()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_config(tag: &str, value: &serde_json::Value) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("twinhead-hfcfg-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("config.json"), value.to_string()).expect("write");
        dir
    }

    /// transformers 4.5x configs (as on the Hub for Ettin) carry the legacy
    /// θ keys and may lack `layer_types` and `mask_token_id`.
    #[test]
    fn legacy_v4_config_is_read() {
        let dir = write_config(
            "legacy",
            &json!({
                "model_type": "modernbert-decoder",
                "vocab_size": 50368, "hidden_size": 256, "num_hidden_layers": 7,
                "num_attention_heads": 4, "intermediate_size": 384,
                "global_rope_theta": 160000.0, "local_rope_theta": 10000.0,
                "local_attention": 128, "global_attn_every_n_layers": 3,
                "pad_token_id": 50283, "cls_token_id": 50281, "sep_token_id": 50282,
                "hidden_activation": "gelu", "some_future_key": [1, 2]
            }),
        );
        let (c, flavour) = read_config(&dir).expect("config");
        assert_eq!(flavour, Flavour::Decoder);
        assert_eq!(
            (c.global_rope_theta, c.local_rope_theta),
            (160_000.0, 10_000.0)
        );
        assert_eq!(c.mask_token_id, 50284);
        assert_eq!(
            c.num_params(),
            ModelConfig::builtin("ettin-17m").expect("17m").num_params()
        );
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn v5_rope_parameters_win_and_unsupported_options_are_named() {
        let mut v = json!({
            "model_type": "modernbert",
            "vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 48,
            "pad_token_id": 0, "cls_token_id": 1, "sep_token_id": 2,
            "global_rope_theta": 1.0,
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": 80000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0}
            }
        });
        let dir = write_config("v5", &v);
        let (c, _) = read_config(&dir).expect("config");
        assert_eq!(
            (c.global_rope_theta, c.local_rope_theta),
            (80_000.0, 5_000.0)
        );
        v["rope_parameters"]["sliding_attention"]["rope_type"] = json!("yarn");
        let dir = write_config("v5", &v);
        let err = read_config(&dir).expect_err("yarn").to_string();
        assert!(
            err.contains("rope_parameters.sliding_attention.rope_type"),
            "{err}"
        );
        v["rope_parameters"]["sliding_attention"]["rope_type"] = json!("default");
        v["norm_bias"] = json!(true);
        let dir = write_config("v5", &v);
        let err = read_config(&dir).expect_err("bias").to_string();
        assert!(err.contains("norm_bias"), "{err}");
        v["norm_bias"] = json!(false);
        v["hidden_size"] = json!("wide");
        let dir = write_config("v5", &v);
        let err = read_config(&dir).expect_err("type").to_string();
        assert!(err.contains("hidden_size"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }
}
