//! The Ettin / ModernBERT network in Burn, generic over the backend.
//!
//! # Layout
//! - [`config`]: `ModelConfig`, the `configs/models/*.toml` shape files
//!   (embedded as built-ins), validation, parameter count.
//! - [`packing`]: document boundaries in packed rows: positions, masks,
//!   rotary tables (host side).
//! - [`attention`]: blocked attention per document and window, with a
//!   recomputing backward, and its plans.
//! - [`backend`]: [`ModelBackend`], the operations the model adds to a
//!   Burn backend (blocked attention, GELU with its exact derivative).
//! - [`modernbert`]: the modules (attention, GeGLU MLP, layers, head) and
//!   [`ModernBert`] itself.
//!
//! # Decisions
//! - **Packed rows.** No token attends across a document boundary
//!   (block-diagonal mask combined with the causal / sliding mask) and
//!   RoPE positions restart at 0 in every document, as ModernBERT's
//!   unpadded varlen training does; a packed row computes exactly what its
//!   documents compute alone (tested against transformers).
//! - **Decoder window.** A causal local layer sees `i - w ..= i` with
//!   `w = local_attention / 2` (65 keys for Ettin's 128), which is what
//!   Ettin's FlashAttention training did; transformers' decoder sees one
//!   key fewer (see [`crate::hf`]).
//! - **Attention** is computed in blocks that only score the keys a query
//!   can see (its document, its window): memory and time grow with
//!   seq × window in local layers and with the documents' lengths squared
//!   in global ones, never with seq² of a packed row, and the backward
//!   recomputes scores instead of keeping them (see [`attention`]).
//! - **Sparse prediction.** Objectives run the head only at the positions
//!   that predict (see [`crate::objectives`]).

pub mod attention;
pub mod backend;
pub mod config;
mod head_cpu;
pub mod modernbert;
pub mod packing;
mod product_cpu;

pub use attention::{AttentionPlan, Visibility};
pub use backend::{CrossEntropyGrads, ModelBackend, Precision, TrainBackend};
pub use config::{ConfigError, ModelConfig};
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
