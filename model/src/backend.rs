//! What the model needs of a backend beyond Burn's own operations, and its
//! implementations: the plain tensor versions for inference backends, a
//! host kernel for the CPU backend, and one autodiff node per operation
//! with a backward written out (not derived op by op) under `Autodiff`.
//!
//! - **Blocked attention** ([`super::attention`]): the backward recomputes
//!   the scores from the output and its log-sum-exp.
//! - **GELU**: the exact erf form forward and its exact derivative
//!   `Φ(x) + x·φ(x)`. Burn 0.21 differentiates every GELU with the
//!   derivative of the tanh approximation (off by up to 8.7e-4 near
//!   |x| ≈ 2), which the reference recipe does not.
//! - **LayerNorm** with a closed-form gradient and an exact division.
//! - **The tied head**: logits `hidden · Eᵀ`, and the training loss as one
//!   cross-entropy node that returns its gradients with the loss (the CPU
//!   works through the rows in chunks, never holding all the logits).
//! - **StableAdamW's per-tensor update** (the CPU: two in-place passes).
//! - **Mixed precision**: bfloat16 products, or rounded operands where the
//!   backend has no bfloat16.

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData, TensorPrimitive};

use burn::backend::ndarray::NdArrayTensor;

use crate::product_cpu::{Threads, product, product_new};

use super::attention::{self, AttentionPlan, cpu};
use super::head_cpu as cpu_head;
use crate::adamw::{AdamWStep, AdamWUpdate, cpu as cpu_optim};

/// What the model needs of a backend beyond Burn's own operations (see the
/// module docs). The provided methods are the tensor versions every backend
/// runs; the CPU backend replaces several with host kernels, and
/// [`Autodiff`] records each differentiated one as a single node.
pub trait ModelBackend: Backend {
    /// Attention of `q` over `k`, `v` (`[tokens, heads, head_dim]`) as
    /// `plan` says; returns `[queries, heads, head_dim]`.
    fn block_attention(
        plan: &Arc<AttentionPlan>,
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
    ) -> Tensor<Self, 3> {
        Self::block_attention_forward(plan, q, k, v).0
    }

    /// The output and the log-sum-exp of every query (see
    /// [`attention::forward`]).
    fn block_attention_forward(
        plan: &AttentionPlan,
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
    ) -> (Tensor<Self, 3>, Tensor<Self, 2>) {
        attention::forward(plan, q, k, v)
    }

    /// Gradients of q, k, v (see [`attention::backward`]).
    #[allow(clippy::too_many_arguments)]
    fn block_attention_backward(
        plan: &AttentionPlan,
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        out: Tensor<Self, 3>,
        lse: Tensor<Self, 2>,
        grad: Tensor<Self, 3>,
    ) -> (Tensor<Self, 3>, Tensor<Self, 3>, Tensor<Self, 3>) {
        attention::backward(plan, q, k, v, out, lse, grad)
    }

    /// One tensor's StableAdamW update (see `twinhead-worker`'s `optim`): the new
    /// parameter, moments and `√r`.
    fn stable_adamw_update(
        param: Tensor<Self, 1>,
        moments: (Tensor<Self, 1>, Tensor<Self, 1>),
        grad: Tensor<Self, 1>,
        update: &AdamWUpdate,
    ) -> AdamWStep<Self> {
        crate::adamw::stable_adamw_update(param, moments, grad, update)
    }

    /// The token embedding lookup: rows `ids` of `weights`.
    ///
    /// # Shapes
    /// - `weights`: `[vocab, hidden]`, `ids`: `[batch, seq]` → `[batch, seq, hidden]`
    fn token_embedding(weights: Tensor<Self, 2>, ids: Tensor<Self, 2, Int>) -> Tensor<Self, 3> {
        burn::tensor::module::embedding(weights, ids)
    }

    /// The gradient of [`ModelBackend::token_embedding`]'s weights: each row of
    /// `grad` added at its id, zeros elsewhere (`[vocab, hidden]`).
    fn token_embedding_backward(
        vocab: usize,
        ids: Tensor<Self, 2, Int>,
        grad: Tensor<Self, 3>,
    ) -> Tensor<Self, 2> {
        let [b, s, h] = grad.dims();
        Tensor::zeros([vocab, h], &grad.device()).select_assign(
            0,
            ids.reshape([b * s]),
            grad.reshape([b * s, h]),
            IndexingUpdateOp::Add,
        )
    }

    /// `t` with a new shape holding as many values. Burn's CPU reshape
    /// copies the values every time; the CPU backend's does not when `t` is
    /// contiguous (gradients and parameters, flattened and back every step).
    fn reshaped<const D1: usize, const D2: usize>(
        t: Tensor<Self, D1>,
        shape: [usize; D2],
    ) -> Tensor<Self, D2> {
        t.reshape(shape)
    }

    /// Flat tensors one after the other, as one flat tensor: one copy (Burn's
    /// CPU `cat` makes two).
    fn cat_flat(parts: Vec<Tensor<Self, 1>>) -> Tensor<Self, 1> {
        Tensor::cat(parts, 0)
    }

    /// A linear layer's product, `x · W`.
    ///
    /// # Shapes
    /// - `x`: `[rows, d_in]`, `weight`: `[d_in, d_out]` → `[rows, d_out]`
    fn dense(x: Tensor<Self, 2>, weight: Tensor<Self, 2>) -> Tensor<Self, 2> {
        x.matmul(weight)
    }

    /// Gradients of [`ModelBackend::dense`]'s inputs from the output's
    /// gradient: `(grad · Wᵀ, xᵀ · grad)`.
    fn dense_backward(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        (
            grad.clone().matmul(weight.transpose()),
            x.transpose().matmul(grad),
        )
    }

