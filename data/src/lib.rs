//! What a twinhead dataset is on storage, in one place: dataprep writes
//! through these types and the worker reads through them.
//!
//! - [`store`]: a folder in an object store (local path, `file://`, and with
//!   the `cloud` feature `s3://`, `gs://`, `az://`) behind a small
//!   synchronous API.
//! - [`manifest`]: `manifest.json`, the per-file completion markers and the
//!   names of the files at a dataset's root.
//! - [`caught`]: panics of third-party readers turned into errors.
//! - [`formats`]: the parquet layouts (stage-1 documents and scans, phase
//!   shards), written so that the same rows always give the same bytes.
//!
//! This crate depends on no other twinhead crate.

pub mod caught;
pub mod formats;
pub mod manifest;
pub mod store;

/// A dataset file that is not what twinhead writes (bad parquet, a missing
/// column, a manifest that does not parse), naming the file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// A parquet file could not be written or read back.
    #[error("parquet {location}: {message}")]
    Parquet { location: String, message: String },
    /// A JSON file (manifest, marker) does not parse; names the key path.
    #[error("bad {location}: {message}")]
    Json { location: String, message: String },
    /// The manifest has no phase of that name.
    #[error("{location} has no phase `{phase}` (phases: {available:?})")]
    MissingPhase {
        location: String,
        phase: String,
        available: Vec<String>,
    },
}
