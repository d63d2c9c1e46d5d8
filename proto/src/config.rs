//! TOML configs into proto messages.
//!
//! Model sizes live in `configs/models/*.toml` and are built into the
//! binary, so `model = "ettin-150m"` works anywhere; a run file may also
//! name a model file by path. Run recipes live in `configs/runs/*.toml`.
//! Every table rejects unknown keys, and every error names the file and the
//! key path (`phases[1].seq_len`), then says what is allowed.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer};

use crate::v1::{
    BatchWarmup, CheckpointPolicy, EvalPolicy, LrSchedule, LrShape, ModelSpec, Objective,
    OptimizerSpec, PhaseSpec, RunSpec,
};

/// Built-in model sizes: `configs/models/<name>.toml`, compiled in.
pub const BUILTIN_MODELS: &[(&str, &str)] = &[
    (
        "ettin-17m",
        include_str!("../../configs/models/ettin-17m.toml"),
    ),
    (
        "ettin-32m",
        include_str!("../../configs/models/ettin-32m.toml"),
    ),
    (
        "ettin-68m",
        include_str!("../../configs/models/ettin-68m.toml"),
    ),
    (
        "ettin-150m",
        include_str!("../../configs/models/ettin-150m.toml"),
    ),
    (
        "ettin-400m",
        include_str!("../../configs/models/ettin-400m.toml"),
    ),
    (
        "ettin-1b",
        include_str!("../../configs/models/ettin-1b.toml"),
    ),
    ("tiny", include_str!("../../configs/models/tiny.toml")),
];

/// A config that could not be read, parsed or validated.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}:{column}: {message}")]
    Syntax {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{file}: {key}: {message}")]
    Key {
        file: String,
        key: String,
        message: String,
    },
    #[error("{file}: {message}")]
    Other { file: String, message: String },
}

