//! `grad_noise`: the gradients of one training step, for comparing with
//! PyTorch in float32 and float64 (`bench/grad_noise.py`).
//!
//! ```text
//! grad_noise --model HF_DIR --out DIR [--rows 4] [--seq 64] [--seed 0]
//! ```
//!
//! Loads a Hugging Face folder (encoder: MLM at 30% masking; decoder: CLM),
//! draws `rows` one-document rows of `seq` tokens (`[CLS]` first) and the
//! masking from `seed`, takes the loss and its gradients on the CPU backend,
//! and writes `DIR/` as a Hugging Face folder whose tensors are the
//! gradients (the weights' names and layouts, so the tied embedding holds
//! the sum of both its uses, as in PyTorch) plus `DIR/batch.json`: the
//! input the model saw, the predicted positions and targets, and the loss.

use std::path::PathBuf;

use anyhow::{Context, bail};
use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use twinhead_model::CpuAutodiff as A;
use twinhead_model::objectives::{self, MaskingConfig, clm_batch, mlm_batch};
use twinhead_model::{Flavour, ModernBert, TokenBatch, hf};

type Inner = twinhead_model::CpuBackend;

fn main() -> anyhow::Result<()> {
    let (mut model_dir, mut out, mut rows, mut seq, mut seed) = (None, None, 4usize, 64usize, 0u64);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        let number = || -> anyhow::Result<u64> {
            value
                .parse()
                .with_context(|| format!("{flag} {value:?}: expected a whole number"))
        };
        match flag.as_str() {
            "--model" => model_dir = Some(PathBuf::from(&value)),
            "--out" => out = Some(PathBuf::from(&value)),
            "--rows" => rows = number()? as usize,
            "--seq" => seq = number()? as usize,
            "--seed" => seed = number()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let model_dir = model_dir.context("--model HF_DIR is required")?;
    let out = out.context("--out DIR is required")?;
    let device = Default::default();
    let model: ModernBert<A> = hf::load(&model_dir, &device)
        .with_context(|| format!("loading {}", model_dir.display()))?;
    let config = model.config().clone();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let first_plain = 5.min(config.vocab_size as u32 - 1);
    let token_rows: Vec<Vec<u32>> = (0..rows)
        .map(|_| {
            std::iter::once(config.cls_token_id)
                .chain((1..seq).map(|_| rng.random_range(first_plain..config.vocab_size as u32)))
                .collect()
        })
        .collect();
    let tokens = TokenBatch::new(&token_rows, None)?;
    let prediction = match model.flavour() {
        Flavour::Encoder => mlm_batch(&tokens, &MaskingConfig::from_model(&config, 0.3), &mut rng)?,
        Flavour::Decoder => clm_batch(&tokens)?,
    };
    let loss = objectives::loss(&model, &prediction)?;
    let loss_value = loss.clone().into_scalar();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let gradients = model.valid().map(&mut IntoGradient { grads });
    hf::save(&gradients, &out).with_context(|| format!("writing {}", out.display()))?;
    let input_ids: Vec<Vec<u32>> = prediction
        .input
        .input_ids
        .chunks(seq)
        .map(<[u32]>::to_vec)
        .collect();
    let batch = serde_json::json!({
        "input_ids": input_ids,
        "original_ids": token_rows,
        "positions": prediction.positions,
        "targets": prediction.targets,
        "loss": loss_value,
    });
    std::fs::write(out.join("batch.json"), serde_json::to_vec(&batch)?)?;
    println!(
        "{}",
        serde_json::json!({"loss": loss_value, "out": out.display().to_string()})
    );
    Ok(())
}

/// Replaces every weight by its gradient.
struct IntoGradient {
    grads: GradientsParams,
}

impl ModuleMapper<Inner> for IntoGradient {
    fn map_float<const D: usize>(
        &mut self,
        param: Param<Tensor<Inner, D>>,
    ) -> Param<Tensor<Inner, D>> {
        let (id, tensor, mapper) = param.consume();
        let grad = self
            .grads
            .remove::<Inner, D>(id)
            .unwrap_or_else(|| tensor.zeros_like());
        Param::from_mapped_value(id, grad, mapper)
    }
}
