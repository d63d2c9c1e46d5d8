//! A training step at the recipe's long context (8,192 tokens) on the tiny
//! model, for an encoder and a decoder, within a memory bound that the old
//! masked attention could not meet.
//!
//! Peak memory is measured in this process: the kernel's high-water mark
//! (`VmHWM`) is reset through `/proc/self/clear_refs` before each step and
//! read after it. This file holds one test so that nothing else runs in the
//! process meanwhile.

use burn::tensor::backend::Backend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use twinhead_model::CpuAutodiff as A;
use twinhead_model::objectives::{self, MaskingConfig, clm_batch, mlm_batch};
use twinhead_model::{Flavour, ModelConfig, ModernBert, TokenBatch};

const SEQ: usize = 8192;
const MIB: u64 = 1 << 20;

/// Resets the high-water mark of this process's resident memory.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// `(VmHWM, VmRSS)` in bytes.
fn memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

#[test]
fn an_encoder_and_a_decoder_step_at_8k_tokens_stay_under_the_bound() {
    if !reset_peak() || memory().is_none() {
        eprintln!("skipped: /proc/self/clear_refs or /proc/self/status is not available here");
        return;
    }
    let mut spec = ModelConfig::builtin("tiny").expect("tiny").spec();
    spec.max_position_embeddings = SEQ as u32;
    let config = ModelConfig::from_spec(&spec).expect("config");
    let heads = config.num_heads as u64;
    let s = SEQ as u64;
    // The old path held two [seq, seq] f32 masks for every forward and, per
    // layer, the [heads, seq, seq] scores and probabilities.
    let old_path = 2 * s * s * 4 + 2 * heads * s * s * 4;
    let bound = 1024 * MIB;
    assert!(
        old_path > bound,
        "the bound must be one the old path could not meet"
    );

    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // Two documents of unequal length in the one row.
    let row: Vec<u32> = (0..SEQ)
        .map(|_| rng.random_range(5..config.vocab_size as u32))
        .collect();
    let batch = TokenBatch::new(&[row], Some(vec![vec![5000, SEQ - 5000]])).expect("batch");
    let masking = MaskingConfig::from_model(&config, 0.3);
    for flavour in [Flavour::Encoder, Flavour::Decoder] {
        let model = ModernBert::<A>::new(&config, flavour, 1, &Default::default());
        let prediction = match flavour {
            Flavour::Encoder => mlm_batch(&batch, &masking, &mut rng).expect("mlm"),
            Flavour::Decoder => clm_batch(&batch).expect("clm"),
        };
        let (_, before) = memory().expect("status");
        assert!(reset_peak());
        let loss = objectives::loss(&model, &prediction).expect("loss");
        let value: f32 = loss.clone().into_scalar();
        let grads = loss.backward();
        let embedding_grad = model
            .tok_embeddings
            .grad(&grads)
            .expect("embedding gradient");
        let norm: f32 = embedding_grad.powi_scalar(2).sum().into_scalar();
        A::sync(&Default::default()).expect("sync");
        let (peak, _) = memory().expect("status");
        let grown = peak.saturating_sub(before);
        eprintln!(
            "{flavour:?}: loss {value:.3}, peak {} MiB above the {} MiB before the step (old path: {} MiB)",
            grown / MIB,
            before / MIB,
            old_path / MIB
        );
        assert!(
            value.is_finite() && norm.is_finite() && norm > 0.0,
            "{flavour:?}"
        );
        assert!(
            grown < bound,
            "{flavour:?}: the step grew memory by {} MiB, bound {} MiB",
            grown / MIB,
            bound / MIB
        );
    }
}
