//! Parquet layouts of stage-1 documents and phase shards, written so that
//! the same rows always give the same bytes (fixed `created_by`, zstd, no
//! timestamps), and read back.

use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder, UInt16Builder, UInt32Builder};
use arrow_array::{Array, ArrayRef, ListArray, RecordBatch, StringArray, UInt16Array, UInt32Array};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{Error, Result};

/// The `created_by` written into every file (no version: bytes must not
/// change when the program is rebuilt).
pub const CREATED_BY: &str = "twinhead-dataprep";

fn perr(location: &str, e: impl std::fmt::Display) -> Error {
    Error::Parquet {
        location: location.to_string(),
        message: e.to_string(),
    }
}

fn list_field(name: &str, item: DataType) -> Field {
    Field::new(
        name,
        DataType::List(Arc::new(Field::new("item", item, false))),
        false,
    )
}

fn list_builder<B: arrow_array::builder::ArrayBuilder>(inner: B, item: DataType) -> ListBuilder<B> {
    ListBuilder::new(inner).with_field(Arc::new(Field::new("item", item, false)))
}

fn props(rows_per_group: usize) -> Result<WriterProperties> {
    Ok(WriterProperties::builder()
        .set_created_by(CREATED_BY.to_string())
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(3).map_err(|e| perr("writer", e))?,
        ))
        .set_max_row_group_row_count(Some(rows_per_group.max(1)))
        .build())
}

fn write_batch(
    location: &str,
    schema: Arc<Schema>,
    columns: Vec<ArrayRef>,
    rows_per_group: usize,
) -> Result<Vec<u8>> {
    let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| perr(location, e))?;
    let mut w = ArrowWriter::try_new(Vec::new(), schema, Some(props(rows_per_group)?))
        .map_err(|e| perr(location, e))?;
    w.write(&batch).map_err(|e| perr(location, e))?;
    w.into_inner().map_err(|e| perr(location, e))
}

/// Stage-1 schema: `doc_id: utf8`, `input_ids: list<uint32>`.
pub fn docs_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("doc_id", DataType::Utf8, false),
        list_field("input_ids", DataType::UInt32),
    ]))
}

/// Phase-shard schema: `input_ids`, `doc_lens: list<uint32>`, `source: list<uint16>`.
pub fn shard_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        list_field("input_ids", DataType::UInt32),
        list_field("doc_lens", DataType::UInt32),
        list_field("source", DataType::UInt16),
    ]))
}

/// One tokenized document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    /// Document id.
    pub id: String,
    /// `[CLS] … [SEP]`.
    pub ids: Vec<u32>,
}

/// One packed training row.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Row {
    /// Exactly `seq_len` tokens.
    pub input_ids: Vec<u32>,
    /// Lengths of the documents (pieces) in the row; they sum to `seq_len`.
    pub doc_lens: Vec<u32>,
    /// Source index of each document.
    pub source: Vec<u16>,
}

/// Encode stage-1 documents.
pub fn write_docs(location: &str, docs: &[Doc]) -> Result<Vec<u8>> {
    let mut idb = StringBuilder::new();
    let mut tb = list_builder(UInt32Builder::new(), DataType::UInt32);
    for d in docs {
        idb.append_value(&d.id);
        tb.values().append_slice(&d.ids);
        tb.append(true);
    }
    write_batch(
        location,
        docs_schema(),
        vec![Arc::new(idb.finish()), Arc::new(tb.finish())],
        1024,
    )
}

/// Encode phase rows; `rows_per_group` rows per parquet row group.
pub fn write_rows(location: &str, rows: &[Row], rows_per_group: usize) -> Result<Vec<u8>> {
    let mut ib = list_builder(UInt32Builder::new(), DataType::UInt32);
    let mut lb = list_builder(UInt32Builder::new(), DataType::UInt32);
    let mut sb = list_builder(UInt16Builder::new(), DataType::UInt16);
    for r in rows {
        ib.values().append_slice(&r.input_ids);
        ib.append(true);
        lb.values().append_slice(&r.doc_lens);
        lb.append(true);
        sb.values().append_slice(&r.source);
        sb.append(true);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(ib.finish()),
        Arc::new(lb.finish()),
        Arc::new(sb.finish()),
    ];
    write_batch(location, shard_schema(), cols, rows_per_group)
}

