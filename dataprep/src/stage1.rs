//! Stage 1, per source: plan parts (one per input file, or a run of text
//! files), scan each part in parallel (read → normalize → filter), dedup
//! across the whole source in input order, then tokenize and write each part
//! as `sources/<source>/part-NNNNN.parquet`.
//!
//! Scanning and writing a part are independent tasks; only the dedup merge
//! between them is sequential, so a remote worker can run either half and
//! the bytes are the same whatever the number of threads.

use std::collections::{BTreeMap, HashSet};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::filters;
use crate::inputs;
use crate::read::{self, ReadOutput};
use twinhead_data::manifest::Issue;
use twinhead_data::manifest::{FileEntry, Marker};
use twinhead_data::store::Location;
use twinhead_proto::dataset::{Format, OnError, SourceConfig};

/// A document that passed the filters.
#[derive(Debug, Clone)]
pub struct CleanDoc {
    /// Id.
    pub id: String,
    /// Normalized text.
    pub text: String,
    /// Dedup key.
    pub key: u128,
}

/// Inputs of one part.
#[derive(Debug, Clone)]
pub struct PartPlan {
    /// Part number (NNNNN).
    pub index: usize,
    /// Input objects, relative to the source's location.
    pub files: Vec<String>,
}

/// Counters of a source before tokenization.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Input files.
    pub files: u64,
    /// Records read.
    pub read: u64,
    /// Rejections by reason.
    pub rejected: BTreeMap<String, u64>,
    /// Drops by filter.
    pub dropped: BTreeMap<String, u64>,
    /// Issues.
    pub issues: Vec<Issue>,
}

/// Path of part `i` of `source`.
pub fn part_path(source: &str, i: usize) -> String {
    format!("sources/{source}/part-{i:05}.parquet")
}

fn marker_path(path: &str) -> String {
    format!("{}.done.json", path.trim_end_matches(".parquet"))
}

/// List a source's inputs and group them into parts.
pub fn plan(
    src: &SourceConfig,
    on_error: OnError,
    counters: &mut Counters,
) -> Result<(Option<Location>, Vec<PartPlan>)> {
    let (loc, files) = match inputs::list_input(&src.input) {
        Ok((loc, files)) if !files.is_empty() => (loc, files),
        other => {
            let why = match other {
                Ok(_) => "matches no file".to_string(),
                Err(e) => e.to_string(),
            };
            let mut out = ReadOutput::default();
            let r = read_unreadable(src, on_error, &why, &mut out);
            merge_read(counters, out);
            r?;
            return Ok((None, Vec::new()));
        }
    };
    let mut names: Vec<String> = files
        .into_iter()
        .map(|l| l.rel)
        .filter(|rel| {
            src.format != Format::Text
                || src.extensions.is_empty()
                || src
                    .extensions
                    .iter()
                    .any(|e| rel.rsplit_once('.').is_some_and(|(_, x)| x == e))
        })
        .collect();
    if let Some(m) = src.max_files {
        names.truncate(usize::try_from(m).unwrap_or(usize::MAX));
    }
    counters.files = names.len() as u64;
    let per = if src.format == Format::Text {
        src.files_per_part
    } else {
        1
    };
    let parts = names
        .chunks(per.max(1))
        .enumerate()
        .map(|(index, c)| PartPlan {
            index,
            files: c.to_vec(),
        })
        .collect();
    Ok((Some(loc), parts))
}

fn read_unreadable(
    src: &SourceConfig,
    on_error: OnError,
    why: &str,
    out: &mut ReadOutput,
) -> Result<()> {
    if on_error == OnError::Fail {
        return Err(crate::error::Error::Input {
            source_name: src.name.clone(),
            input: src.input.clone(),
            message: why.to_string(),
        });
    }
    *out.rejected.entry("unreadable_input".into()).or_insert(0) += 1;
    out.issues.push(Issue {
        input: src.input.clone(),
        line: None,
        reason: "unreadable_input".into(),
        message: why.to_string(),
    });
    Ok(())
}

fn merge_read(c: &mut Counters, r: ReadOutput) {
    c.read += r.records;
    for (k, v) in r.rejected {
        *c.rejected.entry(k).or_insert(0) += v;
    }
    for i in r.issues {
        if c.issues.len() < read::MAX_ISSUES {
            c.issues.push(i);
        }
    }
}

/// What scanning one part produced (before the source-wide dedup).
#[derive(Debug, Default)]
pub struct PartScan {
    /// Documents that passed the filters, in input order.
    pub docs: Vec<CleanDoc>,
    /// Reading counters and issues (its `docs` are moved into `docs`).
    pub read: ReadOutput,
    /// Drops by filter.
    pub dropped: BTreeMap<String, u64>,
}

/// Scan one part: read its inputs, normalize, filter (decontaminating
/// against `reference` when there is one). An independent task: a remote
/// worker can run it and send back the [`PartScan`].
pub fn scan_part(
    loc: &Location,
    part: &PartPlan,
    src: &SourceConfig,
    on_error: OnError,
    reference: Option<&filters::Reference>,
) -> Result<PartScan> {
    let mut read = ReadOutput::default();
    for f in &part.files {
        read::read_input(loc, f, src, on_error, &mut read)?;
    }
    let raw = std::mem::take(&mut read.docs);
    let judged: Vec<std::result::Result<CleanDoc, filters::Drop>> = raw
        .into_par_iter()
        .map(|d| {
            let text = filters::normalize_owned(d.text);
            filters::judge(&src.filters, reference, &text)?;
            let key = filters::dedup_key(&text);
            Ok(CleanDoc {
                id: d.id,
                text,
                key,
            })
        })
        .collect();
    let mut dropped = BTreeMap::new();
    let mut docs = Vec::with_capacity(judged.len());
    for j in judged {
        match j {
            Ok(d) => docs.push(d),
            Err(why) => why.count(&mut dropped),
        }
    }
    Ok(PartScan {
        docs,
        read,
        dropped,
    })
}

