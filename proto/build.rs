//! Generates the twinhead.v1 messages and services. protoc comes from the
//! protoc-bin-vendored crate, so building needs no system protoc.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // A model's shape is one type everywhere: the same ModelSpec is read from
    // `configs/models/*.toml`, written next to checkpoints as JSON and sent
    // in run specs, so it (de)serializes with serde under its own field names.
    config.type_attribute(
        ".twinhead.v1.ModelSpec",
        "#[derive(serde::Serialize, serde::Deserialize)] #[serde(deny_unknown_fields)]",
    );
    for field in ["attention_dropout", "embedding_dropout", "mlp_dropout"] {
        config.field_attribute(
            format!(".twinhead.v1.ModelSpec.{field}"),
            "#[serde(default)]",
        );
    }
    config.field_attribute(
        ".twinhead.v1.ModelSpec.unk_token_id",
        "#[serde(default, skip_serializing_if = \"Option::is_none\")]",
    );
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
