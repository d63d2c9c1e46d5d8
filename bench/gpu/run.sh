#!/usr/bin/env bash
# The GPU checks of issues 4 and 5 as one script, for a machine with one
# NVIDIA GPU, no network and no Rust: the binaries and the sample dataset
# are built on a CPU machine and carried as one compressed bundle.
#
# On the build machine (x86-64, repo root; about 7 minutes on 2 cores):
#   bench/gpu/run.sh --prepare
#       builds twinhead and device_step with --features cuda, strips them,
#       builds the sample dataset, and packs all three into
#       .gpu/bundle.tar.gz (about 35 MB; .gpu/ is git-ignored locally).
# On the GPU machine (repo root, with .gpu/bundle.tar.gz carried):
#   bench/gpu/run.sh OUT_DIR [CHECK ...]
#       CHECK: step150 (ettin-150m, seq 1024, bf16-mixed, bf16 and f32),
#       long150 (ettin-150m at the extension phases' 7,999 tokens,
#       bf16-mixed, and f32 with and without activation checkpointing), step17 (ettin-17m, seq 1024,
#       f32), run17 (ettin-17m through the real system); all by default.
#       Each has its own timeout; together at most about 13 minutes (pass
#       a subset of checks to fit a shorter lease).
#       Results: OUT_DIR/*.json (with the GPU's peak memory in use, sampled
#       by nvidia-smi) and OUT_DIR/log.txt.
#
# What it measures
#   - device_step (twinhead's own training step: forward, backward, the flat
#     gradient buffer through NCCL in place, StableAdamW on the device):
#     tokens/s and MFU against the H200's dense peak (989 TFLOP/s bf16,
#     67 f32); each also times the all-reduce of a gradient-sized buffer
#     through NCCL in place on Burn's buffer against a copy through the host;
#   - run17: ettin-17m through the coordinator and one
#     `twinhead worker --device cuda:0` (checkpoints, the three phases of
#     configs/runs/tiny-cpu.toml) on the sample dataset, tokens/s per phase
#     from `twinhead status --json`.
# Libraries: cudarc loads libcuda, libnvrtc (CubeCL's kernel compiler) and
# libnccl at run time; the script links their plain names to the versioned
# files it finds (toolkit, driver, the nvidia-* wheels).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
gpu="$root/.gpu"

if [ "${1:-}" = "--prepare" ]; then
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  cargo build --release --features cuda -p twinhead -p twinhead-bench --bin twinhead --bin device_step
  stage="$(mktemp -d)"
  strip -o "$stage/twinhead" target/release/twinhead
  strip -o "$stage/device_step" target/release/device_step
  [ -d .cache/corpora/sotu ] || dataprep/fetch-sample.sh
  "$stage/twinhead" dataset build configs/data/sample.toml --out "$stage/data" --threads 2 --json >/dev/null
  mkdir -p "$gpu"
  tar czf "$gpu/bundle.tar.gz" -C "$stage" twinhead device_step data
  rm -rf "$stage"
  ls -la "$gpu/bundle.tar.gz"
  echo "carry .gpu/bundle.tar.gz (the working tree and carried files must stay under 64 MiB)"
  exit 0
fi

out="${1:?usage: bench/gpu/run.sh OUT_DIR [step150] [step17] [run17] | --prepare}"
shift
checks="${*:-step150 long150 step17 run17}"
mkdir -p "$out"
exec > >(tee "$out/log.txt") 2>&1
gpu=/tmp/twinhead-gpu
rm -rf "$gpu" && mkdir -p "$gpu" && tar xzf "$root/.gpu/bundle.tar.gz" -C "$gpu"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# cudarc opens libcuda.so, libnvrtc.so and libnccl.so by their plain names
# (or .so.<its build's CUDA major>); toolkits and wheels often ship only
# versioned files. Link the plain names to what is there.
libs=/tmp/twinhead-cudalibs
mkdir -p "$libs"
search="/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu /usr/local/nvidia/lib64"
search="$search $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, d, "lib") for p in nvidia.__path__ for d in os.listdir(p)))' 2>/dev/null || true)"
for name in libcuda libnvrtc libnccl; do
  found=""
  for dir in $search; do
    found="$(ls "$dir/$name.so" "$dir/$name.so."* 2>/dev/null | head -1 || true)"
    [ -n "$found" ] && break
  done
  if [ -n "$found" ]; then
    ln -sf "$found" "$libs/$name.so"
    search_dirs="${search_dirs:-}:$(dirname "$found")"
    echo "$name: $found"
  else
    echo "$name: not found in $search"
  fi
