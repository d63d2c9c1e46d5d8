//! ModernBERT (Warner et al., 2024, arXiv 2412.13663) as trained by Ettin
//! (arXiv 2507.11412): one network for both flavours. An encoder attends
//! bidirectionally and is trained with masked LM; a decoder attends
//! causally and is trained with next-token LM. The weights are the same
//! shapes; only the mask and the objective differ.
//!
//! Semantics follow `transformers`' `models/modernbert` and
//! `models/modernbert_decoder`: embedding LayerNorm, pre-norm layers whose
//! first attention norm is the identity, fused `Wqkv` (rows q, k, v),
//! rotate-half RoPE with one θ for global and one for local layers, GeGLU
//! (`input, gate = Wi(x).chunk(2)`, `Wo(gelu(input) * gate)`, exact erf
//! GELU), a final norm, and a prediction head dense → GELU → LayerNorm →
//! decoder tied to the token embeddings plus a bias. No biases elsewhere.
//!
//! Layer `i` is global when `i % global_attn_every_n_layers == 0`; local
//! layers see `local_attention / 2` tokens on each side (decoders: the
//! left side only, `i - w ..= i`, as Ettin's FlashAttention training did).
//! Rows may pack several documents (`doc_lens`); see [`super::packing`].

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use super::ModelError;
use super::attention::{AttentionPlan, Visibility};
use super::backend::{ModelBackend, Precision};
use super::config::ModelConfig;
use super::packing::{AttentionKind, PackedLayout};

/// Encoder (masked LM) or decoder (causal LM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavour {
    /// Bidirectional attention, masked-LM head (`ModernBertForMaskedLM`).
    Encoder,
    /// Causal attention, next-token head (`ModernBertDecoderForCausalLM`).
    Decoder,
}

impl Flavour {
    /// The attention this flavour uses by default.
    pub fn attention(self) -> AttentionKind {
        match self {
            Flavour::Encoder => AttentionKind::Bidirectional,
            Flavour::Decoder => AttentionKind::Causal,
        }
    }
}

/// A batch of token rows on the host, validated against the vocabulary
/// when the model runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBatch {
    /// Rows in the batch.
    pub batch: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// `[batch * seq_len]`, row-major.
    pub input_ids: Vec<u32>,
    /// Per row, the lengths of the documents packed in it (summing to
    /// `seq_len`); `None` = one document per row.
    pub doc_lens: Option<Vec<Vec<usize>>>,
}

impl TokenBatch {
    /// Rows of equal length, optionally with their document lengths.
    pub fn new(rows: &[Vec<u32>], doc_lens: Option<Vec<Vec<usize>>>) -> Result<Self, ModelError> {
        let batch = rows.len();
        let seq_len = rows.first().map_or(0, Vec::len);
        if batch == 0 || seq_len == 0 {
            return Err(ModelError::Batch("empty batch".into()));
        }
        if let Some(bad) = rows.iter().position(|r| r.len() != seq_len) {
            return Err(ModelError::Batch(format!(
                "row {bad} has {} tokens, row 0 has {seq_len}",
                rows[bad].len()
            )));
        }
        let batch = Self {
            batch,
            seq_len,
            input_ids: rows.concat(),
            doc_lens,
        };
        batch.layout()?;
        Ok(batch)
    }

    /// Document indices and positions of every token.
    pub fn layout(&self) -> Result<PackedLayout, ModelError> {
        PackedLayout::new(self.batch, self.seq_len, self.doc_lens.as_deref())
    }

    /// The ids as a `[batch, seq_len]` tensor, checked against `vocab_size`.
    pub fn ids_tensor<B: Backend>(
        &self,
        vocab_size: usize,
        device: &B::Device,
    ) -> Result<Tensor<B, 2, Int>, ModelError> {
        if let Some(&id) = self.input_ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(ModelError::TokenOutOfRange { id, vocab_size });
        }
        let data: Vec<i64> = self.input_ids.iter().map(|&x| i64::from(x)).collect();
        Ok(Tensor::from_data(
            TensorData::new(data, [self.batch, self.seq_len]),
            device,
        ))
    }
}

// ---------------------------------------------------------------- init