    /// Logits against the tied embedding, `hidden · Eᵀ + bias`.
    ///
    /// # Shapes
    /// - `hidden`: `[rows, hidden]`, `embedding`: `[vocab, hidden]`,
    ///   `bias`: `[vocab]` → `[rows, vocab]`
    fn tied_logits(
        hidden: Tensor<Self, 2>,
        embedding: Tensor<Self, 2>,
        bias: Tensor<Self, 1>,
    ) -> Tensor<Self, 2> {
        tied_logits(hidden, embedding, bias)
    }

    /// Gradients of [`ModelBackend::tied_logits`]'s inputs from the
    /// logits' gradient: `(grad · E, gradᵀ · hidden, Σ_rows grad)`.
    fn tied_logits_backward(
        hidden: Tensor<Self, 2>,
        embedding: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>, Tensor<Self, 1>) {
        tied_logits_backward(hidden, embedding, grad)
    }

    /// The summed cross-entropy of the tied logits `hidden · Eᵀ + bias`
    /// against `targets`, and its gradients with respect to `hidden`, `E`
    /// and `bias` (the loss is a scalar, so they are known in the forward).
    fn tied_cross_entropy(
        hidden: Tensor<Self, 2>,
        embedding: Tensor<Self, 2>,
        bias: Tensor<Self, 1>,
        targets: &[u32],
    ) -> CrossEntropyGrads<Self> {
        tied_cross_entropy(hidden, embedding, bias, targets)
    }

    /// Bias-free LayerNorm over the last dimension:
    /// `(x − μ) / √(σ² + ε) · γ`.
    fn exact_layer_norm<const D: usize>(
        x: Tensor<Self, D>,
        gamma: Tensor<Self, 1>,
        eps: f64,
    ) -> Tensor<Self, D> {
        layer_norm(x, gamma, eps).0
    }

    /// Whether the backend has bfloat16 tensors; without them mixed
    /// precision rounds float32 values instead (same operands, float32
    /// arithmetic).
    const NATIVE_BF16: bool = true;

    /// `x` rounded to bfloat16 (nearest, ties to even) and back, with the
    /// identity as gradient (the operand rounding of mixed precision: the
    /// f32 value stays the master).
    fn round_bf16<const D: usize>(x: Tensor<Self, D>) -> Tensor<Self, D> {
        x.cast(burn::tensor::FloatDType::BF16)
            .cast(burn::tensor::FloatDType::F32)
    }

    /// `a · b` on bfloat16 operands with a float32 result: a bfloat16
    /// product where the backend has the type, else the product of the
    /// rounded operands.
    fn bf16_matmul<const D: usize>(a: Tensor<Self, D>, b: Tensor<Self, D>) -> Tensor<Self, D> {
        if Self::NATIVE_BF16 {
            let bf16 = burn::tensor::FloatDType::BF16;
            a.cast(bf16)
                .matmul(b.cast(bf16))
                .cast(burn::tensor::FloatDType::F32)
        } else {
            Self::round_bf16(a).matmul(Self::round_bf16(b))
        }
    }

    /// GELU, exact erf form: `x · Φ(x)`.
    fn exact_gelu<const D: usize>(x: Tensor<Self, D>) -> Tensor<Self, D> {
        burn::tensor::activation::gelu(x)
    }
}

/// [`ModelBackend::tied_logits`] as tensor operations.
pub fn tied_logits<B: Backend>(
    hidden: Tensor<B, 2>,
    embedding: Tensor<B, 2>,
    bias: Tensor<B, 1>,
) -> Tensor<B, 2> {
    burn::tensor::module::linear(hidden, embedding.transpose(), Some(bias))
}

/// [`ModelBackend::tied_logits_backward`] as tensor operations.
pub fn tied_logits_backward<B: Backend>(
    hidden: Tensor<B, 2>,
    embedding: Tensor<B, 2>,
    grad: Tensor<B, 2>,
) -> (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 1>) {
    let [_, vocab] = grad.dims();
    let d_hidden = grad.clone().matmul(embedding);
    let d_embedding = grad.clone().transpose().matmul(hidden);
    (d_hidden, d_embedding, grad.sum_dim(0).reshape([vocab]))
}

/// [`ModelBackend::exact_layer_norm`] as tensor operations: the output, the
/// normalised input `x̂` and `1 / √(σ² + ε)` (kept for the backward). The
/// reciprocal is an exact division: Burn's CPU `recip` is a SIMD estimate.
pub fn layer_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    eps: f64,
) -> (Tensor<B, D>, Tensor<B, D>, Tensor<B, D>) {
    let last = D - 1;
    let centred = x.clone() - x.mean_dim(last);
    let std = centred
        .clone()
        .powi_scalar(2)
        .mean_dim(last)
        .add_scalar(eps)
        .sqrt();
    let rstd = std.ones_like().div(std);
    let normed = centred * rstd.clone();
    let y = normed.clone() * broadcast_last(gamma);
    (y, normed, rstd)
}

/// `[h]` as `[1, …, 1, h]`, to broadcast over the last dimension.
fn broadcast_last<B: Backend, const D: usize>(v: Tensor<B, 1>) -> Tensor<B, D> {
    let [h] = v.dims();
    let mut shape = [1usize; D];
    shape[D - 1] = h;
    v.reshape(shape)
}

/// The gradients of [`layer_norm`]'s input and scale from its output's:
/// `dx = (g − mean(g) − x̂·mean(g·x̂)) / σ` with `g = dy·γ`, `dγ = Σ dy·x̂`.
pub fn layer_norm_backward<B: Backend, const D: usize>(
    normed: Tensor<B, D>,
    rstd: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    grad: Tensor<B, D>,
) -> (Tensor<B, D>, Tensor<B, 1>) {
    let last = D - 1;
    let [h] = gamma.dims();
    let g = grad.clone() * broadcast_last(gamma);
    let mean_g = g.clone().mean_dim(last);
    let mean_gx = (g.clone() * normed.clone()).mean_dim(last);
    let dx = (g - mean_g - normed.clone() * mean_gx) * rstd;
    let rows = grad.dims()[..last].iter().product();
    let d_gamma = (grad * normed).reshape([rows, h]).sum_dim(0).reshape([h]);
    (dx, d_gamma)
}

