#!/usr/bin/env python3
"""Table of bench/dataprep from the measure.py files in a results folder."""
import json
import os
import sys

d = sys.argv[1]
cores = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0


def load(name):
    p = os.path.join(d, name)
    return json.load(open(p)) if os.path.exists(p) else None


rows = []
raw = load("raw.json")
if raw and raw["rc"] == 0:
    r = json.loads(raw["stdout"].strip().splitlines()[-1])
    rows.append(dict(tool="raw ceiling: tokenizers encode_batch", seconds=r["seconds"],
                     read=r["docs_read"], kept=r["docs_read"], tokens=r["tokens"],
                     cpu=raw["cpu"], rss=raw["max_rss_mb"],
                     note=f"JSON read {r['seconds_read']} s not counted; all docs, no filters"))
ceil = load("ceiling.json")
if ceil and ceil["rc"] == 0:
    for line in ceil["stdout"].strip().splitlines():
        r = json.loads(line)
        rows.append(dict(tool=r["tool"], seconds=r["seconds"], read=r["docs_read"], kept=r["docs_read"],
                         tokens=r["tokens"], cpu=None, rss=ceil["max_rss_mb"], threads=r["threads"],
                         note=f"reading + NFC {r['seconds_read']} s not counted; all docs, no filters; "
                              f"documents fast/0.22: {r['docs_fast']}/{r['docs_reference']}"))
for name, label in [("twinhead-reference", "twinhead before: dataset build, tokenizers 0.22 forced"),
                    ("twinhead", "twinhead after: dataset build, fast encoder"),
                    ("twinhead-reference-1", "twinhead before, 1 thread"),
                    ("twinhead-1", "twinhead after, 1 thread")]:
    tw = load(name + ".json")
    if not (tw and tw["rc"] == 0):
        continue
    r = json.loads(tw["stdout"])
    s = r["manifest"]["sources"][0]
    ph = r["manifest"]["phases"][0]
    enc = r.get("encoder") or {}
    rows.append(dict(tool=label, seconds=r["seconds"], read=s["read"], kept=s["kept"], tokens=s["tokens"],
                     cpu=tw["cpu"], rss=tw["max_rss_mb"], threads=1 if name.endswith("-1") else None,
                     note=f"process wall {tw['wall']} s (with verify for the example); phase: {ph['sequences']} rows x "
                          f"{ph['seq_len']}, {ph['tokens']} tokens; encoder {enc.get('path')} "
                          f"(documents fast/0.22: {enc.get('docs_fast')}/{enc.get('docs_reference')})"))
tw = load("twinhead.json")
dt = load("datatrove.json")
if dt and dt["rc"] == 0:
    r = json.loads(dt["stdout"].strip().splitlines()[-1])
    rows.append(dict(tool="datatrove (Gopher + tokenize + merge)", seconds=r["seconds"],
                     # pool workers are not reaped as children of measure.py's child:
                     # their CPU time is not in RUSAGE_CHILDREN
                     read=r["docs_read"], kept=r["docs_kept"], tokens=r["tokens"], cpu=None,
                     rss=dt["max_rss_mb"],
                     note=f"stage 1 {r['seconds_stage1']} s, merge {r['seconds_merge']} s; process wall {dt['wall']} s"))

by = {}
for row in rows:
    by.setdefault(row["tool"].split()[0], row)
for row in rows:
    row["tps"] = row["tokens"] / row["seconds"]
base_dt = by.get("datatrove")
base_raw = by.get("raw")
base_fast = next((r for r in rows if r["tool"] == "raw ceiling: fast encoder"), None)
corpus_json = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(d))), "corpus", "corpus.json")
mb = json.load(open(corpus_json))["mb"] if os.path.exists(corpus_json) else None
hdr = ["tool", "seconds", "input MB/s", "docs read", "docs kept", "tokens", "tokens/s", "tokens/s per core",
       "speed vs datatrove (time)", "tokens/s vs datatrove", "tokens/s vs raw ceiling", "tokens/s per core vs fast-encoder ceiling", "CPU s", "peak RSS MB"]
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
for row in rows:
    vs_dt_time = f"{base_dt['seconds'] / row['seconds']:.2f}x" if base_dt else "-"
    vs_dt_tps = f"{row['tps'] / base_dt['tps']:.2f}x" if base_dt else "-"
    vs_raw = f"{row['tps'] / base_raw['tps']:.2f}x" if base_raw else "-"
    per_core = row['tps'] / (row.get('threads') or cores)
    fast_core = base_fast['tps'] / (base_fast.get('threads') or cores) if base_fast else None
    vs_fast = f"{per_core / fast_core:.2f}x" if fast_core else "-"
    mbs = f"{mb / row['seconds']:.2f}" if mb else "-"
    print(f"| {row['tool']} | {row['seconds']:.1f} | {mbs} | {row['read']:,} | {row['kept']:,} | {row['tokens']:,} | "
          f"{row['tps']:,.0f} | {row['tps'] / (row.get('threads') or cores):,.0f} | {vs_dt_time} | {vs_dt_tps} | {vs_raw} | {vs_fast} | "
          f"{row['cpu'] if row['cpu'] is not None else '-'} | {row['rss']} |")
print()
for row in rows:
    print(f"- {row['tool']}: {row['note']}")
if base_raw and "twinhead" in by:
    t = by["twinhead"]
    print(f"- the first ceiling's rate applied to twinhead's kept tokens: {t['tokens'] / base_raw['tps']:.1f} s of pure tokenization")
if base_raw and base_dt:
    print(f"- the raw ceiling's rate applied to datatrove's kept tokens: {base_dt['tokens'] / base_raw['tps']:.1f} s of pure tokenization")
if tw and tw.get("cores_busy_per_s"):
    print(f"- twinhead cores busy, per second: {' '.join(f'{x:.1f}' for x in tw['cores_busy_per_s'])}")
if raw and raw.get("threads_busy_per_s"):
    print("- raw ceiling busy threads, per second (cores used by each thread over 0.05): "
          + " ".join("+".join(f"{x:.1f}" for x in sec) or "0" for sec in raw["threads_busy_per_s"]))
if tw and tw.get("threads_busy_per_s"):
    print("- twinhead busy threads, per second (cores used by each thread over 0.05): "
          + " ".join("+".join(f"{x:.1f}" for x in sec) or "0" for sec in tw["threads_busy_per_s"]))
