//! The rules a run spec must satisfy. The CLI checks them before sending a
//! spec and the coordinator checks them again on arrival (a client may send
//! any message), so both report the same key and the same words.

use crate::batch::{BatchSchedule, MAX_RAMP_STEPS, ramp_increment};
use crate::v1::{LrShape, ModelSpec, Objective, PhaseSpec, RunSpec};

/// The shortest sequence a phase may train on.
pub const MIN_SEQ_LEN: u32 = 16;

/// What is wrong with a spec: the key path and the rule it breaks.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct SpecError {
    pub key: String,
    pub message: String,
}

fn fail<T>(key: impl Into<String>, message: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError {
        key: key.into(),
        message: message.into(),
    })
}

fn positive(key: &str, value: f64) -> Result<(), SpecError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        fail(key, format!("must be a positive number, got {value}"))
    }
}

fn in_unit_interval(key: &str, value: f64) -> Result<(), SpecError> {
    if (0.0..1.0).contains(&value) {
        Ok(())
    } else {
        fail(key, format!("must be in [0, 1), got {value}"))
    }
}

/// Steps in phase `phase_index`: whole batches that fit its token budget
/// (global batches, after the batch warmup in phase 0).
pub fn num_steps(spec: &RunSpec, phase_index: usize) -> u64 {
    let Some(phase) = spec.phases.get(phase_index) else {
        return 0;
    };
    let budget_rows = phase
        .tokens
        .checked_div(u64::from(phase.seq_len))
        .unwrap_or(0);
    BatchSchedule::for_phase(spec, phase_index).steps_within(budget_rows)
}

/// Checks a model shape: the one set of rules for every way a model config
/// arrives (a TOML file, a run spec, a Hugging Face `config.json`).
pub fn validate_model(m: &ModelSpec) -> Result<(), SpecError> {
    if m.name.trim().is_empty() {
        return fail("name", "must not be empty");
    }
    let counts = [
        ("vocab_size", m.vocab_size),
        ("hidden_size", m.hidden_size),
        ("num_layers", m.num_layers),
        ("num_heads", m.num_heads),
        ("intermediate_size", m.intermediate_size),
        ("max_position_embeddings", m.max_position_embeddings),
        ("local_attention", m.local_attention),
        ("global_attn_every_n_layers", m.global_attn_every_n_layers),
    ];
    for (key, value) in counts {
        if value == 0 {
            return fail(key, "must be at least 1");
        }
    }
    if !m.hidden_size.is_multiple_of(m.num_heads) {
        return fail(
            "num_heads",
            format!(
                "must divide hidden_size {} evenly, got {}",
                m.hidden_size, m.num_heads
            ),
        );
    }
    if !(m.hidden_size / m.num_heads).is_multiple_of(2) {
        return fail(
            "num_heads",
            "the head dimension must be even for rotary embeddings",
        );
    }
    if !m.local_attention.is_multiple_of(2) {
        return fail(
            "local_attention",
            format!(
                "must be even (half on each side), got {}",
                m.local_attention
            ),
        );
    }
    positive("global_rope_theta", m.global_rope_theta)?;
    positive("local_rope_theta", m.local_rope_theta)?;
    positive("norm_eps", m.norm_eps)?;
    positive("initializer_range", m.initializer_range)?;
    in_unit_interval("attention_dropout", m.attention_dropout)?;
    in_unit_interval("embedding_dropout", m.embedding_dropout)?;
    in_unit_interval("mlp_dropout", m.mlp_dropout)?;
    for (key, id) in [
        ("pad_token_id", m.pad_token_id),
        ("cls_token_id", m.cls_token_id),
        ("sep_token_id", m.sep_token_id),
        ("mask_token_id", m.mask_token_id),
        ("unk_token_id", m.unk_token_id.unwrap_or(0)),
    ] {
        if id >= m.vocab_size {
            return fail(
                key,
                format!("must be below vocab_size {}, got {id}", m.vocab_size),
            );
        }
    }
    Ok(())
}

/// The values of `RunSpec.precision` (empty means f32).
pub const PRECISIONS: [&str; 3] = ["", "f32", "bf16-mixed"];