/// The loss sum `[1]` of [`ModelBackend::tied_cross_entropy`] and its
/// gradients.
#[derive(Debug, Clone)]
pub struct CrossEntropyGrads<B: Backend> {
    pub loss_sum: Tensor<B, 1>,
    pub d_hidden: Tensor<B, 2>,
    pub d_embedding: Tensor<B, 2>,
    pub d_bias: Tensor<B, 1>,
}

/// [`ModelBackend::tied_cross_entropy`] as tensor operations (all logits
/// at once).
pub fn tied_cross_entropy<B: Backend>(
    hidden: Tensor<B, 2>,
    embedding: Tensor<B, 2>,
    bias: Tensor<B, 1>,
    targets: &[u32],
) -> CrossEntropyGrads<B> {
    let device = hidden.device();
    let n = targets.len();
    let logits = tied_logits(hidden.clone(), embedding.clone(), bias);
    let [_, vocab] = logits.dims();
    let index: Vec<i64> = targets.iter().map(|&t| i64::from(t)).collect();
    let index = Tensor::<B, 1, burn::tensor::Int>::from_data(TensorData::new(index, [n]), &device)
        .reshape([n, 1]);
    let log_probs = burn::tensor::activation::log_softmax(logits, 1);
    let loss_sum = log_probs.clone().gather(1, index.clone()).sum().neg();
    let one_hot = Tensor::<B, 2>::zeros([n, vocab], &device).scatter(
        1,
        index,
        Tensor::ones([n, 1], &device),
        burn::tensor::IndexingUpdateOp::Add,
    );
    let g = log_probs.exp() - one_hot;
    let (d_hidden, d_embedding, d_bias) = tied_logits_backward(hidden, embedding, g);
    CrossEntropyGrads {
        loss_sum,
        d_hidden,
        d_embedding,
        d_bias,
    }
}

/// Arithmetic of a model's matrix products.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Precision {
    /// float32 throughout.
    #[default]
    F32,
    /// float32 weights, norms, softmax and loss; matrix products on
    /// bfloat16 operands (see [`ModelBackend::round_bf16`]).
    Bf16Mixed,
}

impl Precision {
    /// `"f32"` (or empty) or `"bf16-mixed"`, as the run spec spells it.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "" | "f32" => Ok(Self::F32),
            "bf16-mixed" => Ok(Self::Bf16Mixed),
            other => Err(format!("precision {other:?}: expected f32 or bf16-mixed")),
        }
    }

    /// An operand of a matrix product in this precision.
    pub fn operand<B: ModelBackend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::F32 => x,
            Self::Bf16Mixed => B::round_bf16(x),
        }
    }
}

/// A backend the trainer runs on: autodiff over a [`ModelBackend`], itself
/// a [`ModelBackend`] (the model runs on the first, the optimizer on the
/// inner one).
pub trait TrainBackend: AutodiffBackend<InnerBackend: ModelBackend> + ModelBackend {}

impl<B: AutodiffBackend<InnerBackend: ModelBackend> + ModelBackend> TrainBackend for B {}

type Cpu = burn::backend::NdArray<f32>;

fn device_tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<Cpu, D> {
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

/// A float tensor's values as an owned host array, without a copy when
/// nothing else holds them.
fn owned<const D: usize>(t: Tensor<Cpu, D>) -> ndarray::ArrayD<f32> {
    let shape = t.dims().to_vec();
    match t.into_primitive().tensor() {
        NdArrayTensor::F32(storage) => storage.into_owned().into_owned(),
        other => {
            let data = Tensor::<Cpu, D>::from_primitive(TensorPrimitive::Float(other)).into_data();
            let values = data.convert::<f32>().into_vec::<f32>().unwrap_or_default();
            ndarray::ArrayD::from_shape_vec(shape, values)
                .unwrap_or_else(|_| ndarray::ArrayD::zeros(vec![0; D]))
        }
    }
}

/// A float tensor's values as a shared host array (no copy).
fn shared<const D: usize>(t: Tensor<Cpu, D>) -> ndarray::ArcArray<f32, ndarray::IxDyn> {
    match t.into_primitive().tensor() {
        NdArrayTensor::F32(storage) => storage.into_shared(),
        other => owned(Tensor::<Cpu, D>::from_primitive(TensorPrimitive::Float(
            other,
        )))
        .into_shared(),
    }
}

/// A 2-d view of a shared array (the shapes come from Burn tensors of rank 2).
fn matrix(a: &ndarray::ArcArray<f32, ndarray::IxDyn>) -> ndarray::ArrayView2<'_, f32> {
    a.view()
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap_or_else(|_| ndarray::ArrayView2::from_shape((0, 0), &[]).expect("empty view"))
}

/// A 3-d view of a shared array (the shapes come from Burn tensors of rank 3).
fn tokens_heads(a: &ndarray::ArcArray<f32, ndarray::IxDyn>) -> ndarray::ArrayView3<'_, f32> {
    a.view()
        .into_dimensionality::<ndarray::Ix3>()
        .unwrap_or_else(|_| ndarray::ArrayView3::from_shape((0, 0, 0), &[]).expect("empty view"))
}

fn from_owned<const D: usize>(a: ndarray::ArrayD<f32>) -> Tensor<Cpu, D> {
    Tensor::from_primitive(TensorPrimitive::Float(NdArrayTensor::from(a.into_shared())))
}

impl ModelBackend for Cpu {
    const NATIVE_BF16: bool = false;

    fn reshaped<const D1: usize, const D2: usize>(
        t: Tensor<Self, D1>,
        shape: [usize; D2],
    ) -> Tensor<Self, D2> {
        let values = shared(t);
        if values.is_standard_layout()
            && values.len() == shape.iter().product::<usize>()
            && let Ok(reshaped) = values.clone().into_shape_with_order(ndarray::IxDyn(&shape))
        {
            return Tensor::from_primitive(TensorPrimitive::Float(NdArrayTensor::from(reshaped)));
        }
        Tensor::<Self, D1>::from_primitive(TensorPrimitive::Float(NdArrayTensor::from(values)))
            .reshape(shape)
    }

