//! Fuzzed configs (issue 15): run, model and dataset TOML files with
//! mutated keys and values, mangled text and `--set` overrides, and run
//! spec messages with arbitrary fields through the validation the CLI and
//! the coordinator's SubmitRun share. No input may panic or take long, and
//! every rejection names the file and the key (or the line) at fault.
//!
//! Short pass: `cargo test -p twinhead-proto --test fuzz`. Bench mode:
//! `TWINHEAD_FUZZ_CASES=1000000 cargo test --release -p twinhead-proto
//! --test fuzz -- --ignored fuzz_`.

#[allow(dead_code)]
mod support;
#[allow(dead_code)]
#[path = "support/toml_doc.rs"]
mod toml_doc;

use std::path::{Path, PathBuf};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use support::text::{self, Mutation};
use support::{Edit, edits, names_one_of};
use twinhead_proto::config::{self, ConfigError};
use twinhead_proto::dataset::DatasetConfig;
use twinhead_proto::v1::{BatchWarmup, EvalPolicy, LrSchedule, PhaseSpec, RunSpec};
use twinhead_proto::validate::{validate_model, validate_run_spec};

/// Short-pass cases per target (debug build).
const SHORT: u32 = 1500;
/// The slowest a single case may be (debug build on a loaded CI machine).
const LIMIT: Duration = Duration::from_secs(5);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A folder that does not exist: relative model paths resolve below it.
fn nowhere() -> PathBuf {
    repo().join("target/fuzz-no-such-dir")
}

/// The run recipe of the config unit tests, with every optional table.
const TINY_RUN: &str = r#"
name = "t"
model = "tiny"
objective = "mlm"
dataset = "file:///tmp/data"
world_size = 2
global_batch = 8
micro_batch = 2
batch_warmup = { start = 4, tokens = "64K" }
precision = "bf16-mixed"
[optimizer]
peak_lr = 1e-3
weight_decay = 0.01
[checkpoint]
root = "file:///tmp/ckpt"
every_tokens = "512K"
keep_last = 2
[eval]
every_tokens = "64K"
max_rows = 32
tasks = ["arc_easy", "piqa:rc_5shot"]
limit = 50
at = "1M"
[[phases]]
name = "pretrain"
tokens = "1M"
seq_len = 128
mask_ratio = 0.3
lr = { shape = "linear", warmup_tokens = "10K", decay_tokens = "100K", end_factor = 0.1 }
[[phases]]
name = "decay"
tokens = 100000
seq_len = 256
mask_ratio = 0.15
global_rope_theta = 160000.0
lr = { shape = "one_minus_sqrt", start_factor = 0.5, end_factor = 0.02 }
"#;

fn run_documents() -> Vec<String> {
    let mut docs = vec![TINY_RUN.to_string()];
    for name in [
        "tiny-cpu.toml",
        "tiny-cpu-decoder.toml",
        "ettin-encoder-17m.toml",
    ] {
        let path = repo().join("configs/runs").join(name);
        docs.push(std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}")));
    }
    docs
}

fn model_documents() -> Vec<String> {
    config::BUILTIN_MODELS
        .iter()
        .map(|(_, text)| text.to_string())
        .collect()
}

/// The sample data config, and one with the other tokenizer forms,
/// decontamination and a source with every optional key.
fn data_documents() -> Vec<String> {
    let sample = std::fs::read_to_string(repo().join("configs/data/sample.toml"))
        .unwrap_or_else(|e| panic!("configs/data/sample.toml: {e}"));
    let full = r#"
name = "full"
on_error = "fail"
[tokenizer]
path = "tok/tokenizer.json"
cls_token = "<s>"
sep_token = "</s>"
[output]
rows_per_shard = 64
rows_per_row_group = 16
[eval]
fraction = 0.5
max_docs = 3
[decontamination]
ngram = 8
references = [{ input = "refs/*.jsonl", format = "jsonl", text_field = "q" }]
[[sources]]
name = "a"
input = "a/*.jsonl"
format = "jsonl"
text_fields = ["doc.text", "doc.title"]
id_field = "id"
extensions = [".jsonl"]
files_per_part = 2
max_files = 10
max_docs = 100
max_chars = 100000
[sources.filters]
min_chars = 10
max_chars = 1000
mean_word_length = [2.0, 12.0]
[[sources]]
name = "b"
input = "s3://bucket/b.txt"
format = "text"
[[phases]]
name = "p"
seq_len = 64
tokens = 4096
seed = 1
min_piece_tokens = 8
weights = { a = 1.0, b = 0.5 }
"#;
    vec![sample, full.to_string()]
}

