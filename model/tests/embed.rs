//! Embedding tasks: the retrieval metrics on known rankings, the linear
//! probe on synthetic features, the Arrow reader on streams written here,
//! its errors, and mean-pooled embeddings on the committed fixture models
//! (packed equal to alone, for both flavours).
//!
//! `tests/fixtures/embed/probe.arrow` is a 20-row stream with every column
//! the probe tasks read, `unlabelled.arrow` a 6-row one with `sentence` and
//! `idx` only; the CLI's end-to-end test copies them into a hand-made
//! `hf_datasets` folder. `committed_probe_fixtures_are_the_generated_ones`
//! checks them against [`probe_fixture`] and [`unlabelled_fixture`]; run it
//! with `TWINHEAD_WRITE_FIXTURES=1` to rewrite the files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, BooleanArray, Int32Array, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use twinhead_model::CpuBackend as B;
use twinhead_model::embed::{
    ArrowTable, PROBE_TASKS, ProbeConfig, ProbeTask, Retrieval, cross_validate, embed,
    fold_assignment, frame, gold_rank, mrr_at, ndcg_at,
};
use twinhead_model::eval::EvalError;
use twinhead_model::hf;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

// ---------------------------------------------------------------------------
// Retrieval metrics

#[test]
fn ndcg_and_mrr_on_a_known_ranking() {
    // Gold at ranks 1, 2, 11 (outside the cut) and 3.
    let ranks = [1, 2, 11, 3];
    let ndcg = (1.0 + 1.0 / 3f64.log2() + 0.0 + 0.5) / 4.0;
    let mrr = (1.0 + 0.5 + 0.0 + 1.0 / 3.0) / 4.0;
    assert!((ndcg_at(&ranks, 10) - ndcg).abs() < 1e-12);
    assert!((mrr_at(&ranks, 10) - mrr).abs() < 1e-12);
    assert_eq!(ndcg_at(&[1, 1], 10), 1.0);
    assert_eq!(mrr_at(&[10], 10), 0.1);
    assert_eq!(mrr_at(&[11], 10), 0.0);
    // Rank 10 is inside the cut, 11 is not.
    assert!((ndcg_at(&[10], 10) - 1.0 / 11f64.log2()).abs() < 1e-12);
}

#[test]
fn gold_rank_breaks_ties_by_paragraph_id() {
    let scores = [0.5, 0.9, 0.5, 0.1];
    assert_eq!(gold_rank(&scores, 1), 1);
    assert_eq!(gold_rank(&scores, 0), 2);
    assert_eq!(gold_rank(&scores, 2), 3); // tied with 0, which comes first
    assert_eq!(gold_rank(&scores, 3), 4);
}

/// Three questions over two paragraphs, as OLMo's squad lines lay them out.
fn squad_lines() -> String {
    let line = |doc_id: u64, paragraph: &str, question: &str| {
        serde_json::json!({
            "request_type": "loglikelihood",
            "doc": {
                "id": format!("q{doc_id}"),
                "title": "T",
                "query": format!("Title: T\nBackground: {paragraph}\nQuestion: {question}\nAnswer:"),
            },
            "request": {"context": "ignored", "continuation": " x"},
            "doc_id": doc_id,
            "idx": 0,
        })
        .to_string()
    };
    [
        line(0, "Whales are large.", "How big are whales?"),
        line(1, "Fish swim.", "What do fish do?"),
        // A second request of document 1 is not a second question.
        line(1, "Fish swim.", "What do fish do?"),
        line(2, "Whales are large.", "Are whales small?"),
    ]
    .join("\n")
}

