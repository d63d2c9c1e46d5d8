//! Held-out loss in the training loop (the run's `[eval]`, see
//! `EvalPolicy`): the world scores the first `max_rows` rows of the phase's
//! held-out split, each rank a contiguous slice, and every rank learns the
//! world's sums.
//!
//! Encoders are scored at the policy's mask ratio (the recipe's 15%) with a
//! fixed seed, so each evaluation masks the same tokens of the same rows
//! whatever the training ratio, the run's seed or the world size; decoders
//! predict every next token of a document. A rank whose scoring fails (a
//! missing eval split, an unreadable shard) still takes part in the
//! exchange, so the world stays in step and training goes on; only a broken
//! collective is an error of the step.

use std::time::Instant;

use burn::module::AutodiffModule;
use twinhead_model::objectives::{self, EvalSums};
use twinhead_model::{ModelBackend, ModernBert, TrainBackend};
use twinhead_proto::v1::EvalPolicy;

use crate::collective::Collective;
use crate::loader::{PhaseReader, ReaderOptions};
use crate::runtime::TrainError;
use crate::train::{Job, RowMasks, prediction_batch};

/// Seed of the held-out masks: the same for every run, so two runs on one
/// dataset are scored on the same masked tokens.
const EVAL_MASK_SEED: u64 = 0x6576_616c_6d61_736b;

/// The world's held-out score.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HeldOut {
    pub(crate) sums: EvalSums,
    pub(crate) rows: u64,
    /// Wall time on this rank.
    pub(crate) seconds: f64,
}

impl HeldOut {
    /// Mean cross-entropy per predicted token.
    pub(crate) fn loss(&self) -> f64 {
        self.sums.loss_sum / self.sums.targets.max(1) as f64
    }

    /// Share of predicted tokens ranked first.
    pub(crate) fn accuracy(&self) -> f64 {
        self.sums.correct as f64 / self.sums.targets.max(1) as f64
    }
}

/// Whether a step that moved the phase from `tokens_before` to `tokens`
/// tokens evaluates: on crossing a multiple of `every_tokens`, and at the
/// phase end.
pub(crate) fn due(policy: &EvalPolicy, tokens_before: u64, tokens: u64, phase_end: bool) -> bool {
    let every = policy.every_tokens;
    phase_end || (every > 0 && tokens / every > tokens_before / every)
}

/// Scores the world's current weights on the held-out rows. The outer
/// error is the collective's (the world is broken); the inner one says why
/// the evaluation failed on some rank (the world is fine and trains on).
pub(crate) fn evaluate<B: TrainBackend>(
    model: &ModernBert<B>,
    job: &Job,
    phase_index: u32,
    policy: &EvalPolicy,
    rows_per_pass: u64,
    collective: &mut dyn Collective,
) -> Result<Result<HeldOut, String>, TrainError> {
    let started = Instant::now();
    let rank = collective.rank();
    let world = collective.world_size();
    let local = score_slice(
        &model.valid(),
        job,
        phase_index,
        policy,
        rows_per_pass,
        rank,
        world,
    );
    if let Err(message) = &local {
        tracing::warn!(rank, %message, "held-out evaluation failed");
    }
    let mine = match &local {
        Ok((sums, rows)) => [
            sums.loss_sum,
            sums.correct as f64,
            sums.targets as f64,
            *rows as f64,
            0.0,
        ],
        Err(_) => [0.0, 0.0, 0.0, 0.0, 1.0],
    };
    // Each rank's sums in turn, added in rank order in f64: every rank gets
    // the same bits, and the total matches one rank scoring every row up to
    // the order of the additions.
    let mut total = EvalSums::default();
    let mut rows = 0u64;
    let mut failed_ranks = Vec::new();
    for root in 0..world {
        let values = if world == 1 {
            mine
        } else {
            let mut bytes: Vec<u8> = if root == rank {
                mine.iter().flat_map(|v| v.to_le_bytes()).collect()
            } else {
                vec![0u8; mine.len() * 8]
            };
            collective.broadcast_bytes(&mut bytes, root)?;
            let mut values = [0f64; 5];
            for (v, chunk) in values.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut word = [0u8; 8];
                word.copy_from_slice(chunk);
                *v = f64::from_le_bytes(word);
            }
            values
        };
        if values[4] != 0.0 {
            failed_ranks.push(root);
        }
        total.add(EvalSums {
            loss_sum: values[0],
            correct: values[1] as u64,
            targets: values[2] as u64,
        });
        rows += values[3] as u64;
    }
    if !failed_ranks.is_empty() {
        return Ok(Err(match local {
            Err(message) => message,
            Ok(_) => format!("the evaluation failed on rank(s) {failed_ranks:?} (see their logs)"),
        }));
    }
    if total.targets == 0 {
        return Ok(Err("the held-out rows have no token to predict".into()));
    }
    Ok(Ok(HeldOut {
        sums: total,
        rows,
        seconds: started.elapsed().as_secs_f64(),
    }))
}

/// This rank's slice of the held-out rows: rows `[n·r/w, n·(r+1)/w)` of the
/// first `n`, scored `rows_per_pass` rows per forward pass.
fn score_slice<B: ModelBackend>(
    model: &ModernBert<B>,
    job: &Job,
    phase_index: u32,
    policy: &EvalPolicy,
    rows_per_pass: u64,
    rank: usize,
    world: usize,
) -> Result<(EvalSums, u64), String> {
    let phase = &job.phase;
    let mut reader = PhaseReader::open_eval(
        &job.spec.dataset,
        &phase.dataset_phase,
        phase.seq_len,
        ReaderOptions::default(),
    )
    .map_err(|e| e.to_string())?;
    let available = reader.sequences();
    let n = match policy.max_rows {
        0 => available,
        max => available.min(u64::from(max)),
    };
    let (rank, world) = (rank as u64, world as u64);
    let (start, end) = (n * rank / world, n * (rank + 1) / world);
    let masks = RowMasks {
        ratio: policy.mask_ratio,
        seed: EVAL_MASK_SEED,
        phase_index,
    };
    let mut sums = EvalSums::default();
    let mut first = start;
    while first < end {
        let last = (first + rows_per_pass.max(1)).min(end);
        let micro = reader.read_rows(first..last).map_err(|e| e.to_string())?;
        let batch = prediction_batch(job, masks, &micro).map_err(|e| e.to_string())?;
        sums.add(objectives::eval_sums(model, &batch).map_err(|e| e.to_string())?);
        first = last;
    }
    Ok((sums, end - start))
}
