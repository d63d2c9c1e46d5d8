#!/usr/bin/env bash
# Data-parallel scaling of real training on the CPU engine: the same run
# (bench/train_scaling/run.toml: 24 steps of 8 x 512 tokens, MLM, the
# train_step shape) through the real system (coordinator, worker processes,
# ring all-reduce, StableAdamW, checkpoint at the end), with
#   1 worker pinned to 1 core,
#   2 workers pinned to 1 core each,
#   1 worker free to use both cores (what a single process gets),
# and scaling efficiency = tokens/s(2 workers) / (2 x tokens/s(1 worker, 1 core)).
# Throughput is the phase's tokens over its wall time (first step to the
# committed phase-end checkpoint), from `twinhead status --json`.
#
# Usage: bench/train_scaling/run.sh [TWINHEAD_BINARY]   (default target/release/twinhead)
# Needs the sample corpora (dataprep/fetch-sample.sh) and `taskset`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${1:-$root/target/release/twinhead}"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$root"
export TWINHEAD_LOG=warn

"$bin" dataset build configs/data/sample.toml --out "$work/data" --threads 2 --json >/dev/null
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"

run_case() { # label world cpu-list-per-worker...
  local label="$1" world="$2"; shift 2
  local db="$work/$label.db" out="$work/$label.coordinator"
  "$bin" coordinator --listen 127.0.0.1:0 --db "$db" >"$out" 2>/dev/null &
  local url=""
  for _ in $(seq 100); do url="$(grep -o 'http://[0-9.:]*' "$out" | head -1 || true)"; [ -n "$url" ] && break; sleep 0.1; done
  for cpus in "$@"; do
    taskset -c "$cpus" "$bin" worker --coordinator "$url" --exit-when-idle 2>>"$work/$label.workers.log" &
  done
  local id
  id="$("$bin" submit "$here/run.toml" --coordinator "$url" --json \
      --set "dataset=file://$work/data/sample" \
      --set "checkpoint.root=file://$work/ckpt-$label" \
      --set "world_size=$world" | python3 -c 'import json,sys; print(json.load(sys.stdin)["run_id"])')"
  "$bin" watch "$id" --coordinator "$url" --json >/dev/null
  "$bin" status "$id" --coordinator "$url" --json | python3 -c '
import json, sys
r = json.load(sys.stdin)
p = r["phases"][0]
secs = (p["finished_ms"] - p["started_ms"]) / 1000
state, tokens = r["state"], p["tokens_done"]
print(f"{sys.argv[1]:<22} {state:<10} {tokens:>7} tokens {secs:7.1f} s {tokens / secs:8.0f} tokens/s")
' "$label"
  wait_workers
}
wait_workers() { for p in $(jobs -p); do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }

echo "case                   state        tokens    wall    throughput"
run_case one-worker-one-core 1 0 | tee "$work/r1"
run_case two-workers 2 0 1 | tee "$work/r2"
run_case one-worker-two-cores 1 0,1 | tee "$work/r3"
python3 - "$work/r1" "$work/r2" <<'PY'
import sys
def tps(path):
    return float(open(path).read().split()[-2])
one, two = tps(sys.argv[1]), tps(sys.argv[2])
print(f"scaling efficiency (2 workers vs 2 x 1 worker on one core): {two / (2 * one):.2f}")
PY
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