fn batches(location: &str, bytes: Vec<u8>) -> Result<Vec<RecordBatch>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
        .and_then(|b| b.with_batch_size(4096).build())
        .map_err(|e| perr(location, e))?;
    reader.map(|b| b.map_err(|e| perr(location, e))).collect()
}

fn column<'a, T: 'static>(location: &str, batch: &'a RecordBatch, name: &str) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            perr(
                location,
                format!("column {name:?} missing or of the wrong type"),
            )
        })
}

fn lists<T, V>(location: &str, list: &ListArray, get: impl Fn(&T) -> &[V]) -> Result<Vec<Vec<V>>>
where
    T: 'static,
    V: Copy,
{
    let values = list
        .values()
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| perr(location, "list values of the wrong type"))?;
    let all = get(values);
    let offs = list.value_offsets();
    let mut out = Vec::with_capacity(list.len());
    for w in offs.windows(2) {
        let (a, b) = (
            usize::try_from(w[0]).unwrap_or(0),
            usize::try_from(w[1]).unwrap_or(0),
        );
        let slice = all
            .get(a..b)
            .ok_or_else(|| perr(location, "list offsets out of range"))?;
        out.push(slice.to_vec());
    }
    Ok(out)
}

fn u32s(a: &UInt32Array) -> &[u32] {
    a.values()
}

fn u16s(a: &UInt16Array) -> &[u16] {
    a.values()
}

/// Decode stage-1 documents.
pub fn read_docs(location: &str, bytes: Vec<u8>) -> Result<Vec<Doc>> {
    let mut out = Vec::new();
    for b in batches(location, bytes)? {
        let ids = column::<StringArray>(location, &b, "doc_id")?;
        let toks = lists(
            location,
            column::<ListArray>(location, &b, "input_ids")?,
            u32s,
        )?;
        for (i, t) in toks.into_iter().enumerate() {
            out.push(Doc {
                id: ids.value(i).to_string(),
                ids: t,
            });
        }
    }
    Ok(out)
}

/// Decode phase rows.
pub fn read_rows(location: &str, bytes: Vec<u8>) -> Result<Vec<Row>> {
    let mut out = Vec::new();
    for b in batches(location, bytes)? {
        let ids = lists(
            location,
            column::<ListArray>(location, &b, "input_ids")?,
            u32s,
        )?;
        let lens = lists(
            location,
            column::<ListArray>(location, &b, "doc_lens")?,
            u32s,
        )?;
        let srcs = lists(location, column::<ListArray>(location, &b, "source")?, u16s)?;
        for ((input_ids, doc_lens), source) in ids.into_iter().zip(lens).zip(srcs) {
            out.push(Row {
                input_ids,
                doc_lens,
                source,
            });
        }
    }
    Ok(out)
}

/// Row groups and rows of a parquet file (from its footer).
pub fn row_groups(location: &str, bytes: Vec<u8>) -> Result<Vec<i64>> {
    let b = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
        .map_err(|e| perr(location, e))?;
    Ok(b.metadata()
        .row_groups()
        .iter()
        .map(|g| g.num_rows())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_round_trip_and_stable_bytes() -> Result<()> {
        let docs = vec![
            Doc {
                id: "a:1".into(),
                ids: vec![1, 10, 11, 2],
            },
            Doc {
                id: "b".into(),
                ids: vec![1, 2],
            },
        ];
        let bytes = write_docs("t", &docs)?;
        assert_eq!(write_docs("t", &docs)?, bytes);
        assert!(
            bytes
                .windows(CREATED_BY.len())
                .any(|w| w == CREATED_BY.as_bytes())
        );
        assert!(!bytes.windows(10).any(|w| w == b"parquet-rs"));
        assert_eq!(read_docs("t", bytes)?, docs);
        Ok(())
    }

    #[test]
    fn rows_round_trip_with_row_groups() -> Result<()> {
        let rows: Vec<Row> = (0..10u32)
            .map(|i| Row {
                input_ids: vec![i; 4],
                doc_lens: vec![1, 3],
                source: vec![0, (i % 3) as u16],
            })
            .collect();
        let bytes = write_rows("t", &rows, 4)?;
        assert_eq!(row_groups("t", bytes.clone())?, vec![4, 4, 2]);
        assert_eq!(read_rows("t", bytes)?, rows);
        Ok(())
    }
}
