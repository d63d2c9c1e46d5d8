#![allow(clippy::unwrap_used)]
//! Bad input: malformed JSON lines, invalid UTF-8, missing text fields,
//! empty or truncated gzip/zstd/parquet, unreadable locations; input formats
//! round-trip; config errors name file and key.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use twinhead_data::formats::ScanDoc;
use twinhead_dataprep::stage1::Counters;
use twinhead_dataprep::tasks::{Build, Outcome};
use twinhead_dataprep::{Error, NoProgress};
use twinhead_proto::build_tasks::Task;
use twinhead_proto::dataset::DatasetConfig;

/// Config with one source over `input`.
fn config(dir: &Path, input: &str, format: &str, fields: &str, on_error: &str) -> DatasetConfig {
    let text = format!(
        r#"on_error = "{on_error}"
[tokenizer]
train = {{ vocab_size = 300 }}
[[sources]]
name = "s"
input = "{input}"
format = "{format}"
{fields}
[[phases]]
name = "p"
seq_len = 16
tokens = 100
seed = 1
weights = {{ s = 1.0 }}
"#
    );
    DatasetConfig::parse(&dir.join("c.toml"), &text).unwrap()
}

/// What the product's plan, scan and prepare tasks kept of the source.
#[derive(Debug)]
struct Scanned {
    /// Kept documents per part, in input order.
    parts: Vec<Vec<ScanDoc>>,
    stats: Counters,
}

/// Runs the build's plan, scan and prepare tasks (the path `dataset build`
/// and dataprep processes take) and reads back what they kept.
fn scan(cfg: &DatasetConfig) -> twinhead_dataprep::Result<Scanned> {
    let out = tempfile::tempdir().unwrap();
    let build = Build::new(cfg.clone(), out.path().to_str().unwrap())?;
    let Outcome::Planned {
        parts_per_source, ..
    } = build.run(Task::Plan, &NoProgress)?
    else {
        panic!("the plan task did not plan");
    };
    for part in 0..parts_per_source[0] {
        build.run(Task::Scan { source: 0, part }, &NoProgress)?;
    }
    build.run(Task::Prepare, &NoProgress)?;
    let (stats, parts) = build.kept(0)?;
    Ok(Scanned { parts, stats })
}

fn texts(s: &Scanned) -> Vec<String> {
    s.parts
        .iter()
        .flat_map(|d| d.iter().map(|d| d.text.clone()))
        .collect()
}

const GOOD: &str = "{\"text\": \"first document here\"}\n";

#[test]
fn jsonl_bad_lines_are_counted_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("in.jsonl");
    let mut body = Vec::new();
    body.extend_from_slice(GOOD.as_bytes());
    body.extend_from_slice(b"{\"text\": \"unterminated\n");
    body.extend_from_slice(b"{\"text\": \"bad \xff\xfe utf8\"}\n");
    body.extend_from_slice(b"\n");
    body.extend_from_slice(b"{\"title\": \"no text field\"}\n");
    body.extend_from_slice(b"{\"text\": 42}\n");
    body.extend_from_slice(b"{\"text\": \"second document\"}");
    std::fs::write(&p, body).unwrap();
    let cfg = config(dir.path(), p.to_str().unwrap(), "jsonl", "", "fail");
    let s = scan(&cfg).unwrap();
    assert_eq!(texts(&s), ["first document here", "second document"]);
    assert_eq!(s.stats.read, 6);
    assert_eq!(s.stats.rejected.get("malformed_json"), Some(&1));
    assert_eq!(s.stats.rejected.get("invalid_utf8"), Some(&1));
    assert_eq!(s.stats.rejected.get("missing_text"), Some(&2));
    let where_: Vec<(Option<u64>, &str)> = s
        .stats
        .issues
        .iter()
        .map(|i| (i.line, i.reason.as_str()))
        .collect();
    assert_eq!(
        where_,
        [
            (Some(2), "malformed_json"),
            (Some(3), "invalid_utf8"),
            (Some(5), "missing_text"),
            (Some(6), "missing_text")
        ]
    );
    assert!(s.stats.issues.iter().all(|i| i.input.ends_with("in.jsonl")));
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn many_lines(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| format!("{{\"text\": \"document number {i} with some words\"}}\n"))
        .collect::<String>()
        .into_bytes()
}

