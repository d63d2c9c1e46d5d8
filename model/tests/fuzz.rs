//! Fuzzed Hugging Face folders (issue 15), through the loaders `twinhead
//! import` runs: `config.json` with mutated keys, values and bytes, and
//! `model.safetensors` with a mutated header (dtypes, shapes, offsets,
//! names) or mutated bytes. No input may panic, allocate for a model the
//! file does not hold, or take long, and every rejection names the file and
//! the key or tensor at fault.
//!
//! Short pass: `cargo test -p twinhead-model --test fuzz`. Bench mode:
//! `TWINHEAD_FUZZ_CASES=1000000 cargo test --release -p twinhead-model
//! --test fuzz -- --ignored fuzz_`.

#[allow(dead_code)]
#[path = "../../proto/tests/support/json_doc.rs"]
mod json_doc;
#[allow(dead_code)]
#[path = "../../proto/tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use proptest::prelude::*;
use support::text::{self, Mutation};
use support::{Edit, edits, names_one_of};
use twinhead_model::hf::{self, HfError};
use twinhead_model::{CpuBackend, Flavour};

const SHORT: u32 = 600;
const LIMIT: Duration = Duration::from_secs(10);

fn fixture(flavour: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(flavour)
}

/// A scratch folder, in memory where the machine has `/dev/shm`.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("twinhead-fuzz-")
            .tempdir_in(shm)
            .expect("scratch dir")
    } else {
        tempfile::tempdir().expect("scratch dir")
    }
}

#[derive(Debug, Clone)]
struct Mangled {
    flavour: usize,
    edits: Vec<(usize, Edit)>,
    bytes: Vec<Mutation>,
}

fn mangled() -> impl Strategy<Value = Mangled> {
    (
        0..2usize,
        edits(3),
        prop_oneof![
            4 => Just(Vec::new()),
            1 => text::mutations(3),
        ],
    )
        .prop_map(|(flavour, edits, bytes)| Mangled {
            flavour,
            edits,
            bytes,
        })
}

const FLAVOURS: [&str; 2] = ["encoder", "decoder"];

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

