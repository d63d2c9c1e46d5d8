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

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};

use super::attention::{self, AttentionPlan, cpu};

/// What the model needs of a backend beyond Burn's own operations: blocked
/// attention, plain on inference backends and as one autodiff node with a
/// recomputing backward under [`Autodiff`], and GELU with its exact
/// derivative. The provided methods are the tensor versions; the CPU
/// backend replaces attention's with a host kernel that reuses its buffers.
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

    /// GELU, exact erf form: `x · Φ(x)`.
    fn exact_gelu<const D: usize>(x: Tensor<Self, D>) -> Tensor<Self, D> {
        burn::tensor::activation::gelu(x)
    }
}

type Cpu = burn::backend::NdArray<f32>;

fn host<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().unwrap_or_default()
}

fn device_tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<Cpu, D> {
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

impl ModelBackend for Cpu {
    fn block_attention_forward(
        plan: &AttentionPlan,
        q: Tensor<Self, 3>,
        k: Tensor<Self, 3>,
        v: Tensor<Self, 3>,
    ) -> (Tensor<Self, 3>, Tensor<Self, 2>) {
        let [n, h, hd] = q.dims();
        let (out, lse) = cpu::forward(plan, &host(q), &host(k), &host(v), h, hd);
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
        let (q, k, v, out, lse, grad) =
            (host(q), host(k), host(v), host(out), host(lse), host(grad));
        let (dq, dk, dv) = cpu::backward(plan, [&q, &k, &v, &out, &lse, &grad], h, hd);
        (
            device_tensor(dq, [nq, h, hd]),
            device_tensor(dk, [nk, h, hd]),
            device_tensor(dv, [nk, h, hd]),
        )
    }
}

#[cfg(feature = "cuda")]
impl<B: burn_fusion::FusionBackend> ModelBackend for burn_fusion::Fusion<B> {}

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
        let [node_q, node_k, node_v] = ops.parents;
        for (node, g) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, primitive(g));
            }
        }
    }
}

impl<B: ModelBackend, C: CheckpointStrategy> ModelBackend for Autodiff<B, C> {
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
}