#[test]
fn gzip_and_zstd_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let data = many_lines(50);
    std::fs::write(dir.path().join("a.jsonl.gz"), gz(&data)).unwrap();
    std::fs::write(
        dir.path().join("b.jsonl.zst"),
        zstd::encode_all(&data[..], 3).unwrap(),
    )
    .unwrap();
    let cfg = config(
        dir.path(),
        &format!("{}/*.jsonl.gz", dir.path().display()),
        "jsonl.gz",
        "",
        "fail",
    );
    assert_eq!(texts(&scan(&cfg).unwrap()).len(), 50);
    let cfg = config(
        dir.path(),
        &format!("{}/*.zst", dir.path().display()),
        "jsonl.zst",
        "",
        "fail",
    );
    let t = texts(&scan(&cfg).unwrap());
    assert_eq!(t.len(), 50);
    assert_eq!(t[7], "document number 7 with some words");
}

#[test]
fn truncated_gzip_skip_keeps_earlier_lines_fail_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let full = gz(&many_lines(2000));
    let p = dir.path().join("cut.jsonl.gz");
    std::fs::write(&p, &full[..full.len() / 2]).unwrap();
    let cfg = config(dir.path(), p.to_str().unwrap(), "jsonl.gz", "", "skip");
    let s = scan(&cfg).unwrap();
    assert_eq!(s.stats.rejected.get("unreadable_input"), Some(&1));
    let n = texts(&s).len();
    assert!(n > 0 && n < 2000, "{n}");
    assert!(
        s.stats.issues[0].message.contains("truncated"),
        "{:?}",
        s.stats.issues
    );

    let cfg = config(dir.path(), p.to_str().unwrap(), "jsonl.gz", "", "fail");
    match scan(&cfg) {
        Err(e @ Error::Input { .. }) => assert!(e.to_string().contains("cut.jsonl.gz"), "{e}"),
        r => panic!("expected an input error, got {:?}", r.map(|s| s.stats)),
    }
}

#[test]
fn empty_and_truncated_zstd() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a-empty.jsonl.zst"), b"").unwrap();
    let full = zstd::encode_all(&many_lines(3000)[..], 3).unwrap();
    std::fs::write(dir.path().join("b-cut.jsonl.zst"), &full[..full.len() / 2]).unwrap();
    std::fs::write(
        dir.path().join("c-garbage.jsonl.zst"),
        b"this is not zstd at all",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("d-good.jsonl.zst"),
        zstd::encode_all(GOOD.as_bytes(), 3).unwrap(),
    )
    .unwrap();
    let input = format!("{}/*.jsonl.zst", dir.path().display());
    let cfg = config(dir.path(), &input, "jsonl.zst", "", "skip");
    let s = scan(&cfg).unwrap();
    assert_eq!(
        s.stats.rejected.get("unreadable_input"),
        Some(&3),
        "{:?}",
        s.stats.issues
    );
    assert!(texts(&s).contains(&"first document here".to_string()));
    let cfg = config(dir.path(), &input, "jsonl.zst", "", "fail");
    let e = scan(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("a-empty.jsonl.zst") && e.contains("empty"),
        "{e}"
    );
}

