//! Parity with Hugging Face transformers on the committed fixtures
//! (`tests/fixtures/make_fixtures.py` explains how they were made), and
//! export → import round trips.
//!
//! Set `TWINHEAD_HF_EXPORT_DIR=/some/dir` to also keep the exported
//! folders (`encoder/`, `decoder/`) for
//! `make_fixtures.py --check /some/dir/encoder`.

use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use safetensors::SafeTensors;
use twinhead_model::CpuBackend as B;
use twinhead_model::hf::{self, HfError};
use twinhead_model::{Flavour, ModernBert, TokenBatch};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn batch() -> TokenBatch {
    let text = std::fs::read_to_string(fixtures().join("batch.json")).expect("batch.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let rows: Vec<Vec<u32>> = serde_json::from_value(v["input_ids"].clone()).expect("ids");
    let doc_lens: Vec<Vec<usize>> = serde_json::from_value(v["doc_lens"].clone()).expect("lens");
    TokenBatch::new(&rows, Some(doc_lens)).expect("batch")
}

fn reference(flavour: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(fixtures().join("reference.safetensors")).expect("reference");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let view = st.tensor(&format!("{flavour}_logits")).expect("logits");
    let values = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (view.shape().to_vec(), values)
}

fn logits(model: &ModernBert<B>) -> Vec<f32> {
    let out: Tensor<B, 3> = model.forward(&batch()).expect("forward");
    out.into_data().to_vec().expect("f32")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

fn check_parity(flavour: &str, expect: Flavour) {
    let model = hf::load::<B>(&fixtures().join(flavour), &Default::default()).expect("load");
    assert_eq!(model.flavour(), expect);
    let (shape, want) = reference(flavour);
    assert_eq!(shape, vec![2, 32, 128]);
    let got = logits(&model);
    let diff = max_abs_diff(&got, &want);
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    println!("{flavour}: max |logit diff| vs transformers = {diff:.3e} (max |logit| {scale:.1})");
    assert!(diff < 1e-4, "{flavour}: max abs diff {diff}");
}

#[test]
fn encoder_matches_transformers() {
    check_parity("encoder", Flavour::Encoder);
}

#[test]
fn decoder_matches_transformers() {
    check_parity("decoder", Flavour::Decoder);
}

#[test]
fn bf16_checkpoint_loads_to_the_rounded_weights() {
    let d = Default::default();
    let f32_model = hf::load::<B>(&fixtures().join("encoder"), &d).expect("f32");
    let bf16_model = hf::load::<B>(&fixtures().join("encoder-bf16"), &d).expect("bf16");
    let a: Vec<f32> = f32_model
        .tok_embeddings
        .val()
        .into_data()
        .to_vec()
        .expect("f32");
    let b: Vec<f32> = bf16_model
        .tok_embeddings
        .val()
        .into_data()
        .to_vec()
        .expect("f32");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(half::bf16::from_f32(*x).to_f32(), *y);
    }
    // Logits stay close (bf16 has ~3 significant digits).
    let diff = max_abs_diff(&logits(&f32_model), &logits(&bf16_model));
    assert!(diff < 0.5, "bf16 logits drift {diff}");
}

fn export_dir(name: &str) -> PathBuf {
    match std::env::var_os("TWINHEAD_HF_EXPORT_DIR") {
        Some(root) => PathBuf::from(root).join(name),
        None => std::env::temp_dir().join(format!("twinhead-hf-{}-{name}", std::process::id())),
    }
}

#[test]
fn export_reloads_with_identical_logits() {
    for (flavour, model_type) in [("encoder", "modernbert"), ("decoder", "modernbert-decoder")] {
        let d = Default::default();
        let model = hf::load::<B>(&fixtures().join(flavour), &d).expect("load");
        let dir = export_dir(flavour);
        hf::save(&model, &dir).expect("save");
        let again = hf::load::<B>(&dir, &d).expect("reload");
        assert_eq!(max_abs_diff(&logits(&model), &logits(&again)), 0.0);

        let bytes = std::fs::read(dir.join("model.safetensors")).expect("st");
        let (_, meta) = SafeTensors::read_metadata(&bytes).expect("meta");
        let format = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("format").cloned());
        assert_eq!(format.as_deref(), Some("pt"));
        // Same key set as transformers' own save (which omits the tied decoder.weight).
        let ours = SafeTensors::deserialize(&bytes).expect("st");
        let theirs_bytes =
            std::fs::read(fixtures().join(flavour).join("model.safetensors")).expect("st");
        let theirs = SafeTensors::deserialize(&theirs_bytes).expect("st");
        let mut a: Vec<&str> = ours.names();
        let mut b: Vec<&str> = theirs.names();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{flavour}: exported keys differ from transformers'");

        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("cfg"))
                .expect("json");
        assert_eq!(cfg["model_type"], model_type);
        assert_eq!(
            cfg["layer_types"],
            serde_json::json!([
                "full_attention",
                "sliding_attention",
                "sliding_attention",
                "full_attention"
            ])
        );
        if std::env::var_os("TWINHEAD_HF_EXPORT_DIR").is_none() {
            std::fs::remove_dir_all(&dir).ok();
        }
    }
}

