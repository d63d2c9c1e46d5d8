//! `twinhead dataset …`, `twinhead model …`, `fill-mask` and `generate` as a
//! user runs them: the real binary on the committed dataprep fixtures and on
//! a tiny, randomly initialised model folder.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{
    assert_clean_error, hand_task, json, one_or_two_thirds, repo_root, stderr, stdout,
    tiny_model_dir, tree, twinhead,
};

use twinhead_model::Flavour;

fn fixtures() -> PathBuf {
    repo_root().join("dataprep/tests/fixtures")
}

fn run(args: &[&str]) -> Output {
    twinhead().args(args).output().expect("run twinhead")
}

/// A small config over the committed fixtures: two text sources, one phase.
fn write_config(dir: &Path) -> PathBuf {
    let f = fixtures();
    let f = f.display();
    let text = format!(
        r#"
name = "clitest"
on_error = "skip"

[tokenizer]
train = {{ vocab_size = 512, min_frequency = 2 }}

[output]
rows_per_shard = 64
rows_per_row_group = 16

[[sources]]
name = "books"
input = "{f}/books/*.txt"
format = "text"
files_per_part = 3
[sources.filters]
min_chars = 500

[[sources]]
name = "web"
input = "{f}/web"
format = "text"
files_per_part = 2
[sources.filters]
mean_word_length = [3.0, 10.0]

[[phases]]
name = "short"
seq_len = 64
tokens = 12000
seed = 21
[phases.weights]
books = 1.0
web = 2.0
"#
    );
    let path = dir.join("clitest.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn dataset_build_verify_stats_and_tampering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let out = dir.path().join("data");
    let out = out.to_str().expect("utf-8 path");
    let config = config.to_str().expect("utf-8 path");

    let report = json(&run(&[
        "dataset",
        "build",
        config,
        "--out",
        out,
        "--threads",
        "2",
        "--json",
    ]));
    let url = report["url"].as_str().expect("url").to_string();
    assert!(url.ends_with("/clitest"), "{url}");
    assert_eq!(report["up_to_date"], false);
    let phases = report["manifest"]["phases"].as_array().expect("phases");
    assert_eq!(phases.len(), 1);
    assert_eq!(phases[0]["sequences"], 12000 / 64);

    // The table for people: sources, phases, the dataset's location.
    let again = run(&["dataset", "build", config, "--out", out]);
    assert!(again.status.success(), "{}", stderr(&again));
    let text = stdout(&again);
    for needle in ["source", "books", "web", "phase", "short", "shards", &url] {
        assert!(text.contains(needle), "{needle:?} not in {text}");
    }
    assert!(text.contains("nothing to do"), "{text}");

    let ok = run(&["dataset", "verify", &url]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    assert!(stdout(&ok).starts_with("ok: "), "{}", stdout(&ok));
    let ok = json(&run(&["dataset", "verify", &url, "--json"]));
    assert_eq!(ok["ok"], true);

    let stats = json(&run(&["dataset", "stats", &url, "--json"]));
    let sources = stats["sources"].as_array().expect("sources");
    assert_eq!(sources.len(), 2);
    assert!(sources.iter().all(|s| s["tokens"].as_u64() > Some(0)));
    assert_eq!(stats["phases"][0]["name"], "short");
    let table = run(&["dataset", "stats", &url]);
    assert!(table.status.success());
    assert!(stdout(&table).contains("dropped by"), "{}", stdout(&table));

    // Flip one byte in the middle of a shard: verify names it and fails.
    let shard = Path::new(&url).join("phases/short/shard-00000.parquet");
    let mut bytes = std::fs::read(&shard).expect("read shard");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&shard, bytes).expect("write shard");
    let bad = run(&["dataset", "verify", &url]);
    assert!(!bad.status.success());
    assert!(
        stdout(&bad).contains("phases/short/shard-00000.parquet: sha256_mismatch"),
        "{}",
        stdout(&bad)
    );
    assert_clean_error(&bad, &["problem"]);
    let bad_json = run(&["dataset", "verify", &url, "--json"]);
    assert!(!bad_json.status.success());
    let v: serde_json::Value = serde_json::from_slice(&bad_json.stdout).expect("json");
    assert_eq!(v["ok"], false);
}

#[test]
fn bad_dataset_config_is_one_line_naming_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let text = std::fs::read_to_string(&config).expect("read");
    std::fs::write(&config, text.replace("seq_len = 64", "seq_len = \"long\"")).expect("write");
    let out = dir.path().join("data");
    let output = run(&[
        "dataset",
        "build",
        config.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    assert_clean_error(&output, &["clitest.toml", "seq_len"]);

    let missing = run(&["dataset", "build", "no/such.toml", "--out", "x"]);
    assert_clean_error(&missing, &["no/such.toml"]);
    let not_a_dataset = run(&["dataset", "verify", dir.path().to_str().expect("utf-8")]);
    assert_clean_error(&not_a_dataset, &["manifest"]);
}

#[test]
fn model_info_and_list() {
    let info = json(&run(&["model", "info", "ettin-150m", "--json"]));
    let params = info["parameters"].as_f64().expect("parameters");
    assert!((params / 1e6 - 150.0).abs() < 1.5, "{params}");
    assert_eq!(info["num_layers"], 22);
    assert_eq!(info["global_layers"][1], 3);

    let table = run(&["model", "info", "ettin-150m"]);
    assert!(table.status.success());
    for needle in [
        "layers",
        "hidden",
        "heads",
        "global layers",
        "rope theta",
        "150",
    ] {
        assert!(stdout(&table).contains(needle), "{needle}");
    }

    let list = run(&["model", "list"]);
    assert!(list.status.success());
    let text = stdout(&list);
    // Every Ettin size's count matches its name (17M, 32M, …, 1B) within 4%.
    for (name, millions) in [
        ("ettin-17m", 17.0),
        ("ettin-32m", 32.0),
        ("ettin-68m", 68.0),
        ("ettin-150m", 150.0),
        ("ettin-400m", 400.0),
        ("ettin-1b", 1000.0),
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not listed: {text}"));
        let count = line.split_whitespace().last().expect("count");
        let (number, scale) = match count.chars().last() {
            Some('M') => (&count[..count.len() - 1], 1.0),
            Some('B') => (&count[..count.len() - 1], 1000.0),
            _ => panic!("{name}: unexpected count {count}"),
        };
        let got = number.parse::<f64>().expect("number") * scale;
        assert!((got / millions - 1.0).abs() < 0.04, "{name}: {count}");
    }
    let all = json(&run(&["model", "list", "--json"]));
    assert_eq!(all.as_array().map(Vec::len), Some(7));

    let unknown = run(&["model", "info", "ettin-3b"]);
    assert_clean_error(&unknown, &["ettin-3b"]);
}

#[test]
fn fill_mask_and_generate_on_a_tiny_random_model() {
    let root = tempfile::tempdir().expect("tempdir");
    let encoder = tiny_model_dir(root.path(), Flavour::Encoder);
    let decoder = tiny_model_dir(root.path(), Flavour::Decoder);
    let encoder = encoder.to_str().expect("utf-8");
    let decoder = decoder.to_str().expect("utf-8");

    let top = json(&run(&[
        "fill-mask",
        encoder,
        "The capital of France is [MASK].",
        "--top-k",
        "4",
        "--json",
    ]));
    let top = top.as_array().expect("list");
    assert_eq!(top.len(), 4);
    let probs: Vec<f64> = top
        .iter()
        .map(|c| c["probability"].as_f64().expect("probability"))
        .collect();
    assert!(probs.windows(2).all(|w| w[0] >= w[1]), "{probs:?}");
    assert!(probs.iter().sum::<f64>() <= 1.0 + 1e-6, "{probs:?}");
    assert!(
        top.iter()
            .all(|c| c["token"].is_string() && c["token_id"].is_u64())
    );
    let table = run(&["fill-mask", encoder, "The capital of France is [MASK]."]);
    assert!(table.status.success(), "{}", stderr(&table));
    assert_eq!(stdout(&table).lines().count(), 1 + 5);

    // A tokenizer that does not know [MASK] as a token: the text is split
    // on the literal and the model's mask id goes in between.
    let plain_dir = root.path().join("encoder-no-mask-token");
    std::fs::create_dir_all(&plain_dir).expect("mkdir");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(Path::new(encoder).join(file), plain_dir.join(file)).expect("copy");
    }
    let tok_text =
        std::fs::read_to_string(Path::new(encoder).join("tokenizer.json")).expect("tokenizer");
    let mut tok: serde_json::Value = serde_json::from_str(&tok_text).expect("json");
    if let Some(added) = tok["added_tokens"].as_array_mut() {
        added.retain(|t| t["content"] != "[MASK]");
    }
    if let Some(vocab) = tok["model"]["vocab"].as_object_mut() {
        vocab.remove("[MASK]");
    }
    std::fs::write(plain_dir.join("tokenizer.json"), tok.to_string()).expect("write");
    let plain_dir = plain_dir.to_str().expect("utf-8");
    let split = json(&run(&[
        "fill-mask",
        plain_dir,
        "The capital of France is [MASK].",
        "--json",
    ]));
    assert_eq!(split.as_array().map(Vec::len), Some(5));

    let no_mask = run(&["fill-mask", encoder, "No mask here."]);
    assert_clean_error(&no_mask, &["[MASK]"]);
    let wrong = run(&["fill-mask", decoder, "a [MASK]"]);
    assert_clean_error(&wrong, &["decoder"]);

    let args = [
        "generate",
        decoder,
        "The capital of France is",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
    ];
    let first = json(&run(&args));
    let ids = first["token_ids"].as_array().expect("token_ids");
    assert_eq!(ids.len(), 6);
    assert!(first["text"].is_string());
    let second = json(&run(&args));
    assert_eq!(first, second, "greedy decoding must be deterministic");

    let sampled = [
        "generate",
        decoder,
        "Once",
        "--max-new-tokens",
        "5",
        "--temperature",
        "0.8",
        "--seed",
        "3",
        "--ignore-eos",
        "--json",
    ];
    assert_eq!(json(&run(&sampled)), json(&run(&sampled)));
    let plain = run(&["generate", decoder, "Once", "--max-new-tokens", "3"]);
    assert!(plain.status.success(), "{}", stderr(&plain));
    assert!(stdout(&plain).starts_with("Once"));
}

#[test]
fn model_folder_without_tokenizer_is_a_clean_error() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = tiny_model_dir(root.path(), Flavour::Encoder);
    std::fs::remove_file(dir.join("tokenizer.json")).expect("remove");
    let dir = dir.to_str().expect("utf-8");
    let output = run(&["fill-mask", dir, "a [MASK] b"]);
    assert_clean_error(&output, &["tokenizer.json", "not found"]);
    let output = run(&["generate", dir, "a", "--max-new-tokens", "2"]);
    assert_clean_error(&output, &["tokenizer.json"]);
    let missing = run(&["generate", "no/such/dir", "a"]);
    assert_clean_error(&missing, &["no/such/dir"]);
}

