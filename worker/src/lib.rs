//! The twinhead worker: one process per accelerator that trains an Ettin
//! model (encoder or decoder) on its slice of every global batch. The model
//! itself, its objectives and formats are `twinhead-model`'s; this crate is
//! the training runtime around it.
//!
//! # Layout
//! - [`train`]: the training step and the trainer that runs assignments;
//!   `held_out`: the held-out loss in the training loop.
//! - [`collective`]: all-reduce and friends: single process, CPU ring over
//!   TCP, NCCL (feature `cuda`).
//! - [`optim`], [`schedule`]: StableAdamW on the weights' device; token-driven LR laws.
//! - [`loader`]: a phase's rows for each rank and step, prefetched; the
//!   data-order log.
//! - [`checkpoint`]: checkpoints on object storage (`twinhead-data`'s `store`).
//! - [`runtime`]: the worker's life with the coordinator;
//!   [`host_memory`]: how a training process keeps its memory;
//!   [`device`]: which accelerator a worker trains on.

pub mod checkpoint;
pub mod collective;
pub mod device;
mod held_out;
pub mod host_memory;
pub mod loader;
pub mod optim;
pub mod runtime;
pub mod schedule;
pub mod train;
