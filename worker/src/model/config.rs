//! Model shape configuration: the `configs/models/*.toml` files.
//!
//! A file is parsed into [`RawModelConfig`] (serde, unknown keys refused)
//! and then validated into [`ModelConfig`], whose values are known to build
//! a model. Every error names the file and the key. The field names are the
//! same as the proto `ModelSpec`'s, so a spec converts field by field.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The model configs shipped in `configs/models/`, embedded in the binary.
const BUILTINS: &[(&str, &str)] = &[
    ("tiny", include_str!("../../../configs/models/tiny.toml")),
    (
        "ettin-17m",
        include_str!("../../../configs/models/ettin-17m.toml"),
    ),
    (
        "ettin-32m",
        include_str!("../../../configs/models/ettin-32m.toml"),
    ),
    (
        "ettin-68m",
        include_str!("../../../configs/models/ettin-68m.toml"),
    ),
    (
        "ettin-150m",
        include_str!("../../../configs/models/ettin-150m.toml"),
    ),
    (
        "ettin-400m",
        include_str!("../../../configs/models/ettin-400m.toml"),
    ),
    (
        "ettin-1b",
        include_str!("../../../configs/models/ettin-1b.toml"),
    ),
];

/// Errors from reading or validating a model config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read model config {file}: {source}")]
    Io {
        /// The path as given.
        file: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The TOML did not parse into the expected keys and types.
    #[error("model config {file}: key `{key}`: {message}")]
    Parse {
        /// File name or `builtin:<name>`.
        file: String,
        /// Path of the offending key (`.` when the whole file is wrong).
        key: String,
        /// What was wrong.
        message: String,
    },
    /// A value is outside what the model can be built with.
    #[error("model config {file}: key `{key}`: {message}")]
    Invalid {
        /// File name or `builtin:<name>`.
        file: String,
        /// The offending key.
        key: &'static str,
        /// What was wrong and what is allowed.
        message: String,
    },
    /// Neither a built-in name nor an existing file.
    #[error("unknown model config `{0}`: not a file and not one of the built-ins ({builtins})", builtins = builtin_names().join(", "))]
    Unknown(String),
}

/// A model config exactly as written in a `configs/models/*.toml` file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModelConfig {
    pub name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// GeGLU width per half (`Wi` projects to twice this).
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    /// Total local window: a local layer sees `local_attention / 2` tokens
    /// on each side (decoders: only the left side).
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
}

/// A validated model config. Construct with [`ModelConfig::builtin`],
/// [`ModelConfig::from_file`], [`ModelConfig::load`] or
/// [`ModelConfig::validate`].
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
}

/// Names of the built-in configs, in size order.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTINS.iter().map(|(n, _)| *n).collect()
}

