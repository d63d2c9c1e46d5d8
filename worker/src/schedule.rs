//! Learning-rate laws driven by tokens seen in the phase (not steps), so a
//! phase keeps its shape whatever the batch size or world size.
//!
//! A phase's LR is `peak_lr × factor(tokens)`:
//!
//! ```text
//! factor
//!  start ┤     ┌────────────────┐ ╮         warmup: 0 → start, linear, over warmup_tokens
//!        │    ╱                   ╲ ╮        hold:   start until the decay window opens
//!        │   ╱                      ╲╮       decay:  start → end by the law, over the last
//!    end ┤  ╱                         ╲───   decay_tokens of the phase (the whole phase
//!        └──┴──────────────────┴──────┴──   after warmup when decay_tokens is None)
//!         0  warmup      total−decay   total
//! ```
//!
//! With `p` the progress through the decay window (0 → 1):
//!
//! * constant: `start`
//! * linear: `start + (end − start)·p`
//! * 1−sqrt: `end + (start − end)·(1 − √p)`
//! * cosine: `end + (start − end)·(1 + cos πp)/2`
//!
//! Ettin (ETTIN.md): phase 1 is warmup then constant at 1.0; phase 2 is
//! 1−sqrt from 1.0 to 0.5 over the phase; phase 3 is 1−sqrt from 0.5 to 0.02;
//! cross-objective training is warmup 3B, flat, linear to 0.02 over the last
//! 10B (warmup-stable-decay).

/// The shape of the decay part of a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecayLaw {
    Constant,
    Linear,
    OneMinusSqrt,
    Cosine,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    #[error("lr schedule: phase length must be positive")]
    EmptyPhase,
    #[error("lr schedule: warmup_tokens {warmup} exceed the phase's {total} tokens")]
    WarmupTooLong { warmup: u64, total: u64 },
    #[error("lr schedule: decay_tokens {decay} exceed the phase's {total} tokens")]
    DecayTooLong { decay: u64, total: u64 },
    #[error("lr schedule: {name} factor {value} must be finite and >= 0")]
    BadFactor { name: &'static str, value: f64 },
}

/// A validated LR law for one phase. Build with [`LrSchedule::new`].
#[derive(Debug, Clone, PartialEq)]
pub struct LrSchedule {
    total_tokens: u64,
    warmup_tokens: u64,
    decay_start: u64,
    start_factor: f64,
    end_factor: f64,
    law: DecayLaw,
}

impl LrSchedule {
    /// * `total_tokens`: length of the phase.
    /// * `warmup_tokens`: linear warmup from 0 to `start_factor`.
    /// * `decay_tokens`: `Some(d)` holds `start_factor` until the last `d`
    ///   tokens of the phase and decays over those (warmup-stable-decay);
    ///   `None` decays over the whole phase after warmup.
    pub fn new(
        total_tokens: u64,
        warmup_tokens: u64,
        law: DecayLaw,
        start_factor: f64,
        end_factor: f64,
        decay_tokens: Option<u64>,
    ) -> Result<Self, ScheduleError> {
        if total_tokens == 0 {
            return Err(ScheduleError::EmptyPhase);
        }
        if warmup_tokens > total_tokens {
            return Err(ScheduleError::WarmupTooLong {
                warmup: warmup_tokens,
                total: total_tokens,
            });
        }
        for (name, value) in [("start", start_factor), ("end", end_factor)] {
            if !value.is_finite() || value < 0.0 {
                return Err(ScheduleError::BadFactor { name, value });
            }
        }
        let decay_start = match decay_tokens {
            Some(d) if d > total_tokens => {
                return Err(ScheduleError::DecayTooLong {
                    decay: d,
                    total: total_tokens,
                });
            }
            Some(d) => (total_tokens - d).max(warmup_tokens),
            None => warmup_tokens,
        };
        Ok(Self {
            total_tokens,
            warmup_tokens,
            decay_start,
            start_factor,
            end_factor,
            law,
        })
    }

    pub fn total_tokens(&self) -> u64 {
        self.total_tokens
    }

    /// The factor reached at the end of warmup (the optimizer's `max_lr`
    /// is peak × this, see `StableAdamWConfig::max_lr`).
    pub fn start_factor(&self) -> f64 {
        self.start_factor
    }

    pub fn end_factor(&self) -> f64 {
        self.end_factor
    }

    /// The factor of the peak LR after `tokens` tokens of the phase
    /// (clamped to the end factor past the end of the phase).
    pub fn factor(&self, tokens: u64) -> f64 {
        let (start, end) = (self.start_factor, self.end_factor);
        if tokens < self.warmup_tokens {
            return start * tokens as f64 / self.warmup_tokens as f64;
        }
        if self.law == DecayLaw::Constant {
            return start;
        }
        if tokens < self.decay_start {
            return start;
        }
        let window = self.total_tokens - self.decay_start;
        let p = if window == 0 {
            1.0
        } else {
            ((tokens - self.decay_start) as f64 / window as f64).min(1.0)
        };
        match self.law {
            DecayLaw::Constant => start,
            DecayLaw::Linear => start + (end - start) * p,
            DecayLaw::OneMinusSqrt => end + (start - end) * (1.0 - p.sqrt()),
            DecayLaw::Cosine => {
                end + (start - end) * (1.0 + (std::f64::consts::PI * p).cos()) / 2.0
            }
        }
    }