    /// Burn's CPU version fills its zeros one pushed value at a time and
    /// then scatters through its general indexing: here one zeroed buffer
    /// and a row loop, in token order.
    fn token_embedding_backward(
        vocab: usize,
        ids: Tensor<Self, 2, Int>,
        grad: Tensor<Self, 3>,
    ) -> Tensor<Self, 2> {
        let [_, _, h] = grad.dims();
        let ids = ids
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .unwrap_or_default();
        let grad = shared(grad);
        let grad = grad.as_standard_layout();
        let Some(rows) = grad.as_slice() else {
            return Tensor::zeros([vocab, h], &Default::default());
        };
        let mut out = vec![0f32; vocab * h];
        for (&id, row) in ids.iter().zip(rows.chunks_exact(h.max(1))) {
            if let Some(dst) = usize::try_from(id)
                .ok()
                .filter(|&id| id < vocab)
                .map(|id| &mut out[id * h..(id + 1) * h])
            {
                dst.iter_mut().zip(row).for_each(|(d, g)| *d += g);
            }
        }
        device_tensor(out, [vocab, h])
    }

    fn cat_flat(parts: Vec<Tensor<Self, 1>>) -> Tensor<Self, 1> {
        let total = parts.iter().map(|p| p.dims()[0]).sum();
        let mut values = Vec::with_capacity(total);
        for part in parts {
            let part = shared(part);
            match part.as_slice() {
                Some(contiguous) => values.extend_from_slice(contiguous),
                None => values.extend(part.iter()),
            }
        }
        device_tensor(values, [total])
    }

    /// The CPU backend has no bfloat16 tensors: round each value on the host.
    fn round_bf16<const D: usize>(x: Tensor<Self, D>) -> Tensor<Self, D> {
        let mut a = owned(x);
        a.mapv_inplace(|v| half::bf16::from_f32(v).to_f32());
        from_owned(a)
    }

    /// `gemm` on the operands as they lie, transposes as strided views.
    fn dense(x: Tensor<Self, 2>, weight: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let (x, w) = (shared(x), shared(weight));
        from_owned(product_new(1.0, matrix(&x), matrix(&w), Threads::Pool).into_dyn())
    }

    fn dense_backward(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>) {
        let (x, w, g) = (shared(x), shared(weight), shared(grad));
        let (x, w, g) = (matrix(&x), matrix(&w), matrix(&g));
        let dx = product_new(1.0, g, w.t(), Threads::Pool);
        let dw = product_new(1.0, x.t(), g, Threads::Pool);
        (from_owned(dx.into_dyn()), from_owned(dw.into_dyn()))
    }

    /// The product with `Eᵀ` as a strided view: Burn's matmul would first
    /// copy the transposed `[hidden, vocab]` matrix, a fixed cost of every
    /// step whatever its tokens.
    fn tied_logits(
        hidden: Tensor<Self, 2>,
        embedding: Tensor<Self, 2>,
        bias: Tensor<Self, 1>,
    ) -> Tensor<Self, 2> {
        let (h, e, b) = (shared(hidden), shared(embedding), shared(bias));
        let (h, e) = (matrix(&h), matrix(&e));
        let mut out = ndarray::Array2::<f32>::zeros((h.nrows(), e.nrows()));
        if let Some(b) = b.as_slice_memory_order() {
            out.rows_mut()
                .into_iter()
                .for_each(|mut row| row.iter_mut().zip(b).for_each(|(o, b)| *o = *b));
        }
        product(1.0, h, e.t(), 1.0, out.view_mut(), Threads::Pool);
        from_owned(out.into_dyn())
    }

    /// Rows in chunks: one chunk's logits exist at a time, turned in place
    /// into `softmax − one-hot`, multiplied into the gradients and dropped.
    fn tied_cross_entropy(
        hidden: Tensor<Self, 2>,
        embedding: Tensor<Self, 2>,
        bias: Tensor<Self, 1>,
        targets: &[u32],
    ) -> CrossEntropyGrads<Self> {
        let (h, e, b) = (shared(hidden), shared(embedding), shared(bias));
        let (h, e) = (matrix(&h), matrix(&e));
        let b = b.as_slice_memory_order().unwrap_or(&[]);
        let (loss, dh, de, db) = cpu_head::cross_entropy(h, e, b, targets);
        CrossEntropyGrads {
            loss_sum: from_owned(ndarray::arr1(&[loss]).into_dyn()),
            d_hidden: from_owned(dh.into_dyn()),
            d_embedding: from_owned(de.into_dyn()),
            d_bias: from_owned(db.into_dyn()),
        }
    }

    fn tied_logits_backward(
        hidden: Tensor<Self, 2>,
        embedding: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
    ) -> (Tensor<Self, 2>, Tensor<Self, 2>, Tensor<Self, 1>) {
        let (h, e, g) = (shared(hidden), shared(embedding), shared(grad));
        let (h, e, g) = (matrix(&h), matrix(&e), matrix(&g));
        let d_hidden = product_new(1.0, g, e, Threads::Pool);
        let d_embedding = product_new(1.0, g.t(), h, Threads::Pool);
        let d_bias = g.sum_axis(ndarray::Axis(0));
        (
            from_owned(d_hidden.into_dyn()),
            from_owned(d_embedding.into_dyn()),
            from_owned(d_bias.into_dyn()),
        )
    }

