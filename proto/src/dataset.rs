//! Dataset config (`configs/data/*.toml`): the raw serde shape, checked with
//! `deny_unknown_fields`, then validated into [`DatasetConfig`], which cannot
//! hold a bad value. Every error names the file and the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A dataset config that cannot be read or is not valid; names the file and key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read.
    #[error("cannot read config {path}: {source}")]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for the schema (names the key
    /// path; a syntax error, which has none, names the line instead).
    #[error("{path}: {}{message}", key_prefix(.key))]
    ConfigParse {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// The config parsed but a value is not allowed.
    #[error("{path}: {key}: {message}")]
    ConfigInvalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// `key: ` before a message, or nothing for an empty key path.
fn key_prefix(key: &str) -> String {
    if key.trim().is_empty() {
        String::new()
    } else {
        format!("{key}: ")
    }
}

// ---------------------------------------------------------------- raw shape

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    name: Option<String>,
    on_error: Option<OnError>,
    tokenizer: RawTokenizer,
    #[serde(default)]
    output: RawOutput,
    sources: Vec<RawSource>,
    phases: Vec<RawPhase>,
    decontamination: Option<RawDecontamination>,
    eval: Option<RawEval>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEval {
    fraction: f64,
    max_docs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDecontamination {
    ngram: Option<usize>,
    references: Vec<RawReference>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReference {
    input: String,
    format: Format,
    text_field: Option<String>,
    text_fields: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenizer {
    path: Option<String>,
    /// A base tokenizer.json (the OLMo BPE) turned into the Ettin layout.
    ettin_from: Option<String>,
    train: Option<RawTrain>,
    cls_token: Option<String>,
    sep_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrain {
    vocab_size: u32,
    min_frequency: Option<u64>,
    /// At most this many characters of kept text (taken per source in input
    /// order, sources in config order) feed training.
    max_chars: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    rows_per_shard: Option<u64>,
    rows_per_row_group: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: String,
    input: String,
    format: Format,
    text_field: Option<String>,
    text_fields: Option<Vec<String>>,
    id_field: Option<String>,
    extensions: Option<Vec<String>>,
    files_per_part: Option<u64>,
    max_files: Option<u64>,
    max_docs: Option<u64>,
    max_chars: Option<u64>,
    #[serde(default)]
    filters: Filters,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPhase {
    name: String,
    seq_len: u32,
    tokens: u64,
    seed: u64,
    min_piece_tokens: Option<u32>,
    weights: BTreeMap<String, f64>,
}

// ---------------------------------------------------------- validated types

/// What to do with an input that cannot be read as a whole (missing, empty or
/// truncated compressed stream, broken parquet). Bad *lines* are always
/// counted as rejected and skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Count the input as rejected, keep what was read before the damage.
    Skip,
    /// Fail the build with the input's name and the reason.
    Fail,
}

/// Input format of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Format {
    /// One JSON object per line.
    #[serde(rename = "jsonl")]
    Jsonl,
    /// Gzip-compressed JSON lines.
    #[serde(rename = "jsonl.gz")]
    JsonlGz,
    /// Zstd-compressed JSON lines.
    #[serde(rename = "jsonl.zst")]
    JsonlZst,
    /// Parquet with a string column.
    #[serde(rename = "parquet")]
    Parquet,
    /// Plain text or source files: each file is one document.
    #[serde(rename = "text")]
    Text,
}

/// Quality filters of one source; every field is optional (absent: off).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Filters {
    /// Minimum characters after normalization.
    pub min_chars: Option<u64>,
    /// Maximum characters after normalization.
    pub max_chars: Option<u64>,
    /// Allowed range of the mean word length, `[min, max]` (Gopher: 3..10).
    pub mean_word_length: Option<[f64; 2]>,
    /// Maximum fraction of non-space characters that are neither letters,
    /// digits nor common punctuation.
    pub max_symbol_ratio: Option<f64>,
    /// Maximum fraction of non-space characters that are digits.
    pub max_digit_ratio: Option<f64>,
    /// Maximum fraction of non-empty lines that repeat an earlier line
    /// (Gopher: 0.30).
    pub max_repeated_lines: Option<f64>,
    /// Gopher top n-gram rule: for each `{ n, max_fraction }`, the characters
    /// in the most frequent word n-gram over all word characters.
    #[serde(default)]
    pub top_ngrams: Vec<NgramRule>,
    /// Gopher duplicate n-gram rule: for each `{ n, max_fraction }`, the
    /// characters of words covered by an n-gram seen more than once.
    #[serde(default)]
    pub duplicate_ngrams: Vec<NgramRule>,
}

/// One n-gram threshold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NgramRule {
    /// Words per n-gram.
    pub n: usize,
    /// Largest allowed fraction.
    pub max_fraction: f64,
}

/// Documents that share a word n-gram with a reference set (evaluation
/// data) are dropped from every source, counted as `decontaminated`.
#[derive(Debug, Clone, PartialEq)]
pub struct Decontamination {
    /// Words per n-gram (13, as GPT-3's overlap analysis used).
    pub ngram: usize,
    /// Reference inputs, read like sources (named `reference-N`, no filters).
    pub references: Vec<SourceConfig>,
}

/// Documents held out of training for evaluation (`eval = { fraction = …,
/// max_docs = … }`). Each source's documents are chosen by a stable hash of
/// the source name and the document id, so the split does not depend on
/// the order of reading, the thread count or the process count; held-out
/// documents appear in no phase's training rows and are packed per phase
/// into eval shards of their own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalSplit {
    /// Share of each source's documents held out, in (0, 0.5].
    pub fraction: f64,
    /// At most this many per source: those with the smallest hashes.
    pub max_docs: Option<u64>,
}

/// How the tokenizer is obtained.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerSpec {
    /// A `tokenizer.json` (path relative to the config file, or absolute).
    Path {
        path: PathBuf,
        cls_token: String,
        sep_token: String,
    },
    /// The Ettin layout (specials and unused tokens appended, `[CLS] $A
    /// [SEP]`) built from a base `tokenizer.json`, the OLMo BPE.
    Ettin { base: PathBuf },
    /// Train a byte-level BPE on the kept documents.
    Train {
        vocab_size: u32,
        min_frequency: u64,
        max_chars: u64,
    },
}

