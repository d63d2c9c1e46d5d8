//! The twinhead worker: one process per accelerator that trains an Ettin
//! model (encoder or decoder) on its slice of every global batch.

pub mod collective;
pub mod optim;
pub mod runtime;
pub mod schedule;