    /// Two passes over the tensor in place (moments and `r`, then the
    /// parameter) instead of a dozen tensor operations each allocating a
    /// tensor of its size; exact division throughout.
    fn stable_adamw_update(
        param: Tensor<Self, 1>,
        (exp_avg, exp_avg_sq): (Tensor<Self, 1>, Tensor<Self, 1>),
        grad: Tensor<Self, 1>,
        u: &AdamWUpdate,
    ) -> AdamWStep<Self> {
        let (mut p, mut m, mut v) = (owned(param), owned(exp_avg), owned(exp_avg_sq));
        let g = shared(grad);
        let (rms, grad_sq_sum) = match (
            p.as_slice_memory_order_mut(),
            m.as_slice_memory_order_mut(),
            v.as_slice_memory_order_mut(),
            g.as_slice_memory_order(),
        ) {
            (Some(p), Some(m), Some(v), Some(g)) => cpu_optim::update(p, m, v, g, u),
            _ => (f32::NAN, f32::NAN),
        };
        let scalar = |x: f32| Tensor::from_data(TensorData::new(vec![x], [1]), &Default::default());
        AdamWStep {
            param: from_owned(p),
            exp_avg: from_owned(m),
            exp_avg_sq: from_owned(v),
            rms: scalar(rms),
            grad_sq_sum: scalar(grad_sq_sum),
        }
    }

    fn block_attention_forward(
        plan: &AttentionPlan,
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
    ) -> (Tensor<Self, 3>, Tensor<Self, 2>) {
        let [n, h, hd] = q.dims();
        let (q, k, v) = (shared(q), shared(k), shared(v));
        let (out, lse) = cpu::forward(plan, tokens_heads(&q), tokens_heads(&k), tokens_heads(&v));
        (device_tensor(out, [n, h, hd]), device_tensor(lse, [n, h]))
    }

    fn block_attention_backward(
        plan: &AttentionPlan,
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
        out: Tensor<Self, 3>,
        lse: Tensor<Self, 2>,
        grad: Tensor<Self, 3>,
    ) -> (Tensor<Self, 3>, Tensor<Self, 3>, Tensor<Self, 3>) {
        let ([nq, h, hd], [nk, _, _]) = (q.dims(), k.dims());
        let [q, k, v, out, grad] = [q, k, v, out, grad].map(shared);
        let lse = shared(lse);
        let (dq, dk, dv) = cpu::backward(
            plan,
            [&q, &k, &v, &out, &grad].map(tokens_heads),
            matrix(&lse),
        );
        (
            device_tensor(dq, [nq, h, hd]),
            device_tensor(dk, [nk, h, hd]),
            device_tensor(dv, [nk, h, hd]),
        )
    }
}

#[cfg(feature = "cuda")]
impl<B: burn_fusion::FusionBackend> ModelBackend for burn_fusion::Fusion<B> {}

/// Hands each of a node's gradients to its parent, skipping parents that
/// need none (the caller's `B` is the inner backend).
macro_rules! register_parents {
    ($grads:expr, $parents:expr, $values:expr) => {
        for (parent, g) in $parents.into_iter().zip($values) {
            if let Some(node) = parent {
                $grads.register::<B>(node.id, g);
            }
        }
    };
}

/// The autodiff node of [`ModelBackend::block_attention`].
#[derive(Debug)]
struct BlockAttentionBackward;

/// What the backward needs: the inputs, the output and its log-sum-exp.
#[derive(Debug, Clone)]
struct BlockAttentionState<B: Backend> {
    plan: Arc<AttentionPlan>,
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
}

fn float<B: Backend, const D: usize>(primitive: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

fn primitive<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> FloatTensor<B> {
    tensor.into_primitive().tensor()
}

impl<B: ModelBackend> Backward<B, 3> for BlockAttentionBackward {
    type State = BlockAttentionState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let (dq, dk, dv) = B::block_attention_backward(
            &s.plan,
            float(s.q),
            float(s.k),
            float(s.v),
            float(s.out),
            float(s.lse),
            float(grad),
        );
        register_parents!(
            grads,
            ops.parents,
            [primitive(dq), primitive(dk), primitive(dv)]
        );
    }
}

impl<B: ModelBackend, C: CheckpointStrategy> ModelBackend for Autodiff<B, C> {
    const NATIVE_BF16: bool = B::NATIVE_BF16;

    /// Rounds the inner value; the gradient passes through unchanged.
    fn round_bf16<const D: usize>(x: Tensor<Self, D>) -> Tensor<Self, D> {
        let rounded = B::round_bf16(x.clone().inner());
        let detached = Tensor::<Self, D>::from_inner(rounded - x.clone().inner());
        x + detached
    }

