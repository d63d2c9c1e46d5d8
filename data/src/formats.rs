//! Parquet layouts of stage-1 documents and phase shards, written so that
//! the same rows always give the same bytes (fixed `created_by`, zstd, no
//! timestamps), and read back.

use std::sync::Arc;

use arrow_array::builder::{
    ListBuilder, StringBuilder, UInt16Builder, UInt32Builder, UInt64Builder,
};
use arrow_array::{
    Array, ArrayRef, ListArray, RecordBatch, StringArray, UInt16Array, UInt32Array, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::FormatError;

type Result<T> = std::result::Result<T, FormatError>;

/// The `created_by` written into every file (no version: bytes must not
/// change when the program is rebuilt).
pub const CREATED_BY: &str = "twinhead-dataprep";

/// A phase shard's columns: a row's tokens, ...
pub const INPUT_IDS: &str = "input_ids";
/// ... the lengths of the documents (pieces) packed into it, ...
pub const DOC_LENS: &str = "doc_lens";
/// ... each piece's source index ...
pub const SOURCE: &str = "source";
/// ... and each piece's document key (a stable hash of the source name and
/// the document id, the one the held-out split is drawn by): which rows
/// hold which documents, checkable without the documents.
pub const DOC_KEY: &str = "doc_key";

fn perr(location: &str, e: impl std::fmt::Display) -> FormatError {
    FormatError::Parquet {
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
        list_field(INPUT_IDS, DataType::UInt32),
    ]))
}

/// Phase-shard schema (training and eval shards): `input_ids`,
/// `doc_lens: list<uint32>`, `source: list<uint16>`, `doc_key: list<uint64>`.
pub fn shard_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        list_field(INPUT_IDS, DataType::UInt32),
        list_field(DOC_LENS, DataType::UInt32),
        list_field(SOURCE, DataType::UInt16),
        list_field(DOC_KEY, DataType::UInt64),
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
    /// Key of each document ([`DOC_KEY`]).
    pub doc_keys: Vec<u64>,
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
    let mut kb = list_builder(UInt64Builder::new(), DataType::UInt64);
    for r in rows {
        ib.values().append_slice(&r.input_ids);
        ib.append(true);
        lb.values().append_slice(&r.doc_lens);
        lb.append(true);
        sb.values().append_slice(&r.source);
        sb.append(true);
        kb.values().append_slice(&r.doc_keys);
        kb.append(true);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(ib.finish()),
        Arc::new(lb.finish()),
        Arc::new(sb.finish()),
        Arc::new(kb.finish()),
    ];
    write_batch(location, shard_schema(), cols, rows_per_group)
}

/// A parquet file's bytes as the decoder reads them, where reading past the
/// end is an error. parquet 60 reads page headers from a `Read` and skips
/// an unknown field by copying that many bytes to a sink, which stops
/// quietly at the end of the input: a damaged header declaring a list of
/// 2^31 such fields took seconds to refuse. Here the first read past the
/// end fails, and the header with it.
#[derive(Clone, Debug)]
pub struct EndCheckedBytes(pub bytes::Bytes);

impl parquet::file::reader::Length for EndCheckedBytes {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
}

impl parquet::file::reader::ChunkReader for EndCheckedBytes {
    type T = EndCheckedReader;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        parquet::file::reader::ChunkReader::get_read(&self.0, start)
            .map(|r| EndCheckedReader(r.into_inner()))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        parquet::file::reader::ChunkReader::get_bytes(&self.0, start, length)
    }
}

/// A reader over bytes whose read past the end (a non-empty buffer asked
/// for when nothing is left) is an `UnexpectedEof` error, not `Ok(0)`.
#[derive(Debug)]
pub struct EndCheckedReader(pub bytes::Bytes);

impl std::io::Read for EndCheckedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use bytes::Buf;
        if self.0.is_empty() && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "a page header runs past the end of its data",
            ));
        }
        let n = buf.len().min(self.0.len());
        self.0.copy_to_slice(&mut buf[..n]);
        Ok(n)
    }
}

/// Runs `decode` (parquet decoding of a file's bytes), turning a panic of
/// the parquet crate into an error: some corrupt files make it panic
/// instead of returning one (a dictionary-encoded page without a
/// dictionary page: "Decoder for dict should have been set").
pub fn catch_decoder_panic<T>(decode: impl FnOnce() -> T) -> std::result::Result<T, String> {
    crate::caught::catch_panic(decode)
        .map_err(|what| format!("corrupt data: the parquet decoder failed ({what})"))
}

