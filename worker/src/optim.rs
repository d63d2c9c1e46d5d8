//! StableAdamW (Wortsman et al. 2023) as Ettin trained with it: the optimi
//! implementation with fully LR-decoupled weight decay (`decouple_lr=True`),
//! on flat `f32` slices, one per tensor.
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
    #[error("optimizer: bad hyper-parameter {name} = {value}")]
    BadConfig { name: &'static str, value: f64 },
}

/// What one step did, for logging.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    /// The factor the gradients were multiplied by (1 unless clipped).
    pub clip_scale: f64,
    /// The largest per-tensor `√r` (above 1 means update clipping acted).
    pub max_rms: f64,
}

/// The first and second moments of one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorState {
    pub decay: bool,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct StableAdamW {
    config: StableAdamWConfig,
    step: u64,
    tensors: Vec<TensorState>,
}

/// `(β^t − β) / (β^t − 1)`, i.e. `β(1 − β^(t−1)) / (1 − β^t)`.
fn debias(beta: f64, step: u64) -> f64 {
    let bt = beta.powi(step.min(i32::MAX as u64) as i32);
    (bt - beta) / (bt - 1.0)
}

impl StableAdamW {
    pub fn new(config: StableAdamWConfig, tensors: &[TensorSpec]) -> Result<Self, OptimError> {
        let checks = [
            ("beta1", config.beta1, (0.0..1.0).contains(&config.beta1)),
            ("beta2", config.beta2, (0.0..1.0).contains(&config.beta2)),
            ("eps", config.eps, config.eps >= 0.0),
            (
                "weight_decay",
                config.weight_decay,
                config.weight_decay >= 0.0,
            ),
            ("max_lr", config.max_lr, config.max_lr > 0.0),
            (
                "max_grad_norm",
                config.max_grad_norm.unwrap_or(1.0),
                config.max_grad_norm.is_none_or(|m| m > 0.0),
            ),
        ];
        for (name, value, ok) in checks {
            if !ok || !value.is_finite() {
                return Err(OptimError::BadConfig { name, value });
            }
        }
        let tensors = tensors
            .iter()
            .map(|t| TensorState {
                decay: t.decay,
                exp_avg: vec![0.0; t.len],
                exp_avg_sq: vec![0.0; t.len],
            })
            .collect();
        Ok(Self {
            config,
            step: 0,
            tensors,
        })
    }

