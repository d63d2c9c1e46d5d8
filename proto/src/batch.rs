//! The global batch size of every step of a phase, and where each step's
//! rows start: constant, or ramped up over the first tokens of phase 0
//! (batch-size warmup, [`BatchWarmup`]).
//!
//! # The law
//!
//! With `t` the tokens the phase consumed before a step, the step takes
//!
//! ```text
//! b(t) = start + ⌊(global − start)·t / tokens / increment⌋·increment   if t < tokens
//! b(t) = global                                                        otherwise
//! ```
//!
//! sequences, where `increment` is `world_size × micro_batch` (`world_size`
//! when `micro_batch` is 0), so every ramp batch splits into whole
//! micro-batches on every rank. Step `s` starts at row `offset(s)`, the sum
//! of the batches before it. The ramp is short (its steps are counted in
//! validation), so its offsets are summed once; past the ramp,
//! `offset(s) = ramp_rows + (s − ramp_steps)·global`. Reaching any step
//! never reads data.

use std::ops::Range;

use crate::v1::{BatchWarmup, RunSpec};

/// The most steps a batch warmup may take (validation refuses longer
/// ramps, so the summed offsets stay small).
pub const MAX_RAMP_STEPS: u64 = 1_000_000;

/// Sizes and row offsets of the steps of one phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSchedule {
    global_batch: u64,
    /// Rows consumed before each ramp step; the last entry is the rows
    /// consumed by the whole ramp (so `len() - 1` ramp steps).
    ramp_offsets: Vec<u64>,
}

/// The sequences to add per ramp move for a world and micro-batch.
pub fn ramp_increment(world_size: u32, micro_batch: u32) -> u64 {
    u64::from(world_size.max(1)) * u64::from(micro_batch.max(1))
}

/// `b(t)` of the module docs, for `t < tokens` (callers stop the ramp at
/// `tokens`).
fn ramp_batch(global: u64, start: u64, tokens: u64, increment: u64, consumed: u64) -> u64 {
    let span = u128::from(global.saturating_sub(start));
    let grown = span * u128::from(consumed) / u128::from(tokens.max(1));
    let moves = grown / u128::from(increment.max(1));
    let batch = u128::from(start) + moves * u128::from(increment.max(1));
    u64::try_from(batch).unwrap_or(u64::MAX).min(global)
}

impl BatchSchedule {
    /// Every step takes `global_batch` rows.
    pub fn constant(global_batch: u64) -> Self {
        Self {
            global_batch,
            ramp_offsets: vec![0],
        }
    }

    /// Ramps from `start` to `global_batch` over `tokens` tokens of
    /// `seq_len`-token rows, in steps of `increment` sequences. Degenerate
    /// values (zero start, length or increment) give a constant schedule;
    /// validation rejects them before a run starts.
    pub fn ramped(
        global_batch: u64,
        seq_len: u64,
        start: u64,
        tokens: u64,
        increment: u64,
    ) -> Self {
        let mut schedule = Self::constant(global_batch);
        if start == 0 || seq_len == 0 || tokens == 0 || increment == 0 || start >= global_batch {
            return schedule;
        }
        let mut rows = 0u64;
        while rows.saturating_mul(seq_len) < tokens
            && (schedule.ramp_offsets.len() as u64) <= MAX_RAMP_STEPS
        {
            let consumed = rows * seq_len;
            rows += ramp_batch(global_batch, start, tokens, increment, consumed);
            schedule.ramp_offsets.push(rows);
        }
        schedule
    }

    /// The schedule of phase `phase_index` of `spec`: the batch warmup
    /// applies to phase 0 only.
    pub fn for_phase(spec: &RunSpec, phase_index: usize) -> Self {
        let global = u64::from(spec.global_batch);
        match (spec.batch_warmup.as_ref(), spec.phases.get(phase_index)) {
            (Some(BatchWarmup { start, tokens }), Some(phase)) if phase_index == 0 => Self::ramped(
                global,
                u64::from(phase.seq_len),
                u64::from(*start),
                *tokens,
                ramp_increment(spec.world_size, spec.micro_batch),
            ),
            _ => Self::constant(global),
        }
    }

    /// The batch after the ramp.
    pub fn global_batch(&self) -> u64 {
        self.global_batch
    }

    /// Steps of the ramp (0 without a warmup).
    pub fn ramp_steps(&self) -> u64 {
        self.ramp_offsets.len() as u64 - 1
    }

    fn ramp_rows(&self) -> u64 {
        self.ramp_offsets.last().copied().unwrap_or(0)
    }

