//! twinhead dataprep: public corpora in, filtered, tokenized, mixed and
//! packed parquet shards out, byte-for-byte reproducible from a config.
//!
//! Entry points for the CLI (`twinhead dataset build|verify|stats`):
//! [`build`], [`verify`] and [`stats`]. They are synchronous and CPU-bound;
//! from async code call them inside `tokio::task::spawn_blocking`. Their
//! reports derive `serde::Serialize` for `--json`.
//!
//! # Layout
//! - The config, `configs/data/*.toml`, is `twinhead_proto::dataset`'s.
//! - [`inputs`]: where a source's input files are (paths, URLs, globs).
//! - [`process`]: a dataprep process serving the coordinator's tasks.
//! - [`read`]: jsonl / jsonl.gz / jsonl.zst / parquet / text readers.
//! - [`filters`]: normalization, quality filters, dedup key.
//! - [`tokenizer`]: load `tokenizer.json` or train a byte-level BPE.
//! - [`encode`]: the fast encoding path (the ids of `tokenizers` 0.22, faster).
//! - [`stage1`]: per source and input file: scan, dedup, tokenize, write parts.
//! - [`stage2`]: per phase: split, draw, mix, pack, shuffle, write shards.
//! - [`rng`]: the seeded generator behind every shuffle.
//!
//! Storage, the manifest and the parquet layouts are `twinhead-data`'s, which
//! the worker reads through too. On storage (see DESIGN.md): `tokenizer.json`, `sources/<s>/part-NNNNN.parquet`,
//! `phases/<p>/shard-NNNNN.parquet`, each with a `.done.json` marker, and
//! `manifest.json` written last.

pub mod encode;
pub mod error;
pub mod filters;
pub mod inputs;
pub mod process;
pub mod read;
pub mod rng;
pub mod stage1;
pub mod stage2;
pub mod tasks;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

pub use error::{Error, Result};

pub use twinhead_proto::dataset::DatasetConfig;

use twinhead_data::formats;
use twinhead_data::manifest::{self, FileEntry, Manifest};
use twinhead_data::store::Location;

/// Receives progress from a running build; implement it with `indicatif`
/// bars in the CLI. Methods are called from worker threads.
pub trait ProgressSink: Sync {
    /// A stage with `total` units (parts, shards) begins.
    fn start(&self, _stage: &str, _total: u64) {}
    /// `n` more units done.
    fn inc(&self, _n: u64) {}
    /// `docs` more input records read, holding `bytes` bytes of text.
    fn read(&self, _docs: u64, _bytes: u64) {}
    /// The stage ended.
    fn finish(&self, _stage: &str) {}
    /// Polled before each task (part, shard): `true` stops the build with
    /// [`Error::Cancelled`]; finished files stay and a rerun resumes.
    fn cancelled(&self) -> bool {
        false
    }
}

/// A sink that ignores everything.
pub struct NoProgress;

impl ProgressSink for NoProgress {}

/// What [`build`] did.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    /// The dataset's location, `<out_url>/<name>`: give it to [`verify`],
    /// [`stats`] and run specs (its `manifest.json`).
    pub url: String,
    /// The location already held this dataset; nothing was done.
    pub up_to_date: bool,
    /// Files written by this run (parts and shards).
    pub files_written: u64,
    /// Files found complete from an earlier, interrupted run.
    pub files_skipped: u64,
    /// Wall time in seconds (not in the manifest).
    pub seconds: f64,
    /// Input records read per second (0 when up to date).
    pub docs_per_second: f64,
    /// Notable facts: repeated or subsampled sources, skipped inputs, a
    /// tokenizer the fast encoder cannot express.
    pub notes: Vec<String>,
    /// How documents were encoded (`None` when nothing was tokenized).
    pub encoder: Option<tasks::EncoderReport>,
    /// The manifest written (or found).
    pub manifest: Manifest,
}

/// A rayon pool of `threads` threads (at least one) named `dataprep-N`.
pub fn thread_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("dataprep-{i}"))
        .build()
        .map_err(|e| Error::ThreadPool(e.to_string()))
}

fn read_manifest(out: &Location) -> Result<Option<Manifest>> {
    match out.get_opt(manifest::MANIFEST)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Corrupt {
                location: out.name(manifest::MANIFEST),
                message: format!("not a twinhead manifest: {e}"),
            }),
    }
}