#[test]
fn retrieval_reads_questions_and_distinct_paragraphs() {
    let path = Path::new("squad/requests.jsonl");
    let r = Retrieval::parse(path, squad_lines().as_bytes(), None).expect("parse");
    assert_eq!(r.paragraphs, ["Whales are large.", "Fish swim."]);
    let q: Vec<(u64, &str, usize)> = r
        .questions
        .iter()
        .map(|q| (q.doc_id, q.text.as_str(), q.gold))
        .collect();
    assert_eq!(
        q,
        [
            (0, "How big are whales?", 0),
            (1, "What do fish do?", 1),
            (2, "Are whales small?", 0)
        ]
    );
    let limited = Retrieval::parse(path, squad_lines().as_bytes(), Some(2)).expect("parse");
    assert_eq!(limited.questions.len(), 2);

    // Hand-made embeddings: question 0 finds its paragraph, question 1 ranks
    // its own second, question 2 finds its own.
    let paragraphs = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
    let questions = vec![vec![2.0, 0.1], vec![1.0, 0.5], vec![0.9, -0.2]];
    let s = r.score(&questions, &paragraphs);
    let ranks: Vec<usize> = s.ranked.iter().map(|x| x.gold_rank).collect();
    assert_eq!(ranks, [1, 2, 1]);
    assert_eq!(s.ranked[1].top, 0);
    let want_ndcg = (1.0 + 1.0 / 3f64.log2() + 1.0) / 3.0;
    assert!((s.metrics["ndcg@10"] - want_ndcg).abs() < 1e-12);
    assert!((s.metrics["mrr@10"] - 2.5 / 3.0).abs() < 1e-12);
    let cos = 1.0 / (1.25f64).sqrt();
    assert!((s.ranked[1].top_score - cos).abs() < 1e-7);
}

#[test]
fn a_bad_squad_line_names_the_file_and_line() {
    let text = format!(
        "{}\n{{\"doc_id\": 9, \"doc\": {{\"query\": \"no background\"}}}}\n",
        squad_lines()
    );
    let e = Retrieval::parse(Path::new("squad/requests.jsonl"), text.as_bytes(), None)
        .expect_err("bad query")
        .to_string();
    assert!(
        e.contains("squad/requests.jsonl:5") && e.contains("Background"),
        "{e}"
    );
    let e = Retrieval::read(Path::new("/nonexistent/squad"), None)
        .expect_err("missing")
        .to_string();
    assert!(e.contains("/nonexistent/squad/requests.jsonl.gz"), "{e}");
}

// ---------------------------------------------------------------------------
// Linear probe

#[test]
fn the_probe_separates_separable_features() {
    // Two clusters along a diagonal plus a noise feature: any sane linear
    // probe gets every held-out item right.
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut features = Vec::new();
    let mut labels = Vec::new();
    for i in 0..100 {
        let y = (i % 2) as u32;
        let sign = if y == 1 { 1.0 } else { -1.0 };
        let a: f32 = sign * (1.0 + rng.random::<f32>());
        let b: f32 = sign * (0.5 + rng.random::<f32>());
        features.push(vec![a, b, rng.random::<f32>() * 10.0]);
        labels.push(y);
    }
    let r = cross_validate(&features, &labels, &ProbeConfig::default()).expect("probe");
    assert_eq!(r.accuracy, 1.0, "{:?}", r.fold_accuracy);
    assert_eq!(r.predicted, labels);
    assert!(r.probability.iter().all(|&p| p > 0.5 && p <= 1.0));
}

#[test]
fn the_probe_is_near_chance_on_random_labels() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let features: Vec<Vec<f32>> = (0..400)
        .map(|_| (0..8).map(|_| rng.random::<f32>()).collect())
        .collect();
    let labels: Vec<u32> = (0..400).map(|_| rng.random_range(0..2)).collect();
    let r = cross_validate(&features, &labels, &ProbeConfig::default()).expect("probe");
    assert!(
        (r.accuracy - 0.5).abs() < 0.1,
        "random labels gave {}",
        r.accuracy
    );
}