fn parquet_bytes(texts: &[Option<&str>]) -> Vec<u8> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("content", DataType::Utf8, true),
        Field::new("id", DataType::Utf8, true),
    ]));
    let ids: Vec<String> = (0..texts.len()).map(|i| format!("row{i}")).collect();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(texts.to_vec())),
            Arc::new(StringArray::from(
                ids.iter().map(String::as_str).collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(Vec::new(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.into_inner().unwrap()
}

#[test]
fn parquet_input_round_trip_and_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let good = parquet_bytes(&[Some("alpha beta gamma"), None, Some("delta epsilon")]);
    std::fs::write(dir.path().join("a.parquet"), &good).unwrap();
    std::fs::write(dir.path().join("b.parquet"), &good[..good.len() - 20]).unwrap();
    std::fs::write(dir.path().join("c.parquet"), b"").unwrap();
    let input = format!("{}/*.parquet", dir.path().display());
    let cfg = config(
        dir.path(),
        &input,
        "parquet",
        "text_field = \"content\"\nid_field = \"id\"",
        "skip",
    );
    let s = scan(&cfg).unwrap();
    assert_eq!(texts(&s), ["alpha beta gamma", "delta epsilon"]);
    let ids: Vec<String> = s.parts[0].iter().map(|d| d.id.clone()).collect();
    assert_eq!(ids, ["row0", "row2"]);
    assert_eq!(s.stats.rejected.get("missing_text"), Some(&1));
    assert_eq!(s.stats.rejected.get("unreadable_input"), Some(&2));
    let cfg = config(
        dir.path(),
        &input,
        "parquet",
        "text_field = \"content\"",
        "fail",
    );
    let e = scan(&cfg).unwrap_err().to_string();
    assert!(e.contains("b.parquet"), "{e}");
    // A column that does not exist makes the whole input unreadable.
    let cfg = config(
        dir.path(),
        &format!("{}/a.parquet", dir.path().display()),
        "parquet",
        "text_field = \"body\"",
        "fail",
    );
    assert!(
        scan(&cfg)
            .unwrap_err()
            .to_string()
            .contains("no column \"body\"")
    );
}

#[test]
fn text_files_with_invalid_utf8_and_missing_location() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("docs");
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("a.txt"), "a readable document").unwrap();
    std::fs::write(d.join("b.txt"), b"broken \xc3\x28 bytes").unwrap();
    std::fs::write(d.join("c.md"), "skipped by extension").unwrap();
    let cfg = config(
        dir.path(),
        d.to_str().unwrap(),
        "text",
        "extensions = [\"txt\"]",
        "fail",
    );
    let s = scan(&cfg).unwrap();
    assert_eq!(texts(&s), ["a readable document"]);
    assert_eq!(s.stats.files, 2);
    assert_eq!(s.stats.rejected.get("invalid_utf8"), Some(&1));

    let missing = dir.path().join("nowhere/*.jsonl");
    let cfg = config(dir.path(), missing.to_str().unwrap(), "jsonl", "", "skip");
    let s = scan(&cfg).unwrap();
    assert_eq!(s.stats.rejected.get("unreadable_input"), Some(&1));
    let cfg = config(dir.path(), missing.to_str().unwrap(), "jsonl", "", "fail");
    assert!(matches!(scan(&cfg), Err(Error::Input { .. })));
    let cfg = config(dir.path(), "s3://bucket/x/*.jsonl", "jsonl", "", "fail");
    let e = scan(&cfg).unwrap_err().to_string();
    assert!(e.contains("s3://bucket"), "{e}");
}

#[test]
fn config_errors_name_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = r#"
[tokenizer]
train = { vocab_size = 4096 }
[[sources]]
name = "web"
input = "x.jsonl"
format = "jsonl"
[[phases]]
name = "p"
seq_len = 128
tokens = 1000
seed = 1
weights = { web = 1.0 }
"#;
    let path = dir.path().join("bad.toml");
    assert!(DatasetConfig::parse(&path, base).is_ok());
    let cases = [
        (
            base.replace("format = \"jsonl\"", "format = \"jsonl\"\ncolour = 3"),
            "sources[0]",
            "colour",
        ),
        (
            base.replace("format = \"jsonl\"", "format = \"csv\""),
            "sources[0].format",
            "csv",
        ),
        (
            base.replace("web = 1.0", "webb = 1.0"),
            "phases[0].weights.webb",
            "no source named",
        ),
        (
            base.replace("seq_len = 128", "seq_len = 2"),
            "phases[0].seq_len",
            "8..=",
        ),
        (
            base.replace("vocab_size = 4096", "vocab_size = 10"),
            "tokenizer.train.vocab_size",
            "300",
        ),
        (
            base.replace(
                "format = \"jsonl\"",
                "format = \"jsonl\"\nfilters = { max_digit_ratio = 2.0 }",
            ),
            "sources[0].filters.max_digit_ratio",
            "[0, 1]",
        ),
        (
            format!(
                "{base}[decontamination]\nngram = 2\n[[decontamination.references]]\ninput = \"e.jsonl\"\nformat = \"jsonl\"\n"
            ),
            "decontamination.ngram",
            "4..=64",
        ),
        (
            format!(
                "{base}[decontamination]\n[[decontamination.references]]\ninput = \"e\"\nformat = \"text\"\ntext_field = \"q\"\n"
            ),
            "decontamination.references[0].text_field",
            "no text field",
        ),
        (
            format!("{base}[eval]\nfraction = 0.9\n"),
            "eval.fraction",
            "(0, 0.5]",
        ),
        (
            format!("{base}[eval]\nfraction = 0.1\nmax_docs = 0\n"),
            "eval.max_docs",
            "at least 1",
        ),
        (
            format!("{base}[eval]\nfraction = 0.1\nmax_doc = 3\n"),
            "eval",
            "max_doc",
        ),
    ];
    for (text, key, what) in cases {
        let e = DatasetConfig::parse(&path, &text).unwrap_err().to_string();
        assert!(e.contains("bad.toml"), "{e}");
        assert!(e.contains(key), "{key} not in {e}");
        assert!(e.contains(what), "{what} not in {e}");
    }
}

