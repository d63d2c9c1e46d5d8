//! Fuzzed dataset files (issue 15): `manifest.json` with mutated keys,
//! values and bytes, and the parquet layouts (phase shards, stage-1
//! documents, scans) with bit flips, truncations and splices of their own
//! bytes. No input may panic or take long, and every rejection names the
//! file and what was wrong (a key path for the manifest).
//!
//! Short pass: `cargo test -p twinhead-data --test fuzz`. Bench mode:
//! `TWINHEAD_FUZZ_CASES=1000000 cargo test --release -p twinhead-data
//! --test fuzz -- --ignored fuzz_`.

#[allow(dead_code)]
#[path = "../../proto/tests/support/json_doc.rs"]
mod json_doc;
#[allow(dead_code)]
#[path = "../../proto/tests/support/mod.rs"]
mod support;

use std::time::Duration;

use proptest::prelude::*;
use support::text::{self, Mutation};
use support::{Edit, edits, names_one_of};
use twinhead_data::FormatError;
use twinhead_data::formats::{self, Doc, Row, ScanDoc};
use twinhead_data::manifest::Manifest;

const SHORT: u32 = 1500;
const LIMIT: Duration = Duration::from_secs(5);

/// A manifest with every table dataprep writes.
const MANIFEST: &str = r#"{
  "format_version": 1,
  "program": "twinhead-dataprep",
  "program_version": "0.1.0",
  "name": "fuzz",
  "config": "name = \"fuzz\"\n",
  "config_sha256": "ab",
  "tokenizer": {"path": "tokenizer.json", "sha256": "cd", "vocab_size": 512,
                "cls_id": 1, "sep_id": 2, "trained": true},
  "sources": [
    {"name": "web", "index": 0, "files": 2, "read": 10, "rejected": {"malformed_json": 1},
     "dropped": {"duplicate": 2}, "kept": 7, "chars": 700, "tokens": 300,
     "parts": [{"path": "parts/web-00000.parquet", "rows": 7, "sha256": "ef"}],
     "issues": [{"input": "a.jsonl", "line": 3, "reason": "malformed_json", "message": "eof"}]}
  ],
  "phases": [
    {"name": "pretrain", "seq_len": 16, "seed": 7, "min_piece_tokens": 4,
     "budget_tokens": 256, "sequences": 12, "tokens": 192,
     "tokens_per_source": {"web": 192}, "tail_tokens_dropped": 3,
     "draws": [{"source": "web", "weight": 1.0, "target_tokens": 256, "available_tokens": 300,
                "drawn_tokens": 256, "full_epochs": 0, "subsampled": true,
                "short_piece_tokens_dropped": 0}],
     "shards": [{"path": "phases/pretrain/shard-00000.parquet", "rows": 8, "sha256": "01"},
                {"path": "phases/pretrain/shard-00001.parquet", "rows": 4, "sha256": "02"}],
     "eval": {"docs": 1, "sequences": 1, "tokens": 16, "tokens_per_source": {"web": 16},
              "tail_tokens_dropped": 0,
              "shards": [{"path": "phases/pretrain/eval-00000.parquet", "rows": 1, "sha256": "03"}]}},
    {"name": "decay", "seq_len": 32, "sequences": 0, "shards": []}
  ],
  "decontamination": {"ngram": 8, "reference_docs": 10, "reference_docs_too_short": 1,
                      "ngrams": 100, "sha256": "04"}
}"#;

fn manifest_value() -> serde_json::Value {
    serde_json::from_str(MANIFEST).expect("base manifest is JSON")
}

