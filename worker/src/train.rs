//! The training loop: one assignment (a phase's steps on one rank) of an
//! Ettin model on Burn, with gradients all-reduced through the world's
//! collective and StableAdamW applied on the weights' device.
//!
//! Per step:
//! 1. the prefetcher hands over this rank's rows of global batch `g`;
//! 2. each row is masked with an RNG seeded by (run seed, phase, global
//!    row), so the same row gets the same mask whatever the world size;
//! 3. per micro-batch: loss = sum of token losses, backward, gradients
//!    summed per parameter on the device;
//! 4. one all-reduce of one flat device buffer [gradients in module order…,
//!    loss sum, target count, leave flag] (NCCL reduces it in place; the
//!    CPU engines stage it through the host); gradients are divided by the
//!    world's mean target count, so the update is the gradient of the
//!    global batch's mean loss, exactly as one process training the whole
//!    batch would compute it. Reading the last three values is the step's
//!    one host sync;
//! 5. StableAdamW at the phase's LR for the tokens seen, on the device;
//!    the rows are appended to the data-order log;
//! 6. progress to the coordinator; on the run's `[eval]` policy (and at
//!    the phase's last step) the world scores the held-out rows (see
//!    `held_out`); on the checkpoint policy (and at the phase's last step)
//!    rank 0 writes a checkpoint and reports it.
//!
//! The all-reduce also carries each rank's "asked to leave" flag, so every
//! rank learns in the same step that the world must stop: that step gets a
//! checkpoint, and all ranks return [`PhaseEnd::Stopped`] once rank 0 has
//! reported it.

use std::time::{Duration, Instant};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use twinhead_proto::BatchSchedule;
use twinhead_proto::v1::{
    Assignment, Checkpoint, CheckpointPolicy, EvalPoint, LrShape, PhaseSpec, RunSpec,
};

use crate::checkpoint::{
    self, CheckpointError, CheckpointInfo, CheckpointSnapshot, CheckpointWriter, NamedTensors,
    OptimizerState,
};
use crate::collective::Collective;
use crate::held_out;
use crate::loader::order::DataOrderLog;
use crate::loader::{BatchPlan, MicroBatch, PhaseReader, Prefetcher, ReaderOptions};
use crate::optim::{StableAdamW, StableAdamWConfig, StepStats, TensorSpec};
use crate::runtime::{Link, PhaseEnd, Progress, TrainError, Trainer};
use crate::schedule::{DecayLaw, LrSchedule};
use twinhead_model::objectives::Objective;
use twinhead_model::objectives::{self, MaskingConfig, ObjectiveError, PredictionBatch};
use twinhead_model::{ModelBackend, ModelConfig, ModernBert, Precision, TokenBatch, TrainBackend};

/// The model shape of a run spec, as the model code takes it.
pub fn model_config(spec: &RunSpec) -> Result<ModelConfig, TrainError> {
    let m = spec
        .model
        .as_ref()
        .ok_or_else(|| TrainError::Spec("model: is missing".into()))?;
    ModelConfig::from_spec(m).map_err(|e| TrainError::Spec(e.to_string()))
}

/// The objective a run spec names.
fn objective(spec: &RunSpec) -> Result<Objective, TrainError> {
    Objective::from_spec(spec.objective).ok_or_else(|| {
        TrainError::Spec(format!(
            "objective: {} is not mlm, clm or mntp",
            spec.objective
        ))
    })
}

/// An assignment resolved once, strictly: every part of the spec that the
/// phase's steps use, checked before the first step.
pub(crate) struct Job {
    pub(crate) spec: RunSpec,
    pub(crate) phase: PhaseSpec,
    pub(crate) config: ModelConfig,
    pub(crate) objective: Objective,
    precision: Precision,
    schedule: LrSchedule,
    peak_lr: f64,
    checkpoints: CheckpointPolicy,
    options: StepOptions,
}

impl Job {
    fn resolve(a: &Assignment) -> Result<Self, TrainError> {
        let spec = a
            .spec
            .clone()
            .ok_or_else(|| TrainError::Spec("the assignment carries no spec".into()))?;
        let phase = spec
            .phases
            .get(a.phase_index as usize)
            .cloned()
            .ok_or_else(|| {
                TrainError::Spec(format!(
                    "phases[{}]: the spec has {} phases",
                    a.phase_index,
                    spec.phases.len()
                ))
            })?;
        let peak_lr = spec
            .optimizer
            .as_ref()
            .ok_or_else(|| TrainError::Spec("optimizer: is missing".into()))?
            .peak_lr;
        let checkpoints = spec
            .checkpoint
            .clone()
            .ok_or_else(|| TrainError::Spec("checkpoint: is missing".into()))?;
        Ok(Self {
            config: model_config(&spec)?,
            objective: objective(&spec)?,
            precision: Precision::parse(&spec.precision)
                .map_err(|e| TrainError::Spec(format!("precision: {e}")))?,
            schedule: lr_schedule(&phase)?,
            options: StepOptions::of(&spec),
            peak_lr,
            checkpoints,
            phase,
            spec,
        })
    }
}

// ------------------------------------------------- parameters as buffers

/// Float parameters in module order, with dotted names.
struct ParamNames {
    path: Vec<String>,
    out: Vec<(String, Vec<usize>, ParamId)>,
}

impl<B: Backend> ModuleVisitor<B> for ParamNames {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let name = if self.path.is_empty() {
            format!("param{}", self.out.len())
        } else {
            self.path.join(".")
        };
        self.out.push((name, param.val().dims().to_vec(), param.id));
    }
}

/// Name, shape and id of every float parameter, in module order.
fn param_names<B: Backend>(model: &ModernBert<B>) -> Vec<(String, Vec<usize>, ParamId)> {
    let mut names = ParamNames {
        path: Vec::new(),
        out: Vec::new(),
    };
    model.visit(&mut names);
    names.out
}

fn specs_of(params: &[(String, Vec<usize>, ParamId)]) -> Vec<TensorSpec> {
    params
        .iter()
        .map(|(n, s, _)| TensorSpec::for_shape(n, s))
        .collect()
}

