//! Reading single row groups of a phase shard without fetching the whole
//! file: the footer is read once per shard, then only the byte ranges of
//! the `input_ids` and `doc_lens` column chunks of the wanted row group.

use std::sync::Arc;
use std::time::Duration;

use arrow_array::{Array, ListArray, UInt32Array};
use bytes::Bytes;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use parquet::file::reader::{ChunkReader, Length};

use twinhead_data::formats::{DOC_LENS, EndCheckedReader, INPUT_IDS, catch_decoder_panic};
use twinhead_data::store::{Location, Pending, StoreError};

use super::LoaderError;

/// Bytes read from the end of a shard when it is opened: the 8-byte footer
/// and, for the shards dataprep writes (a few KiB of metadata), the whole
/// metadata, in one range. Larger metadata costs one more.
const FOOTER_READ: u64 = 64 * 1024;

/// The columns the loader decodes.
const COLUMNS: [&str; 2] = [INPUT_IDS, DOC_LENS];

/// Bytes `[start, start + data.len())` of a file of `file_len` bytes; any
/// read outside them is an error (it would mean the column-chunk ranges
/// were computed wrongly).
struct RangeBytes {
    file_len: u64,
    start: u64,
    data: Bytes,
}

impl RangeBytes {
    fn slice(&self, start: u64, length: usize) -> Result<Bytes, ParquetError> {
        let end = start.saturating_add(length as u64);
        let data_end = self.start + self.data.len() as u64;
        if start < self.start || end > data_end {
            return Err(ParquetError::General(format!(
                "read of bytes {start}..{end} outside the fetched range {}..{data_end}",
                self.start
            )));
        }
        let from = (start - self.start) as usize;
        Ok(self.data.slice(from..from + length))
    }
}

impl Length for RangeBytes {
    fn len(&self) -> u64 {
        self.file_len
    }
}

impl ChunkReader for RangeBytes {
    // Page headers are read from it: reading past the end must fail
    // (`EndCheckedReader` says why).
    type T = EndCheckedReader;

    fn get_read(&self, start: u64) -> Result<Self::T, ParquetError> {
        let data_end = self.start + self.data.len() as u64;
        let length = data_end.saturating_sub(start) as usize;
        Ok(EndCheckedReader(self.slice(start, length)?))
    }

    fn get_bytes(&self, start: u64, length: usize) -> Result<Bytes, ParquetError> {
        self.slice(start, length)
    }
}

/// What opening a shard fetched: the whole file (when its hash is checked)
/// or its tail (the footer, and for a small shard the whole file) and size.
pub(super) enum Fetched {
    Whole(Bytes),
    Tail { bytes: Bytes, file_len: u64 },
}

impl Fetched {
    /// Fetches what opening `rel` needs, blocking.
    pub fn fetch(root: &Location, rel: &str, whole: bool) -> Result<Self, StoreError> {
        if whole {
            Ok(Self::Whole(root.get(rel)?))
        } else {
            let (bytes, file_len) = root.get_tail(rel, FOOTER_READ)?;
            Ok(Self::Tail { bytes, file_len })
        }
    }
}

/// The read that opens a shard, started on the storage runtime (read-ahead).
pub(super) enum PendingOpen {
    Whole(Pending<Bytes>),
    Tail(Pending<(Bytes, u64)>),
}

impl PendingOpen {
    /// Starts fetching what opening `rel` needs.
    pub fn start(root: &Location, rel: &str, whole: bool) -> Self {
        if whole {
            Self::Whole(root.start_get(rel))
        } else {
            Self::Tail(root.start_get_tail(rel, FOOTER_READ))
        }
    }

    pub fn is_finished(&self) -> bool {
        match self {
            Self::Whole(p) => p.is_finished(),
            Self::Tail(p) => p.is_finished(),
        }
    }

    /// What was fetched, if it comes within `timeout`.
    pub fn wait_for(&mut self, timeout: Duration) -> Option<Result<Fetched, StoreError>> {
        match self {
            Self::Whole(p) => p.wait_for(timeout).map(|r| r.map(Fetched::Whole)),
            Self::Tail(p) => p
                .wait_for(timeout)
                .map(|r| r.map(|(bytes, file_len)| Fetched::Tail { bytes, file_len })),
        }
    }
}