/// Key names a manifest error may give.
fn manifest_names(base: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = json_doc::paths(base, 8)
        .iter()
        .filter_map(|p| match p.last() {
            Some(json_doc::Seg::Key(k)) => Some(k.clone()),
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    // Syntax errors give a line and column.
    names.extend(["line".to_string(), "column".to_string()]);
    names
}

#[derive(Debug, Clone)]
struct MangledJson {
    edits: Vec<(usize, Edit)>,
    bytes: Vec<Mutation>,
}

fn mangled_json() -> impl Strategy<Value = MangledJson> {
    (
        edits(3),
        prop_oneof![
            3 => Just(Vec::new()),
            1 => text::mutations(3),
        ],
    )
        .prop_map(|(edits, bytes)| MangledJson { edits, bytes })
}

fn manifest(short: u32) {
    let base = manifest_value();
    let names = manifest_names(&base);
    let location = "file:///fuzz/manifest.json";
    assert!(Manifest::parse(location, MANIFEST.as_bytes()).is_ok());
    support::run("manifest", short, LIMIT, mangled_json(), |m| {
        let mut value = base.clone();
        let mut touched = Vec::new();
        for (pick, edit) in &m.edits {
            if let Some(path) = json_doc::apply(&mut value, 8, *pick, edit) {
                touched.push(json_doc::path_text(&path));
                if let Edit::Rename(name) | Edit::AddSibling(name, _) = edit {
                    touched.push(name.clone());
                }
            }
        }
        let bytes = text::mutated(&serde_json::to_vec(&value).unwrap_or_default(), &m.bytes);
        match Manifest::parse(location, &bytes) {
            Ok(manifest) => {
                // What the loader asks of a manifest that parsed.
                for name in ["pretrain", "decay", ""] {
                    if let Err(e) = manifest.phase(location, name) {
                        names_one_of(&e.to_string(), location, &["has no phase"])?;
                    }
                }
                Ok(())
            }
            Err(e) => {
                let message = e.to_string();
                prop_assert!(matches!(e, FormatError::Json { .. }), "{message}");
                let all: Vec<&str> = names.iter().map(String::as_str).collect();
                names_one_of(&message, location, &all)
            }
        }
    });
}

// ---------------------------------------------------------------- parquet

/// Rows of `seq_len` 16 packing two documents each, in row groups of 3.
pub fn shard_rows() -> Vec<Row> {
    (0..10u32)
        .map(|i| Row {
            input_ids: (0..16).map(|t| (i * 16 + t) % 512).collect(),
            doc_lens: vec![5, 11],
            source: vec![0, (i % 3) as u16],
            doc_keys: vec![u64::from(i), u64::MAX - u64::from(i)],
        })
        .collect()
}

/// The three parquet layouts, as dataprep writes them.
fn parquet_files() -> Vec<(&'static str, Vec<u8>)> {
    let shard = formats::write_rows("shard", &shard_rows(), 3).expect("shard");
    let docs: Vec<Doc> = (0..6u32)
        .map(|i| Doc {
            id: format!("web:{i}"),
            ids: (0..i + 2).collect(),
        })
        .collect();
    let docs = formats::write_docs("docs", &docs).expect("docs");
    let scans: Vec<ScanDoc> = (0..6u64)
        .map(|i| ScanDoc {
            id: format!("d{i}"),
            text: "héllo wörld ".repeat(i as usize + 1),
            key: u128::from(i) << 70 | u128::from(i),
            chars: 12 * (i + 1),
        })
        .collect();
    let scan = formats::write_scan("scan", &scans).expect("scan");
    vec![("shard", shard), ("docs", docs), ("scan", scan)]
}

/// Reads `bytes` the way `kind` is read; the error if one.
fn read(kind: &str, location: &str, bytes: Vec<u8>) -> Result<(), FormatError> {
    match kind {
        "shard" => {
            formats::row_groups(location, bytes.clone())?;
            formats::read_doc_keys(location, bytes.clone())?;
            formats::read_rows(location, bytes).map(drop)
        }
        "docs" => formats::read_docs(location, bytes).map(drop),
        _ => {
            formats::read_scan(location, bytes.clone(), false)?;
            formats::read_scan(location, bytes, true).map(drop)
        }
    }
}

fn parquet(short: u32) {
    let files = parquet_files();
    for (kind, bytes) in &files {
        read(kind, "clean", bytes.clone()).unwrap_or_else(|e| panic!("{kind}: {e}"));
    }
    support::run(
        "parquet",
        short,
        LIMIT,
        (0..files.len(), text::mutations(4)),
        |(file, mutations)| {
            let (kind, clean) = &files[file];
            let location = format!("file:///fuzz/{kind}.parquet");
            let bytes = text::mutated(clean, &mutations);
            if let Err(e) = read(kind, &location, bytes) {
                let message = e.to_string();
                prop_assert!(matches!(e, FormatError::Parquet { .. }), "{message}");
                names_one_of(&message, &location, &[])?;
            }
            Ok(())
        },
    );
}

/// Finding: a shard whose dictionary page is damaged made the parquet crate
/// panic ("Decoder for dict should have been set") instead of failing;
/// the readers now turn that into an error naming the file.
#[test]
fn a_damaged_dictionary_page_is_an_error_not_a_panic() {
    let (_, shard) = parquet_files().swap_remove(0);
    let bytes = text::mutated(
        &shard,
        &[Mutation::Repeat {
            at: 1503992704196180748,
            len: 7,
            times: 6,
        }],
    );
    let err = read("shard", "file:///d/shard.parquet", bytes)
        .expect_err("corrupt shard")
        .to_string();
    assert!(
        err.starts_with("parquet file:///d/shard.parquet: corrupt data"),
        "{err}"
    );
}

#[test]
fn manifest_short() {
    manifest(SHORT);
}

#[test]
fn parquet_short() {
    parquet(SHORT / 3);
}

#[test]
#[ignore = "bench mode: TWINHEAD_FUZZ_CASES cases, release build"]
fn fuzz_manifest() {
    manifest(SHORT);
}

#[test]
#[ignore = "bench mode: TWINHEAD_FUZZ_CASES cases, release build"]
fn fuzz_parquet() {
    parquet(SHORT / 3);
}
