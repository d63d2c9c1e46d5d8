#![allow(dead_code)]
//! Helpers shared by the CLI tests: the binary, its output, and a real
//! coordinator process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// The `twinhead` binary, run from the repository root, with no
/// coordinator or token from the environment.
pub fn twinhead() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_twinhead"));
    command
        .env_remove("TWINHEAD_COORDINATOR")
        .env_remove("TWINHEAD_TOKEN")
        .env_remove("TWINHEAD_TOKEN_FILE")
        .env_remove("TWINHEAD_CA_CERT")
        .env_remove("TWINHEAD_CLIENT_CERT")
        .env_remove("TWINHEAD_CLIENT_KEY")
        .env("TWINHEAD_LOG", "warn")
        .current_dir(repo_root());
    command
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Stdout as JSON, after asserting success.
pub fn json(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "command failed: {}",
        stderr(output)
    );
    serde_json::from_str(stdout(output).trim())
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", stdout(output)))
}

/// A clean failure: non-zero exit, stderr exactly one line `error: …`
/// containing every needle, and no panic.
pub fn assert_clean_error(output: &Output, needles: &[&str]) {
    let err = stderr(output);
    assert!(
        !output.status.success(),
        "expected failure, got success: {}",
        stdout(output)
    );
    let lines: Vec<&str> = err.trim_end().lines().collect();
    assert_eq!(lines.len(), 1, "one line expected, got {err:?}");
    assert!(lines[0].starts_with("error: "), "{err:?}");
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} not in {err:?}");
    }
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
}

/// A coordinator process on a free loopback port; killed when dropped.
pub struct CoordinatorProcess {
    pub child: Child,
    pub url: String,
}

impl CoordinatorProcess {
    pub fn start(db: &Path, extra: &[&str]) -> CoordinatorProcess {
        Self::start_with_env(db, extra, &[])
    }

