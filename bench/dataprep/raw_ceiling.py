#!/usr/bin/env python3
"""Raw ceiling for bench/dataprep: HF `tokenizers` (Rust inside)
`encode_batch` over every document of the shards, no filtering, no output,
with the thread count set by RAYON_NUM_THREADS (run.sh sets 2). Reading and
JSON parsing are timed apart and not counted in tokens/s.
"""
import argparse
import glob
import gzip
import json
import os
import time

from tokenizers import Tokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--batch", type=int, default=1000)
    a = ap.parse_args()
    t0 = time.perf_counter()
    texts = []
    for p in sorted(glob.glob(os.path.join(a.corpus, "shard-*.jsonl.gz"))):
        with gzip.open(p, "rt", encoding="utf-8") as f:
            texts.extend(json.loads(line)["text"] for line in f)
    t_read = time.perf_counter() - t0
    tok = Tokenizer.from_file(a.tokenizer)
    tokens = 0
    t1 = time.perf_counter()
    for i in range(0, len(texts), a.batch):
        for e in tok.encode_batch(texts[i:i + a.batch], add_special_tokens=False):
            tokens += len(e.ids)
    t_enc = time.perf_counter() - t1
    print(json.dumps({
        "tool": "raw tokenizers encode_batch",
        "seconds": round(t_enc, 2),
        "seconds_read": round(t_read, 2),
        "docs_read": len(texts),
        "docs_kept": len(texts),
        "tokens": tokens,
        "threads": os.environ.get("RAYON_NUM_THREADS"),
    }))


if __name__ == "__main__":
    main()