/// Build the dataset described by `config_path` into `<out_url>/<name>`
/// (`name` from the config, default the file stem) with `threads` worker
/// threads. A location that already holds this dataset
/// (same config sha256) is left as it is; an interrupted build resumes,
/// skipping every file whose completion marker matches this config.
pub fn build(
    config_path: &Path,
    out_url: &str,
    threads: usize,
    progress: &dyn ProgressSink,
) -> Result<BuildReport> {
    let cfg = DatasetConfig::load(config_path)?;
    build_config(&cfg, out_url, threads, progress)
}

/// [`build`] from an already loaded config: every task of
/// [`tasks::Build`] in this process. The encoder is the fast path unless
/// [`encode::ENCODER_ENV`] says `reference`.
pub fn build_config(
    cfg: &DatasetConfig,
    out_url: &str,
    threads: usize,
    progress: &dyn ProgressSink,
) -> Result<BuildReport> {
    build_config_with(
        cfg,
        out_url,
        threads,
        encode::EncoderChoice::from_env(),
        progress,
    )
}

/// [`build_config`] with the encoder chosen; the bytes written do not
/// depend on it.
pub fn build_config_with(
    cfg: &DatasetConfig,
    out_url: &str,
    threads: usize,
    encoder: encode::EncoderChoice,
    progress: &dyn ProgressSink,
) -> Result<BuildReport> {
    let t0 = Instant::now();
    let job = tasks::Build::new(cfg.clone(), out_url)?.with_encoder(encoder);
    if let Some(manifest) = job.complete()? {
        return Ok(BuildReport {
            url: job.url().to_string(),
            up_to_date: true,
            files_written: 0,
            files_skipped: 0,
            seconds: t0.elapsed().as_secs_f64(),
            docs_per_second: 0.0,
            notes: vec!["dataset already complete with this config; nothing to do".into()],
            encoder: None,
            manifest,
        });
    }
    let pool = thread_pool(threads)?;
    let (manifest, written) = pool.install(|| job.run_all(progress))?;
    let seconds = t0.elapsed().as_secs_f64();
    let read: u64 = manifest.sources.iter().map(|s| s.read).sum();
    let encoder = job.encoder_report();
    let mut notes = notes(&manifest);
    notes.extend(encoder.as_ref().and_then(encoder_note));
    Ok(BuildReport {
        url: job.url().to_string(),
        up_to_date: false,
        files_written: written.written,
        files_skipped: written.skipped,
        seconds,
        docs_per_second: read as f64 / seconds.max(1e-9),
        notes,
        encoder,
        manifest,
    })
}

/// What to tell about the encoder: a fallback to `tokenizers` 0.22 and why,
/// or documents the fast path left to it.
pub fn encoder_note(e: &tasks::EncoderReport) -> Option<String> {
    match (&e.fallback, e.docs_reference) {
        (Some(why), _) => Some(format!(
            "tokenizer: {} document(s) encoded by tokenizers 0.22, not the fast path: {why}",
            e.docs_reference
        )),
        (None, 0) => None,
        (None, n) => Some(format!(
            "tokenizer: {} document(s) on the fast path, {n} by tokenizers 0.22 \
             (text that 0.22's Unicode 9 NFC would change; same ids either way)",
            e.docs_fast
        )),
    }
}

/// Facts worth telling whoever built `manifest`: skipped inputs, and
/// sources repeated or subsampled to meet a phase's share.
pub fn notes(manifest: &Manifest) -> Vec<String> {
    let mut notes = Vec::new();
    for s in &manifest.sources {
        if let Some(n) = s.rejected.get("unreadable_input") {
            // Each skipped input with why (a pattern that matches no file,
            // a missing folder), as far as the manifest kept them.
            let named: Vec<String> = s
                .issues
                .iter()
                .filter(|i| i.reason == "unreadable_input")
                .map(|i| format!("{}: {}", i.input, i.message))
                .collect();
            let listed = if named.is_empty() {
                String::new()
            } else {
                format!(": {}", named.join("; "))
            };
            notes.push(format!(
                "source {}: {n} unreadable input(s) skipped (on_error = \"skip\"){listed}",
                s.name
            ));
        }
    }
    for p in &manifest.phases {
        for d in p.draws.iter().filter(|d| d.full_epochs > 0) {
            notes.push(format!(
                "phase {}: source {} repeated {} whole epoch(s){} to reach {} tokens ({} available)",
                p.name,
                d.source,
                d.full_epochs,
                if d.subsampled { " plus a seeded subsample" } else { "" },
                d.target_tokens,
                d.available_tokens
            ));
        }
    }
    notes
}

