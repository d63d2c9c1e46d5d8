//! Inference helpers behind `twinhead fill-mask` and `twinhead generate`.
//!
//! - [`fill_mask`]: an encoder's top-k tokens (with probabilities) at
//!   every `[MASK]` of one sequence.
//! - [`generate`]: a decoder continues a prompt with a KV cache; greedy at
//!   temperature 0, otherwise seeded sampling (optionally top-k).
//!
//! Token ids in, token ids out: tokenizing is the caller's business.

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use std::sync::Arc;

use crate::packing::rope_tables;
use crate::{
    AttentionKind, AttentionPlan, Flavour, ModelBackend, ModelError, ModernBert, TokenBatch,
};

/// Errors from the inference helpers.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    /// The model refused the input.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The helper needs the other flavour.
    #[error("{helper} needs a {needed:?} model, this one is a {actual:?}")]
    WrongFlavour {
        /// `fill-mask` or `generate`.
        helper: &'static str,
        /// What it needs.
        needed: Flavour,
        /// What it got.
        actual: Flavour,
    },
    /// The input has no `[MASK]` token.
    #[error("the input has no [MASK] token (id {0})")]
    NoMask(u32),
    /// The prompt is empty.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A sampling setting is unusable.
    #[error("invalid sampling setting: {0}")]
    Sampling(String),
}

/// The candidates at one `[MASK]` position.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskPrediction {
    /// Index of the `[MASK]` in the input.
    pub position: usize,
    /// `(token id, probability)`, most likely first.
    pub candidates: Vec<(u32, f32)>,
}

/// The `top_k` most likely tokens at every `[MASK]` of `ids`.
pub fn fill_mask<B: ModelBackend>(
    model: &ModernBert<B>,
    ids: &[u32],
    top_k: usize,
) -> Result<Vec<MaskPrediction>, InferError> {
    if model.flavour() != Flavour::Encoder {
        return Err(InferError::WrongFlavour {
            helper: "fill-mask",
            needed: Flavour::Encoder,
            actual: model.flavour(),
        });
    }
    let mask_id = model.config().mask_token_id;
    let positions: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|(_, id)| **id == mask_id)
        .map(|(i, _)| i)
        .collect();
    if positions.is_empty() {
        return Err(InferError::NoMask(mask_id));
    }
    let batch = TokenBatch::new(&[ids.to_vec()], None)?;
    let hidden = model.hidden_states(&batch, AttentionKind::Bidirectional)?;
    let [_, s, h] = hidden.dims();
    let device = hidden.device();
    let index: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
    let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [positions.len()]), &device);
    let picked = hidden.reshape([s, h]).select(0, index);
    let probs = softmax(model.head(picked), 1);
    let v = model.config().vocab_size;
    let probs: Vec<f32> = probs
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap_or_default();
    Ok(positions
        .iter()
        .enumerate()
        .map(|(n, &position)| MaskPrediction {
            position,
            candidates: top_k_of(&probs[n * v..(n + 1) * v], top_k),
        })
        .collect())
}

fn top_k_of(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut order: Vec<(u32, f32)> = values
        .iter()
        .enumerate()
        .map(|(i, &p)| (i as u32, p))
        .collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    order.truncate(k);
    order
}

/// Sampling settings for [`generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// Tokens to add at most.
    pub max_new_tokens: usize,
    /// 0 = greedy (argmax); otherwise logits are divided by it.
    pub temperature: f32,
    /// Sample only among the `k` most likely tokens.
    pub top_k: Option<usize>,
    /// Seed of the sampling RNG.
    pub seed: u64,
    /// Stop after emitting this token (e.g. `[SEP]`).
    pub stop_token: Option<u32>,
}

/// Per-layer keys and values seen so far: `[t, heads, head_dim]`.
struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 3>, Tensor<B, 3>)>>,
    len: usize,
}

