//! A build as a sequence of tasks that any process can run:
//!
//! 1. `plan`: list every source's inputs and group them into parts;
//! 2. `scan/<source>/<part>`: read, normalize and filter one part;
//! 3. `prepare`: the source-wide dedup and caps, and the tokenizer;
//! 4. `tokenize/<source>/<part>`: tokenize one part's kept documents;
//! 5. `phase/<index>`: draw, pack, shuffle and write one phase's shards;
//! 6. `finalize`: write `manifest.json`, then drop the scratch files.
//!
//! Tasks of one step are independent; a step starts when the previous one
//! is complete. Each task reads what earlier ones stored under `_work/` in
//! the dataset location and leaves its own result there (or as a part or
//! shard with its marker), so tasks can run in one process or spread over
//! many, in any order within a step, and the bytes are the same. A task
//! whose result is already stored for this config finds it and does
//! nothing, which is how an interrupted build resumes.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use crate::encode::EncoderChoice;
use crate::error::{Error, Result};
use crate::filters;
use crate::inputs;
use crate::read::ReadOutput;
use crate::stage1::{self, Counters, Dedup, MarkerLite, PartPlan, Written};
use crate::stage2;
use crate::tokenizer::{self, Tok};
use crate::{NoProgress, ProgressSink};
use twinhead_data::formats::{self, Doc, ScanDoc};
use twinhead_data::manifest::Issue;
use twinhead_data::manifest::{
    self, DecontaminationInfo, Manifest, PhaseStats, SourceStats, TokenizerInfo,
};
use twinhead_data::store::Location;
use twinhead_proto::build_tasks::{Task, steps};
use twinhead_proto::dataset::{DatasetConfig, TokenizerSpec};

/// Scratch folder inside the dataset location, removed once the manifest
/// is written.
pub const WORK: &str = "_work";

const TOKENIZER_MARKER: &str = "tokenizer.done.json";

/// What a task produced that its caller needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// From [`Task::Plan`]: parts per source, or the complete dataset's
    /// manifest when the location already holds it (nothing left to do).
    Planned {
        parts_per_source: Vec<usize>,
        complete: Option<Box<Manifest>>,
    },
    /// A part or shards: how many files were written and found complete.
    Files(Written),
    /// From [`Task::Finalize`].
    Finished(Box<Manifest>),
    /// Nothing to report.
    Done,
}

#[derive(Serialize, Deserialize)]
struct SourcePlan {
    config_sha256: String,
    parts: Vec<Vec<String>>,
    counters: Counters,
}

/// Marker of a scan file: the part's reading counters and filter drops.
#[derive(Serialize, Deserialize)]
struct ScanDone {
    config_sha256: String,
    files: Vec<String>,
    /// The decontamination set it was checked against ("" for none).
    #[serde(default)]
    reference_sha256: String,
    records: u64,
    rejected: BTreeMap<String, u64>,
    issues: Vec<Issue>,
    dropped: BTreeMap<String, u64>,
}

/// A source after the dedup merge.
#[derive(Serialize, Deserialize)]
struct SourceMerge {
    config_sha256: String,
    /// Per part, the kept documents as `[start, end)` runs of scan rows.
    kept: Vec<Vec<[u64; 2]>>,
    counters: Counters,
    kept_docs: u64,
    kept_chars: u64,
}

#[derive(Serialize, Deserialize)]
struct PhaseDone {
    build_key: String,
    stats: PhaseStats,
}

struct Tokenizer {
    tok: Tok,
    sha256: String,
    /// `<config sha256>+<tokenizer sha256>`: recorded in part and shard
    /// markers, so a changed config or tokenizer never reuses a file.
    build_key: String,
}

/// The decontamination reference, with what the manifest says of it.
struct Reference {
    ngrams: filters::Reference,
    info: DecontaminationInfo,
}

/// A dataset build in one location: the config, where it goes, and the
/// tokenizer and decontamination set once loaded.
pub struct Build {
    cfg: DatasetConfig,
    out: Location,
    url: String,
    tokenizer: OnceLock<Arc<Tokenizer>>,
    reference: OnceLock<Option<Arc<Reference>>>,
    encoder: EncoderChoice,
    /// Held while the tokenizer loads, so parallel tasks load it once.
    loading: std::sync::Mutex<()>,
}

