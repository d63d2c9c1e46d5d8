#!/usr/bin/env bash
# bench/dataprep: twinhead's dataset build vs datatrove vs the raw tokenizer
# ceiling, on the same ~240 MB of registry text, 2 threads/processes each.
#
#   bench/dataprep/run.sh [TWINHEAD_BINARY]   (default: target/release/twinhead)
#
# Needs: bench/dataprep/prepare_corpus.py (run first, idempotent), the venv
# .cache/bench-dataprep/venv with the pinned Python packages (made here if
# missing). Results: .cache/bench-dataprep/results/<UTC time>/ and a table.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${1:-$root/target/release/twinhead}"
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

echo "== raw ceiling (tokenizers encode_batch, $threads threads)"
RAYON_NUM_THREADS=$threads RAYON_RS_NUM_CPUS=$threads TOKENIZERS_PARALLELISM=true \
  python3 "$here/measure.py" "$res/raw.json" -- "$py" "$here/raw_ceiling.py" --corpus "$corpus" --tokenizer "$tok"

echo "== twinhead dataset build --threads $threads"
rm -rf "$work/twinhead"
python3 "$here/measure.py" "$res/twinhead.json" -- "$bin" dataset build "$here/bench.toml" \
  --out "$work/twinhead" --threads "$threads" --json
cp "$work/twinhead/bench-dataprep/manifest.json" "$res/twinhead-manifest.json" 2>/dev/null || true

echo "== datatrove (LocalPipelineExecutor tasks=8 workers=$threads)"
python3 "$here/measure.py" "$res/datatrove.json" -- "$py" "$here/datatrove_pipeline.py" \
  --corpus "$corpus" --tokenizer "$tok" --out "$work/datatrove" --workers "$threads"
cp "$work/datatrove/logs-stage1/stats.json" "$res/datatrove-stats.json" 2>/dev/null || true

echo "uptime at end: $(uptime)" | tee -a "$res/env.txt"
python3 "$here/report.py" "$res" "$threads" | tee "$res/table.md"
echo "results in $res"
