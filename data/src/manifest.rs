//! `manifest.json` and the per-file completion markers. The manifest is
//! written last; a dataset without one does not exist.
//!
//! Readers are tolerant where it costs nothing: unknown keys are ignored,
//! and every key but those needed to find and check the shards (`phases`;
//! a phase's `name`, `seq_len`, `sequences`, `shards`; a shard's `path`,
//! `rows`, `sha256`) defaults when absent. A missing needed key is reported by its path
//! (`phases[1].shards[0].rows`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::FormatError;

/// Version of the on-storage layout described in DESIGN.md.
pub const FORMAT_VERSION: u32 = 1;

/// Name of the manifest at the dataset root.
pub const MANIFEST: &str = "manifest.json";

/// Name of the stored tokenizer at the dataset root.
pub const TOKENIZER: &str = "tokenizer.json";

/// A problem met while reading an input, with where it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issue {
    /// Input file.
    pub input: String,
    /// 1-based line (jsonl) or row (parquet), when it concerns one record.
    pub line: Option<u64>,
    /// Counter name (`malformed_json`, `invalid_utf8`, `missing_text`,
    /// `unreadable_input`).
    pub reason: String,
    /// Details.
    pub message: String,
}

/// A file of the dataset with its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the dataset root.
    pub path: String,
    /// Rows (documents for stage-1 parts, sequences for shards).
    pub rows: u64,
    /// sha256 of the file's bytes, hex.
    pub sha256: String,
}

/// The tokenizer stored with the dataset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TokenizerInfo {
    /// `tokenizer.json`.
    pub path: String,
    /// sha256 of its bytes.
    pub sha256: String,
    /// Vocabulary size including special tokens.
    pub vocab_size: u32,
    /// Id opening every document.
    pub cls_id: u32,
    /// Id closing every document.
    pub sep_id: u32,
    /// Trained by dataprep on this corpus (else loaded from a path).
    pub trained: bool,
}

/// Stage-1 statistics of one source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SourceStats {
    /// Source name.
    pub name: String,
    /// Index used in shards' `source` column.
    pub index: u16,
    /// Input files read.
    pub files: u64,
    /// Records read (documents and rejected records).
    pub read: u64,
    /// Records rejected while reading, by reason (malformed_json,
    /// invalid_utf8, missing_text, unreadable_input counts whole inputs).
    pub rejected: BTreeMap<String, u64>,
    /// Documents dropped by each filter, by `duplicate` (exact dedup) and by
    /// `over_limit` (max_docs / max_chars).
    pub dropped: BTreeMap<String, u64>,
    /// Documents kept.
    pub kept: u64,
    /// Characters kept (after normalization).
    pub chars: u64,
    /// Tokens kept, [CLS] and [SEP] included.
    pub tokens: u64,
    /// Stage-1 part files.
    pub parts: Vec<FileEntry>,
    /// First problems met while reading (all are counted in `rejected`).
    pub issues: Vec<Issue>,
}

/// How one source was drawn for a phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Draw {
    /// Source name.
    pub source: String,
    /// Its weight in the phase.
    pub weight: f64,
    /// Share of the budget: tokens × weight / Σ weights.
    pub target_tokens: u64,
    /// Tokens available after splitting (one epoch).
    pub available_tokens: u64,
    /// Tokens drawn (before packing).
    pub drawn_tokens: u64,
    /// Whole epochs repeated.
    pub full_epochs: u64,
    /// Whether a seeded subsample (of the last partial epoch) was taken.
    pub subsampled: bool,
    /// Tokens of non-first pieces dropped as shorter than `min_piece_tokens`.
    pub short_piece_tokens_dropped: u64,
}

/// One phase's shards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseStats {
    /// Phase name.
    pub name: String,
    /// Tokens per row.
    pub seq_len: u32,
    /// Seed of sampling and shuffles.
    #[serde(default)]
    pub seed: u64,
    /// Minimum length of non-first pieces.
    #[serde(default)]
    pub min_piece_tokens: u32,
    /// Token budget from the config.
    #[serde(default)]
    pub budget_tokens: u64,
    /// Rows written.
    pub sequences: u64,
    /// Tokens written (sequences × seq_len).
    #[serde(default)]
    pub tokens: u64,
    /// Tokens written per source name.
    #[serde(default)]
    pub tokens_per_source: BTreeMap<String, u64>,
    /// Drawn tokens left out: the partial last row, and rows beyond
    /// floor(budget / seq_len) when the sources' draws overshoot.
    #[serde(default)]
    pub tail_tokens_dropped: u64,
    /// Sampling per source.
    #[serde(default)]
    pub draws: Vec<Draw>,
    /// Shards in order.
    pub shards: Vec<FileEntry>,
    /// The phase's held-out rows, when the config holds documents out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalStats>,
}

