//! Rough per-stage timing of one forward pass on the CPU backend (the
//! ndarray backend executes eagerly, so wall time per call is the op time).
use std::time::Instant;

use burn::tensor::Tensor;
use twinhead_worker::CpuBackend as B;
use twinhead_worker::model::modernbert::AttentionInputs;
use twinhead_worker::model::{AttentionKind, Flavour, ModelConfig, ModernBert, TokenBatch};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut raw = ModelConfig::builtin("ettin-17m")?.to_raw();
    (
        raw.vocab_size,
        raw.num_layers,
        raw.pad_token_id,
        raw.cls_token_id,
        raw.sep_token_id,
        raw.mask_token_id,
    ) = (8192, 4, 3, 1, 2, 4);
    let config = ModelConfig::validate(raw, "profile")?;
    let d = Default::default();
    let model = ModernBert::<B>::new(&config, Flavour::Encoder, 0, &d);
    let rows: Vec<Vec<u32>> = (0..8)
        .map(|r| {
            (0..512)
                .map(|i| 5 + ((i * 31 + r * 7) % 8000) as u32)
                .collect()
        })
        .collect();
    let batch = TokenBatch::new(&rows, None)?;
    let t = Instant::now();
    let layout = batch.layout()?;
    let inputs = AttentionInputs::<B>::new(&config, &layout, AttentionKind::Bidirectional, &d);
    println!("masks+rope {:.3}", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let mut x = model.embed(batch.ids_tensor::<B>(8192, &d)?);
    println!("embed {:.3}", t.elapsed().as_secs_f64());
    for layer in &model.layers {
        let t = Instant::now();
        let h = layer.pre_attn(x.clone());
        let (q, k, v) = if layer.attn.is_global() {
            layer
                .attn
                .qkv(h, (&inputs.global_rope.0, &inputs.global_rope.1))
        } else {
            layer
                .attn
                .qkv(h, (&inputs.local_rope.0, &inputs.local_rope.1))
        };
        let t1 = t.elapsed().as_secs_f64();
        let scores = q.clone().matmul(k.clone().swap_dims(2, 3));
        let t2 = t.elapsed().as_secs_f64();
        let masked = scores + inputs.global_mask.clone();
        let t3 = t.elapsed().as_secs_f64();
        let probs = burn::tensor::activation::softmax(masked, 3);
        let t4 = t.elapsed().as_secs_f64();
        let _o: Tensor<B, 4> = probs.matmul(v.clone());
        let t5 = t.elapsed().as_secs_f64();
        let a = layer.attn.attend(q, k, v, &inputs.global_mask);
        let t6 = t.elapsed().as_secs_f64();
        x = x + a;
        let m = layer.mlp.forward(layer.mlp_norm.forward(x.clone()));
        let t7 = t.elapsed().as_secs_f64();
        x = x + m;
        println!(
            "layer: qkv+rope {t1:.3} qk {:.3} mask {:.3} softmax {:.3} pv {:.3} attend {:.3} mlp {:.3}",
            t2 - t1,
            t3 - t2,
            t4 - t3,
            t5 - t4,
            t6 - t5,
            t7 - t6
        );
    }
    let t = Instant::now();
    let logits = model.head(model.final_norm.forward(x));
    println!("head {:.3} {:?}", t.elapsed().as_secs_f64(), logits.dims());
    Ok(())
}