fn batches(location: &str, bytes: impl Into<bytes::Bytes>) -> Result<Vec<RecordBatch>> {
    let bytes: bytes::Bytes = bytes.into();
    catch_decoder_panic(|| {
        let reader = ParquetRecordBatchReaderBuilder::try_new(EndCheckedBytes(bytes))
            .and_then(|b| b.with_batch_size(4096).build())
            .map_err(|e| perr(location, e))?;
        reader.map(|b| b.map_err(|e| perr(location, e))).collect()
    })
    .map_err(|e| perr(location, e))?
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

fn u64s(a: &UInt64Array) -> &[u64] {
    a.values()
}

/// Scan-file schema (a stage-1 part after filtering, before dedup):
/// `doc_id`, `text` (normalized), the dedup key as two `u64` halves and
/// the text's length in characters.
pub fn scan_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("doc_id", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, false),
        Field::new("key_hi", DataType::UInt64, false),
        Field::new("key_lo", DataType::UInt64, false),
        Field::new("chars", DataType::UInt64, false),
    ]))
}

/// A filtered document as stored between scanning and tokenizing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScanDoc {
    /// Document id.
    pub id: String,
    /// Normalized text (empty when read without text).
    pub text: String,
    /// Dedup key.
    pub key: u128,
    /// Characters in `text`.
    pub chars: u64,
}

/// Encode filtered documents.
pub fn write_scan(location: &str, docs: &[ScanDoc]) -> Result<Vec<u8>> {
    let mut idb = StringBuilder::new();
    let mut tb = StringBuilder::new();
    let (mut hi, mut lo, mut ch) = (
        UInt64Builder::new(),
        UInt64Builder::new(),
        UInt64Builder::new(),
    );
    for d in docs {
        idb.append_value(&d.id);
        tb.append_value(&d.text);
        hi.append_value((d.key >> 64) as u64);
        lo.append_value(d.key as u64);
        ch.append_value(d.chars);
    }
    let cols: Vec<ArrayRef> = vec![
        Arc::new(idb.finish()),
        Arc::new(tb.finish()),
        Arc::new(hi.finish()),
        Arc::new(lo.finish()),
        Arc::new(ch.finish()),
    ];
    write_batch(location, scan_schema(), cols, 4096)
}

/// Decode filtered documents; without `with_text` only keys and lengths
/// are read (the dedup merge needs nothing else).
pub fn read_scan(
    location: &str,
    bytes: impl Into<bytes::Bytes>,
    with_text: bool,
) -> Result<Vec<ScanDoc>> {
    let wanted: &[&str] = if with_text {
        &["doc_id", "text", "key_hi", "key_lo", "chars"]
    } else {
        &["key_hi", "key_lo", "chars"]
    };
    let mut out = Vec::new();
    for b in projected_batches(location, bytes, wanted)? {
        let hi = column::<UInt64Array>(location, &b, "key_hi")?;
        let lo = column::<UInt64Array>(location, &b, "key_lo")?;
        let ch = column::<UInt64Array>(location, &b, "chars")?;
        let texts = if with_text {
            Some((
                column::<StringArray>(location, &b, "doc_id")?,
                column::<StringArray>(location, &b, "text")?,
            ))
        } else {
            None
        };
        for i in 0..b.num_rows() {
            let (id, text) = texts.map_or((String::new(), String::new()), |(ids, t)| {
                (ids.value(i).to_string(), t.value(i).to_string())
            });
            out.push(ScanDoc {
                id,
                text,
                key: (u128::from(hi.value(i)) << 64) | u128::from(lo.value(i)),
                chars: ch.value(i),
            });
        }
    }
    Ok(out)
}