/// What StableAdamW needs to know of each float parameter of `model` (its
/// size, and Ettin's rule for weight decay), in module order.
pub fn optimizer_specs<B: Backend>(model: &ModernBert<B>) -> Vec<TensorSpec> {
    specs_of(&param_names(model))
}

/// Copies every float parameter to the host, in module order.
struct ReadParams(Vec<Vec<f32>>);

impl<B: Backend> ModuleVisitor<B> for ReadParams {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0.push(
            param
                .val()
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .unwrap_or_default(),
        );
    }
}

/// Replaces every float parameter by the next host buffer, in module order.
struct WriteParams<'a, B: Backend> {
    values: &'a [Vec<f32>],
    next: usize,
    device: B::Device,
}

impl<B: Backend> ModuleMapper<B> for WriteParams<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.dims();
        let Some(values) = self.values.get(self.next) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        self.next += 1;
        let fresh = Tensor::<B, D>::from_data(TensorData::new(values.clone(), shape), &self.device);
        let fresh = if tensor.is_require_grad() {
            fresh.require_grad()
        } else {
            fresh
        };
        Param::from_mapped_value(id, fresh, mapper)
    }
}

/// Takes every float parameter out of the model as a flat tensor on the
/// inner backend (no copy, no autodiff graph), in module order, with its
/// shape, leaving an empty placeholder: the optimizer then holds the only
/// reference to each and can update it in place.
pub struct TakeFlatParams<B: TrainBackend> {
    values: Vec<Tensor<B::InnerBackend, 1>>,
    shapes: Vec<Vec<usize>>,
}

impl<B: TrainBackend> Default for TakeFlatParams<B> {
    fn default() -> Self {
        Self {
            values: Vec::new(),
            shapes: Vec::new(),
        }
    }
}

impl<B: TrainBackend> TakeFlatParams<B> {
    /// The flat values taken so far (handed over once).
    pub fn take_values(&mut self) -> Vec<Tensor<B::InnerBackend, 1>> {
        std::mem::take(&mut self.values)
    }

    /// Puts `values` (flat, in the order taken) back as the parameters.
    pub fn put_back(self, values: Vec<Tensor<B::InnerBackend, 1>>) -> SetFlatParams<B> {
        SetFlatParams {
            values: values.into_iter(),
            shapes: self.shapes.into_iter(),
        }
    }
}

impl<B: TrainBackend> ModuleMapper<B> for TakeFlatParams<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let required = tensor.is_require_grad();
        let dims = tensor.dims();
        let inner = tensor.inner();
        let device = inner.device();
        self.shapes.push(dims.to_vec());
        self.values
            .push(B::InnerBackend::reshaped(inner, [dims.iter().product()]));
        let placeholder = Tensor::<B, D>::from_inner(Tensor::empty([0; D], &device));
        let placeholder = if required {
            placeholder.require_grad()
        } else {
            placeholder
        };
        Param::from_mapped_value(id, placeholder, mapper)
    }
}

/// Replaces every float parameter by the next flat tensor, shaped as taken.
pub struct SetFlatParams<B: TrainBackend> {
    values: std::vec::IntoIter<Tensor<B::InnerBackend, 1>>,
    shapes: std::vec::IntoIter<Vec<usize>>,
}

impl<B: TrainBackend> ModuleMapper<B> for SetFlatParams<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let (Some(flat), Some(shape)) = (self.values.next(), self.shapes.next()) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let Ok(dims) = <[usize; D]>::try_from(shape) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let fresh = Tensor::<B, D>::from_inner(B::InnerBackend::reshaped(flat, dims));
        let fresh = if tensor.is_require_grad() {
            fresh.require_grad()
        } else {
            fresh
        };
        Param::from_mapped_value(id, fresh, mapper)
    }
}

/// Adds each parameter's gradient (taken out of `grads`) to its running
/// sum on the device, in module order.
struct AddGrads<'a, B: TrainBackend> {
    grads: &'a mut GradientsParams,
    sums: &'a mut [Option<Tensor<B::InnerBackend, 1>>],
    next: usize,
}

impl<B: TrainBackend> ModuleVisitor<B> for AddGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let index = self.next;
        self.next += 1;
        let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) else {
            return;
        };
        let n = g.shape().num_elements();
        let g = B::InnerBackend::reshaped(g, [n]);
        if let Some(sum) = self.sums.get_mut(index) {
            *sum = Some(match sum.take() {
                Some(s) => s + g,
                None => g,
            });
        }
    }
}

/// Mean over the world's ranks of a flat device buffer. NCCL reduces a
/// CUDA buffer in place; other engines and backends go through the host.
fn all_reduce_flat<B: Backend>(
    collective: &mut dyn Collective,
    flat: Tensor<B, 1>,
) -> Result<Tensor<B, 1>, TrainError> {
    if collective.world_size() == 1 {
        return Ok(flat);
    }
    #[cfg(feature = "cuda")]
    if let Some(engine) = collective.as_nccl()
        && crate::collective::nccl::all_reduce_mean_tensor(engine, &flat)?
    {
        return Ok(flat);
    }
    through_host(flat, |host| collective.all_reduce_mean(host))
}

/// Rank `root`'s flat device buffer on every rank, the same way.
fn broadcast_flat<B: Backend>(
    collective: &mut dyn Collective,
    flat: Tensor<B, 1>,
    root: usize,
) -> Result<Tensor<B, 1>, TrainError> {
    if collective.world_size() == 1 {
        return Ok(flat);
    }
    #[cfg(feature = "cuda")]
    if let Some(engine) = collective.as_nccl()
        && crate::collective::nccl::broadcast_tensor(engine, &flat, root)?
    {
        return Ok(flat);
    }
    through_host(flat, |host| collective.broadcast(host, root))
}

