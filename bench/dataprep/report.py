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
tw = load("twinhead.json")
if tw and tw["rc"] == 0:
    r = json.loads(tw["stdout"])
    s = r["manifest"]["sources"][0]
    ph = r["manifest"]["phases"][0]
    rows.append(dict(tool="twinhead dataset build", seconds=r["seconds"], read=s["read"],
                     kept=s["kept"], tokens=s["tokens"], cpu=tw["cpu"], rss=tw["max_rss_mb"],
                     note=f"process wall {tw['wall']} s; phase: {ph['sequences']} rows x {ph['seq_len']}, "
                          f"{ph['tokens']} tokens; dropped {s.get('dropped')}"))
dt = load("datatrove.json")
if dt and dt["rc"] == 0:
    r = json.loads(dt["stdout"].strip().splitlines()[-1])
    rows.append(dict(tool="datatrove (Gopher + tokenize + merge)", seconds=r["seconds"],
                     # pool workers are not reaped as children of measure.py's child:
                     # their CPU time is not in RUSAGE_CHILDREN
                     read=r["docs_read"], kept=r["docs_kept"], tokens=r["tokens"], cpu=None,
                     rss=dt["max_rss_mb"],
                     note=f"stage 1 {r['seconds_stage1']} s, merge {r['seconds_merge']} s; process wall {dt['wall']} s"))

by = {row["tool"].split()[0]: row for row in rows}
for row in rows:
    row["tps"] = row["tokens"] / row["seconds"]
base_dt = by.get("datatrove")
base_raw = by.get("raw")
corpus_json = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(d))), "corpus", "corpus.json")
mb = json.load(open(corpus_json))["mb"] if os.path.exists(corpus_json) else None
hdr = ["tool", "seconds", "input MB/s", "docs read", "docs kept", "tokens", "tokens/s", "tokens/s per core",
       "speed vs datatrove (time)", "tokens/s vs datatrove", "tokens/s vs raw ceiling", "CPU s", "peak RSS MB"]
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
for row in rows:
    vs_dt_time = f"{base_dt['seconds'] / row['seconds']:.2f}x" if base_dt else "-"
    vs_dt_tps = f"{row['tps'] / base_dt['tps']:.2f}x" if base_dt else "-"
    vs_raw = f"{row['tps'] / base_raw['tps']:.2f}x" if base_raw else "-"
    mbs = f"{mb / row['seconds']:.2f}" if mb else "-"
    print(f"| {row['tool']} | {row['seconds']:.1f} | {mbs} | {row['read']:,} | {row['kept']:,} | {row['tokens']:,} | "
          f"{row['tps']:,.0f} | {row['tps'] / cores:,.0f} | {vs_dt_time} | {vs_dt_tps} | {vs_raw} | "
          f"{row['cpu'] if row['cpu'] is not None else '-'} | {row['rss']} |")
print()
for row in rows:
    print(f"- {row['tool']}: {row['note']}")
if base_raw and "twinhead" in by:
    t = by["twinhead"]
    print(f"- the raw ceiling's rate applied to twinhead's kept tokens: {t['tokens'] / base_raw['tps']:.1f} s of pure tokenization")
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