/// Checks a whole run spec; the first broken rule is reported.
pub fn validate_run_spec(spec: &RunSpec) -> Result<(), SpecError> {
    if spec.name.trim().is_empty() {
        return fail("name", "must not be empty");
    }
    if !spec
        .name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return fail(
            "name",
            format!(
                "may hold letters, digits, '-', '_' and '.', got {:?}",
                spec.name
            ),
        );
    }
    let Some(model) = spec.model.as_ref() else {
        return fail("model", "is required");
    };
    validate_model(model).map_err(|e| SpecError {
        key: format!("model.{}", e.key),
        message: e.message,
    })?;
    if !PRECISIONS.contains(&spec.precision.as_str()) {
        return fail(
            "precision",
            format!(
                "must be \"f32\" or \"bf16-mixed\", got {:?}",
                spec.precision
            ),
        );
    }
    let objective = Objective::try_from(spec.objective).unwrap_or(Objective::Unspecified);
    if objective == Objective::Unspecified {
        return fail("objective", "must be one of mlm, clm, mntp");
    }
    if spec.dataset.trim().is_empty() {
        return fail(
            "dataset",
            "must name the dataset's URL (the folder holding manifest.json)",
        );
    }
    if spec.world_size == 0 {
        return fail("world_size", "must be at least 1");
    }
    if spec.global_batch == 0 {
        return fail("global_batch", "must be at least 1");
    }
    if !spec.global_batch.is_multiple_of(spec.world_size) {
        return fail(
            "world_size",
            format!(
                "must divide global_batch {} evenly, got {}",
                spec.global_batch, spec.world_size
            ),
        );
    }
    if spec.min_world_size > spec.world_size {
        return fail(
            "min_world_size",
            format!(
                "must not exceed world_size {}, got {}",
                spec.world_size, spec.min_world_size
            ),
        );
    }
    let per_rank = spec.global_batch / spec.world_size;
    if spec.micro_batch > per_rank {
        return fail(
            "micro_batch",
            format!(
                "must not exceed the per-rank batch {per_rank} (global_batch / world_size), got {}",
                spec.micro_batch
            ),
        );
    }
    let Some(optimizer) = spec.optimizer.as_ref() else {
        return fail("optimizer", "is required");
    };
    if optimizer.name != "stable_adamw" {
        return fail(
            "optimizer.name",
            format!("must be stable_adamw, got {:?}", optimizer.name),
        );
    }
    positive("optimizer.peak_lr", optimizer.peak_lr)?;
    in_unit_interval("optimizer.beta1", optimizer.beta1)?;
    in_unit_interval("optimizer.beta2", optimizer.beta2)?;
    positive("optimizer.eps", optimizer.eps)?;
    if !(optimizer.weight_decay.is_finite() && optimizer.weight_decay >= 0.0) {
        return fail(
            "optimizer.weight_decay",
            format!("must be zero or positive, got {}", optimizer.weight_decay),
        );
    }
    if !(optimizer.grad_clip.is_finite() && optimizer.grad_clip >= 0.0) {
        return fail(
            "optimizer.grad_clip",
            format!(
                "must be zero (off) or positive, got {}",
                optimizer.grad_clip
            ),
        );
    }
    let Some(checkpoint) = spec.checkpoint.as_ref() else {
        return fail("checkpoint", "is required");
    };
    if checkpoint.root.trim().is_empty() {
        return fail("checkpoint.root", "must name where checkpoints are written");
    }
    if spec.phases.is_empty() {
        return fail(
            "phases",
            "at least one phase is required ([[phases]] with name, tokens, seq_len)",
        );
    }
    validate_batch_warmup(spec)?;
    if let Some(eval) = spec.eval.as_ref() {
        for (i, task) in eval.tasks.iter().enumerate() {
            if task.trim().is_empty() || task.contains(',') {
                return fail(
                    format!("eval.tasks[{i}]"),
                    format!("{task:?} is not a task name (`arc_easy`, `piqa:rc_5shot`, …)"),
                );
            }
            if eval.tasks[..i].contains(task) {
                return fail(
                    format!("eval.tasks[{i}]"),
                    format!("{task:?} is listed twice"),
                );
            }
        }
    }
    if let Some(eval) = spec.eval.as_ref()
        && objective != Objective::Clm
        && !(eval.mask_ratio > 0.0 && eval.mask_ratio < 1.0)
    {
        return fail(
            "eval.mask_ratio",
            format!(
                "must be between 0 and 1 (exclusive) for a masked objective, got {}",
                eval.mask_ratio
            ),
        );
    }
    for (i, phase) in spec.phases.iter().enumerate() {
        validate_phase(spec, model, objective, i, phase)?;
    }
    for (i, phase) in spec.phases.iter().enumerate() {
        if spec.phases[..i].iter().any(|p| p.name == phase.name) {
            return fail(
                format!("phases[{i}].name"),
                format!("{:?} is used by an earlier phase", phase.name),
            );
        }
    }
    Ok(())
}

