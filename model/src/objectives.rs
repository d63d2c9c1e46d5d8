//! Training objectives: which positions are predicted, from which output,
//! and the loss.
//!
//! - **MLM** (encoders): select each non-special token with probability
//!   `mask_ratio`; of the selected, 80% become `[MASK]`, 10% a random
//!   non-special token, 10% stay. Bidirectional attention; the loss is the
//!   mean cross-entropy over the selected positions only.
//! - **CLM** (decoders): position `i` predicts token `i + 1` when both are
//!   in the same document, so a document's last token never predicts the
//!   next document's first. Causal attention.
//! - **MNTP** (decoder → encoder, LLM2Vec): masked like MLM, bidirectional
//!   attention, and masked token `i` is predicted from the output at
//!   `i − 1`. A document's first token has no `i − 1` in its document and
//!   is never selected.
//!
//! Burn's `CrossEntropyLoss` has no ignore index, so every objective
//! gathers the predicting positions first and runs the head only there
//! (sparse prediction, as ModernBERT does), which is also cheaper.
//!
//! Randomness comes from a caller-seeded [`ChaCha8Rng`], so a batch's
//! masking is the same on every platform and at every thread count.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;

use crate::modernbert::AttentionInputs;
use crate::{AttentionKind, ModelBackend, ModelError, ModernBert, TokenBatch, TrainBackend};

/// Errors from building or scoring an objective batch.
#[derive(Debug, thiserror::Error)]
pub enum ObjectiveError {
    /// The model refused the batch.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The masking settings are unusable.
    #[error("invalid masking config: {0}")]
    Config(String),
    /// Nothing in the batch is predicted (e.g. every token is special).
    #[error("the batch has no positions to predict")]
    NoTargets,
    /// A result could not be read back from the device.
    #[error("reading {0} back from the device")]
    Readback(String),
    /// A recomputed segment produced no gradient for its input.
    #[error("activation checkpointing: no gradient reached the input of {0}")]
    NoGradient(&'static str),
}

/// Which objective a run trains with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// Masked LM.
    Mlm,
    /// Causal (next-token) LM.
    Clm,
    /// Masked next-token prediction.
    Mntp,
}

impl Objective {
    /// The objective a run spec names (a `twinhead.v1.Objective` value);
    /// `None` for any other value, unspecified included.
    pub fn from_spec(value: i32) -> Option<Self> {
        use twinhead_proto::v1::Objective as Spec;
        match Spec::try_from(value) {
            Ok(Spec::Mlm) => Some(Objective::Mlm),
            Ok(Spec::Clm) => Some(Objective::Clm),
            Ok(Spec::Mntp) => Some(Objective::Mntp),
            _ => None,
        }
    }

    /// The network it trains: decoders for CLM, encoders otherwise.
    pub fn flavour(self) -> crate::Flavour {
        match self {
            Objective::Clm => crate::Flavour::Decoder,
            Objective::Mlm | Objective::Mntp => crate::Flavour::Encoder,
        }
    }
}

/// MLM / MNTP masking settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskingConfig {
    /// Probability that a non-special token is selected (Ettin: 0.30,
    /// 0.15 in the decay phase and for evaluation).
    pub mask_ratio: f64,
    /// Replacement for 80% of the selected tokens.
    pub mask_token_id: u32,
    /// Random replacements are drawn uniformly from non-special ids below this.
    pub vocab_size: u32,
    /// Ids never selected and never drawn as random replacements.
    pub special_ids: Vec<u32>,
}

impl MaskingConfig {
    /// Settings from a model config (its four special ids).
    pub fn from_model(config: &crate::ModelConfig, mask_ratio: f64) -> Self {
        Self {
            mask_ratio,
            mask_token_id: config.mask_token_id,
            vocab_size: config.vocab_size as u32,
            special_ids: config.special_token_ids().to_vec(),
        }
    }

    fn check(&self) -> Result<(), ObjectiveError> {
        if !(self.mask_ratio > 0.0 && self.mask_ratio <= 1.0) {
            return Err(ObjectiveError::Config(format!(
                "mask_ratio {} must be in (0, 1]",
                self.mask_ratio
            )));
        }
        if (self.vocab_size as usize) <= self.special_ids.len() {
            return Err(ObjectiveError::Config(
                "vocabulary has no non-special token".into(),
            ));
        }
        Ok(())
    }
}