#[test]
fn folds_are_fixed_balanced_and_stratified() {
    let labels: Vec<u32> = (0..103).map(|i| u32::from(i % 3 == 0)).collect();
    let a = fold_assignment(&labels, 5, 0);
    assert_eq!(a, fold_assignment(&labels, 5, 0));
    assert_ne!(a, fold_assignment(&labels, 5, 1));
    for f in 0..5 {
        let size = a.iter().filter(|&&x| x == f).count();
        assert!((20..=21).contains(&size), "fold {f}: {size}");
        // 35 positives over 5 folds: 7 each.
        let positives = (0..103).filter(|&i| a[i] == f && labels[i] == 1).count();
        assert_eq!(positives, 7, "fold {f}");
    }
    // The whole cross-validation is deterministic, bit for bit.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let features: Vec<Vec<f32>> = (0..103)
        .map(|i| vec![labels[i] as f32 + rng.random::<f32>(), rng.random::<f32>()])
        .collect();
    let config = ProbeConfig::default();
    let one = cross_validate(&features, &labels, &config).expect("probe");
    let two = cross_validate(&features, &labels, &config).expect("probe");
    assert_eq!(one, two);
    assert_eq!(one.fold, a);
}

#[test]
fn too_few_items_for_the_folds_is_an_error() {
    let e = cross_validate(&[vec![1.0], vec![2.0]], &[0, 1], &ProbeConfig::default())
        .expect_err("2 items, 5 folds")
        .to_string();
    assert!(e.contains("5-fold") && e.contains("2 items"), "{e}");
}

// ---------------------------------------------------------------------------
// Arrow files

fn write_stream(path: &Path, batch: &RecordBatch) {
    let file = std::fs::File::create(path).expect("create");
    let mut w = arrow_ipc::writer::StreamWriter::try_new(file, &batch.schema()).expect("writer");
    w.write(batch).expect("write");
    w.finish().expect("finish");
}

/// The committed probe fixture: 20 rows, labels alternating 0/1, with the
/// columns of every probe task (single sentences, pairs, BoolQ's).
fn probe_fixture() -> RecordBatch {
    let good = [
        "a wonderful, moving film",
        "bright and funny",
        "the cast is superb",
        "a delight from start to finish",
        "warm, clever and sharp",
    ];
    let bad = [
        "a dull, tedious mess",
        "flat and lifeless",
        "the plot makes no sense",
        "two hours I will not get back",
        "clumsy, loud and boring",
    ];
    let n = 20;
    let sentence: Vec<String> = (0..n)
        .map(|i| {
            let pool = if i % 2 == 1 { &good } else { &bad };
            format!("{} ({i})", pool[(i / 2) % 5])
        })
        .collect();
    let second: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "The reviewer {} it.",
                if i % 2 == 1 { "liked" } else { "disliked" }
            )
        })
        .collect();
    let strings = |v: &[String]| Arc::new(StringArray::from(v.to_vec())) as ArrayRef;
    let label: Vec<i64> = (0..n as i64).map(|i| i % 2).collect();
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("sentence", strings(&sentence)),
        ("sentence1", strings(&sentence)),
        ("sentence2", strings(&second)),
        ("question", strings(&second)),
        ("passage", strings(&sentence)),
        ("label", Arc::new(Int64Array::from(label.clone()))),
        (
            "answer",
            Arc::new(BooleanArray::from(
                label.iter().map(|&l| l == 1).collect::<Vec<_>>(),
            )),
        ),
        (
            "idx",
            Arc::new(Int32Array::from(
                (0..n as i32).map(|i| 100 + i).collect::<Vec<_>>(),
            )),
        ),
    ];
    let schema = Schema::new(
        columns
            .iter()
            .map(|(name, a)| Field::new(*name, a.data_type().clone(), false))
            .collect::<Vec<_>>(),
    );
    RecordBatch::try_new(
        Arc::new(schema),
        columns.into_iter().map(|(_, a)| a).collect(),
    )
    .expect("batch")
}

/// Six sentences with ids and no label column: a probe must refuse it.
fn unlabelled_fixture() -> RecordBatch {
    let sentence: Vec<String> = (0..6).map(|i| format!("sentence {i}")).collect();
    let schema = Schema::new(vec![
        Field::new("sentence", DataType::Utf8, false),
        Field::new("idx", DataType::Int32, false),
    ]);
    RecordBatch::try_new(
        Arc::new(schema),
        vec![
            Arc::new(StringArray::from(sentence)),
            Arc::new(Int32Array::from((0..6).collect::<Vec<_>>())),
        ],
    )
    .expect("batch")
}