/// Key names an error about `config.json` may give.
fn config_names(configs: &[serde_json::Value]) -> Vec<String> {
    let mut names: Vec<String> = configs
        .iter()
        .flat_map(|c| json_doc::paths(c, 8))
        .filter_map(|p| match p.last() {
            Some(json_doc::Seg::Key(k)) => Some(k.clone()),
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    names.extend(["line".to_string(), "column".to_string()]);
    names
}

fn hf_config(short: u32) {
    let configs: Vec<serde_json::Value> = FLAVOURS
        .iter()
        .map(|f| {
            serde_json::from_slice(&read(&fixture(f).join("config.json"))).expect("fixture JSON")
        })
        .collect();
    let names = config_names(&configs);
    let dir = scratch();
    let dirs: Vec<PathBuf> = FLAVOURS
        .iter()
        .map(|f| {
            let d = dir.path().join(f);
            std::fs::create_dir_all(&d).expect("model dir");
            std::fs::copy(
                fixture(f).join("model.safetensors"),
                d.join("model.safetensors"),
            )
            .expect("copy the tensors");
            d
        })
        .collect();
    let device = Default::default();
    support::run("hf_config", short, LIMIT, mangled(), |m| {
        let model_dir = &dirs[m.flavour];
        let path = model_dir.join("config.json");
        let location = path.display().to_string();
        let mut value = configs[m.flavour].clone();
        let mut touched = Vec::new();
        for (pick, edit) in &m.edits {
            if let Some(p) = json_doc::apply(&mut value, 8, *pick, edit)
                && let Some(json_doc::Seg::Key(k)) = p.last()
            {
                touched.push(k.clone());
            }
        }
        let bytes = text::mutated(&serde_json::to_vec(&value).unwrap_or_default(), &m.bytes);
        std::fs::write(&path, bytes).expect("write config.json");
        // `twinhead import`: the config, then the tensors it asks for.
        if let Err(e) = hf::read_config(model_dir) {
            let message = e.to_string();
            let all: Vec<&str> = names
                .iter()
                .chain(&touched)
                .map(String::as_str)
                .chain(["stream did not contain valid UTF-8"])
                .collect();
            return names_one_of(&message, &location, &all);
        }
        match hf::load::<CpuBackend>(model_dir, &device) {
            Ok(_) => Ok(()),
            Err(e) => check_import_error(
                &e,
                &model_dir.join("model.safetensors").display().to_string(),
            ),
        }
    });
}

/// A safetensors file: its JSON header and the data after it.
fn split_safetensors(bytes: &[u8]) -> (serde_json::Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).expect("header JSON");
    (header, bytes[8 + n..].to_vec())
}

fn join_safetensors(header: &serde_json::Value, data: &[u8], length_fix: Option<i64>) -> Vec<u8> {
    let json = serde_json::to_vec(header).unwrap_or_default();
    let n = (json.len() as i64).wrapping_add(length_fix.unwrap_or(0)) as u64;
    let mut out = n.to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(data);
    out
}

#[derive(Debug, Clone)]
struct MangledTensors {
    flavour: usize,
    /// Edits to the JSON header, at keys of up to the first entries.
    header: Vec<(usize, Edit)>,
    /// A wrong header length.
    length_fix: Option<i64>,
    bytes: Vec<Mutation>,
}

fn mangled_tensors() -> impl Strategy<Value = MangledTensors> {
    (
        0..2usize,
        prop_oneof![
            1 => Just(Vec::new()),
            3 => edits(3),
        ],
        prop_oneof![
            6 => Just(None),
            1 => support::edge_int().prop_map(Some),
        ],
        prop_oneof![
            2 => Just(Vec::new()),
            1 => text::mutations(4),
        ],
    )
        .prop_map(|(flavour, header, length_fix, bytes)| MangledTensors {
            flavour,
            header,
            length_fix,
            bytes,
        })
}

/// The words an import error must contain: the tensor's key, the file, the
/// key of config.json, or a property of a tensor.
fn check_import_error(e: &HfError, st_path: &str) -> Result<(), TestCaseError> {
    let message = e.to_string();
    match e {
        HfError::Safetensors { .. } | HfError::Io { .. } => names_one_of(&message, st_path, &[]),
        HfError::Missing { key, .. } | HfError::Shape { key, .. } | HfError::DType { key, .. } => {
            prop_assert!(
                !key.is_empty() && message.contains(key.as_str()),
                "{message}"
            );
            Ok(())
        }
        HfError::Unused(keys) => {
            prop_assert!(!keys.is_empty(), "{message}");
            Ok(())
        }
        HfError::Untied => Ok(()),
        other => Err(TestCaseError::fail(format!(
            "config.json was read once already, yet: {other}"
        ))),
    }
}

use proptest::test_runner::TestCaseError;

fn safetensors(short: u32) {
    let originals: Vec<(Vec<u8>, serde_json::Value, Vec<u8>)> = FLAVOURS
        .iter()
        .map(|f| {
            let bytes = read(&fixture(f).join("model.safetensors"));
            let (header, data) = split_safetensors(&bytes);
            (bytes, header, data)
        })
        .collect();
    let dir = scratch();
    let dirs: Vec<PathBuf> = FLAVOURS
        .iter()
        .map(|f| {
            let d = dir.path().join(f);
            std::fs::create_dir_all(&d).expect("dir");
            std::fs::copy(fixture(f).join("config.json"), d.join("config.json")).expect("config");
            d
        })
        .collect();
    let device = Default::default();
    for d in &dirs {
        std::fs::copy(
            fixture(d.file_name().and_then(|n| n.to_str()).unwrap_or_default())
                .join("model.safetensors"),
            d.join("model.safetensors"),
        )
        .expect("copy");
        hf::load::<CpuBackend>(d, &device).expect("the fixture loads");
    }
    support::run("safetensors", short, LIMIT, mangled_tensors(), |m| {
        let (original, header, data) = &originals[m.flavour];
        let bytes = if m.header.is_empty() && m.length_fix.is_none() {
            original.clone()
        } else {
            let mut header = header.clone();
            for (pick, edit) in &m.header {
                json_doc::apply(&mut header, 4, *pick, edit);
            }
            join_safetensors(&header, data, m.length_fix)
        };
        let bytes = text::mutated(&bytes, &m.bytes);
        let model_dir = &dirs[m.flavour];
        let st_path = model_dir.join("model.safetensors");
        std::fs::write(&st_path, &bytes).expect("write safetensors");
        match hf::load::<CpuBackend>(model_dir, &device) {
            Ok(model) => {
                let flavour = if m.flavour == 0 {
                    Flavour::Encoder
                } else {
                    Flavour::Decoder
                };
                prop_assert_eq!(model.flavour(), flavour);
                Ok(())
            }
            Err(e) => check_import_error(&e, &st_path.display().to_string()),
        }
    });
}

// Findings kept as regression tests.

/// The encoder fixture with `edit` applied to its config.json.
fn edited_encoder(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir).expect("dir");
    let mut config: serde_json::Value =
        serde_json::from_slice(&read(&fixture("encoder").join("config.json"))).expect("json");
    edit(&mut config);
    std::fs::write(
        model_dir.join("config.json"),
        serde_json::to_vec(&config).expect("json"),
    )
    .expect("write");
    std::fs::copy(
        fixture("encoder").join("model.safetensors"),
        model_dir.join("model.safetensors"),
    )
    .expect("copy");
    model_dir
}