/// Decode stage-1 documents.
pub fn read_docs(location: &str, bytes: impl Into<bytes::Bytes>) -> Result<Vec<Doc>> {
    let mut out = Vec::new();
    for b in batches(location, bytes)? {
        let ids = column::<StringArray>(location, &b, "doc_id")?;
        let toks = lists(
            location,
            column::<ListArray>(location, &b, INPUT_IDS)?,
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
pub fn read_rows(location: &str, bytes: impl Into<bytes::Bytes>) -> Result<Vec<Row>> {
    let mut out = Vec::new();
    for b in batches(location, bytes)? {
        let ids = lists(
            location,
            column::<ListArray>(location, &b, INPUT_IDS)?,
            u32s,
        )?;
        let lens = lists(location, column::<ListArray>(location, &b, DOC_LENS)?, u32s)?;
        let srcs = lists(location, column::<ListArray>(location, &b, SOURCE)?, u16s)?;
        let keys = lists(location, column::<ListArray>(location, &b, DOC_KEY)?, u64s)?;
        for (((input_ids, doc_lens), source), doc_keys) in
            ids.into_iter().zip(lens).zip(srcs).zip(keys)
        {
            out.push(Row {
                input_ids,
                doc_lens,
                source,
                doc_keys,
            });
        }
    }
    Ok(out)
}

/// The document keys of a phase shard, every row's in order (the
/// `doc_key` column only).
pub fn read_doc_keys(location: &str, bytes: impl Into<bytes::Bytes>) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    for b in projected_batches(location, bytes, &[DOC_KEY])? {
        for keys in lists(location, column::<ListArray>(location, &b, DOC_KEY)?, u64s)? {
            out.extend(keys);
        }
    }
    Ok(out)
}

/// The record batches of only the `columns` of a parquet file; a missing
/// column is an error naming it (a projection would silently skip it).
fn projected_batches(
    location: &str,
    bytes: impl Into<bytes::Bytes>,
    columns: &[&str],
) -> Result<Vec<RecordBatch>> {
    let bytes: bytes::Bytes = bytes.into();
    catch_decoder_panic(|| projected_batches_of(location, bytes, columns))
        .map_err(|e| perr(location, e))?
}

fn projected_batches_of(
    location: &str,
    bytes: bytes::Bytes,
    columns: &[&str],
) -> Result<Vec<RecordBatch>> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(EndCheckedBytes(bytes))
        .map_err(|e| perr(location, e))?;
    if let Some(missing) = columns
        .iter()
        .find(|c| builder.schema().field_with_name(c).is_err())
    {
        return Err(perr(location, format!("no {missing} column")));
    }
    let mask = ProjectionMask::columns(builder.parquet_schema(), columns.iter().copied());
    let reader = builder
        .with_projection(mask)
        .with_batch_size(4096)
        .build()
        .map_err(|e| perr(location, e))?;
    reader.map(|b| b.map_err(|e| perr(location, e))).collect()
}

/// Row groups and rows of a parquet file (from its footer).
pub fn row_groups(location: &str, bytes: impl Into<bytes::Bytes>) -> Result<Vec<i64>> {
    let bytes: bytes::Bytes = bytes.into();
    let b = catch_decoder_panic(|| ParquetRecordBatchReaderBuilder::try_new(bytes))
        .map_err(|e| perr(location, e))?
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
    fn scan_round_trip_with_and_without_text() -> Result<()> {
        let docs = vec![
            ScanDoc {
                id: "a".into(),
                text: "héllo".into(),
                key: (7u128 << 64) | 9,
                chars: 5,
            },
            ScanDoc {
                id: "b".into(),
                text: String::new(),
                key: u128::MAX,
                chars: 0,
            },
        ];
        let bytes = write_scan("t", &docs)?;
        assert_eq!(read_scan("t", bytes.clone(), true)?, docs);
        let bare = read_scan("t", bytes, false)?;
        assert_eq!(bare[0].key, docs[0].key);
        assert_eq!(bare[1].key, u128::MAX);
        assert_eq!(bare[0].chars, 5);
        assert!(bare[0].text.is_empty() && bare[0].id.is_empty());
        Ok(())
    }

    #[test]
    fn rows_round_trip_with_row_groups() -> Result<()> {
        let rows: Vec<Row> = (0..10u32)
            .map(|i| Row {
                input_ids: vec![i; 4],
                doc_lens: vec![1, 3],
                source: vec![0, (i % 3) as u16],
                doc_keys: vec![u64::MAX - u64::from(i), u64::from(i)],
            })
            .collect();
        let bytes = write_rows("t", &rows, 4)?;
        assert_eq!(row_groups("t", bytes.clone())?, vec![4, 4, 2]);
        let keys: Vec<u64> = rows.iter().flat_map(|r| r.doc_keys.clone()).collect();
        assert_eq!(read_doc_keys("t", bytes.clone())?, keys);
        assert_eq!(read_rows("t", bytes)?, rows);
        Ok(())
    }
}