/// A batch ready for the model, with what to predict where.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictionBatch {
    /// The (possibly corrupted) input the model sees.
    pub input: TokenBatch,
    /// The attention to run with.
    pub attention: AttentionKind,
    /// Flat indices (`row * seq_len + col`) of the outputs that predict.
    pub positions: Vec<usize>,
    /// The token each of those outputs must predict.
    pub targets: Vec<u32>,
}

/// Selects tokens as MLM does and corrupts the input 80/10/10. Returns the
/// corrupted batch, the selected flat indices and their original ids.
/// `eligible(flat_index)` can veto positions (MNTP vetoes document starts).
fn select_and_corrupt(
    batch: &TokenBatch,
    cfg: &MaskingConfig,
    rng: &mut ChaCha8Rng,
    eligible: impl Fn(usize) -> bool,
) -> Result<(TokenBatch, Vec<usize>, Vec<u32>), ObjectiveError> {
    cfg.check()?;
    let mut input = batch.clone();
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    for (idx, id) in input.input_ids.iter_mut().enumerate() {
        // Draw for every token so that the stream does not depend on which
        // tokens are special.
        let selected = rng.random::<f64>() < cfg.mask_ratio;
        let action = rng.random::<f64>();
        let random_id = loop {
            let r = rng.random_range(0..cfg.vocab_size);
            if !cfg.special_ids.contains(&r) {
                break r;
            }
        };
        if !selected || cfg.special_ids.contains(id) || !eligible(idx) {
            continue;
        }
        positions.push(idx);
        targets.push(*id);
        if action < 0.8 {
            *id = cfg.mask_token_id;
        } else if action < 0.9 {
            *id = random_id;
        }
    }
    Ok((input, positions, targets))
}

/// MLM: BERT 80/10/10 masking, bidirectional attention, each selected
/// position predicts its own original token.
pub fn mlm_batch(
    batch: &TokenBatch,
    cfg: &MaskingConfig,
    rng: &mut ChaCha8Rng,
) -> Result<PredictionBatch, ObjectiveError> {
    let (input, positions, targets) = select_and_corrupt(batch, cfg, rng, |_| true)?;
    Ok(PredictionBatch {
        input,
        attention: AttentionKind::Bidirectional,
        positions,
        targets,
    })
}

/// CLM: every position whose next token is in the same document predicts
/// that token. Causal attention, no corruption.
pub fn clm_batch(batch: &TokenBatch) -> Result<PredictionBatch, ObjectiveError> {
    let layout = batch.layout()?;
    let s = batch.seq_len;
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    for b in 0..batch.batch {
        for i in 0..s.saturating_sub(1) {
            let idx = b * s + i;
            if layout.doc_index[idx] == layout.doc_index[idx + 1] {
                positions.push(idx);
                targets.push(batch.input_ids[idx + 1]);
            }
        }
    }
    Ok(PredictionBatch {
        input: batch.clone(),
        attention: AttentionKind::Causal,
        positions,
        targets,
    })
}

/// MNTP: masked like MLM (document starts never selected), bidirectional
/// attention, masked token `i` predicted from the output at `i − 1`.
pub fn mntp_batch(
    batch: &TokenBatch,
    cfg: &MaskingConfig,
    rng: &mut ChaCha8Rng,
) -> Result<PredictionBatch, ObjectiveError> {
    let layout = batch.layout()?;
    let (input, selected, targets) =
        select_and_corrupt(batch, cfg, rng, |idx| layout.positions[idx] > 0)?;
    Ok(PredictionBatch {
        input,
        attention: AttentionKind::Bidirectional,
        positions: selected.iter().map(|&i| i - 1).collect(),
        targets,
    })
}

/// Mean cross-entropy of `logits` against `targets`.
///
/// # Shapes
/// - `logits`: `[n, vocab]`, `targets`: `[n]` → `[1]`
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let n = targets.dims()[0];
    let picked = log_softmax(logits, 1).gather(1, targets.reshape([n, 1]));
    picked.mean().neg()
}

/// Logits at the predicting positions only.
///
/// # Shapes
/// - returns `[positions.len(), vocab]`
pub fn prediction_logits<B: ModelBackend>(
    model: &ModernBert<B>,
    batch: &PredictionBatch,
) -> Result<Tensor<B, 2>, ObjectiveError> {
    if batch.positions.is_empty() {
        return Err(ObjectiveError::NoTargets);
    }
    let hidden = model.hidden_states(&batch.input, batch.attention)?;
    Ok(logits_of_hidden(model, hidden, batch))
}