/// Seeded truncated-normal values at ±2σ (Megatron / ModernBERT init).
fn trunc_normal(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        // Box-Muller; keep both draws when inside the cut-off.
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        for z in [
            r * (2.0 * std::f64::consts::PI * u2).cos(),
            r * (2.0 * std::f64::consts::PI * u2).sin(),
        ] {
            if z.abs() <= 2.0 && out.len() < n {
                out.push((z * std) as f32);
            }
        }
    }
    out
}

/// Where initial weight values come from: seeded truncated normal, or
/// zeros for a model whose weights are about to be loaded.
enum Filler {
    TruncNormal(Box<ChaCha8Rng>),
    Zeros,
}

impl Filler {
    fn values(&mut self, n: usize, std: f64) -> Vec<f32> {
        match self {
            Filler::TruncNormal(rng) => trunc_normal(rng, n, std),
            Filler::Zeros => vec![0.0; n],
        }
    }
}

fn param2<B: Backend>(
    values: Vec<f32>,
    shape: [usize; 2],
    device: &B::Device,
) -> Param<Tensor<B, 2>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

/// A bias-free linear layer `d_in → d_out` with truncated-normal weights.
/// Burn stores the weight as `[d_in, d_out]` (PyTorch's transpose).
fn linear<B: Backend>(
    fill: &mut Filler,
    d_in: usize,
    d_out: usize,
    std: f64,
    device: &B::Device,
) -> Linear<B> {
    Linear {
        weight: param2(fill.values(d_in * d_out, std), [d_in, d_out], device),
        bias: None,
    }
}

fn layer_norm<B: Backend>(config: &ModelConfig, device: &B::Device) -> LayerNorm<B> {
    LayerNorm {
        gamma: Param::from_tensor(Tensor::ones([config.hidden_size], device)),
        eps: config.norm_eps,
    }
}

/// `linear`'s product with its operands in `precision`.
fn product<B: ModelBackend, const D: usize>(
    linear: &Linear<B>,
    x: Tensor<B, D>,
    precision: Precision,
) -> Tensor<B, D> {
    // x · W over the leading dims flattened, as Burn's linear computes it.
    let dims = x.dims();
    let rows = dims[..D - 1].iter().product();
    let weight = linear.weight.val();
    let [_, d_out] = weight.dims();
    let x = x.reshape([rows, dims[D - 1]]);
    let y = match precision {
        Precision::F32 => B::dense(x, weight),
        Precision::Bf16Mixed => B::bf16_matmul(x, weight),
    };
    let y = match &linear.bias {
        Some(b) => y + b.val().reshape([1, d_out]),
        None => y,
    };
    let mut out = dims;
    out[D - 1] = d_out;
    y.reshape(out)
}

/// Bias-free LayerNorm over the last dimension, through
/// [`ModelBackend::exact_layer_norm`] so that its gradient is exact on every
/// backend. The parameter keeps Burn's name, `gamma`.
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    /// `[hidden]`, initialised to ones.
    pub gamma: Param<Tensor<B, 1>>,
    #[module(skip)]
    eps: f64,
}

impl<B: ModelBackend> LayerNorm<B> {
    /// # Shapes
    /// - `x`: `[..., hidden]` → `[..., hidden]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        B::exact_layer_norm(x, self.gamma.val(), self.eps)
    }
}

// ---------------------------------------------------------------- blocks

/// Per-forward inputs shared by every layer: the attention plans and
/// rotary tables of global and local layers.
#[derive(Debug, Clone)]
pub struct AttentionInputs<B: Backend> {
    /// Rows in the batch.
    pub batch: usize,
    /// Tokens per row.
    pub seq_len: usize,
    /// Which keys each query of a global layer sees.
    pub global_plan: Arc<AttentionPlan>,
    /// Which keys each query of a local (sliding-window) layer sees.
    pub local_plan: Arc<AttentionPlan>,
    /// `[tokens, 1, head_dim]` cos / signed sin with the global θ.
    pub global_rope: (Tensor<B, 3>, Tensor<B, 3>),
    /// `[tokens, 1, head_dim]` cos / signed sin with the local θ.
    pub local_rope: (Tensor<B, 3>, Tensor<B, 3>),
}

