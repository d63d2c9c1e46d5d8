//! StableAdamW (Wortsman et al. 2023) as Ettin trained with it: the optimi
//! implementation with fully LR-decoupled weight decay (`decouple_lr=True`),
//! with the moments on the weights' device (any Burn backend).
//!
//! Per tensor, at step `t` (1-based), with the learning rate `lr` of this
//! step and the schedule's peak `max_lr`:
//!
//! ```text
//! β̂1 = debias(β1, t), β̂2 = debias(β2, t)      debias(β, t) = (β^t − β) / (β^t − 1)  (0 at t = 1)
//! m ← β̂1·m + (1 − β̂1)·g
//! v ← β̂2·v + (1 − β̂2)·g²
//! r = mean(g² / max(v, eps²))                   (with the new v)
//! lr_t = lr / max(1, √r)                        (update clipping; replaces gradient clipping)
//! p ← p·(1 − (lr_t / max_lr)·wd)                (only tensors with `decay`)
//! p ← p − lr_t·m / (√v + eps)
//! ```
//!
//! The "debiased betas" keep `m` and `v` equal to Adam's bias-corrected
//! `m̂`, `v̂` at every step (ETTIN-NOTES.md: B24 `src/optimizer.py`, optimi
//! `stableadamw.py`), so no separate bias correction is applied. Defaults:
//! betas (0.9, 0.98), eps 1e-6. Ettin uses no gradient clipping; optional
//! global-norm clipping is provided and off by default. Weight decay goes on
//! matrices only: pass `decay: false` for tensors with ≤ 1 dimension and
//! for biases ([`TensorSpec::for_shape`]).

use burn::prelude::Backend;
use burn::tensor::{Tensor, TensorData};

use twinhead_model::ModelBackend;
use twinhead_model::adamw::AdamWUpdate;

/// Hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct StableAdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Weight decay is scaled by `lr_t / max_lr`. optimi defaults it to the
    /// LR the optimizer was built with, which in Ettin's yamls is the LR at
    /// the start of the phase: peak × [`LrSchedule::start_factor`] (so
    /// 0.5 × peak in the decay phase, whose yaml `lr` is halved).
    ///
    /// [`LrSchedule::start_factor`]: crate::schedule::LrSchedule::start_factor
    pub max_lr: f64,
    /// Clip the global gradient norm to this value (off by default).
    pub max_grad_norm: Option<f64>,
}

impl StableAdamWConfig {
    /// Refuses values outside each hyper-parameter's range, naming it.
    pub fn validate(&self) -> Result<(), OptimError> {
        let checks = [
            ("beta1", self.beta1, (0.0..1.0).contains(&self.beta1)),
            ("beta2", self.beta2, (0.0..1.0).contains(&self.beta2)),
            ("eps", self.eps, self.eps >= 0.0),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0.0),
            ("max_lr", self.max_lr, self.max_lr > 0.0),
            (
                "max_grad_norm",
                self.max_grad_norm.unwrap_or(1.0),
                self.max_grad_norm.is_none_or(|m| m > 0.0),
            ),
        ];
        for (name, value, ok) in checks {
            if !ok || !value.is_finite() {
                return Err(OptimError::BadConfig { name, value });
            }
        }
        Ok(())
    }

    pub fn new(max_lr: f64, weight_decay: f64) -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay,
            max_lr,
            max_grad_norm: None,
        }
    }
}

/// What the optimizer needs to know about one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorSpec {
    pub len: usize,
    pub decay: bool,
}

