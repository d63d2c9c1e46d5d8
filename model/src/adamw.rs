//! One tensor's StableAdamW update, the operation the optimizer
//! (`twinhead-worker`'s `optim`) asks of a backend: as tensor operations
//! that every backend runs, and on the CPU as two in-place passes over host
//! slices. The formula is in `optim`'s documentation.

use burn::prelude::Backend;
use burn::tensor::Tensor;

/// The scalars of one tensor's update at one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWUpdate {
    /// Debiased β1 and β2 of this step.
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// This step's learning rate.
    pub lr: f64,
    /// `weight_decay / max_lr`, or 0 for a tensor without decay.
    pub decay_per_lr: f64,
    /// The gradient is `grad × grad_scale`.
    pub grad_scale: f64,
}

/// What one tensor's update produced.
#[derive(Debug, Clone)]
pub struct AdamWStep<B: Backend> {
    /// The updated parameter.
    pub param: Tensor<B, 1>,
    /// The updated moments.
    pub exp_avg: Tensor<B, 1>,
    pub exp_avg_sq: Tensor<B, 1>,
    /// `√r`, `[1]`.
    pub rms: Tensor<B, 1>,
    /// `Σ (grad × grad_scale)²`, `[1]`: the tensor's share of the squared
    /// gradient norm, found in the same pass.
    pub grad_sq_sum: Tensor<B, 1>,
}

/// One tensor's StableAdamW update as tensor operations (the form every
/// backend can run).
pub fn stable_adamw_update<B: Backend>(
    param: Tensor<B, 1>,
    (exp_avg, exp_avg_sq): (Tensor<B, 1>, Tensor<B, 1>),
    grad: Tensor<B, 1>,
    u: &AdamWUpdate,
) -> AdamWStep<B> {
    let grad = if u.grad_scale == 1.0 {
        grad
    } else {
        grad.mul_scalar(u.grad_scale as f32)
    };
    let g2 = grad.clone().square();
    let grad_sq_sum = g2.clone().sum();
    let exp_avg = exp_avg.mul_scalar(u.beta1) + grad.mul_scalar(1.0 - u.beta1);
    let exp_avg_sq = exp_avg_sq.mul_scalar(u.beta2) + g2.clone().mul_scalar(1.0 - u.beta2);
    // r with the new v; lr_t = lr / max(1, √r), all on the device.
    let rms = (g2 / exp_avg_sq.clone().clamp_min(u.eps * u.eps))
        .mean()
        .sqrt();
    let lr_t = rms.clone().clamp_min(1.0).recip().mul_scalar(u.lr);
    let mut p = param;
    if u.decay_per_lr != 0.0 {
        let keep = lr_t.clone().mul_scalar(-u.decay_per_lr).add_scalar(1.0);
        p = p * keep;
    }
    let update = exp_avg.clone() / exp_avg_sq.clone().sqrt().add_scalar(u.eps);
    AdamWStep {
        param: p - update * lr_t,
        exp_avg,
        exp_avg_sq,
        rms,
        grad_sq_sum,
    }
}

/// The CPU backend's update, on host slices in place.
pub mod cpu {
    use rayon::prelude::*;

    use super::AdamWUpdate;

    /// Values per parallel chunk: fixed, so that the sum of `r` is added in
    /// the same order whatever the number of threads.
    const CHUNK: usize = 1 << 16;