#[test]
fn committed_probe_fixtures_are_the_generated_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, batch) in [
        ("probe.arrow", probe_fixture()),
        ("unlabelled.arrow", unlabelled_fixture()),
    ] {
        let committed = fixtures().join("embed").join(name);
        let fresh = dir.path().join(name);
        write_stream(&fresh, &batch);
        if std::env::var_os("TWINHEAD_WRITE_FIXTURES").is_some() {
            std::fs::create_dir_all(committed.parent().expect("parent")).expect("mkdir");
            std::fs::copy(&fresh, &committed).expect("write fixture");
        }
        let bytes =
            std::fs::read(&committed).expect("committed fixture (TWINHEAD_WRITE_FIXTURES=1)");
        assert!(bytes.len() < 50_000);
        assert_eq!(bytes, std::fs::read(&fresh).expect("fresh"), "{name}");
    }
    let committed = fixtures().join("embed/probe.arrow");
    // Every probe task reads it.
    for spec in &PROBE_TASKS {
        let task = ProbeTask::read(spec, &committed, None).expect(spec.name);
        assert_eq!(task.labels.len(), 20);
        assert_eq!(task.texts[0].len(), spec.text.len());
        assert_eq!(&task.labels[..4], [0, 1, 0, 1]);
    }
    let unlabelled = fixtures().join("embed/unlabelled.arrow");
    let e = ProbeTask::read(&PROBE_TASKS[0], &unlabelled, None)
        .expect_err("no label")
        .to_string();
    assert!(
        e.contains("unlabelled.arrow") && e.contains("\"label\""),
        "{e}"
    );
}

#[test]
fn the_arrow_reader_reads_strings_labels_and_ids_across_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("data-00000-of-00001.arrow");
    let schema = Arc::new(Schema::new(vec![
        Field::new("sentence1", DataType::Utf8, false),
        Field::new("sentence2", DataType::LargeUtf8, false),
        Field::new("label", DataType::Int64, false),
        Field::new("idx", DataType::Int32, false),
    ]));
    let batch = |offset: i32, texts: &[&str]| {
        let n = texts.len() as i32;
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(texts.to_vec())),
                Arc::new(arrow_array::LargeStringArray::from(
                    texts.iter().map(|t| format!("{t}!")).collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(
                    (0..n)
                        .map(|i| i64::from((offset + i) % 2))
                        .collect::<Vec<_>>(),
                )),
                Arc::new(Int32Array::from((offset..offset + n).collect::<Vec<_>>())),
            ],
        )
        .expect("batch")
    };
    {
        let file = std::fs::File::create(&path).expect("create");
        let mut w = arrow_ipc::writer::StreamWriter::try_new(file, &schema).expect("writer");
        w.write(&batch(0, &["a", "b", "c"])).expect("write");
        w.write(&batch(3, &["d", "e"])).expect("write");
        w.finish().expect("finish");
    }
    let table = ArrowTable::read(&path).expect("read");
    assert_eq!(table.num_rows(), 5);
    assert_eq!(table.columns(), ["sentence1", "sentence2", "label", "idx"]);
    assert_eq!(
        table.strings("sentence1").expect("s1"),
        ["a", "b", "c", "d", "e"]
    );
    assert_eq!(table.strings("sentence2").expect("s2")[4], "e!");
    assert_eq!(table.integers("label").expect("label"), [0, 1, 0, 1, 0]);
    let rte = PROBE_TASKS
        .iter()
        .find(|s| s.name == "rte_probe")
        .expect("rte");
    let task = ProbeTask::read(rte, &path, Some(4)).expect("rte");
    assert_eq!(task.texts.len(), 4);
    assert_eq!(task.texts[3], ["d", "d!"]);
    assert_eq!(task.ids, [0, 1, 2, 3]);
    assert_eq!(task.labels, [0, 1, 0, 1]);

    // Wrong type, missing column: the file and the column are named.
    let e = table
        .integers("sentence1")
        .expect_err("strings")
        .to_string();
    assert!(
        e.contains(&path.display().to_string()) && e.contains("\"sentence1\""),
        "{e}"
    );
    assert!(e.contains("expected integers"), "{e}");
    let sst2 = PROBE_TASKS
        .iter()
        .find(|s| s.name == "sst2_probe")
        .expect("sst2");
    let e = ProbeTask::read(sst2, &path, None)
        .expect_err("no sentence column")
        .to_string();
    assert!(
        e.contains(&path.display().to_string())
            && e.contains("\"sentence\"")
            && e.contains("no such column"),
        "{e}"
    );
}