/// One difference found by [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// File, relative to the dataset.
    pub path: String,
    /// `missing`, `sha256_mismatch`, `rows_mismatch`, `unreadable`,
    /// `eval_leak`.
    pub kind: String,
    /// Details.
    pub detail: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Dataset location.
    pub url: String,
    /// No problem found.
    pub ok: bool,
    /// Files checked.
    pub files_checked: u64,
    /// Differences from the manifest.
    pub problems: Vec<Problem>,
}

/// What a file listed in a manifest is, for [`verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileRole {
    Other,
    TrainingShard,
    EvalShard,
}

/// Re-hash every file the manifest of the dataset at `url` (the folder
/// holding `manifest.json`, i.e. [`BuildReport::url`]) lists (tokenizer,
/// parts, shards), check shard row counts and, where documents are held
/// out, that no training shard holds a piece of a held-out document.
pub fn verify(url: &str) -> Result<VerifyReport> {
    let out = Location::open(url, false)?;
    let m = read_manifest(&out)?.ok_or_else(|| Error::Corrupt {
        location: out.name(manifest::MANIFEST),
        message: "no manifest: not a complete dataset".into(),
    })?;
    let mut files: Vec<(FileEntry, FileRole)> = vec![(
        FileEntry {
            path: m.tokenizer.path.clone(),
            rows: 0,
            sha256: m.tokenizer.sha256.clone(),
        },
        FileRole::Other,
    )];
    files.extend(
        m.sources
            .iter()
            .flat_map(|s| s.parts.iter().cloned().map(|f| (f, FileRole::Other))),
    );
    for p in &m.phases {
        files.extend(
            p.shards
                .iter()
                .cloned()
                .map(|f| (f, FileRole::TrainingShard)),
        );
        if let Some(eval) = &p.eval {
            files.extend(
                eval.shards
                    .iter()
                    .cloned()
                    .map(|f| (f, FileRole::EvalShard)),
            );
        }
    }
    let held_out = m.phases.iter().any(|p| p.eval.is_some());
    let checked: Vec<(Vec<Problem>, Vec<u64>)> = files
        .par_iter()
        .map(|(f, role)| {
            let mut ps = Vec::new();
            let mut keys = Vec::new();
            let p = |kind: &str, detail: String| Problem {
                path: f.path.clone(),
                kind: kind.into(),
                detail,
            };
            match out.get_opt(&f.path) {
                Ok(None) => ps.push(p("missing", "listed in the manifest, not found".into())),
                Err(e) => ps.push(p("unreadable", e.to_string())),
                Ok(Some(bytes)) => {
                    let sha = stage1::sha256(&bytes);
                    if sha != f.sha256 {
                        ps.push(p(
                            "sha256_mismatch",
                            format!("manifest {} file {sha}", f.sha256),
                        ));
                    }
                    if *role != FileRole::Other {
                        let name = out.name(&f.path);
                        match formats::row_groups(&name, bytes.clone()) {
                            Ok(g) if g.iter().sum::<i64>() as u64 != f.rows => {
                                ps.push(p(
                                    "rows_mismatch",
                                    format!("manifest {} file {}", f.rows, g.iter().sum::<i64>()),
                                ));
                            }
                            Ok(_) => {}
                            Err(e) => ps.push(p("unreadable", e.to_string())),
                        }
                        if held_out {
                            match formats::read_doc_keys(&name, bytes) {
                                Ok(k) => keys = k,
                                Err(e) => ps.push(p("unreadable", e.to_string())),
                            }
                        }
                    }
                }
            }
            (ps, keys)
        })
        .collect();
    let eval_keys: std::collections::HashSet<u64> = files
        .iter()
        .zip(&checked)
        .filter(|((_, role), _)| *role == FileRole::EvalShard)
        .flat_map(|(_, (_, keys))| keys.iter().copied())
        .collect();
    let mut problems = Vec::new();
    for ((f, role), (ps, keys)) in files.iter().zip(checked) {
        problems.extend(ps);
        let leaked = keys.iter().filter(|k| eval_keys.contains(k)).count();
        if *role == FileRole::TrainingShard && leaked > 0 {
            problems.push(Problem {
                path: f.path.clone(),
                kind: "eval_leak".into(),
                detail: format!("{leaked} pieces of held-out documents in a training shard"),
            });
        }
    }
    Ok(VerifyReport {
        url: url.to_string(),
        ok: problems.is_empty(),
        files_checked: files.len() as u64,
        problems,
    })
}