/// One validated source.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    /// Name, unique, `[A-Za-z0-9_-]+`.
    pub name: String,
    /// Input URL or local path (resolved), possibly with glob characters.
    pub input: String,
    /// Input format.
    pub format: Format,
    /// Dotted field paths joined with a blank line (jsonl and parquet).
    pub text_fields: Vec<String>,
    /// Dotted field path of the document id; absent: `<file>:<line>`.
    pub id_field: Option<String>,
    /// For `text`: only files with these extensions (without dot).
    pub extensions: Vec<String>,
    /// For `text`: how many files make one stage-1 part.
    pub files_per_part: usize,
    /// Only the first N input files (sorted by path).
    pub max_files: Option<u64>,
    /// Keep at most N documents (first in input order).
    pub max_docs: Option<u64>,
    /// Keep documents until this many characters are kept.
    pub max_chars: Option<u64>,
    /// Quality filters.
    pub filters: Filters,
}

/// One validated phase.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseConfig {
    /// Name, unique, `[A-Za-z0-9_-]+`.
    pub name: String,
    /// Tokens per row.
    pub seq_len: u32,
    /// Token budget of the phase.
    pub tokens: u64,
    /// Seed of sampling and shuffles.
    pub seed: u64,
    /// Non-first pieces of a split document shorter than this are dropped.
    pub min_piece_tokens: u32,
    /// Weight per source index (same order as `sources`), zero when absent.
    pub weights: Vec<f64>,
}

/// A parsed and validated dataset config.
#[derive(Debug, Clone)]
pub struct DatasetConfig {
    /// The file it came from.
    pub path: PathBuf,
    /// Its bytes, verbatim (recorded in the manifest).
    pub text: String,
    /// sha256 of `text`, hex.
    pub sha256: String,
    /// Dataset name (default: the file stem).
    pub name: String,
    /// Policy for unreadable inputs.
    pub on_error: OnError,
    /// Tokenizer.
    pub tokenizer: TokenizerSpec,
    /// Rows per phase shard.
    pub rows_per_shard: u64,
    /// Rows per parquet row group in phase shards.
    pub rows_per_row_group: u64,
    /// Sources, in config order (their index is the `source` id in shards).
    pub sources: Vec<SourceConfig>,
    /// Phases, in config order.
    pub phases: Vec<PhaseConfig>,
    /// Decontamination against reference sets, if configured.
    pub decontamination: Option<Decontamination>,
    /// The held-out split, if configured.
    pub eval: Option<EvalSplit>,
}

