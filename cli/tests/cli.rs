//! The `twinhead` binary as a user runs it: a real coordinator process,
//! killed with SIGKILL and restarted, and client commands against it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    CoordinatorProcess, assert_clean_error, json, manifest_only_dataset, repo_root, stdout,
    twinhead,
};

fn run(args: &[&str], url: &str) -> Output {
    twinhead()
        .args(args)
        .env("TWINHEAD_COORDINATOR", url)
        .output()
        .expect("run twinhead")
}

#[test]
fn submit_status_survive_a_killed_coordinator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("coordinator.db");
    let coordinator = CoordinatorProcess::start(&db, &[]);
    let url = coordinator.url.clone();
    let dataset = manifest_only_dataset(dir.path(), "configs/runs/tiny-cpu.toml");
    let dataset = format!("dataset={}", dataset.display());

    let submitted = json(&run(
        &[
            "submit",
            "configs/runs/tiny-cpu.toml",
            "--set",
            &dataset,
            "--set",
            "world_size=1",
            "--set",
            "name=kept",
            "--json",
        ],
        &url,
    ));
    let run_id = submitted["run_id"].as_str().expect("run_id").to_string();
    let status = json(&run(&["status", &run_id, "--json"], &url));
    assert_eq!(status["state"], "pending");
    assert_eq!(status["world_size"], 1);
    assert_eq!(status["phases"].as_array().map(Vec::len), Some(3));

    let table = run(&["runs"], &url);
    assert!(table.status.success());
    let text = stdout(&table);
    assert!(
        text.starts_with("RUN ") && text.contains(&run_id) && text.contains("kept"),
        "{text}"
    );

    coordinator.kill();
    let down = run(&["status", &run_id], &url);
    assert_clean_error(&down, &["cannot reach the coordinator"]);

    let coordinator = CoordinatorProcess::start(&db, &[]);
    let status = json(&run(&["status", &run_id, "--json"], &coordinator.url));
    assert_eq!(status["state"], "pending", "the run survived SIGKILL");
    assert_eq!(status["name"], "kept");
    let listed = json(&run(&["runs", "--json"], &coordinator.url));
    assert_eq!(listed.as_array().map(Vec::len), Some(1));

    let missing = run(&["status", "run-424242"], &coordinator.url);
    assert_clean_error(&missing, &["not found"]);
}

#[test]
fn bad_recipes_fail_with_one_line_naming_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    let recipe =
        std::fs::read_to_string(repo_root().join("configs/runs/tiny-cpu.toml")).expect("recipe");
    std::fs::write(
        &bad,
        recipe.replace("micro_batch = 4", "micro_batch = 4\nmicrobatch = 4"),
    )
    .expect("write");
    let bad_path = bad.to_string_lossy().into_owned();
    // No coordinator is needed to reject a recipe.
    let url = "http://127.0.0.1:9";
    assert_clean_error(
        &run(&["submit", &bad_path], url),
        &["bad.toml: microbatch: unknown field"],
    );
    assert_clean_error(
        &run(
            &[
                "submit",
                "configs/runs/tiny-cpu.toml",
                "--set",
                "phases[1].seq_len=4",
            ],
            url,
        ),
        &["tiny-cpu.toml: phases[1].seq_len: must be between 16"],
    );
    assert_clean_error(
        &run(
            &[
                "submit",
                "configs/runs/tiny-cpu.toml",
                "--set",
                "world_size=3",
            ],
            url,
        ),
        &["world_size: must divide global_batch 8"],
    );
    assert_clean_error(
        &run(
            &[
                "submit",
                "configs/runs/tiny-cpu.toml",
                "--set",
                "phases[0].tokens=-1",
            ],
            url,
        ),
        &["phases[0].tokens"],
    );
    assert_clean_error(
        &run(&["submit", "no/such/file.toml"], url),
        &["no/such/file.toml: cannot read"],
    );
    let usage = run(&["submit"], url);
    assert_eq!(usage.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn tokens_are_required_when_configured() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator =
        CoordinatorProcess::start(&dir.path().join("c.db"), &["--user-token", "s3cret"]);
    let url = coordinator.url.clone();
    assert_clean_error(&run(&["runs"], &url), &["unauthenticated"]);
    assert_clean_error(&run(&["runs", "--token", "nope"], &url), &["wrong token"]);
    let dataset = manifest_only_dataset(dir.path(), "configs/runs/tiny-cpu.toml");
    let ok = twinhead()
        .args(["submit", "configs/runs/tiny-cpu.toml", "--json", "--set"])
        .arg(format!("dataset={}", dataset.display()))
        .env("TWINHEAD_COORDINATOR", &url)
        .env("TWINHEAD_TOKEN", "s3cret")
        .output()
        .expect("run");
    json(&ok);
    let listed = json(&run(&["runs", "--json", "--token", "s3cret"], &url));
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1),
        "only the authorised submit landed"
    );
}

