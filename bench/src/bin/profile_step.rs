//! `profile_step`: where one training step's time goes on the CPU backend,
//! stage by stage (the ndarray backend executes eagerly, so wall time per
//! call is the work of that call).
//!
//! ```text
//! profile_step [--model NAME|FILE.toml] [--objective mlm|clm] [--batch 1] [--seq 1024] [--steps 3]
//! ```
//!
//! Stages: masking (host), the forward to the loss (plans, embedding,
//! layers, head, cross-entropy), the backward, collecting the gradients into
//! the flat buffer, and StableAdamW. Prints one line per step and the mean
//! of the steps after the first.

use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::{AutodiffModule, Module};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use twinhead_model::CpuAutodiff as A;
use twinhead_model::objectives::{self, MaskingConfig, clm_batch, mlm_batch};
use twinhead_model::{Flavour, ModelBackend, ModelConfig, ModernBert, TokenBatch};
use twinhead_worker::optim::{StableAdamW, StableAdamWConfig};
use twinhead_worker::train::{TakeFlatParams, optimizer_specs};

type Inner = twinhead_model::CpuBackend;

fn main() -> anyhow::Result<()> {
    twinhead_worker::host_memory::keep_freed_memory();
    let (mut model_name, mut objective, mut batch, mut seq, mut steps) = (
        "ettin-17m".to_string(),
        "mlm".to_string(),
        1usize,
        1024usize,
        3usize,
    );
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        let number = || -> anyhow::Result<usize> {
            value
                .parse()
                .with_context(|| format!("{flag} {value:?}: expected a whole number"))
        };
        match flag.as_str() {
            "--model" => model_name = value.clone(),
            "--objective" => objective = value.clone(),
            "--batch" => batch = number()?,
            "--seq" => seq = number()?,
            "--steps" => steps = number()?.max(2),
            other => bail!("unknown argument {other:?}"),
        }
    }
    let config = ModelConfig::load(&model_name)?;
    let flavour = match objective.as_str() {
        "mlm" => Flavour::Encoder,
        "clm" => Flavour::Decoder,
        other => bail!("--objective {other:?}: expected mlm or clm"),
    };
    let device = Default::default();
    let mut model = ModernBert::<A>::new(&config, flavour, 0, &device);
    let specs = optimizer_specs(&model);
    let mut optimizer =
        StableAdamW::<Inner>::new(StableAdamWConfig::new(1e-3, 1e-5), &specs, &device)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let rows: Vec<Vec<u32>> = (0..batch)
        .map(|_| {
            (0..seq)
                .map(|_| rng.random_range(5..config.vocab_size as u32))
                .collect()
        })
        .collect();
    let tokens = TokenBatch::new(&rows, None)?;
    let masking = MaskingConfig::from_model(&config, 0.3);
    let names = [
        "mask",
        "forward",
        "backward",
        "collect",
        "optimizer",
        "total",
    ];
    let mut sums = [0f64; 6];
    for step in 0..steps {
        let mut times = [0f64; 6];
        let start = Instant::now();
        let mut lap = Instant::now();
        let mut mark = |i: usize, lap: &mut Instant| {
            times[i] = lap.elapsed().as_secs_f64();
            *lap = Instant::now();
        };
        let prediction = if flavour == Flavour::Encoder {
            mlm_batch(&tokens, &masking, &mut rng)?
        } else {
            clm_batch(&tokens)?
        };
        mark(0, &mut lap);
        let loss = objectives::loss(&model, &prediction)?;
        let _ = loss.clone().into_scalar();
        mark(1, &mut lap);
        let grads = loss.backward();
        mark(2, &mut lap);
        let mut grads = GradientsParams::from_grads(grads, &model);
        let mut flat = Vec::new();
        model.visit(&mut Collect {
            grads: &mut grads,
            flat: &mut flat,
        });
        let flat = Inner::cat_flat(flat);
        let mut params = TakeFlatParams::<A>::default();
        model = model.map(&mut params);
        mark(3, &mut lap);
        let (updated, _) = optimizer.step(1e-4, params.take_values(), flat)?;
        let _ = updated[0].clone().slice(0..1).into_scalar();
        mark(4, &mut lap);
        model = model.map(&mut params.put_back(updated));
        times[5] = start.elapsed().as_secs_f64();
        let line: Vec<String> = names
            .iter()
            .zip(&times)
            .map(|(n, t)| format!("{n} {t:.3}"))
            .collect();
        eprintln!("step {step}: {}", line.join("  "));
        if step > 0 {
            for (s, t) in sums.iter_mut().zip(&times) {
                *s += t;
            }
        }
    }
    forward_breakdown(&model.valid(), &prediction_for(&tokens, flavour, &masking)?)?;
    let n = (steps - 1) as f64;
    let mean: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .zip(&sums)
        .map(|(k, s)| (k.to_string(), (s / n).into()))
        .collect();
    println!(
        "{}",
        serde_json::json!({"model": model_name, "objective": objective, "batch": batch, "seq": seq, "seconds": mean})
    );
    Ok(())
}