/// Every key name of `docs`: what an error about one of them may say.
fn key_names(docs: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    for doc in docs {
        let value = toml::Value::Table(doc.parse::<toml::Table>().expect("base document parses"));
        for path in toml_doc::paths(&value) {
            if let Some(toml_doc::Seg::Key(k)) = path.last()
                && !names.contains(k)
            {
                names.push(k.clone());
            }
        }
    }
    names
}

/// A document after structured edits and then byte-level mutations.
#[derive(Debug, Clone)]
struct Mangled {
    doc: usize,
    edits: Vec<(usize, Edit)>,
    bytes: Vec<Mutation>,
}

fn mangled(docs: usize) -> impl Strategy<Value = Mangled> {
    (
        0..docs,
        edits(3),
        prop_oneof![
            3 => Just(Vec::new()),
            1 => text::mutations(3),
        ],
    )
        .prop_map(|(doc, edits, bytes)| Mangled { doc, edits, bytes })
}

/// The text of `m` over `docs`, and the names its edits touched.
fn render(docs: &[String], m: &Mangled) -> (String, Vec<String>) {
    let mut value = toml::Value::Table(docs[m.doc].parse::<toml::Table>().expect("base parses"));
    let mut touched = Vec::new();
    for (pick, edit) in &m.edits {
        if let Some(path) = toml_doc::apply(&mut value, *pick, edit) {
            if let Some(toml_doc::Seg::Key(k)) = path.last() {
                touched.push(k.clone());
            }
            match edit {
                Edit::AddSibling(name, _) | Edit::Rename(name) => touched.push(name.clone()),
                Edit::Duplicate => touched.extend(path.last().map(|s| match s {
                    toml_doc::Seg::Key(k) => format!("{k}_2"),
                    toml_doc::Seg::Index(_) => String::new(),
                })),
                _ => {}
            }
        }
    }
    let text = toml::to_string(&value).unwrap_or_default();
    let text = if m.bytes.is_empty() {
        text
    } else {
        String::from_utf8_lossy(&text::mutated(text.as_bytes(), &m.bytes)).into_owned()
    };
    (
        text,
        touched.into_iter().filter(|t| !t.is_empty()).collect(),
    )
}

/// A config error must name the file and then a key (or a line).
fn check_config_error(
    e: &ConfigError,
    file: &str,
    names: &[String],
    touched: &[String],
) -> Result<(), TestCaseError> {
    let message = e.to_string();
    match e {
        ConfigError::Syntax { line, column, .. } => {
            prop_assert!(*line >= 1 && *column >= 1, "no position: {message}");
            names_one_of(&message, file, &[])
        }
        ConfigError::Key { key, .. } => {
            prop_assert!(!key.trim().is_empty(), "empty key: {message}");
            names_one_of(&message, file, &[])
        }
        ConfigError::Other { file: named, .. } if named.starts_with("--set ") => {
            names_one_of(&message, named, &[])
        }
        ConfigError::Other { .. } | ConfigError::Io { .. } => {
            let all: Vec<&str> = names
                .iter()
                .chain(touched)
                .map(String::as_str)
                .filter(|n| !n.is_empty())
                .collect();
            names_one_of(&message, file, &all)
        }
    }
}

/// `--set` overrides: a real key path or garbage, with a wrong value.
fn override_strategy() -> impl Strategy<Value = String> {
    let path = prop_oneof![
        Just("world_size".to_string()),
        Just("phases[0].seq_len".to_string()),
        Just("phases.1.tokens".to_string()),
        Just("phases[99].name".to_string()),
        Just("phases[18446744073709551616].x".to_string()),
        Just("optimizer.peak_lr".to_string()),
        Just("eval.at".to_string()),
        Just("name.inner".to_string()),
        Just("phases.name".to_string()),
        Just("a..b".to_string()),
        Just("[0]".to_string()),
        Just("phases[0".to_string()),
        Just("phases[x]".to_string()),
        Just("phases[0]x".to_string()),
        support::edge_str(),
    ];
    let value = prop_oneof![
        support::wrong().prop_map(|w| toml_doc::value(&w).to_string()),
        support::edge_str(),
    ];
    (path, value, any::<bool>()).prop_map(|(p, v, eq)| {
        if eq {
            format!("{p}={v}")
        } else {
            format!("{p}{v}")
        }
    })
}

