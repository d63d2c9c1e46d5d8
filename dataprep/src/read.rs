//! Input readers: JSON lines (plain, gzip, zstd), parquet and plain text
//! files. Bad records are counted and reported with file and line; an input
//! that cannot be read as a whole is either skipped (counted) or fails the
//! build, per `on_error`.

use std::collections::BTreeMap;
use std::io::Read;

use arrow_array::{Array, LargeStringArray, StringArray, StringViewArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rayon::prelude::*;

use crate::error::{Error, Result};
use twinhead_data::manifest::Issue;
use twinhead_data::store::Location;
use twinhead_proto::dataset::{Format, OnError, SourceConfig};

/// One document as read, before normalization.
#[derive(Debug, Clone, PartialEq)]
pub struct RawDoc {
    /// Id from the id field, else `<file>:<line>` (or the file for text).
    pub id: String,
    /// Text (fields joined with a blank line).
    pub text: String,
}

/// At most this many issues are kept per source (all are counted).
pub const MAX_ISSUES: usize = 50;

/// What reading one input produced.
#[derive(Debug, Default)]
pub struct ReadOutput {
    /// Documents in input order.
    pub docs: Vec<RawDoc>,
    /// Records seen (documents + rejected records).
    pub records: u64,
    /// Rejections by reason.
    pub rejected: BTreeMap<String, u64>,
    /// First issues, in order.
    pub issues: Vec<Issue>,
}

impl ReadOutput {
    fn reject(&mut self, input: &str, line: Option<u64>, reason: &str, message: String) {
        *self.rejected.entry(reason.to_string()).or_insert(0) += 1;
        if self.issues.len() < MAX_ISSUES {
            self.issues.push(Issue {
                input: input.to_string(),
                line,
                reason: reason.to_string(),
                message,
            });
        }
    }

    /// Handle a whole-input failure per `on_error`.
    fn unreadable(
        &mut self,
        src: &SourceConfig,
        on_error: OnError,
        input: &str,
        message: String,
    ) -> Result<()> {
        if on_error == OnError::Fail {
            return Err(Error::Input {
                source_name: src.name.clone(),
                input: input.to_string(),
                message,
            });
        }
        tracing::warn!(source = %src.name, input, "skipping unreadable input: {message}");
        self.reject(input, None, "unreadable_input", message);
        Ok(())
    }
}

/// Read one input object (`rel` inside `loc`) of `src`, appending to `out`.
pub fn read_input(
    loc: &Location,
    rel: &str,
    src: &SourceConfig,
    on_error: OnError,
    out: &mut ReadOutput,
) -> Result<()> {
    let name = loc.name(rel);
    let bytes = match loc.get(rel) {
        Ok(b) => b,
        Err(e) => return out.unreadable(src, on_error, &name, format!("cannot read: {e}")),
    };
    if bytes.is_empty() {
        return out.unreadable(src, on_error, &name, "empty input".into());
    }
    match src.format {
        Format::Text => {
            out.records += 1;
            match String::from_utf8(bytes.to_vec()) {
                Ok(text) => out.docs.push(RawDoc {
                    id: rel.to_string(),
                    text,
                }),
                Err(e) => out.reject(&name, None, "invalid_utf8", e.to_string()),
            }
            Ok(())
        }
        Format::Jsonl => read_lines(&bytes[..], &name, rel, src, on_error, out),
        Format::JsonlGz => read_lines(
            flate2::read::MultiGzDecoder::new(&bytes[..]),
            &name,
            rel,
            src,
            on_error,
            out,
        ),
        Format::JsonlZst => match zstd::stream::read::Decoder::with_buffer(&bytes[..]) {
            Ok(d) => read_lines(d, &name, rel, src, on_error, out),
            Err(e) => out.unreadable(src, on_error, &name, format!("not a zstd stream: {e}")),
        },
        Format::Parquet => read_parquet(bytes, &name, rel, src, on_error, out),
    }
}

fn read_lines<R: Read>(
    mut r: R,
    name: &str,
    rel: &str,
    src: &SourceConfig,
    on_error: OnError,
    out: &mut ReadOutput,
) -> Result<()> {
    // Decompress sequentially into one buffer, then parse the lines in
    // parallel (in order), as slices of it: no allocation per line.
    let mut all = Vec::new();
    let broken = r.read_to_end(&mut all).err();
    // A stream that broke keeps its complete lines only.
    let complete = match broken {
        Some(_) => all.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1),
        None => all.len(),
    };
    let mut lines: Vec<(u64, &[u8])> = Vec::new();
    let mut line_no = 0u64;
    for line in all[..complete].split_inclusive(|&b| b == b'\n') {
        line_no += 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        lines.push((line_no, line));
    }
    let broken = broken.map(|e| format!("truncated or corrupt stream after line {line_no}: {e}"));
    let parsed: Vec<std::result::Result<RawDoc, (&'static str, String)>> = lines
        .par_iter()
        .map(|&(no, buf)| {
            let line = buf.strip_suffix(b"\n").unwrap_or(buf);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let text = std::str::from_utf8(line).map_err(|e| ("invalid_utf8", e.to_string()))?;
            let value: serde_json::Value =
                serde_json::from_str(text).map_err(|e| ("malformed_json", e.to_string()))?;
            let (text, id) = extract(&value, src)
                .map_err(|f| ("missing_text", format!("no text at field {f:?}")))?;
            Ok(RawDoc {
                id: id.unwrap_or_else(|| format!("{rel}:{no}")),
                text,
            })
        })
        .collect();
    for ((no, _), p) in lines.iter().zip(parsed) {
        out.records += 1;
        match p {
            Ok(d) => out.docs.push(d),
            Err((reason, message)) => out.reject(name, Some(*no), reason, message),
        }
    }
    match broken {
        Some(msg) => out.unreadable(src, on_error, name, msg),
        None => Ok(()),
    }
}

fn lookup<'a>(v: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    path.split('.').try_fold(v, |v, k| match v {
        serde_json::Value::Object(m) => m.get(k),
        serde_json::Value::Array(a) => k.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

fn collect_strings<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match v {
        serde_json::Value::String(s) => out.push(s),
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        serde_json::Value::Object(m) => m.values().for_each(|x| collect_strings(x, out)),
        _ => {}
    }
}