/// Copies the encoder fixture to a temp dir, applying `edit` to its tensors
/// (name → (shape, f32 values)) and to its config text.
fn edited_copy(
    tag: &str,
    edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
    edit_config: impl FnOnce(String) -> String,
) -> PathBuf {
    let src = fixtures().join("encoder");
    let dir = std::env::temp_dir().join(format!("twinhead-hf-bad-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = std::fs::read_to_string(src.join("config.json")).expect("cfg");
    std::fs::write(dir.join("config.json"), edit_config(cfg)).expect("write cfg");
    let bytes = std::fs::read(src.join("model.safetensors")).expect("st");
    let st = SafeTensors::deserialize(&bytes).expect("st");
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| {
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (k, v.shape().to_vec(), vals)
        })
        .collect();
    edit(&mut tensors);
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(k, s, v)| (k, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = raw
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .expect("view"),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).expect("write st");
    dir
}

#[test]
fn import_errors_name_the_key() {
    let d = Default::default();
    let missing = edited_copy(
        "missing",
        |t| t.retain(|(k, _, _)| k != "model.layers.2.mlp.Wi.weight"),
        |c| c,
    );
    match hf::load::<B>(&missing, &d) {
        Err(HfError::Missing { key, .. }) => assert_eq!(key, "model.layers.2.mlp.Wi.weight"),
        other => panic!("expected Missing, got {:?}", other.map(|_| ())),
    }
    let unused = edited_copy(
        "unused",
        |t| t.push(("model.layers.9.extra".into(), vec![2], vec![0.0, 1.0])),
        |c| c,
    );
    match hf::load::<B>(&unused, &d) {
        Err(HfError::Unused(keys)) => assert_eq!(keys, vec!["model.layers.9.extra".to_string()]),
        other => panic!("expected Unused, got {:?}", other.map(|_| ())),
    }
    let shape = edited_copy(
        "shape",
        |t| {
            for (k, s, v) in t.iter_mut() {
                if k == "decoder.bias" {
                    *s = vec![127];
                    v.truncate(127);
                }
            }
        },
        |c| c,
    );
    let err = hf::load::<B>(&shape, &d).map(|_| ()).expect_err("shape");
    assert!(err.to_string().contains("decoder.bias"), "{err}");
    let untied = edited_copy(
        "untied",
        |t| {
            let emb = t
                .iter()
                .find(|(k, _, _)| k == "model.embeddings.tok_embeddings.weight")
                .cloned()
                .expect("emb");
            t.push((
                "decoder.weight".into(),
                emb.1,
                emb.2.iter().map(|x| x + 1.0).collect(),
            ));
        },
        |c| c,
    );
    assert!(matches!(hf::load::<B>(&untied, &d), Err(HfError::Untied)));
    let bad_type = edited_copy("type", |_| {}, |c| c.replace("\"modernbert\"", "\"bert\""));
    let err = hf::load::<B>(&bad_type, &d).map(|_| ()).expect_err("type");
    assert!(err.to_string().contains("model_type"), "{err}");
    let bad_layers = edited_copy(
        "layers",
        |_| {},
        |c| c.replacen("\"full_attention\",", "\"sliding_attention\",", 1),
    );
    let err = hf::load::<B>(&bad_layers, &d)
        .map(|_| ())
        .expect_err("layers");
    assert!(err.to_string().contains("layer_types"), "{err}");
    for dir in [missing, unused, shape, untied, bad_type, bad_layers] {
        std::fs::remove_dir_all(dir).ok();
    }
}
