#!/usr/bin/env python3
"""How far twinhead's float32 gradients are from exact, next to PyTorch's.

For each model (the committed tiny encoder and decoder fixtures, and a
random ettin-17m encoder and decoder built here with transformers), runs
`target/release/grad_noise` (twinhead, CPU backend, float32) on the Hugging
Face folder, then recomputes the same loss on the same input with
transformers (eager attention) in float32 and in float64, and reports per
model the relative error of each float32 gradient against the float64 one:

    error(g) = ||g - g64|| / ||g64||   over all parameters together

and the same per tensor (the worst one). float64 is the reference for both:
in exact arithmetic the two implementations compute the same function, so
twinhead's error over PyTorch's is how much noisier twinhead's gradients
are than PyTorch's own float32 rounding.

    cargo build --release -p twinhead-bench --bin grad_noise
    .venv/bin/python bench/grad_noise.py [OUT.json]

Needs torch, transformers and safetensors in .venv (see
model/tests/fixtures/make_fixtures.py). Decoders get the training window
(i-w .. i, 65 keys for Ettin), as make_fixtures.py sets it.
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe_step import ETTIN_17M  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "model", "tests", "fixtures")
BINARY = os.path.join(ROOT, "target", "release", "grad_noise")


def load(folder, dtype):
    from transformers import AutoConfig, ModernBertDecoderForCausalLM, ModernBertForMaskedLM

    config = AutoConfig.from_pretrained(folder)
    decoder = config.model_type == "modernbert-decoder"
    cls = ModernBertDecoderForCausalLM if decoder else ModernBertForMaskedLM
    model = cls.from_pretrained(folder, attn_implementation="eager", dtype=dtype)
    if decoder:
        model.config.sliding_window = model.config.local_attention // 2 + 1
        for layer in model.model.layers:
            if layer.attn.sliding_window is not None:
                layer.attn.sliding_window = model.config.sliding_window
    model.eval()  # no dropout; gradients still flow
    return model, decoder


def torch_gradients(folder, batch, dtype):
    model, decoder = load(folder, dtype)
    ids = torch.tensor(batch["input_ids"])
    # The loss is taken here, in the model's dtype: transformers' own loss
    # casts the logits to float32, which would cap the float64 reference at
    # float32 accuracy.
    logits = model(input_ids=ids).logits
    vocab = logits.shape[-1]
    if decoder:
        targets = torch.tensor(batch["original_ids"])[:, 1:].reshape(-1)
        picked = logits[:, :-1].reshape(-1, vocab)
    else:
        targets = torch.tensor(batch["targets"])
        picked = logits.reshape(-1, vocab)[torch.tensor(batch["positions"])]
    loss = torch.nn.functional.cross_entropy(picked, targets)
    loss.backward()
    grads = {name: p.grad.detach().to(torch.float64) for name, p in model.named_parameters()}
    return grads, loss.item()


def errors(grads, reference):
    names = sorted(set(grads) & set(reference))
    per_tensor = {}
    num = den = 0.0
    for n in names:
        d = (grads[n] - reference[n]).norm().item() ** 2
        r = reference[n].norm().item() ** 2
        num += d
        den += r
        per_tensor[n] = (d / r) ** 0.5 if r > 0 else 0.0
    return (num / den) ** 0.5, per_tensor


def compare(name, folder, work, rows, seq):
    out = os.path.join(work, name + "-grads")
    subprocess.run(
        [BINARY, "--model", folder, "--out", out, "--rows", str(rows), "--seq", str(seq)],
        check=True,
        env=dict(os.environ, RAYON_NUM_THREADS=os.environ.get("RAYON_NUM_THREADS", "2")),
        stdout=subprocess.DEVNULL,
    )
    with open(os.path.join(out, "batch.json")) as f:
        batch = json.load(f)
    twinhead = {n: t.to(torch.float64) for n, t in load_file(os.path.join(out, "model.safetensors")).items()}
    exact, loss64 = torch_gradients(folder, batch, torch.float64)
    pytorch32, loss32 = torch_gradients(folder, batch, torch.float32)
    tw_err, tw_tensors = errors(twinhead, exact)
    pt_err, pt_tensors = errors(pytorch32, exact)
    missing = sorted(set(exact) - set(twinhead))
    worst = max(tw_tensors, key=tw_tensors.get)
    return {
        "model": name,
        "rows": rows,
        "seq": seq,
        "loss_float64": loss64,
        "loss_twinhead": batch["loss"],
        "loss_pytorch_float32": loss32,
        "twinhead_error": tw_err,
        "pytorch_float32_error": pt_err,
        "ratio": tw_err / pt_err if pt_err > 0 else None,
        "worst_tensor": worst,
        "worst_tensor_twinhead": tw_tensors[worst],
        "worst_tensor_pytorch": pt_tensors[worst],
        "tensors_compared": len(set(exact) & set(twinhead)),
        "tensors_missing": missing,
    }


def ettin_17m(work, decoder):
    from transformers import (
        ModernBertConfig,
        ModernBertDecoderConfig,
        ModernBertDecoderForCausalLM,
        ModernBertForMaskedLM,
    )

    torch.manual_seed(0)
    if decoder:
        model = ModernBertDecoderForCausalLM(ModernBertDecoderConfig(**ETTIN_17M, use_cache=False))
    else:
        model = ModernBertForMaskedLM(ModernBertConfig(**ETTIN_17M))
    folder = os.path.join(work, "ettin-17m-" + ("decoder" if decoder else "encoder"))
    model.save_pretrained(folder)
    return folder


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else None
    torch.set_num_threads(int(os.environ.get("RAYON_NUM_THREADS", "2")))
    results = []
    with tempfile.TemporaryDirectory() as work:
        cases = [
            ("fixture-encoder", os.path.join(FIXTURES, "encoder"), 4, 64),
            ("fixture-decoder", os.path.join(FIXTURES, "decoder"), 4, 64),
            ("ettin-17m-encoder", ettin_17m(work, False), 2, 512),
            ("ettin-17m-decoder", ettin_17m(work, True), 2, 512),
        ]
        for name, folder, rows, seq in cases:
            r = compare(name, folder, work, rows, seq)
            print(json.dumps(r), flush=True)
            results.append(r)
    print()
    print("| model | rows × seq | twinhead error | PyTorch f32 error | ratio | worst tensor (twinhead / PyTorch) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['model']} | {r['rows']} × {r['seq']} | {r['twinhead_error']:.2e} | "
            f"{r['pytorch_float32_error']:.2e} | {r['ratio']:.2f}× | {r['worst_tensor']} "
            f"({r['worst_tensor_twinhead']:.1e} / {r['worst_tensor_pytorch']:.1e}) |"
        )
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