/// How this process encoded documents: the fast path or `tokenizers` 0.22
/// (the same ids either way; not in the manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EncoderReport {
    /// The path asked for ([`crate::encode::ENCODER_ENV`], or the API).
    pub asked: EncoderChoice,
    /// `fast` when the fast path encoded documents, `reference` when 0.22
    /// encoded all of them.
    pub path: EncoderChoice,
    /// Why 0.22 encoded every document: forced, or what the fast path
    /// cannot express in this tokenizer.
    pub fallback: Option<String>,
    /// Documents the fast path encoded.
    pub docs_fast: u64,
    /// Documents 0.22 encoded: all of them on a fallback, else those on
    /// which 0.22's NFC (Unicode 9) is not the identity.
    pub docs_reference: u64,
}

fn plan_path(source: &str) -> String {
    format!("{WORK}/plan/{source}.json")
}

fn scan_path(source: &str, part: usize) -> String {
    format!("{WORK}/scan/{source}/part-{part:05}.parquet")
}

fn scan_marker_path(source: &str, part: usize) -> String {
    format!("{WORK}/scan/{source}/part-{part:05}.json")
}

fn merge_path(source: &str) -> String {
    format!("{WORK}/merge/{source}.json")
}

fn phase_path(phase: &str) -> String {
    format!("{WORK}/phase/{phase}.json")
}

fn to_json<T: Serialize>(out: &Location, rel: &str, v: &T) -> Result<Vec<u8>> {
    let mut b = serde_json::to_vec_pretty(v).map_err(|e| Error::Corrupt {
        location: out.name(rel),
        message: e.to_string(),
    })?;
    b.push(b'\n');
    Ok(b)
}

fn from_json<T: for<'de> Deserialize<'de>>(out: &Location, rel: &str) -> Result<Option<T>> {
    Ok(out
        .get_opt(rel)?
        .and_then(|b| serde_json::from_slice::<T>(&b).ok()))
}

fn missing(out: &Location, rel: &str, what: &str) -> Error {
    Error::Corrupt {
        location: out.name(rel),
        message: format!("{what} is missing: its step has not completed"),
    }
}

/// A file named by a local path or a storage URL (tokenizers).
fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    let p = path.to_string_lossy();
    if p.contains("://") {
        let spec = inputs::split_input(&p);
        let loc = Location::open(&spec.base, false)?;
        return Ok(loc
            .get(spec.pattern.as_deref().unwrap_or_default())?
            .to_vec());
    }
    std::fs::read(path)
        .map_err(|e| Error::Tokenizer(format!("cannot read {}: {e}", path.display())))
}

/// Kept-document runs from a keep mask.
fn runs(mask: &[bool]) -> Vec<[u64; 2]> {
    let mut out: Vec<[u64; 2]> = Vec::new();
    for (i, &k) in mask.iter().enumerate() {
        if !k {
            continue;
        }
        let i = i as u64;
        match out.last_mut() {
            Some(r) if r[1] == i => r[1] = i + 1,
            _ => out.push([i, i + 1]),
        }
    }
    out
}

impl Build {
    /// A build of `cfg` into `<out_url>/<name>`.
    pub fn new(cfg: DatasetConfig, out_url: &str) -> Result<Build> {
        let url = format!("{}/{}", out_url.trim_end_matches('/'), cfg.name);
        let out = Location::open(out_url, true)?.child(&cfg.name);
        Ok(Build {
            cfg,
            out,
            url,
            tokenizer: OnceLock::new(),
            reference: OnceLock::new(),
            encoder: EncoderChoice::from_env(),
            loading: std::sync::Mutex::new(()),
        })
    }

    /// The same build with the encoder chosen (the default comes from
    /// [`crate::encode::ENCODER_ENV`]); output bytes do not depend on it.
    pub fn with_encoder(mut self, choice: EncoderChoice) -> Build {
        self.encoder = choice;
        self
    }

    /// How documents were encoded so far in this process; `None` before
    /// the tokenizer is loaded.
    pub fn encoder_report(&self) -> Option<EncoderReport> {
        let t = self.tokenizer.get()?;
        let (docs_fast, docs_reference) = t.tok.counts();
        Some(EncoderReport {
            asked: self.encoder,
            path: if t.tok.is_fast() {
                EncoderChoice::Fast
            } else {
                EncoderChoice::Reference
            },
            fallback: t.tok.fallback().map(str::to_string),
            docs_fast,
            docs_reference,
        })
    }

    /// The config.
    pub fn config(&self) -> &DatasetConfig {
        &self.cfg
    }