/// What reading one row group takes: the byte range of its column chunks
/// and the part of it not already held, to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct GroupRead {
    /// The column chunks of `input_ids` and `doc_lens`.
    pub range: std::ops::Range<u64>,
    /// The bytes to fetch: `range`, or its head when the rest was fetched
    /// with the footer; `None` when all of it was.
    pub fetch: Option<std::ops::Range<u64>>,
}

/// One opened shard: its footer and, when hashes are verified, its bytes.
pub(super) struct OpenShard {
    /// Index of the shard in the phase.
    pub index: usize,
    /// Full name, for messages.
    pub name: String,
    rel: String,
    file_len: u64,
    metadata: Arc<ParquetMetaData>,
    reader_meta: ArrowReaderMetadata,
    /// First row of every row group, and the row count as the last entry.
    pub group_starts: Vec<u64>,
    /// The file's bytes from an offset to its end, when opening fetched
    /// them: the whole file when its hash was verified, else the tail read
    /// with the footer. Row groups inside it are read from it.
    held: Option<(u64, Bytes)>,
    /// Bytes fetched to open it.
    pub bytes_fetched: u64,
}

/// The decoded rows of one row group.
pub(super) struct DecodedGroup {
    pub shard: usize,
    pub group: usize,
    /// First row of the group within its shard.
    pub first_row: u64,
    /// Rows × seq_len tokens.
    pub input_ids: Vec<u32>,
    pub doc_lens: Vec<Vec<u32>>,
}

impl DecodedGroup {
    pub fn rows(&self) -> u64 {
        self.doc_lens.len() as u64
    }
}