/// Runs `tokens` (the next tokens after `cache.len`) through the decoder,
/// extends the cache and returns the logits of the last one.
///
/// # Shapes
/// - returns `[vocab]`
fn decode_step<B: ModelBackend>(
    model: &ModernBert<B>,
    tokens: &[u32],
    cache: &mut KvCache<B>,
) -> Result<Vec<f32>, InferError> {
    let config = model.config();
    let device = model.tok_embeddings.device();
    let batch = TokenBatch::new(&[tokens.to_vec()], None)?;
    let ids = batch.ids_tensor::<B>(config.vocab_size, &device)?;
    let (n, start, hd) = (tokens.len(), cache.len, config.head_dim());
    let total = start + n;
    let positions: Vec<u32> = (start..total).map(|p| p as u32).collect();
    let rope = |theta: f64| {
        let (cos, sin) = rope_tables(&positions, hd, theta);
        (
            Tensor::<B, 3>::from_data(TensorData::new(cos, [n, 1, hd]), &device),
            Tensor::<B, 3>::from_data(TensorData::new(sin, [n, 1, hd]), &device),
        )
    };
    let global_rope = rope(config.global_rope_theta);
    let local_rope = rope(config.local_rope_theta);
    let plan =
        |window: Option<usize>| Arc::new(AttentionPlan::decode(start, n, window, config.num_heads));
    let global_plan = plan(None);
    let local_plan = plan(Some(config.half_window()));

    let mut x = model.embed(ids);
    for (layer, slot) in model.layers.iter().zip(cache.layers.iter_mut()) {
        let global = layer.attn.is_global();
        let (cos, sin) = if global { &global_rope } else { &local_rope };
        let (q, k, v) = layer.attn.qkv(layer.pre_attn(x.clone()), (cos, sin));
        let (k, v) = match slot.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 0), Tensor::cat(vec![pv, v], 0)),
            None => (k, v),
        };
        *slot = Some((k.clone(), v.clone()));
        let plan = if global { &global_plan } else { &local_plan };
        x = x + layer.attn.attend(plan, q, k, v, 1);
        x = x.clone() + layer.mlp.forward(layer.mlp_norm.forward(x));
    }
    cache.len = total;
    let h = config.hidden_size;
    let last = model
        .final_norm
        .forward(x)
        .narrow(1, n - 1, 1)
        .reshape([1, h]);
    let logits = model.head(last);
    Ok(logits
        .into_data()
        .convert::<f32>()
        .to_vec()
        .unwrap_or_default())
}