impl<B: burn::tensor::backend::AutodiffBackend> AttentionInputs<B> {
    /// The same plans and tables for the inner backend (no copy of the
    /// plans, which are the costly part).
    pub fn inner(&self) -> AttentionInputs<B::InnerBackend> {
        let inner =
            |(cos, sin): &(Tensor<B, 3>, Tensor<B, 3>)| (cos.clone().inner(), sin.clone().inner());
        AttentionInputs {
            batch: self.batch,
            seq_len: self.seq_len,
            global_plan: Arc::clone(&self.global_plan),
            local_plan: Arc::clone(&self.local_plan),
            global_rope: inner(&self.global_rope),
            local_rope: inner(&self.local_rope),
        }
    }
}

impl<B: Backend> AttentionInputs<B> {
    /// Builds plans and rotary tables for `layout`.
    pub fn new(
        config: &ModelConfig,
        layout: &PackedLayout,
        kind: AttentionKind,
        device: &B::Device,
    ) -> Self {
        let (n, hd) = (layout.batch * layout.seq_len, config.head_dim());
        let rope = |theta: f64| {
            let (cos, sin) = layout.rope(hd, theta);
            (
                Tensor::<B, 3>::from_data(TensorData::new(cos, [n, 1, hd]), device),
                Tensor::<B, 3>::from_data(TensorData::new(sin, [n, 1, hd]), device),
            )
        };
        let plan = |window: Option<usize>| {
            Arc::new(AttentionPlan::packed(
                layout,
                Visibility::new(kind, window),
                config.num_heads,
            ))
        };
        Self {
            batch: layout.batch,
            seq_len: layout.seq_len,
            global_plan: plan(None),
            local_plan: plan(Some(config.half_window())),
            global_rope: rope(config.global_rope_theta),
            local_rope: rope(config.local_rope_theta),
        }
    }
}

/// Rotate-half RoPE: `x * cos + rotate_half(x) * sin`, where
/// `rotate_half([x1, x2]) = [-x2, x1]` over the two halves of the head,
/// computed as `x * cos + [x2, x1] * signed_sin` with the sign-folded
/// table of [`super::packing::rope_tables`].
///
/// # Shapes
/// - `x`: `[..., heads, head_dim]`
/// - `cos`, `signed_sin`: `[..., 1, head_dim]` (broadcast over heads)
pub fn apply_rope<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    cos: &Tensor<B, D>,
    signed_sin: &Tensor<B, D>,
) -> Tensor<B, D> {
    let last = D - 1;
    let half = x.dims()[last] / 2;
    let x1 = x.clone().narrow(last, 0, half);
    let x2 = x.clone().narrow(last, half, half);
    let swapped = Tensor::cat(vec![x2, x1], last);
    x * cos.clone() + swapped * signed_sin.clone()
}

/// Multi-head self-attention with a fused, bias-free `Wqkv`.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[hidden, 3 * hidden]`: output columns are q, k, v, each head
    /// contiguous (HF `Wqkv.weight` rows).
    pub wqkv: Linear<B>,
    /// `[hidden, hidden]`.
    pub wo: Linear<B>,
    out_drop: Dropout,
    num_heads: usize,
    global: bool,
    #[module(skip)]
    precision: Precision,
}

