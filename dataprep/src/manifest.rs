//! `manifest.json` and the per-file completion markers. The manifest is
//! written last; a dataset without one does not exist.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::read::Issue;

/// Version of the on-storage layout described in DESIGN.md.
pub const FORMAT_VERSION: u32 = 1;

/// Name of the manifest at the dataset root.
pub const MANIFEST: &str = "manifest.json";

/// Name of the stored tokenizer at the dataset root.
pub const TOKENIZER: &str = "tokenizer.json";

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    pub seed: u64,
    /// Minimum length of non-first pieces.
    pub min_piece_tokens: u32,
    /// Token budget from the config.
    pub budget_tokens: u64,
    /// Rows written.
    pub sequences: u64,
    /// Tokens written (sequences × seq_len).
    pub tokens: u64,
    /// Tokens written per source name.
    pub tokens_per_source: BTreeMap<String, u64>,
    /// Drawn tokens left out: the partial last row, and rows beyond
    /// floor(budget / seq_len) when the sources' draws overshoot.
    pub tail_tokens_dropped: u64,
    /// Sampling per source.
    pub draws: Vec<Draw>,
    /// Shards in order.
    pub shards: Vec<FileEntry>,
}

/// The dataset's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// `twinhead-dataprep`.
    pub program: String,
    /// Version of the program that wrote it.
    pub program_version: String,
    /// Dataset name.
    pub name: String,
    /// The config file, verbatim.
    pub config: String,
    /// sha256 of `config`.
    pub config_sha256: String,
    /// Tokenizer stored with the dataset.
    pub tokenizer: TokenizerInfo,
    /// Sources in config order.
    pub sources: Vec<SourceStats>,
    /// Phases in config order.
    pub phases: Vec<PhaseStats>,
    /// The reference sets documents were checked against, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decontamination: Option<DecontaminationInfo>,
}

/// What a build decontaminated against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