fn pick(logits: &[f32], cfg: &GenerateConfig, rng: &mut ChaCha8Rng) -> u32 {
    if cfg.temperature == 0.0 {
        return top_k_of(logits, 1).first().map_or(0, |c| c.0);
    }
    let k = cfg.top_k.unwrap_or(logits.len()).max(1);
    let candidates = top_k_of(logits, k);
    let max = candidates[0].1;
    let weights: Vec<f64> = candidates
        .iter()
        .map(|(_, l)| (((l - max) / cfg.temperature) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut r = rng.random::<f64>() * total;
    for ((id, _), w) in candidates.iter().zip(&weights) {
        if r < *w {
            return *id;
        }
        r -= w;
    }
    candidates[candidates.len() - 1].0
}

/// Continues `prompt` with a decoder; returns only the new tokens.
pub fn generate<B: ModelBackend>(
    model: &ModernBert<B>,
    prompt: &[u32],
    cfg: &GenerateConfig,
) -> Result<Vec<u32>, InferError> {
    if model.flavour() != Flavour::Decoder {
        return Err(InferError::WrongFlavour {
            helper: "generate",
            needed: Flavour::Decoder,
            actual: model.flavour(),
        });
    }
    if prompt.is_empty() {
        return Err(InferError::EmptyPrompt);
    }
    if !(cfg.temperature.is_finite() && cfg.temperature >= 0.0) {
        return Err(InferError::Sampling(format!(
            "temperature {} must be >= 0",
            cfg.temperature
        )));
    }
    if cfg.top_k == Some(0) {
        return Err(InferError::Sampling("top_k must be at least 1".into()));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut cache = KvCache {
        layers: vec![None; model.layers.len()],
        len: 0,
    };
    let mut out = Vec::with_capacity(cfg.max_new_tokens);
    let mut logits = decode_step(model, prompt, &mut cache)?;
    for _ in 0..cfg.max_new_tokens {
        let next = pick(&logits, cfg, &mut rng);
        out.push(next);
        if Some(next) == cfg.stop_token || out.len() == cfg.max_new_tokens {
            break;
        }
        logits = decode_step(model, &[next], &mut cache)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend as B;
    use crate::ModelConfig;

    fn tiny() -> ModelConfig {
        ModelConfig::builtin("tiny").expect("tiny")
    }

    /// Greedy decoding with the KV cache picks the same tokens as
    /// re-running the whole sequence each step, also past the window.
    #[test]
    fn kv_cache_matches_full_recompute() {
        let c = tiny();
        let m = ModernBert::<B>::new(&c, Flavour::Decoder, 11, &Default::default());
        let prompt: Vec<u32> = vec![1, 50, 900, 33, 7];
        let cfg = GenerateConfig {
            max_new_tokens: 20,
            temperature: 0.0,
            top_k: None,
            seed: 0,
            stop_token: None,
        };
        let fast = generate(&m, &prompt, &cfg).expect("generate");
        assert_eq!(fast.len(), 20);
        let mut seq = prompt.clone();
        for &tok in &fast {
            let logits = m
                .forward(&TokenBatch::new(&[seq.clone()], None).expect("b"))
                .expect("fwd");
            let s = seq.len();
            let last: Vec<f32> = logits
                .narrow(1, s - 1, 1)
                .into_data()
                .to_vec()
                .expect("f32");
            assert_eq!(top_k_of(&last, 1)[0].0, tok, "step at length {s}");
            seq.push(tok);
        }
        assert!(seq.len() > c.half_window() * 2);
    }

    #[test]
    fn sampling_is_seeded() {
        let c = tiny();
        let m = ModernBert::<B>::new(&c, Flavour::Decoder, 12, &Default::default());
        let cfg = GenerateConfig {
            max_new_tokens: 8,
            temperature: 1.0,
            top_k: Some(50),
            seed: 3,
            stop_token: None,
        };
        let a = generate(&m, &[1, 2, 3], &cfg).expect("a");
        let b = generate(&m, &[1, 2, 3], &cfg).expect("b");
        assert_eq!(a, b);
        let other = generate(&m, &[1, 2, 3], &GenerateConfig { seed: 4, ..cfg }).expect("c");
        assert_ne!(a, other);
    }

    #[test]
    fn fill_mask_returns_sorted_probabilities_at_each_mask() {
        let c = tiny();
        let m = ModernBert::<B>::new(&c, Flavour::Encoder, 13, &Default::default());
        let ids = vec![1, 100, c.mask_token_id, 200, c.mask_token_id, 2];
        let preds = fill_mask(&m, &ids, 5).expect("fill");
        assert_eq!(
            preds.iter().map(|p| p.position).collect::<Vec<_>>(),
            vec![2, 4]
        );
        for p in &preds {
            assert_eq!(p.candidates.len(), 5);
            assert!(p.candidates.windows(2).all(|w| w[0].1 >= w[1].1));
            assert!(p.candidates.iter().all(|c| c.1 > 0.0 && c.1 < 1.0));
        }
        assert!(matches!(
            fill_mask(&m, &[1, 2], 5),
            Err(InferError::NoMask(_))
        ));
        let dec = m.with_flavour(Flavour::Decoder);
        assert!(matches!(
            fill_mask(&dec, &ids, 5),
            Err(InferError::WrongFlavour { .. })
        ));
    }
}