fn run_toml(short: u32) {
    let docs = run_documents();
    let names = key_names(&docs);
    let file = "run.toml";
    let base = nowhere();
    support::run(
        "run_toml",
        short,
        LIMIT,
        (
            mangled(docs.len()),
            prop::collection::vec(override_strategy(), 0..3),
        ),
        |(m, overrides)| {
            let (text, touched) = render(&docs, &m);
            match config::parse_run(file, &text, &overrides, &base) {
                Ok(spec) => {
                    prop_assert!(
                        validate_run_spec(&spec).is_ok(),
                        "accepted a spec the coordinator would refuse"
                    );
                    Ok(())
                }
                Err(e) => check_config_error(&e, file, &names, &touched),
            }
        },
    );
}

fn model_toml(short: u32) {
    let docs = model_documents();
    let names = key_names(&docs);
    let file = "model.toml";
    support::run("model_toml", short, LIMIT, mangled(docs.len()), |m| {
        let (text, touched) = render(&docs, &m);
        match config::parse_model(file, &text) {
            Ok(spec) => {
                prop_assert!(validate_model(&spec).is_ok());
                Ok(())
            }
            Err(e) => check_config_error(&e, file, &names, &touched),
        }
    });
}

fn data_toml(short: u32) {
    let docs = data_documents();
    let names = key_names(&docs);
    let path = Path::new("/fuzz/configs/data.toml");
    let file = path.display().to_string();
    support::run("data_toml", short, LIMIT, mangled(docs.len()), |m| {
        let (text, touched) = render(&docs, &m);
        match DatasetConfig::parse(path, &text) {
            Ok(_) => Ok(()),
            Err(e) => {
                let message = e.to_string();
                let all: Vec<&str> = names
                    .iter()
                    .chain(&touched)
                    .map(String::as_str)
                    .chain(["line", "TOML", "tokenizer", "phases", "sources"])
                    .collect();
                names_one_of(&message, &file, &all)
            }
        }
    });
}

// ------------------------------------------------------------- messages

/// One field of a run spec set to an arbitrary value (integers wrap into
/// the field's type, so -1 is u32::MAX).
#[derive(Debug, Clone)]
struct FieldEdit {
    field: u8,
    int: i64,
    float: f64,
    text: String,
}

const FIELDS: u8 = 48;

fn field_edit() -> impl Strategy<Value = FieldEdit> {
    (
        0..FIELDS,
        support::edge_int(),
        support::edge_float(),
        support::edge_str(),
    )
        .prop_map(|(field, int, float, text)| FieldEdit {
            field,
            int,
            float,
            text,
        })
}

