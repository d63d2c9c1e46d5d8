//! twinhead's models as a library: the Ettin / ModernBERT network in Burn,
//! generic over the backend, with its objectives, its Hugging Face formats
//! and inference. The CLI's model commands and evaluation use it without
//! the worker's runtime (loader, collectives, checkpoints), which trains it.
//!
//! # Layout
//! - [`config`]: `ModelConfig`, a validated `ModelSpec` (the
//!   `configs/models/*.toml` shapes, embedded as built-ins), parameter count.
//! - [`packing`]: document boundaries in packed rows: positions, masks,
//!   rotary tables (host side).
//! - [`attention`]: blocked attention per document and window, with a
//!   recomputing backward, and its plans.
//! - [`backend`]: [`ModelBackend`], the operations the model adds to a
//!   Burn backend (blocked attention, GELU with its exact derivative).
//! - [`modernbert`]: the modules (attention, GeGLU MLP, layers, head) and
//!   [`ModernBert`] itself.
//! - [`objectives`]: MLM, CLM and MNTP batches and losses.
//! - [`hf`]: Hugging Face folders (`config.json` + `model.safetensors`)
//!   in and out.
//! - [`infer`]: fill-mask and generation (KV cache, seeded sampling).
//! - [`eval`]: downstream tasks from OLMo's request files: log-likelihoods
//!   for both flavours (pseudo-log-likelihood for encoders) and OLMo's
//!   accuracies.
//! - [`embed`]: embedding tasks for both flavours (mean-pooled final
//!   hidden states): SQuAD retrieval (nDCG@10, MRR@10), linear probes with
//!   k-fold cross-validation, and the Arrow stream reader for their data.
//! - [`adamw`]: one tensor's StableAdamW update, an operation of
//!   [`ModelBackend`] (the optimizer around it is the worker's).
//!
//! # Backends
//! Tests and CPU runs use Burn's `ndarray` backend ([`CpuBackend`]); the
//! `cuda` cargo feature adds Burn's CUDA backend. RESEARCH.md measured
//! `flex` about 10% faster on CPU training, but it takes 50% longer to
//! build and CPU training is only for tests and laptops here, so the
//! backend with the cheaper build and the longer track record wins.
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

pub mod adamw;
pub mod attention;
pub mod backend;
pub mod config;
pub mod embed;
pub mod eval;
mod head_cpu;
pub mod hf;
pub mod infer;
pub mod modernbert;
pub mod objectives;
pub mod packing;
mod product_cpu;
mod rowwise;

/// The CPU backend used by tests and CPU training.
pub type CpuBackend = burn::backend::NdArray<f32>;
/// [`CpuBackend`] with autodiff, for training on CPU.
pub type CpuAutodiff = burn::backend::Autodiff<CpuBackend>;

/// Burn's CUDA backend (feature `cuda`).
#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Cuda<f32>;
/// [`CudaBackend`] with autodiff, for training on a GPU.
#[cfg(feature = "cuda")]
pub type CudaAutodiff = burn::backend::Autodiff<CudaBackend>;

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
