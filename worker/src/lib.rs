//! The twinhead worker: one process per accelerator that trains an Ettin
//! model (encoder or decoder) on its slice of every global batch.

pub mod checkpoint;
pub mod collective;
pub mod loader;
pub mod optim;
pub mod schedule;
pub mod store;