    /// [`CoordinatorProcess::start`] with environment variables (a
    /// store's, for the manifest it reads at submit).
    pub fn start_with_env(db: &Path, extra: &[&str], env: &[(&str, String)]) -> CoordinatorProcess {
        let mut child = twinhead()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .args(["coordinator", "--listen", "127.0.0.1:0", "--db"])
            .arg(db)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn coordinator");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read address");
        let url = line
            .trim()
            .rsplit(' ')
            .next()
            .filter(|u| u.starts_with("http://"))
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        CoordinatorProcess { child, url }
    }

    pub fn kill(mut self) {
        // SIGKILL: no chance to flush or clean up.
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hand-made task folder: `docs` documents of two choices each, and their
/// unconditional requests, as OLMo's request files lay them out.
pub fn hand_task(root: &Path, docs: u64) -> PathBuf {
    let dir = root.join("tasks/hand/rc_0shot");
    std::fs::create_dir_all(&dir).expect("task dir");
    std::fs::write(
        dir.join("config.json"),
        r#"{"task_name": "hand", "task_config": {"primary_metric": "acc_per_char", "metric_kwargs": {"uncond_docid_offset": 1000}}}"#,
    )
    .expect("config");
    let mut lines = Vec::new();
    for (offset, context) in [(0, "Question: which whale?\nAnswer:"), (1000, "Answer:")] {
        for doc in 0..docs {
            for (idx, choice) in [" the white whale", " a small fish"].iter().enumerate() {
                lines.push(
                    serde_json::json!({
                        "request_type": "loglikelihood",
                        "request": {"context": context, "continuation": choice},
                        "doc_id": offset + doc,
                        "idx": idx,
                        "label": doc % 2,
                    })
                    .to_string(),
                );
            }
        }
    }
    std::fs::write(dir.join("requests.jsonl"), lines.join("\n")).expect("requests");
    root.join("tasks")
}

/// The hand-made task's accuracies when a model picks the same choice for
/// its three identical documents (gold 1, 0, 1).
pub fn one_or_two_thirds(x: f64) -> bool {
    (x - 1.0 / 3.0).abs() < 1e-9 || (x - 2.0 / 3.0).abs() < 1e-9
}

/// A randomly initialised `tiny`-shaped model with a BPE tokenizer trained
/// on the fixtures, saved as a Hugging Face folder.
pub fn tiny_model_dir(root: &Path, flavour: twinhead_model::Flavour) -> PathBuf {
    let mut texts = Vec::new();
    for entry in
        std::fs::read_dir(repo_root().join("dataprep/tests/fixtures/books")).expect("books")
    {
        texts.push(std::fs::read_to_string(entry.expect("entry").path()).expect("read"));
    }
    let tokenizer =
        twinhead_dataprep::tokenizer::train_bpe(texts.iter().map(String::as_str), 512, 2)
            .expect("train tokenizer");
    let mut config = twinhead_model::ModelConfig::builtin("tiny").expect("tiny");
    config.vocab_size = 512;
    config.max_position_embeddings = 128;
    let model = twinhead_model::ModernBert::<twinhead_model::CpuBackend>::new(
        &config,
        flavour,
        7,
        &Default::default(),
    );
    let dir = root.join(match flavour {
        twinhead_model::Flavour::Encoder => "encoder",
        twinhead_model::Flavour::Decoder => "decoder",
    });
    twinhead_model::hf::save(&model, &dir).expect("save");
    std::fs::write(dir.join("tokenizer.json"), tokenizer).expect("write tokenizer");
    dir
}

/// A two-phase dataset config (`train-fixture`: seq 64, then 256) over the
/// committed fixtures, with a held-out split (two documents per source),
/// written to `dir/data.toml`.
pub fn fixture_data_config(dir: &Path) -> PathBuf {
    let f = repo_root().join("dataprep/tests/fixtures");
    let f = f.display();
    let config = format!(
        r#"
name = "train-fixture"
on_error = "skip"
[tokenizer]
train = {{ vocab_size = 512, min_frequency = 2 }}
[output]
rows_per_shard = 64
rows_per_row_group = 16
[eval]
fraction = 0.3
max_docs = 2
[[sources]]
name = "books"
input = "{f}/books/*.txt"
format = "text"
[[sources]]
name = "code"
input = "{f}/code"
format = "text"
extensions = ["rs"]
[[phases]]
name = "short"
seq_len = 64
tokens = 8192
seed = 21
[phases.weights]
books = 1.0
code = 1.0
[[phases]]
name = "long"
seq_len = 256
tokens = 8192
seed = 22
[phases.weights]
books = 2.0
code = 1.0
"#
    );
    let path = dir.join("data.toml");
    std::fs::write(&path, config).expect("config");
    path
}

/// A dataset folder in `dir` holding only a manifest that fits the recipe
/// at `recipe` (relative to the repository): its phases at their seq_len,
/// its model's vocabulary and special tokens. Enough for the coordinator
/// to accept the recipe at submit, for tests whose runs no worker trains.
pub fn manifest_only_dataset(dir: &Path, recipe: &str) -> PathBuf {
    let spec = twinhead_proto::config::load_run(&repo_root().join(recipe), &[]).expect("recipe");
    let model = spec.model.expect("model");
    let phases: Vec<serde_json::Value> = spec
        .phases
        .iter()
        .map(|p| {
            serde_json::json!({
                "name": p.dataset_phase, "seq_len": p.seq_len, "sequences": 0, "shards": []
            })
        })
        .collect();
    let manifest = serde_json::json!({
        "tokenizer": {
            "vocab_size": model.vocab_size,
            "cls_id": model.cls_token_id,
            "sep_id": model.sep_token_id,
        },
        "phases": phases,
    });
    let folder = dir.join("manifest-only-dataset");
    std::fs::create_dir_all(&folder).expect("dataset folder");
    std::fs::write(folder.join("manifest.json"), manifest.to_string()).expect("manifest");
    folder
}

/// Every file under `root`, by relative path.
/// The paths where two folders differ: only in one, or different bytes.
pub fn tree_differences(got: &Path, want: &Path) -> Vec<String> {
    let (got, want) = (tree(got), tree(want));
    let mut out = Vec::new();
    for (path, bytes) in &got {
        match want.get(path) {
            None => out.push(format!("{path}: only in the build under test")),
            Some(w) if w != bytes => {
                out.push(format!("{path}: {} bytes, {} wanted", bytes.len(), w.len()))
            }
            Some(_) => {}
        }
    }
    for path in want.keys().filter(|p| !got.contains_key(*p)) {
        out.push(format!("{path}: missing"));
    }
    out
}

pub fn tree(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(root).expect("prefix");
                out.insert(
                    rel.to_string_lossy().into_owned(),
                    std::fs::read(&path).expect("read"),
                );
            }
        }
    }
    out
}
