//! The crate's error type: every message says what went wrong and where
//! (file, key, line or object path).

/// Errors of dataset building, verification and statistics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The dataset config could not be read or is not valid (names the
    /// file and key).
    #[error(transparent)]
    Config(#[from] twinhead_proto::dataset::Error),
    /// Object storage failed (a bad URL, a missing object, a read, write
    /// or list that failed); names the object.
    #[error(transparent)]
    Store(#[from] twinhead_data::store::StoreError),
    /// A dataset file is not what twinhead writes; names the file.
    #[error(transparent)]
    Format(#[from] twinhead_data::FormatError),
    /// An input pattern is not a valid glob.
    #[error("input {input:?}: bad glob pattern: {message}")]
    Glob { input: String, message: String },
    /// A whole input could not be read and `on_error = "fail"`.
    #[error("source {source_name:?}: input {input}: {message}")]
    Input {
        source_name: String,
        input: String,
        message: String,
    },
    /// The tokenizer could not be loaded, trained or applied.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The output location already holds a dataset built from another config.
    #[error(
        "{location} already holds a dataset built from another config (sha256 {existing}, this config {this}); choose another output"
    )]
    OtherDataset {
        location: String,
        existing: String,
        this: String,
    },
    /// A manifest or marker file is not what this program writes.
    #[error("{location}: {message}")]
    Corrupt { location: String, message: String },
    /// Sampling could not meet a phase's budget.
    #[error("phase {phase:?}: {message}")]
    Phase { phase: String, message: String },
    /// The progress sink asked to stop; a rerun resumes.
    #[error("build cancelled; finished files are kept and a rerun resumes")]
    Cancelled,
    /// The worker thread pool could not be built.
    #[error("thread pool: {0}")]
    ThreadPool(String),
}

impl Error {
    /// Whether trying the same work again may succeed: a storage backend
    /// or thread pool that failed, not a bad config, input or file.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Store(e) => e.is_transient(),
            Error::ThreadPool(_) => true,
            _ => false,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