#[test]
fn a_missing_or_foreign_file_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir
        .path()
        .join("glue/sst2/validation/data-00000-of-00001.arrow");
    let e = ArrowTable::read(&missing).expect_err("missing");
    assert!(matches!(e, EvalError::Io { .. }));
    assert!(e.to_string().contains("glue/sst2/validation"), "{e}");
    let junk = dir.path().join("junk.arrow");
    std::fs::write(&junk, b"not arrow at all").expect("write");
    let e = ArrowTable::read(&junk).expect_err("junk").to_string();
    assert!(
        e.contains("junk.arrow") && e.contains("Arrow IPC stream"),
        "{e}"
    );
    // A null label is refused with its row.
    let path = dir.path().join("nulls.arrow");
    let schema = Arc::new(Schema::new(vec![Field::new(
        "label",
        DataType::Int64,
        true,
    )]));
    let batch = RecordBatch::try_new(
        schema,
        vec![Arc::new(Int64Array::from(vec![Some(1), None]))],
    )
    .expect("batch");
    write_stream(&path, &batch);
    let e = ArrowTable::read(&path)
        .expect("read")
        .integers("label")
        .expect_err("null")
        .to_string();
    assert!(
        e.contains("\"label\"") && e.contains("row 1 is null"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------
// Embeddings on the fixture models

#[test]
fn packed_embeddings_equal_each_text_alone_for_both_flavours() {
    for flavour in ["encoder", "decoder"] {
        let model = hf::load::<B>(&fixtures().join(flavour), &Default::default()).expect("load");
        let c = model.config().clone();
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let texts: Vec<Vec<u32>> = [5usize, 17, 1, 30, 9, 12]
            .iter()
            .map(|&n| {
                let body: Vec<u32> = (0..n)
                    .map(|_| rng.random_range(5..c.vocab_size as u32))
                    .collect();
                frame(&c, &body, None)
            })
            .collect();
        let mut finished = 0;
        let packed = embed(&model, &texts, 64, |n| finished += n).expect("packed");
        assert_eq!(finished, texts.len());
        for (text, vector) in texts.iter().zip(&packed) {
            assert_eq!(vector.len(), c.hidden_size);
            let alone = embed(&model, std::slice::from_ref(text), 64, |_| {}).expect("alone");
            let diff = vector
                .iter()
                .zip(&alone[0])
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff < 1e-5, "{flavour}: packed vs alone differ by {diff}");
        }
        // The mean is over every token: by hand from the hidden states.
        let batch = twinhead_model::TokenBatch::new(&[texts[1].clone()], None).expect("batch");
        let states: Vec<f32> = model
            .hidden_states(&batch, model.flavour().attention())
            .expect("hidden")
            .into_data()
            .to_vec()
            .expect("f32");
        let h = c.hidden_size;
        let n = texts[1].len();
        for d in [0, h / 2, h - 1] {
            let mean = (0..n).map(|t| states[t * h + d]).sum::<f32>() / n as f32;
            assert!((mean - packed[1][d]).abs() < 1e-5, "{flavour} dim {d}");
        }
    }
}

#[test]
fn different_texts_differ_and_an_empty_one_is_refused() {
    let model = hf::load::<B>(&fixtures().join("decoder"), &Default::default()).expect("load");
    let a = vec![1, 10, 11, 12, 2];
    let mut b = a.clone();
    b[3] = 40;
    let both = embed(&model, &[a.clone(), b.clone()], 64, |_| {}).expect("embed");
    assert_ne!(both[0], both[1]);
    let empty = embed(&model, &[vec![]], 64, |_| {}).expect_err("empty");
    assert!(
        empty.to_string().contains("sequence 0 has no tokens"),
        "{empty}"
    );
}
