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
                     cpu=None, rss=raw["max_rss_mb"],
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
                     read=r["docs_read"], kept=r["docs_kept"], tokens=r["tokens"], cpu=dt["cpu"],
                     rss=dt["max_rss_mb"],
                     note=f"stage 1 {r['seconds_stage1']} s, merge {r['seconds_merge']} s; process wall {dt['wall']} s"))

by = {row["tool"].split()[0]: row for row in rows}
for row in rows:
    row["tps"] = row["tokens"] / row["seconds"]
base_dt = by.get("datatrove")
base_raw = by.get("raw")
hdr = ["tool", "seconds", "docs read", "docs kept", "tokens", "tokens/s", "tokens/s per core",
       "speed vs datatrove (time)", "tokens/s vs datatrove", "tokens/s vs raw ceiling", "CPU s", "peak RSS MB"]
print("| " + " | ".join(hdr) + " |")
print("|" + "---|" * len(hdr))
for row in rows:
    vs_dt_time = f"{base_dt['seconds'] / row['seconds']:.2f}x" if base_dt else "-"
    vs_dt_tps = f"{row['tps'] / base_dt['tps']:.2f}x" if base_dt else "-"
    vs_raw = f"{row['tps'] / base_raw['tps']:.2f}x" if base_raw else "-"
    print(f"| {row['tool']} | {row['seconds']:.1f} | {row['read']:,} | {row['kept']:,} | {row['tokens']:,} | "
          f"{row['tps']:,.0f} | {row['tps'] / cores:,.0f} | {vs_dt_time} | {vs_dt_tps} | {vs_raw} | "
          f"{row['cpu'] if row['cpu'] is not None else '-'} | {row['rss']} |")
print()
for row in rows:
    print(f"- {row['tool']}: {row['note']}")
if tw and tw.get("cores_busy_per_s"):
    print(f"- twinhead cores busy, per second: {' '.join(f'{x:.1f}' for x in tw['cores_busy_per_s'])}")
