//! `device_step`: tokens/s and model FLOPs utilisation of twinhead's own
//! training step (`twinhead_worker::train::train_step`: forward, backward,
//! the flat gradient buffer through the world's collective, StableAdamW on
//! the device) for a named model and shape, on the CPU or a CUDA device.
//! On CUDA it also times the all-reduce of a gradient-sized buffer through
//! NCCL in place on Burn's buffer against a copy through the host.
//!
//! ```text
//! device_step [--device cpu|cuda:N] [--model NAME|FILE.toml] [--objective mlm|clm]
//!             [--batch 8] [--seq 512] [--steps 5] [--warmup 2]
//!             [--precision f32|bf16-mixed|bf16] [--peak-tflops X] [--activation-checkpointing]
//! ```
//!
//! MFU = 6 × parameters × tokens/s / peak, the trainer's estimate (it
//! leaves attention's own FLOPs out, so it reads low at long sequences).
//! `bf16-mixed` is the recipe's mixed precision (`precision = "bf16-mixed"`
//! in a run spec: f32 weights, bf16 products; on the CPU the operands are
//! rounded to bf16); `bf16` (CUDA only) keeps weights and optimizer moments
//! in bf16: a throughput figure, not a recipe. Prints one JSON object on stdout.

use std::time::Instant;

use anyhow::{Context, bail};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use twinhead_model::objectives::{MaskingConfig, clm_batch, mlm_batch};
use twinhead_model::{Flavour, ModelConfig, ModernBert, Precision, TokenBatch};
use twinhead_worker::collective::{Collective, SingleProcess};
use twinhead_worker::optim::{StableAdamW, StableAdamWConfig};
use twinhead_worker::train::{StepOptions, optimizer_specs, train_step};

struct Options {
    device: String,
    model: String,
    objective: String,
    batch: usize,
    seq: usize,
    steps: usize,
    warmup: usize,
    precision: String,
    peak_tflops: Option<f64>,
    activation_checkpointing: bool,
}

fn parse() -> anyhow::Result<Options> {
    let mut o = Options {
        device: "cpu".into(),
        model: "ettin-17m".into(),
        objective: "mlm".into(),
        batch: 8,
        seq: 512,
        steps: 5,
        warmup: 2,
        precision: "f32".into(),
        peak_tflops: None,
        activation_checkpointing: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        let number = |v: String| -> anyhow::Result<usize> {
            v.parse()
                .with_context(|| format!("{flag} {v:?}: expected a whole number"))
        };
        match flag.as_str() {
            "--device" => o.device = value()?,
            "--model" => o.model = value()?,
            "--objective" => o.objective = value()?,
            "--batch" => o.batch = number(value()?)?,
            "--seq" => o.seq = number(value()?)?,
            "--steps" => o.steps = number(value()?)?,
            "--warmup" => o.warmup = number(value()?)?,
            "--precision" => o.precision = value()?,
            "--activation-checkpointing" => o.activation_checkpointing = true,
            "--peak-tflops" => {
                let v = value()?;
                o.peak_tflops = Some(v.parse().with_context(|| format!("--peak-tflops {v:?}"))?);
            }
            other => {
                bail!("unknown argument {other:?} (see the usage in bench/src/bin/device_step.rs)")
            }
        }
    }
    if o.steps == 0 || o.batch == 0 || o.seq < 4 {
        bail!("--steps and --batch must be at least 1 and --seq at least 4");
    }
    Ok(o)
}

fn main() -> anyhow::Result<()> {
    twinhead_worker::host_memory::keep_freed_memory();
    let o = parse()?;
    let device = twinhead_worker::device::Device::parse(&o.device).map_err(anyhow::Error::msg)?;
    let report = match (device, o.precision.as_str()) {
        (twinhead_worker::device::Device::Cpu, "f32" | "bf16-mixed") => {
            run::<twinhead_model::CpuAutodiff>(&o, Default::default(), &mut SingleProcess::new())?
        }
        #[cfg(feature = "cuda")]
        (twinhead_worker::device::Device::Cuda(n), precision) => cuda::run(&o, n, precision)?,
        (_, precision) => bail!(
            "--precision {precision} is not available on --device {}",
            o.device
        ),
    };
    println!("{report}");
    Ok(())
}