    /// The dataset's location, `<out_url>/<name>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The manifest when the location already holds this dataset complete;
    /// an error when it holds another one (or one made with another
    /// version of the tokenizer file).
    pub fn complete(&self) -> Result<Option<Manifest>> {
        let Some(bytes) = self.out.get_opt(manifest::MANIFEST)? else {
            return Ok(None);
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
            location: self.out.name(manifest::MANIFEST),
            message: format!("not a twinhead manifest: {e}"),
        })?;
        if m.config_sha256 != self.cfg.sha256 {
            return Err(Error::OtherDataset {
                location: self.url.clone(),
                existing: m.config_sha256,
                this: self.cfg.sha256.clone(),
            });
        }
        let given = match &self.cfg.tokenizer {
            TokenizerSpec::Path { path, .. } => Some((path, read_file(path).ok())),
            TokenizerSpec::Ettin { base } => Some((
                base,
                read_file(base)
                    .ok()
                    .and_then(|b| tokenizer::ettin_layout(&b).ok()),
            )),
            TokenizerSpec::Train { .. } => None,
        };
        if let Some((path, Some(bytes))) = given
            && stage1::sha256(&bytes) != m.tokenizer.sha256
        {
            return Err(Error::Tokenizer(format!(
                "{} was built with another version of {} (sha256 {}); build into another location",
                self.url,
                path.display(),
                m.tokenizer.sha256
            )));
        }
        Ok(Some(m))
    }

    /// Runs one task. `progress` hears about documents read, shards
    /// written and, inside a phase, each shard.
    pub fn run(&self, task: Task, progress: &dyn ProgressSink) -> Result<Outcome> {
        if progress.cancelled() {
            return Err(Error::Cancelled);
        }
        match task {
            Task::Plan => self.plan(),
            Task::Scan { source, part } => {
                self.scan(source, part, progress).map(|()| Outcome::Done)
            }
            Task::Prepare => self.prepare().map(|()| Outcome::Done),
            Task::Tokenize { source, part } => self.tokenize(source, part).map(Outcome::Files),
            Task::Phase { index } => self.phase(index, progress).map(Outcome::Files),
            Task::Finalize => self.finalize().map(|m| Outcome::Finished(Box::new(m))),
        }
    }

    fn source(&self, index: usize) -> Result<&twinhead_proto::dataset::SourceConfig> {
        self.cfg.sources.get(index).ok_or_else(|| Error::Corrupt {
            location: self.url.clone(),
            message: format!(
                "source {index} does not exist (the config has {})",
                self.cfg.sources.len()
            ),
        })
    }

    fn plan(&self) -> Result<Outcome> {
        if let Some(m) = self.complete()? {
            return Ok(Outcome::Planned {
                parts_per_source: Vec::new(),
                complete: Some(Box::new(m)),
            });
        }
        let mut parts_per_source = Vec::with_capacity(self.cfg.sources.len());
        for src in &self.cfg.sources {
            let mut counters = Counters::default();
            let (_, parts) = stage1::plan(src, self.cfg.on_error, &mut counters)?;
            parts_per_source.push(parts.len());
            // The coordinator refuses a larger plan (every part is two
            // tasks); one process refuses it the same way.
            let counts = parts_per_source.iter().map(|&n| n as u64);
            twinhead_proto::build_tasks::check_parts(counts).map_err(|message| Error::Input {
                source_name: src.name.clone(),
                input: src.input.clone(),
                message,
            })?;
            let plan = SourcePlan {
                config_sha256: self.cfg.sha256.clone(),
                parts: parts.into_iter().map(|p| p.files).collect(),
                counters,
            };
            let rel = plan_path(&src.name);
            self.out.put(&rel, to_json(&self.out, &rel, &plan)?)?;
        }
        Ok(Outcome::Planned {
            parts_per_source,
            complete: None,
        })
    }

    fn source_plan(&self, source: usize) -> Result<SourcePlan> {
        let rel = plan_path(&self.source(source)?.name);
        from_json::<SourcePlan>(&self.out, &rel)?
            .filter(|p| p.config_sha256 == self.cfg.sha256)
            .ok_or_else(|| missing(&self.out, &rel, "the source's plan"))
    }

    fn scan_done(&self, source: &str, part: usize, files: &[String]) -> Result<Option<ScanDone>> {
        let reference = self.reference_sha256()?;
        Ok(
            from_json::<ScanDone>(&self.out, &scan_marker_path(source, part))?.filter(|d| {
                d.config_sha256 == self.cfg.sha256
                    && d.files == files
                    && d.reference_sha256 == reference
            }),
        )
    }

    /// The decontamination set, read once per build (every reference input
    /// must be readable: a silently smaller set would let evaluation text
    /// through).
    fn reference(&self) -> Result<Option<Arc<Reference>>> {
        if let Some(r) = self.reference.get() {
            return Ok(r.clone());
        }
        let Some(d) = &self.cfg.decontamination else {
            return Ok(self.reference.get_or_init(|| None).clone());
        };
        let mut grams = HashSet::new();
        let (mut docs, mut too_short) = (0u64, 0u64);
        for src in &d.references {
            let (loc, files) = inputs::list_input(&src.input)?;
            if files.is_empty() {
                return Err(Error::Input {
                    source_name: src.name.clone(),
                    input: src.input.clone(),
                    message: "decontamination reference matches no file".into(),
                });
            }
            for f in files {
                let mut read = ReadOutput::default();
                crate::read::read_input(
                    &loc,
                    &f.rel,
                    src,
                    twinhead_proto::dataset::OnError::Fail,
                    &mut read,
                )?;
                for doc in read.docs {
                    docs += 1;
                    let g = filters::word_ngrams(&filters::normalize(&doc.text), d.ngram);
                    if g.is_empty() {
                        too_short += 1;
                    }
                    grams.extend(g);
                }
            }
        }
        let mut sorted: Vec<u64> = grams.iter().copied().collect();
        sorted.sort_unstable();
        let bytes: Vec<u8> = sorted.iter().flat_map(|g| g.to_le_bytes()).collect();
        let info = DecontaminationInfo {
            ngram: d.ngram,
            reference_docs: docs,
            reference_docs_too_short: too_short,
            ngrams: sorted.len() as u64,
            sha256: stage1::sha256(&bytes),
        };
        let loaded = Some(Arc::new(Reference {
            ngrams: filters::Reference {
                ngram: d.ngram,
                grams,
            },
            info,
        }));
        Ok(self.reference.get_or_init(|| loaded).clone())
    }

    fn reference_sha256(&self) -> Result<String> {
        Ok(self
            .reference()?
            .map(|r| r.info.sha256.clone())
            .unwrap_or_default())
    }

    fn scan(&self, source: usize, part: usize, progress: &dyn ProgressSink) -> Result<()> {
        let src = self.source(source)?;
        let plan = self.source_plan(source)?;
        let files = plan.parts.get(part).ok_or_else(|| Error::Corrupt {
            location: self.out.name(&plan_path(&src.name)),
            message: format!("part {part} is not in the plan"),
        })?;
        if self.scan_done(&src.name, part, files)?.is_some() {
            return Ok(());
        }
        let loc = inputs::input_location(&src.input)?;
        let part_plan = PartPlan {
            index: part,
            files: files.clone(),
        };
        let reference = self.reference()?;
        let scanned = stage1::scan_part(
            &loc,
            &part_plan,
            src,
            self.cfg.on_error,
            reference.as_ref().map(|r| &r.ngrams),
        )?;
        let bytes_read: u64 = scanned.docs.iter().map(|d| d.text.len() as u64).sum();
        progress.read(scanned.read.records, bytes_read);
        let docs: Vec<ScanDoc> = scanned
            .docs
            .into_iter()
            .map(|d| ScanDoc {
                chars: d.text.chars().count() as u64,
                id: d.id,
                text: d.text,
                key: d.key,
            })
            .collect();
        let rel = scan_path(&src.name, part);
        self.out
            .put(&rel, stage1::write_scan(&self.out.name(&rel), &docs)?)?;
        let ReadOutput {
            records,
            rejected,
            issues,
            ..
        } = scanned.read;
        let done = ScanDone {
            config_sha256: self.cfg.sha256.clone(),
            files: files.clone(),
            reference_sha256: self.reference_sha256()?,
            records,
            rejected,
            issues,
            dropped: scanned.dropped,
        };
        let rel = scan_marker_path(&src.name, part);
        Ok(self.out.put(&rel, to_json(&self.out, &rel, &done)?)?)
    }

    fn read_scan(&self, source: &str, part: usize, with_text: bool) -> Result<Vec<ScanDoc>> {
        let rel = scan_path(source, part);
        Ok(formats::read_scan(
            &self.out.name(&rel),
            self.out.get(&rel)?,
            with_text,
        )?)
    }

    fn source_merge(&self, source: usize) -> Result<SourceMerge> {
        let rel = merge_path(&self.source(source)?.name);
        from_json::<SourceMerge>(&self.out, &rel)?
            .filter(|m| m.config_sha256 == self.cfg.sha256)
            .ok_or_else(|| missing(&self.out, &rel, "the source's dedup merge"))
    }

    fn prepare(&self) -> Result<()> {
        for (s, src) in self.cfg.sources.iter().enumerate() {
            if self.source_merge(s).is_ok() {
                continue;
            }
            let plan = self.source_plan(s)?;
            let mut counters = plan.counters;
            let mut dedup = Dedup::default();
            let mut kept = Vec::with_capacity(plan.parts.len());
            let (mut kept_docs, mut kept_chars) = (0u64, 0u64);
            for (p, files) in plan.parts.iter().enumerate() {
                let done = self
                    .scan_done(&src.name, p, files)?
                    .ok_or_else(|| missing(&self.out, &scan_marker_path(&src.name, p), "scan"))?;
                let read = ReadOutput {
                    docs: Vec::new(),
                    records: done.records,
                    rejected: done.rejected,
                    issues: done.issues,
                };
                stage1::add_part_counters(&mut counters, read, done.dropped);
                let docs = self.read_scan(&src.name, p, false)?;
                let mask: Vec<bool> = docs
                    .iter()
                    .map(|d| dedup.admit(src, d.key, d.chars, &mut counters.dropped))
                    .collect();
                for (d, _) in docs.iter().zip(&mask).filter(|(_, k)| **k) {
                    kept_docs += 1;
                    kept_chars += d.chars;
                }
                kept.push(runs(&mask));
            }
            let merge = SourceMerge {
                config_sha256: self.cfg.sha256.clone(),
                kept,
                counters,
                kept_docs,
                kept_chars,
            };
            let rel = merge_path(&src.name);
            self.out.put(&rel, to_json(&self.out, &rel, &merge)?)?;
        }
        self.store_tokenizer()
    }

    /// Copies the configured tokenizer into the dataset, or trains one on
    /// the kept documents (sources and parts in order, up to `max_chars`
    /// bytes of text) unless an earlier run already did.
    fn store_tokenizer(&self) -> Result<()> {
        match &self.cfg.tokenizer {
            TokenizerSpec::Path { path, .. } => self.put_tokenizer(read_file(path)?),
            TokenizerSpec::Ettin { base } => {
                self.put_tokenizer(tokenizer::ettin_layout(&read_file(base)?)?)
            }
            TokenizerSpec::Train {
                vocab_size,
                min_frequency,
                max_chars,
            } => {
                if self.trained_tokenizer()?.is_some() {
                    return Ok(());
                }
                let mut texts = Vec::new();
                let mut budget = *max_chars;
                'sources: for (s, src) in self.cfg.sources.iter().enumerate() {
                    let merge = self.source_merge(s)?;
                    for (p, kept) in merge.kept.iter().enumerate() {
                        if budget == 0 {
                            break 'sources;
                        }
                        let docs = self.read_scan(&src.name, p, true)?;
                        for [a, b] in kept {
                            let run = docs
                                .get(*a as usize..*b as usize)
                                .ok_or_else(|| self.bad_runs(&src.name, p))?;
                            for d in run {
                                if budget == 0 {
                                    break 'sources;
                                }
                                budget = budget.saturating_sub(d.text.len() as u64);
                                texts.push(d.text.clone());
                            }
                        }
                    }
                }
                let bytes = tokenizer::train_bpe(
                    texts.iter().map(String::as_str),
                    *vocab_size,
                    *min_frequency,
                )?;
                let marker = MarkerLite {
                    config_sha256: self.cfg.sha256.clone(),
                    sha256: stage1::sha256(&bytes),
                };
                self.out.put(manifest::TOKENIZER, bytes)?;
                Ok(self.out.put(
                    TOKENIZER_MARKER,
                    to_json(&self.out, TOKENIZER_MARKER, &marker)?,
                )?)
            }
        }
    }

    fn put_tokenizer(&self, bytes: Vec<u8>) -> Result<()> {
        if self.out.get_opt(manifest::TOKENIZER)?.as_deref() != Some(&bytes[..]) {
            self.out.put(manifest::TOKENIZER, bytes)?;
        }
        Ok(())
    }

    fn bad_runs(&self, source: &str, part: usize) -> Error {
        Error::Corrupt {
            location: self.out.name(&merge_path(source)),
            message: format!("kept rows of part {part} are outside its scan file"),
        }
    }

    /// The trained tokenizer's bytes when an earlier run stored them for
    /// this config.
    fn trained_tokenizer(&self) -> Result<Option<Vec<u8>>> {
        let marker = from_json::<MarkerLite>(&self.out, TOKENIZER_MARKER)?;
        let Some(marker) = marker.filter(|m| m.config_sha256 == self.cfg.sha256) else {
            return Ok(None);
        };
        Ok(self
            .out
            .get_opt(manifest::TOKENIZER)?
            .map(|t| t.to_vec())
            .filter(|t| stage1::sha256(t) == marker.sha256))
    }

    fn tokenizer(&self) -> Result<Arc<Tokenizer>> {
        if let Some(t) = self.tokenizer.get() {
            return Ok(t.clone());
        }
        // Loading takes a while (two libraries parse 50k-token files): the
        // first task loads, the others wait for it.
        let _loading = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = self.tokenizer.get() {
            return Ok(t.clone());
        }
        let bytes = match self.cfg.tokenizer {
            TokenizerSpec::Train { .. } => self.trained_tokenizer()?,
            TokenizerSpec::Path { .. } | TokenizerSpec::Ettin { .. } => {
                self.out.get_opt(manifest::TOKENIZER)?.map(|t| t.to_vec())
            }
        }
        .ok_or_else(|| missing(&self.out, manifest::TOKENIZER, "the tokenizer"))?;
        let loaded = self.load_tokenizer(&bytes)?;
        Ok(self.tokenizer.get_or_init(|| loaded).clone())
    }

    /// The tokenizer of `tokenizer.json` bytes, with its build key.
    fn load_tokenizer(&self, bytes: &[u8]) -> Result<Arc<Tokenizer>> {
        let (cls, sep) = match &self.cfg.tokenizer {
            TokenizerSpec::Path {
                cls_token,
                sep_token,
                ..
            } => (cls_token.as_str(), sep_token.as_str()),
            TokenizerSpec::Train { .. } | TokenizerSpec::Ettin { .. } => ("[CLS]", "[SEP]"),
        };
        let tok = Tok::with_encoder(bytes, cls, sep, self.encoder)?;
        match tok.fallback() {
            Some(why) if self.encoder == EncoderChoice::Fast => tracing::warn!(
                reason = why,
                "the fast encoder cannot express this tokenizer; documents are encoded by tokenizers 0.22"
            ),
            Some(why) => tracing::info!(reason = why, "documents are encoded by tokenizers 0.22"),
            None => {}
        }
        let sha256 = stage1::sha256(bytes);
        Ok(Arc::new(Tokenizer {
            tok,
            build_key: format!("{}+{}", self.cfg.sha256, sha256),
            sha256,
        }))
    }

    fn tokenize(&self, source: usize, part: usize) -> Result<Written> {
        let src = self.source(source)?;
        let t = self.tokenizer()?;
        let path = stage1::part_path(&src.name, part);
        if stage1::read_marker(&self.out, &path, &t.build_key)?.is_some() {
            return Ok(Written {
                written: 0,
                skipped: 1,
            });
        }
        let kept = self.kept_in_part(source, part)?;
        let encoded: Vec<Result<Doc>> = {
            use rayon::prelude::*;
            kept.into_par_iter()
                .map(|d| {
                    Ok(Doc {
                        ids: t.tok.encode_doc(&d.text)?,
                        id: d.id,
                    })
                })
                .collect()
        };
        let encoded: Vec<Doc> = encoded.into_iter().collect::<Result<_>>()?;
        let tokens: u64 = encoded.iter().map(|d| d.ids.len() as u64).sum();
        let bytes = formats::write_docs(&self.out.name(&path), &encoded)?;
        stage1::put_with_marker(
            &self.out,
            &path,
            bytes,
            encoded.len() as u64,
            tokens,
            &t.build_key,
        )?;
        Ok(Written {
            written: 1,
            skipped: 0,
        })
    }

    /// The documents of a part that the source-wide dedup and caps kept, in
    /// input order.
    fn kept_in_part(&self, source: usize, part: usize) -> Result<Vec<ScanDoc>> {
        let src = self.source(source)?;
        let merge = self.source_merge(source)?;
        let runs = merge
            .kept
            .get(part)
            .ok_or_else(|| self.bad_runs(&src.name, part))?;
        let docs = self.read_scan(&src.name, part, true)?;
        let mut keep = vec![false; docs.len()];
        for [a, b] in runs {
            keep.get_mut(*a as usize..*b as usize)
                .ok_or_else(|| self.bad_runs(&src.name, part))?
                .fill(true);
        }
        Ok(docs
            .into_iter()
            .zip(keep)
            .filter_map(|(d, k)| k.then_some(d))
            .collect())
    }

    /// A source as the plan, scan and prepare tasks left it: its counters
    /// and, per part, its kept documents in input order. Read back from
    /// `_work/`, so valid until `finalize` removes it; the filtering tests
    /// inspect the product's own path through it.
    pub fn kept(&self, source: usize) -> Result<(Counters, Vec<Vec<ScanDoc>>)> {
        let merge = self.source_merge(source)?;
        let parts = (0..merge.kept.len())
            .map(|part| self.kept_in_part(source, part))
            .collect::<Result<_>>()?;
        Ok((merge.counters, parts))
    }

    /// Statistics of a tokenized source, from its merge and part markers.
    fn source_stats(&self, source: usize) -> Result<SourceStats> {
        let src = self.source(source)?;
        let t = self.tokenizer()?;
        let merge = self.source_merge(source)?;
        let mut parts = Vec::with_capacity(merge.kept.len());
        let mut tokens = 0;
        for p in 0..merge.kept.len() {
            let path = stage1::part_path(&src.name, p);
            let m = stage1::read_marker(&self.out, &path, &t.build_key)?
                .ok_or_else(|| missing(&self.out, &path, "the tokenized part"))?;
            tokens += m.tokens;
            parts.push(m.file);
        }
        let c = merge.counters;
        Ok(SourceStats {
            name: src.name.clone(),
            index: u16::try_from(source).map_err(|_| Error::Corrupt {
                location: self.url.clone(),
                message: "more than 65536 sources".into(),
            })?,
            files: c.files,
            read: c.read,
            rejected: c.rejected,
            dropped: c.dropped,
            kept: merge.kept_docs,
            chars: merge.kept_chars,
            tokens,
            parts,
            issues: c.issues,
        })
    }

    fn phase(&self, index: usize, progress: &dyn ProgressSink) -> Result<Written> {
        let phase = self.cfg.phases.get(index).ok_or_else(|| Error::Corrupt {
            location: self.url.clone(),
            message: format!(
                "phase {index} does not exist (the config has {})",
                self.cfg.phases.len()
            ),
        })?;
        let t = self.tokenizer()?;
        let rel = phase_path(&phase.name);
        if from_json::<PhaseDone>(&self.out, &rel)?.is_some_and(|d| d.build_key == t.build_key) {
            return Ok(Written {
                written: 0,
                skipped: 0,
            });
        }
        let sources: Vec<SourceStats> = (0..self.cfg.sources.len())
            .map(|s| self.source_stats(s))
            .collect::<Result<_>>()?;
        let loaded: Vec<stage2::SourceDocs> = {
            use rayon::prelude::*;
            let loaded: Vec<Result<stage2::SourceDocs>> = sources
                .par_iter()
                .zip(phase.weights.par_iter())
                .map(|(s, w)| {
                    if *w > 0.0 {
                        stage2::load_source(&self.out, s)
                    } else {
                        Ok(stage2::SourceDocs::default())
                    }
                })
                .collect();
            loaded.into_iter().collect::<Result<_>>()?
        };
        let mut written = Written::default();
        let stats = stage2::run_phase(
            &self.out,
            &self.cfg,
            &t.build_key,
            phase,
            &sources,
            &loaded,
            progress,
            &mut written,
        )?;
        let done = PhaseDone {
            build_key: t.build_key.clone(),
            stats,
        };
        self.out.put(&rel, to_json(&self.out, &rel, &done)?)?;
        Ok(written)
    }

    fn finalize(&self) -> Result<Manifest> {
        if let Some(m) = self.complete()? {
            return Ok(m);
        }
        let t = self.tokenizer()?;
        let sources: Vec<SourceStats> = (0..self.cfg.sources.len())
            .map(|s| self.source_stats(s))
            .collect::<Result<_>>()?;
        let mut phases = Vec::with_capacity(self.cfg.phases.len());
        for phase in &self.cfg.phases {
            let rel = phase_path(&phase.name);
            let done = from_json::<PhaseDone>(&self.out, &rel)?
                .filter(|d| d.build_key == t.build_key)
                .ok_or_else(|| missing(&self.out, &rel, "the phase"))?;
            phases.push(done.stats);
        }
        let manifest = Manifest {
            format_version: manifest::FORMAT_VERSION,
            program: "twinhead-dataprep".into(),
            program_version: env!("CARGO_PKG_VERSION").into(),
            name: self.cfg.name.clone(),
            config: self.cfg.text.clone(),
            config_sha256: self.cfg.sha256.clone(),
            tokenizer: TokenizerInfo {
                path: manifest::TOKENIZER.into(),
                sha256: t.sha256.clone(),
                vocab_size: t.tok.vocab_size,
                cls_id: t.tok.cls,
                sep_id: t.tok.sep,
                trained: matches!(self.cfg.tokenizer, TokenizerSpec::Train { .. }),
            },
            sources,
            phases,
            decontamination: self.reference()?.map(|r| r.info.clone()),
        };
        // Every task is done, so no writer is active: what a killed
        // process left half-written goes before the commit point, and the
        // folder holds the same files as an uninterrupted build.
        self.out.remove_interrupted_writes()?;
        self.out.put(
            manifest::MANIFEST,
            to_json(&self.out, manifest::MANIFEST, &manifest)?,
        )?;
        // The manifest is the commit point; scratch files after it are
        // only taking space.
        self.out.remove_all(WORK)?;
        Ok(manifest)
    }

    /// Runs every task in this process: each step's tasks in parallel on
    /// the current rayon pool, with one progress stage per step.
    pub fn run_all(&self, progress: &dyn ProgressSink) -> Result<(Manifest, Written)> {
        let Outcome::Planned {
            parts_per_source,
            complete,
        } = self.run(Task::Plan, &NoProgress)?
        else {
            return Err(self.unexpected("plan"));
        };
        if let Some(m) = complete {
            return Ok((*m, Written::default()));
        }
        let mut written = Written::default();
        for step in steps(&parts_per_source, self.cfg.phases.len())
            .into_iter()
            .skip(1)
        {
            let Some(first) = step.first().copied() else {
                continue;
            };
            match first {
                Task::Phase { .. } => {
                    // A phase is parallel inside (shards); phases go in order.
                    for task in step {
                        if let Outcome::Files(w) = self.run(task, progress)? {
                            written.written += w.written;
                            written.skipped += w.skipped;
                        }
                    }
                }
                Task::Finalize => {
                    let Outcome::Finished(m) = self.run(Task::Finalize, progress)? else {
                        return Err(self.unexpected("finalize"));
                    };
                    return Ok((*m, written));
                }
                _ => {
                    use rayon::prelude::*;
                    if matches!(first, Task::Tokenize { .. }) {
                        // Load the tokenizer with the whole pool (its two
                        // libraries side by side) rather than in the first
                        // task while the others wait for it.
                        self.tokenizer()?;
                    }
                    let stage = stage_name(first);
                    progress.start(stage, step.len() as u64);
                    let outcomes: Vec<Result<Outcome>> = step
                        .par_iter()
                        .map(|t| {
                            let r = self.run(*t, progress);
                            progress.inc(1);
                            r
                        })
                        .collect();
                    progress.finish(stage);
                    for o in outcomes {
                        if let Outcome::Files(w) = o? {
                            written.written += w.written;
                            written.skipped += w.skipped;
                        }
                    }
                }
            }
        }
        Err(self.unexpected("steps"))
    }

    fn unexpected(&self, what: &str) -> Error {
        Error::Corrupt {
            location: self.url.clone(),
            message: format!("internal: unexpected outcome of {what}"),
        }
    }
}

/// The progress stage of a step, named by its first task.
pub fn stage_name(task: Task) -> &'static str {
    match task {
        Task::Plan => "plan",
        Task::Scan { .. } => "scan",
        Task::Prepare => "dedup + tokenizer",
        Task::Tokenize { .. } => "tokenize",
        Task::Phase { .. } => "phase",
        Task::Finalize => "manifest",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_masks_become_runs() {
        assert_eq!(runs(&[]), Vec::<[u64; 2]>::new());
        assert_eq!(
            runs(&[true, true, false, true, false, false, true]),
            [[0, 2], [3, 4], [6, 7]]
        );
    }
}