/// A batch's held-out score: summed over its predicted tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalSums {
    /// Sum of the targets' cross-entropies (nats).
    pub loss_sum: f64,
    /// Targets that are the head's most likely token.
    pub correct: u64,
    /// Predicted tokens.
    pub targets: u64,
}

impl EvalSums {
    pub fn add(&mut self, other: EvalSums) {
        self.loss_sum += other.loss_sum;
        self.correct += other.correct;
        self.targets += other.targets;
    }
}

/// Predicting positions whose logits are held at once when scoring: bounds
/// the `[positions, vocab]` buffer (≈ 200 MB at the recipe's vocabulary).
const SCORE_CHUNK: usize = 1024;

/// Scores a batch without gradients: each target's cross-entropy (summed
/// in f64) and whether the head ranks it first. A batch with nothing to
/// predict scores zero.
pub fn eval_sums<B: ModelBackend>(
    model: &ModernBert<B>,
    batch: &PredictionBatch,
) -> Result<EvalSums, ObjectiveError> {
    let n = batch.positions.len();
    if n == 0 {
        return Ok(EvalSums::default());
    }
    let hidden = picked(model.hidden_states(&batch.input, batch.attention)?, batch);
    let device = hidden.device();
    let mut sums = EvalSums::default();
    for start in (0..n).step_by(SCORE_CHUNK) {
        let end = (start + SCORE_CHUNK).min(n);
        let targets = &batch.targets[start..end];
        let logits = model.head(hidden.clone().slice(start..end));
        let index: Vec<i64> = targets.iter().map(|&t| i64::from(t)).collect();
        let index =
            Tensor::<B, 2, Int>::from_data(TensorData::new(index, [end - start, 1]), &device);
        let best = logits.clone().argmax(1);
        let picked = log_softmax(logits, 1).gather(1, index);
        let host = |what: &str, data: TensorData| {
            data.convert::<f64>()
                .into_vec::<f64>()
                .map_err(|e| ObjectiveError::Readback(format!("{what}: {e:?}")))
        };
        let log_probs = host("log-probabilities", picked.into_data())?;
        let best = host("argmax", best.into_data())?;
        sums.loss_sum -= log_probs.iter().sum::<f64>();
        sums.correct += best
            .iter()
            .zip(targets)
            .filter(|(b, t)| **b == f64::from(**t))
            .count() as u64;
        sums.targets += targets.len() as u64;
    }
    Ok(sums)
}

/// Final hidden states at the predicting positions, `[positions, hidden]`.
fn picked<B: Backend>(hidden: Tensor<B, 3>, batch: &PredictionBatch) -> Tensor<B, 2> {
    let device = hidden.device();
    let [b, s, h] = hidden.dims();
    let index: Vec<i64> = batch.positions.iter().map(|&p| p as i64).collect();
    let index =
        Tensor::<B, 1, Int>::from_data(TensorData::new(index, [batch.positions.len()]), &device);
    hidden.reshape([b * s, h]).select(0, index)
}

/// The head at the predicting positions of final hidden states.
fn logits_of_hidden<B: ModelBackend>(
    model: &ModernBert<B>,
    hidden: Tensor<B, 3>,
    batch: &PredictionBatch,
) -> Tensor<B, 2> {
    model.head(picked(hidden, batch))
}

/// Mean cross-entropy at the predicting positions of final hidden states,
/// through [`ModelBackend::tied_cross_entropy`] (the CPU never holds all
/// the logits).
fn loss_of_hidden<B: ModelBackend>(
    model: &ModernBert<B>,
    hidden: Tensor<B, 3>,
    batch: &PredictionBatch,
) -> Tensor<B, 1> {
    let h = model.head_transform(picked(hidden, batch));
    let p = model.precision();
    B::tied_cross_entropy(
        p.operand(h),
        p.operand(model.tok_embeddings.val()),
        model.decoder_bias.val(),
        &batch.targets,
    )
    .loss_sum
    .div_scalar(batch.targets.len() as f64)
}

/// The objective's loss for training: mean cross-entropy over the
/// predicting positions. Its gradients are computed with it (see
/// [`ModelBackend::tied_cross_entropy`]); to only score a batch, use
/// [`prediction_logits`] and [`cross_entropy`].
///
/// # Shapes
/// - returns `[1]`
pub fn loss<B: ModelBackend>(
    model: &ModernBert<B>,
    batch: &PredictionBatch,
) -> Result<Tensor<B, 1>, ObjectiveError> {
    if batch.positions.is_empty() {
        return Err(ObjectiveError::NoTargets);
    }
    let hidden = model.hidden_states(&batch.input, batch.attention)?;
    Ok(loss_of_hidden(model, hidden, batch))
}