impl DatasetConfig {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parse and validate config text; `path` names it in errors and anchors
    /// relative input paths (relative to the file's folder).
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let perr = |key: String, message: String| Error::ConfigParse {
            path: path.to_path_buf(),
            key,
            message,
        };
        let de = toml::Deserializer::parse(text).map_err(|e| perr(String::new(), e.to_string()))?;
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            perr(key, e.into_inner().to_string().trim().replace('\n', " "))
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        validate(path, &base, text, raw)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn resolve_input(base: &Path, input: &str) -> String {
    if input.contains("://") {
        return input.to_string();
    }
    let p = Path::new(input);
    if p.is_absolute() {
        input.to_string()
    } else {
        base.join(p).to_string_lossy().into_owned()
    }
}

/// The text fields of a source: none for `text`, else `text_field`,
/// `text_fields` or `text`. An error names the key (relative to the source).
fn text_fields(
    format: Format,
    one: Option<String>,
    many: Option<Vec<String>>,
) -> std::result::Result<Vec<String>, (&'static str, String)> {
    let fields = match (format, one, many) {
        (Format::Text, None, None) => Vec::new(),
        (Format::Text, _, _) => {
            return Err(("text_field", "format \"text\" takes no text field".into()));
        }
        (_, Some(_), Some(_)) => {
            return Err((
                "text_fields",
                "set `text_field` or `text_fields`, not both".into(),
            ));
        }
        (_, Some(f), None) => vec![f],
        (_, None, Some(fs)) if !fs.is_empty() => fs,
        (_, None, _) => vec!["text".to_string()],
    };
    if fields
        .iter()
        .any(|f| f.is_empty() || f.split('.').any(str::is_empty))
    {
        return Err((
            "text_fields",
            "field paths must be non-empty, dotted like `doc.text`".into(),
        ));
    }
    Ok(fields)
}

fn validate(path: &Path, base: &Path, text: &str, raw: RawConfig) -> Result<DatasetConfig> {
    let bad = |key: &str, message: String| Error::ConfigInvalid {
        path: path.to_path_buf(),
        key: key.to_string(),
        message,
    };
    let name = match raw.name {
        Some(n) if !valid_name(&n) => {
            return Err(bad("name", format!("{n:?} must be 1-64 of [A-Za-z0-9_-]")));
        }
        Some(n) => n,
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dataset".to_string()),
    };

    let given = [
        raw.tokenizer.path.is_some(),
        raw.tokenizer.ettin_from.is_some(),
        raw.tokenizer.train.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(bad(
            "tokenizer",
            "set exactly one of `path`, `ettin_from` and `train`".into(),
        ));
    }
    if let Some(b) = &raw.tokenizer.ettin_from
        && (raw.tokenizer.cls_token.is_some() || raw.tokenizer.sep_token.is_some())
    {
        return Err(bad(
            "tokenizer.cls_token",
            format!(
                "the Ettin layout built from {b:?} always frames documents with [CLS] and [SEP]"
            ),
        ));
    }
    let tokenizer = match (raw.tokenizer.path, raw.tokenizer.train) {
        (_, _) if raw.tokenizer.ettin_from.is_some() => TokenizerSpec::Ettin {
            base: PathBuf::from(resolve_input(
                base,
                raw.tokenizer.ettin_from.as_deref().unwrap_or_default(),
            )),
        },
        (Some(p), _) => TokenizerSpec::Path {
            path: PathBuf::from(resolve_input(base, &p)),
            cls_token: raw.tokenizer.cls_token.unwrap_or_else(|| "[CLS]".into()),
            sep_token: raw.tokenizer.sep_token.unwrap_or_else(|| "[SEP]".into()),
        },
        (None, Some(t)) => {
            if raw.tokenizer.cls_token.is_some() || raw.tokenizer.sep_token.is_some() {
                return Err(bad(
                    "tokenizer.cls_token",
                    "a trained tokenizer always uses [CLS]=1 and [SEP]=2".into(),
                ));
            }
            if !(300..=1_000_000).contains(&t.vocab_size) {
                return Err(bad(
                    "tokenizer.train.vocab_size",
                    format!(
                        "{} must be in 300..=1000000 (256 bytes + 5 specials + merges)",
                        t.vocab_size
                    ),
                ));
            }
            TokenizerSpec::Train {
                vocab_size: t.vocab_size,
                min_frequency: t.min_frequency.unwrap_or(2),
                max_chars: t.max_chars.unwrap_or(50_000_000),
            }
        }
        (None, None) => {
            return Err(bad(
                "tokenizer",
                "set `path`, `ettin_from` or `train`".into(),
            ));
        }
    };

    let rows_per_shard = raw.output.rows_per_shard.unwrap_or(1024);
    if rows_per_shard == 0 {
        return Err(bad("output.rows_per_shard", "must be > 0".into()));
    }
    let rows_per_row_group = raw.output.rows_per_row_group.unwrap_or(rows_per_shard);
    if rows_per_row_group == 0 || !rows_per_shard.is_multiple_of(rows_per_row_group) {
        return Err(bad(
            "output.rows_per_row_group",
            format!(
                "{rows_per_row_group} must be > 0 and divide rows_per_shard ({rows_per_shard})"
            ),
        ));
    }

    if raw.sources.is_empty() {
        return Err(bad("sources", "at least one source is needed".into()));
    }
    if raw.sources.len() > usize::from(u16::MAX) {
        return Err(bad("sources", "at most 65535 sources".into()));
    }
    let mut sources = Vec::with_capacity(raw.sources.len());
    for (i, s) in raw.sources.into_iter().enumerate() {
        let key = |k: &str| format!("sources[{i}].{k}");
        if !valid_name(&s.name) {
            return Err(bad(
                &key("name"),
                format!("{:?} must be 1-64 of [A-Za-z0-9_-]", s.name),
            ));
        }
        if sources.iter().any(|o: &SourceConfig| o.name == s.name) {
            return Err(bad(
                &key("name"),
                format!("{:?} is used by an earlier source", s.name),
            ));
        }
        let text_fields =
            text_fields(s.format, s.text_field, s.text_fields).map_err(|(k, m)| bad(&key(k), m))?;
        if s.format != Format::Text && (s.extensions.is_some() || s.files_per_part.is_some()) {
            return Err(bad(
                &key("extensions"),
                "`extensions` and `files_per_part` apply to format \"text\" only".into(),
            ));
        }
        let files_per_part = s.files_per_part.unwrap_or(256);
        if files_per_part == 0 {
            return Err(bad(&key("files_per_part"), "must be > 0".into()));
        }
        let f = &s.filters;
        let frac = |k: &str, v: Option<f64>| -> Result<()> {
            match v {
                Some(x) if !(0.0..=1.0).contains(&x) => Err(bad(
                    &key(&format!("filters.{k}")),
                    format!("{x} must be in [0, 1]"),
                )),
                _ => Ok(()),
            }
        };
        frac("max_symbol_ratio", f.max_symbol_ratio)?;
        frac("max_digit_ratio", f.max_digit_ratio)?;
        frac("max_repeated_lines", f.max_repeated_lines)?;
        if let (Some(a), Some(b)) = (f.min_chars, f.max_chars)
            && a > b
        {
            return Err(bad(
                &key("filters.min_chars"),
                format!("{a} exceeds max_chars {b}"),
            ));
        }
        if let Some([a, b]) = f.mean_word_length
            && !(a.is_finite() && b.is_finite() && 0.0 <= a && a <= b)
        {
            return Err(bad(
                &key("filters.mean_word_length"),
                format!("[{a}, {b}] must be a range 0 <= min <= max"),
            ));
        }
        for (k, rules) in [
            ("top_ngrams", &f.top_ngrams),
            ("duplicate_ngrams", &f.duplicate_ngrams),
        ] {
            for (j, r) in rules.iter().enumerate() {
                if !(1..=32).contains(&r.n) || !(0.0..=1.0).contains(&r.max_fraction) {
                    return Err(bad(
                        &key(&format!("filters.{k}[{j}]")),
                        format!(
                            "n = {} must be in 1..=32 and max_fraction = {} in [0, 1]",
                            r.n, r.max_fraction
                        ),
                    ));
                }
            }
        }
        if s.input.trim().is_empty() {
            return Err(bad(&key("input"), "must not be empty".into()));
        }
        sources.push(SourceConfig {
            name: s.name,
            input: resolve_input(base, &s.input),
            format: s.format,
            text_fields,
            id_field: s.id_field,
            extensions: s.extensions.unwrap_or_default(),
            files_per_part: usize::try_from(files_per_part).unwrap_or(usize::MAX),
            max_files: s.max_files,
            max_docs: s.max_docs,
            max_chars: s.max_chars,
            filters: s.filters,
        });
    }

    if raw.phases.is_empty() {
        return Err(bad("phases", "at least one phase is needed".into()));
    }
    let mut phases = Vec::with_capacity(raw.phases.len());
    for (i, p) in raw.phases.into_iter().enumerate() {
        let key = |k: &str| format!("phases[{i}].{k}");
        if !valid_name(&p.name) {
            return Err(bad(
                &key("name"),
                format!("{:?} must be 1-64 of [A-Za-z0-9_-]", p.name),
            ));
        }
        if phases.iter().any(|o: &PhaseConfig| o.name == p.name) {
            return Err(bad(
                &key("name"),
                format!("{:?} is used by an earlier phase", p.name),
            ));
        }
        if !(8..=1 << 20).contains(&p.seq_len) {
            return Err(bad(
                &key("seq_len"),
                format!("{} must be in 8..=1048576", p.seq_len),
            ));
        }
        if p.tokens < u64::from(p.seq_len) {
            return Err(bad(
                &key("tokens"),
                format!("{} is less than one row of seq_len {}", p.tokens, p.seq_len),
            ));
        }
        let min_piece_tokens = p
            .min_piece_tokens
            .unwrap_or_else(|| 128.min(p.seq_len / 8).max(1));
        if min_piece_tokens > p.seq_len {
            return Err(bad(
                &key("min_piece_tokens"),
                format!("{min_piece_tokens} exceeds seq_len {}", p.seq_len),
            ));
        }
        let mut weights = vec![0.0; sources.len()];
        for (src, w) in &p.weights {
            let Some(j) = sources.iter().position(|s| &s.name == src) else {
                let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
                return Err(bad(
                    &key(&format!("weights.{src}")),
                    format!("no source named {src:?}; sources: {names:?}"),
                ));
            };
            if !(w.is_finite() && *w >= 0.0) {
                return Err(bad(
                    &key(&format!("weights.{src}")),
                    format!("{w} must be a finite number >= 0"),
                ));
            }
            weights[j] = *w;
        }
        if weights.iter().sum::<f64>() <= 0.0 {
            return Err(bad(
                &key("weights"),
                "at least one weight must be > 0".into(),
            ));
        }
        phases.push(PhaseConfig {
            name: p.name,
            seq_len: p.seq_len,
            tokens: p.tokens,
            seed: p.seed,
            min_piece_tokens,
            weights,
        });
    }

    let decontamination = match raw.decontamination {
        None => None,
        Some(d) => {
            let ngram = d.ngram.unwrap_or(13);
            if !(4..=64).contains(&ngram) {
                return Err(bad(
                    "decontamination.ngram",
                    format!("{ngram} must be in 4..=64 words"),
                ));
            }
            if d.references.is_empty() {
                return Err(bad(
                    "decontamination.references",
                    "at least one reference input is needed".into(),
                ));
            }
            let mut references = Vec::with_capacity(d.references.len());
            for (i, r) in d.references.into_iter().enumerate() {
                let key = |k: &str| format!("decontamination.references[{i}].{k}");
                if r.input.trim().is_empty() {
                    return Err(bad(&key("input"), "must not be empty".into()));
                }
                let text_fields = text_fields(r.format, r.text_field, r.text_fields)
                    .map_err(|(k, m)| bad(&key(k), m))?;
                references.push(SourceConfig {
                    name: format!("reference-{i}"),
                    input: resolve_input(base, &r.input),
                    format: r.format,
                    text_fields,
                    id_field: None,
                    extensions: Vec::new(),
                    files_per_part: 1,
                    max_files: None,
                    max_docs: None,
                    max_chars: None,
                    filters: Filters::default(),
                });
            }
            Some(Decontamination { ngram, references })
        }
    };

    let eval = match raw.eval {
        None => None,
        Some(e) => {
            if !(e.fraction > 0.0 && e.fraction <= 0.5) {
                return Err(bad(
                    "eval.fraction",
                    format!("{} must be in (0, 0.5]", e.fraction),
                ));
            }
            if e.max_docs == Some(0) {
                return Err(bad(
                    "eval.max_docs",
                    "must be at least 1 (leave it out for no cap)".into(),
                ));
            }
            Some(EvalSplit {
                fraction: e.fraction,
                max_docs: e.max_docs,
            })
        }
    };

    Ok(DatasetConfig {
        path: path.to_path_buf(),
        text: text.to_string(),
        sha256: hex::encode(Sha256::digest(text.as_bytes())),
        name,
        on_error: raw.on_error.unwrap_or(OnError::Skip),
        tokenizer,
        rows_per_shard,
        rows_per_row_group,
        sources,
        phases,
        decontamination,
        eval,
    })
}