impl<B: ModelBackend> Attention<B> {
    /// Projects `x` to rotated queries, rotated keys and values, token-major.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`
    /// - `rope`: `[batch · seq, 1, head_dim]` each
    /// - returns three `[batch · seq, heads, head_dim]`
    pub fn qkv(
        &self,
        x: Tensor<B, 3>,
        rope: (&Tensor<B, 3>, &Tensor<B, 3>),
    ) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
        let [b, s, h] = x.dims();
        let nh = self.num_heads;
        // [b, s, 3h] -> [b·s, 3·heads, head_dim]: q heads, then k, then v.
        let qkv = product(&self.wqkv, x, self.precision).reshape([b * s, 3 * nh, h / nh]);
        // One rotary pass over q and k together.
        let qk = apply_rope(qkv.clone().narrow(1, 0, 2 * nh), rope.0, rope.1);
        let q = qk.clone().narrow(1, 0, nh);
        let k = qk.narrow(1, nh, nh);
        let v = qkv.narrow(1, 2 * nh, nh);
        (q, k, v)
    }

    /// Scaled dot-product attention of `q` over `k`, `v` as `plan` says
    /// (see [`super::attention`]), then `Wo`.
    ///
    /// # Shapes
    /// - `q`: `[batch · q_len, heads, head_dim]`
    /// - `k`, `v`: `[keys, heads, head_dim]`
    /// - returns `[batch, q_len, hidden]`
    pub fn attend(
        &self,
        plan: &Arc<AttentionPlan>,
        q: Tensor<B, 3>,
        k: Tensor<B, 3>,
        v: Tensor<B, 3>,
        batch: usize,
    ) -> Tensor<B, 3> {
        let [n, nh, hd] = q.dims();
        let p = self.precision;
        let out = B::block_attention(plan, p.operand(q), p.operand(k), p.operand(v)).reshape([
            batch,
            n / batch,
            nh * hd,
        ]);
        self.out_drop.forward(product(&self.wo, out, p))
    }

    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>, inputs: &AttentionInputs<B>) -> Tensor<B, 3> {
        let (rope, plan) = if self.global {
            (&inputs.global_rope, &inputs.global_plan)
        } else {
            (&inputs.local_rope, &inputs.local_plan)
        };
        let (q, k, v) = self.qkv(x, (&rope.0, &rope.1));
        self.attend(plan, q, k, v, inputs.batch)
    }
}

impl<B: Backend> Attention<B> {
    /// Whether this layer attends globally.
    pub fn is_global(&self) -> bool {
        self.global
    }
}

/// GeGLU feed-forward: `Wo(gelu(input) * gate)` with
/// `input, gate = Wi(x).chunk(2)`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `[hidden, 2 * intermediate]`: first half GELU input, second half gate.
    pub wi: Linear<B>,
    /// `[intermediate, hidden]`.
    pub wo: Linear<B>,
    drop: Dropout,
    #[module(skip)]
    precision: Precision,
}

impl<B: ModelBackend> Mlp<B> {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = product(&self.wi, x, self.precision);
        let i = h.dims()[2] / 2;
        let input = h.clone().narrow(2, 0, i);
        let gate = h.narrow(2, i, i);
        product(
            &self.wo,
            self.drop.forward(B::exact_gelu(input) * gate),
            self.precision,
        )
    }
}

