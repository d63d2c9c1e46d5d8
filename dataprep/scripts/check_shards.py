#!/usr/bin/env python3
"""Independent check of a twinhead dataset with pyarrow (not needed by cargo test).

    pip install pyarrow
    python3 dataprep/scripts/check_shards.py twinhead-data/sample

Reads manifest.json, re-hashes every shard, and checks each row: input_ids is
exactly seq_len long, doc_lens sums to seq_len, one source id per document,
tokens per source match the manifest.
"""
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq


def main(root: Path) -> int:
    m = json.loads((root / "manifest.json").read_text())
    names = [s["name"] for s in m["sources"]]
    bad = 0
    for phase in m["phases"]:
        seq = phase["seq_len"]
        per_source = Counter()
        rows = 0
        for sh in phase["shards"]:
            path = root / sh["path"]
            if hashlib.sha256(path.read_bytes()).hexdigest() != sh["sha256"]:
                print(f"sha256 mismatch: {sh['path']}")
                bad += 1
            t = pq.read_table(path)
            assert t.schema.field("input_ids").type.value_type == "uint32"
            for ids, lens, src in zip(t["input_ids"].to_pylist(), t["doc_lens"].to_pylist(), t["source"].to_pylist()):
                rows += 1
                if len(ids) != seq or sum(lens) != seq or len(lens) != len(src):
                    print(f"bad row in {sh['path']}")
                    bad += 1
                for n, s in zip(lens, src):
                    per_source[names[s]] += n
        ok = rows == phase["sequences"] and dict(per_source) == phase["tokens_per_source"]
        print(f"{phase['name']}: {rows} rows x {seq}, {'ok' if ok else 'MISMATCH'} {dict(per_source)}")
        bad += 0 if ok else 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "twinhead-data/sample")))