done
export LD_LIBRARY_PATH="$libs${search_dirs:-}:${LD_LIBRARY_PATH:-}"

step() { # name timeout args...
  local name="$1" limit="$2"; shift 2
  echo "== device_step $name: $*"
  local mem="$out/device_step-$name.mem"
  if command -v nvidia-smi >/dev/null; then
    (while sleep 0.5; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; done) >"$mem" 2>/dev/null &
  fi
  local sampler=$!
  timeout "$limit" "$gpu/device_step" --device cuda:0 "$@" >"$out/device_step-$name.json" || echo "device_step $name failed ($?)"
  kill "$sampler" 2>/dev/null || true
  cat "$out/device_step-$name.json"; echo
  [ -s "$mem" ] && echo "peak GPU memory in use: $(sort -n "$mem" | tail -1) MiB"
}
case " $checks " in *" step150 "*)
  step 150m-bf16-mixed 150 --model ettin-150m --seq 1024 --batch 32 --steps 10 --warmup 3 --precision bf16-mixed --peak-tflops 989
  step 150m-bf16 150 --model ettin-150m --seq 1024 --batch 32 --steps 10 --warmup 3 --precision bf16 --peak-tflops 989
  step 150m-f32 120 --model ettin-150m --seq 1024 --batch 16 --steps 10 --warmup 3 --precision f32 --peak-tflops 67
esac
case " $checks " in *" long150 "*)
  # Phases 2 and 3 of the recipe: 7,999-token rows. Blocked attention keeps
  # memory linear in seq in local layers.
  step 150m-7999-bf16-mixed 150 --model ettin-150m --seq 7999 --batch 4 --steps 3 --warmup 1 --precision bf16-mixed --peak-tflops 989
  step 150m-7999-f32 150 --model ettin-150m --seq 7999 --batch 4 --steps 3 --warmup 1 --precision f32 --peak-tflops 67
  step 150m-7999-f32-recompute 150 --model ettin-150m --seq 7999 --batch 4 --steps 3 --warmup 1 --precision f32 --peak-tflops 67 --activation-checkpointing
esac
case " $checks " in *" step17 "*)
  step 17m-f32 90 --model ettin-17m --seq 1024 --batch 32 --steps 10 --warmup 3 --precision f32 --peak-tflops 67
esac
case " $checks " in *" run17 "*) ;; *) exit 0 ;; esac

echo "== ettin-17m through the coordinator and one CUDA worker"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
export TWINHEAD_LOG=warn
"$gpu/twinhead" coordinator --listen 127.0.0.1:0 --db "$work/c.db" >"$work/coordinator.out" 2>&1 &
url=""
for _ in $(seq 100); do url="$(grep -o 'http://[0-9.:]*' "$work/coordinator.out" | head -1 || true)"; [ -n "$url" ] && break; sleep 0.1; done
"$gpu/twinhead" worker --coordinator "$url" --device cuda:0 --exit-when-idle 2>"$out/worker-17m.log" &
# The tiny recipe's three phases on the sample dataset (its 4,096-token
# vocabulary fits ettin-17m's embeddings; a throughput check, not a model).
id="$("$gpu/twinhead" submit configs/runs/tiny-cpu.toml --coordinator "$url" --json \
  --set model=ettin-17m --set world_size=1 --set global_batch=32 --set micro_batch=32 \
  --set "dataset=file://$gpu/data/sample" --set "checkpoint.root=file://$work/ckpt" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["run_id"])')"
timeout 180 "$gpu/twinhead" watch "$id" --coordinator "$url" --json >/dev/null || echo "watch ended with $?"
"$gpu/twinhead" status "$id" --coordinator "$url" --json | tee "$out/run-17m.json" | python3 -c '
import json, sys
r = json.load(sys.stdin)
for p in r["phases"]:
    secs = max((p.get("finished_ms", 0) - p.get("started_ms", 0)) / 1000, 1e-9)
    print(p["name"], r["state"], p["tokens_done"], "tokens", round(secs, 1), "s", round(p["tokens_done"] / secs), "tokens/s")
'
tail -5 "$out/worker-17m.log" || true
kill $(jobs -p) 2>/dev/null || true
