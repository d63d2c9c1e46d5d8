//! The Ettin / ModernBERT network in Burn, generic over the backend.
//!
//! # Layout
//! - [`config`]: `ModelConfig`, the `configs/models/*.toml` shape files
//!   (embedded as built-ins), validation, parameter count.
//! - [`packing`]: document boundaries in packed rows: positions, masks,
//!   rotary tables (host side).
//! - [`modernbert`]: the modules (attention, GeGLU MLP, layers, head) and
//!   [`ModernBert`] itself.

pub mod config;
pub mod modernbert;
pub mod packing;

pub use config::{ConfigError, ModelConfig, RawModelConfig};
pub use modernbert::{Flavour, ModernBert, TokenBatch};
pub use packing::{AttentionKind, PackedLayout};

/// Errors from running the model on a batch.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `doc_lens` does not describe the rows.
    #[error("invalid doc_lens: {0}")]
    DocLens(String),
    /// The rows are not a rectangular, non-empty batch.
    #[error("invalid batch: {0}")]
    Batch(String),
    /// A token id is not in the vocabulary.
    #[error("token id {id} is outside the vocabulary (vocab_size {vocab_size})")]
    TokenOutOfRange {
        /// The offending id.
        id: u32,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
}
