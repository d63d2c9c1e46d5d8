#!/usr/bin/env python3
"""PyTorch peer of twinhead's `device_step` at the Ettin recipe's real shapes.

`bench/recipe_step` compares twinhead's training step with transformers +
torch on the CPU. Twinhead's side is

    target/release/device_step --model ettin-17m --objective mlm|clm --batch B --seq S

(forward, backward, StableAdamW; one JSON object with `tokens_per_sec`).
This script is the other side: the same model shape, objective, batch and
sequence length, one configuration per invocation, and it prints ONE JSON
line on stdout (step losses go to stderr):

    .venv/bin/python bench/recipe_step.py --objective mlm --batch 1 --seq 1024 \\
        --steps 5 --warmup 2 --threads 2

Model ettin-17m (configs/models/ettin-17m.toml): vocab 50368, hidden 256,
7 layers, 4 heads, intermediate 384, max positions 8192, local attention 128
with every 3rd layer (0, 3, 6) global, RoPE theta 160000 global / 10000
local, norm eps 1e-5, no dropout, float32.

- mlm: `transformers.ModernBertForMaskedLM`, sdpa attention,
  `sparse_prediction=True` so the head and the vocabulary projection run
  only on the masked positions, as twinhead does. 30% of tokens selected
  (Bernoulli per token), 80% -> [MASK], 10% -> random id, 10% unchanged;
  labels -100 elsewhere. Masks are drawn inside the timed loop each step,
  as twinhead's `mlm_batch` is.
- clm: `transformers.ModernBertDecoderForCausalLM`, sdpa attention,
  `use_cache=False`, labels = input ids (the model shifts them). Its
  sliding-window layers see `local_attention // 2` = 64 keys (the token and
  the 63 before it); twinhead's decoder sees 65 (`i - 64 ..= i`), a
  negligible difference in cost.

Optimizer: `optimi.StableAdamW(lr=1e-4, betas=(0.9, 0.98), eps=1e-6,
weight_decay=1e-5, decouple_lr=True, triton=False, foreach=True)` (fully
decoupled weight decay, as Ettin; see build_optimizer for why triton and
foreach are named), falling back to `torch.optim.AdamW` only if optimi
cannot be imported; the "optimizer" key says which ran. Each step: forward, backward,
optimizer step, `zero_grad(set_to_none=True)`. Token ids are uniform in
[5, 50368), seeded. `warmup` steps run untimed, then `steps` are timed.
tokens_per_sec = steps * batch * seq / seconds, as device_step counts it.
"""

import argparse
import json
import resource
import sys
import time
import warnings

import torch
import transformers

VOCAB = 50368
PAD, CLS, SEP, MASK = 50283, 50281, 50282, 50284
LOW = 5

ETTIN_17M = dict(
    vocab_size=VOCAB,
    hidden_size=256,
    num_hidden_layers=7,
    num_attention_heads=4,
    intermediate_size=384,
    max_position_embeddings=8192,
    local_attention=128,
    global_attn_every_n_layers=3,
    global_rope_theta=160000.0,
    local_rope_theta=10000.0,
    norm_eps=1e-5,
    initializer_range=0.02,
    attention_dropout=0.0,
    embedding_dropout=0.0,
    mlp_dropout=0.0,
    pad_token_id=PAD,
    cls_token_id=CLS,
    sep_token_id=SEP,
    bos_token_id=CLS,
    eos_token_id=SEP,
)


def build_model(objective):
    if objective == "mlm":
        from transformers import ModernBertConfig, ModernBertForMaskedLM

        config = ModernBertConfig(**ETTIN_17M, sparse_prediction=True)
        config._attn_implementation = "sdpa"
        model = ModernBertForMaskedLM(config)
    else:
        from transformers import ModernBertDecoderConfig, ModernBertDecoderForCausalLM

        config = ModernBertDecoderConfig(**ETTIN_17M, use_cache=False)
        config._attn_implementation = "sdpa"
        model = ModernBertDecoderForCausalLM(config)
    model.config._attn_implementation = "sdpa"
    return model


def build_optimizer(model):
    try:
        import optimi
    except ImportError:
        opt = torch.optim.AdamW(
            model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=1e-5
        )
        return opt, "torch.optim.AdamW"
    else:
        # optimi 0.3.3 decides `triton=None` on the parameter list before
        # filling it (all([]) is True), so on the CPU it picks the Triton
        # kernels and fails ("0 active drivers"): name the path. foreach
        # (torch._foreach_*) is ~3.5x faster than the per-tensor loop here;
        # optimi marks it deprecated in favour of Triton, hence the filter.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            opt = optimi.StableAdamW(
                model.parameters(),
                lr=1e-4,
                betas=(0.9, 0.98),
                eps=1e-6,
                weight_decay=1e-5,
                decouple_lr=True,
                triton=False,
                foreach=True,
            )
        version = getattr(optimi, "__version__", "?")
        return opt, f"optimi.StableAdamW {version} (foreach)"


def mlm_inputs(ids, gen):
    """BERT 80/10/10 masking of 30% of the tokens; labels -100 elsewhere."""
    selected = torch.rand(ids.shape, generator=gen) < 0.3
    action = torch.rand(ids.shape, generator=gen)
    random_ids = torch.randint(LOW, VOCAB, ids.shape, generator=gen)
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    inp = torch.where(selected & (action < 0.8), torch.full_like(ids, MASK), ids)
    inp = torch.where(selected & (action >= 0.8) & (action < 0.9), random_ids, inp)
    return inp, labels


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objective", choices=["mlm", "clm"], default="mlm")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)

    model = build_model(a.objective).float()
    model.train()
    opt, opt_name = build_optimizer(model)
    params = sum(t.numel() for t in model.parameters())
    ids = torch.randint(LOW, VOCAB, (a.batch, a.seq), generator=gen)

    start = time.perf_counter()
    last_loss = float("nan")
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            start = time.perf_counter()
        if a.objective == "mlm":
            inp, labels = mlm_inputs(ids, gen)
            loss = model(input_ids=inp, labels=labels).loss
        else:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        last_loss = loss.item()
        print(f"step {step}: loss {last_loss:.4f}", file=sys.stderr)
    secs = time.perf_counter() - start

    print(
        json.dumps(
            {
                "peer": "pytorch",
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "optimizer": opt_name,
                "model": "ettin-17m",
                "parameters": params,
                "objective": a.objective,
                "batch": a.batch,
                "seq": a.seq,
                "steps": a.steps,
                "warmup": a.warmup,
                "seconds": secs,
                "tokens_per_sec": a.steps * a.batch * a.seq / secs if a.steps else None,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "threads": torch.get_num_threads(),
                "last_loss": last_loss,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