/// Runs a host collective on a copy of `flat` and returns the result on
/// `flat`'s device.
fn through_host<B: Backend>(
    flat: Tensor<B, 1>,
    op: impl FnOnce(&mut [f32]) -> Result<(), crate::collective::CollectiveError>,
) -> Result<Tensor<B, 1>, TrainError> {
    let device = flat.device();
    let [n] = flat.dims();
    let mut host = flat
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| TrainError::Failed(format!("collective buffer: {e:?}")))?;
    op(&mut host)?;
    Ok(Tensor::from_data(TensorData::new(host, [n]), &device))
}

/// How a step computes its gradients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepOptions {
    /// Recompute each layer's activations in the backward pass (see
    /// [`objectives::recomputed_gradients`]).
    pub activation_checkpointing: bool,
}

impl StepOptions {
    /// The options a run spec asks for.
    pub fn of(spec: &RunSpec) -> Self {
        Self {
            activation_checkpointing: spec.activation_checkpointing,
        }
    }
}

/// What one step of the world produced.
#[derive(Debug, Clone)]
pub struct StepOutcome<B: Backend> {
    /// The global batch's mean loss per target token.
    pub mean_loss: f64,
    /// Some rank was asked to leave: the world stops after this step.
    pub stopping: bool,
    /// The optimizer's statistics, still on the device.
    pub stats: StepStats<B>,
}

/// One data-parallel step on the weights' device: forward and backward
/// over this rank's micro-batches (loss = sum of token losses, gradients
/// summed per parameter), one all-reduce of the flat buffer [gradients in
/// module order…, loss sum, target count, leave flag], gradients divided by
/// the world's mean target count, StableAdamW at `lr`. Reading the last
/// three values is the step's one host sync. Returns the updated model.
// The step's inputs are distinct: the model and its optimizer, this rank's
// data, the schedule's LR, the leave flag, run options and the world.
#[allow(clippy::too_many_arguments)]
pub fn train_step<B: TrainBackend>(
    model: ModernBert<B>,
    optimizer: &mut StableAdamW<B::InnerBackend>,
    micro_batches: &[PredictionBatch],
    lr: f64,
    leave: bool,
    options: StepOptions,
    collective: &mut dyn Collective,
    device: &B::Device,
) -> Result<(ModernBert<B>, StepOutcome<B::InnerBackend>), TrainError> {
    let lens = optimizer.tensor_lens();
    let mut sums: Vec<Option<Tensor<B::InnerBackend, 1>>> = vec![None; lens.len()];
    let mut loss_sum: Option<Tensor<B::InnerBackend, 1>> = None;
    let mut count = 0usize;
    for prediction in micro_batches {
        let n = prediction.targets.len();
        if n == 0 {
            continue;
        }
        // Sum of token losses: normalised by the global count below.
        let (detached, pieces) = if options.activation_checkpointing {
            objectives::recomputed_gradients(&model, prediction, n as f64)?
        } else {
            let mean = objectives::loss(&model, prediction)?;
            let total = mean.mul_scalar(n as f64);
            let detached = total.clone().inner();
            (
                detached,
                vec![GradientsParams::from_grads(total.backward(), &model)],
            )
        };
        loss_sum = Some(match loss_sum.take() {
            Some(l) => l + detached,
            None => detached,
        });
        count += n;
        for mut grads in pieces {
            model.visit(&mut AddGrads::<B> {
                grads: &mut grads,
                sums: &mut sums,
                next: 0,
            });
        }
    }
    let param_count: usize = lens.iter().sum();
    let mut parts: Vec<Tensor<B::InnerBackend, 1>> = sums
        .into_iter()
        .zip(&lens)
        .map(|(sum, &len)| sum.unwrap_or_else(|| Tensor::zeros([len], device)))
        .collect();
    parts.push(loss_sum.unwrap_or_else(|| Tensor::zeros([1], device)));
    parts.push(Tensor::from_data(
        TensorData::new(vec![count as f32, if leave { 1.0 } else { 0.0 }], [2]),
        device,
    ));
    let packed = all_reduce_flat(collective, B::InnerBackend::cat_flat(parts))?;
    let extras = packed
        .clone()
        .slice(param_count..param_count + 3)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| TrainError::Failed(format!("gradient buffer: {e:?}")))?;
    let [loss_total, mean_count, leave_any] = [0, 1, 2].map(|i| f64::from(extras[i]));
    // A step without a single target anywhere has a zero gradient, not 0/0.
    let per_target = if mean_count > 0.0 {
        1.0 / mean_count
    } else {
        0.0
    };
    let grads = packed.slice(0..param_count);
    let mut params = TakeFlatParams::<B>::default();
    let model = model.map(&mut params);
    let values = params.take_values();
    let (updated, stats) = optimizer.step_scaled(lr, values, grads, per_target)?;
    let model = model.map(&mut params.put_back(updated));
    Ok((
        model,
        StepOutcome {
            mean_loss: loss_total * per_target,
            stopping: leave_any > 0.0,
            stats,
        },
    ))
}

