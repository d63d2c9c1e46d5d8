#!/usr/bin/env python3
"""datatrove side of bench/dataprep: JsonlReader -> GopherQualityFilter ->
GopherRepetitionFilter -> DocumentTokenizer (OLMo json, <|endoftext|> after
each document, shuffled), then DocumentTokenizerMerger (shuffle + merge into
one .ds file), with LocalPipelineExecutor(tasks = shards, workers = N).

Prints one JSON line: seconds (total and per stage), docs read, docs kept,
tokens. Run with the bench venv's python (datatrove pinned in run.sh).
"""
import argparse
import glob
import json
import os
import shutil
import time

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer, DocumentTokenizerMerger


def stat_list(logging_dir):
    with open(os.path.join(logging_dir, "stats.json")) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True, help="folder with shard-*.jsonl.gz")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json path")
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-merge", action="store_true")
    a = ap.parse_args()

    shards = sorted(glob.glob(os.path.join(a.corpus, "shard-*.jsonl.gz")))
    shutil.rmtree(a.out, ignore_errors=True)
    os.makedirs(a.out)
    t0 = time.perf_counter()
    stage1 = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(a.corpus, glob_pattern="shard-*.jsonl.gz", compression="gzip",
                        text_key="text", id_key="id"),
            # The Gopher rules twinhead also has (bench.toml), at Gopher's
            # values; the rules twinhead lacks are switched off.
            GopherQualityFilter(
                min_doc_words=50, max_doc_words=100_000,
                min_avg_word_length=3, max_avg_word_length=10,
                max_symbol_word_ratio=None, max_bullet_lines_ratio=None,
                max_ellipsis_lines_ratio=None, max_non_alpha_words_ratio=None,
                min_stop_words=None,
            ),
            GopherRepetitionFilter(
                dup_line_frac=0.3, dup_para_frac=None,
                dup_line_char_frac=None, dup_para_char_frac=None,
                top_n_grams=((2, 0.2), (3, 0.18), (4, 0.16)),
                dup_n_grams=((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)),
            ),
            DocumentTokenizer(
                output_folder=os.path.join(a.out, "tokenized"),
                local_working_dir=os.path.join(a.out, "tok-work"),
                tokenizer_name_or_path=a.tokenizer,
                eos_token="<|endoftext|>",
                shuffle_documents=True,
                seed=7,
            ),
        ],
        tasks=len(shards),
        workers=a.workers,
        logging_dir=os.path.join(a.out, "logs-stage1"),
        skip_completed=False,
    )
    stage1.run()
    t1 = time.perf_counter()
    t2 = t1
    if not a.no_merge:
        stage2 = LocalPipelineExecutor(
            pipeline=[
                DocumentTokenizerMerger(
                    input_folder=os.path.join(a.out, "tokenized"),
                    output_folder=os.path.join(a.out, "merged"),
                    save_filename="bench",
                    shuffle=True,
                    seed=7,
                    progress=False,
                ),
            ],
            tasks=1,
            workers=1,
            logging_dir=os.path.join(a.out, "logs-stage2"),
            skip_completed=False,
        )
        stage2.run()
        t2 = time.perf_counter()

    stats = stat_list(os.path.join(a.out, "logs-stage1"))
    by_name = {s["name"]: s for s in stats}

    def find(prefix):
        for name, s in by_name.items():
            if prefix.lower() in name.lower():
                return s
        return {}

    reader = find("READER").get("stats", {})
    tok = find("TOKENIZER").get("stats", {}).get("tokens", {})

    def total(v):
        return v.get("total") if isinstance(v, dict) else v
    out = {
        "tool": "datatrove",
        "seconds": round(t2 - t0, 2),
        "seconds_stage1": round(t1 - t0, 2),
        "seconds_merge": round(t2 - t1, 2),
        "docs_read": total(reader.get("documents")),
        "input_chars": total(reader.get("doc_len")),
        "docs_kept": tok.get("n"),
        "tokens": tok.get("total"),
        "ds_bytes": sum(os.path.getsize(p) for p in glob.glob(os.path.join(a.out, "merged" if not a.no_merge else "tokenized", "*.ds"))),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
