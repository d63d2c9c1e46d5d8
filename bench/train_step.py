#!/usr/bin/env python3
"""PyTorch peer of `cargo run -p twinhead-bench --bin train_step`.

transformers' ModernBertForMaskedLM (sdpa attention, sparse prediction so
the head runs only on masked positions, as twinhead does), same shape and
batch: hidden 256, 4 layers, 4 heads, intermediate 384, vocab 8192,
local_attention 128, batch 8 x 512, 30% masking, AdamW. float32 on CPU.

Usage: .venv/bin/python bench/train_step.py [STEPS]
"""

import sys
import time

import torch
from transformers import ModernBertConfig, ModernBertForMaskedLM

BATCH, SEQ = 8, 512


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    torch.manual_seed(0)
    config = ModernBertConfig(
        vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=384, local_attention=128, global_attn_every_n_layers=3,
        pad_token_id=3, cls_token_id=1, sep_token_id=2, bos_token_id=1, eos_token_id=2,
        sparse_prediction=True,
    )
    model = ModernBertForMaskedLM(config)
    model.config._attn_implementation = "sdpa"
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    ids = torch.randint(5, 8192, (BATCH, SEQ))
    warmup = 2
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        sel = torch.rand(BATCH, SEQ) < 0.3
        labels = torch.where(sel, ids, torch.full_like(ids, -100))
        inp = torch.where(sel & (torch.rand(BATCH, SEQ) < 0.8), torch.full_like(ids, 4), ids)
        loss = model(input_ids=inp, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}", file=sys.stderr)
    secs = time.perf_counter() - start
    print(
        f"pytorch {torch.__version__}: {steps} steps of {BATCH}x{SEQ} in {secs:.1f} s = "
        f"{steps * BATCH * SEQ / secs:.0f} tokens/s ({torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