impl ConfigError {
    fn key(file: &str, key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Key {
            file: file.to_string(),
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A token count: an integer, or a string with a K/M/B/T suffix ("1.7T").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens(pub u64);

impl<'de> Deserialize<'de> for Tokens {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Tokens;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a non-negative token count such as 1000000 or \"1.7T\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Tokens, E> {
                Ok(Tokens(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Tokens, E> {
                u64::try_from(v)
                    .map(Tokens)
                    .map_err(|_| E::custom(format!("token count must not be negative, got {v}")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Tokens, E> {
                if v >= 0.0 && v.fract() == 0.0 && v < u64::MAX as f64 {
                    Ok(Tokens(v as u64))
                } else {
                    Err(E::custom(format!(
                        "token count must be a non-negative whole number, got {v}"
                    )))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Tokens, E> {
                parse_tokens(v).map(Tokens).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Parses "1000", "4B", "1.7T", "250M", "64K" (case-insensitive suffix).
pub fn parse_tokens(text: &str) -> Result<u64, String> {
    let t = text.trim().replace('_', "");
    let (number, scale) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1e3),
        Some('M') => (&t[..t.len() - 1], 1e6),
        Some('B') | Some('G') => (&t[..t.len() - 1], 1e9),
        Some('T') => (&t[..t.len() - 1], 1e12),
        _ => (t.as_str(), 1.0),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("expected a token count such as 1000000 or \"1.7T\", got {text:?}"))?;
    let tokens = value * scale;
    if tokens < 0.0 {
        return Err(format!("token count must not be negative, got {text:?}"));
    }
    if tokens.is_nan() || tokens >= u64::MAX as f64 {
        return Err(format!(
            "token count must be a finite number below 2^64, got {text:?}"
        ));
    }
    Ok(tokens.round() as u64)
}

// ---------------------------------------------------------------- models

/// Names of the built-in model sizes.
pub fn builtin_model_names() -> impl Iterator<Item = &'static str> {
    BUILTIN_MODELS.iter().map(|(name, _)| *name)
}

/// Parses a model config from TOML text; `file` names it in errors.
pub fn parse_model(file: &str, text: &str) -> Result<ModelSpec, ConfigError> {
    let table = parse_table(file, text)?;
    let spec: ModelSpec = from_table(file, table)?;
    crate::validate::validate_model(&spec).map_err(|e| ConfigError::key(file, e.key, e.message))?;
    Ok(spec)
}

/// Resolves `name_or_path`: a built-in size name, or a path to a model TOML
/// file (relative paths are taken from `base_dir`).
pub fn load_model(name_or_path: &str, base_dir: &Path) -> Result<ModelSpec, ConfigError> {
    if let Some((name, text)) = BUILTIN_MODELS.iter().find(|(n, _)| *n == name_or_path) {
        return parse_model(&format!("<built-in model {name}>"), text);
    }
    if name_or_path.ends_with(".toml") || name_or_path.contains('/') {
        let path = base_dir.join(name_or_path);
        let file = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
            file: file.clone(),
            source,
        })?;
        return parse_model(&file, &text);
    }
    Err(ConfigError::Other {
        file: name_or_path.to_string(),
        message: format!(
            "unknown model {name_or_path:?}: expected one of {} or a path to a .toml file",
            builtin_model_names().collect::<Vec<_>>().join(", ")
        ),
    })
}

// ------------------------------------------------------------------ runs

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunFile {
    name: String,
    model: String,
    objective: ObjectiveName,
    dataset: String,
    #[serde(default)]
    seed: u64,
    world_size: u32,
    #[serde(default)]
    min_world_size: u32,
    global_batch: u32,
    #[serde(default)]
    micro_batch: u32,
    #[serde(default)]
    init_from: String,
    #[serde(default = "default_max_restarts")]
    max_restarts: u32,
    #[serde(default)]
    batch_warmup: Option<BatchWarmupFile>,
    #[serde(default)]
    activation_checkpointing: bool,
    #[serde(default)]
    precision: String,
    optimizer: OptimizerFile,
    checkpoint: CheckpointFile,
    #[serde(default)]
    eval: Option<EvalFile>,
    #[serde(default)]
    phases: Vec<PhaseFile>,
}

fn default_max_restarts() -> u32 {
    10
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ObjectiveName {
    Mlm,
    Clm,
    Mntp,
}

/// `batch_warmup = { start = 2, tokens = "64K" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchWarmupFile {
    start: u32,
    tokens: Tokens,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OptimizerFile {
    #[serde(default = "default_optimizer")]
    name: String,
    peak_lr: f64,
    #[serde(default = "default_beta1")]
    beta1: f64,
    #[serde(default = "default_beta2")]
    beta2: f64,
    #[serde(default = "default_eps")]
    eps: f64,
    #[serde(default)]
    weight_decay: f64,
    #[serde(default)]
    grad_clip: f64,
}

fn default_optimizer() -> String {
    "stable_adamw".to_string()
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.98
}
fn default_eps() -> f64 {
    1e-6
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointFile {
    root: String,
    #[serde(default)]
    every_tokens: Tokens,
    #[serde(default)]
    keep_last: u32,
}

/// `[eval]`: held-out loss in the training loop (see [`EvalPolicy`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalFile {
    #[serde(default)]
    every_tokens: Tokens,
    #[serde(default)]
    max_rows: u32,
    #[serde(default)]
    mask_ratio: Option<f64>,
    #[serde(default)]
    tasks: Vec<String>,
    #[serde(default)]
    limit: u32,
    #[serde(default)]
    at: ScoredCheckpoints,
    #[serde(default)]
    tasks_dir: String,
}

/// `at = "phase_end"` (0: phase-end checkpoints only) or a token count:
/// the checkpoints that cross a multiple of it are scored too.
#[derive(Debug, Default)]
struct ScoredCheckpoints(u64);

impl<'de> Deserialize<'de> for ScoredCheckpoints {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            Count(Tokens),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Name(name) if name == "phase_end" => Ok(ScoredCheckpoints(0)),
            Raw::Name(text) => parse_tokens(&text).map(ScoredCheckpoints).map_err(|_| {
                de::Error::custom(format!(
                    "expected \"phase_end\" or a token count such as \"10B\", got {text:?}"
                ))
            }),
            Raw::Count(tokens) => Ok(ScoredCheckpoints(tokens.0)),
        }
    }
}

/// The recipe evaluates encoders at 15% masking whatever it trains at.
pub const EVAL_MASK_RATIO: f64 = 0.15;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PhaseFile {
    name: String,
    #[serde(default)]
    dataset_phase: Option<String>,
    tokens: Tokens,
    seq_len: u32,
    #[serde(default)]
    mask_ratio: Option<f64>,
    #[serde(default)]
    global_rope_theta: Option<f64>,
    #[serde(default)]
    local_rope_theta: Option<f64>,
    #[serde(default)]
    lr: LrFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LrFile {
    #[serde(default = "default_shape")]
    shape: ShapeName,
    #[serde(default)]
    warmup_tokens: Tokens,
    #[serde(default = "one")]
    start_factor: f64,
    #[serde(default)]
    end_factor: Option<f64>,
    #[serde(default)]
    decay_tokens: Tokens,
}

impl Default for LrFile {
    fn default() -> Self {
        LrFile {
            shape: ShapeName::Constant,
            warmup_tokens: Tokens(0),
            start_factor: 1.0,
            end_factor: None,
            decay_tokens: Tokens(0),
        }
    }
}

fn default_shape() -> ShapeName {
    ShapeName::Constant
}
fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ShapeName {
    Constant,
    Linear,
    OneMinusSqrt,
    Cosine,
}

/// Reads a run recipe, applies `--set key=value` overrides, resolves the
/// model, and validates the result.
pub fn load_run(path: &Path, overrides: &[String]) -> Result<RunSpec, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        file: file.clone(),
        source,
    })?;
    let base_dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    parse_run(&file, &text, overrides, &base_dir)
}

/// [`load_run`] on text already read; `file` names it in errors and
/// `base_dir` anchors relative model paths.
pub fn parse_run(
    file: &str,
    text: &str,
    overrides: &[String],
    base_dir: &Path,
) -> Result<RunSpec, ConfigError> {
    let mut table = parse_table(file, text)?;
    for assignment in overrides {
        apply_override(&mut table, assignment).map_err(|message| ConfigError::Other {
            file: format!("--set {assignment}"),
            message,
        })?;
    }
    let run: RunFile = from_table(file, table)?;
    let model = load_model(&run.model, base_dir).map_err(|e| match e {
        ConfigError::Other { message, .. } => ConfigError::key(file, "model", message),
        // A model file that cannot be read is named with the key that names it.
        ConfigError::Io {
            file: model_file,
            source,
        } => ConfigError::key(
            file,
            "model",
            format!("cannot read the model file {model_file}: {source}"),
        ),
        other => other,
    })?;
    let spec = run_spec(run, model);
    crate::validate::validate_run_spec(&spec)
        .map_err(|e| ConfigError::key(file, e.key, e.message))?;
    Ok(spec)
}

fn run_spec(run: RunFile, model: ModelSpec) -> RunSpec {
    let objective = match run.objective {
        ObjectiveName::Mlm => Objective::Mlm,
        ObjectiveName::Clm => Objective::Clm,
        ObjectiveName::Mntp => Objective::Mntp,
    };
    let phases = run
        .phases
        .into_iter()
        .map(|p| PhaseSpec {
            dataset_phase: p.dataset_phase.unwrap_or_else(|| p.name.clone()),
            name: p.name,
            tokens: p.tokens.0,
            seq_len: p.seq_len,
            mask_ratio: p.mask_ratio.unwrap_or(0.0),
            global_rope_theta: p.global_rope_theta.unwrap_or(model.global_rope_theta),
            local_rope_theta: p.local_rope_theta.unwrap_or(model.local_rope_theta),
            lr: Some(LrSchedule {
                shape: match p.lr.shape {
                    ShapeName::Constant => LrShape::Constant,
                    ShapeName::Linear => LrShape::Linear,
                    ShapeName::OneMinusSqrt => LrShape::OneMinusSqrt,
                    ShapeName::Cosine => LrShape::Cosine,
                } as i32,
                warmup_tokens: p.lr.warmup_tokens.0,
                start_factor: p.lr.start_factor,
                end_factor: p.lr.end_factor.unwrap_or(p.lr.start_factor),
                decay_tokens: p.lr.decay_tokens.0,
            }),
        })
        .collect();
    RunSpec {
        name: run.name,
        model: Some(model),
        objective: objective as i32,
        dataset: run.dataset,
        phases,
        optimizer: Some(OptimizerSpec {
            name: run.optimizer.name,
            peak_lr: run.optimizer.peak_lr,
            beta1: run.optimizer.beta1,
            beta2: run.optimizer.beta2,
            eps: run.optimizer.eps,
            weight_decay: run.optimizer.weight_decay,
            grad_clip: run.optimizer.grad_clip,
        }),
        global_batch: run.global_batch,
        micro_batch: run.micro_batch,
        world_size: run.world_size,
        min_world_size: run.min_world_size,
        checkpoint: Some(CheckpointPolicy {
            root: run.checkpoint.root,
            every_tokens: run.checkpoint.every_tokens.0,
            keep_last: run.checkpoint.keep_last,
        }),
        seed: run.seed,
        init_from: run.init_from,
        max_restarts: run.max_restarts,
        batch_warmup: run.batch_warmup.map(|w| BatchWarmup {
            start: w.start,
            tokens: w.tokens.0,
        }),
        activation_checkpointing: run.activation_checkpointing,
        precision: run.precision,
        eval: run.eval.map(|e| EvalPolicy {
            every_tokens: e.every_tokens.0,
            max_rows: e.max_rows,
            mask_ratio: e.mask_ratio.unwrap_or(EVAL_MASK_RATIO),
            tasks: e.tasks,
            task_limit: e.limit,
            tasks_every_tokens: e.at.0,
            tasks_dir: e.tasks_dir,
        }),
    }
}

// --------------------------------------------------------------- helpers

fn parse_table(file: &str, text: &str) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>().map_err(|e| {
        let (line, column) = e
            .span()
            .map(|span| line_column(text, span.start))
            .unwrap_or((0, 0));
        ConfigError::Syntax {
            file: file.to_string(),
            line,
            column,
            message: e.message().trim().to_string(),
        }
    })
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn from_table<T: de::DeserializeOwned>(file: &str, table: toml::Table) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        let message = e.into_inner().to_string();
        let message = message.trim().to_string();
        // An unknown key that is itself empty ("" = 1) leaves an empty
        // path; the message still names it ("unknown field ``").
        if key == "." || key.trim().is_empty() {
            ConfigError::Other {
                file: file.to_string(),
                message,
            }
        } else {
            ConfigError::key(file, key, message)
        }
    })
}

/// Applies one `key.path=value` override. The path uses dots and `[i]` (or
/// `.i`) for array items: `phases[0].tokens=1M`, `optimizer.peak_lr=1e-3`.
/// The value is read as TOML (numbers, booleans, quoted strings, arrays);
/// anything that is not valid TOML is taken as a plain string.
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<(), String> {
    let (path, raw) = assignment
        .split_once('=')
        .ok_or_else(|| "expected key=value".to_string())?;
    let path = path.trim();
    if path.is_empty() {
        return Err("expected key=value, the key is empty".to_string());
    }
    let value = parse_value(raw.trim());
    let segments = split_path(path)?;
    let (last, parents) = segments
        .split_last()
        .ok_or_else(|| "expected key=value, the key is empty".to_string())?;
    let mut current = Slot::Table(table);
    let mut walked = String::new();
    for segment in parents {
        current = current.descend(segment, &walked)?;
        walked = join_path(&walked, segment);
    }
    current.set(last, value, &walked)
}

fn parse_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

fn split_path(path: &str) -> Result<Vec<Segment>, String> {
    let mut segments = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            match key.parse::<usize>() {
                Ok(i) if !segments.is_empty() => segments.push(Segment::Index(i)),
                _ => segments.push(Segment::Key(key.to_string())),
            }
        } else if rest.is_empty() {
            return Err(format!("key {path:?} has an empty part"));
        }
        while !rest.is_empty() {
            let close = rest
                .find(']')
                .ok_or_else(|| format!("key {path:?} has an unclosed ["))?;
            let index = rest[1..close]
                .parse::<usize>()
                .map_err(|_| format!("key {path:?}: {:?} is not an index", &rest[1..close]))?;
            segments.push(Segment::Index(index));
            rest = &rest[close + 1..];
            if !rest.is_empty() && !rest.starts_with('[') {
                return Err(format!("key {path:?}: unexpected {rest:?}"));
            }
        }
    }
    Ok(segments)
}

