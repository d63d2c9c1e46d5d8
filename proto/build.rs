//! Generates the twinhead.v1 messages and services. protoc comes from the
//! protoc-bin-vendored crate, so building needs no system protoc.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let protos = [
        "twinhead/v1/spec.proto",
        "twinhead/v1/run.proto",
        "twinhead/v1/worker.proto",
        "twinhead/v1/dataset.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("twinhead_v1_descriptor.bin"))
        .compile_with_config(config, &protos, &["."])?;
    Ok(())
}