    /// Updates `p`, `m`, `v` from `g`; returns `√r` and `Σ (g × grad_scale)²`.
    pub fn update(
        p: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        g: &[f32],
        u: &AdamWUpdate,
    ) -> (f32, f32) {
        let n = p.len();
        if n == 0 || m.len() != n || v.len() != n || g.len() != n {
            return (f32::NAN, f32::NAN);
        }
        let (b1, b2) = (u.beta1 as f32, u.beta2 as f32);
        let (c1, c2) = ((1.0 - u.beta1) as f32, (1.0 - u.beta2) as f32);
        let eps = u.eps as f32;
        let eps_sq = (u.eps * u.eps) as f32;
        let scale = u.grad_scale as f32;
        let k = MomentConstants {
            b1,
            b2,
            c1,
            c2,
            eps_sq,
            scale,
        };
        let partial: Vec<(f64, f64)> = m
            .par_chunks_mut(CHUNK)
            .zip(v.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .map(|((m, v), g)| moments(m, v, g, k))
            .collect();
        let r: f64 = partial.iter().map(|(r, _)| r).sum();
        let sq: f64 = partial.iter().map(|(_, sq)| sq).sum();
        let rms = (r / n as f64).sqrt() as f32;
        let lr_t = u.lr as f32 / rms.max(1.0);
        let keep = 1.0 - lr_t * u.decay_per_lr as f32;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK))
            .zip(v.par_chunks(CHUNK))
            .for_each(|((p, m), v)| apply(p, m, v, [keep, lr_t, eps]));
        (rms, sq as f32)
    }

    #[derive(Clone, Copy)]
    struct MomentConstants {
        b1: f32,
        b2: f32,
        c1: f32,
        c2: f32,
        eps_sq: f32,
        scale: f32,
    }

    crate::rowwise::widest! {
        /// One chunk's moments; returns its `Σ g²/max(v, ε²)` and `Σ g²`
        /// (of the scaled gradient), summed in fixed lanes.
        fn moments(m: &mut [f32], v: &mut [f32], g: &[f32], k: MomentConstants) -> (f64, f64) = moments_body
    }

    crate::rowwise::widest! {
        /// One chunk's weights: `p ← p·keep − lr_t · m / (√v + ε)`.
        fn apply(p: &mut [f32], m: &[f32], v: &[f32], c: [f32; 3]) -> () = apply_body
    }

    #[inline(always)]
    fn moments_body(m: &mut [f32], v: &mut [f32], g: &[f32], k: MomentConstants) -> (f64, f64) {
        const LANES: usize = crate::rowwise::LANES;
        let (mut r, mut sq) = ([0f32; LANES], [0f32; LANES]);
        let step = |m: &mut f32, v: &mut f32, g: f32, r: &mut f32, sq: &mut f32| {
            let g = g * k.scale;
            let g2 = g * g;
            *m = *m * k.b1 + g * k.c1;
            *v = *v * k.b2 + g2 * k.c2;
            *r += g2 / if *v > k.eps_sq { *v } else { k.eps_sq };
            *sq += g2;
        };
        let whole = m.len() / LANES * LANES;
        let (m_head, m_tail) = m.split_at_mut(whole);
        let (v_head, v_tail) = v.split_at_mut(whole);
        let (g_head, g_tail) = g.split_at(whole.min(g.len()));
        for ((m, v), g) in m_head
            .chunks_exact_mut(LANES)
            .zip(v_head.chunks_exact_mut(LANES))
            .zip(g_head.chunks_exact(LANES))
        {
            for i in 0..LANES {
                step(&mut m[i], &mut v[i], g[i], &mut r[i], &mut sq[i]);
            }
        }
        let (mut r_tail, mut sq_tail) = (0f32, 0f32);
        for ((m, v), &g) in m_tail.iter_mut().zip(v_tail.iter_mut()).zip(g_tail) {
            step(m, v, g, &mut r_tail, &mut sq_tail);
        }
        let total = |lanes: [f32; LANES], tail: f32| {
            lanes.iter().fold(0f64, |s, &x| s + f64::from(x)) + f64::from(tail)
        };
        (total(r, r_tail), total(sq, sq_tail))
    }

    #[inline(always)]
    fn apply_body(p: &mut [f32], m: &[f32], v: &[f32], [keep, lr_t, eps]: [f32; 3]) {
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            *p = *p * keep - lr_t * (m / (v.sqrt() + eps));
        }
    }
}