/// One pre-norm transformer layer.
#[derive(Module, Debug)]
pub struct Layer<B: Backend> {
    /// `None` for layer 0 (the embedding norm plays its role).
    pub attn_norm: Option<LayerNorm<B>>,
    pub attn: Attention<B>,
    pub mlp_norm: LayerNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: ModelBackend> Layer<B> {
    /// Applies `attn_norm` (or nothing for layer 0).
    pub fn pre_attn(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.attn_norm {
            Some(norm) => norm.forward(x),
            None => x,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>, inputs: &AttentionInputs<B>) -> Tensor<B, 3> {
        let h = x.clone() + self.attn.forward(self.pre_attn(x), inputs);
        h.clone() + self.mlp.forward(self.mlp_norm.forward(h))
    }
}

// ---------------------------------------------------------------- model

/// The whole network: embeddings, layers, final norm and the tied
/// prediction head.
#[derive(Module, Debug)]
pub struct ModernBert<B: Backend> {
    /// `[vocab, hidden]`, also the output projection (tied).
    pub tok_embeddings: Param<Tensor<B, 2>>,
    pub emb_norm: LayerNorm<B>,
    emb_drop: Dropout,
    pub layers: Vec<Layer<B>>,
    pub final_norm: LayerNorm<B>,
    /// Head `dense`, `[hidden, hidden]`, no bias.
    pub head_dense: Linear<B>,
    pub head_norm: LayerNorm<B>,
    /// `[vocab]`, the output bias (HF `decoder.bias`).
    pub decoder_bias: Param<Tensor<B, 1>>,
    #[module(skip)]
    config: ModelConfig,
    #[module(skip)]
    flavour: Flavour,
    #[module(skip)]
    precision: Precision,
}

impl<B: Backend> ModernBert<B> {
    /// A freshly initialised model, as Ettin's training code
    /// (`full_megatron`) does it: truncated normal at ±2σ with
    /// σ = `initializer_range` for embeddings and in-projections (`Wqkv`,
    /// `Wi`, head dense) and σ/√(2·layers) for out-projections (attention
    /// `Wo`, MLP `Wo`); norms 1, output bias 0. (transformers' `_init_weights`
    /// differs only in using the out σ for the head dense.) `seed` fixes
    /// every value, whatever the backend.
    pub fn new(config: &ModelConfig, flavour: Flavour, seed: u64, device: &B::Device) -> Self {
        let fill = Filler::TruncNormal(Box::new(ChaCha8Rng::seed_from_u64(seed)));
        Self::build(config, flavour, fill, device)
    }

    /// A model with zero weights (norms 1), cheap to build, for loading a
    /// checkpoint into.
    pub(crate) fn zeroed(config: &ModelConfig, flavour: Flavour, device: &B::Device) -> Self {
        Self::build(config, flavour, Filler::Zeros, device)
    }

    fn build(config: &ModelConfig, flavour: Flavour, mut fill: Filler, device: &B::Device) -> Self {
        let (v, h, i) = (
            config.vocab_size,
            config.hidden_size,
            config.intermediate_size,
        );
        let std_in = config.initializer_range;
        let std_out = std_in / (2.0 * config.num_layers as f64).sqrt();
        let tok_embeddings = param2(fill.values(v * h, std_in), [v, h], device);
        let layers = (0..config.num_layers)
            .map(|l| Layer {
                attn_norm: (l > 0).then(|| layer_norm(config, device)),
                attn: Attention {
                    wqkv: linear(&mut fill, h, 3 * h, std_in, device),
                    wo: linear(&mut fill, h, h, std_out, device),
                    out_drop: DropoutConfig::new(config.attention_dropout).init(),
                    num_heads: config.num_heads,
                    global: config.is_global_layer(l),
                    precision: Precision::F32,
                },
                mlp_norm: layer_norm(config, device),
                mlp: Mlp {
                    wi: linear(&mut fill, h, 2 * i, std_in, device),
                    wo: linear(&mut fill, i, h, std_out, device),
                    drop: DropoutConfig::new(config.mlp_dropout).init(),
                    precision: Precision::F32,
                },
            })
            .collect();
        let head_dense = linear(&mut fill, h, h, std_in, device);
        Self {
            tok_embeddings,
            emb_norm: layer_norm(config, device),
            emb_drop: DropoutConfig::new(config.embedding_dropout).init(),
            layers,
            final_norm: layer_norm(config, device),
            head_dense,
            head_norm: layer_norm(config, device),
            decoder_bias: Param::from_tensor(Tensor::zeros([v], device)),
            config: config.clone(),
            flavour,
            precision: Precision::F32,
        }
    }

    /// The shape config this model was built with.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Encoder or decoder.
    pub fn flavour(&self) -> Flavour {
        self.flavour
    }

    /// The same weights used as the other flavour (cross-objective
    /// training: a decoder trained as an encoder with MNTP, or the reverse).
    pub fn with_flavour(mut self, flavour: Flavour) -> Self {
        self.flavour = flavour;
        self
    }

    /// The same weights computing in `precision` (see [`Precision`]).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        for layer in &mut self.layers {
            layer.attn.precision = precision;
            layer.mlp.precision = precision;
        }
        self
    }

    /// The arithmetic of the matrix products.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The same weights with other RoPE bases: phases change them
    /// (context extension raises the global base to 160k).
    pub fn with_rope_theta(mut self, global: f64, local: f64) -> Self {
        self.config.global_rope_theta = global;
        self.config.local_rope_theta = local;
        self
    }
}