#[test]
fn sample_config_parses() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/data/sample.toml");
    let cfg = DatasetConfig::load(&p).unwrap();
    assert_eq!(cfg.sources.len(), 5);
    assert_eq!(cfg.phases.len(), 3);
    assert!(
        cfg.eval.is_some(),
        "the sample holds documents out for evaluation"
    );
}

#[test]
fn dedup_across_files_keeps_the_first_in_input_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.jsonl"),
        "{\"id\": \"a1\", \"text\": \"The Same  Text\"}\n{\"id\": \"a2\", \"text\": \"only in a\"}\n{\"id\": \"a3\", \"text\": \"the same text\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.jsonl"),
        "{\"id\": \"b1\", \"text\": \"THE SAME TEXT\\n\"}\n{\"id\": \"b2\", \"text\": \"only in b\"}\n{\"id\": \"b3\", \"text\": \"only in a\"}\n",
    )
    .unwrap();
    let input = format!("{}/*.jsonl", dir.path().display());
    let cfg = config(
        dir.path(),
        &input,
        "jsonl",
        "id_field = \"id\"\nmax_docs = 2",
        "fail",
    );
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let s = pool.install(|| scan(&cfg)).unwrap();
        let ids: Vec<Vec<String>> = s
            .parts
            .iter()
            .map(|d| d.iter().map(|d| d.id.clone()).collect())
            .collect();
        // a1 wins over a3 and b1; b3 repeats a2; max_docs = 2 drops b2.
        assert_eq!(ids, [vec!["a1".to_string(), "a2".to_string()], vec![]]);
        assert_eq!(s.stats.dropped.get("duplicate"), Some(&3));
        assert_eq!(s.stats.dropped.get("over_limit"), Some(&1));
    }
}

/// A pattern that matches no file fails the build with the pattern in the
/// message under `on_error = "fail"`; under `"skip"` the build goes on,
/// counts it, and says which pattern and why.
#[test]
fn an_input_pattern_that_matches_no_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let books = dir.path().join("books");
    std::fs::create_dir(&books).unwrap();
    for i in 0..4 {
        std::fs::write(
            books.join(format!("{i}.txt")),
            format!("chapter {i}: the whale and the sea and the ship and the crew. ").repeat(40),
        )
        .unwrap();
    }
    let pattern = books.join("*.md");
    let write = |on_error: &str| {
        let text = format!(
            r#"
name = "nomatch"
on_error = "{on_error}"
[tokenizer]
train = {{ vocab_size = 300, min_frequency = 2 }}
[[sources]]
name = "books"
input = "{books}/*.txt"
format = "text"
[[sources]]
name = "notes"
input = "{pattern}"
format = "text"
[[phases]]
name = "short"
seq_len = 32
tokens = 2048
seed = 1
[phases.weights]
books = 1.0
"#,
            books = books.display(),
            pattern = pattern.display()
        );
        let path = dir.path().join(format!("{on_error}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let out = format!("file://{}", dir.path().join("out").display());
    let failed = twinhead_dataprep::build(&write("fail"), &out, 1, &twinhead_dataprep::NoProgress)
        .unwrap_err()
        .to_string();
    assert!(
        failed.contains(&pattern.display().to_string()) && failed.contains("matches no file"),
        "{failed}"
    );
    let built = twinhead_dataprep::build(&write("skip"), &out, 1, &twinhead_dataprep::NoProgress)
        .expect("the build goes on");
    let note = built
        .notes
        .iter()
        .find(|n| n.contains("source notes"))
        .unwrap_or_else(|| panic!("no note for the skipped source: {:?}", built.notes));
    assert!(
        note.contains(&pattern.display().to_string()) && note.contains("matches no file"),
        "{note}"
    );
}
