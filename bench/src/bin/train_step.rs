//! `train_step`: tokens/s of one MLM training step (forward, backward,
//! AdamW) of twinhead's Burn ModernBERT on the CPU backend, to compare with
//! `bench/train_step.py` (PyTorch + transformers, same shape and batch).
//!
//! Shape: hidden 256, 4 layers, 4 heads, intermediate 384, vocab 8192,
//! local_attention 128, batch 8 × 512, mask ratio 0.3.
//!
//! Usage: `cargo run -p twinhead-bench --bin train_step [-- STEPS]`
//! (dependencies are built at opt-level 3 even in the dev profile).

use std::time::Instant;

use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use twinhead_model::CpuAutodiff as B;
use twinhead_model::objectives::{MaskingConfig, loss, mlm_batch};
use twinhead_model::{Flavour, ModelConfig, ModernBert, TokenBatch};

const BATCH: usize = 8;
const SEQ: usize = 512;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    twinhead_worker::host_memory::keep_freed_memory();
    let steps: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(5);
    let mut raw = ModelConfig::builtin("ettin-17m")?.spec();
    raw.name = "bench".into();
    raw.vocab_size = 8192;
    raw.hidden_size = 256;
    raw.num_layers = 4;
    raw.num_heads = 4;
    raw.intermediate_size = 384;
    raw.pad_token_id = 3;
    raw.cls_token_id = 1;
    raw.sep_token_id = 2;
    raw.mask_token_id = 4;
    let config = ModelConfig::from_spec(&raw)?;
    let device = Default::default();
    let mut model = ModernBert::<B>::new(&config, Flavour::Encoder, 0, &device);
    let mut optim = AdamWConfig::new().with_weight_decay(0.01).init();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let masking = MaskingConfig::from_model(&config, 0.3);
    let rows: Vec<Vec<u32>> = (0..BATCH)
        .map(|_| (0..SEQ).map(|_| rng.random_range(5..8192)).collect())
        .collect();
    let batch = TokenBatch::new(&rows, None)?;
    let warmup = 2;
    let mut start = Instant::now();
    for step in 0..warmup + steps {
        if step == warmup {
            start = Instant::now();
        }
        let t0 = Instant::now();
        let pred = mlm_batch(&batch, &masking, &mut rng)?;
        let l = loss(&model, &pred)?;
        let value: f32 = l.clone().into_scalar();
        let t1 = Instant::now();
        let grads = GradientsParams::from_grads(l.backward(), &model);
        let t2 = Instant::now();
        model = optim.step(1e-3, model, grads);
        let t3 = Instant::now();
        eprintln!(
            "step {step}: loss {value:.4} (forward {:.2} s, backward {:.2} s, optimizer {:.2} s)",
            (t1 - t0).as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            (t3 - t2).as_secs_f64()
        );
    }
    let secs = start.elapsed().as_secs_f64();
    let tokens = (steps * BATCH * SEQ) as f64;
    println!(
        "burn ndarray: {steps} steps of {BATCH}x{SEQ} in {secs:.1} s = {:.0} tokens/s ({} threads available)",
        tokens / secs,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    Ok(())
}