impl<B: ModelBackend> ModernBert<B> {
    /// Embedding lookup, embedding norm and dropout.
    ///
    /// # Shapes
    /// - `ids`: `[batch, seq]` → `[batch, seq, hidden]`
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let x = B::token_embedding(self.tok_embeddings.val(), ids);
        self.emb_drop.forward(self.emb_norm.forward(x))
    }

    /// Final hidden states (after `final_norm`), before the head.
    ///
    /// # Shapes
    /// - returns `[batch, seq, hidden]`
    pub fn hidden_states(
        &self,
        batch: &TokenBatch,
        kind: AttentionKind,
    ) -> Result<Tensor<B, 3>, ModelError> {
        let device = self.tok_embeddings.device();
        let ids = batch.ids_tensor::<B>(self.config.vocab_size, &device)?;
        let layout = batch.layout()?;
        let inputs = AttentionInputs::new(&self.config, &layout, kind, &device);
        let mut x = self.embed(ids);
        for layer in &self.layers {
            x = layer.forward(x, &inputs);
        }
        Ok(self.final_norm.forward(x))
    }

    /// Prediction head on any leading shape: dense → GELU → LayerNorm →
    /// tied decoder + bias.
    ///
    /// # Shapes
    /// - `hidden`: `[..., hidden]` → `[..., vocab]`
    pub fn head<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        let h = self.head_transform(hidden);
        let dims = h.dims();
        let rows = dims[..D - 1].iter().product();
        let p = self.precision;
        let logits = B::tied_logits(
            p.operand(h.reshape([rows, dims[D - 1]])),
            p.operand(self.tok_embeddings.val()),
            self.decoder_bias.val(),
        );
        let mut out = dims;
        out[D - 1] = self.config.vocab_size;
        logits.reshape(out)
    }

    /// The head before the tied decoder: dense → GELU → LayerNorm.
    ///
    /// # Shapes
    /// - `hidden`: `[..., hidden]` → `[..., hidden]`
    pub fn head_transform<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        self.head_norm.forward(B::exact_gelu(product(
            &self.head_dense,
            hidden,
            self.precision,
        )))
    }

    /// Logits for every position with this flavour's attention.
    ///
    /// # Shapes
    /// - returns `[batch, seq, vocab]`
    pub fn forward(&self, batch: &TokenBatch) -> Result<Tensor<B, 3>, ModelError> {
        let hidden = self.hidden_states(batch, self.flavour.attention())?;
        Ok(self.head(hidden))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    fn tiny() -> ModelConfig {
        ModelConfig::builtin("tiny").expect("tiny")
    }

    #[test]
    fn module_param_count_matches_formula() {
        let c = tiny();
        let m = ModernBert::<B>::new(&c, Flavour::Encoder, 1, &Default::default());
        assert_eq!(m.num_params(), c.num_params());
    }

    #[test]
    fn init_is_seeded_and_truncated() {
        let c = tiny();
        let d = Default::default();
        let a = ModernBert::<B>::new(&c, Flavour::Encoder, 7, &d);
        let b = ModernBert::<B>::new(&c, Flavour::Encoder, 7, &d);
        let e: Vec<f32> = a.tok_embeddings.val().into_data().to_vec().expect("f32");
        let f: Vec<f32> = b.tok_embeddings.val().into_data().to_vec().expect("f32");
        assert_eq!(e, f);
        let max = e.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(max <= 0.04 + 1e-6, "embedding beyond 2σ: {max}");
        let std = (e.iter().map(|x| x * x).sum::<f32>() / e.len() as f32).sqrt();
        // A ±2σ truncated normal has std 0.88σ.
        assert!((std - 0.0176).abs() < 0.001, "embedding std {std}");
        let wo: Vec<f32> = a.layers[0]
            .attn
            .wo
            .weight
            .val()
            .into_data()
            .to_vec()
            .expect("f32");
        let wo_std = (wo.iter().map(|x| x * x).sum::<f32>() / wo.len() as f32).sqrt();
        let expect = 0.02 / (6.0f32).sqrt() * 0.88;
        assert!((wo_std - expect).abs() < 0.15 * expect, "Wo std {wo_std}");
    }

    #[test]
    fn rope_rotates_halves() {
        let d = Default::default();
        // head_dim 4, one position with angles (a, b) in the two frequency slots.
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [1, 1, 1, 4]),
            &d,
        );
        let (a, b) = (0.3f32, 0.7f32);
        let cos = Tensor::<B, 4>::from_data(
            TensorData::new(vec![a.cos(), b.cos(), a.cos(), b.cos()], [1, 1, 1, 4]),
            &d,
        );
        let sin = Tensor::<B, 4>::from_data(
            TensorData::new(vec![-a.sin(), -b.sin(), a.sin(), b.sin()], [1, 1, 1, 4]),
            &d,
        );
        let y: Vec<f32> = apply_rope(x, &cos, &sin).into_data().to_vec().expect("f32");
        // Pairs are (x0, x2) and (x1, x3), rotated by a and b.
        let expect = [
            1.0 * a.cos() - 3.0 * a.sin(),
            2.0 * b.cos() - 4.0 * b.sin(),
            3.0 * a.cos() + 1.0 * a.sin(),
            4.0 * b.cos() + 2.0 * b.sin(),
        ];
        for (u, v) in y.iter().zip(expect) {
            assert!((u - v).abs() < 1e-6, "{y:?} vs {expect:?}");
        }
    }

    fn max_abs_diff(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
        let a: Vec<f32> = a.into_data().to_vec().expect("f32");
        let b: Vec<f32> = b.into_data().to_vec().expect("f32");
        a.iter().zip(&b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
    }

    #[test]
    fn packed_row_equals_documents_run_alone() {
        let c = tiny();
        let d = Default::default();
        for flavour in [Flavour::Encoder, Flavour::Decoder] {
            let m = ModernBert::<B>::new(&c, flavour, 3, &d);
            let doc_a: Vec<u32> = (0..21).map(|i| 10 + i * 7).collect();
            let doc_b: Vec<u32> = (0..11).map(|i| 500 + i * 13).collect();
            let packed = TokenBatch::new(
                &[[doc_a.clone(), doc_b.clone()].concat()],
                Some(vec![vec![21, 11]]),
            )
            .expect("batch");
            let out = m.forward(&packed).expect("fwd");
            let a = m
                .forward(&TokenBatch::new(&[doc_a], None).expect("a"))
                .expect("fwd a");
            let b = m
                .forward(&TokenBatch::new(&[doc_b], None).expect("b"))
                .expect("fwd b");
            let diff_a = max_abs_diff(out.clone().narrow(1, 0, 21), a);
            let diff_b = max_abs_diff(out.clone().narrow(1, 21, 11), b.clone());
            assert!(
                diff_a < 1e-5 && diff_b < 1e-5,
                "{flavour:?}: {diff_a} {diff_b}"
            );
            // Without doc_lens the second document sees the first: outputs differ.
            let joined =
                TokenBatch::new(std::slice::from_ref(&packed.input_ids), None).expect("joined");
            let j = m.forward(&joined).expect("fwd joined");
            assert!(max_abs_diff(j.narrow(1, 21, 11), b) > 1e-3, "{flavour:?}");
        }
    }

    #[test]
    fn decoder_is_causal_and_encoder_is_not() {
        let c = tiny();
        let d = Default::default();
        let base: Vec<u32> = (0..20).map(|i| 5 + i * 11).collect();
        let mut changed = base.clone();
        changed[15] = 4000;
        for (flavour, expect_prefix_equal) in [(Flavour::Decoder, true), (Flavour::Encoder, false)]
        {
            let m = ModernBert::<B>::new(&c, flavour, 5, &d);
            let x = m
                .forward(&TokenBatch::new(std::slice::from_ref(&base), None).expect("x"))
                .expect("fwd");
            let y = m
                .forward(&TokenBatch::new(&[changed.clone()], None).expect("y"))
                .expect("fwd");
            let diff = max_abs_diff(x.narrow(1, 0, 15), y.narrow(1, 0, 15));
            assert_eq!(
                diff < 1e-6,
                expect_prefix_equal,
                "{flavour:?}: prefix diff {diff}"
            );
        }
    }

    #[test]
    fn out_of_vocab_ids_are_an_error() {
        let c = tiny();
        let m = ModernBert::<B>::new(&c, Flavour::Encoder, 1, &Default::default());
        let batch = TokenBatch::new(&[vec![1, 2, 4096]], None).expect("batch");
        assert!(matches!(
            m.forward(&batch),
            Err(ModelError::TokenOutOfRange { id: 4096, .. })
        ));
    }
}