    fn exact_layer_norm<const D: usize>(
        x: Tensor<Self, D>,
        gamma: Tensor<Self, 1>,
        eps: f64,
    ) -> Tensor<Self, D> {
        let (x, g) = (primitive(x), primitive(gamma));
        let nodes = [x.node.clone(), g.node.clone()];
        let (y, normed, rstd) =
            layer_norm::<B, D>(float(x.primitive), float(g.primitive.clone()), eps);
        let output = match LayerNormBackward::<D>
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                (primitive(normed), primitive(rstd), g.primitive),
                primitive(y),
            ),
            OpsKind::UnTracked(prep) => prep.finish(primitive(y)),
        };
        float(output)
    }

    /// One node whose backward scales the gradients the forward computed.
    /// The gradients returned here are the inner ones, untracked.
    fn tied_cross_entropy(
        hidden: Tensor<Self, 2>,
        embedding: Tensor<Self, 2>,
        bias: Tensor<Self, 1>,
        targets: &[u32],
    ) -> CrossEntropyGrads<Self> {
        let (h, e, b) = (primitive(hidden), primitive(embedding), primitive(bias));
        let nodes = [h.node.clone(), e.node.clone(), b.node.clone()];
        let inner = B::tied_cross_entropy(
            float(h.primitive),
            float(e.primitive),
            float(b.primitive),
            targets,
        );
        let loss = primitive(inner.loss_sum.clone());
        let output = match CrossEntropyBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                (
                    primitive(inner.d_hidden.clone()),
                    primitive(inner.d_embedding.clone()),
                    primitive(inner.d_bias.clone()),
                ),
                loss,
            ),
            OpsKind::UnTracked(prep) => prep.finish(loss),
        };
        CrossEntropyGrads {
            loss_sum: float(output),
            d_hidden: Tensor::from_inner(inner.d_hidden),
            d_embedding: Tensor::from_inner(inner.d_embedding),
            d_bias: Tensor::from_inner(inner.d_bias),
        }
    }

    fn token_embedding(weights: Tensor<Self, 2>, ids: Tensor<Self, 2, Int>) -> Tensor<Self, 3> {
        let w = primitive(weights);
        let vocab = float::<B, 2>(w.primitive.clone()).dims()[0];
        let ids = Tensor::<B, 2, Int>::from_primitive(ids.into_primitive());
        let output = match EmbeddingBackward
            .prepare::<C>([w.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::token_embedding(float(w.primitive), ids.clone());
                prep.finish((vocab, ids.into_primitive()), primitive(out))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(primitive(B::token_embedding(float(w.primitive), ids)))
            }
        };
        float(output)
    }

    fn dense(x: Tensor<Self, 2>, weight: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let (x, w) = (primitive(x), primitive(weight));
        let nodes = [x.node.clone(), w.node.clone()];
        let output = match DenseBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::dense(float(x.primitive.clone()), float(w.primitive.clone()));
                prep.finish((x.primitive, w.primitive), primitive(out))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(primitive(B::dense(float(x.primitive), float(w.primitive))))
            }
        };
        float(output)
    }

    fn tied_logits(
        hidden: Tensor<Self, 2>,
        embedding: Tensor<Self, 2>,
        bias: Tensor<Self, 1>,
    ) -> Tensor<Self, 2> {
        let (h, e, b) = (primitive(hidden), primitive(embedding), primitive(bias));
        let nodes = [h.node.clone(), e.node.clone(), b.node.clone()];
        let output = match TiedLogitsBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::tied_logits(
                    float(h.primitive.clone()),
                    float(e.primitive.clone()),
                    float(b.primitive),
                );
                prep.finish((h.primitive, e.primitive), primitive(out))
            }
            OpsKind::UnTracked(prep) => {
                let out =
                    B::tied_logits(float(h.primitive), float(e.primitive), float(b.primitive));
                prep.finish(primitive(out))
            }
        };
        float(output)
    }

    fn exact_gelu<const D: usize>(x: Tensor<Self, D>) -> Tensor<Self, D> {
        let x = primitive(x);
        let output = match GeluBackward::<D>
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::exact_gelu(float::<B, D>(x.primitive.clone()));
                prep.finish(x.primitive, primitive(out))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(primitive(B::exact_gelu(float::<B, D>(x.primitive))))
            }
        };
        float(output)
    }

    fn block_attention(
        plan: &Arc<AttentionPlan>,
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
    ) -> Tensor<Self, 3> {
        let (q, k, v) = (primitive(q), primitive(k), primitive(v));
        let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
        let (qi, ki, vi) = (q.primitive, k.primitive, v.primitive);
        let output = match BlockAttentionBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (out, lse) = B::block_attention_forward(
                    plan,
                    float(qi.clone()),
                    float(ki.clone()),
                    float(vi.clone()),
                );
                let out = primitive(out);
                let state = BlockAttentionState {
                    plan: Arc::clone(plan),
                    q: qi,
                    k: ki,
                    v: vi,
                    out: out.clone(),
                    lse: primitive(lse),
                };
                prep.finish(state, out)
            }
            OpsKind::UnTracked(prep) => {
                let out = B::block_attention(plan, float(qi), float(ki), float(vi));
                prep.finish(primitive(out))
            }
        };
        float(output)
    }
}

/// The autodiff node of [`ModelBackend::exact_layer_norm`]: keeps `x̂`,
/// `1/σ` and `γ`.
#[derive(Debug)]
struct LayerNormBackward<const D: usize>;

impl<B: ModelBackend, const D: usize> Backward<B, 2> for LayerNormBackward<D> {
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = float::<B, D>(grads.consume::<B>(&ops.node));
        let (normed, rstd, gamma) = ops.state;
        let (dx, d_gamma) = layer_norm_backward(float(normed), float(rstd), float(gamma), grad);
        register_parents!(grads, ops.parents, [primitive(dx), primitive(d_gamma)]);
    }
}

/// The autodiff node of [`ModelBackend::tied_cross_entropy`]: holds the
/// gradients for a loss gradient of 1.
#[derive(Debug)]
struct CrossEntropyBackward;

impl<B: ModelBackend> Backward<B, 3> for CrossEntropyBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        // The output is the scalar loss sum: its gradient scales all three.
        let scale = float::<B, 1>(grads.consume::<B>(&ops.node));
        let (dh, de, db) = ops.state;
        let matrix_scale = scale.clone().reshape([1, 1]);
        let scaled = [
            primitive(float::<B, 2>(dh) * matrix_scale.clone()),
            primitive(float::<B, 2>(de) * matrix_scale),
            primitive(float::<B, 1>(db) * scale),
        ];
        register_parents!(grads, ops.parents, scaled);
    }
}

/// The autodiff node of [`ModelBackend::tied_logits`]: keeps the hidden
/// states and the embedding (a reference, not a copy).
#[derive(Debug)]
struct TiedLogitsBackward;

impl<B: ModelBackend> Backward<B, 3> for TiedLogitsBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (hidden, embedding) = ops.state;
        let (dh, de, db) = B::tied_logits_backward(float(hidden), float(embedding), float(grad));
        register_parents!(
            grads,
            ops.parents,
            [primitive(dh), primitive(de), primitive(db)]
        );
    }
}

/// The autodiff node of [`ModelBackend::dense`]: keeps the input and the
/// weight (references, not copies).
#[derive(Debug)]
struct DenseBackward;

impl<B: ModelBackend> Backward<B, 2> for DenseBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight) = ops.state;
        let (dx, dw) = B::dense_backward(float(x), float(weight), float(grad));
        register_parents!(grads, ops.parents, [primitive(dx), primitive(dw)]);
    }
}