fn apply_field(spec: &mut RunSpec, e: &FieldEdit) {
    let (u32v, u64v, i32v, f, s) = (
        e.int as u32,
        e.int as u64,
        e.int as i32,
        e.float,
        e.text.clone(),
    );
    fn phase(spec: &mut RunSpec, pick: u64) -> Option<&mut PhaseSpec> {
        let n = spec.phases.len() as u64;
        spec.phases.get_mut(pick.checked_rem(n)? as usize)
    }
    match e.field {
        0 => spec.name = s,
        1 => spec.objective = i32v,
        2 => spec.dataset = s,
        3 => spec.global_batch = u32v,
        4 => spec.micro_batch = u32v,
        5 => spec.world_size = u32v,
        6 => spec.min_world_size = u32v,
        7 => spec.max_restarts = u32v,
        8 => spec.precision = s,
        9 => spec.batch_warmup = None,
        10 => {
            spec.batch_warmup = Some(BatchWarmup {
                start: u32v,
                tokens: spec.batch_warmup.map_or(65_536, |w| w.tokens),
            })
        }
        11 => {
            spec.batch_warmup = Some(BatchWarmup {
                start: spec.batch_warmup.map_or(4, |w| w.start),
                tokens: u64v,
            })
        }
        12 => spec.model = None,
        13 => spec.optimizer = None,
        14 => spec.checkpoint = None,
        15 => spec.eval = None,
        16 => spec.phases.clear(),
        17 => {
            if let Some(p) = spec.phases.first().cloned() {
                spec.phases.push(p);
            }
        }
        18..=23 => {
            if let Some(m) = spec.model.as_mut() {
                match e.field {
                    18 => m.vocab_size = u32v,
                    19 => m.hidden_size = u32v,
                    20 => m.num_heads = u32v,
                    21 => m.max_position_embeddings = u32v,
                    22 => m.local_attention = u32v,
                    _ => m.norm_eps = f,
                }
            }
        }
        24 => {
            if let Some(m) = spec.model.as_mut() {
                m.mask_token_id = u32v;
            }
        }
        25 => {
            if let Some(m) = spec.model.as_mut() {
                m.unk_token_id = Some(u32v);
            }
        }
        26..=31 => {
            if let Some(o) = spec.optimizer.as_mut() {
                match e.field {
                    26 => o.peak_lr = f,
                    27 => o.beta1 = f,
                    28 => o.beta2 = f,
                    29 => o.eps = f,
                    30 => o.weight_decay = f,
                    _ => o.grad_clip = f,
                }
            }
        }
        32 => {
            if let Some(c) = spec.checkpoint.as_mut() {
                c.root = s;
            }
        }
        33 => {
            spec.eval.get_or_insert_with(EvalPolicy::default).mask_ratio = f;
        }
        34 => spec
            .eval
            .get_or_insert_with(EvalPolicy::default)
            .tasks
            .push(s),
        35 => {
            if let Some(p) = phase(spec, u64v) {
                p.name = s;
            }
        }
        36 => {
            if let Some(p) = phase(spec, u64v) {
                p.tokens = u64v;
            }
        }
        37 => {
            if let Some(p) = phase(spec, u64v) {
                p.seq_len = u32v;
            }
        }
        38 => {
            if let Some(p) = phase(spec, u64v) {
                p.mask_ratio = f;
            }
        }
        39 => {
            if let Some(p) = phase(spec, u64v) {
                p.global_rope_theta = f;
            }
        }
        40 => {
            if let Some(p) = phase(spec, u64v) {
                p.lr = None;
            }
        }
        41..=45 => {
            if let Some(p) = phase(spec, u64v) {
                let lr = p.lr.get_or_insert_with(LrSchedule::default);
                match e.field {
                    41 => lr.shape = i32v,
                    42 => lr.warmup_tokens = u64v,
                    43 => lr.decay_tokens = u64v,
                    44 => lr.start_factor = f,
                    _ => lr.end_factor = f,
                }
            }
        }
        46 => {
            if let Some(p) = phase(spec, u64v) {
                p.dataset_phase = s;
            }
        }
        _ => spec.seed = u64v,
    }
}

/// The first segment of every key validation may name.
const SPEC_KEYS: &[&str] = &[
    "name",
    "model",
    "precision",
    "objective",
    "dataset",
    "world_size",
    "global_batch",
    "min_world_size",
    "micro_batch",
    "optimizer",
    "checkpoint",
    "phases",
    "batch_warmup",
    "eval",
];