impl ModelConfig {
    /// A built-in config by name (`tiny`, `ettin-17m`, … `ettin-1b`).
    pub fn builtin(name: &str) -> Result<Self, ConfigError> {
        let (_, text) = BUILTINS
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| ConfigError::Unknown(name.to_string()))?;
        Self::from_toml_str(text, &format!("builtin:{name}"))
    }

    /// Reads and validates a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            file: file.clone(),
            source,
        })?;
        Self::from_toml_str(&text, &file)
    }

    /// A built-in name, or else a path to a TOML file.
    pub fn load(name_or_path: &str) -> Result<Self, ConfigError> {
        if BUILTINS.iter().any(|(n, _)| *n == name_or_path) {
            return Self::builtin(name_or_path);
        }
        let path = Path::new(name_or_path);
        if path.is_file() {
            return Self::from_file(path);
        }
        Err(ConfigError::Unknown(name_or_path.to_string()))
    }

    /// Parses TOML text; `file` names the source in errors.
    pub fn from_toml_str(text: &str, file: &str) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Parse {
            file: file.to_string(),
            key: ".".to_string(),
            message: e.message().to_string(),
        })?;
        let raw: RawModelConfig =
            serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Parse {
                file: file.to_string(),
                key: e.path().to_string(),
                message: e.inner().message().to_string(),
            })?;
        Self::validate(raw, file)
    }

    /// Checks every value; `file` names the source in errors.
    pub fn validate(raw: RawModelConfig, file: &str) -> Result<Self, ConfigError> {
        let bad = |key: &'static str, message: String| ConfigError::Invalid {
            file: file.to_string(),
            key,
            message,
        };
        if raw.name.trim().is_empty() {
            return Err(bad("name", "must not be empty".into()));
        }
        for (key, v) in [
            ("vocab_size", raw.vocab_size),
            ("hidden_size", raw.hidden_size),
            ("num_layers", raw.num_layers),
            ("num_heads", raw.num_heads),
            ("intermediate_size", raw.intermediate_size),
            ("max_position_embeddings", raw.max_position_embeddings),
            ("global_attn_every_n_layers", raw.global_attn_every_n_layers),
        ] {
            if v == 0 {
                return Err(bad(key, "must be at least 1".into()));
            }
        }
        if !raw.hidden_size.is_multiple_of(raw.num_heads) {
            return Err(bad(
                "num_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    raw.num_heads, raw.hidden_size
                ),
            ));
        }
        if !(raw.hidden_size / raw.num_heads).is_multiple_of(2) {
            return Err(bad(
                "num_heads",
                format!(
                    "head dim hidden_size/num_heads = {} must be even for rotary embeddings",
                    raw.hidden_size / raw.num_heads
                ),
            ));
        }
        if raw.local_attention < 2 || !raw.local_attention.is_multiple_of(2) {
            return Err(bad(
                "local_attention",
                format!(
                    "{} must be an even number >= 2 (the total window, half on each side)",
                    raw.local_attention
                ),
            ));
        }
        for (key, v) in [
            ("global_rope_theta", raw.global_rope_theta),
            ("local_rope_theta", raw.local_rope_theta),
            ("norm_eps", raw.norm_eps),
            ("initializer_range", raw.initializer_range),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad(key, format!("{v} must be a finite number > 0")));
            }
        }
        for (key, v) in [
            ("attention_dropout", raw.attention_dropout),
            ("embedding_dropout", raw.embedding_dropout),
            ("mlp_dropout", raw.mlp_dropout),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(bad(key, format!("{v} must be in [0, 1)")));
            }
        }
        for (key, v) in [
            ("pad_token_id", raw.pad_token_id),
            ("cls_token_id", raw.cls_token_id),
            ("sep_token_id", raw.sep_token_id),
            ("mask_token_id", raw.mask_token_id),
        ] {
            if v as usize >= raw.vocab_size {
                return Err(bad(
                    key,
                    format!(
                        "{v} is outside the vocabulary (vocab_size {})",
                        raw.vocab_size
                    ),
                ));
            }
        }
        Ok(Self {
            name: raw.name,
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            num_layers: raw.num_layers,
            num_heads: raw.num_heads,
            intermediate_size: raw.intermediate_size,
            max_position_embeddings: raw.max_position_embeddings,
            local_attention: raw.local_attention,
            global_attn_every_n_layers: raw.global_attn_every_n_layers,
            global_rope_theta: raw.global_rope_theta,
            local_rope_theta: raw.local_rope_theta,
            norm_eps: raw.norm_eps,
            initializer_range: raw.initializer_range,
            attention_dropout: raw.attention_dropout,
            embedding_dropout: raw.embedding_dropout,
            mlp_dropout: raw.mlp_dropout,
            pad_token_id: raw.pad_token_id,
            cls_token_id: raw.cls_token_id,
            sep_token_id: raw.sep_token_id,
            mask_token_id: raw.mask_token_id,
        })
    }

    /// Back to the file shape (for writing a config next to a checkpoint).
    pub fn to_raw(&self) -> RawModelConfig {
        RawModelConfig {
            name: self.name.clone(),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_layers,
            num_heads: self.num_heads,
            intermediate_size: self.intermediate_size,
            max_position_embeddings: self.max_position_embeddings,
            local_attention: self.local_attention,
            global_attn_every_n_layers: self.global_attn_every_n_layers,
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

    /// The special token ids, which MLM masking never selects.
    pub fn special_token_ids(&self) -> [u32; 4] {
        [
            self.pad_token_id,
            self.cls_token_id,
            self.sep_token_id,
            self.mask_token_id,
        ]
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

    fn tiny_text() -> String {
        BUILTINS[0].1.to_string()
    }

    #[test]
    fn unknown_key_is_refused_and_named() {
        let text = format!("{}\nnum_experts = 4\n", tiny_text());
        let err = ModelConfig::from_toml_str(&text, "x.toml").expect_err("unknown key");
        let msg = err.to_string();
        assert!(
            msg.contains("x.toml") && msg.contains("num_experts"),
            "{msg}"
        );
    }

    #[test]
    fn wrong_type_names_the_key() {
        let text = tiny_text().replace("hidden_size = 64", "hidden_size = \"wide\"");
        let err = ModelConfig::from_toml_str(&text, "x.toml").expect_err("bad type");
        let msg = err.to_string();
        assert!(msg.contains("hidden_size"), "{msg}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            ("num_heads = 2", "num_heads = 3", "num_heads"),
            (
                "local_attention = 16",
                "local_attention = 15",
                "local_attention",
            ),
            ("mask_token_id = 4", "mask_token_id = 4096", "mask_token_id"),
            ("mlp_dropout = 0.0", "mlp_dropout = 1.5", "mlp_dropout"),
            ("norm_eps = 1e-5", "norm_eps = 0.0", "norm_eps"),
        ];
        for (from, to, key) in cases {
            let text = tiny_text().replace(from, to);
            assert_ne!(text, tiny_text(), "fixture edit {from} did not apply");
            let err = ModelConfig::from_toml_str(&text, "x.toml").expect_err(key);
            match &err {
                ConfigError::Invalid { file, key: k, .. } => {
                    assert_eq!(file, "x.toml");
                    assert_eq!(*k, key);
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
        std::fs::write(&path, tiny_text()).expect("write");
        let c = ModelConfig::load(path.to_str().expect("utf8")).expect("load path");
        assert_eq!(c, ModelConfig::builtin("tiny").expect("tiny"));
        assert!(matches!(
            ModelConfig::load("ettin-9b"),
            Err(ConfigError::Unknown(_))
        ));
        std::fs::remove_dir_all(&dir).ok();
    }
}