    pub fn config(&self) -> &StableAdamWConfig {
        &self.config
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The moments, in tensor order (for checkpoints).
    pub fn state(&self) -> &[TensorState] {
        &self.tensors
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
                if got != old.exp_avg.len() {
                    return Err(OptimError::TensorLen {
                        index,
                        expected: old.exp_avg.len(),
                        got,
                    });
                }
            }
        }
        self.step = step;
        self.tensors = tensors;
        Ok(())
    }

    /// One step over every tensor with this step's learning rate `lr`
    /// (peak × schedule factor). `params[i]` and `grads[i]` belong to
    /// tensor `i` of the specs given to [`StableAdamW::new`].
    pub fn step(
        &mut self,
        lr: f64,
        params: &mut [&mut [f32]],
        grads: &[&[f32]],
    ) -> Result<StepStats, OptimError> {
        let n = self.tensors.len();
        for got in [params.len(), grads.len()] {
            if got != n {
                return Err(OptimError::TensorCount { expected: n, got });
            }
        }
        for (index, ((p, g), s)) in params.iter().zip(grads).zip(&self.tensors).enumerate() {
            let expected = s.exp_avg.len();
            for got in [p.len(), g.len()] {
                if got != expected {
                    return Err(OptimError::TensorLen {
                        index,
                        expected,
                        got,
                    });
                }
            }
        }

        let grad_norm = grads
            .iter()
            .flat_map(|g| g.iter())
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        let clip_scale = match self.config.max_grad_norm {
            // torch.nn.utils.clip_grad_norm_'s rule.
            Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
            _ => 1.0,
        };

        self.step += 1;
        let b1 = debias(self.config.beta1, self.step) as f32;
        let b2 = debias(self.config.beta2, self.step) as f32;
        let eps = self.config.eps as f32;
        let eps_sq = self.config.eps * self.config.eps;
        let scale = clip_scale as f32;
        let mut max_rms: f64 = 0.0;

        for ((param, grad), st) in params.iter_mut().zip(grads).zip(self.tensors.iter_mut()) {
            let mut ratio_sum = 0.0f64;
            for ((&g, m), v) in grad
                .iter()
                .zip(st.exp_avg.iter_mut())
                .zip(st.exp_avg_sq.iter_mut())
            {
                let g = g * scale;
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                let g2 = f64::from(g) * f64::from(g);
                ratio_sum += g2 / f64::from(*v).max(eps_sq);
            }
            let rms = if grad.is_empty() {
                0.0
            } else {
                (ratio_sum / grad.len() as f64).sqrt()
            };
            max_rms = max_rms.max(rms);
            let lr_t = lr / rms.max(1.0);
            if st.decay && self.config.weight_decay != 0.0 {
                let keep = (1.0 - (lr_t / self.config.max_lr) * self.config.weight_decay) as f32;
                for p in param.iter_mut() {
                    *p *= keep;
                }
            }
            let lr_t = lr_t as f32;
            for ((p, &m), &v) in param.iter_mut().zip(&st.exp_avg).zip(&st.exp_avg_sq) {
                *p -= lr_t * m / (v.sqrt() + eps);
            }
        }
        Ok(StepStats {
            grad_norm,
            clip_scale,
            max_rms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!(
                (f64::from(*g) - w).abs() < 2e-7,
                "got {got:?}, want {want:?}"
            );
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
        let mut opt = StableAdamW::new(cfg, &specs).expect("valid");
        let mut a = vec![1.0f32, -0.5, 0.25];
        let mut b = vec![0.5f32, -1.0];
        let grads: [([f32; 3], [f32; 2]); 3] = [
            ([0.1, -0.2, 0.05], [0.3, 0.0]),
            ([0.3, 0.1, -0.05], [-0.1, 0.2]),
            ([0.0, 0.4, 0.1], [0.05, -0.3]),
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
        for ((ga, gb), (lr, (wa, wb))) in grads.iter().zip(lrs.iter().zip(want.iter())) {
            let stats = opt
                .step(*lr, &mut [&mut a[..], &mut b[..]], &[&ga[..], &gb[..]])
                .expect("step");
            assert_eq!(stats.clip_scale, 1.0);
            close(&a, wa);
            close(&b, wb);
        }
        assert_eq!(opt.steps(), 3);
        // Step 2's r for A was 1.062670056 (√r = 1.03086).
        let mut again = StableAdamW::new(StableAdamWConfig::new(2e-3, 0.1), &specs).expect("valid");
        let mut a = [1.0f32, -0.5, 0.25];
        let mut b = [0.5f32, -1.0];
        again
            .step(
                1e-3,
                &mut [&mut a[..], &mut b[..]],
                &[&grads[0].0[..], &grads[0].1[..]],
            )
            .expect("step");
        let s = again
            .step(
                2e-3,
                &mut [&mut a[..], &mut b[..]],
                &[&grads[1].0[..], &grads[1].1[..]],
            )
            .expect("step");
        assert!(
            (s.max_rms - 1.090814664f64.sqrt()).abs() < 1e-6,
            "{}",
            s.max_rms
        );
    }

    #[test]
    fn gradient_clipping_scales_gradients() {
        let mut cfg = StableAdamWConfig::new(1e-3, 0.0);
        cfg.max_grad_norm = Some(1.0);
        let specs = [TensorSpec {
            len: 2,
            decay: false,
        }];
        let mut clipped = StableAdamW::new(cfg.clone(), &specs).expect("valid");
        let mut p = [0.0f32; 2];
        // Norm 5 -> scale 1/(5 + 1e-6).
        let s = clipped
            .step(1e-3, &mut [&mut p[..]], &[&[3.0, 4.0][..]])
            .expect("step");
        assert!((s.grad_norm - 5.0).abs() < 1e-12);
        assert!((s.clip_scale - 1.0 / (5.0 + 1e-6)).abs() < 1e-12);
        // The moments saw the clipped gradient.
        let m = &clipped.state()[0].exp_avg;
        assert!((f64::from(m[0]) - 0.6).abs() < 1e-6 && (f64::from(m[1]) - 0.8).abs() < 1e-6);
        // Below the threshold nothing changes.
        let s = clipped
            .step(1e-3, &mut [&mut p[..]], &[&[0.3, 0.4][..]])
            .expect("step");
        assert_eq!(s.clip_scale, 1.0);
    }

    #[test]
    fn rejects_mismatched_inputs() {
        let specs = [TensorSpec {
            len: 2,
            decay: true,
        }];
        let mut opt = StableAdamW::new(StableAdamWConfig::new(1e-3, 0.0), &specs).expect("valid");
        let mut p = [0.0f32; 3];
        assert_eq!(
            opt.step(1e-3, &mut [&mut p[..]], &[&[1.0, 2.0, 3.0][..]]),
            Err(OptimError::TensorLen {
                index: 0,
                expected: 2,
                got: 3
            })
        );
        assert!(matches!(
            opt.step(1e-3, &mut [], &[]),
            Err(OptimError::TensorCount {
                expected: 1,
                got: 0
            })
        ));
        assert!(matches!(
            StableAdamW::new(StableAdamWConfig::new(0.0, 0.0), &specs),
            Err(OptimError::BadConfig { name: "max_lr", .. })
        ));
        assert_eq!(opt.steps(), 0, "a rejected step must not count");
        assert!(!TensorSpec::for_shape("decoder.bias", &[5, 1]).decay);
    }
}
