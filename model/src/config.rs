//! Model shape configuration, as the model code takes it.
//!
//! A model's shape is one type, the proto crate's `ModelSpec`: parsed from
//! `configs/models/*.toml` (and the built-ins embedded from them), sent in
//! run specs, converted from Hugging Face `config.json` files (`hf.rs`), and
//! checked by one set of rules (`twinhead_proto::validate::validate_model`).
//! [`ModelConfig`] is a spec that passed them, with sizes as `usize` for the
//! tensor code. Every error names the file and the key.

use std::path::Path;

use serde::Serialize;
use twinhead_proto::v1::ModelSpec;

/// Errors from reading or validating a model config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file or name was refused by the config parser (the message
    /// names the file and key).
    #[error("{0}")]
    Spec(String),
    /// A value is outside what the model can be built with.
    #[error("model config {file}: key `{key}`: {message}")]
    Invalid {
        /// The file (or `model <name>` for a spec).
        file: String,
        /// The offending key.
        key: String,
        /// What was wrong and what is allowed.
        message: String,
    },
    /// Not one of the built-in names.
    #[error("unknown model config `{0}`: not one of the built-ins ({builtins})", builtins = builtin_names().join(", "))]
    Unknown(String),
}

/// A validated model config. Construct with [`ModelConfig::builtin`],
/// [`ModelConfig::load`] or [`ModelConfig::from_spec`]; [`ModelConfig::spec`]
/// gives the spec back.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelConfig {
    pub name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub local_attention: usize,
    pub global_attn_every_n_layers: usize,
    pub global_rope_theta: f64,
    pub local_rope_theta: f64,
    pub norm_eps: f64,
    pub initializer_range: f64,
    pub attention_dropout: f64,
    pub embedding_dropout: f64,
    pub mlp_dropout: f64,
    pub pad_token_id: u32,
    pub cls_token_id: u32,
    pub sep_token_id: u32,
    pub mask_token_id: u32,
    /// `[UNK]`, when the tokenizer has one (masking never selects it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unk_token_id: Option<u32>,
}

/// Names of the built-in configs, in size order.
pub fn builtin_names() -> Vec<&'static str> {
    twinhead_proto::config::builtin_model_names().collect()
}

impl ModelConfig {
    /// A built-in config by name (`tiny`, `ettin-17m`, … `ettin-1b`).
    pub fn builtin(name: &str) -> Result<Self, ConfigError> {
        if !builtin_names().contains(&name) {
            return Err(ConfigError::Unknown(name.to_string()));
        }
        Self::load(name)
    }

    /// A built-in name, or else a path to a TOML file (relative to the
    /// current folder).
    pub fn load(name_or_path: &str) -> Result<Self, ConfigError> {
        let spec = twinhead_proto::config::load_model(name_or_path, Path::new("."))
            .map_err(|e| ConfigError::Spec(e.to_string()))?;
        Self::from_spec(&spec)
    }

    /// The model of a run spec (or of a parsed model file).
    pub fn from_spec(m: &ModelSpec) -> Result<Self, ConfigError> {
        Self::from_spec_in(m, &format!("model {}", m.name))
    }

    /// Checks `m` by the model rules; `file` names its source in errors.
    pub fn from_spec_in(m: &ModelSpec, file: &str) -> Result<Self, ConfigError> {
        twinhead_proto::validate::validate_model(m).map_err(|e| ConfigError::Invalid {
            file: file.to_string(),
            key: e.key,
            message: e.message,
        })?;
        let size = |v: u32| v as usize;
        Ok(Self {
            name: m.name.clone(),
            vocab_size: size(m.vocab_size),
            hidden_size: size(m.hidden_size),
            num_layers: size(m.num_layers),
            num_heads: size(m.num_heads),
            intermediate_size: size(m.intermediate_size),
            max_position_embeddings: size(m.max_position_embeddings),
            local_attention: size(m.local_attention),
            global_attn_every_n_layers: size(m.global_attn_every_n_layers),
            global_rope_theta: m.global_rope_theta,
            local_rope_theta: m.local_rope_theta,
            norm_eps: m.norm_eps,
            initializer_range: m.initializer_range,
            attention_dropout: m.attention_dropout,
            embedding_dropout: m.embedding_dropout,
            mlp_dropout: m.mlp_dropout,
            pad_token_id: m.pad_token_id,
            cls_token_id: m.cls_token_id,
            sep_token_id: m.sep_token_id,
            mask_token_id: m.mask_token_id,
            unk_token_id: m.unk_token_id,
        })
    }

    /// The spec this config was built from (sizes fit `u32`: they came from one).
    pub fn spec(&self) -> ModelSpec {
        let size = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        ModelSpec {
            name: self.name.clone(),
            vocab_size: size(self.vocab_size),
            hidden_size: size(self.hidden_size),
            num_layers: size(self.num_layers),
            num_heads: size(self.num_heads),
            intermediate_size: size(self.intermediate_size),
            max_position_embeddings: size(self.max_position_embeddings),
            local_attention: size(self.local_attention),
            global_attn_every_n_layers: size(self.global_attn_every_n_layers),
            global_rope_theta: self.global_rope_theta,
            local_rope_theta: self.local_rope_theta,
            norm_eps: self.norm_eps,
            initializer_range: self.initializer_range,
            attention_dropout: self.attention_dropout,
            embedding_dropout: self.embedding_dropout,
            mlp_dropout: self.mlp_dropout,
            pad_token_id: self.pad_token_id,
            cls_token_id: self.cls_token_id,
            sep_token_id: self.sep_token_id,
            mask_token_id: self.mask_token_id,
            unk_token_id: self.unk_token_id,
        }
    }

    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Tokens seen on each side by a local (sliding-window) layer.
    pub fn half_window(&self) -> usize {
        self.local_attention / 2
    }