    /// Rows consumed before step `step`.
    pub fn offset(&self, step: u64) -> u64 {
        match usize::try_from(step)
            .ok()
            .and_then(|s| self.ramp_offsets.get(s))
        {
            Some(&rows) => rows,
            // Saturating: a step read from a data-order log or a report may
            // be any number; past u64::MAX rows every step is empty.
            None => self
                .ramp_rows()
                .saturating_add((step - self.ramp_steps()).saturating_mul(self.global_batch)),
        }
    }

    /// Rows of global batch `step`.
    pub fn rows(&self, step: u64) -> Range<u64> {
        self.offset(step)..self.offset(step.saturating_add(1))
    }

    /// Sequences in global batch `step`.
    pub fn batch(&self, step: u64) -> u64 {
        self.offset(step.saturating_add(1)) - self.offset(step)
    }

    /// The smallest batch of any step (the first).
    pub fn smallest_batch(&self) -> u64 {
        self.batch(0)
    }

    /// Whole steps whose rows fit in `budget_rows` rows.
    pub fn steps_within(&self, budget_rows: u64) -> u64 {
        let ramp_rows = self.ramp_rows();
        if budget_rows < ramp_rows {
            // Offsets are increasing: count the ramp steps ending in budget.
            return self.ramp_offsets[1..].partition_point(|&end| end <= budget_rows) as u64;
        }
        let rest = (budget_rows - ramp_rows)
            .checked_div(self.global_batch)
            .unwrap_or(0);
        self.ramp_steps() + rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// global 16, start 4, 640 tokens of 16-token rows, moves of 2: by hand,
    /// t = 0, 64, 128, 224, 352, 512 give 12·t/640 = 0, 1.2, 2.4, 4.2, 6.6,
    /// 9.6, so batches 4, 4, 6, 8, 10, 12 (9 rounds down to 8), then t = 704
    /// ends the ramp.
    fn hand_computed() -> BatchSchedule {
        BatchSchedule::ramped(16, 16, 4, 640, 2)
    }

    #[test]
    fn ramp_batches_follow_the_law() {
        let s = hand_computed();
        let batches: Vec<u64> = (0..8).map(|step| s.batch(step)).collect();
        assert_eq!(batches, vec![4, 4, 6, 8, 10, 12, 16, 16]);
        assert_eq!(s.ramp_steps(), 6);
        assert_eq!(s.smallest_batch(), 4);
    }

    #[test]
    fn offsets_sum_the_batches_before_a_step() {
        let s = hand_computed();
        let offsets: Vec<u64> = (0..9).map(|step| s.offset(step)).collect();
        assert_eq!(offsets, vec![0, 4, 8, 14, 22, 32, 44, 60, 76]);
        assert_eq!(s.rows(3), 14..22);
        // Far past the ramp, still closed form.
        assert_eq!(s.offset(1_000_006), 44 + 1_000_000 * 16);
    }

    #[test]
    fn steps_count_whole_batches_within_a_budget() {
        let s = hand_computed();
        // 1600 tokens = 100 rows: the 44-row ramp, then 3 batches of 16.
        assert_eq!(s.steps_within(1600 / 16), 9);
        // 300 tokens = 18 rows: ramp steps ending at 4, 8 and 14 rows.
        assert_eq!(s.steps_within(300 / 16), 3);
        assert_eq!(s.steps_within(3), 0);
        assert_eq!(BatchSchedule::constant(16).steps_within(100), 6);
    }

    #[test]
    fn without_a_ramp_every_step_is_global() {
        let s = BatchSchedule::constant(8);
        assert_eq!(s.ramp_steps(), 0);
        assert_eq!(s.rows(5), 40..48);
        assert_eq!(BatchSchedule::ramped(8, 16, 8, 640, 2), s);
    }

    #[test]
    fn the_warmup_applies_to_phase_zero_only() {
        let phase = crate::v1::PhaseSpec {
            seq_len: 16,
            tokens: 10_000,
            ..Default::default()
        };
        let spec = RunSpec {
            global_batch: 16,
            world_size: 2,
            micro_batch: 1,
            phases: vec![phase.clone(), phase],
            batch_warmup: Some(BatchWarmup {
                start: 4,
                tokens: 640,
            }),
            ..Default::default()
        };
        assert_eq!(BatchSchedule::for_phase(&spec, 0), hand_computed());
        assert_eq!(
            BatchSchedule::for_phase(&spec, 1),
            BatchSchedule::constant(16)
        );
    }
}