impl TensorSpec {
    /// Ettin's rule (`filter_bias_norm_wd`): no decay for tensors with at
    /// most one dimension or whose name ends in `.bias`/`bias`.
    pub fn for_shape(name: &str, shape: &[usize]) -> Self {
        Self {
            len: shape.iter().product(),
            decay: shape.len() > 1 && !name.ends_with("bias"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptimError {
    #[error("optimizer: expected {expected} tensors, got {got}")]
    TensorCount { expected: usize, got: usize },
    #[error("optimizer: tensor {index} has {got} values, expected {expected}")]
    TensorLen {
        index: usize,
        expected: usize,
        got: usize,
    },
    #[error("optimizer: the gradient buffer has {got} values, the tensors {expected}")]
    GradientLen { expected: usize, got: usize },
    #[error("optimizer: bad hyper-parameter {name} = {value}")]
    BadConfig { name: &'static str, value: f64 },
}

/// What one step did, as one-element tensors on the optimizer's device so
/// that reading them is the caller's choice (one host sync per read).
#[derive(Debug, Clone)]
pub struct StepStats<B: Backend> {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: Tensor<B, 1>,
    /// The factor the gradients were multiplied by (1 unless clipped).
    pub clip_scale: Tensor<B, 1>,
    /// The largest per-tensor `√r` (above 1 means update clipping acted).
    pub max_rms: Tensor<B, 1>,
}

impl<B: Backend> StepStats<B> {
    /// `[grad_norm, clip_scale, max_rms]` on the host, in one read.
    pub fn read(&self) -> [f64; 3] {
        let all = Tensor::cat(
            vec![
                self.grad_norm.clone(),
                self.clip_scale.clone(),
                self.max_rms.clone(),
            ],
            0,
        );
        let values = all
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap_or_default();
        let at = |i: usize| values.get(i).copied().map_or(f64::NAN, f64::from);
        [at(0), at(1), at(2)]
    }
}

/// The first and second moments of one tensor, on the host (the form
/// checkpoints hold).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorState {
    pub decay: bool,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

/// The moments of one tensor on the device, flat.
#[derive(Debug, Clone)]
struct Moments<B: Backend> {
    decay: bool,
    len: usize,
    exp_avg: Tensor<B, 1>,
    exp_avg_sq: Tensor<B, 1>,
}

/// StableAdamW whose moments live on the device of backend `B` next to the
/// weights: a step reads and writes no host memory, so on a GPU nothing
/// crosses the bus. Parameters go in and out as flat tensors, one per
/// model tensor in module order; gradients as one flat tensor with the
/// same order (the buffer the all-reduce produced).
#[derive(Debug, Clone)]
pub struct StableAdamW<B: Backend> {
    config: StableAdamWConfig,
    step: u64,
    tensors: Vec<Moments<B>>,
    device: B::Device,
}

/// `(β^t − β) / (β^t − 1)`, i.e. `β(1 − β^(t−1)) / (1 − β^t)`.
fn debias(beta: f64, step: u64) -> f64 {
    let bt = beta.powi(step.min(i32::MAX as u64) as i32);
    (bt - beta) / (bt - 1.0)
}

impl<B: Backend> StableAdamW<B> {
    pub fn new(
        config: StableAdamWConfig,
        tensors: &[TensorSpec],
        device: &B::Device,
    ) -> Result<Self, OptimError> {
        config.validate()?;
        let tensors = tensors
            .iter()
            .map(|t| Moments {
                decay: t.decay,
                len: t.len,
                exp_avg: Tensor::zeros([t.len], device),
                exp_avg_sq: Tensor::zeros([t.len], device),
            })
            .collect();
        Ok(Self {
            config,
            step: 0,
            tensors,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &StableAdamWConfig {
        &self.config
    }

    /// New hyper-parameters (a phase's LR), keeping moments and step count.
    pub fn set_config(&mut self, config: StableAdamWConfig) -> Result<(), OptimError> {
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Values in all tensors together (the length of the gradient buffer).
    pub fn len(&self) -> usize {
        self.tensors.iter().map(|t| t.len).sum()
    }

    /// Values in each tensor, in order.
    pub fn tensor_lens(&self) -> Vec<usize> {
        self.tensors.iter().map(|t| t.len).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A host copy of the moments, in tensor order (for checkpoints).
    pub fn state(&self) -> Vec<TensorState> {
        let host = |t: &Tensor<B, 1>| {
            t.clone()
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .unwrap_or_default()
        };
        self.tensors
            .iter()
            .map(|t| TensorState {
                decay: t.decay,
                exp_avg: host(&t.exp_avg),
                exp_avg_sq: host(&t.exp_avg_sq),
            })
            .collect()
    }

    /// Restores the moments and the step counter from a checkpoint.
    pub fn restore(&mut self, step: u64, tensors: Vec<TensorState>) -> Result<(), OptimError> {
        if tensors.len() != self.tensors.len() {
            return Err(OptimError::TensorCount {
                expected: self.tensors.len(),
                got: tensors.len(),
            });
        }
        for (index, (new, old)) in tensors.iter().zip(&self.tensors).enumerate() {
            for got in [new.exp_avg.len(), new.exp_avg_sq.len()] {
                if got != old.len {
                    return Err(OptimError::TensorLen {
                        index,
                        expected: old.len,
                        got,
                    });
                }
            }
        }
        let device = self.device.clone();
        let upload = |v: Vec<f32>| {
            let n = v.len();
            Tensor::<B, 1>::from_data(TensorData::new(v, [n]), &device)
        };
        for (moments, state) in self.tensors.iter_mut().zip(tensors) {
            moments.decay = state.decay;
            moments.exp_avg = upload(state.exp_avg);
            moments.exp_avg_sq = upload(state.exp_avg_sq);
        }
        self.step = step;
        Ok(())
    }
}

impl<B: ModelBackend> StableAdamW<B> {
    /// One step over every tensor with this step's learning rate `lr`
    /// (peak × schedule factor): `params[i]` is tensor `i` of the specs
    /// given to [`StableAdamW::new`], flat; `grads` holds all gradients
    /// end to end in the same order. Returns the updated parameters.
    pub fn step(
        &mut self,
        lr: f64,
        params: Vec<Tensor<B, 1>>,
        grads: Tensor<B, 1>,
    ) -> Result<(Vec<Tensor<B, 1>>, StepStats<B>), OptimError> {
        self.step_scaled(lr, params, grads, 1.0)
    }

    /// [`StableAdamW::step`] with the gradients `grads × scale` (a sum of
    /// token losses' gradients and `1 / count`): the scale is applied
    /// inside each tensor's update, not as a pass of its own over the
    /// whole buffer.
    pub fn step_scaled(
        &mut self,
        lr: f64,
        params: Vec<Tensor<B, 1>>,
        grads: Tensor<B, 1>,
        scale: f64,
    ) -> Result<(Vec<Tensor<B, 1>>, StepStats<B>), OptimError> {
        let n = self.tensors.len();
        if params.len() != n {
            return Err(OptimError::TensorCount {
                expected: n,
                got: params.len(),
            });
        }
        for (index, (p, s)) in params.iter().zip(&self.tensors).enumerate() {
            let [got] = p.dims();
            if got != s.len {
                return Err(OptimError::TensorLen {
                    index,
                    expected: s.len,
                    got,
                });
            }
        }
        let [total] = grads.dims();
        if total != self.len() {
            return Err(OptimError::GradientLen {
                expected: self.len(),
                got: total,
            });
        }

        // With clipping the scale must be known before the norm is: apply it
        // to the buffer as one pass, as without the scale.
        let (grads, scale) = match self.config.max_grad_norm {
            Some(_) if scale != 1.0 => (grads.mul_scalar(scale as f32), 1.0),
            _ => (grads, scale),
        };
        // Clipping needs the norm before the update; without it, each
        // tensor's update sums its squared gradient in the same pass.
        let norm_first = self
            .config
            .max_grad_norm
            .map(|_| grads.clone().square().sum().sqrt().mul_scalar(scale));
        let clip_scale = match (self.config.max_grad_norm, &norm_first) {
            // torch.nn.utils.clip_grad_norm_'s rule: max / (norm + 1e-6)
            // where the norm exceeds max, else 1.
            (Some(max), Some(grad_norm)) => {
                let scaled = grad_norm.clone().add_scalar(1e-6).recip().mul_scalar(max);
                let over = grad_norm.clone().greater_elem(max);
                Tensor::ones([1], &self.device).mask_where(over, scaled)
            }
            _ => Tensor::ones([1], &self.device),
        };
        let grads = match self.config.max_grad_norm {
            Some(_) => grads * clip_scale.clone(),
            None => grads,
        };

        self.step += 1;
        let b1 = debias(self.config.beta1, self.step);
        let b2 = debias(self.config.beta2, self.step);
        let eps = self.config.eps;
        let decay_per_lr = self.config.weight_decay / self.config.max_lr;

        let mut out = Vec::with_capacity(n);
        let mut rms_all = Vec::with_capacity(n);
        let mut sq_all = Vec::with_capacity(n);
        let mut offset = 0;
        for (param, st) in params.into_iter().zip(self.tensors.iter_mut()) {
            let g = grads.clone().slice(offset..offset + st.len);
            offset += st.len;
            let update = AdamWUpdate {
                beta1: b1,
                beta2: b2,
                eps,
                lr,
                decay_per_lr: if st.decay { decay_per_lr } else { 0.0 },
                grad_scale: scale,
            };
            // Moved out, not cloned: a backend that updates in place then
            // holds the only reference.
            let moments = (
                std::mem::replace(&mut st.exp_avg, Tensor::empty([0], &self.device)),
                std::mem::replace(&mut st.exp_avg_sq, Tensor::empty([0], &self.device)),
            );
            let step = B::stable_adamw_update(param, moments, g, &update);
            st.exp_avg = step.exp_avg;
            st.exp_avg_sq = step.exp_avg_sq;
            rms_all.push(step.rms);
            sq_all.push(step.grad_sq_sum);
            out.push(step.param);
        }
        let grad_norm = match norm_first {
            Some(norm) => norm,
            None if sq_all.is_empty() => Tensor::zeros([1], &self.device),
            None => Tensor::cat(sq_all, 0).sum().sqrt(),
        };
        let max_rms = if rms_all.is_empty() {
            Tensor::zeros([1], &self.device)
        } else {
            Tensor::cat(rms_all, 0).max()
        };
        Ok((
            out,
            StepStats {
                grad_norm,
                clip_scale,
                max_rms,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = twinhead_model::CpuBackend;
    use twinhead_model::ModelBackend;
    use twinhead_model::adamw::stable_adamw_update;

    fn dev() -> burn::tensor::Device<B> {
        Default::default()
    }

    fn flat(values: &[f32]) -> Tensor<B, 1> {
        Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), &dev())
    }

    fn host(t: &Tensor<B, 1>) -> Vec<f32> {
        t.clone().into_data().into_vec::<f32>().expect("f32")
    }

    /// Takes one step and returns the new parameters on the host.
    fn step(
        opt: &mut StableAdamW<B>,
        lr: f64,
        params: &[&[f32]],
        grads: &[f32],
    ) -> (Vec<Vec<f32>>, [f64; 3]) {
        let params = params.iter().map(|p| flat(p)).collect();
        let (out, stats) = opt.step(lr, params, flat(grads)).expect("step");
        (out.iter().map(host).collect(), stats.read())
    }

    fn close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!(
                (f64::from(*g) - w).abs() < 2e-7,
                "got {got:?}, want {want:?}"
            );
        }
    }

    /// The CPU backend's fused update and the tensor version other
    /// backends run agree (the tests above hold the CPU one to hand values).
    #[test]
    fn fused_update_equals_the_tensor_version() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let n = 200_003;
        let mut draw = |scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| rng.random_range(-1.0f32..1.0) * scale)
                .collect()
        };
        let (p, m, g) = (draw(0.1), draw(0.01), draw(1.0));
        let v: Vec<f32> = draw(1e-3).iter().map(|x| x.abs()).collect();
        for decay_per_lr in [0.0, 0.3] {
            let u = AdamWUpdate {
                beta1: 0.85,
                beta2: 0.97,
                eps: 1e-6,
                lr: 3e-3,
                decay_per_lr,
                grad_scale: 0.37,
            };
            let fused = B::stable_adamw_update(flat(&p), (flat(&m), flat(&v)), flat(&g), &u);
            let plain = stable_adamw_update(flat(&p), (flat(&m), flat(&v)), flat(&g), &u);
            for (name, a, b, tol) in [
                ("param", fused.param, plain.param, 1e-6),
                ("exp_avg", fused.exp_avg, plain.exp_avg, 1e-7),
                ("exp_avg_sq", fused.exp_avg_sq, plain.exp_avg_sq, 1e-7),
                ("rms", fused.rms, plain.rms, 1e-4),
                ("grad_sq_sum", fused.grad_sq_sum, plain.grad_sq_sum, 1e-4),
            ] {
                let diff = host(&a)
                    .iter()
                    .zip(host(&b))
                    .fold(0f32, |d, (x, y)| d.max((x - y).abs() / y.abs().max(1.0)));
                assert!(diff < tol, "{name}: {diff}");
            }
        }
    }

    #[test]
    fn debiased_betas() {
        assert_eq!(debias(0.9, 1), 0.0);
        // β(1 − β) / (1 − β²) = β / (1 + β)
        assert!((debias(0.9, 2) - 0.9 / 1.9).abs() < 1e-15);
        assert!((debias(0.98, 2) - 0.98 / 1.98).abs() < 1e-15);
    }

    /// Three steps on a decayed matrix and an undecayed vector, against
    /// values worked out by hand (in f64) from the formulas above.
    #[test]
    fn three_steps_match_hand_computed_values() {
        let mut cfg = StableAdamWConfig::new(2e-3, 0.1);
        cfg.max_grad_norm = None;
        let specs = [
            TensorSpec::for_shape("layers.0.attn.Wqkv.weight", &[3, 1]),
            TensorSpec::for_shape("final_norm.weight", &[2]),
        ];
        assert!(specs[0].decay && !specs[1].decay);
        let mut opt = StableAdamW::<B>::new(cfg, &specs, &dev()).expect("valid");
        let mut a = vec![1.0f32, -0.5, 0.25];
        let mut b = vec![0.5f32, -1.0];
        let grads: [[f32; 5]; 3] = [
            [0.1, -0.2, 0.05, 0.3, 0.0],
            [0.3, 0.1, -0.05, -0.1, 0.2],
            [0.0, 0.4, 0.1, 0.05, -0.3],
        ];
        let lrs = [1e-3, 2e-3, 1.5e-3];
        let want: [([f64; 3], [f64; 2]); 3] = [
            // Step 1: m = g, v = g², r = 1 for A (lr_t = lr), 0.5 for B (one
            // zero gradient); A decays by 1 − (1e-3/2e-3)·0.1 = 0.95 then
            // moves by lr·g/(|g| + eps): 0.95 − 1e-3·0.1/0.100001 = 0.94900001.
            (
                [0.9490000100, -0.4740000050, 0.2365000200],
                [0.4990000033, -1.0],
            ),
            // Step 2: r = 1.06267 (A), 1.09081 (B): update clipping acts.
            (
                [0.8551670423, -0.4275007092, 0.2136600939],
                [0.4982306520, -1.0014181770],
            ),
            (
                [0.8003175260, -0.4011031419, 0.1995543692],
                [0.4976354697, -1.0011106084],
            ),
        ];
        for (g, (lr, (wa, wb))) in grads.iter().zip(lrs.iter().zip(want.iter())) {
            let (out, [_, clip_scale, _]) = step(&mut opt, *lr, &[&a, &b], g);
            assert_eq!(clip_scale, 1.0);
            a = out[0].clone();
            b = out[1].clone();
            close(&a, wa);
            close(&b, wb);
        }
        assert_eq!(opt.steps(), 3);
        // Step 2's r for B was 1.090814664: the largest of the two.
        let mut again = StableAdamW::<B>::new(StableAdamWConfig::new(2e-3, 0.1), &specs, &dev())
            .expect("valid");
        let (out, _) = step(
            &mut again,
            1e-3,
            &[&[1.0, -0.5, 0.25], &[0.5, -1.0]],
            &grads[0],
        );
        let (_, [_, _, max_rms]) = step(&mut again, 2e-3, &[&out[0], &out[1]], &grads[1]);
        assert!((max_rms - 1.090814664f64.sqrt()).abs() < 1e-6, "{max_rms}");
    }

    #[test]
    fn the_reported_gradient_norm_is_of_the_scaled_gradients_whatever_the_path() {
        let specs = [
            TensorSpec {
                len: 2,
                decay: false,
            },
            TensorSpec {
                len: 1,
                decay: true,
            },
        ];
        let params = || vec![flat(&[0.0, 0.0]), flat(&[1.0])];
        let grads = || flat(&[3.0, 4.0, 12.0]);
        for max_grad_norm in [None, Some(100.0)] {
            let mut cfg = StableAdamWConfig::new(1e-3, 0.1);
            cfg.max_grad_norm = max_grad_norm;
            let mut opt = StableAdamW::<B>::new(cfg, &specs, &dev()).expect("valid");
            // |(3, 4, 12)| = 13, times the scale 0.5.
            let (_, stats) = opt.step_scaled(1e-3, params(), grads(), 0.5).expect("step");
            let [grad_norm, clip_scale, _] = stats.read();
            assert!(
                (grad_norm - 6.5).abs() < 1e-6,
                "{max_grad_norm:?}: {grad_norm}"
            );
            assert_eq!(clip_scale, 1.0);
        }
    }

    #[test]
    fn gradient_clipping_scales_gradients() {
        let mut cfg = StableAdamWConfig::new(1e-3, 0.0);
        cfg.max_grad_norm = Some(1.0);
        let specs = [TensorSpec {
            len: 2,
            decay: false,
        }];
        let mut clipped = StableAdamW::<B>::new(cfg.clone(), &specs, &dev()).expect("valid");
        // Norm 5 -> scale 1/(5 + 1e-6).
        let (p, [grad_norm, clip_scale, _]) = step(&mut clipped, 1e-3, &[&[0.0, 0.0]], &[3.0, 4.0]);
        assert!((grad_norm - 5.0).abs() < 1e-6);
        assert!((clip_scale - 1.0 / (5.0 + 1e-6)).abs() < 1e-7);
        // The moments saw the clipped gradient.
        let m = &clipped.state()[0].exp_avg;
        assert!((f64::from(m[0]) - 0.6).abs() < 1e-6 && (f64::from(m[1]) - 0.8).abs() < 1e-6);
        // Below the threshold nothing changes.
        let (_, [_, clip_scale, _]) = step(&mut clipped, 1e-3, &[&p[0]], &[0.3, 0.4]);
        assert_eq!(clip_scale, 1.0);
    }

    #[test]
    fn state_round_trips_through_the_host() {
        let specs = [
            TensorSpec::for_shape("w", &[2, 2]),
            TensorSpec::for_shape("b", &[2]),
        ];
        let config = StableAdamWConfig::new(1e-3, 0.01);
        let mut opt = StableAdamW::<B>::new(config.clone(), &specs, &dev()).expect("valid");
        let mut w = vec![0.5f32, -0.25, 1.0, 2.0];
        let mut b = vec![0.1f32, 0.2];
        let grads = [0.1, 0.2, -0.3, 0.4, 0.5, -0.6];
        for _ in 0..2 {
            let (out, _) = step(&mut opt, 1e-3, &[&w, &b], &grads);
            w = out[0].clone();
            b = out[1].clone();
        }
        let mut restored = StableAdamW::<B>::new(config, &specs, &dev()).expect("valid");
        restored.restore(opt.steps(), opt.state()).expect("restore");
        assert_eq!(restored.state(), opt.state());
        // The next step is the same from either.
        let (want, _) = step(&mut opt, 1e-3, &[&w, &b], &grads);
        let (got, _) = step(&mut restored, 1e-3, &[&w, &b], &grads);
        assert_eq!(got, want);
    }

    #[test]
    fn rejects_mismatched_inputs() {
        let specs = [TensorSpec {
            len: 2,
            decay: true,
        }];
        let mut opt = StableAdamW::<B>::new(StableAdamWConfig::new(1e-3, 0.0), &specs, &dev())
            .expect("valid");
        let err = |r: Result<_, OptimError>| r.expect_err("refused");
        assert_eq!(
            err(opt.step(1e-3, vec![flat(&[0.0; 3])], flat(&[1.0, 2.0, 3.0]))),
            OptimError::TensorLen {
                index: 0,
                expected: 2,
                got: 3
            }
        );
        assert_eq!(
            err(opt.step(1e-3, vec![flat(&[0.0; 2])], flat(&[1.0, 2.0, 3.0]))),
            OptimError::GradientLen {
                expected: 2,
                got: 3
            }
        );
        assert_eq!(
            err(opt.step(1e-3, vec![], flat(&[]))),
            OptimError::TensorCount {
                expected: 1,
                got: 0
            }
        );
        assert!(matches!(
            StableAdamW::<B>::new(StableAdamWConfig::new(0.0, 0.0), &specs, &dev()),
            Err(OptimError::BadConfig { name: "max_lr", .. })
        ));
        assert_eq!(opt.steps(), 0, "a rejected step must not count");
        let short = vec![TensorState {
            decay: true,
            exp_avg: vec![0.0; 3],
            exp_avg_sq: vec![0.0; 2],
        }];
        assert!(matches!(
            opt.restore(1, short),
            Err(OptimError::TensorLen { index: 0, .. })
        ));
        assert!(!TensorSpec::for_shape("decoder.bias", &[5, 1]).decay);
    }
}