fn prediction_for(
    tokens: &TokenBatch,
    flavour: Flavour,
    masking: &MaskingConfig,
) -> anyhow::Result<objectives::PredictionBatch> {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    Ok(if flavour == Flavour::Encoder {
        mlm_batch(tokens, masking, &mut rng)?
    } else {
        clm_batch(tokens)?
    })
}

/// One forward without autodiff, timed per part.
fn forward_breakdown(
    model: &ModernBert<Inner>,
    prediction: &objectives::PredictionBatch,
) -> anyhow::Result<()> {
    use twinhead_model::modernbert::AttentionInputs;
    let device = Default::default();
    let config = model.config();
    let sync = |x: &Tensor<Inner, 3>| {
        let _ = x.clone().slice([0..1, 0..1, 0..1]).into_scalar();
    };
    let mut lap = Instant::now();
    let mut parts = Vec::new();
    let mut mark = |name: String, lap: &mut Instant| {
        parts.push(format!("{name} {:.3}", lap.elapsed().as_secs_f64()));
        *lap = Instant::now();
    };
    let layout = prediction.input.layout()?;
    let inputs = AttentionInputs::<Inner>::new(config, &layout, prediction.attention, &device);
    mark("plans".into(), &mut lap);
    let mut x = model.embed(
        prediction
            .input
            .ids_tensor::<Inner>(config.vocab_size, &device)?,
    );
    sync(&x);
    mark("embed".into(), &mut lap);
    for (i, layer) in model.layers.iter().enumerate() {
        let h = x.clone() + layer.attn.forward(layer.pre_attn(x.clone()), &inputs);
        sync(&h);
        mark(format!("attn{i}"), &mut lap);
        x = h.clone() + layer.mlp.forward(layer.mlp_norm.forward(h));
        sync(&x);
        mark(format!("mlp{i}"), &mut lap);
    }
    let loss = objectives::loss(model, prediction)?;
    let _ = loss.into_scalar();
    lap = Instant::now();
    let logits = objectives::prediction_logits(model, prediction)?;
    let _ = logits.clone().slice([0..1, 0..1]).into_scalar();
    let whole = lap.elapsed().as_secs_f64();
    parts.push(format!(
        "forward+head {whole:.3} (logits {:?})",
        logits.dims()
    ));
    eprintln!("forward parts: {}", parts.join("  "));
    Ok(())
}

/// Each parameter's gradient (zeros where it has none), flat, in module
/// order, as the trainer collects them.
struct Collect<'a> {
    grads: &'a mut GradientsParams,
    flat: &'a mut Vec<Tensor<Inner, 1>>,
}

impl burn::module::ModuleVisitor<A> for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<A, D>>) {
        let n = param.shape().num_elements();
        let grad = self.grads.remove::<Inner, D>(param.id).map_or_else(
            || Tensor::zeros([n], &Default::default()),
            |g| Inner::reshaped(g, [n]),
        );
        self.flat.push(grad);
    }
}