/// Times `steps` training steps after `warmup` ones; returns the report.
fn run<B: twinhead_model::TrainBackend>(
    o: &Options,
    device: B::Device,
    collective: &mut dyn Collective,
) -> anyhow::Result<serde_json::Value> {
    let config = ModelConfig::load(&o.model)?;
    let flavour = match o.objective.as_str() {
        "mlm" => Flavour::Encoder,
        "clm" => Flavour::Decoder,
        other => bail!("--objective {other:?}: expected mlm or clm"),
    };
    // `bf16` (CUDA only) keeps the whole model in bf16; the others are
    // f32 models, `bf16-mixed` rounding the products' operands.
    let precision = match o.precision.as_str() {
        "bf16" => Precision::F32,
        other => Precision::parse(other).map_err(anyhow::Error::msg)?,
    };
    let mut model = ModernBert::<B>::new(&config, flavour, 0, &device).with_precision(precision);
    let specs = optimizer_specs(&model);
    let params: usize = specs.iter().map(|s| s.len).sum();
    let mut optimizer =
        StableAdamW::<B::InnerBackend>::new(StableAdamWConfig::new(1e-3, 1e-5), &specs, &device)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let masking = MaskingConfig::from_model(&config, 0.3);
    let low = 5.min(config.vocab_size as u32 - 1);
    let rows: Vec<Vec<u32>> = (0..o.batch)
        .map(|_| {
            (0..o.seq)
                .map(|_| rng.random_range(low..config.vocab_size as u32))
                .collect()
        })
        .collect();
    let batch = TokenBatch::new(&rows, None)?;
    let mut start = Instant::now();
    let mut last_loss = f64::NAN;
    for step in 0..o.warmup + o.steps {
        if step == o.warmup {
            start = Instant::now();
        }
        let prediction = if flavour == Flavour::Encoder {
            mlm_batch(&batch, &masking, &mut rng)?
        } else {
            clm_batch(&batch)?
        };
        let (next, outcome) = train_step(
            model,
            &mut optimizer,
            std::slice::from_ref(&prediction),
            1e-4,
            false,
            StepOptions {
                activation_checkpointing: o.activation_checkpointing,
            },
            collective,
            &device,
        )?;
        model = next;
        last_loss = outcome.mean_loss;
        eprintln!("step {step}: loss {last_loss:.4}");
    }
    // The loss of the last step was read on the host: every kernel of the
    // timed steps up to its all-reduce has run; the last update is waited for
    // here.
    B::sync(&device).map_err(|e| anyhow::anyhow!("sync: {e:?}"))?;
    let secs = start.elapsed().as_secs_f64();
    let tokens_per_sec = (o.steps * o.batch * o.seq) as f64 / secs;
    let mfu = o
        .peak_tflops
        .map(|peak| 6.0 * params as f64 * tokens_per_sec / (peak * 1e12));
    Ok(serde_json::json!({
        "device": o.device,
        "model": o.model,
        "objective": o.objective,
        "precision": o.precision,
        "parameters": params,
        "batch": o.batch,
        "seq": o.seq,
        "steps": o.steps,
        "seconds": secs,
        "tokens_per_sec": tokens_per_sec,
        "peak_tflops": o.peak_tflops,
        "mfu": mfu,
        "activation_checkpointing": o.activation_checkpointing,
        "last_loss": last_loss,
    }))
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::time::{Duration, Instant};

    use anyhow::bail;
    use burn::backend::{Autodiff, Cuda};
    use burn::tensor::{Tensor, TensorData};
    use twinhead_worker::collective::{Collective, NcclEngine, nccl};

    use super::Options;

    pub fn run(o: &Options, ordinal: usize, precision: &str) -> anyhow::Result<serde_json::Value> {
        twinhead_worker::device::check_cuda(ordinal).map_err(anyhow::Error::msg)?;
        let device = burn::backend::cuda::CudaDevice::new(ordinal);
        let id = NcclEngine::unique_id()?;
        let mut engine = NcclEngine::new(ordinal, 0, 1, &id, Duration::from_secs(60))?;
        let mut report = match precision {
            "f32" => super::run::<Autodiff<Cuda<f32>>>(o, device.clone(), &mut engine)?,
            "bf16" => super::run::<Autodiff<Cuda<half::bf16>>>(o, device.clone(), &mut engine)?,
            "bf16-mixed" => super::run::<Autodiff<Cuda<f32>>>(o, device.clone(), &mut engine)?,
            other => bail!("--precision {other:?}: expected f32, bf16-mixed or bf16"),
        };
        report["allreduce"] = allreduce(
            &mut engine,
            &device,
            report["parameters"].as_u64().unwrap_or(0) as usize,
        )?;
        Ok(report)
    }

    /// Mean seconds per all-reduce of a gradient-sized f32 buffer: NCCL in
    /// place on Burn's buffer, and through a host copy.
    fn allreduce(
        engine: &mut NcclEngine,
        device: &burn::backend::cuda::CudaDevice,
        len: usize,
    ) -> anyhow::Result<serde_json::Value> {
        type B = Cuda<f32>;
        let flat = Tensor::<B, 1>::from_data(TensorData::new(vec![1.0f32; len], [len]), device);
        let reps = 20;
        let mut in_place = 0.0;
        for i in 0..reps + 3 {
            let t = flat.clone().mul_scalar(1.0);
            let t0 = Instant::now();
            if !nccl::all_reduce_mean_tensor(engine, &t)? {
                bail!("the CUDA tensor was not reduced in place");
            }
            if i >= 3 {
                in_place += t0.elapsed().as_secs_f64();
            }
        }
        let mut staged = 0.0;
        for i in 0..reps + 3 {
            let t = flat.clone().mul_scalar(1.0);
            let t0 = Instant::now();
            let mut host = t
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            engine.all_reduce_mean(&mut host)?;
            let back = Tensor::<B, 1>::from_data(TensorData::new(host, [len]), device);
            <B as burn::tensor::backend::Backend>::sync(device)
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            drop(back);
            if i >= 3 {
                staged += t0.elapsed().as_secs_f64();
            }
        }
        let bytes = (len * 4) as f64;
        let (in_place, staged) = (in_place / reps as f64, staged / reps as f64);
        Ok(serde_json::json!({
            "bytes": bytes,
            "in_place_seconds": in_place,
            "in_place_gb_per_s": bytes / in_place / 1e9,
            "host_copy_seconds": staged,
            "host_copy_gb_per_s": bytes / staged / 1e9,
        }))
    }
}
