#!/usr/bin/env bash
# All-reduce bus bandwidth: twinhead's CPU ring engine vs torch.distributed gloo,
# 2 processes on loopback, 1 MB ... 256 MB, in one run. Prints a markdown table
# for BENCHMARKS.md.
#
#   bench/allreduce.sh [--world N] [--sizes-mb 1,4,16,64,256] [--rounds R]
#
# The engines run alternately R times (default 3); the table gives, per size,
# the median over rounds of each round's median-call bus bandwidth, and the
# best round in brackets (shared, busy machines are noisy).
#
# Python: $TORCH_PYTHON if set; else /work/wt-model/.venv if it has torch
# (reused read-only); else bench/.venv, created with torch from PyPI (~2.8 GB).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
WORLD=2
SIZES=1,4,16,64,256
ROUNDS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --world) WORLD="$2"; shift 2 ;;
    --sizes-mb) SIZES="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

has_torch() { [ -x "$1" ] && "$1" -c 'import torch.distributed as d; assert d.is_gloo_available()' 2>/dev/null; }
PY="${TORCH_PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in /work/wt-model/.venv/bin/python bench/.venv/bin/python; do
    if has_torch "$cand"; then PY="$cand"; break; fi
  done
fi
if [ -z "$PY" ]; then
  python3 -m venv bench/.venv
  bench/.venv/bin/pip install --quiet torch
  PY=bench/.venv/bin/python
fi

cargo build --quiet --release -p twinhead-bench --bin allreduce
OUT="$(mktemp)"
trap 'rm -f "$OUT"' EXIT
echo "# $(date -u +%FT%TZ) $(uname -srm), $(nproc) cores, world $WORLD, $ROUNDS rounds" >&2
for round in $(seq "$ROUNDS"); do
  target/release/allreduce --world "$WORLD" --sizes-mb "$SIZES" | tee -a "$OUT" >&2
  "$PY" bench/allreduce_gloo.py --world "$WORLD" --sizes-mb "$SIZES" | tee -a "$OUT" >&2
done

"$PY" - "$OUT" <<'PYEOF'
import statistics
import sys
rows = [l.strip().split(",") for l in open(sys.argv[1]) if l.count(",") == 5]
by, names = {}, {}
for eng, nbytes, iters, med, alg, bus in rows:
    kind = "gloo" if eng.startswith("gloo") else "ring"
    names[kind] = eng
    by.setdefault(int(nbytes), {}).setdefault(kind, []).append(float(bus))
print(f"| size | {names.get('ring', 'twinhead')} busbw GB/s | {names.get('gloo', 'gloo')} busbw GB/s | ratio (medians) |")
print("|---|---|---|---|")
for nbytes in sorted(by):
    d = by[nbytes]
    cell = lambda v: f"{statistics.median(v):.2f} [{max(v):.2f}]" if v else "-"
    r, g = d.get("ring", []), d.get("gloo", [])
    ratio = f"{statistics.median(r) / statistics.median(g):.2f}x" if r and g else "-"
    print(f"| {nbytes // (1 << 20)} MiB | {cell(r)} | {cell(g)} | {ratio} |")
PYEOF
