#!/usr/bin/env bash
# The GPU checks of issues 4 and 5, as one script for a machine with one
# NVIDIA GPU and no network (no Rust there): the binaries are built on a
# CPU machine and carried.
#
# On the build machine (x86-64, from the repo root):
#   bench/gpu/run.sh --prepare      # builds .gpu/{device_step,twinhead} (stripped, --features cuda)
#                                   # and .gpu/data (the sample dataset), ignored by git
# On the GPU machine (repo root, .gpu carried):
#   bench/gpu/run.sh [OUT_DIR]      # writes device_step-*.json, run-17m.json and a log to OUT_DIR
#
# What it measures
#   - device_step (twinhead's own training step: forward, backward, the flat
#     gradient buffer through NCCL in place, StableAdamW on the device):
#     ettin-150m at seq 1024 in bf16 and f32 (tokens/s, MFU against the
#     H200's dense peak: 989 TFLOP/s bf16, 67 f32), and ettin-17m in f32;
#     each also times the all-reduce of a gradient-sized buffer through NCCL
#     in place on Burn's buffer against a copy through the host;
#   - a short ettin-17m run through the real system (coordinator, one
#     `twinhead worker --device cuda:0`, checkpoints, three phases of
#     configs/runs/tiny-cpu.toml) on the sample dataset, tokens/s per phase
#     from `twinhead status --json`.
# NCCL: the wheel ships libnccl.so.2 only; the script links libnccl.so next
# to it (see worker/src/collective/nccl.rs).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
gpu="$root/.gpu"

if [ "${1:-}" = "--prepare" ]; then
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  cargo build --release --features cuda -p twinhead -p twinhead-bench --bin twinhead --bin device_step
  mkdir -p "$gpu"
  strip -o "$gpu/twinhead" target/release/twinhead
  strip -o "$gpu/device_step" target/release/device_step
  rm -rf "$gpu/data"
  [ -d .cache/corpora/sotu ] || dataprep/fetch-sample.sh
  "$gpu/twinhead" dataset build configs/data/sample.toml --out "$gpu/data" --threads 2 --json >/dev/null
  du -sh "$gpu"/* "$gpu"
  echo "carry .gpu (the whole working tree must stay under 64 MiB)"
  exit 0
fi

out="${1:-${OUT:-$root/gpu-out}}"
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# libnccl.so for cudarc's loader.
nccl_dir="$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)"
if [ -n "$nccl_dir" ] && [ -e "$nccl_dir/libnccl.so.2" ]; then
  mkdir -p /tmp/nccl && ln -sf "$nccl_dir/libnccl.so.2" /tmp/nccl/libnccl.so
  export LD_LIBRARY_PATH="/tmp/nccl:$nccl_dir:${LD_LIBRARY_PATH:-}"
fi

step() { # name args...
  local name="$1"; shift
  echo "== device_step $name: $*"
  timeout 240 "$gpu/device_step" --device cuda:0 "$@" >"$out/device_step-$name.json" || echo "device_step $name failed ($?)"
  cat "$out/device_step-$name.json"; echo
}
step 150m-bf16 --model ettin-150m --seq 1024 --batch 32 --steps 10 --warmup 3 --precision bf16 --peak-tflops 989
step 150m-f32 --model ettin-150m --seq 1024 --batch 16 --steps 10 --warmup 3 --precision f32 --peak-tflops 67
step 17m-f32 --model ettin-17m --seq 1024 --batch 32 --steps 10 --warmup 3 --precision f32 --peak-tflops 67

echo "== ettin-17m through the coordinator and one CUDA worker"
work="$(mktemp -d)"
export TWINHEAD_LOG=warn
"$gpu/twinhead" coordinator --listen 127.0.0.1:0 --db "$work/c.db" >"$work/coordinator.out" 2>&1 &
url=""
for _ in $(seq 100); do url="$(grep -o 'http://[0-9.:]*' "$work/coordinator.out" | head -1 || true)"; [ -n "$url" ] && break; sleep 0.1; done
"$gpu/twinhead" worker --coordinator "$url" --device cuda:0 --exit-when-idle 2>"$out/worker-17m.log" &
# The tiny recipe's three phases on the sample dataset (its 4,096-token
# vocabulary fits ettin-17m's embeddings; a throughput check, not a model).
id="$("$gpu/twinhead" submit configs/runs/tiny-cpu.toml --coordinator "$url" --json \
  --set model=ettin-17m --set world_size=1 --set global_batch=64 --set micro_batch=64 \
  --set "dataset=file://$gpu/data/sample" --set "checkpoint.root=file://$work/ckpt" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["run_id"])')"
timeout 300 "$gpu/twinhead" watch "$id" --coordinator "$url" --json >/dev/null || echo "watch ended with $?"
"$gpu/twinhead" status "$id" --coordinator "$url" --json | tee "$out/run-17m.json" | python3 -c '
import json, sys
r = json.load(sys.stdin)
for p in r["phases"]:
    secs = max((p.get("finished_ms", 0) - p.get("started_ms", 0)) / 1000, 1e-9)
    print(p["name"], r["state"], p["tokens_done"], "tokens", round(secs, 1), "s", round(p["tokens_done"] / secs), "tokens/s")
'
tail -5 "$out/worker-17m.log" || true
kill $(jobs -p) 2>/dev/null || true