/// The autodiff node of [`ModelBackend::token_embedding`]: keeps the ids.
#[derive(Debug)]
struct EmbeddingBackward;

impl<B: ModelBackend> Backward<B, 1> for EmbeddingBackward {
    type State = (usize, burn::tensor::ops::IntTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (vocab, ids) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            primitive(B::token_embedding_backward(
                vocab,
                Tensor::from_primitive(ids),
                float(grad),
            ))
        });
    }
}

/// The autodiff node of [`ModelBackend::exact_gelu`]: keeps the input.
#[derive(Debug)]
struct GeluBackward<const D: usize>;

impl<B: ModelBackend, const D: usize> Backward<B, 1> for GeluBackward<D> {
    type State = FloatTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let x = float::<B, D>(ops.state);
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            primitive(float::<B, D>(grad) * gelu_derivative(x))
        });
    }
}

/// `d/dx x·Φ(x) = Φ(x) + x·φ(x)`.
pub fn gelu_derivative<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let cdf = x
        .clone()
        .mul_scalar(std::f64::consts::FRAC_1_SQRT_2)
        .erf()
        .add_scalar(1.0)
        .mul_scalar(0.5);
    let pdf = x
        .clone()
        .powi_scalar(2)
        .mul_scalar(-0.5)
        .exp()
        .mul_scalar(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
    cdf + x * pdf
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuAutodiff as A;

    /// The derivative of the exact GELU, in f64.
    fn exact(x: f64) -> f64 {
        let cdf = 0.5 * (1.0 + libm_erf(x / std::f64::consts::SQRT_2));
        cdf + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
    }

    /// erf by its series (|x| ≤ 3 here), so the reference does not share
    /// the backend's erf.
    fn libm_erf(x: f64) -> f64 {
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    }

    #[test]
    fn cpu_tied_logits_equal_the_tensor_version() {
        use rand::{Rng, SeedableRng};
        type B = crate::CpuBackend;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let mut t = |shape: [usize; 2]| {
            let values: Vec<f32> = (0..shape[0] * shape[1])
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            Tensor::<B, 2>::from_data(TensorData::new(values, shape), &Default::default())
        };
        let (h, e, g) = (t([7, 16]), t([50, 16]), t([7, 50]));
        let b = t([1, 50]).reshape([50]);
        let close = |a: Vec<f32>, b: Vec<f32>| {
            a.iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        };
        let host = |x: Tensor<B, 2>| x.into_data().into_vec::<f32>().expect("f32");
        let got = B::tied_logits(h.clone(), e.clone(), b.clone());
        let want = tied_logits(h.clone(), e.clone(), b);
        assert!(close(host(got), host(want)) < 1e-5);
        let (dh, de, db) = B::tied_logits_backward(h.clone(), e.clone(), g.clone());
        let (wh, we, wb) = tied_logits_backward(h, e, g);
        assert!(close(host(dh), host(wh)) < 1e-5);
        assert!(close(host(de), host(we)) < 1e-5);
        assert!(close(host(db.reshape([1, 50])), host(wb.reshape([1, 50]))) < 1e-5);
    }

    #[test]
    fn cpu_dense_and_its_gradients_equal_burns_matmul() {
        use rand::{Rng, SeedableRng};
        type B = crate::CpuBackend;
        type A = crate::CpuAutodiff;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut values =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
        let (xv, wv, gv) = (values(9 * 24), values(24 * 40), values(9 * 40));
        let host = |x: Tensor<B, 2>| x.into_data().into_vec::<f32>().expect("f32");
        let gap = |a: Vec<f32>, b: Vec<f32>| {
            a.iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        };
        let run = |custom: bool| {
            let dev = Default::default();
            let x = Tensor::<A, 2>::from_data(TensorData::new(xv.clone(), [9, 24]), &dev)
                .require_grad();
            // The weight as a transposed view, as the backward meets it.
            let w = Tensor::<A, 2>::from_data(TensorData::new(wv.clone(), [40, 24]), &dev)
                .require_grad();
            let y = if custom {
                A::dense(x.clone(), w.clone().transpose())
            } else {
                x.clone().matmul(w.clone().transpose())
            };
            let g = Tensor::<A, 2>::from_data(TensorData::new(gv.clone(), [9, 40]), &dev);
            let grads = (y.clone() * g).sum().backward();
            let dx = x.grad(&grads).expect("dx");
            let dw = w.grad(&grads).expect("dw");
            (host(y.inner()), host(dx), host(dw))
        };
        let (got, want) = (run(true), run(false));
        assert!(gap(got.0, want.0) < 1e-5, "forward");
        assert!(gap(got.1, want.1) < 1e-5, "input gradient");
        assert!(gap(got.2, want.2) < 1e-5, "weight gradient");
    }

    #[test]
    fn cpu_cross_entropy_equals_the_tensor_version() {
        use rand::{Rng, SeedableRng};
        type B = crate::CpuBackend;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        // More rows than one chunk, so chunks are stitched together.
        let (rows, vocab, width) = (300, 70, 8);
        let mut t = |shape: [usize; 2], scale: f32| {
            let values: Vec<f32> = (0..shape[0] * shape[1])
                .map(|_| rng.random_range(-1.0f32..1.0) * scale)
                .collect();
            Tensor::<B, 2>::from_data(TensorData::new(values, shape), &Default::default())
        };
        let (h, e) = (t([rows, width], 2.0), t([vocab, width], 2.0));
        let b = t([1, vocab], 1.0).reshape([vocab]);
        let targets: Vec<u32> = (0..rows).map(|i| (i * 7 % vocab) as u32).collect();
        let got = B::tied_cross_entropy(h.clone(), e.clone(), b.clone(), &targets);
        let want = tied_cross_entropy(h, e, b, &targets);
        let host = |x: Tensor<B, 2>| x.into_data().into_vec::<f32>().expect("f32");
        let diff = |a: Vec<f32>, b: Vec<f32>| {
            a.iter()
                .zip(&b)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        };
        let (l1, l2) = (got.loss_sum.into_scalar(), want.loss_sum.into_scalar());
        assert!((l1 - l2).abs() < 1e-5 * l2.abs(), "loss {l1} vs {l2}");
        assert!(diff(host(got.d_hidden), host(want.d_hidden)) < 1e-5);
        assert!(diff(host(got.d_embedding), host(want.d_embedding)) < 1e-4);
        let bias = |x: Tensor<B, 1>| host(x.reshape([1, vocab]));
        assert!(diff(bias(got.d_bias), bias(want.d_bias)) < 1e-4);
    }

    /// LayerNorm's gradients against an f64 computation: `dx` per element
    /// to 2e-6 relative, `dγ` (a sum over rows) to f32 summation noise.
    #[test]
    fn layer_norm_gradients_are_exact() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        let (rows, h, eps) = (512usize, 64usize, 1e-5);
        let mut draw = |n: usize, lo: f32, hi: f32| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(lo..hi)).collect()
        };
        let (xs, gs, dys) = (
            draw(rows * h, -3.0, 3.0),
            draw(h, 0.5, 1.5),
            draw(rows * h, -1.0, 1.0),
        );
        let d = Default::default();
        let x =
            Tensor::<A, 2>::from_data(TensorData::new(xs.clone(), [rows, h]), &d).require_grad();
        let gamma = Tensor::<A, 1>::from_data(TensorData::new(gs.clone(), [h]), &d).require_grad();
        let dy = Tensor::<A, 2>::from_data(TensorData::new(dys.clone(), [rows, h]), &d);
        let grads = (A::exact_layer_norm(x.clone(), gamma.clone(), eps) * dy)
            .sum()
            .backward();
        let dx: Vec<f32> = x
            .grad(&grads)
            .expect("dx")
            .into_data()
            .into_vec()
            .expect("f32");
        let dg: Vec<f32> = gamma
            .grad(&grads)
            .expect("dg")
            .into_data()
            .into_vec()
            .expect("f32");
        let mut want_dg = vec![0f64; h];
        let mut magnitude = vec![0f64; h];
        for r in 0..rows {
            let row: Vec<f64> = xs[r * h..(r + 1) * h]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let mean = row.iter().sum::<f64>() / h as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / h as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            let xhat: Vec<f64> = row.iter().map(|v| (v - mean) * rstd).collect();
            let g: Vec<f64> = (0..h)
                .map(|i| f64::from(dys[r * h + i]) * f64::from(gs[i]))
                .collect();
            let mean_g = g.iter().sum::<f64>() / h as f64;
            let mean_gx = g.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / h as f64;
            for i in 0..h {
                let want = (g[i] - mean_g - xhat[i] * mean_gx) * rstd;
                let got = f64::from(dx[r * h + i]);
                assert!(
                    (got - want).abs() <= 2e-6 * want.abs().max(1.0),
                    "dx[{r},{i}] {got} vs {want}"
                );
                want_dg[i] += f64::from(dys[r * h + i]) * xhat[i];
                magnitude[i] += (f64::from(dys[r * h + i]) * xhat[i]).abs();
            }
        }
        for ((got, want), size) in dg.iter().zip(&want_dg).zip(&magnitude) {
            assert!(
                (f64::from(*got) - want).abs() <= 1e-6 * size,
                "dγ {got} vs {want}"
            );
        }
    }

    #[test]
    fn gelu_gradient_is_the_exact_derivative() {
        let xs: Vec<f32> = (-30..=30).map(|i| i as f32 * 0.1).collect();
        let n = xs.len();
        let x = Tensor::<A, 1>::from_data(TensorData::new(xs.clone(), [n]), &Default::default())
            .require_grad();
        let grads = A::exact_gelu(x.clone()).sum().backward();
        let got: Vec<f32> = x
            .grad(&grads)
            .expect("grad")
            .into_data()
            .into_vec()
            .expect("f32");
        for (x, g) in xs.iter().zip(got) {
            let want = exact(f64::from(*x));
            // Burn's own GELU backward (the tanh approximation's
            // derivative) is off by up to 8.7e-4 here.
            assert!((f64::from(g) - want).abs() < 2e-6, "x {x}: {g} vs {want}");
        }
    }

    #[test]
    fn token_embedding_gradient_equals_burns_embedding() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let mut floats =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let device = Default::default();
        let weights =
            Tensor::<Cpu, 2>::from_data(TensorData::new(floats(11 * 4), [11, 4]), &device);
        let r = Tensor::<A, 3>::from_data(TensorData::new(floats(2 * 3 * 4), [2, 3, 4]), &device);
        // Repeated ids: their rows add up.
        let ids = Tensor::<A, 2, Int>::from_data(
            TensorData::new(vec![1i64, 3, 3, 0, 10, 3], [2, 3]),
            &device,
        );
        let grad_of = |ours: bool| {
            let w = Tensor::<A, 2>::from_inner(weights.clone()).require_grad();
            let out = if ours {
                A::token_embedding(w.clone(), ids.clone())
            } else {
                burn::tensor::module::embedding(w.clone(), ids.clone())
            };
            let grads = (out.clone() * r.clone()).sum().backward();
            let g = w.grad(&grads).expect("weights have a gradient");
            (out.inner().into_data(), g.into_data())
        };
        let (ours, burns) = (grad_of(true), grad_of(false));
        ours.0
            .assert_approx_eq::<f32>(&burns.0, burn::tensor::Tolerance::absolute(1e-7));
        ours.1
            .assert_approx_eq::<f32>(&burns.1, burn::tensor::Tolerance::absolute(1e-6));
        // Rows never looked up get exactly zero.
        let g = ours.1.to_vec::<f32>().expect("f32");
        assert!(g[2 * 4..3 * 4].iter().all(|x| *x == 0.0));
    }
}