    /// Whether layer `i` (0-based) attends globally: layers 0, n, 2n, ….
    pub fn is_global_layer(&self, i: usize) -> bool {
        i.is_multiple_of(self.global_attn_every_n_layers)
    }

    /// The special token ids, which MLM masking never selects: `[PAD]`,
    /// `[CLS]`, `[SEP]`, `[MASK]` and `[UNK]` when the model has one.
    pub fn special_token_ids(&self) -> Vec<u32> {
        let mut ids = vec![
            self.pad_token_id,
            self.cls_token_id,
            self.sep_token_id,
            self.mask_token_id,
        ];
        ids.extend(self.unk_token_id);
        ids
    }

    /// Number of trainable parameters, counting the tied embedding /
    /// output matrix once (as Hugging Face reports it).
    pub fn num_params(&self) -> usize {
        let (v, h, i, l) = (
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_layers,
        );
        let embeddings = v * h + h; // tok_embeddings + embedding norm
        let per_layer = 3 * h * h // Wqkv
            + h * h // attention Wo
            + h // mlp_norm
            + 2 * i * h // Wi
            + i * h; // mlp Wo
        let attn_norms = (l - 1) * h; // layer 0 has none
        let final_norm = h;
        let head = h * h + h + v; // dense, norm, decoder bias
        embeddings + l * per_layer + attn_norms + final_norm + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_builtins_load_and_validate() {
        for name in builtin_names() {
            let c = ModelConfig::builtin(name).expect(name);
            assert_eq!(c.name, name);
            assert_eq!(c.head_dim() % 2, 0);
        }
    }

    #[test]
    fn param_counts_land_near_the_names() {
        // (name, expected millions, tolerance in millions)
        let expected = [
            ("ettin-17m", 17.0, 0.5),
            ("ettin-32m", 32.0, 0.5),
            ("ettin-68m", 68.0, 1.0),
            ("ettin-150m", 150.0, 1.5),
            ("ettin-400m", 396.0, 4.0),
            ("ettin-1b", 1031.0, 10.0),
        ];
        for (name, millions, tol) in expected {
            let c = ModelConfig::builtin(name).expect(name);
            let m = c.num_params() as f64 / 1e6;
            assert!(
                (m - millions).abs() <= tol,
                "{name}: {m:.2}M parameters, expected about {millions}M"
            );
        }
        // Exact figure for the smallest, worked out by hand in ETTIN-NOTES.
        assert_eq!(
            ModelConfig::builtin("ettin-17m").expect("17m").num_params(),
            16_913_600
        );
    }

    #[test]
    fn global_layers_are_every_nth_from_zero() {
        let c = ModelConfig::builtin("ettin-17m").expect("17m");
        let globals: Vec<usize> = (0..c.num_layers)
            .filter(|&i| c.is_global_layer(i))
            .collect();
        assert_eq!(globals, vec![0, 3, 6]);
        assert_eq!(c.half_window(), 64);
    }

    #[test]
    fn bad_values_name_the_key() {
        let tiny = ModelConfig::builtin("tiny").expect("tiny").spec();
        assert_eq!(
            ModelConfig::from_spec(&tiny).expect("round trip").spec(),
            tiny
        );
        type Edit = fn(&mut ModelSpec);
        let cases: [(Edit, &str); 6] = [
            (|r| r.num_heads = 3, "num_heads"),
            (|r| r.local_attention = 15, "local_attention"),
            (|r| r.mask_token_id = 4096, "mask_token_id"),
            (|r| r.mlp_dropout = 1.5, "mlp_dropout"),
            (|r| r.norm_eps = 0.0, "norm_eps"),
            (|r| r.name = " ".into(), "name"),
        ];
        for (edit, key) in cases {
            let mut spec = tiny.clone();
            edit(&mut spec);
            match ModelConfig::from_spec_in(&spec, "x.toml").expect_err(key) {
                ConfigError::Invalid { file, key: k, .. } => {
                    assert_eq!(file, "x.toml");
                    assert_eq!(k, key);
                }
                other => panic!("expected Invalid for {key}, got {other}"),
            }
        }
    }

    #[test]
    fn load_accepts_a_path_and_rejects_unknown_names() {
        let dir = std::env::temp_dir().join(format!("twinhead-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp");
        let path = dir.join("m.toml");
        let tiny = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/models/tiny.toml"),
        )
        .expect("tiny.toml");
        std::fs::write(&path, &tiny).expect("write");
        let c = ModelConfig::load(path.to_str().expect("utf8")).expect("load path");
        assert_eq!(c, ModelConfig::builtin("tiny").expect("tiny"));
        assert!(matches!(
            ModelConfig::builtin("ettin-9b"),
            Err(ConfigError::Unknown(_))
        ));
        let e = ModelConfig::load("ettin-9b")
            .expect_err("unknown")
            .to_string();
        assert!(e.contains("ettin-9b") && e.contains("ettin-17m"), "{e}");
        std::fs::write(&path, format!("{tiny}\nnum_experts = 4\n")).expect("write");
        let e = ModelConfig::load(path.to_str().expect("utf8")).expect_err("unknown key");
        assert!(e.to_string().contains("num_experts"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
