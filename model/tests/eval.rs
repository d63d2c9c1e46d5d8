//! Request scoring on the committed fixtures: a decoder's log-likelihoods
//! against transformers' logits for the same tokens, and packed scoring
//! equal to scoring each request alone, for both flavours.

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use twinhead_model::CpuBackend as B;
use twinhead_model::eval::{TokenizedRequest, loglikelihoods};
use twinhead_model::hf;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Row 0 of the fixture batch: one document of 32 tokens, `[CLS]` first.
fn row0() -> Vec<u32> {
    let text = std::fs::read_to_string(fixtures().join("batch.json")).expect("batch.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let rows: Vec<Vec<u32>> = serde_json::from_value(v["input_ids"].clone()).expect("ids");
    rows[0].clone()
}

/// transformers' decoder logits for row 0, `[32][128]`.
fn reference_row0() -> Vec<Vec<f64>> {
    let bytes = std::fs::read(fixtures().join("reference.safetensors")).expect("reference");
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    let view = st.tensor("decoder_logits").expect("logits");
    let values: Vec<f64> = view
        .data()
        .chunks_exact(4)
        .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
        .collect();
    values.chunks(128).take(32).map(<[f64]>::to_vec).collect()
}

fn log_softmax_at(logits: &[f64], token: u32) -> f64 {
    let max = logits.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x));
    let lse = max + logits.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
    logits[token as usize] - lse
}

fn requests(row: &[u32]) -> Vec<TokenizedRequest> {
    [(1, 20), (1, 5), (3, 31), (10, 11)]
        .iter()
        .map(|&(from, split)| TokenizedRequest {
            context: row[from..split].to_vec(),
            continuation: row[split..].to_vec(),
        })
        .collect()
}

#[test]
fn decoder_loglikelihoods_equal_transformers_logits() {
    let model = hf::load::<B>(&fixtures().join("decoder"), &Default::default()).expect("load");
    let row = row0();
    let reference = reference_row0();
    // The request whose context starts right after [CLS] sees exactly the
    // fixture's row, so transformers' logits score it.
    let req = &requests(&row)[0];
    let want: f64 = (20..32)
        .map(|t| log_softmax_at(&reference[t - 1], row[t]))
        .sum();
    let got = loglikelihoods(&model, std::slice::from_ref(req), 4096).expect("score")[0];
    assert!(
        (got - want).abs() < 1e-3,
        "twinhead {got} vs transformers {want}"
    );
}

#[test]
fn packed_requests_score_as_each_alone_for_both_flavours() {
    let row = row0();
    for flavour in ["decoder", "encoder"] {
        let model = hf::load::<B>(&fixtures().join(flavour), &Default::default()).expect("load");
        let reqs = requests(&row);
        let packed = loglikelihoods(&model, &reqs, 4096).expect("packed");
        let alone = loglikelihoods(&model, &reqs, 1).expect("alone");
        for (i, (p, a)) in packed.iter().zip(&alone).enumerate() {
            assert!(p.is_finite() && *p < 0.0, "{flavour} request {i}: {p}");
            assert!(
                (p - a).abs() < 1e-4,
                "{flavour} request {i}: packed {p} alone {a}"
            );
        }
        // A longer continuation of the same text is less likely.
        assert!(packed[1] < packed[0], "{flavour}: {packed:?}");
    }
}