#[test]
fn watch_follows_a_run_until_it_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = CoordinatorProcess::start(&dir.path().join("c.db"), &[]);
    let url = coordinator.url.clone();
    let dataset = manifest_only_dataset(dir.path(), "configs/runs/tiny-cpu.toml");
    let run_id = json(&run(
        &[
            "submit",
            "configs/runs/tiny-cpu.toml",
            "--json",
            "--set",
            &format!("dataset={}", dataset.display()),
        ],
        &url,
    ))["run_id"]
        .as_str()
        .expect("id")
        .to_string();
    let mut watcher = twinhead()
        .args(["watch", &run_id, "--json"])
        .env("TWINHEAD_COORDINATOR", &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("watch");
    let mut lines = BufReader::new(watcher.stdout.take().expect("stdout")).lines();
    let first: serde_json::Value =
        serde_json::from_str(&lines.next().expect("line").expect("read")).expect("json");
    assert_eq!(first["event"], "snapshot");
    assert_eq!(first["run"]["state"], "pending");
    let cancelled = json(&run(
        &["cancel", &run_id, "--reason", "enough", "--json"],
        &url,
    ));
    assert_eq!(cancelled["state"], "cancelled");
    let rest: Vec<serde_json::Value> = lines
        .map(|l| serde_json::from_str(&l.expect("read")).expect("json"))
        .collect();
    let last = rest.last().expect("a final event");
    assert_eq!(last["run"]["state"], "cancelled");
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.contains("enough"))
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = watcher.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "watch did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1), "a cancelled run is not a success");
}

#[test]
fn submit_refuses_a_run_its_dataset_cannot_feed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let coordinator = CoordinatorProcess::start(&dir.path().join("c.db"), &[]);
    let url = coordinator.url.clone();
    let dataset = manifest_only_dataset(dir.path(), "configs/runs/tiny-cpu.toml");
    let submit = |sets: &[String]| {
        let mut args = vec!["submit".to_string(), "configs/runs/tiny-cpu.toml".into()];
        for set in sets {
            args.extend(["--set".to_string(), set.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&args, &url)
    };
    let at = |d: &std::path::Path| format!("dataset={}", d.display());
    let missing = dir.path().join("not-built");
    assert_clean_error(
        &submit(&[at(&missing)]),
        &[
            "invalid argument",
            "spec.dataset",
            "not-built",
            "no dataset at",
        ],
    );
    assert_clean_error(
        &submit(&[at(&dataset), "phases[2].dataset_phase=anneal".into()]),
        &[
            "spec.phases[2].dataset_phase",
            "\"anneal\"",
            "pretrain (seq_len 128)",
        ],
    );
    assert_clean_error(
        &submit(&[at(&dataset), "phases[1].seq_len=512".into()]),
        &[
            "spec.phases[1].seq_len: 512 in the run",
            "built at seq_len 1024",
        ],
    );
    // A model whose vocabulary is smaller than the dataset's.
    let small_vocab = dir.path().join("small-vocab");
    std::fs::create_dir_all(&small_vocab).expect("dir");
    let manifest = std::fs::read_to_string(dataset.join("manifest.json")).expect("manifest");
    let mut manifest: serde_json::Value = serde_json::from_str(&manifest).expect("json");
    manifest["tokenizer"]["vocab_size"] = 50_368.into();
    std::fs::write(small_vocab.join("manifest.json"), manifest.to_string()).expect("write");
    assert_clean_error(
        &submit(&[at(&small_vocab)]),
        &[
            "spec.model.vocab_size: 4096 in the model",
            "vocabulary of 50368",
        ],
    );
    // Nothing was accepted; the fitting dataset is.
    let listed = json(&run(&["runs", "--json"], &url));
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    json(&run(
        &[
            "submit",
            "configs/runs/tiny-cpu.toml",
            "--json",
            "--set",
            &at(&dataset),
        ],
        &url,
    ));
}
