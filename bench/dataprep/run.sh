#!/usr/bin/env bash
# bench/dataprep: twinhead's dataset build (the fast encoder, and the
# tokenizers 0.22 reference forced: "before") vs datatrove vs the raw encoder
# ceilings (0.22 and the fast encoder alone), on the same ~240 MB of registry
# text, THREADS (default 2) threads/processes each; twinhead also at 1 thread.
#
#   bench/dataprep/run.sh [TWINHEAD_BINARY]
#
# TWINHEAD_BINARY is `twinhead` (run as `dataset build … --json`) or the
# dataprep example `build_dataset` (the same library call, much quicker to
# build: `cargo build --release -p twinhead-dataprep --example build_dataset
# --example encode_ceiling`); default target/release/twinhead when built,
# else target/release/examples/build_dataset. The ceilings need
# target/release/examples/encode_ceiling. PY_CEILING=1 adds the Python
# binding's encode_batch ceiling (tokenizers 0.23.3); DATATROVE=0 skips
# datatrove (about 10 minutes on 2 shared cores).
#
# Needs: bench/dataprep/prepare_corpus.py (run first, idempotent), the venv
# .cache/bench-dataprep/venv with the pinned Python packages (made here if
# missing). Results: .cache/bench-dataprep/results/<UTC time>/ and a table.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${1:-}"
if [ -z "$bin" ]; then
  bin="$root/target/release/twinhead"
  [ -x "$bin" ] || bin="$root/target/release/examples/build_dataset"
fi
ceiling="$root/target/release/examples/encode_ceiling"
cache="$root/.cache/bench-dataprep"
threads="${THREADS:-2}"
venv="$cache/venv"
py="$venv/bin/python"

python3 "$here/prepare_corpus.py" >/dev/null
corpus="$cache/corpus"
tok="$cache/tokenizer/allenai_gpt-neox-olmo-dolma-v1_5.json"

if [ ! -x "$py" ]; then
  python3 -m venv "$venv"
fi
"$py" -c "import datatrove, spacy, regex, tokenizers" 2>/dev/null || \
  "$venv/bin/pip" install -q datatrove==0.10.1 tokenizers==0.23.3 spacy==3.8.18 regex==2026.11.19 orjson==3.13.0

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
res="$cache/results/$stamp"
work="${WORK:-/tmp/bench-dataprep-$stamp}"
mkdir -p "$res" "$work"
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "uptime at start: $(uptime)"
  echo "cpus: $(nproc); $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "twinhead: $bin ($("$bin" --version 2>/dev/null || echo '?'))"
  echo "datatrove: $("$py" -c 'import importlib.metadata as m; print(m.version("datatrove"))')"
  echo "tokenizers: $("$py" -c 'import importlib.metadata as m; print(m.version("tokenizers"))'), spacy: $("$py" -c 'import importlib.metadata as m; print(m.version("spacy"))')"
  echo "corpus: $(python3 -c "import json; s=json.load(open('$corpus/corpus.json')); print(s['docs'], 'docs,', s['mb'], 'MB,', len(s['shards']), 'shards')")"
} | tee "$res/env.txt"

if [ "${PY_CEILING:-0}" = 1 ]; then
  echo "== raw ceiling (Python tokenizers encode_batch, $threads threads)"
  RAYON_NUM_THREADS=$threads RAYON_RS_NUM_CPUS=$threads TOKENIZERS_PARALLELISM=true \
    python3 "$here/measure.py" "$res/raw.json" -- "$py" "$here/raw_ceiling.py" --corpus "$corpus" --tokenizer "$tok"
fi

echo "== raw encoder ceilings (tokenizers 0.22 and the fast encoder, $threads threads)"
python3 "$here/measure.py" "$res/ceiling.json" -- "$ceiling" "$tok" "$threads" both "$corpus"/shard-*.jsonl.gz
echo "uptime: $(uptime)" | tee -a "$res/env.txt"

build() { # name encoder threads
  rm -rf "$work/$1"
  echo "== twinhead build: encoder $2, $3 thread(s) (uptime: $(uptime | sed 's/.*load/load/'))" | tee -a "$res/env.txt"
  if [ "$(basename "$bin")" = build_dataset ]; then
    TWINHEAD_DATAPREP_ENCODER="$2" python3 "$here/measure.py" "$res/$1.json" -- \
      "$bin" "$here/bench.toml" "$work/$1" "$3"
  else
    TWINHEAD_DATAPREP_ENCODER="$2" python3 "$here/measure.py" "$res/$1.json" -- \
      "$bin" dataset build "$here/bench.toml" --out "$work/$1" --threads "$3" --json
  fi
  cp "$work/$1/bench-dataprep/manifest.json" "$res/$1-manifest.json" 2>/dev/null || true
}
build twinhead-reference reference "$threads"
build twinhead fast "$threads"
build twinhead-reference-1 reference 1
build twinhead-1 fast 1
for m in twinhead-reference twinhead-1 twinhead-reference-1; do
  cmp -s "$res/twinhead-manifest.json" "$res/$m-manifest.json" \
    && echo "manifest of $m: identical to the fast build's" \
    || echo "manifest of $m: DIFFERS from the fast build's"
done | tee -a "$res/env.txt"

if [ "${DATATROVE:-1}" != 0 ]; then
  echo "== datatrove (LocalPipelineExecutor tasks=8 workers=$threads)"
  python3 "$here/measure.py" "$res/datatrove.json" -- "$py" "$here/datatrove_pipeline.py" \
    --corpus "$corpus" --tokenizer "$tok" --out "$work/datatrove" --workers "$threads"
  cp "$work/datatrove/logs-stage1/stats.json" "$res/datatrove-stats.json" 2>/dev/null || true
fi

echo "uptime at end: $(uptime)" | tee -a "$res/env.txt"
python3 "$here/report.py" "$res" "$threads" | tee "$res/table.md"
echo "results in $res"