/// FNV-1a over names and shapes: ranks must agree on the model's layout.
fn fingerprint(params: &[(String, Vec<usize>, ParamId)]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, shape, _) in params {
        for b in name
            .bytes()
            .chain(shape.iter().flat_map(|d| (*d as u64).to_le_bytes()))
        {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// A seed for one row: the same row gets the same mask on any rank.
fn row_seed(seed: u64, phase: u32, row: u64) -> u64 {
    let mut z = seed ^ (u64::from(phase) << 48) ^ row.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ----------------------------------------------------------- the trainer

/// The model and optimizer between assignments of one run.
struct Session<B: TrainBackend> {
    run_id: String,
    model: ModernBert<B>,
    params: Vec<(String, Vec<usize>, ParamId)>,
    optimizer: StableAdamW<B::InnerBackend>,
    /// (phase, steps done) the in-memory state corresponds to.
    at: (u32, u64),
    /// The world whose ranks last agreed on these weights.
    world_id: String,
}

/// Trains Ettin models on backend `B` (CPU: [`twinhead_model::CpuAutodiff`]).
pub struct BurnTrainer<B: TrainBackend> {
    device: B::Device,
    session: Option<Session<B>>,
    /// Progress reports at most this often.
    report_every: std::time::Duration,
    /// Peak FLOP/s of the device for the MFU estimate (0: not reported).
    peak_flops: f64,
}

impl<B: TrainBackend> BurnTrainer<B> {
    pub fn new(device: B::Device) -> Self {
        let peak_flops = std::env::var("TWINHEAD_PEAK_FLOPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Self {
            device,
            session: None,
            report_every: std::time::Duration::from_millis(500),
            peak_flops,
        }
    }

    fn optimizer_config(spec: &RunSpec, phase: &PhaseSpec) -> StableAdamWConfig {
        let o = spec.optimizer.clone().unwrap_or_default();
        let start = phase.lr.as_ref().map_or(1.0, |l| l.start_factor);
        let mut config = StableAdamWConfig::new(o.peak_lr * start, o.weight_decay);
        config.beta1 = o.beta1;
        config.beta2 = o.beta2;
        config.eps = o.eps;
        config.max_grad_norm = (o.grad_clip > 0.0).then_some(o.grad_clip);
        config
    }

    /// Model and optimizer for the assignment: kept from the last phase,
    /// loaded from its checkpoint, or initialised (rank 0's broadcast).
    fn prepare(
        &mut self,
        a: &Assignment,
        job: &Job,
        collective: &mut dyn Collective,
    ) -> Result<(), TrainError> {
        let (spec, phase) = (&job.spec, &job.phase);
        let start = a.start_checkpoint.as_ref().map(|c| (c.phase_index, c.step));
        let keep = self
            .session
            .as_ref()
            .is_some_and(|s| s.run_id == a.run_id && Some(s.at) == start);
        if !keep {
            let model = ModernBert::<B>::new(
                &job.config,
                job.objective.flavour(),
                spec.seed,
                &self.device,
            )
            .with_precision(job.precision);
            let params = param_names(&model);
            let mut optimizer = StableAdamW::new(
                Self::optimizer_config(spec, phase),
                &specs_of(&params),
                &self.device,
            )?;
            // Weights from a checkpoint or `init_from`; else the fresh ones.
            let mut values = None;
            if let Some(c) = &a.start_checkpoint {
                let bad = |message: String| TrainError::BadCheckpoint {
                    url: c.url.clone(),
                    message,
                };
                let loaded =
                    checkpoint::load(&c.url).map_err(|e| start_checkpoint_error(&c.url, e))?;
                values =
                    Some(match_tensors(&params, loaded.model).map_err(|e| bad(e.to_string()))?);
                optimizer
                    .restore(loaded.optimizer.step, loaded.optimizer.tensors)
                    .map_err(|e| bad(format!("optimizer state: {e}")))?;
            } else if !spec.init_from.is_empty() {
                values = Some(init_weights::<B>(&spec.init_from, &params, &self.device)?);
            }
            let model = match values {
                Some(values) => write_params(model, &values, &self.device),
                None => model,
            };
            self.session = Some(Session {
                run_id: a.run_id.clone(),
                model,
                params,
                optimizer,
                at: start.unwrap_or((a.phase_index, 0)),
                world_id: String::new(),
            });
        }
        if let Some(s) = self.session.as_mut()
            && s.world_id != a.world_id
        {
            // A new world: a rank that kept its model in memory and one that
            // loaded the checkpoint both get here, so their collective calls
            // match. They agree on the layout and take rank 0's weights.
            collective.check_fingerprint(fingerprint(&s.params))?;
            let mut params = TakeFlatParams::<B>::default();
            let taken = s.model.clone().map(&mut params);
            let lens = s.optimizer.tensor_lens();
            let values = params.take_values();
            let all = broadcast_flat(collective, B::InnerBackend::cat_flat(values), 0)?;
            let mut offset = 0;
            let parts: Vec<_> = lens
                .iter()
                .map(|&len| {
                    offset += len;
                    all.clone().slice(offset - len..offset)
                })
                .collect();
            s.model = taken.map(&mut params.put_back(parts));
            s.world_id = a.world_id.clone();
        }
        if let Some(s) = self.session.as_mut() {
            if a.phase_start {
                // A new phase restarts its LR law and keeps the moments.
                s.optimizer
                    .set_config(Self::optimizer_config(spec, phase))?;
            }
            let model = s
                .model
                .clone()
                .with_rope_theta(phase.global_rope_theta, phase.local_rope_theta);
            s.model = model;
        }
        Ok(())
    }
}

/// Why the checkpoint a world starts from could not be loaded. A store
/// that cannot be reached says nothing about the checkpoint: the world
/// fails and retries it. Anything else (missing, torn, corrupt) makes it
/// unusable, and the coordinator steps back to the one before.
fn start_checkpoint_error(url: &str, e: CheckpointError) -> TrainError {
    match e {
        CheckpointError::Store(store) if store.is_transient() => {
            TrainError::Checkpoint(CheckpointError::Store(store))
        }
        e => TrainError::BadCheckpoint {
            url: url.to_string(),
            message: e.to_string(),
        },
    }
}

/// The weights `init_from` names, in the order of `params`: a Hugging Face
/// folder (it has `config.json`) or a committed twinhead checkpoint of any
/// run and objective. Weights only; the caller's optimizer starts fresh.
fn init_weights<B: Backend>(
    init_from: &str,
    params: &[(String, Vec<usize>, ParamId)],
    device: &B::Device,
) -> Result<Vec<Vec<f32>>, TrainError> {
    let refused = |message: String| TrainError::Spec(format!("init_from {init_from}: {message}"));
    let folder = twinhead_data::store::Location::open(init_from, false)
        .map_err(|e| refused(e.to_string()))?;
    let is_hf = folder
        .exists("config.json")
        .map_err(|e| refused(e.to_string()))?;
    let tensors: NamedTensors = if is_hf {
        let path = init_from.trim_start_matches("file://");
        let imported = twinhead_model::hf::load::<B>(std::path::Path::new(path), device)
            .map_err(|e| refused(e.to_string()))?;
        param_names(&imported)
            .into_iter()
            .zip(read_params(&imported))
            .map(|((name, shape, _), values)| (name, shape, values))
            .collect()
    } else {
        // Refuses a folder without COMMITTED or whose files do not hash.
        checkpoint::load(init_from)
            .map_err(|e| refused(e.to_string()))?
            .model
    };
    match_tensors(params, tensors).map_err(|e| refused(e.to_string()))
}

fn read_params<B: Backend>(model: &ModernBert<B>) -> Vec<Vec<f32>> {
    let mut reader = ReadParams(Vec::new());
    model.visit(&mut reader);
    reader.0
}

fn write_params<B: Backend>(
    model: ModernBert<B>,
    values: &[Vec<f32>],
    device: &B::Device,
) -> ModernBert<B> {
    let mut writer = WriteParams::<B> {
        values,
        next: 0,
        device: device.clone(),
    };
    model.map(&mut writer)
}

fn match_tensors(
    params: &[(String, Vec<usize>, ParamId)],
    loaded: NamedTensors,
) -> Result<Vec<Vec<f32>>, TrainError> {
    if loaded.len() != params.len() {
        return Err(TrainError::Failed(format!(
            "checkpoint holds {} tensors, the model has {}",
            loaded.len(),
            params.len()
        )));
    }
    params
        .iter()
        .zip(loaded)
        .map(|((name, shape, _), (lname, lshape, values))| {
            if *name != lname || *shape != lshape {
                Err(TrainError::Failed(format!(
                    "checkpoint tensor {lname} {lshape:?} does not match the model's {name} {shape:?}"
                )))
            } else {
                Ok(values)
            }
        })
        .collect()
}

fn lr_schedule(phase: &PhaseSpec) -> Result<LrSchedule, TrainError> {
    let lr = phase.lr.unwrap_or_default();
    let law = match LrShape::try_from(lr.shape) {
        Ok(LrShape::Linear) => DecayLaw::Linear,
        Ok(LrShape::OneMinusSqrt) => DecayLaw::OneMinusSqrt,
        Ok(LrShape::Cosine) => DecayLaw::Cosine,
        _ => DecayLaw::Constant,
    };
    let decay = (lr.decay_tokens > 0).then_some(lr.decay_tokens);
    LrSchedule::new(
        phase.tokens,
        lr.warmup_tokens,
        law,
        lr.start_factor,
        lr.end_factor,
        decay,
    )
    .map_err(|e| TrainError::Spec(format!("phase {}: {e}", phase.name)))
}

/// How the rows of a batch are masked: at `ratio`, each row with an RNG
/// seeded by (`seed`, phase, the row's index), so a row gets the same mask
/// on any rank.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowMasks {
    pub(crate) ratio: f64,
    pub(crate) seed: u64,
    pub(crate) phase_index: u32,
}

impl RowMasks {
    /// The training masks of a phase: its mask ratio, the run's seed.
    fn training(job: &Job, phase_index: u32) -> Self {
        Self {
            ratio: job.phase.mask_ratio,
            seed: job.spec.seed,
            phase_index,
        }
    }
}

/// Masks or shifts one micro-batch for the objective, row by row.
pub(crate) fn prediction_batch(
    job: &Job,
    masks: RowMasks,
    micro: &MicroBatch,
) -> Result<PredictionBatch, TrainError> {
    let doc_lens: Vec<Vec<usize>> = micro
        .doc_lens
        .iter()
        .map(|d| d.iter().map(|&l| l as usize).collect())
        .collect();
    if job.objective == Objective::Clm {
        let batch =
            TokenBatch::new(&micro.input_ids, Some(doc_lens)).map_err(ObjectiveError::from)?;
        return Ok(objectives::clm_batch(&batch)?);
    }
    let masking = MaskingConfig::from_model(&job.config, masks.ratio);
    let mut merged: Option<PredictionBatch> = None;
    for (i, (row, lens)) in micro.input_ids.iter().zip(doc_lens).enumerate() {
        let one = TokenBatch::new(std::slice::from_ref(row), Some(vec![lens]))
            .map_err(ObjectiveError::from)?;
        let mut rng = ChaCha8Rng::seed_from_u64(row_seed(
            masks.seed,
            masks.phase_index,
            micro.rows.start + i as u64,
        ));
        let p = if job.objective == Objective::Mntp {
            objectives::mntp_batch(&one, &masking, &mut rng)
        } else {
            objectives::mlm_batch(&one, &masking, &mut rng)
        }?;
        merged = Some(match merged {
            None => p,
            Some(mut m) => {
                let offset = m.input.input_ids.len();
                m.input.input_ids.extend_from_slice(&p.input.input_ids);
                m.input.batch += 1;
                if let (Some(a), Some(b)) = (m.input.doc_lens.as_mut(), p.input.doc_lens) {
                    a.extend(b);
                }
                m.positions.extend(p.positions.iter().map(|x| x + offset));
                m.targets.extend(p.targets);
                m
            }
        });
    }
    merged.ok_or_else(|| TrainError::Failed("empty micro-batch".into()))
}

/// Progress reports at most every `every` (and at the phase's last step),
/// with the throughput of the tokens since the last report.
struct ProgressMeter {
    every: Duration,
    /// Peak FLOP/s of the device for the MFU estimate (0: not reported).
    peak_flops: f64,
    param_count: usize,
    last_report: Instant,
    tokens_since: u64,
}

/// The rates of a progress report.
struct Rates {
    tokens_per_sec: f64,
    mfu: f64,
}

impl ProgressMeter {
    fn new(every: Duration, peak_flops: f64, param_count: usize) -> Self {
        Self {
            every,
            peak_flops,
            param_count,
            last_report: Instant::now(),
            tokens_since: 0,
        }
    }

    /// Counts a step's tokens; the rates when a report is due (always with
    /// `last`).
    fn step(&mut self, tokens: u64, last: bool) -> Option<Rates> {
        self.tokens_since += tokens;
        let now = Instant::now();
        let elapsed = now.duration_since(self.last_report);
        if elapsed < self.every && !last {
            return None;
        }
        let tokens_per_sec = self.tokens_since as f64 / elapsed.as_secs_f64().max(1e-9);
        let mfu = if self.peak_flops > 0.0 {
            6.0 * self.param_count as f64 * tokens_per_sec / self.peak_flops
        } else {
            0.0
        };
        self.last_report = now;
        self.tokens_since = 0;
        Some(Rates {
            tokens_per_sec,
            mfu,
        })
    }
}

/// Rank 0's checkpoint writes in flight, reported to the coordinator in
/// order as they commit.
struct CheckpointReporter {
    writer: CheckpointWriter,
    pending: Vec<checkpoint::CheckpointHandle>,
}

impl CheckpointReporter {
    fn spawn(policy: &CheckpointPolicy, link: &Link) -> Result<Self, TrainError> {
        Ok(Self {
            writer: CheckpointWriter::spawn_fenced(
                &policy.root,
                policy.keep_last,
                link.commit_fence(),
            )?,
            pending: Vec::new(),
        })
    }

    /// Starts writing `snapshot` on the writer's thread.
    fn write(&mut self, snapshot: CheckpointSnapshot) -> Result<(), TrainError> {
        self.pending.push(self.writer.write_async(snapshot)?);
        Ok(())
    }

    /// Reports every write that has committed, in order; with `wait`,
    /// waits for all of them first.
    fn report(&mut self, link: &Link, wait: bool) -> Result<(), TrainError> {
        let mut still = Vec::new();
        for handle in self.pending.drain(..) {
            let finished = if wait {
                Some(handle.wait())
            } else {
                match handle.try_wait() {
                    None => {
                        still.push(handle);
                        continue;
                    }
                    some => some,
                }
            };
            if let Some(result) = finished {
                let committed = result?;
                let info = &committed.state.info;
                link.checkpoint(Checkpoint {
                    phase_index: info.phase_index,
                    step: info.step,
                    tokens: info.tokens,
                    url: committed.url.clone(),
                    ..Default::default()
                })?;
            }
        }
        self.pending = still;
        Ok(())
    }
}

impl<B: TrainBackend> Trainer for BurnTrainer<B> {
    fn train(
        &mut self,
        a: &Assignment,
        collective: &mut dyn Collective,
        link: &Link,
    ) -> Result<PhaseEnd, TrainError> {
        let job = Job::resolve(a)?;
        self.prepare(a, &job, collective)?;
        let (spec, phase) = (&job.spec, &job.phase);
        let seq_tokens = u64::from(phase.seq_len);

        // Step sizes follow the batch warmup in phase 0.
        let plan = BatchPlan::with_schedule(
            BatchSchedule::for_phase(spec, a.phase_index as usize),
            a.world_size,
            a.rank,
            u64::from(spec.micro_batch),
        )?;
        let reader = PhaseReader::open(
            &spec.dataset,
            &phase.dataset_phase,
            phase.seq_len,
            ReaderOptions::default(),
        )?;
        let mut batches =
            Prefetcher::spawn(reader, plan.clone(), a.first_step..a.last_step + 1, 4)?;
        let mut order = DataOrderLog::open(
            &job.checkpoints.root,
            &a.run_id,
            a.phase_index,
            &phase.name,
            &a.world_id,
            a.rank,
            a.world_size,
            a.first_step,
            16,
        )?;
        let mut checkpoints = if a.rank == 0 {
            Some(CheckpointReporter::spawn(&job.checkpoints, link)?)
        } else {
            None
        };

        let Some(session) = self.session.as_mut() else {
            return Err(TrainError::Failed("no model".into()));
        };
        let param_count: usize = session
            .params
            .iter()
            .map(|(_, s, _)| s.iter().product::<usize>())
            .sum();
        let mut meter = ProgressMeter::new(self.report_every, self.peak_flops, param_count);
        for step in a.first_step..=a.last_step {
            if let Some(reason) = link.aborted() {
                return Ok(PhaseEnd::Aborted(reason));
            }
            let batch = batches
                .next_batch()
                .ok_or_else(|| TrainError::Failed(format!("no batch for step {step}")))??;
            let predictions = batch
                .micro_batches
                .iter()
                .map(|micro| prediction_batch(&job, RowMasks::training(&job, a.phase_index), micro))
                .collect::<Result<Vec<_>, _>>()?;
            let tokens_before = plan.cursor_after(step) * seq_tokens;
            let lr = job.schedule.lr(job.peak_lr, tokens_before);
            let (model, outcome) = train_step(
                session.model.clone(),
                &mut session.optimizer,
                &predictions,
                lr,
                link.leave_requested(),
                job.options,
                collective,
                &self.device,
            )?;
            session.model = model;
            let StepOutcome {
                mean_loss,
                stopping,
                stats,
            } = outcome;
            order.record(step, batch.rows.clone())?;
            let done = step + 1;
            let tokens = plan.cursor_after(done) * seq_tokens;
            session.at = (a.phase_index, done);
            let phase_end = done == a.num_steps;
            if let Some(rates) = meter.step(tokens - tokens_before, phase_end) {
                link.progress(Progress {
                    step: done,
                    tokens,
                    loss: mean_loss,
                    tokens_per_sec: rates.tokens_per_sec,
                    lr,
                    grad_norm: stats.read()[0],
                    mfu: rates.mfu,
                });
            }

            // Held-out loss on the run's `[eval]` policy, before the
            // checkpoint of the same step (a stopping world leaves at once).
            if let Some(policy) = job.spec.eval.as_ref()
                && !stopping
                && held_out::due(policy, tokens_before, tokens, phase_end)
            {
                let rows_per_pass = match spec.micro_batch {
                    0 => u64::from(spec.global_batch / a.world_size.max(1)),
                    m => u64::from(m),
                };
                let outcome = held_out::evaluate(
                    &session.model,
                    &job,
                    a.phase_index,
                    policy,
                    rows_per_pass,
                    collective,
                )?;
                if a.rank == 0 {
                    let mut point = EvalPoint {
                        phase_index: a.phase_index,
                        world_id: a.world_id.clone(),
                        step: done,
                        tokens,
                        ..Default::default()
                    };
                    match outcome {
                        Ok(score) => {
                            point.loss = score.loss();
                            point.accuracy = score.accuracy();
                            point.rows = score.rows;
                            point.targets = score.sums.targets;
                            point.seconds = score.seconds;
                        }
                        Err(message) => point.error = message,
                    }
                    link.eval(point);
                }
            }

            // Checkpoints: every `every_tokens`, always at the phase end, and
            // where the world stops for a leaving rank.
            let every = job.checkpoints.every_tokens;
            let due =
                phase_end || stopping || (every > 0 && tokens / every > tokens_before / every);
            if due {
                order.flush()?;
            }
            if let Some(checkpoints) = checkpoints.as_mut() {
                if due {
                    checkpoints.write(CheckpointSnapshot {
                        info: CheckpointInfo {
                            run_id: a.run_id.clone(),
                            phase_index: a.phase_index,
                            phase_name: phase.name.clone(),
                            step: done,
                            tokens,
                            rng: vec![spec.seed],
                            data_cursor: plan.cursor_after(done),
                            world_size: a.world_size,
                            spec_name: spec.name.clone(),
                            attempt: a.world_id.clone(),
                            phase_end,
                        },
                        // The host copy is the snapshot; the write runs on
                        // the writer's thread.
                        model: session
                            .params
                            .iter()
                            .zip(read_params(&session.model))
                            .map(|((n, s, _), v)| (n.clone(), s.clone(), v))
                            .collect(),
                        optimizer: OptimizerState {
                            step: session.optimizer.steps(),
                            tensors: session.optimizer.state(),
                        },
                    })?;
                }
                // The phase end (and a stop) waits for every write.
                checkpoints.report(link, phase_end || stopping)?;
            }
            if stopping {
                // Nobody leaves before rank 0 has reported the checkpoint.
                collective.barrier()?;
                return Ok(PhaseEnd::Stopped { step: done });
            }
        }
        order.flush()?;
        Ok(PhaseEnd::Finished)
    }
}

/// The model a committed checkpoint holds, shaped by its run's spec, with
/// the RoPE bases of the phase it ended in (for export and inference).
pub fn model_from_checkpoint<B: Backend>(
    spec: &RunSpec,
    url: &str,
    device: &B::Device,
) -> Result<ModernBert<B>, TrainError> {
    let config = model_config(spec)?;
    let model = ModernBert::<B>::new(&config, objective(spec)?.flavour(), spec.seed, device);
    let params = param_names(&model);
    let loaded = checkpoint::load(url).map_err(|e| TrainError::BadCheckpoint {
        url: url.to_string(),
        message: e.to_string(),
    })?;
    let phase = spec.phases.get(loaded.state.info.phase_index as usize);
    let values = match_tensors(&params, loaded.model)?;
    let model = write_params(model, &values, device);
    Ok(match phase {
        Some(p) => model.with_rope_theta(p.global_rope_theta, p.local_rope_theta),
        None => model,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::SingleProcess;
    use rand::Rng;
    use twinhead_model::{CpuAutodiff, CpuBackend, Flavour};

    type B = CpuAutodiff;

    fn tiny() -> (ModernBert<B>, StableAdamW<CpuBackend>, ModelConfig) {
        let config = ModelConfig::builtin("tiny").expect("tiny");
        let model = ModernBert::<B>::new(&config, Flavour::Encoder, 7, &Default::default());
        let optimizer = StableAdamW::new(
            StableAdamWConfig::new(3e-3, 0.01),
            &optimizer_specs(&model),
            &Default::default(),
        )
        .expect("optimizer");
        (model, optimizer, config)
    }

    /// One single-process step on `prediction` at LR 3e-3.
    fn one_step(
        model: ModernBert<B>,
        optimizer: &mut StableAdamW<CpuBackend>,
        prediction: &PredictionBatch,
        leave: bool,
        options: StepOptions,
    ) -> (ModernBert<B>, StepOutcome<CpuBackend>) {
        train_step(
            model,
            optimizer,
            std::slice::from_ref(prediction),
            3e-3,
            leave,
            options,
            &mut SingleProcess::new(),
            &Default::default(),
        )
        .expect("step")
    }

    /// One step from copies of `model` and `optimizer`: the weights after
    /// it and the loss.
    fn step_from(
        model: &ModernBert<B>,
        optimizer: &StableAdamW<CpuBackend>,
        prediction: &PredictionBatch,
        options: StepOptions,
    ) -> (Vec<Vec<f32>>, f64) {
        let mut optimizer = optimizer.clone();
        let (model, outcome) = one_step(model.clone(), &mut optimizer, prediction, false, options);
        (read_params(&model), outcome.mean_loss)
    }

    fn batch(config: &ModelConfig) -> PredictionBatch {
        let rows: Vec<Vec<u32>> = (0..2u32)
            .map(|r| (0..32u32).map(|i| 5 + (r * 31 + i * 7) % 200).collect())
            .collect();
        let tokens = TokenBatch::new(&rows, None).expect("batch");
        let masking = MaskingConfig::from_model(config, 0.3);
        objectives::mlm_batch(&tokens, &masking, &mut ChaCha8Rng::seed_from_u64(3)).expect("mlm")
    }

    #[test]
    fn an_unreachable_store_does_not_make_the_start_checkpoint_unusable() {
        use twinhead_data::store::StoreError;
        let url = "s3://bucket/ckpt/run-1/0-short/step-0000002";
        let unreachable = CheckpointError::Store(StoreError::Store {
            location: url.into(),
            source: object_store::Error::Generic {
                store: "S3",
                source: "connection refused".into(),
            },
        });
        match start_checkpoint_error(url, unreachable) {
            TrainError::Checkpoint(CheckpointError::Store(_)) => {}
            other => panic!("a transient store error became {other}"),
        }
        for unusable in [
            CheckpointError::NotCommitted {
                location: url.into(),
            },
            CheckpointError::Store(StoreError::NotFound {
                location: format!("{url}/state.json"),
            }),
        ] {
            match start_checkpoint_error(url, unusable) {
                TrainError::BadCheckpoint { url: bad, .. } => assert_eq!(bad, url),
                other => panic!("expected an unusable checkpoint, got {other}"),
            }
        }
    }

    #[test]
    fn repeated_steps_on_one_batch_lower_its_loss() {
        let (mut model, mut optimizer, config) = tiny();
        let prediction = batch(&config);
        let mut losses = Vec::new();
        for _ in 0..4 {
            let (next, outcome) = one_step(
                model,
                &mut optimizer,
                &prediction,
                false,
                StepOptions::default(),
            );
            model = next;
            assert!(!outcome.stopping);
            losses.push(outcome.mean_loss);
        }
        assert_eq!(optimizer.steps(), 4);
        assert!(
            losses[3] < losses[0] - 0.05,
            "the loss on the batch trained on did not fall: {losses:?}"
        );
        let (_, outcome) = one_step(
            model,
            &mut optimizer,
            &prediction,
            true,
            StepOptions::default(),
        );
        assert!(outcome.stopping, "the leave flag travels with the step");
        let [grad_norm, clip_scale, _] = outcome.stats.read();
        assert!(grad_norm > 0.0 && grad_norm.is_finite(), "{grad_norm}");
        assert_eq!(clip_scale, 1.0);
    }

    #[test]
    fn activation_checkpointing_takes_the_same_step() {
        for flavour in [Flavour::Encoder, Flavour::Decoder] {
            let (model, optimizer, config) = tiny();
            let model = model.with_flavour(flavour);
            let prediction = match flavour {
                Flavour::Encoder => batch(&config),
                Flavour::Decoder => objectives::clm_batch(&batch(&config).input).expect("clm"),
            };
            let step = |recompute: bool| {
                let options = StepOptions {
                    activation_checkpointing: recompute,
                };
                step_from(&model, &optimizer, &prediction, options)
            };
            let (plain, plain_loss) = step(false);
            let (recomputed, recomputed_loss) = step(true);
            assert!((plain_loss - recomputed_loss).abs() < 1e-5, "{flavour:?}");
            let diff = plain
                .iter()
                .flatten()
                .zip(recomputed.iter().flatten())
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            // One step at lr 3e-3 moves weights by up to 3e-3: the two
            // gradients agree to float32 noise.
            assert!(diff < 1e-6, "{flavour:?}: weights differ by {diff}");
        }
    }

    #[test]
    fn a_step_is_bit_identical_whatever_the_thread_count() {
        let (model, optimizer, config) = tiny();
        let prediction = batch(&config);
        let step = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            pool.install(|| {
                let (params, loss) =
                    step_from(&model, &optimizer, &prediction, StepOptions::default());
                (params, loss.to_bits())
            })
        };
        assert!(
            step(1) == step(3),
            "weights or loss depend on the thread count"
        );
    }

    /// MLM batches of a learnable stream: rows are walks in which each
    /// token mostly determines the next.
    fn walk_batch(config: &ModelConfig, seed: u64) -> PredictionBatch {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let rows: Vec<Vec<u32>> = (0..4)
            .map(|_| {
                let mut t = rng.random_range(0..64u32);
                (0..64)
                    .map(|_| {
                        t = if rng.random::<f64>() < 0.9 {
                            (t * 5 + 7) % 64
                        } else {
                            rng.random_range(0..64)
                        };
                        10 + t
                    })
                    .collect()
            })
            .collect();
        let tokens = TokenBatch::new(&rows, None).expect("batch");
        let masking = MaskingConfig::from_model(config, 0.3);
        objectives::mlm_batch(&tokens, &masking, &mut rng).expect("mlm")
    }

    /// bf16-mixed trains like f32: over 200 steps its loss, averaged over
    /// windows of 20 steps, stays within 2% of f32's.
    #[test]
    fn bf16_mixed_follows_the_f32_loss_curve() {
        let (model, optimizer, config) = tiny();
        let batches: Vec<PredictionBatch> = (0..200).map(|i| walk_batch(&config, i)).collect();
        let curve = |precision: Precision| {
            let mut model = model.clone().with_precision(precision);
            let mut optimizer = optimizer.clone();
            batches
                .iter()
                .map(|b| {
                    let (next, outcome) = one_step(
                        model.clone(),
                        &mut optimizer,
                        b,
                        false,
                        StepOptions::default(),
                    );
                    model = next;
                    outcome.mean_loss
                })
                .collect::<Vec<f64>>()
        };
        let (f32_curve, bf16_curve) = (curve(Precision::F32), curve(Precision::Bf16Mixed));
        assert_ne!(
            f32_curve, bf16_curve,
            "bf16-mixed computed exactly what f32 did"
        );
        let windows = |c: &[f64]| {
            c.chunks(20)
                .map(|w| w.iter().sum::<f64>() / w.len() as f64)
                .collect::<Vec<f64>>()
        };
        let (a, b) = (windows(&f32_curve), windows(&bf16_curve));
        assert!(a[9] < a[0] - 0.5, "the f32 run did not learn: {a:?}");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 0.02 * x, "f32 {a:?}\nbf16-mixed {b:?}");
        }
        eprintln!("f32 {a:.4?}\nbf16-mixed {b:.4?}");
    }

    #[test]
    fn a_step_without_targets_keeps_the_weights_finite() {
        let (model, mut optimizer, _) = tiny();
        let before = read_params(&model);
        let (model, outcome) = train_step(
            model,
            &mut optimizer,
            &[],
            3e-3,
            false,
            StepOptions::default(),
            &mut SingleProcess::new(),
            &Default::default(),
        )
        .expect("step");
        assert_eq!(outcome.mean_loss, 0.0);
        let after = read_params(&model);
        assert_eq!(before.len(), after.len());
        for (b, a) in before.iter().zip(&after) {
            assert!(a.iter().all(|x| x.is_finite()));
            // No gradient: at most weight decay moves a weight, towards zero.
            assert!(a.iter().zip(b).all(|(a, b)| a.abs() <= b.abs()));
        }
    }
}