fn join_path(walked: &str, segment: &Segment) -> String {
    match segment {
        Segment::Key(k) if walked.is_empty() => k.clone(),
        Segment::Key(k) => format!("{walked}.{k}"),
        Segment::Index(i) => format!("{walked}[{i}]"),
    }
}

enum Slot<'a> {
    Table(&'a mut toml::Table),
    Array(&'a mut Vec<toml::Value>),
}

impl<'a> Slot<'a> {
    fn descend(self, segment: &Segment, walked: &str) -> Result<Slot<'a>, String> {
        let next = match (self, segment) {
            (Slot::Table(t), Segment::Key(k)) => t
                .entry(k.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new())),
            (Slot::Array(a), Segment::Index(i)) => {
                let len = a.len();
                a.get_mut(*i).ok_or_else(|| {
                    format!("{walked}[{i}]: there are only {len} entries in {walked}")
                })?
            }
            (Slot::Table(_), Segment::Index(i)) => {
                return Err(format!(
                    "{}: is a table, not a list",
                    join_path(walked, &Segment::Index(*i))
                ));
            }
            (Slot::Array(_), Segment::Key(k)) => {
                return Err(format!("{walked}: is a list; use {walked}[N].{k}"));
            }
        };
        let here = join_path(walked, segment);
        match next {
            toml::Value::Table(t) => Ok(Slot::Table(t)),
            toml::Value::Array(a) => Ok(Slot::Array(a)),
            _ => Err(format!("{here}: is a single value, not a table or list")),
        }
    }

    fn set(self, segment: &Segment, value: toml::Value, walked: &str) -> Result<(), String> {
        match (self, segment) {
            (Slot::Table(t), Segment::Key(k)) => {
                t.insert(k.clone(), value);
                Ok(())
            }
            (Slot::Array(a), Segment::Index(i)) => {
                let len = a.len();
                let slot = a.get_mut(*i).ok_or_else(|| {
                    format!("{walked}[{i}]: there are only {len} entries in {walked}")
                })?;
                *slot = value;
                Ok(())
            }
            (_, segment) => Err(format!(
                "{}: does not match the shape of the config",
                join_path(walked, segment)
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_configs() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs")
    }

    #[test]
    fn token_counts_accept_suffixes() {
        assert_eq!(parse_tokens("1.7T"), Ok(1_700_000_000_000));
        assert_eq!(parse_tokens("4B"), Ok(4_000_000_000));
        assert_eq!(parse_tokens("250m"), Ok(250_000_000));
        assert_eq!(parse_tokens("1_000"), Ok(1000));
        assert!(parse_tokens("-5").is_err());
        assert!(parse_tokens("lots").is_err());
    }

    #[test]
    fn every_builtin_model_parses() {
        for name in builtin_model_names() {
            let model = load_model(name, Path::new(".")).expect(name);
            assert_eq!(model.name, name);
        }
        let m = load_model("ettin-150m", Path::new(".")).expect("ettin-150m");
        assert_eq!((m.num_layers, m.hidden_size, m.num_heads), (22, 768, 12));
    }

    #[test]
    fn unknown_model_lists_the_choices() {
        let err = load_model("ettin-2b", Path::new("."))
            .expect_err("must fail")
            .to_string();
        assert!(
            err.contains("ettin-2b") && err.contains("ettin-17m"),
            "{err}"
        );
    }

    #[test]
    fn every_shipped_run_recipe_loads() {
        let dir = repo_configs().join("runs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("configs/runs") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                load_run(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 3, "expected the encoder, decoder and tiny recipes");
    }

    const TINY: &str = r#"
name = "t"
model = "tiny"
objective = "mlm"
dataset = "file:///tmp/data"
world_size = 2
global_batch = 8
[optimizer]
peak_lr = 1e-3
[checkpoint]
root = "file:///tmp/ckpt"
[[phases]]
name = "pretrain"
tokens = "1M"
seq_len = 128
mask_ratio = 0.3
[[phases]]
name = "decay"
tokens = 100000
seq_len = 256
mask_ratio = 0.15
lr = { shape = "one_minus_sqrt", start_factor = 0.5, end_factor = 0.02 }
"#;

    fn parse(text: &str, overrides: &[&str]) -> Result<RunSpec, ConfigError> {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        parse_run("run.toml", text, &overrides, Path::new("."))
    }

    #[test]
    fn a_run_file_becomes_a_spec() {
        let spec = parse(TINY, &[]).expect("valid");
        assert_eq!(spec.phases.len(), 2);
        assert_eq!(spec.phases[0].tokens, 1_000_000);
        assert_eq!(spec.phases[1].dataset_phase, "decay");
        let lr = spec.phases[1].lr.as_ref().expect("lr");
        assert_eq!(lr.shape, LrShape::OneMinusSqrt as i32);
        assert_eq!((lr.start_factor, lr.end_factor), (0.5, 0.02));
        assert_eq!(spec.model.as_ref().map(|m| m.name.as_str()), Some("tiny"));
        assert_eq!(spec.optimizer.as_ref().map(|o| o.beta2), Some(0.98));
    }

    #[test]
    fn the_eval_table_becomes_a_policy_masked_at_the_recipes_ratio() {
        assert_eq!(parse(TINY, &[]).expect("valid").eval, None);
        let text = TINY.replace(
            "[[phases]]\nname = \"pretrain\"",
            "[eval]\nevery_tokens = \"64K\"\nmax_rows = 32\n[[phases]]\nname = \"pretrain\"",
        );
        let spec = parse(&text, &[]).expect("valid");
        assert_eq!(
            spec.eval,
            Some(EvalPolicy {
                every_tokens: 64_000,
                max_rows: 32,
                mask_ratio: EVAL_MASK_RATIO,
                ..Default::default()
            })
        );
        let spec = parse(
            &text.replace(
                "max_rows = 32",
                "max_rows = 32\ntasks = [\"arc_easy\", \"piqa:rc_5shot\"]\nlimit = 50\nat = \"1M\"",
            ),
            &[],
        )
        .expect("valid");
        let policy = spec.eval.expect("policy");
        assert_eq!(policy.tasks, vec!["arc_easy", "piqa:rc_5shot"]);
        assert_eq!(
            (policy.task_limit, policy.tasks_every_tokens),
            (50, 1_000_000)
        );
        let spec = parse(&text, &["eval.at=phase_end"]).expect("valid");
        assert_eq!(spec.eval.map(|e| e.tasks_every_tokens), Some(0));
        let err = parse(&text, &["eval.at=weekly"])
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("phase_end") && err.contains("weekly"), "{err}");
        let spec = parse(&text, &["eval.mask_ratio=0.3"]).expect("valid");
        assert_eq!(spec.eval.map(|e| e.mask_ratio), Some(0.3));
        let err = parse(&text, &["eval.mask_ratio=1.5"])
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("eval.mask_ratio"), "{err}");
        let err = parse(&text.replace("max_rows", "rows"), &[])
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("eval") && err.contains("rows"), "{err}");
    }

    #[test]
    fn overrides_reach_nested_keys() {
        let spec = parse(
            TINY,
            &[
                "world_size=4",
                "phases[1].seq_len=512",
                "optimizer.peak_lr=2e-3",
                "dataset=file:///x",
            ],
        )
        .expect("valid");
        assert_eq!(spec.world_size, 4);
        assert_eq!(spec.phases[1].seq_len, 512);
        assert_eq!(spec.optimizer.as_ref().map(|o| o.peak_lr), Some(2e-3));
        assert_eq!(spec.dataset, "file:///x");
        let spec = parse(TINY, &["phases.0.tokens=2M"]).expect("dotted index");
        assert_eq!(spec.phases[0].tokens, 2_000_000);
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let text = TINY.replace("seq_len = 256", "seq_len = 256\nsequence_length = 3");
        let err = parse(&text, &[]).expect_err("must fail").to_string();
        assert!(err.starts_with("run.toml: phases[1]"), "{err}");
        assert!(
            err.contains("sequence_length") && err.contains("seq_len"),
            "{err}"
        );
    }

    #[test]
    fn negative_budget_is_rejected_by_key() {
        let err = parse(TINY, &["phases[0].tokens=-5"])
            .expect_err("must fail")
            .to_string();
        assert!(
            err.contains("phases[0].tokens") && err.contains("negative"),
            "{err}"
        );
    }

    #[test]
    fn override_errors_say_which_override() {
        let err = parse(TINY, &["phases[7].seq_len=1"])
            .expect_err("must fail")
            .to_string();
        assert!(
            err.contains("--set phases[7].seq_len=1") && err.contains("only 2"),
            "{err}"
        );
        let err = parse(TINY, &["no_equals_sign"])
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("key=value"), "{err}");
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let err = parse("name = \"x\"\nworld_size = = 2\n", &[]).expect_err("must fail");
        match err {
            ConfigError::Syntax { line, .. } => assert_eq!(line, 2),
            other => panic!("expected a syntax error, got {other}"),
        }
    }

    #[test]
    fn bad_values_name_the_key_and_the_rule() {
        let cases = [
            ("phases[0].seq_len=8", "phases[0].seq_len"),
            ("phases[1].seq_len=4096", "phases[1].seq_len"),
            ("world_size=3", "world_size"),
            ("phases[0].tokens=0", "phases[0].tokens"),
            ("objective=\"mxm\"", "objective"),
            ("model=\"ettin-2b\"", "model"),
            ("phases[0].mask_ratio=1.5", "phases[0].mask_ratio"),
        ];
        for (set, key) in cases {
            let err = parse(TINY, &[set]).expect_err("must fail").to_string();
            assert!(err.contains(&format!("run.toml: {key}:")), "{set}: {err}");
        }
        let no_phases = TINY
            .split("[[phases]]")
            .next()
            .unwrap_or_default()
            .to_string();
        let err = parse(&no_phases, &[]).expect_err("must fail").to_string();
        assert!(err.contains("run.toml: phases:"), "{err}");
    }

    fn with_warmup(warmup: &str) -> String {
        TINY.replace(
            "[optimizer]",
            &format!("batch_warmup = {warmup}\n[optimizer]"),
        )
    }

    #[test]
    fn batch_warmup_parses_with_token_suffixes() {
        let spec = parse(&with_warmup(r#"{ start = 2, tokens = "64K" }"#), &[]).expect("valid");
        assert_eq!(
            spec.batch_warmup,
            Some(BatchWarmup {
                start: 2,
                tokens: 64_000
            })
        );
        // tiny phase 0: 1M tokens of 128; the ramp 2→8 in moves of 2 over
        // 64K tokens takes more, smaller steps than 1M / (8 × 128) = 976.
        assert!(crate::num_steps(&spec, 0) > 976);
        assert_eq!(crate::num_steps(&spec, 1), 100_000 / (8 * 256));
        assert_eq!(parse(TINY, &[]).expect("valid").batch_warmup, None);
    }

    #[test]
    fn precision_is_f32_or_bf16_mixed() {
        assert_eq!(parse(TINY, &[]).expect("valid").precision, "");
        let spec = parse(TINY, &["precision=\"bf16-mixed\""]).expect("valid");
        assert_eq!(spec.precision, "bf16-mixed");
        let err = parse(TINY, &["precision=\"fp8\""])
            .expect_err("must fail")
            .to_string();
        assert!(err.contains("precision") && err.contains("fp8"), "{err}");
    }

    #[test]
    fn bad_batch_warmups_name_the_key_and_the_rule() {
        let cases = [
            (
                r#"{ start = 0, tokens = "64K" }"#,
                "batch_warmup.start",
                "at least 1",
            ),
            (
                r#"{ start = 3, tokens = "64K" }"#,
                "batch_warmup.start",
                "multiple",
            ),
            (
                r#"{ start = 10, tokens = "64K" }"#,
                "batch_warmup.start",
                "global_batch 8",
            ),
            (
                r#"{ start = 2, tokens = "2M" }"#,
                "batch_warmup.tokens",
                "phase 0",
            ),
            (
                r#"{ start = 2, tokens = 0 }"#,
                "batch_warmup.tokens",
                "positive",
            ),
            (
                r#"{ start = 2, tokens = "-1K" }"#,
                "batch_warmup.tokens",
                "negative",
            ),
            (r#"{ start = 2, tokenz = 5 }"#, "batch_warmup", "tokenz"),
        ];
        for (warmup, key, rule) in cases {
            let err = parse(&with_warmup(warmup), &[])
                .expect_err("must fail")
                .to_string();
            assert!(
                err.contains(&format!("run.toml: {key}")) && err.contains(rule),
                "{warmup}: {err}"
            );
        }
        // A ramp that could take millions of steps is refused up front.
        let err = parse(
            &with_warmup(r#"{ start = 2, tokens = "1T" }"#),
            &["phases[0].tokens=\"1T\""],
        )
        .expect_err("must fail")
        .to_string();
        assert!(
            err.contains("run.toml: batch_warmup.start") && err.contains("steps"),
            "{err}"
        );
    }
}