/// A phase's held-out rows: every held-out document of the phase's
/// sources (weight > 0), packed at the phase's `seq_len` into shards of
/// their own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EvalStats {
    /// Held-out documents packed.
    pub docs: u64,
    /// Rows written.
    pub sequences: u64,
    /// Tokens written (sequences × seq_len).
    pub tokens: u64,
    /// Tokens written per source name.
    pub tokens_per_source: BTreeMap<String, u64>,
    /// The partial last row, and pieces shorter than `min_piece_tokens`.
    pub tail_tokens_dropped: u64,
    /// Eval shards in order (`phases/<phase>/eval-NNNNN.parquet`).
    pub shards: Vec<FileEntry>,
}

/// The dataset's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`]; 0 when absent.
    #[serde(default)]
    pub format_version: u32,
    /// `twinhead-dataprep`.
    #[serde(default)]
    pub program: String,
    /// Version of the program that wrote it.
    #[serde(default)]
    pub program_version: String,
    /// Dataset name.
    #[serde(default)]
    pub name: String,
    /// The config file, verbatim.
    #[serde(default)]
    pub config: String,
    /// sha256 of `config`.
    #[serde(default)]
    pub config_sha256: String,
    /// Tokenizer stored with the dataset.
    #[serde(default)]
    pub tokenizer: TokenizerInfo,
    /// Sources in config order.
    #[serde(default)]
    pub sources: Vec<SourceStats>,
    /// Phases in config order.
    pub phases: Vec<PhaseStats>,
    /// The reference sets documents were checked against, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decontamination: Option<DecontaminationInfo>,
}

/// What a build decontaminated against.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DecontaminationInfo {
    /// Words per n-gram.
    pub ngram: usize,
    /// Reference documents read.
    pub reference_docs: u64,
    /// Reference documents shorter than `ngram` words (they cannot match).
    pub reference_docs_too_short: u64,
    /// Distinct reference n-grams.
    pub ngrams: u64,
    /// sha256 of the sorted n-gram hashes: equal sets give equal digests.
    pub sha256: String,
}

/// Marker written after a file (or a stage) completed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    /// Build key the file was made under: `<config sha256>+<tokenizer sha256>`.
    pub config_sha256: String,
    /// The file.
    pub file: FileEntry,
    /// Tokens in the file.
    pub tokens: u64,
}

impl Manifest {
    /// Parses `bytes` read from `location` (named in errors, with the key path).
    pub fn parse(location: &str, bytes: &[u8]) -> Result<Self, FormatError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        serde_path_to_error::deserialize(de).map_err(|e| FormatError::Json {
            location: location.to_string(),
            message: format!("at `{}`: {}", e.path(), e.inner()),
        })
    }

    /// The phase called `name`.
    pub fn phase(&self, location: &str, name: &str) -> Result<&PhaseStats, FormatError> {
        self.phases
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| FormatError::MissingPhase {
                location: location.to_string(),
                phase: name.to_string(),
                available: self.phases.iter().map(|p| p.name.clone()).collect(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_keys_are_ignored_and_optional_ones_default() -> Result<(), FormatError> {
        let json = br#"{"format_version":1,"program":"twinhead-dataprep","sources":[],"future":7,
            "phases":[{"name":"pretrain","seq_len":8,"sequences":3,"seed":7,
            "shards":[{"path":"phases/pretrain/shard-00000.parquet","rows":3,"sha256":"ab"}]}]}"#;
        let m = Manifest::parse("m.json", json)?;
        assert_eq!(m.phases[0].tokens, 0);
        assert_eq!(m.phases[0].shards[0].rows, 3);
        assert!(m.phase("m.json", "pretrain").is_ok());
        let err = m.phase("m.json", "decay").err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("m.json has no phase `decay` (phases: [\"pretrain\"])")
        );
        Ok(())
    }

    #[test]
    fn a_missing_key_is_named_by_its_path() {
        let json = br#"{"phases":[{"name":"p","seq_len":8,"sequences":3,
            "shards":[{"path":"a","sha256":"ab"}]}]}"#;
        let err = Manifest::parse("gs://b/d/manifest.json", json)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("gs://b/d/manifest.json"), "{err}");
        assert!(err.contains("phases[0].shards[0]"), "{err}");
        assert!(err.contains("missing field `rows`"), "{err}");
    }

    #[test]
    fn what_is_written_reads_back() -> Result<(), FormatError> {
        let mut m = Manifest::parse(
            "m.json",
            br#"{"phases":[{"name":"p","seq_len":8,"sequences":1,"shards":[]}]}"#,
        )?;
        m.name = "sample".into();
        m.sources.push(SourceStats {
            name: "books".into(),
            index: 0,
            files: 1,
            read: 2,
            rejected: BTreeMap::from([("malformed_json".into(), 1)]),
            dropped: BTreeMap::new(),
            kept: 1,
            chars: 10,
            tokens: 5,
            parts: Vec::new(),
            issues: vec![Issue {
                input: "a.jsonl".into(),
                line: Some(2),
                reason: "malformed_json".into(),
                message: "expected value".into(),
            }],
        });
        let json = serde_json::to_vec(&m).map_err(|e| FormatError::Json {
            location: "m.json".into(),
            message: e.to_string(),
        })?;
        assert_eq!(Manifest::parse("m.json", &json)?, m);
        Ok(())
    }
}