fn run_spec(short: u32) {
    let base = config::parse_run("run.toml", TINY_RUN, &[], &nowhere()).expect("base spec");
    support::run(
        "run_spec",
        short,
        LIMIT,
        prop::collection::vec(field_edit(), 1..5),
        |fields| {
            let mut spec = base.clone();
            for f in &fields {
                apply_field(&mut spec, f);
            }
            if let Err(e) = validate_run_spec(&spec) {
                let head = e
                    .key
                    .split(['.', '['])
                    .next()
                    .unwrap_or_default()
                    .to_string();
                prop_assert!(
                    SPEC_KEYS.contains(&head.as_str()),
                    "key {:?} is not a spec key: {e}",
                    e.key
                );
                prop_assert!(e.message.trim().len() >= 8, "vague: {e}");
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------- tests

// Findings kept as regression tests.

/// An unknown key that is empty or blank used to give `run.toml: : unknown
/// field` (an empty key path between the colons).
#[test]
fn an_empty_unknown_key_has_no_empty_key_path() {
    for key in ["\"\"", "\" \""] {
        let text = format!("{key} = 1\n{TINY_RUN}");
        let err = config::parse_run("run.toml", &text, &[], &nowhere())
            .expect_err("unknown key")
            .to_string();
        assert!(err.starts_with("run.toml: unknown field `"), "{err}");
        let err = config::parse_model(
            "model.toml",
            &format!("{key} = 1\n{}", model_documents()[0]),
        )
        .expect_err("unknown key")
        .to_string();
        assert!(err.starts_with("model.toml: unknown field `"), "{err}");
        let path = Path::new("/fuzz/data.toml");
        let err = DatasetConfig::parse(path, &format!("{key} = 1\n{}", data_documents()[1]))
            .expect_err("unknown key")
            .to_string();
        assert!(
            err.starts_with("/fuzz/data.toml: TOML parse error at line 1")
                && err.contains("unknown field `"),
            "{err}"
        );
    }
}

/// Steps near u64::MAX (a data-order log's or a report's `step` is any
/// number) overflowed the row arithmetic: a panic in debug builds.
#[test]
fn row_ranges_of_any_step_do_not_overflow() {
    let spec = config::parse_run("run.toml", TINY_RUN, &[], &nowhere()).expect("spec");
    for schedule in [
        twinhead_proto::BatchSchedule::constant(8),
        twinhead_proto::BatchSchedule::for_phase(&spec, 0),
    ] {
        for step in [u64::MAX, u64::MAX - 1, u64::MAX / 2, 1 << 62] {
            let rows = schedule.rows(step);
            assert!(rows.start <= rows.end, "{step}: {rows:?}");
            assert!(schedule.batch(step) <= 8);
        }
    }
}

/// A `model` path that does not exist was reported by the model file's
/// path only, naming neither the run file nor the key.
#[test]
fn an_unreadable_model_file_names_the_key() {
    let err = config::parse_run(
        "run.toml",
        TINY_RUN,
        &["model=\"../../etc/nothing.toml\"".into()],
        &nowhere(),
    )
    .expect_err("no such file")
    .to_string();
    assert!(
        err.starts_with("run.toml: model: cannot read the model file ")
            && err.contains("nothing.toml"),
        "{err}"
    );
}

/// `tokens = "nan"` or `"inf"` used to be refused as negative.
#[test]
fn nan_and_infinite_token_counts_are_not_called_negative() {
    for text in ["nan", "inf", "-nan", "1e999T", "99999999999999999999999T"] {
        let err = config::parse_tokens(text).expect_err(text);
        assert!(
            err.contains("finite") && !err.contains("negative"),
            "{text}: {err}"
        );
    }
    assert!(config::parse_tokens("-inf").is_err_and(|e| e.contains("negative")));
    let err = config::parse_run(
        "run.toml",
        TINY_RUN,
        &["phases[0].tokens=\"nanK\"".into()],
        &nowhere(),
    )
    .expect_err("nan")
    .to_string();
    assert!(
        err.contains("phases[0].tokens") && err.contains("finite"),
        "{err}"
    );
}

#[test]
fn run_toml_short() {
    run_toml(SHORT);
}

#[test]
fn model_toml_short() {
    model_toml(SHORT);
}

#[test]
fn data_toml_short() {
    data_toml(SHORT);
}

#[test]
fn run_spec_short() {
    run_spec(SHORT * 2);
}

#[test]
#[ignore = "bench mode: TWINHEAD_FUZZ_CASES cases, release build"]
fn fuzz_run_toml() {
    run_toml(SHORT);
}

#[test]
#[ignore = "bench mode: TWINHEAD_FUZZ_CASES cases, release build"]
fn fuzz_model_toml() {
    model_toml(SHORT);
}

#[test]
#[ignore = "bench mode: TWINHEAD_FUZZ_CASES cases, release build"]
fn fuzz_data_toml() {
    data_toml(SHORT);
}

#[test]
#[ignore = "bench mode: TWINHEAD_FUZZ_CASES cases, release build"]
fn fuzz_run_spec() {
    run_spec(SHORT * 2);
}
