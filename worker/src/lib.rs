//! The twinhead worker: one process per accelerator that trains an Ettin
//! model (encoder or decoder) on its slice of every global batch.
//!
//! # Layout
//! - [`model`]: the ModernBERT network in Burn (both flavours), its config.
//! - [`objectives`]: MLM, CLM and MNTP batches and losses.
//! - [`hf`]: Hugging Face folders (`config.json` + `model.safetensors`)
//!   in and out.
//! - [`infer`]: fill-mask and generation (KV cache, seeded sampling).
//! - [`collective`]: all-reduce and friends: single process, CPU ring over
//!   TCP, NCCL (feature `cuda`).
//! - [`optim`], [`schedule`]: StableAdamW on the weights' device; token-driven LR laws.
//! - [`loader`]: a phase's rows for each rank and step, prefetched; the
//!   data-order log.
//! - [`checkpoint`]: checkpoints on object storage (`twinhead-data`'s `store`).
//! - [`runtime`]: the worker's life with the coordinator;
//!   [`host_memory`]: how a training process keeps its memory.
//!
//! # Backends
//! Tests and CPU runs use Burn's `ndarray` backend ([`CpuBackend`]); the
//! `cuda` cargo feature adds Burn's CUDA backend. RESEARCH.md measured
//! `flex` about 10% faster on CPU training, but it takes 50% longer to
//! build and CPU training is only for tests and laptops here, so the
//! backend with the cheaper build and the longer track record wins.

pub mod checkpoint;
pub mod collective;
pub mod device;
pub mod hf;
pub mod host_memory;
pub mod infer;
pub mod loader;
pub mod model;
pub mod objectives;
pub mod optim;
pub mod runtime;
pub mod schedule;
pub mod train;

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