fn import_error(model_dir: &Path) -> String {
    hf::read_config(model_dir)
        .and_then(|_| hf::load::<CpuBackend>(model_dir, &Default::default()).map(drop))
        .expect_err("refused")
        .to_string()
}

/// `num_hidden_layers = 4294967295` with `layer_types` used to build the
/// expected list whole: a 64 GiB allocation that aborted the process.
#[test]
fn a_huge_layer_count_is_refused_without_allocating() {
    let dir = scratch();
    let model_dir = edited_encoder(dir.path(), |c| c["num_hidden_layers"] = u32::MAX.into());
    let err = import_error(&model_dir);
    assert!(
        err.contains("layer_types") && err.contains("num_hidden_layers is 4294967295"),
        "{err}"
    );
}

/// A config far larger than its tensors used to allocate the whole model
/// before finding the first tensor of the wrong shape.
#[test]
fn a_config_larger_than_its_tensors_fails_before_allocating() {
    let dir = scratch();
    let model_dir = edited_encoder(dir.path(), |c| {
        c["vocab_size"] = (1u64 << 31).into();
        c.as_object_mut().map(|m| m.remove("layer_types"));
    });
    let err = import_error(&model_dir);
    assert!(
        err.contains("model.embeddings.tok_embeddings.weight") && err.contains("2147483648"),
        "{err}"
    );
    let model_dir = edited_encoder(dir.path(), |c| {
        c["num_hidden_layers"] = 4_000_000.into();
        c.as_object_mut().map(|m| m.remove("layer_types"));
    });
    let err = import_error(&model_dir);
    assert!(err.contains("missing tensor `model.layers.4."), "{err}");
}

/// `pad_token_id = 4294967295` without `mask_token_id` overflowed
/// (`pad_token_id + 1`): a panic in debug builds.
#[test]
fn the_largest_pad_token_id_is_refused_by_name() {
    let dir = scratch();
    let model_dir = edited_encoder(dir.path(), |c| {
        c["pad_token_id"] = u32::MAX.into();
        c.as_object_mut().map(|m| m.remove("mask_token_id"));
    });
    let err = import_error(&model_dir);
    assert!(err.contains("key `pad_token_id`"), "{err}");
}

/// Validation named the internal key (`num_heads`), which config.json
/// does not have; it names `num_attention_heads` now.
#[test]
fn errors_name_the_key_as_config_json_spells_it() {
    let dir = scratch();
    let model_dir = edited_encoder(dir.path(), |c| c["num_attention_heads"] = 3.into());
    let err = import_error(&model_dir);
    assert!(err.contains("key `num_attention_heads`"), "{err}");
    let model_dir = edited_encoder(dir.path(), |c| c["num_hidden_layers"] = 0.into());
    let err = import_error(&model_dir);
    assert!(err.contains("key `num_hidden_layers`"), "{err}");
}

#[test]
fn hf_config_short() {
    hf_config(SHORT);
}

#[test]
fn safetensors_short() {
    safetensors(SHORT / 2);
}

#[test]
#[ignore = "bench mode: TWINHEAD_FUZZ_CASES cases, release build"]
fn fuzz_hf_config() {
    hf_config(SHORT);
}

#[test]
#[ignore = "bench mode: TWINHEAD_FUZZ_CASES cases, release build"]
fn fuzz_safetensors() {
    safetensors(SHORT / 2);
}