/// `scale ×` the loss, and the gradients of every parameter of `model`,
/// with activation checkpointing: a forward without autodiff keeps only
/// each layer's input; then the head and the loss run with autodiff from
/// the last layer's output, and each layer, last to first, is run again
/// from its input and differentiated against the gradient of its output.
/// One layer's activations are alive at a time, for about one more
/// forward. The gradients come in pieces (head, each layer, embedding);
/// a parameter used in several (the tied embedding) appears in each.
#[allow(clippy::type_complexity)]
pub fn recomputed_gradients<B: TrainBackend>(
    model: &ModernBert<B>,
    batch: &PredictionBatch,
    scale: f64,
) -> Result<(Tensor<B::InnerBackend, 1>, Vec<GradientsParams>), ObjectiveError> {
    if batch.positions.is_empty() {
        return Err(ObjectiveError::NoTargets);
    }
    let config = model.config();
    let device = model.tok_embeddings.device();
    let layout = batch.input.layout()?;
    let inputs = AttentionInputs::<B>::new(config, &layout, batch.attention, &device);
    let inner = model.valid();
    let inner_device = inner.tok_embeddings.device();
    let plain_inputs = inputs.inner();
    let mut x = inner.embed(batch.input.ids_tensor(config.vocab_size, &inner_device)?);
    let mut layer_inputs = Vec::with_capacity(inner.layers.len());
    for layer in &inner.layers {
        layer_inputs.push(x.clone());
        x = layer.forward(x, &plain_inputs);
    }
    drop(plain_inputs);

    let top = Tensor::<B, 3>::from_inner(x).require_grad();
    let hidden = model.final_norm.forward(top.clone());
    let total = loss_of_hidden(model, hidden, batch).mul_scalar(scale);
    let value = total.clone().inner();
    let grads = total.backward();
    let mut upstream = top
        .grad(&grads)
        .ok_or(ObjectiveError::NoGradient("the last layer"))?;
    let mut pieces = vec![GradientsParams::from_grads(grads, model)];

    for (layer, input) in model.layers.iter().zip(layer_inputs).rev() {
        let x = Tensor::<B, 3>::from_inner(input).require_grad();
        let y = layer.forward(x.clone(), &inputs);
        let grads = (y * Tensor::from_inner(upstream)).sum().backward();
        upstream = x
            .grad(&grads)
            .ok_or(ObjectiveError::NoGradient("a layer"))?;
        pieces.push(GradientsParams::from_grads(grads, layer));
    }
    let embedded = model.embed(batch.input.ids_tensor(config.vocab_size, &device)?);
    let grads = (embedded * Tensor::from_inner(upstream)).sum().backward();
    pieces.push(GradientsParams::from_grads(grads, model));
    Ok((value, pieces))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CpuAutodiff, CpuBackend};
    use crate::{Flavour, ModelConfig};
    use rand::SeedableRng;

    fn tiny() -> ModelConfig {
        ModelConfig::builtin("tiny").expect("tiny")
    }

    /// Rows of `[CLS] body… [SEP]` documents, packed as `doc_lens` says.
    fn packed(c: &ModelConfig, doc_lens: Vec<Vec<usize>>, seed: u64) -> TokenBatch {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let rows: Vec<Vec<u32>> = doc_lens
            .iter()
            .map(|lens| {
                lens.iter()
                    .flat_map(|&len| {
                        let mut d: Vec<u32> = (0..len)
                            .map(|_| rng.random_range(10..c.vocab_size as u32))
                            .collect();
                        d[0] = c.cls_token_id;
                        d[len - 1] = c.sep_token_id;
                        d
                    })
                    .collect()
            })
            .collect();
        TokenBatch::new(&rows, Some(doc_lens)).expect("batch")
    }

    #[test]
    fn training_loss_equals_the_cross_entropy_of_the_logits() {
        let c = tiny();
        let batch = packed(&c, vec![vec![300, 212]; 3], 5);
        let cfg = MaskingConfig::from_model(&c, 0.3);
        for (flavour, prediction) in [
            (
                Flavour::Encoder,
                mlm_batch(&batch, &cfg, &mut ChaCha8Rng::seed_from_u64(1)).expect("mlm"),
            ),
            (Flavour::Decoder, clm_batch(&batch).expect("clm")),
        ] {
            let m = ModernBert::<CpuBackend>::new(&c, flavour, 2, &Default::default());
            let fused: f32 = loss(&m, &prediction).expect("loss").into_scalar();
            let targets: Vec<i64> = prediction.targets.iter().map(|&t| i64::from(t)).collect();
            let n = targets.len();
            let targets = Tensor::from_data(TensorData::new(targets, [n]), &Default::default());
            let logits = prediction_logits(&m, &prediction).expect("logits");
            let plain: f32 = cross_entropy(logits, targets).into_scalar();
            assert!(
                (fused - plain).abs() < 1e-5,
                "{flavour:?}: {fused} vs {plain}"
            );
        }
    }

    #[test]
    fn unknown_tokens_are_never_masked_nor_drawn() {
        let c = tiny();
        let unk = c.unk_token_id.expect("the tiny layout has [UNK]");
        // Half the tokens are [UNK], as in text the tokenizer could not cover.
        let row: Vec<u32> = (0..400)
            .map(|i| if i % 2 == 0 { unk } else { 100 + i })
            .collect();
        let batch = TokenBatch::new(&[row], None).expect("batch");
        let cfg = MaskingConfig::from_model(&c, 0.5);
        let m = mlm_batch(&batch, &cfg, &mut ChaCha8Rng::seed_from_u64(3)).expect("mlm");
        assert!(m.positions.len() > 50);
        assert!(
            !m.targets.contains(&unk),
            "[UNK] was selected for prediction"
        );
        assert!(m.positions.iter().all(|&p| p % 2 == 1));
    }

    #[test]
    fn mlm_masking_is_seeded_and_follows_80_10_10() {
        let c = tiny();
        let batch = packed(&c, vec![vec![200, 312]; 40], 1);
        let cfg = MaskingConfig::from_model(&c, 0.3);
        let a = mlm_batch(&batch, &cfg, &mut ChaCha8Rng::seed_from_u64(21)).expect("mlm");
        let b = mlm_batch(&batch, &cfg, &mut ChaCha8Rng::seed_from_u64(21)).expect("mlm");
        assert_eq!(a, b);
        let other = mlm_batch(&batch, &cfg, &mut ChaCha8Rng::seed_from_u64(22)).expect("mlm");
        assert_ne!(a.positions, other.positions);

        let eligible = batch
            .input_ids
            .iter()
            .filter(|id| !c.special_token_ids().contains(id))
            .count();
        let ratio = a.positions.len() as f64 / eligible as f64;
        assert!((ratio - 0.3).abs() < 0.01, "selected ratio {ratio}");
        let (mut masked, mut kept, mut random) = (0usize, 0usize, 0usize);
        for (&p, &t) in a.positions.iter().zip(&a.targets) {
            assert_eq!(t, batch.input_ids[p], "target is the original token");
            assert!(
                !c.special_token_ids().contains(&t),
                "special token selected"
            );
            let now = a.input.input_ids[p];
            if now == c.mask_token_id {
                masked += 1;
            } else if now == t {
                kept += 1;
            } else {
                assert!(!c.special_token_ids().contains(&now));
                random += 1;
            }
        }
        let n = a.positions.len() as f64;
        assert!(
            (masked as f64 / n - 0.8).abs() < 0.02,
            "mask share {}",
            masked as f64 / n
        );
        // "kept" also catches random draws equal to the original (1/4091).
        assert!(
            (kept as f64 / n - 0.1).abs() < 0.015,
            "kept share {}",
            kept as f64 / n
        );
        assert!(
            (random as f64 / n - 0.1).abs() < 0.015,
            "random share {}",
            random as f64 / n
        );
        // Unselected tokens are untouched.
        for i in 0..batch.input_ids.len() {
            if !a.positions.contains(&i) {
                assert_eq!(a.input.input_ids[i], batch.input_ids[i]);
            }
        }
    }

    #[test]
    fn clm_never_predicts_across_documents() {
        let c = tiny();
        let batch = packed(&c, vec![vec![3, 2], vec![5]], 2);
        let p = clm_batch(&batch).expect("clm");
        assert_eq!(p.positions, vec![0, 1, 3, 5, 6, 7, 8]);
        for (&pos, &t) in p.positions.iter().zip(&p.targets) {
            assert_eq!(t, batch.input_ids[pos + 1]);
        }
        assert_eq!(p.attention, AttentionKind::Causal);
    }

    #[test]
    fn mntp_predicts_token_i_from_output_i_minus_1() {
        let c = tiny();
        let batch = packed(&c, vec![vec![7, 9, 16]; 30], 3);
        let cfg = MaskingConfig {
            special_ids: vec![c.mask_token_id],
            ..MaskingConfig::from_model(&c, 0.5)
        };
        let p = mntp_batch(&batch, &cfg, &mut ChaCha8Rng::seed_from_u64(4)).expect("mntp");
        let layout = batch.layout().expect("layout");
        assert!(!p.positions.is_empty());
        for (&out, &t) in p.positions.iter().zip(&p.targets) {
            let masked = out + 1;
            assert_eq!(t, batch.input_ids[masked]);
            assert!(layout.positions[masked] > 0, "document start selected");
            assert_eq!(layout.doc_index[out], layout.doc_index[masked]);
        }
        assert_eq!(p.attention, AttentionKind::Bidirectional);
    }

    /// The loss equals the cross-entropy computed by hand from the full
    /// logits at the predicting positions, so nothing else contributes.
    #[test]
    fn loss_covers_exactly_the_predicting_positions() {
        let c = tiny();
        let d = Default::default();
        let batch = packed(&c, vec![vec![12, 20], vec![32]], 5);
        let cfg = MaskingConfig::from_model(&c, 0.3);
        let cases = [
            (
                Flavour::Encoder,
                mlm_batch(&batch, &cfg, &mut ChaCha8Rng::seed_from_u64(1)).expect("mlm"),
            ),
            (Flavour::Decoder, clm_batch(&batch).expect("clm")),
            (
                Flavour::Decoder,
                mntp_batch(&batch, &cfg, &mut ChaCha8Rng::seed_from_u64(1)).expect("mntp"),
            ),
        ];
        for (flavour, p) in cases {
            let m = ModernBert::<CpuBackend>::new(&c, flavour, 9, &d);
            let got: f32 = loss(&m, &p).expect("loss").into_scalar();
            let full = m.head(m.hidden_states(&p.input, p.attention).expect("hidden"));
            let full: Vec<f32> = full.into_data().to_vec().expect("f32");
            let v = c.vocab_size;
            let mut total = 0.0f64;
            for (&pos, &t) in p.positions.iter().zip(&p.targets) {
                let row = &full[pos * v..(pos + 1) * v];
                let max = row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
                let lse = max
                    + row
                        .iter()
                        .map(|&x| (x as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                total += lse - row[t as usize] as f64;
            }
            let expect = total / p.positions.len() as f64;
            assert!(
                (got as f64 - expect).abs() < 1e-4,
                "{flavour:?}: {got} vs {expect}"
            );
            // A random model is near ln(vocab).
            assert!((expect - (v as f64).ln()).abs() < 1.0);
        }
    }

    #[test]
    fn loss_backpropagates_into_tied_embeddings() {
        let c = tiny();
        let batch = packed(&c, vec![vec![16, 16]], 6);
        let m = ModernBert::<CpuAutodiff>::new(&c, Flavour::Decoder, 2, &Default::default());
        let p = clm_batch(&batch).expect("clm");
        let grads = loss(&m, &p).expect("loss").backward();
        let g = m.tok_embeddings.grad(&grads).expect("embedding grad");
        let g: Vec<f32> = g.into_data().to_vec().expect("f32");
        // Every row gets gradient through the tied output projection.
        let v = c.vocab_size;
        let h = c.hidden_size;
        let unused_row = (0..v as u32)
            .find(|id| !batch.input_ids.contains(id))
            .expect("unused id") as usize;
        assert!(
            g[unused_row * h..(unused_row + 1) * h]
                .iter()
                .any(|x| *x != 0.0)
        );
        assert!(g.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn empty_targets_and_bad_ratio_are_errors() {
        let c = tiny();
        let only_specials =
            TokenBatch::new(&[vec![c.cls_token_id, c.sep_token_id]], None).expect("b");
        let cfg = MaskingConfig::from_model(&c, 1.0);
        let p = mlm_batch(&only_specials, &cfg, &mut ChaCha8Rng::seed_from_u64(1)).expect("mlm");
        let m = ModernBert::<CpuBackend>::new(&c, Flavour::Encoder, 1, &Default::default());
        assert!(matches!(loss(&m, &p), Err(ObjectiveError::NoTargets)));
        let bad = MaskingConfig::from_model(&c, 0.0);
        assert!(matches!(
            mlm_batch(&only_specials, &bad, &mut ChaCha8Rng::seed_from_u64(1)),
            Err(ObjectiveError::Config(_))
        ));
    }
}