    /// `peak_lr × factor(tokens)`.
    pub fn lr(&self, peak_lr: f64, tokens: u64) -> f64 {
        peak_lr * self.factor(tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = 1_000_000_000;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn ettin_phase1_warmup_then_flat() {
        // 17M: warmup 4B tokens, then constant at the peak over 1.7T.
        let s =
            LrSchedule::new(1_700 * B, 4 * B, DecayLaw::Constant, 1.0, 1.0, None).expect("valid");
        close(s.factor(0), 0.0);
        close(s.factor(B), 0.25);
        close(s.factor(3 * B), 0.75);
        close(s.factor(4 * B), 1.0);
        close(s.factor(1_000 * B), 1.0);
        close(s.lr(3e-3, 2 * B), 1.5e-3);
    }

    #[test]
    fn ettin_phase2_one_minus_sqrt_to_half() {
        let t = 250 * B;
        let s = LrSchedule::new(t, 0, DecayLaw::OneMinusSqrt, 1.0, 0.5, None).expect("valid");
        close(s.factor(0), 1.0);
        // p = 1/4: sqrt = 1/2 -> 0.5 + 0.5 * 0.5
        close(s.factor(t / 4), 0.75);
        // p = 0.64: sqrt = 0.8 -> 0.5 + 0.5 * 0.2
        close(s.factor(160 * B), 0.6);
        close(s.factor(t), 0.5);
        close(s.factor(2 * t), 0.5);
        close(s.lr(8e-4, t / 4), 6e-4);
    }

    #[test]
    fn ettin_phase3_one_minus_sqrt_from_half_to_two_percent() {
        let t = 50 * B;
        let s = LrSchedule::new(t, 0, DecayLaw::OneMinusSqrt, 0.5, 0.02, None).expect("valid");
        close(s.factor(0), 0.5);
        // p = 1/4: 0.02 + 0.48 * 0.5
        close(s.factor(t / 4), 0.26);
        // p = 0.81: 0.02 + 0.48 * 0.1
        close(s.factor(40_500_000_000), 0.068);
        close(s.factor(t), 0.02);
    }

    #[test]
    fn cross_objective_warmup_stable_linear_decay() {
        let s = LrSchedule::new(50 * B, 3 * B, DecayLaw::Linear, 1.0, 0.02, Some(10 * B))
            .expect("valid");
        close(s.factor(0), 0.0);
        close(s.factor(1_500_000_000), 0.5);
        close(s.factor(3 * B), 1.0);
        close(s.factor(20 * B), 1.0);
        close(s.factor(40 * B), 1.0);
        // Half-way through the last 10B: 1 + (0.02 - 1) / 2
        close(s.factor(45 * B), 0.51);
        close(s.factor(48 * B), 1.0 - 0.98 * 0.8);
        close(s.factor(50 * B), 0.02);
        close(s.factor(60 * B), 0.02);
    }

    #[test]
    fn cosine_and_short_phases() {
        let s = LrSchedule::new(100, 0, DecayLaw::Cosine, 1.0, 0.0, None).expect("valid");
        close(s.factor(0), 1.0);
        close(s.factor(50), 0.5);
        close(s.factor(100), 0.0);
        // A decay window longer than the post-warmup part starts after warmup.
        let s = LrSchedule::new(100, 40, DecayLaw::Linear, 1.0, 0.0, Some(100)).expect("valid");
        close(s.factor(40), 1.0);
        close(s.factor(70), 0.5);
        // All warmup, no room to decay.
        let s = LrSchedule::new(10, 10, DecayLaw::Linear, 1.0, 0.0, None).expect("valid");
        close(s.factor(5), 0.5);
        close(s.factor(10), 0.0);
    }

    #[test]
    fn rejects_bad_schedules() {
        assert_eq!(
            LrSchedule::new(0, 0, DecayLaw::Linear, 1.0, 0.0, None),
            Err(ScheduleError::EmptyPhase)
        );
        assert!(matches!(
            LrSchedule::new(10, 11, DecayLaw::Linear, 1.0, 0.0, None),
            Err(ScheduleError::WarmupTooLong { .. })
        ));
        assert!(matches!(
            LrSchedule::new(10, 0, DecayLaw::Linear, 1.0, 0.0, Some(11)),
            Err(ScheduleError::DecayTooLong { .. })
        ));
        assert!(matches!(
            LrSchedule::new(10, 0, DecayLaw::Linear, f64::NAN, 0.0, None),
            Err(ScheduleError::BadFactor { name: "start", .. })
        ));
        assert!(matches!(
            LrSchedule::new(10, 0, DecayLaw::Linear, 1.0, -0.1, None),
            Err(ScheduleError::BadFactor { name: "end", .. })
        ));
    }
}