/// Checks `batch_warmup`: it ramps the batch over the start of phase 0 in
/// moves of `world_size × micro_batch` sequences (see [`crate::batch`]).
fn validate_batch_warmup(spec: &RunSpec) -> Result<(), SpecError> {
    let Some(warmup) = spec.batch_warmup.as_ref() else {
        return Ok(());
    };
    let increment = ramp_increment(spec.world_size, spec.micro_batch);
    let start = u64::from(warmup.start);
    if start == 0 {
        return fail("batch_warmup.start", "must be at least 1");
    }
    if warmup.start > spec.global_batch {
        return fail(
            "batch_warmup.start",
            format!(
                "must not exceed global_batch {}, got {}",
                spec.global_batch, warmup.start
            ),
        );
    }
    if !start.is_multiple_of(increment) {
        return fail(
            "batch_warmup.start",
            format!(
                "must be a multiple of world_size x micro_batch ({increment} sequences; \
                 the ramp grows in such steps so every rank gets whole micro-batches), got {start}"
            ),
        );
    }
    if warmup.tokens == 0 {
        return fail("batch_warmup.tokens", "must be a positive token count");
    }
    let phase_tokens = spec.phases.first().map_or(0, |p| p.tokens);
    if warmup.tokens > phase_tokens {
        return fail(
            "batch_warmup.tokens",
            format!(
                "must fit in the first phase's {phase_tokens} tokens (the ramp belongs to phase 0), got {}",
                warmup.tokens
            ),
        );
    }
    // Every ramp step takes at least `start` rows: a bound on its length.
    let seq_len = spec
        .phases
        .first()
        .map_or(1, |p| u64::from(p.seq_len.max(1)));
    let longest = warmup.tokens.div_ceil(start.saturating_mul(seq_len));
    if longest > MAX_RAMP_STEPS {
        return fail(
            "batch_warmup.start",
            format!(
                "the ramp could take {longest} steps, more than {MAX_RAMP_STEPS}; raise start or lower tokens"
            ),
        );
    }
    Ok(())
}

fn validate_phase(
    spec: &RunSpec,
    model: &ModelSpec,
    objective: Objective,
    i: usize,
    phase: &PhaseSpec,
) -> Result<(), SpecError> {
    let key = |field: &str| format!("phases[{i}].{field}");
    if phase.name.trim().is_empty() {
        return fail(key("name"), "must not be empty");
    }
    if phase.tokens == 0 {
        return fail(key("tokens"), "must be a positive token budget");
    }
    if phase.seq_len < MIN_SEQ_LEN || phase.seq_len > model.max_position_embeddings {
        return fail(
            key("seq_len"),
            format!(
                "must be between {MIN_SEQ_LEN} and the model's max_position_embeddings {}, got {}",
                model.max_position_embeddings, phase.seq_len
            ),
        );
    }
    if num_steps(spec, i) == 0 {
        return fail(
            key("tokens"),
            format!(
                "budget {} is less than one global batch ({} sequences x {} tokens)",
                phase.tokens,
                BatchSchedule::for_phase(spec, i).smallest_batch(),
                phase.seq_len
            ),
        );
    }
    match objective {
        Objective::Mlm | Objective::Mntp => {
            if !(phase.mask_ratio > 0.0 && phase.mask_ratio < 1.0) {
                return fail(
                    key("mask_ratio"),
                    format!(
                        "must be in (0, 1) for masked objectives, got {}",
                        phase.mask_ratio
                    ),
                );
            }
        }
        _ => {
            if phase.mask_ratio != 0.0 {
                return fail(
                    key("mask_ratio"),
                    "applies to mlm and mntp only; remove it for clm",
                );
            }
        }
    }
    positive(&key("global_rope_theta"), phase.global_rope_theta)?;
    positive(&key("local_rope_theta"), phase.local_rope_theta)?;
    let Some(lr) = phase.lr.as_ref() else {
        return fail(key("lr"), "is required");
    };
    if LrShape::try_from(lr.shape).unwrap_or(LrShape::Unspecified) == LrShape::Unspecified {
        return fail(
            key("lr.shape"),
            "must be one of constant, linear, one_minus_sqrt, cosine",
        );
    }
    for (field, factor) in [
        ("lr.start_factor", lr.start_factor),
        ("lr.end_factor", lr.end_factor),
    ] {
        if !(factor.is_finite() && factor >= 0.0) {
            return fail(
                key(field),
                format!("must be zero or positive, got {factor}"),
            );
        }
    }
    if lr.warmup_tokens.saturating_add(lr.decay_tokens) > phase.tokens {
        return fail(
            key("lr.warmup_tokens"),
            format!(
                "warmup ({}) plus decay ({}) exceed the phase's {} tokens",
                lr.warmup_tokens, lr.decay_tokens, phase.tokens
            ),
        );
    }
    Ok(())
}