fn perr(name: &str, e: impl std::fmt::Display) -> LoaderError {
    LoaderError::Parquet {
        location: name.to_string(),
        message: e.to_string(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

impl OpenShard {
    /// Opens `rel` from what [`Fetched`] brought (checking the hash when
    /// given one); metadata longer than the tail read costs one more read.
    pub fn from_fetched(
        root: &Location,
        index: usize,
        rel: &str,
        fetched: Fetched,
        expected_sha256: Option<&str>,
    ) -> Result<Self, LoaderError> {
        let name = root.name(rel);
        let (file_len, whole, tail_read) = match fetched {
            Fetched::Whole(bytes) => {
                if let Some(expected) = expected_sha256 {
                    let actual = sha256_hex(&bytes);
                    if !actual.eq_ignore_ascii_case(expected) {
                        return Err(LoaderError::ShardHash {
                            location: name,
                            expected: expected.to_string(),
                            actual,
                        });
                    }
                }
                (bytes.len() as u64, Some(bytes), None)
            }
            Fetched::Tail { bytes, file_len } => (file_len, None, Some(bytes)),
        };
        let tail_start = file_len - tail_read.as_ref().map_or(0, |b| b.len() as u64);
        let mut extra_fetched = 0u64;
        let mut tail = |range: std::ops::Range<u64>| -> Result<Bytes, LoaderError> {
            match (&whole, &tail_read) {
                (Some(b), _) => Ok(b.slice(range.start as usize..range.end as usize)),
                (None, Some(t)) if range.start >= tail_start => Ok(
                    t.slice((range.start - tail_start) as usize..(range.end - tail_start) as usize)
                ),
                (None, _) => {
                    extra_fetched += range.end - range.start;
                    Ok(root.get_range(rel, range)?)
                }
            }
        };
        if file_len < 12 {
            return Err(perr(
                &name,
                format!("file of {file_len} bytes is too short"),
            ));
        }
        let footer = tail(file_len - 8..file_len)?;
        if &footer[4..8] != b"PAR1" {
            return Err(perr(&name, "no PAR1 magic at the end of the file"));
        }
        let meta_len = u64::from(u32::from_le_bytes([
            footer[0], footer[1], footer[2], footer[3],
        ]));
        if meta_len + 8 > file_len {
            return Err(perr(
                &name,
                format!("footer length {meta_len} exceeds the file"),
            ));
        }
        let meta_bytes = tail(file_len - 8 - meta_len..file_len - 8)?;
        let metadata = Arc::new(
            ParquetMetaDataReader::decode_metadata(&meta_bytes).map_err(|e| perr(&name, e))?,
        );
        let reader_meta = ArrowReaderMetadata::try_new(metadata.clone(), ArrowReaderOptions::new())
            .map_err(|e| perr(&name, e))?;
        let mut group_starts = Vec::with_capacity(metadata.num_row_groups() + 1);
        let mut row = 0u64;
        for (i, group) in metadata.row_groups().iter().enumerate() {
            group_starts.push(row);
            // Counts from the footer: any number may be there.
            row = u64::try_from(group.num_rows())
                .ok()
                .and_then(|rows| row.checked_add(rows))
                .ok_or_else(|| {
                    perr(
                        &name,
                        format!(
                            "row group {i} has {} rows: the row counts are negative or add up past 2^64",
                            group.num_rows()
                        ),
                    )
                })?;
        }
        group_starts.push(row);
        Ok(Self {
            index,
            name,
            rel: rel.to_string(),
            file_len,
            metadata,
            reader_meta,
            group_starts,
            bytes_fetched: match (&whole, &tail_read) {
                (Some(b), _) => b.len() as u64,
                (None, Some(t)) => t.len() as u64 + extra_fetched,
                (None, None) => 8 + meta_len,
            },
            held: whole
                .map(|b| (0, b))
                .or_else(|| tail_read.map(|t| (tail_start, t))),
        })
    }

    /// Rows in the file according to its footer.
    pub fn rows(&self) -> u64 {
        self.group_starts.last().copied().unwrap_or(0)
    }

    /// The row group holding `row` (a row of this shard).
    pub fn group_of(&self, row: u64) -> usize {
        self.group_starts.partition_point(|&s| s <= row) - 1
    }

    /// The shard's path below the dataset root.
    pub fn rel(&self) -> &str {
        &self.rel
    }

    /// What reading row group `group` takes (see [`GroupRead`]).
    pub fn group_read(&self, group: usize) -> Result<GroupRead, LoaderError> {
        let name = &self.name;
        if group + 1 >= self.group_starts.len() {
            return Err(perr(name, format!("no row group {group}")));
        }
        let rg = &self.metadata.row_groups()[group];
        let mut lo = u64::MAX;
        let mut hi = 0u64;
        for chunk in rg.columns() {
            let root = chunk.column_path().parts().first().map(String::as_str);
            if !root.is_some_and(|r| COLUMNS.contains(&r)) {
                continue;
            }
            let start = chunk
                .dictionary_page_offset()
                .unwrap_or_else(|| chunk.data_page_offset());
            let len = chunk.compressed_size();
            let (Ok(start), Ok(len)) = (u64::try_from(start), u64::try_from(len)) else {
                return Err(perr(name, "negative column chunk offset"));
            };
            lo = lo.min(start);
            hi = hi.max(start + len);
        }
        if lo >= hi || hi > self.file_len {
            return Err(perr(name, format!("bad column chunk range {lo}..{hi}")));
        }
        let held_from = self.held.as_ref().map_or(u64::MAX, |(start, _)| *start);
        let fetch = (lo < held_from).then(|| lo..hi.min(held_from));
        Ok(GroupRead {
            range: lo..hi,
            fetch,
        })
    }

    /// Decodes row group `group` from `fetched` (the bytes of
    /// `read.fetch`) and the bytes held since opening, checking every row
    /// against `seq_len`.
    pub fn decode_group(
        &self,
        group: usize,
        read: &GroupRead,
        fetched: Option<Bytes>,
        seq_len: usize,
    ) -> Result<DecodedGroup, LoaderError> {
        let name = &self.name;
        if group + 1 >= self.group_starts.len() {
            return Err(perr(name, format!("no row group {group}")));
        }
        let schema = self.metadata.file_metadata().schema_descr();
        let roots = schema.root_schema().get_fields();
        let mut root_indices = Vec::new();
        for column in COLUMNS {
            let index = roots
                .iter()
                .position(|f| f.name() == column)
                .ok_or_else(|| perr(name, format!("no column `{column}`")))?;
            root_indices.push(index);
        }
        let (lo, hi) = (read.range.start, read.range.end);
        let held = |from: u64, to: u64| -> Result<Bytes, LoaderError> {
            match &self.held {
                Some((start, bytes)) if from >= *start && to <= start + bytes.len() as u64 => {
                    Ok(bytes.slice((from - start) as usize..(to - start) as usize))
                }
                _ => Err(perr(name, format!("bytes {from}..{to} were not fetched"))),
            }
        };
        let data = match (&read.fetch, fetched) {
            (None, _) => held(lo, hi)?,
            (Some(range), Some(bytes)) if bytes.len() as u64 == range.end - range.start => {
                if range.end == hi {
                    bytes
                } else {
                    // The head fetched now, the rest held with the footer.
                    let mut joined = Vec::with_capacity((hi - lo) as usize);
                    joined.extend_from_slice(&bytes);
                    joined.extend_from_slice(&held(range.end, hi)?);
                    Bytes::from(joined)
                }
            }
            (Some(range), got) => {
                return Err(perr(
                    name,
                    format!(
                        "read of bytes {}..{} returned {} bytes",
                        range.start,
                        range.end,
                        got.map_or(0, |b| b.len())
                    ),
                ));
            }
        };
        let reader = RangeBytes {
            file_len: self.file_len,
            start: lo,
            data,
        };
        let mask = ProjectionMask::roots(schema, root_indices);
        let first_row = self.group_starts[group];
        let mut out = DecodedGroup {
            shard: self.index,
            group,
            first_row,
            input_ids: Vec::new(),
            doc_lens: Vec::new(),
        };
        // The parquet crate panics on some corrupt pages (a varint longer
        // than 10 bytes, a dictionary page missing) instead of failing.
        catch_decoder_panic(|| {
            let batches = ParquetRecordBatchReaderBuilder::new_with_metadata(
                reader,
                self.reader_meta.clone(),
            )
            .with_row_groups(vec![group])
            .with_projection(mask)
            .with_batch_size(8192)
            .build()
            .map_err(|e| perr(name, e))?;
            for batch in batches {
                let batch = batch.map_err(|e| perr(name, e))?;
                self.take_rows(&batch, seq_len, &mut out)?;
            }
            Ok::<(), LoaderError>(())
        })
        .map_err(|e| perr(name, e))??;
        let expected = self.group_starts[group + 1] - first_row;
        if out.rows() != expected {
            return Err(perr(
                name,
                format!(
                    "row group {group} decoded {} rows, footer says {expected}",
                    out.rows()
                ),
            ));
        }
        Ok(out)
    }
}

impl OpenShard {
    /// Appends the rows of `batch` to `out`, checking every row against
    /// `seq_len`.
    fn take_rows(
        &self,
        batch: &arrow_array::RecordBatch,
        seq_len: usize,
        out: &mut DecodedGroup,
    ) -> Result<(), LoaderError> {
        let name = &self.name;
        let ids = list_u32(name, batch, INPUT_IDS)?;
        let lens = list_u32(name, batch, DOC_LENS)?;
        for row in 0..batch.num_rows() {
            let global = out.first_row + out.rows();
            let tokens = ids.row(row);
            if tokens.len() != seq_len {
                return Err(LoaderError::RowLength {
                    location: name.clone(),
                    row: global,
                    expected: seq_len,
                    got: tokens.len(),
                });
            }
            let docs = lens.row(row);
            let sum: u64 = docs.iter().map(|&d| u64::from(d)).sum();
            if sum != seq_len as u64 {
                return Err(LoaderError::DocLens {
                    location: name.clone(),
                    row: global,
                    sum,
                    seq_len,
                });
            }
            out.input_ids.extend_from_slice(tokens);
            out.doc_lens.push(docs.to_vec());
        }
        Ok(())
    }
}

/// A `list<uint32>` column of a record batch.
struct ListU32<'a> {
    offsets: &'a [i32],
    values: &'a [u32],
}

impl ListU32<'_> {
    fn row(&self, i: usize) -> &[u32] {
        let (a, b) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        &self.values[a..b]
    }
}

fn list_u32<'a>(
    name: &str,
    batch: &'a arrow_array::RecordBatch,
    column: &str,
) -> Result<ListU32<'a>, LoaderError> {
    let list = batch
        .column_by_name(column)
        .and_then(|c| c.as_any().downcast_ref::<ListArray>())
        .ok_or_else(|| perr(name, format!("column `{column}` is not a list")))?;
    let values = list
        .values()
        .as_any()
        .downcast_ref::<UInt32Array>()
        .ok_or_else(|| perr(name, format!("column `{column}` is not a list<uint32>")))?;
    let offsets: &[i32] = list.value_offsets();
    let values: &[u32] = values.values();
    let bad = offsets.len() != batch.num_rows() + 1
        || offsets.windows(2).any(|w| w[0] < 0 || w[0] > w[1])
        || offsets.last().is_some_and(|&o| o as usize > values.len());
    if bad {
        return Err(perr(
            name,
            format!("column `{column}` has bad list offsets"),
        ));
    }
    Ok(ListU32 { offsets, values })
}