/// Per-source line of [`Stats`].
#[derive(Debug, Clone, Serialize)]
pub struct SourceLine {
    /// Name.
    pub name: String,
    /// Records read.
    pub read: u64,
    /// Rejected records, all reasons.
    pub rejected: u64,
    /// Dropped documents, all reasons.
    pub dropped: u64,
    /// Kept documents.
    pub kept: u64,
    /// Kept tokens.
    pub tokens: u64,
    /// Mean tokens per kept document.
    pub mean_doc_tokens: f64,
    /// Drops by reason.
    pub dropped_by: BTreeMap<String, u64>,
}

/// Per-phase line of [`Stats`].
#[derive(Debug, Clone, Serialize)]
pub struct PhaseLine {
    /// Name.
    pub name: String,
    /// Tokens per row.
    pub seq_len: u32,
    /// Rows.
    pub sequences: u64,
    /// Tokens.
    pub tokens: u64,
    /// Shards.
    pub shards: u64,
    /// Share of tokens per source, 0..1.
    pub share: BTreeMap<String, f64>,
    /// Mean documents (pieces) per row, counted from the shards.
    pub mean_docs_per_row: f64,
    /// The phase's held-out rows, if documents are held out.
    pub eval: Option<EvalLine>,
}

/// A phase's held-out rows, in [`PhaseLine`].
#[derive(Debug, Clone, Serialize)]
pub struct EvalLine {
    /// Held-out documents.
    pub docs: u64,
    /// Rows.
    pub sequences: u64,
    /// Tokens.
    pub tokens: u64,
    /// Shards.
    pub shards: u64,
}

/// Summary of a built dataset.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Dataset name.
    pub name: String,
    /// Config sha256.
    pub config_sha256: String,
    /// Tokenizer vocabulary size.
    pub vocab_size: u32,
    /// Sources.
    pub sources: Vec<SourceLine>,
    /// Phases.
    pub phases: Vec<PhaseLine>,
}

/// Summarize the dataset at `url` (the folder holding `manifest.json`) from its manifest, reading shards for per-row counts.
pub fn stats(url: &str) -> Result<Stats> {
    let out = Location::open(url, false)?;
    let m = read_manifest(&out)?.ok_or_else(|| Error::Corrupt {
        location: out.name(manifest::MANIFEST),
        message: "no manifest: not a complete dataset".into(),
    })?;
    let sources = m
        .sources
        .iter()
        .map(|s| SourceLine {
            name: s.name.clone(),
            read: s.read,
            rejected: s.rejected.values().sum(),
            dropped: s.dropped.values().sum(),
            kept: s.kept,
            tokens: s.tokens,
            mean_doc_tokens: s.tokens as f64 / s.kept.max(1) as f64,
            dropped_by: s.dropped.clone(),
        })
        .collect();
    let mut phases = Vec::new();
    for p in &m.phases {
        let docs: Vec<Result<u64>> = p
            .shards
            .par_iter()
            .map(|f| {
                let rows = formats::read_rows(&out.name(&f.path), out.get(&f.path)?)?;
                Ok(rows.iter().map(|r| r.doc_lens.len() as u64).sum())
            })
            .collect();
        let docs: u64 = docs.into_iter().sum::<Result<u64>>()?;
        let share = p
            .tokens_per_source
            .iter()
            .map(|(k, v)| (k.clone(), *v as f64 / p.tokens.max(1) as f64))
            .collect();
        phases.push(PhaseLine {
            name: p.name.clone(),
            seq_len: p.seq_len,
            sequences: p.sequences,
            tokens: p.tokens,
            shards: p.shards.len() as u64,
            share,
            mean_docs_per_row: docs as f64 / p.sequences.max(1) as f64,
            eval: p.eval.as_ref().map(|e| EvalLine {
                docs: e.docs,
                sequences: e.sequences,
                tokens: e.tokens,
                shards: e.shards.len() as u64,
            }),
        });
    }
    Ok(Stats {
        name: m.name.clone(),
        config_sha256: m.config_sha256.clone(),
        vocab_size: m.tokenizer.vocab_size,
        sources,
        phases,
    })
}
