#!/usr/bin/env bash
# bench/recipe_step.sh: twinhead's training step against transformers + torch
# at the Ettin recipe's shapes (ettin-17m, vocab 50,368), alternating the two
# programs per configuration, each with the same number of threads.
#
#   cargo build --release -p twinhead-bench --bin device_step
#   bench/recipe_step.sh [OUT.jsonl] [CONFIG...]
#
# A CONFIG is OBJECTIVE:BATCH:SEQ (default: mlm and clm at 1x1024, 1x4096,
# 1x8192 and 8x1024). Peak RSS comes from /usr/bin/time for both programs.
# The PyTorch side is bench/recipe_step.py in .venv (torch, transformers,
# torch-optimi from PyPI). Prints one JSON line per run and a table at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-recipe_step.jsonl}
shift || true
configs=("$@")
if [ ${#configs[@]} -eq 0 ]; then
  configs=(mlm:1:1024 clm:1:1024 mlm:8:1024 clm:8:1024 mlm:1:4096 clm:1:4096 mlm:1:8192 clm:1:8192)
fi
threads=${THREADS:-2}
python=${PYTHON:-.venv/bin/python}
[ -x target/release/device_step ] || { echo "build device_step first (see the header)" >&2; exit 2; }
[ -x "$python" ] || { echo "no Python at $python (set PYTHON)" >&2; exit 2; }
: > "$out"

steps_for() { # fewer timed steps at long sequences
  local tokens=$(($2 * $3))
  if [ "$tokens" -ge 8192 ]; then echo 1; elif [ "$tokens" -ge 4096 ]; then echo 2; else echo 3; fi
}

run() { # PEER then the command; appends {peer..., peak_rss_bytes} to $out
  local peer=$1; shift
  local log; log=$(mktemp)
  /usr/bin/time -f "%M" -o "$log.rss" "$@" 2>"$log" >"$log.json" || { cat "$log" >&2; exit 1; }
  python3 - "$peer" "$log.json" "$log.rss" >>"$out" <<'PY'
import json, sys
peer, result, rss = sys.argv[1:]
r = json.loads(open(result).read().strip().splitlines()[-1])
r["peer"] = peer
r["peak_rss_bytes"] = int(open(rss).read().split()[-1]) * 1024
print(json.dumps(r))
PY
  tail -n 1 "$out"
  rm -f "$log" "$log.json" "$log.rss"
}

for c in "${configs[@]}"; do
  IFS=: read -r objective batch seq <<<"$c"
  steps=$(steps_for "$objective" "$batch" "$seq")
  RAYON_NUM_THREADS=$threads run twinhead target/release/device_step --model ettin-17m \
    --objective "$objective" --batch "$batch" --seq "$seq" --steps "$steps" --warmup 1
  run pytorch "$python" bench/recipe_step.py --objective "$objective" --batch "$batch" \
    --seq "$seq" --steps "$steps" --warmup 1 --threads "$threads"
done

python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault((r["objective"], r["batch"], r["seq"]), {})[r["peer"]] = r
print("| objective | batch × seq | twinhead tok/s | PyTorch tok/s | ratio | twinhead peak RSS | PyTorch peak RSS | memory ratio |")
print("|---|---|---|---|---|---|---|---|")
for (o, b, s), p in by.items():
    t, q = p.get("twinhead"), p.get("pytorch")
    if not (t and q):
        continue
    gb = lambda x: f'{x["peak_rss_bytes"] / 1e9:.2f} GB'
    print(f'| {o} | {b} × {s} | {t["tokens_per_sec"]:.0f} | {q["tokens_per_sec"]:.0f} | '
          f'{t["tokens_per_sec"] / q["tokens_per_sec"]:.2f}× | {gb(t)} | {gb(q)} | '
          f'{t["peak_rss_bytes"] / q["peak_rss_bytes"]:.2f}× |')
PY
