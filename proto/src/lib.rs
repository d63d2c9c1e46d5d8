//! The twinhead.v1 API and the one schema of twinhead's configs.
//!
//! A config file is parsed once, here, into the proto messages that every
//! other part carries: the CLI parses TOML into a [`v1::RunSpec`], the
//! coordinator validates the same message with the same rules, and workers
//! receive it in their assignments. Nobody re-parses TOML downstream.
//!
//! # Layout
//! - [`v1`]: generated messages, clients and servers (`proto/twinhead/v1`).
//! - [`auth`]: the bearer token clients send.
//! - [`batch`]: the batch size and first row of every step (batch-size
//!   warmup).
//! - [`config`]: TOML files (`configs/models`, `configs/runs`) and
//!   `--set key=value` overrides into proto messages.
//! - [`names`]: the names people and JSON see for the API's enums.
//! - [`tls`]: clients' `https://` endpoints, CA and client certificates,
//!   token files.
//! - [`validate`]: the rules a run spec must satisfy, with errors that name
//!   the offending key.

pub mod auth;
pub mod batch;
pub mod build_tasks;
pub mod config;
pub mod dataset;
pub mod names;
pub mod tls;
pub mod validate;

/// Generated code for package `twinhead.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("twinhead.v1");

    /// Encoded file descriptors, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("twinhead_v1_descriptor");
}

pub use batch::BatchSchedule;
pub use validate::{SpecError, num_steps, validate_run_spec};

/// An error and its sources on one line, each said once: how every
/// twinhead process reports an error to a person or to the coordinator.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}