#[test]
fn a_tokenizer_the_library_panics_on_is_a_clean_error() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = tiny_model_dir(root.path(), Flavour::Encoder);
    let path = dir.join("tokenizer.json");
    let mut value: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
    // tokenizers 0.22 panics on this table (`.expect("Helper")`).
    value["decoder"] = serde_json::json!({"type": "ByteLevel", "x\u{1}": [1]});
    // A raw control character in the key, as the fuzzer wrote it.
    let text = value.to_string().replace("x\\u0001", "x\u{1}");
    std::fs::write(&path, text).expect("write");
    let output = run(&["fill-mask", dir.to_str().expect("utf-8"), "a [MASK] b"]);
    assert_clean_error(&output, &["tokenizer.json", "malformed"]);
}

fn dataprep_process(url: &str) -> std::process::Child {
    twinhead()
        .args(["dataprep", "--threads", "1", "--coordinator", url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn dataprep")
}

#[test]
fn dataprep_processes_build_through_the_coordinator_the_same_bytes_as_one_process() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    // Four sources of different formats and two phases: more tasks than
    // processes in every per-part step.
    let f = fixtures();
    let f = f.display();
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push_str(&format!(
        r#"
[[sources]]
name = "code"
input = "{f}/code"
format = "text"
extensions = ["rs"]
files_per_part = 1

[[sources]]
name = "math"
input = "{f}/math.jsonl.gz"
format = "jsonl.gz"
text_fields = ["doc.problem", "doc.solution"]
id_field = "id"

[[phases]]
name = "long"
seq_len = 256
tokens = 30000
seed = 22
[phases.weights]
books = 3.0
code = 1.0
math = 1.0
"#
    ));
    std::fs::write(&config, text).expect("write config");
    let config = config.to_str().expect("utf-8 path");

    let local = dir.path().join("local");
    let built = json(&run(&[
        "dataset",
        "build",
        config,
        "--out",
        local.to_str().expect("utf-8 path"),
        "--threads",
        "2",
        "--json",
    ]));
    assert_eq!(built["up_to_date"], false);
    let want = tree(&local);
    assert!(want.contains_key("clitest/manifest.json"));

    let coordinator = common::CoordinatorProcess::start(
        &dir.path().join("c.db"),
        &[
            "--heartbeat-interval-ms",
            "300",
            "--lease-timeout-ms",
            "1500",
        ],
    );
    let url = coordinator.url.clone();
    let mut processes = vec![dataprep_process(&url), dataprep_process(&url)];

    // Two processes share the build; the bytes are those of one process.
    let remote = dir.path().join("remote");
    let submit = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "dataset",
            "submit",
            config,
            "--out",
            out.to_str().expect("utf-8 path"),
            "--json",
        ];
        args.extend_from_slice(extra);
        twinhead()
            .args(&args)
            .env("TWINHEAD_COORDINATOR", &url)
            .output()
            .expect("run twinhead")
    };
    let done = json(&submit(&remote, &[]));
    assert_eq!(done["state"], "complete", "{done}");
    assert_eq!(
        done["url"],
        remote.join("clitest").to_str().expect("utf-8 path")
    );
    assert_eq!(done["parts_per_source"].as_array().map(Vec::len), Some(4));
    let helpers = done["processes"].as_array().map_or(0, Vec::len);
    assert_eq!(helpers, 2, "both processes took tasks: {done}");
    assert_eq!(
        tree(&remote),
        want,
        "distributed build differs from one process"
    );
    let listed = json(&run(&["dataset", "list", "--json", "--coordinator", &url]));
    assert_eq!(listed.as_array().map(Vec::len), Some(1));

    // SIGKILL one process mid-build: its task's lease lapses, the other
    // process finishes the build, and the bytes are still the same.
    let killed = dir.path().join("killed");
    let queued = json(&submit(&killed, &["--detach"]));
    let id = queued["id"].as_str().expect("id").to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut victim = processes.remove(0);
    loop {
        let d = json(&run(&[
            "dataset",
            "show",
            &id,
            "--json",
            "--coordinator",
            &url,
        ]));
        if d["step"] != "plan" || d["state"] != "building" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "build never started: {d}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    victim.kill().expect("kill");
    victim.wait().expect("wait");
    let finished = loop {
        let d = json(&run(&[
            "dataset",
            "show",
            &id,
            "--json",
            "--coordinator",
            &url,
        ]));
        if d["state"] != "building" {
            break d;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "build never finished: {d}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(finished["state"], "complete", "{finished}");
    assert_eq!(tree(&killed), want, "a build that lost a process differs");

    // SIGSTOP a process holding a task (hung, not dead): its lease lapses,
    // the other process takes the task over and finishes the build; the
    // stopped one, continued, finds its lease gone and goes back to
    // waiting for work, and the bytes are still the same.
    let hung_log = dir.path().join("hung-dataprep.log");
    let hung = twinhead()
        .args(["dataprep", "--threads", "1", "--coordinator", &url])
        .env("TWINHEAD_LOG", "info")
        .env("TWINHEAD_TEST_STALL_TASK_MS", "1000")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&hung_log).expect("log"))
        .spawn()
        .expect("spawn dataprep");
    let stalled = dir.path().join("stalled");
    let queued = json(&submit(&stalled, &["--detach"]));
    let id = queued["id"].as_str().expect("id").to_string();
    let show = || {
        json(&run(&[
            "dataset",
            "show",
            &id,
            "--json",
            "--coordinator",
            &url,
        ]))
    };
    let pid = hung.id().to_string();
    // Stopped while it holds a task (inside the hook's pause).
    while !std::fs::read_to_string(&hung_log).is_ok_and(|t| t.contains("stalling the task")) {
        assert!(
            std::time::Instant::now() < deadline + std::time::Duration::from_secs(60),
            "the process never took a task: {}",
            show()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let signal = |name: &str| {
        let sent = std::process::Command::new("kill")
            .args([name, &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success());
    };
    signal("-STOP");
    let finished = loop {
        let d = show();
        if d["state"] != "building" {
            break d;
        }
        assert!(
            std::time::Instant::now() < deadline + std::time::Duration::from_secs(120),
            "build never finished without the stopped process: {d}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    signal("-CONT");
    assert_eq!(finished["state"], "complete", "{finished}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mut hung = hung;
    assert!(
        hung.try_wait().expect("try_wait").is_none(),
        "the continued process exited:\n{}",
        std::fs::read_to_string(&hung_log).unwrap_or_default()
    );
    assert_eq!(tree(&stalled), want, "a build with a hung process differs");
    processes.push(hung);

    // Bad input fails the build with the input named, and exit status 1.
    let bad_config = dir.path().join("bad.toml");
    let bad_text = std::fs::read_to_string(config)
        .expect("config")
        .replace("on_error = \"skip\"", "on_error = \"fail\"")
        .replace(&format!("{f}/web"), &format!("{f}/no-such-folder"));
    std::fs::write(&bad_config, bad_text).expect("write");
    let failed = submit_with(&url, &bad_config, &dir.path().join("bad"));
    assert_eq!(failed.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&failed.stdout).expect("json");
    assert_eq!(report["state"], "failed");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("no-such-folder") && error.contains("web"),
        "{error}"
    );
    assert!(!dir.path().join("bad/clitest/manifest.json").exists());
    for mut p in processes {
        let _ = p.kill();
        let _ = p.wait();
    }
}

fn submit_with(url: &str, config: &Path, out: &Path) -> Output {
    twinhead()
        .args(["dataset", "submit"])
        .arg(config)
        .arg("--out")
        .arg(out)
        .arg("--json")
        .env("TWINHEAD_COORDINATOR", url)
        .output()
        .expect("run twinhead")
}

#[test]
fn import_checks_a_folder_and_writes_it_back_as_twinhead_exports() {
    let root = tempfile::tempdir().expect("tempdir");
    // A bf16 encoder written by transformers: imported as f32.
    let bf16 = repo_root().join("model/tests/fixtures/encoder-bf16");
    let out = root.path().join("imported-bf16");
    let (bf16_s, out_s) = (
        bf16.to_str().expect("utf-8 path"),
        out.to_str().expect("utf-8 path"),
    );
    let report = json(&run(&["import", bf16_s, "--out", out_s, "--json"]));
    assert_eq!(report["flavour"], "encoder");
    let size = |p: &Path| {
        std::fs::metadata(p.join("model.safetensors"))
            .expect("size")
            .len()
    };
    let ratio = size(&out) as f64 / size(&bf16) as f64;
    assert!(
        (1.9..2.1).contains(&ratio),
        "f32 is twice bf16, got {ratio}"
    );
    let info = |dir: &str| json(&run(&["model", "info", dir, "--json"]));
    assert_eq!(info(out_s)["parameters"], info(bf16_s)["parameters"]);
    assert_eq!(report["parameters"], info(bf16_s)["parameters"]);

    // A model with a tokenizer: the imported folder answers exactly alike.
    let encoder = tiny_model_dir(root.path(), Flavour::Encoder);
    let imported = root.path().join("imported");
    let (enc_s, imp_s) = (
        encoder.to_str().expect("utf-8 path"),
        imported.to_str().expect("utf-8 path"),
    );
    let text = "The whale swam in the [MASK].";
    assert!(run(&["import", enc_s, "--out", imp_s]).status.success());
    assert!(imported.join("tokenizer.json").is_file());
    assert_eq!(
        json(&run(&["fill-mask", imp_s, text, "--json"])),
        json(&run(&["fill-mask", enc_s, text, "--json"]))
    );

    // Bad input: one line naming what is wrong, nothing written.
    let empty = root.path().join("empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    let bad_out = root.path().join("never");
    let missing = run(&[
        "import",
        empty.to_str().expect("utf-8 path"),
        "--out",
        bad_out.to_str().expect("utf-8 path"),
    ]);
    assert_clean_error(&missing, &["config.json"]);
    assert!(!bad_out.exists());
    assert_clean_error(
        &run(&["import", enc_s, "--out", enc_s]),
        &["is the folder being imported"],
    );
}

#[test]
fn eval_scores_a_task_for_both_flavours() {
    let root = tempfile::tempdir().expect("tempdir");
    let tasks = hand_task(root.path(), 3);
    let tasks = tasks.to_str().expect("utf-8");
    for flavour in [Flavour::Encoder, Flavour::Decoder] {
        let model = tiny_model_dir(root.path(), flavour);
        let model = model.to_str().expect("utf-8");
        let predictions = root.path().join("predictions.jsonl");
        let out = run(&[
            "eval",
            model,
            "--task",
            "hand",
            "--tasks-dir",
            tasks,
            "--json",
            "--predictions",
            predictions.to_str().expect("utf-8"),
        ]);
        let v = json(&out);
        let hand = &v["hand"];
        assert_eq!(hand["docs"], 3, "{v}");
        assert_eq!(hand["primary_metric"], "acc_per_char");
        // Every document asks the same question with the same choices, so a
        // model picks the same choice for all three; the gold alternates
        // (1, 0, 1), so every accuracy is 1/3 or 2/3.
        for metric in ["acc_raw", "acc_per_token", "acc_per_char", "acc_uncond"] {
            let x = hand[metric].as_f64().unwrap_or(f64::NAN);
            assert!(one_or_two_thirds(x), "{flavour:?} {metric}: {x}");
        }
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&predictions)
            .expect("predictions")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect();
        assert_eq!(lines.len(), 12);
        for l in &lines {
            let ll = l["loglikelihood"].as_f64().unwrap_or(f64::NAN);
            assert!(ll.is_finite() && ll < 0.0, "{l}");
            assert_eq!(l["task"], "hand");
            assert!(l["predicted"].as_u64().is_some_and(|p| p < 2), "{l}");
        }
        let table = run(&[
            "eval",
            model,
            "--task",
            "hand",
            "--tasks-dir",
            tasks,
            "--limit",
            "1",
        ]);
        assert!(table.status.success(), "{}", stderr(&table));
        assert!(
            stdout(&table).contains("acc_per_char"),
            "{}",
            stdout(&table)
        );
    }

    // Both side by side: a column per folder, the best of the row marked.
    let encoder = tiny_model_dir(root.path(), Flavour::Encoder);
    let decoder = tiny_model_dir(root.path(), Flavour::Decoder);
    let (encoder, decoder) = (
        encoder.to_str().expect("utf-8"),
        decoder.to_str().expect("utf-8"),
    );
    let compare = |extra: &[&str]| {
        let mut args = vec![
            "compare",
            encoder,
            decoder,
            "--tasks",
            "hand",
            "--tasks-dir",
            tasks,
        ];
        args.extend(extra);
        run(&args)
    };
    let both = json(&compare(&["--json"]));
    for name in ["encoder", "decoder"] {
        let x = both["hand"][name].as_f64().unwrap_or(f64::NAN);
        assert!(one_or_two_thirds(x), "{name}: {both}");
    }
    let text = stdout(&compare(&[]));
    assert!(
        text.lines()
            .any(|l| l.starts_with("hand") && l.contains('*')),
        "{text}"
    );

    let model = decoder;
    let missing = run(&["eval", model, "--task", "nope", "--tasks-dir", tasks]);
    assert_clean_error(&missing, &["nope", "rc_0shot"]);
    let requests = Path::new(tasks).join("hand/rc_0shot/requests.jsonl");
    let mut text = std::fs::read_to_string(&requests).expect("read");
    text.push_str("\n{\"request\": 3}\n");
    std::fs::write(&requests, text).expect("write");
    let bad = run(&["eval", model, "--task", "hand", "--tasks-dir", tasks]);
    assert_clean_error(&bad, &["requests.jsonl:13"]);
}