/// Text (fields joined by a blank line; arrays and objects contribute their
/// strings joined by newlines) and optional id; `Err(field)` names the first
/// missing or empty field. The text is copied once, into its final size.
fn extract(
    v: &serde_json::Value,
    src: &SourceConfig,
) -> std::result::Result<(String, Option<String>), String> {
    let mut fields: Vec<Vec<&str>> = Vec::with_capacity(src.text_fields.len());
    for f in &src.text_fields {
        let mut strings = Vec::new();
        match lookup(v, f) {
            Some(x) => collect_strings(x, &mut strings),
            None => return Err(f.clone()),
        }
        if strings.is_empty() {
            return Err(f.clone());
        }
        fields.push(strings);
    }
    let len: usize = fields
        .iter()
        .map(|strings| strings.iter().map(|s| s.len() + 1).sum::<usize>() + 1)
        .sum();
    let mut text = String::with_capacity(len);
    for (i, strings) in fields.iter().enumerate() {
        if i > 0 {
            text.push_str("\n\n");
        }
        for (j, s) in strings.iter().enumerate() {
            if j > 0 {
                text.push('\n');
            }
            text.push_str(s);
        }
    }
    let id = src
        .id_field
        .as_deref()
        .and_then(|f| lookup(v, f))
        .and_then(|x| match x {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        });
    Ok((text, id))
}

fn string_at(col: &dyn Array, i: usize) -> Option<String> {
    if col.is_null(i) {
        return None;
    }
    if let Some(a) = col.as_any().downcast_ref::<StringArray>() {
        return Some(a.value(i).to_string());
    }
    if let Some(a) = col.as_any().downcast_ref::<LargeStringArray>() {
        return Some(a.value(i).to_string());
    }
    if let Some(a) = col.as_any().downcast_ref::<StringViewArray>() {
        return Some(a.value(i).to_string());
    }
    None
}

fn read_parquet(
    bytes: bytes::Bytes,
    name: &str,
    rel: &str,
    src: &SourceConfig,
    on_error: OnError,
    out: &mut ReadOutput,
) -> Result<()> {
    let builder = match ParquetRecordBatchReaderBuilder::try_new(bytes) {
        Ok(b) => b,
        Err(e) => {
            return out.unreadable(
                src,
                on_error,
                name,
                format!("not a readable parquet file: {e}"),
            );
        }
    };
    let schema = builder.schema().clone();
    let mut text_cols = Vec::new();
    for f in &src.text_fields {
        match schema.index_of(f) {
            Ok(i) => text_cols.push(i),
            Err(_) => {
                return out.unreadable(
                    src,
                    on_error,
                    name,
                    format!("no column {f:?} (parquet fields are top-level column names)"),
                );
            }
        }
    }
    let id_col = src
        .id_field
        .as_deref()
        .and_then(|f| schema.index_of(f).ok());
    let reader = match builder.with_batch_size(1024).build() {
        Ok(r) => r,
        Err(e) => return out.unreadable(src, on_error, name, format!("cannot read parquet: {e}")),
    };
    let mut row = 0u64;
    for batch in reader {
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                return out.unreadable(
                    src,
                    on_error,
                    name,
                    format!("corrupt parquet after row {row}: {e}"),
                );
            }
        };
        for i in 0..batch.num_rows() {
            row += 1;
            out.records += 1;
            let mut parts = Vec::with_capacity(text_cols.len());
            let mut missing = None;
            for (k, &c) in text_cols.iter().enumerate() {
                match string_at(batch.column(c).as_ref(), i) {
                    Some(s) => parts.push(s),
                    None => {
                        missing = Some(src.text_fields[k].clone());
                        break;
                    }
                }
            }
            if let Some(f) = missing {
                out.reject(
                    name,
                    Some(row),
                    "missing_text",
                    format!("null or non-string {f:?}"),
                );
                continue;
            }
            let id = id_col
                .and_then(|c| string_at(batch.column(c).as_ref(), i))
                .unwrap_or_else(|| format!("{rel}:{row}"));
            out.docs.push(RawDoc {
                id,
                text: parts.join("\n\n"),
            });
        }
    }
    Ok(())
}