/// Adds one part's reading counters and filter drops to a source's.
pub fn add_part_counters(c: &mut Counters, read: ReadOutput, dropped: BTreeMap<String, u64>) {
    merge_read(c, read);
    for (k, v) in dropped {
        *c.dropped.entry(k).or_insert(0) += v;
    }
}

/// The source-wide exact dedup (the first occurrence in input order wins)
/// and the `max_docs` / `max_chars` caps, fed documents in input order.
#[derive(Debug, Default)]
pub struct Dedup {
    seen: HashSet<u128>,
    kept_docs: u64,
    kept_chars: u64,
}

impl Dedup {
    /// Whether the next document is kept; a dropped one is counted under
    /// `duplicate` or `over_limit`.
    pub fn admit(
        &mut self,
        src: &SourceConfig,
        key: u128,
        chars: u64,
        dropped: &mut BTreeMap<String, u64>,
    ) -> bool {
        if !self.seen.insert(key) {
            filters::Drop::Duplicate.count(dropped);
            return false;
        }
        let over = src.max_docs.is_some_and(|m| self.kept_docs >= m)
            || src.max_chars.is_some_and(|m| self.kept_chars >= m);
        if over {
            filters::Drop::OverLimit.count(dropped);
            return false;
        }
        self.kept_docs += 1;
        self.kept_chars += chars;
        true
    }
}

/// The scan file of a part (`_work/scan/…`): the columns of
/// `twinhead_data::formats::write_scan`, which `read_scan` reads, but written
/// for a scratch file that no manifest lists and `finalize` removes: zstd
/// level 1 and no dictionary attempt on the text column (most of a scan's
/// writing time at level 3 with the dictionary tried first).
pub fn write_scan(location: &str, docs: &[twinhead_data::formats::ScanDoc]) -> Result<Vec<u8>> {
    use std::sync::Arc;

    use arrow_array::builder::{StringBuilder, UInt64Builder};
    use arrow_array::{ArrayRef, RecordBatch};
    use parquet::arrow::ArrowWriter;
    use parquet::basic::{Compression, ZstdLevel};
    use parquet::file::properties::WriterProperties;

    let err = |e: &dyn std::fmt::Display| crate::error::Error::Corrupt {
        location: location.to_string(),
        message: format!("writing the scan file: {e}"),
    };
    let bytes: usize = docs.iter().map(|d| d.text.len()).sum();
    let mut id = StringBuilder::new();
    let mut text = StringBuilder::with_capacity(docs.len(), bytes);
    let (mut hi, mut lo, mut chars) = (
        UInt64Builder::with_capacity(docs.len()),
        UInt64Builder::with_capacity(docs.len()),
        UInt64Builder::with_capacity(docs.len()),
    );
    for d in docs {
        id.append_value(&d.id);
        text.append_value(&d.text);
        hi.append_value((d.key >> 64) as u64);
        lo.append_value(d.key as u64);
        chars.append_value(d.chars);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(id.finish()),
        Arc::new(text.finish()),
        Arc::new(hi.finish()),
        Arc::new(lo.finish()),
        Arc::new(chars.finish()),
    ];
    let schema = twinhead_data::formats::scan_schema();
    let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| err(&e))?;
    let props = WriterProperties::builder()
        .set_created_by(twinhead_data::formats::CREATED_BY.to_string())
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(1).map_err(|e| err(&e))?,
        ))
        .set_dictionary_enabled(false)
        .set_max_row_group_row_count(Some(4096))
        .build();
    let mut w = ArrowWriter::try_new(Vec::with_capacity(bytes / 2), schema, Some(props))
        .map_err(|e| err(&e))?;
    w.write(&batch).map_err(|e| err(&e))?;
    w.into_inner().map_err(|e| err(&e))
}

/// sha256 hex of bytes.
pub fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Read a marker; `None` when absent, unreadable or from another config.
pub fn read_marker(out: &Location, path: &str, config_sha: &str) -> Result<Option<Marker>> {
    let Some(bytes) = out.get_opt(&marker_path(path))? else {
        return Ok(None);
    };
    match serde_json::from_slice::<Marker>(&bytes) {
        Ok(m) if m.config_sha256 == config_sha && m.file.path == path => Ok(Some(m)),
        _ => Ok(None),
    }
}

/// Write a file, then its marker.
pub fn put_with_marker(
    out: &Location,
    path: &str,
    bytes: Vec<u8>,
    rows: u64,
    tokens: u64,
    config_sha: &str,
) -> Result<Marker> {
    let marker = Marker {
        config_sha256: config_sha.to_string(),
        file: FileEntry {
            path: path.to_string(),
            rows,
            sha256: sha256(&bytes),
        },
        tokens,
    };
    out.put(path, bytes)?;
    let json = serde_json::to_vec_pretty(&marker).map_err(|e| crate::error::Error::Corrupt {
        location: out.name(path),
        message: e.to_string(),
    })?;
    out.put(&marker_path(path), json)?;
    Ok(marker)
}

/// Counts of files written and skipped (already complete).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Files written by this run.
    pub written: u64,
    /// Files found complete and left as they were.
    pub skipped: u64,
}

/// Completion record of a single file without row counts (the tokenizer).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MarkerLite {
    /// Config it was built from.
    pub config_sha256: String,
    /// sha256 of the file.
    pub sha256: String,
}
