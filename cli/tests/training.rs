//! Training with real processes: a `twinhead coordinator` and `twinhead
//! worker` processes on the CPU engine, a dataset built by dataprep from
//! the committed fixtures, and the tiny model through two phases.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{fixture_data_config, hand_task, one_or_two_thirds};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn twinhead() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_twinhead"));
    c.env_remove("TWINHEAD_TOKEN")
        .env("TWINHEAD_LOG", "warn")
        .current_dir(repo());
    c
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn coordinator(db: &Path) -> (Proc, String) {
    coordinator_on(db, "127.0.0.1:0")
}

/// A coordinator process on `listen`; a restarted one keeps its address.
fn coordinator_on(db: &Path, listen: &str) -> (Proc, String) {
    let mut child = twinhead()
        .args([
            "coordinator",
            "--listen",
            listen,
            "--heartbeat-interval-ms",
            "200",
            "--lease-timeout-ms",
            "3000",
            "--db",
        ])
        .arg(db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("coordinator");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("address");
    let url = line.trim().rsplit(' ').next().expect("url").to_string();
    (Proc(child), url)
}

fn worker(url: &str, log: &Path) -> Proc {
    worker_with_env(url, log, &[])
}

/// A worker process with extra environment variables (test hooks).
fn worker_with_env(url: &str, log: &Path, env: &[(&str, &str)]) -> Proc {
    let log = std::fs::File::create(log).expect("log file");
    Proc(
        twinhead()
            .args(["worker", "--exit-when-idle", "--coordinator", url])
            .env("TWINHEAD_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("worker"),
    )
}

/// What every test here starts from: a temporary folder with the two-phase
/// dataset, a coordinator on its own database there, and log paths for
/// `workers` worker processes (`w0.log`, …).
struct Setup {
    // Fields drop in order: the coordinator stops before the folder goes.
    _coordinator: Proc,
    url: String,
    data: String,
    logs: Vec<PathBuf>,
    dir: tempfile::TempDir,
}

impl Setup {
    /// The coordinator's database, in `dir`.
    const DB: &str = "c.db";

    fn new(workers: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dataset(dir.path());
        let (coordinator, url) = coordinator(&dir.path().join(Self::DB));
        let logs = (0..workers)
            .map(|i| dir.path().join(format!("w{i}.log")))
            .collect();
        Self {
            _coordinator: coordinator,
            url,
            data,
            logs,
            dir,
        }
    }
}

/// The two-phase fixture dataset, built in `dir`.
fn dataset(dir: &Path) -> String {
    let path = fixture_data_config(dir);
    let out = format!("file://{}", dir.join("data").display());
    let report = twinhead_dataprep::build(&path, &out, 1, &twinhead_dataprep::NoProgress)
        .expect("dataset builds");
    report.url
}

/// A recipe for the tiny model through two phases of the fixture dataset:
/// `short` at seq 64, then `long` (6,144 tokens) at seq 256.
#[derive(Clone, Copy)]
struct Recipe<'a> {
    name: &'a str,
    /// A built-in model name or a model TOML file.
    model: &'a str,
    /// `mlm`, `clm` or `mntp`.
    objective: &'a str,
    dataset: &'a str,
    world: u32,
    ckpt: &'a Path,
    /// Tokens of the first phase.
    short_tokens: u64,
    global_batch: u32,
    /// Checkpoint cadence; 0: only at phase ends.
    every_tokens: u64,
    /// More top-level keys.
    extra: &'a str,
}

const LONG_TOKENS: u64 = 6144;

impl<'a> Recipe<'a> {
    /// Batch 8: 8 x 64 x 6 = 3072 tokens (6 steps), then 8 x 256 x 3 = 6144
    /// (3 steps), a checkpoint every 1024 tokens.
    fn new(name: &'a str, dataset: &'a str, world: u32, ckpt: &'a Path) -> Self {
        Recipe {
            name,
            model: "tiny",
            objective: "mlm",
            dataset,
            world,
            ckpt,
            short_tokens: 3072,
            global_batch: 8,
            every_tokens: 1024,
            extra: "",
        }
    }

    /// The run spec the recipe's TOML parses into.
    fn spec(&self) -> twinhead_proto::v1::RunSpec {
        let dir = tempfile::tempdir().expect("tempdir");
        twinhead_proto::config::load_run(&self.write(dir.path()), &[]).expect("recipe parses")
    }

    /// Steps of each phase, by name (with the batch warmup, if any).
    fn steps(&self) -> [(&'static str, u64); 2] {
        let spec = self.spec();
        [
            ("short", twinhead_proto::num_steps(&spec, 0)),
            ("long", twinhead_proto::num_steps(&spec, 1)),
        ]
    }

    fn write(&self, dir: &Path) -> PathBuf {
        let Recipe {
            name,
            model,
            objective,
            dataset,
            world,
            ckpt,
            short_tokens,
            global_batch,
            every_tokens,
            extra,
        } = self;
        // Causal LM masks nothing.
        let (short_mask, long_mask) = if *objective == "clm" {
            (0.0, 0.0)
        } else {
            (0.3, 0.15)
        };
        let text = format!(
            r#"
name = "{name}"
model = "{model}"
objective = "{objective}"
dataset = "{dataset}"
seed = 7
world_size = {world}
global_batch = {global_batch}
micro_batch = 2
{extra}
[optimizer]
peak_lr = 3e-3
weight_decay = 1e-2
[checkpoint]
root = "file://{ckpt}"
every_tokens = {every_tokens}
[[phases]]
name = "short"
tokens = {short_tokens}
seq_len = 64
mask_ratio = {short_mask:?}
global_rope_theta = 10000.0
local_rope_theta = 10000.0
lr = {{ shape = "constant", warmup_tokens = 1024 }}
[[phases]]
name = "long"
tokens = {LONG_TOKENS}
seq_len = 256
mask_ratio = {long_mask:?}
global_rope_theta = 160000.0
lr = {{ shape = "one_minus_sqrt", start_factor = 1.0, end_factor = 0.1 }}
"#,
            ckpt = ckpt.display()
        );
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, text).expect("run config");
        path
    }
}

fn submit(url: &str, config: &Path) -> String {
    let out = twinhead()
        .args(["submit", "--json", "--coordinator", url])
        .arg(config)
        .output()
        .expect("submit");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["run_id"].as_str().expect("run_id").to_string()
}

fn status(url: &str, run: &str) -> serde_json::Value {
    let out = twinhead()
        .args(["status", "--json", "--coordinator", url, run])
        .output()
        .expect("status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

fn wait_completed(url: &str, run: &str, logs: &[PathBuf]) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let s = status(url, run);
        match s["state"].as_str() {
            Some("completed") => return s,
            Some("failed") | Some("cancelled") => {
                panic!("run ended {}: {s}\n{}", s["state"], dump(logs))
            }
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "run did not complete: {s}\n{}",
            dump(logs)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn dump(logs: &[PathBuf]) -> String {
    logs.iter()
        .map(|l| {
            format!(
                "--- {}\n{}",
                l.display(),
                std::fs::read_to_string(l).unwrap_or_default()
            )
        })
        .collect()
}

/// The final weights of a run: its last checkpoint's model tensors.
fn final_weights(status: &serde_json::Value) -> BTreeMap<String, Vec<f32>> {
    let url = status["checkpoints"]
        .as_array()
        .and_then(|c| c.last())
        .and_then(|c| c["url"].as_str())
        .expect("a checkpoint");
    let loaded = twinhead_worker::checkpoint::load(url).expect("checkpoint loads");
    loaded
        .model
        .into_iter()
        .map(|(name, _, values)| (name, values))
        .collect()
}

/// Every row of each phase was consumed exactly once by the run.
fn assert_rows_once(recipe: &Recipe, run: &str) {
    let spec = recipe.spec();
    for (i, (name, steps)) in recipe.steps().into_iter().enumerate() {
        let report = twinhead_worker::loader::order::verify_run(
            &format!("file://{}", recipe.ckpt.display()),
            run,
            i as u32,
            name,
            steps,
            &twinhead_proto::BatchSchedule::for_phase(&spec, i),
        )
        .expect("data-order log reads");
        assert!(report.is_ok(), "{run} phase {name}: {report:?}");
    }
}

/// The largest absolute difference between two sets of weights.
fn max_difference(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .flat_map(|(name, x)| x.iter().zip(&b[name]).map(|(p, q)| (p - q).abs()))
        .fold(0.0f32, f32::max)
}

/// `world` worker processes end where one process ends when both train the
/// same global batches (`global_batch` divides by `world`).
fn assert_workers_match_one(world: u32, global_batch: u32) {
    let setup = Setup::new(world as usize);

    // `world` worker processes, one world.
    let ckpt_many = setup.dir.path().join("ckpt-many");
    let many = Recipe {
        global_batch,
        extra: HELD_OUT_EVERY_1536,
        ..Recipe::new("many", &setup.data, world, &ckpt_many)
    };
    let run_many = submit(&setup.url, &many.write(setup.dir.path()));
    let workers: Vec<Proc> = setup.logs.iter().map(|l| worker(&setup.url, l)).collect();
    let trained_many = wait_completed(&setup.url, &run_many, &setup.logs);
    drop(workers);

    // One worker process on the same global batches.
    let ckpt_one = setup.dir.path().join("ckpt-one");
    let one = Recipe {
        world: 1,
        ckpt: &ckpt_one,
        name: "one",
        ..many
    };
    let run_one = submit(&setup.url, &one.write(setup.dir.path()));
    let log1 = vec![setup.dir.path().join("w-single.log")];
    let single = worker(&setup.url, &log1[0]);
    let trained_one = wait_completed(&setup.url, &run_one, &log1);
    drop(single);

    // Both phases ran with their own shapes: tokens per phase follow each
    // phase's seq_len, and each phase ended with a checkpoint.
    let [(_, short_steps), (_, long_steps)] = many.steps();
    for s in [&trained_many, &trained_one] {
        let phases = s["phases"].as_array().expect("phases");
        assert_eq!(phases[0]["tokens_done"], many.short_tokens);
        assert_eq!(phases[1]["tokens_done"], LONG_TOKENS);
        assert_eq!(phases[0]["steps_done"], short_steps);
        assert_eq!(phases[1]["steps_done"], long_steps);
        let ends: Vec<(u64, u64)> = s["checkpoints"]
            .as_array()
            .expect("checkpoints")
            .iter()
            .map(|c| {
                (
                    c["phase_index"].as_u64().unwrap_or(9),
                    c["step"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        assert!(
            ends.contains(&(0, short_steps)) && ends.contains(&(1, long_steps)),
            "{ends:?}"
        );
        assert!(
            phases[0]["loss"]
                .as_f64()
                .is_some_and(|l| l > 0.0 && l.is_finite())
        );
    }
    assert_eq!(
        trained_many["attempts"][0]["workers"]
            .as_array()
            .map(Vec::len),
        Some(world as usize),
        "one world of {world} ranks: {trained_many}"
    );

    // `world` ranks end where one process ends, within float tolerance.
    let (w_many, w_one) = (final_weights(&trained_many), final_weights(&trained_one));
    let worst = max_difference(&w_many, &w_one);
    assert!(worst < 1e-4, "largest weight difference {worst}");
    // And training moved the weights: the comparison is not of two inits.
    let init = twinhead_worker::checkpoint::load(
        trained_many["checkpoints"][0]["url"]
            .as_str()
            .expect("first checkpoint"),
    )
    .expect("loads");
    let moved = init.model.iter().any(|(name, _, v)| {
        v.iter()
            .zip(&w_many[name])
            .any(|(x, y)| (x - y).abs() > 1e-3)
    });
    assert!(
        moved,
        "the weights changed between the first and the last checkpoint"
    );

    // Every row of each phase consumed exactly once, by both runs.
    assert_rows_once(&many, &run_many);
    assert_rows_once(&one, &run_one);

    // The held-out loss is the same whatever the world size: same steps,
    // same rows and predicted tokens, losses within the weights' noise.
    let evals = |s: &serde_json::Value| -> Vec<(u64, u64, u64, u64, f64, String)> {
        s["evals"]
            .as_array()
            .expect("evals")
            .iter()
            .map(|e| {
                (
                    e["phase_index"].as_u64().unwrap_or(9),
                    e["step"].as_u64().unwrap_or(0),
                    e["rows"].as_u64().unwrap_or(0),
                    e["targets"].as_u64().unwrap_or(0),
                    e["loss"].as_f64().unwrap_or(f64::NAN),
                    e["error"].as_str().unwrap_or("?").to_string(),
                )
            })
            .collect()
    };
    let (e_many, e_one) = (evals(&trained_many), evals(&trained_one));
    // Every 1,536 tokens and at both phase ends.
    let due = |phase: u64, steps: u64, tokens: u64| {
        let per_step = tokens / steps;
        (1..=steps)
            .filter(move |s| s * per_step % 1536 < per_step || *s == steps)
            .map(move |s| (phase, s))
    };
    let expected_steps: Vec<(u64, u64)> = due(0, short_steps, many.short_tokens)
        .chain(due(1, long_steps, LONG_TOKENS))
        .collect();
    let steps_of = |e: &[(u64, u64, u64, u64, f64, String)]| -> Vec<(u64, u64)> {
        e.iter().map(|x| (x.0, x.1)).collect()
    };
    assert_eq!(steps_of(&e_many), expected_steps, "{e_many:?}");
    assert_eq!(steps_of(&e_one), expected_steps, "{e_one:?}");
    for (a, b) in e_many.iter().zip(&e_one) {
        assert_eq!(a.5, "", "evaluation failed: {a:?}");
        assert_eq!((a.2, a.3), (b.2, b.3), "rows and targets: {a:?} vs {b:?}");
        assert!(a.2 > 0 && a.2 <= 12 && a.3 > 0, "{a:?}");
        assert!(
            a.4.is_finite() && (a.4 - b.4).abs() < 1e-4 * a.4,
            "held-out loss {a:?} on {world} ranks, {b:?} on one"
        );
    }
    // Training lowered it.
    let first = e_many.first().map_or(f64::NAN, |e| e.4);
    let last_short = e_many.iter().rfind(|e| e.0 == 0).map_or(f64::NAN, |e| e.4);
    assert!(last_short < first, "held-out loss {first} -> {last_short}");
}

#[test]
fn a_failing_held_out_evaluation_is_reported_and_training_goes_on() {
    let setup = Setup::new(1);
    // The long phase's held-out shards vanish after the build.
    let long = Path::new(setup.data.trim_start_matches("file://")).join("phases/long");
    let mut removed = 0;
    for entry in std::fs::read_dir(&long).expect("phase folder") {
        let path = entry.expect("entry").path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("eval-"))
        {
            std::fs::remove_file(&path).expect("remove");
            removed += 1;
        }
    }
    assert!(
        removed > 0,
        "the dataset has held-out shards in {}",
        long.display()
    );

    let ckpt = setup.dir.path().join("ckpt");
    let recipe = Recipe {
        extra: HELD_OUT_EVERY_1536,
        ..Recipe::new("eval-fails", &setup.data, 1, &ckpt)
    };
    let run = submit(&setup.url, &recipe.write(setup.dir.path()));
    let _worker = worker(&setup.url, &setup.logs[0]);
    let trained = wait_completed(&setup.url, &run, &setup.logs);
    let evals = trained["evals"].as_array().expect("evals");
    let (short, long): (Vec<_>, Vec<_>) = evals.iter().partition(|e| e["phase_index"] == 0);
    assert!(!short.is_empty() && !long.is_empty(), "{trained}");
    for e in &short {
        assert_eq!(e["error"], "", "{e}");
        assert!(e["loss"].as_f64().is_some_and(|l| l > 0.0), "{e}");
    }
    for e in &long {
        let error = e["error"].as_str().unwrap_or("");
        assert!(
            error.contains("eval-00000.parquet"),
            "the error names the missing shard: {e}"
        );
    }
    // The same failure, from the status table and /metrics' count.
    let out = twinhead()
        .args(["status", "--coordinator", &setup.url, &run])
        .output()
        .expect("status");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("HELD-OUT LOSS"), "{table}");
    assert!(table.contains("failed: "), "{table}");
    assert_rows_once(&recipe, &run);
}

/// Waits until every checkpoint evaluation of the run has ended (done or
/// failed) and returns the run's status.
fn wait_scored(url: &str, run: &str, logs: &[PathBuf]) -> serde_json::Value {
    wait_for(url, run, logs, "checkpoints scored", |s| {
        s["checkpoint_evals"].as_array().is_some_and(|evals| {
            !evals.is_empty()
                && evals
                    .iter()
                    .all(|e| e["state"] == "done" || e["state"] == "failed")
        })
    })
}

#[test]
fn committed_checkpoints_are_scored_on_the_runs_tasks_as_twinhead_eval_scores_them() {
    let setup = Setup::new(2);
    let tasks = hand_task(setup.dir.path(), 3);
    let ckpt = setup.dir.path().join("ckpt");
    // Checkpoints every 1,024 tokens; tasks at phase ends and on those that
    // cross a multiple of 2,048: short phase 2,048 and 3,072 (its end),
    // long phase 2,048, 4,096 and 6,144 (its end).
    let extra = format!(
        "[eval]\ntasks = [\"hand\"]\nat = 2048\ntasks_dir = {:?}",
        tasks.display().to_string()
    );
    let recipe = Recipe {
        extra: &extra,
        ..Recipe::new("scored", &setup.data, 2, &ckpt)
    };
    let run = submit(&setup.url, &recipe.write(setup.dir.path()));
    let workers: Vec<Proc> = setup.logs.iter().map(|l| worker(&setup.url, l)).collect();
    wait_completed(&setup.url, &run, &setup.logs);
    let scored = wait_scored(&setup.url, &run, &setup.logs);
    drop(workers);
    let evals = scored["checkpoint_evals"]
        .as_array()
        .expect("checkpoint_evals");
    let at: Vec<(u64, u64)> = evals
        .iter()
        .map(|e| {
            (
                e["checkpoint"]["phase_index"].as_u64().unwrap_or(9),
                e["checkpoint"]["tokens"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        at,
        vec![(0, 2048), (0, 3072), (1, 2048), (1, 4096), (1, 6144)],
        "{scored}"
    );
    for e in evals {
        assert_eq!(e["state"], "done", "{e}\n{}", dump(&setup.logs));
        let hand = &e["scores"]["hand"];
        assert_eq!(hand["docs"], 3, "{e}");
        assert_eq!(hand["primary_metric"], "acc_per_char");
        let acc = hand["acc_per_char"].as_f64().unwrap_or(f64::NAN);
        assert!(one_or_two_thirds(acc), "{e}");
    }
    // The stored scores of the last checkpoint are what `twinhead eval`
    // gives on its export.
    let hf = setup.dir.path().join("hf");
    let exported = twinhead()
        .args(["export", "--coordinator", &setup.url, &run, "--hf"])
        .arg(&hf)
        .output()
        .expect("export");
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let by_hand = twinhead()
        .arg("eval")
        .arg(&hf)
        .args(["--task", "hand", "--json", "--tasks-dir"])
        .arg(&tasks)
        .output()
        .expect("eval");
    assert!(
        by_hand.status.success(),
        "{}",
        String::from_utf8_lossy(&by_hand.stderr)
    );
    let by_hand: serde_json::Value = serde_json::from_slice(&by_hand.stdout).expect("json");
    let stored = &evals[evals.len() - 1]["scores"]["hand"];
    for metric in ["acc_raw", "acc_per_token", "acc_per_char", "acc_uncond"] {
        assert_eq!(
            stored[metric], by_hand["hand"][metric],
            "{metric}: {stored} vs {by_hand}"
        );
    }
    // `compare` reads the run's stored scores beside the folder it scores:
    // the same model, the same number.
    let compared = twinhead()
        .args(["compare", "--json", "--coordinator", &setup.url, &run])
        .arg(&hf)
        .args(["--tasks", "hand", "--tasks-dir"])
        .arg(&tasks)
        .output()
        .expect("compare");
    assert!(
        compared.status.success(),
        "{}",
        String::from_utf8_lossy(&compared.stderr)
    );
    let compared: serde_json::Value = serde_json::from_slice(&compared.stdout).expect("json");
    let row = compared["hand"].as_object().expect("hand row");
    assert_eq!(row.len(), 2, "{compared}");
    assert_eq!(
        row[&format!("scored ({run})")],
        stored["acc_per_char"],
        "{compared}"
    );
    assert_eq!(row["hf"], stored["acc_per_char"], "{compared}");
    // With only runs, their own tasks are compared.
    let runs_only = twinhead()
        .args(["compare", "--json", "--coordinator", &setup.url, &run])
        .output()
        .expect("compare");
    assert!(
        runs_only.status.success(),
        "{}",
        String::from_utf8_lossy(&runs_only.stderr)
    );
    let runs_only: serde_json::Value = serde_json::from_slice(&runs_only.stdout).expect("json");
    assert_eq!(
        runs_only["hand"][&format!("scored ({run})")],
        stored["acc_per_char"]
    );

    let table = twinhead()
        .args(["status", "--coordinator", &setup.url, &run])
        .output()
        .expect("status");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("acc_per_char") && table.contains("eval-5"),
        "{table}"
    );
    let png = setup.dir.path().join("scores.png");
    let plotted = twinhead()
        .args([
            "plot",
            "--eval",
            "--json",
            "--coordinator",
            &setup.url,
            &run,
            "--out",
        ])
        .arg(&png)
        .output()
        .expect("plot");
    assert!(
        plotted.status.success(),
        "{}",
        String::from_utf8_lossy(&plotted.stderr)
    );
    let plotted: serde_json::Value = serde_json::from_slice(&plotted.stdout).expect("json");
    assert_eq!(
        (plotted["points"].as_u64(), plotted["tasks"].as_u64()),
        (Some(5), Some(1))
    );
    assert!(std::fs::metadata(&png).is_ok_and(|m| m.len() > 1000));

    // A task no worker has is each checkpoint's failure; the run is fine.
    let ckpt_bad = setup.dir.path().join("ckpt-bad");
    let bad = Recipe {
        extra: "[eval]\ntasks = [\"no_such_task\"]",
        ..Recipe::new("unscorable", &setup.data, 1, &ckpt_bad)
    };
    let run = submit(&setup.url, &bad.write(setup.dir.path()));
    let _worker = worker(&setup.url, &setup.logs[0]);
    let done = wait_completed(&setup.url, &run, &setup.logs);
    assert_eq!(done["state"], "completed");
    let failed = wait_scored(&setup.url, &run, &setup.logs);
    for e in failed["checkpoint_evals"].as_array().expect("evals") {
        assert_eq!(e["state"], "failed", "{e}");
        let error = e["error"].as_str().unwrap_or("");
        assert!(error.contains("no_such_task"), "{e}");
    }
    // Nothing scored: compare says so, naming the run.
    let nothing = twinhead()
        .args(["compare", "--coordinator", &setup.url, &run])
        .output()
        .expect("compare");
    assert!(!nothing.status.success());
    let message = String::from_utf8_lossy(&nothing.stderr);
    assert!(
        message.contains(&run) && message.contains("no scored checkpoint"),
        "{message}"
    );
}

#[test]
fn a_failure_no_retry_can_fix_fails_the_run_at_once_with_its_message() {
    let setup = Setup::new(1);
    let ckpt = setup.dir.path().join("ckpt");
    let recipe = Recipe::new("wrong-seq-len", &setup.data, 1, &ckpt);
    let config = recipe.write(setup.dir.path());
    let submit_with = |set: &[&str]| {
        let mut command = twinhead();
        command.args(["submit", "--json", "--coordinator", &setup.url]);
        for s in set {
            command.args(["--set", s]);
        }
        command.arg(&config).output().expect("submit")
    };
    // The dataset's first phase has rows of 64 tokens: a run asking for
    // 128 is refused at submit.
    let refused = submit_with(&["phases[0].seq_len=128"]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("spec.phases[0].seq_len: 128 in the run") && said.contains("seq_len 64"),
        "{said}"
    );
    // A run that fits is accepted; then the dataset changes under it (its
    // manifest now says 128), which no retry can fix.
    let out = submit_with(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")["run_id"]
        .as_str()
        .expect("run_id")
        .to_string();
    let manifest_path = twinhead_data::store::local_path(&setup.data)
        .expect("a local dataset")
        .join("manifest.json");
    let manifest = std::fs::read_to_string(&manifest_path).expect("manifest");
    let mut manifest: serde_json::Value = serde_json::from_str(&manifest).expect("json");
    manifest["phases"][0]["seq_len"] = 128.into();
    std::fs::write(&manifest_path, manifest.to_string()).expect("rewrite manifest");
    let _worker = worker(&setup.url, &setup.logs[0]);
    let failed = wait_for(&setup.url, &run, &setup.logs, "the run to end", |s| {
        s["state"] == "failed" || s["state"] == "completed"
    });
    assert_eq!(failed["state"], "failed", "{failed}\n{}", dump(&setup.logs));
    let message = failed["message"].as_str().unwrap_or("");
    assert!(
        message.contains("seq_len") && message.contains("a retry cannot fix this"),
        "{message}"
    );
    assert_eq!(
        failed["attempts"].as_array().map(Vec::len),
        Some(1),
        "one world, not max_restarts of them: {failed}"
    );
}

/// Held-out loss every 1,536 tokens on at most 12 rows.
const HELD_OUT_EVERY_1536: &str = "[eval]\nevery_tokens = 1536\nmax_rows = 12";

#[test]
fn two_workers_match_one_through_both_phases_and_consume_every_row_once() {
    assert_workers_match_one(2, 8);
}

#[test]
fn three_workers_match_one_through_both_phases_and_consume_every_row_once() {
    // 12 x 64 x 4 = 3072 tokens (4 steps), then 12 x 256 x 2 = 6144 (2).
    assert_workers_match_one(3, 12);
}

/// A batch warmup over the first 1024 tokens: two workers take batches of
/// 4 sequences (the ramp moves in world × micro_batch = 4) before the global
/// 8, so the short phase has 4 + 4 steps instead of 6; the long phase has
/// no warmup. Every row is still consumed once.
#[test]
fn a_batch_warmup_takes_smaller_batches_first_and_consumes_every_row_once() {
    let setup = Setup::new(2);
    let ckpt = setup.dir.path().join("ckpt");
    let recipe = Recipe {
        extra: r#"batch_warmup = { start = 4, tokens = "1K" }"#,
        ..Recipe::new("warm", &setup.data, 2, &ckpt)
    };
    // By hand: 4 x 64 tokens per ramp step until 1024, then 8 x 64.
    assert_eq!(recipe.steps(), [("short", 8), ("long", 3)]);
    let run = submit(&setup.url, &recipe.write(setup.dir.path()));
    let workers: Vec<Proc> = setup.logs.iter().map(|l| worker(&setup.url, l)).collect();
    let trained = wait_completed(&setup.url, &run, &setup.logs);
    drop(workers);

    let phases = trained["phases"].as_array().expect("phases");
    assert_eq!(phases[0]["num_steps"], 8);
    assert_eq!(phases[0]["steps_done"], 8);
    assert_eq!(phases[0]["tokens_done"], recipe.short_tokens);
    assert_eq!(phases[1]["steps_done"], 3);
    assert_eq!(phases[1]["tokens_done"], LONG_TOKENS);
    assert_rows_once(&recipe, &run);

    // The setup.data-order log shows the ramp: rows taken per step, both ranks.
    let ckpt_url = format!("file://{}", ckpt.display());
    let attempts =
        twinhead_worker::loader::order::read_attempts(&ckpt_url, &run, 0, "short").expect("log");
    let per_step: Vec<u64> = twinhead_worker::loader::order::history(&attempts)
        .values()
        .map(|entries| entries.iter().map(|e| e.rows[1] - e.rows[0]).sum())
        .collect();
    assert_eq!(per_step, vec![4, 4, 4, 4, 8, 8, 8, 8]);
}

#[test]
fn a_run_resumed_with_fewer_ranks_after_a_kill_ends_where_an_uninterrupted_run_does() {
    let setup = Setup::new(2);
    // 12 steps in the first phase, so there is time to kill a rank.
    let ckpt2 = setup.dir.path().join("ckpt-2");
    let elastic = Recipe {
        short_tokens: 6144,
        extra: "min_world_size = 1",
        ..Recipe::new("elastic", &setup.data, 2, &ckpt2)
    };
    let run2 = submit(&setup.url, &elastic.write(setup.dir.path()));
    let keep = worker(&setup.url, &setup.logs[0]);
    // Registered first, so the survivor is rank 0.
    wait_for_log(&setup.logs[0], "registered", &setup.logs);
    let mut doomed = worker(&setup.url, &setup.logs[1]);
    // Kill the second rank with SIGKILL once a checkpoint is committed.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s = status(&setup.url, &run2);
        if s["checkpoints"].as_array().is_some_and(|c| !c.is_empty()) {
            assert_ne!(s["state"], "completed", "the run finished before the kill");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint: {s}\n{}",
            dump(&setup.logs)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    doomed.0.kill().expect("kill");
    doomed.0.wait().expect("reap");
    let two = wait_completed(&setup.url, &run2, &setup.logs);
    drop(keep);
    let attempts = two["attempts"].as_array().expect("attempts");
    assert!(attempts.len() >= 2, "the world was re-formed: {attempts:?}");
    let last = attempts.last().expect("attempt");
    assert_eq!(
        last["workers"].as_array().map(Vec::len),
        Some(1),
        "finished with one rank: {attempts:?}"
    );
    assert!(attempts[0]["failed"].as_bool().unwrap_or(false));

    // The same recipe, one rank, never interrupted.
    let ckpt1 = setup.dir.path().join("ckpt-1");
    let steady = Recipe {
        short_tokens: 6144,
        ..Recipe::new("steady", &setup.data, 1, &ckpt1)
    };
    let run1 = submit(&setup.url, &steady.write(setup.dir.path()));
    let log1 = vec![setup.dir.path().join("w-single.log")];
    let single = worker(&setup.url, &log1[0]);
    let one = wait_completed(&setup.url, &run1, &log1);
    drop(single);

    let (w2, w1) = (final_weights(&two), final_weights(&one));
    let worst = max_difference(&w2, &w1);
    assert!(worst < 1e-4, "largest weight difference {worst}");
    // The resumed history still consumes every row exactly once.
    assert_rows_once(&elastic, &run2);
}

#[test]
fn a_corrupt_checkpoint_is_refused_and_the_previous_one_is_used() {
    let setup = Setup::new(2);
    let ckpt = setup.dir.path().join("ckpt");
    let recipe = Recipe {
        short_tokens: 6144,
        ..Recipe::new("corrupt", &setup.data, 1, &ckpt)
    };
    let run = submit(&setup.url, &recipe.write(setup.dir.path()));
    let mut first = worker(&setup.url, &setup.logs[0]);
    let deadline = Instant::now() + Duration::from_secs(300);
    let newest = loop {
        let s = status(&setup.url, &run);
        let checkpoints = s["checkpoints"].as_array().cloned().unwrap_or_default();
        if checkpoints.len() >= 2 {
            first.0.kill().expect("kill");
            first.0.wait().expect("reap");
            // The list may have grown before the kill landed.
            let s = status(&setup.url, &run);
            break s["checkpoints"]
                .as_array()
                .and_then(|c| c.last().cloned())
                .expect("checkpoint");
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoints: {s}\n{}",
            dump(&setup.logs)
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let bad_url = newest["url"].as_str().expect("url").to_string();
    let model = PathBuf::from(bad_url.trim_start_matches("file://")).join("model.safetensors");
    let mut bytes = std::fs::read(&model).expect("model file");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&model, bytes).expect("corrupt");

    let _second = worker(&setup.url, &setup.logs[1]);
    let done = wait_completed(&setup.url, &run, &setup.logs);
    let attempts = done["attempts"].as_array().expect("attempts");
    let refused = attempts
        .iter()
        .find(|a| {
            a["end_reason"]
                .as_str()
                .is_some_and(|r| r.contains("unusable"))
        })
        .unwrap_or_else(|| panic!("no attempt refused the checkpoint: {attempts:?}"));
    assert!(
        refused["end_reason"]
            .as_str()
            .is_some_and(|r| r.contains(&bad_url)),
        "{refused}"
    );
    let resumed = attempts.last().expect("attempt");
    let from = resumed["start_checkpoint"]["step"].as_u64().unwrap_or(0);
    assert!(
        from < newest["step"].as_u64().unwrap_or(0),
        "resumed from {from}, before the corrupt one"
    );
    assert_rows_once(&recipe, &run);
}

#[test]
fn workers_carry_a_run_through_a_killed_and_restarted_coordinator() {
    let Setup {
        dir,
        data,
        _coordinator: coordinator,
        url,
        logs,
    } = Setup::new(2);
    let db = dir.path().join(Setup::DB);
    let ckpt = dir.path().join("ckpt");
    let recipe = Recipe {
        short_tokens: 6144,
        ..Recipe::new("outage", &data, 2, &ckpt)
    };
    let run = submit(&url, &recipe.write(dir.path()));
    let _workers: Vec<Proc> = logs.iter().map(|l| worker(&url, l)).collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s = status(&url, &run);
        if s["checkpoints"].as_array().is_some_and(|c| !c.is_empty()) {
            assert_ne!(s["state"], "completed", "the run ended before the outage");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint: {s}\n{}",
            dump(&logs)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGKILL, a pause, and a restart on the same database and address.
    drop(coordinator);
    std::thread::sleep(Duration::from_millis(500));
    let listen = url.trim_start_matches("http://").to_string();
    let (_coordinator, url) = coordinator_on(&db, &listen);
    let done = wait_completed(&url, &run, &logs);
    let attempts = done["attempts"].as_array().expect("attempts");
    assert_eq!(
        attempts.len(),
        1,
        "the world lived through the outage: {attempts:?}"
    );
    let phases = done["phases"].as_array().expect("phases");
    assert_eq!(phases[1]["steps_done"], 3);
    assert_rows_once(&recipe, &run);
}

/// Sends `signal` (e.g. "TERM") to a worker process.
fn signal(worker: &Proc, signal: &str) {
    let sent = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(worker.0.id().to_string())
        .status()
        .expect("kill runs");
    assert!(sent.success(), "kill -{signal} failed");
}

/// Waits for a worker process to exit on its own and returns its status.
fn wait_exit(worker: &mut Proc, logs: &[PathBuf]) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = worker.0.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the worker did not exit\n{}",
            dump(logs)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until a process's log holds `needle` (an event it logged).
fn wait_for_log(log: &Path, needle: &str, logs: &[PathBuf]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(log).is_ok_and(|text| text.contains(needle)) {
        assert!(
            Instant::now() < deadline,
            "{} never logged {needle:?}\n{}",
            log.display(),
            dump(logs)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls the run until `ready` holds of its status.
fn wait_for(
    url: &str,
    run: &str,
    logs: &[PathBuf],
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let s = status(url, run);
        if ready(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: {s}\n{}", dump(logs));
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_worker_sent_sigterm_checkpoints_its_step_leaves_and_the_run_resumes_there() {
    let setup = Setup::new(3);
    let ckpt = setup.dir.path().join("ckpt");
    // 12 steps in the first phase and checkpoints only at phase ends, so a
    // checkpoint inside the phase can only come from the signal.
    let recipe = Recipe {
        short_tokens: 6144,
        every_tokens: 0,
        ..Recipe::new("requeue", &setup.data, 2, &ckpt)
    };
    let run = submit(&setup.url, &recipe.write(setup.dir.path()));
    let _stays = worker(&setup.url, &setup.logs[0]);
    wait_for_log(&setup.logs[0], "registered", &setup.logs);
    let mut leaves = worker(&setup.url, &setup.logs[1]);
    let trained = wait_for(&setup.url, &run, &setup.logs, "no progress", |s| {
        s["phases"][0]["steps_done"].as_u64().unwrap_or(0) >= 2
    });
    // The replacement waits, free, for the next world.
    let _replacement = worker(&setup.url, &setup.logs[2]);
    let seen = trained["phases"][0]["steps_done"].as_u64().unwrap_or(0);
    assert!(seen < 12, "the phase ended before the signal: {trained}");
    signal(&leaves, "TERM");
    let exit = wait_exit(&mut leaves, &setup.logs);
    assert_eq!(exit.code(), Some(75), "exit status\n{}", dump(&setup.logs));

    let done = wait_completed(&setup.url, &run, &setup.logs);
    let attempts = done["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "one stop, one resume: {attempts:?}");
    let first = &attempts[0];
    assert_eq!(first["failed"].as_bool(), Some(false), "{first}");
    assert!(
        first["end_reason"]
            .as_str()
            .is_some_and(|r| r.contains("left")),
        "{first}"
    );
    // A committed checkpoint inside the first phase, at or after the step
    // the signal found the world at.
    let stop = done["checkpoints"]
        .as_array()
        .expect("checkpoints")
        .iter()
        .find(|c| c["phase_index"] == 0 && c["step"].as_u64().is_some_and(|s| s < 12))
        .unwrap_or_else(|| panic!("no checkpoint from the stop: {done}"));
    let stopped_at = stop["step"].as_u64().unwrap_or(0);
    assert!(stopped_at >= seen, "stopped at {stopped_at}, saw {seen}");
    assert_eq!(stop["world_id"], first["world_id"], "{stop}");
    // It is the step the first world stopped at: no trained step was thrown
    // away (its setup.data-order log ends there) ...
    let attempt_logs = twinhead_worker::loader::order::read_attempts(
        &format!("file://{}", ckpt.display()),
        &run,
        0,
        "short",
    )
    .expect("data-order setup.logs read");
    let first_world = first["world_id"].as_str().expect("world id");
    let last_logged = attempt_logs
        .iter()
        .filter(|a| a.attempt == first_world)
        .flat_map(|a| a.entries.iter().map(|e| e.step))
        .max();
    assert_eq!(last_logged, Some(stopped_at - 1), "{attempt_logs:?}");
    // ... and the next world started from it.
    let second = &attempts[1];
    assert_eq!(
        second["start_checkpoint"]["step"].as_u64(),
        Some(stopped_at)
    );
    assert_eq!(second["start_checkpoint"]["phase_index"].as_u64(), Some(0));
    assert_eq!(second["workers"].as_array().map(Vec::len), Some(2));
    assert_rows_once(&recipe, &run);
}

#[test]
fn a_worker_asked_to_leave_while_the_coordinator_is_down_exits_within_5_s_with_its_checkpoint_committed()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dataset(dir.path());
    let (coordinator, url) = coordinator(&dir.path().join("c.db"));
    let ckpt = dir.path().join("ckpt");
    // 12 steps and checkpoints only at phase ends: a checkpoint inside the
    // phase can only come from the stop.
    let recipe = Recipe {
        short_tokens: 6144,
        every_tokens: 0,
        ..Recipe::new("unreachable", &data, 1, &ckpt)
    };
    let run = submit(&url, &recipe.write(dir.path()));
    let logs = vec![dir.path().join("w.log")];
    let mut leaves = worker(&url, &logs[0]);
    wait_for(&url, &run, &logs, "no progress", |s| {
        s["phases"][0]["steps_done"].as_u64().unwrap_or(0) >= 2
    });
    drop(coordinator);
    let asked = Instant::now();
    signal(&leaves, "TERM");
    let exit = wait_exit(&mut leaves, &logs);
    let took = asked.elapsed();
    eprintln!("the worker exited {took:?} after SIGTERM");
    assert_eq!(exit.code(), Some(75), "exit status\n{}", dump(&logs));
    assert!(
        took < Duration::from_secs(5),
        "left after {took:?}\n{}",
        dump(&logs)
    );
    // The step it stopped at is committed on storage, whole.
    let phase = ckpt.join(&run).join("0-short");
    let mut steps: Vec<PathBuf> = std::fs::read_dir(&phase)
        .expect("checkpoints of the phase")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
        })
        .collect();
    steps.sort();
    let newest = steps.last().expect("a checkpoint from the stop");
    let loaded = twinhead_worker::checkpoint::load(&format!("file://{}", newest.display()))
        .expect("the stop's checkpoint loads");
    assert!(
        loaded.state.info.step >= 2 && loaded.state.info.step < 12,
        "{:?}",
        loaded.state.info
    );
}

#[test]
fn a_worker_killed_while_writing_a_checkpoint_leaves_it_unused_and_the_run_resumes_before_it() {
    let setup = Setup::new(2);
    let ckpt = setup.dir.path().join("ckpt");
    let recipe = Recipe {
        short_tokens: 6144,
        ..Recipe::new("torn", &setup.data, 1, &ckpt)
    };
    let run = submit(&setup.url, &recipe.write(setup.dir.path()));
    // Every checkpoint write of this worker pauses before its marker.
    let mut doomed = worker_with_env(
        &setup.url,
        &setup.logs[0],
        &[("TWINHEAD_TEST_STALL_CHECKPOINT_MS", "4000")],
    );
    let committed = wait_for(
        &setup.url,
        &run,
        &setup.logs,
        "no committed checkpoint",
        |s| s["checkpoints"].as_array().is_some_and(|c| !c.is_empty()),
    );
    let committed_step = committed["checkpoints"][0]["step"].as_u64().unwrap_or(0);
    // Wait for a later checkpoint folder whose files are written but whose
    // COMMITTED marker is not, then SIGKILL the worker inside that window.
    let phase_dir = ckpt.join(&run).join("0-short");
    let deadline = Instant::now() + Duration::from_secs(300);
    let torn = loop {
        let half_written = std::fs::read_dir(&phase_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("state.json").exists() && !p.join("COMMITTED").exists());
        if let Some(folder) = half_written {
            doomed.0.kill().expect("kill");
            doomed.0.wait().expect("reap");
            break folder;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint caught mid-write under {}\n{}",
            phase_dir.display(),
            dump(&setup.logs)
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        !torn.join("COMMITTED").exists(),
        "the kill landed after the marker"
    );
    let torn_url = format!("file://{}", torn.display());
    assert!(
        twinhead_worker::checkpoint::load(&torn_url).is_err(),
        "a folder without COMMITTED loads"
    );

    let _replacement = worker(&setup.url, &setup.logs[1]);
    let done = wait_completed(&setup.url, &run, &setup.logs);
    let attempts = done["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    let resumed = &attempts[1]["start_checkpoint"];
    let from = resumed["step"].as_u64().unwrap_or(0);
    assert!(from >= committed_step, "resumed from {from}: {resumed}");
    let torn_step: u64 = torn
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step-"))
        .and_then(|n| n.parse().ok())
        .expect("step-NNNNNNN folder");
    assert!(
        from < torn_step,
        "resumed from step {from}, not the half-written {torn_step}"
    );
    assert_eq!(resumed["phase_index"].as_u64(), Some(0), "{resumed}");
    assert_rows_once(&recipe, &run);
}

#[test]
fn a_worker_stopped_past_its_lease_inside_a_checkpoint_write_is_dropped_and_rejoins_when_continued()
{
    let setup = Setup::new(3);
    let ckpt = setup.dir.path().join("ckpt");
    let recipe = Recipe {
        short_tokens: 6144,
        ..Recipe::new("hung", &setup.data, 2, &ckpt)
    };
    let run = submit(&setup.url, &recipe.write(setup.dir.path()));
    // Rank 0 (registered first) writes the checkpoints; each of its writes
    // pauses before the marker, so the stop lands inside one.
    let hung = worker_with_env(
        &setup.url,
        &setup.logs[0],
        &[("TWINHEAD_TEST_STALL_CHECKPOINT_MS", "2000")],
    );
    wait_for_log(&setup.logs[0], "registered", &setup.logs);
    let hung_id = logged_worker_id(&setup.logs[0]);
    let _peer = worker(&setup.url, &setup.logs[1]);
    wait_for_log(&setup.logs[1], "registered", &setup.logs);
    let _spare = worker(&setup.url, &setup.logs[2]);
    wait_for_log(&setup.logs[0], "stalling before COMMITTED", &setup.logs);
    signal(&hung, "STOP");
    let stopped = Instant::now();

    // Its lease runs out (3 s here), the world ends, and the peer and the
    // spare form the next one.
    let reformed = wait_for(&setup.url, &run, &setup.logs, "no world without it", |s| {
        s["attempts"].as_array().is_some_and(|a| {
            a.len() >= 2
                && a.last().is_some_and(|last| {
                    last["workers"]
                        .as_array()
                        .is_some_and(|w| !w.iter().any(|id| id == hung_id.as_str()))
                })
        })
    });
    let detected = stopped.elapsed();
    assert!(
        detected < Duration::from_secs(15),
        "re-formed {detected:?} after the stop"
    );
    assert!(reformed["attempts"][0]["failed"].as_bool().unwrap_or(false));

    // Continued, it finds it was declared dead, drops what it was doing,
    // registers again, and the run goes on to completion.
    std::thread::sleep(Duration::from_secs(1));
    signal(&hung, "CONT");
    wait_for_log(&setup.logs[0], "registering again", &setup.logs);
    // The checkpoint it was writing when stopped is not committed by it:
    // its lease lapsed while it was stopped.
    wait_for_log(&setup.logs[0], "left uncommitted", &setup.logs);
    let done = wait_completed(&setup.url, &run, &setup.logs);
    assert_rows_once(&recipe, &run);
    // Every checkpoint the run recorded loads (its files hash to its
    // state), including any folder the continued worker went on writing in.
    for checkpoint in done["checkpoints"].as_array().expect("checkpoints") {
        let url = checkpoint["url"].as_str().expect("url");
        twinhead_worker::checkpoint::load(url)
            .unwrap_or_else(|e| panic!("{url}: {e}\n{}", dump(&setup.logs)));
    }
    for attempt in done["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .skip(1)
    {
        if let Some(url) = attempt["start_checkpoint"]["url"].as_str() {
            twinhead_worker::checkpoint::load(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }
}

/// The id a worker logged when it registered (`registered worker=ID`).
fn logged_worker_id(log: &Path) -> String {
    let text = std::fs::read_to_string(log).expect("log");
    text.lines()
        .find(|l| l.contains("registered"))
        .and_then(|l| l.split("worker=").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a registered line with the worker id")
        .to_string()
}

/// A tmpfs of `size` (e.g. "12m") mounted on a fresh folder: a disk that
/// fills up. `None` where this process may not mount (not root, no
/// CAP_SYS_ADMIN): the tests using it then report themselves skipped.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().ok()?;
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).ok()?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Tmpfs { path, _dir: dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[test]
fn a_full_checkpoint_disk_fails_the_run_clearly_and_commits_no_partial_checkpoint() {
    let Some(disk) = Tmpfs::mount("12m") else {
        return;
    };
    let setup = Setup::new(1);
    let ckpt = disk.path.join("ckpt");
    let recipe = Recipe {
        extra: "max_restarts = 2",
        ..Recipe::new("full-disk", &setup.data, 1, &ckpt)
    };
    let run = submit(&setup.url, &recipe.write(setup.dir.path()));
    let _worker = worker(&setup.url, &setup.logs[0]);
    let failed = wait_for(&setup.url, &run, &setup.logs, "the run to end", |s| {
        s["state"] == "failed" || s["state"] == "completed"
    });
    assert_eq!(failed["state"], "failed", "{failed}\n{}", dump(&setup.logs));
    // The run says why, naming the file it could not write.
    let message = failed["message"].as_str().unwrap_or("");
    assert!(
        message.contains("No space left on device")
            && message.contains(&ckpt.display().to_string()),
        "{message}"
    );
    // Some checkpoints fitted; every folder with COMMITTED loads whole, the
    // rest have none, and the last recorded checkpoint is usable.
    let checkpoints = failed["checkpoints"].as_array().expect("checkpoints");
    assert!(!checkpoints.is_empty(), "{failed}");
    let mut partial = 0;
    for phase in std::fs::read_dir(ckpt.join(&run))
        .expect("run folder")
        .flatten()
    {
        for step in std::fs::read_dir(phase.path())
            .expect("phase folder")
            .flatten()
        {
            let folder = step.path();
            let url = format!("file://{}", folder.display());
            if folder.join("COMMITTED").exists() {
                twinhead_worker::checkpoint::load(&url)
                    .unwrap_or_else(|e| panic!("{url} is committed but does not load: {e}"));
            } else {
                partial += 1;
            }
        }
    }
    assert!(
        partial > 0,
        "no write was cut short: the disk is too large for the test"
    );
    let last = last_checkpoint_url(&failed);
    twinhead_worker::checkpoint::load(&last).expect("the last committed checkpoint loads");
}

#[test]
fn a_full_dataset_disk_fails_the_build_naming_the_file_and_writes_no_manifest() {
    let Some(disk) = Tmpfs::mount("64k") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = fixture_data_config(dir.path());
    let out = twinhead()
        .args(["dataset", "build"])
        .arg(&config)
        .arg("--out")
        .arg(&disk.path)
        .output()
        .expect("dataset build");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("No space left on device") && said.contains(&disk.path.display().to_string()),
        "{said}"
    );
    assert!(!said.contains("panicked"), "{said}");
    assert!(
        !disk.path.join("train-fixture/manifest.json").exists(),
        "a manifest for partial data"
    );
}

/// The run's first checkpoint, loaded.
fn first_checkpoint(status: &serde_json::Value) -> twinhead_worker::checkpoint::LoadedCheckpoint {
    let url = status["checkpoints"][0]["url"]
        .as_str()
        .expect("a checkpoint");
    twinhead_worker::checkpoint::load(url).expect("checkpoint loads")
}

/// The run's last checkpoint URL.
fn last_checkpoint_url(status: &serde_json::Value) -> String {
    status["checkpoints"]
        .as_array()
        .and_then(|c| c.last())
        .and_then(|c| c["url"].as_str())
        .expect("a checkpoint")
        .to_string()
}

#[test]
fn runs_start_from_another_runs_checkpoint_across_objectives_and_refuse_bad_ones() {
    let setup = Setup::new(5);
    let ckpt = setup.dir.path().join("ckpt");
    // 1,024 tokens (2 steps) of the short phase, then the long phase.
    let base = Recipe {
        short_tokens: 1024,
        ..Recipe::new("encoder", &setup.data, 1, &ckpt)
    };
    // One worker per run, gone (deregistered) before the next is submitted.
    let train = |recipe: &Recipe, log: &Path| {
        let run = submit(&setup.url, &recipe.write(setup.dir.path()));
        let mut worker = worker(&setup.url, log);
        let done = wait_completed(&setup.url, &run, &[log.to_path_buf()]);
        wait_exit(&mut worker, &[log.to_path_buf()]);
        done
    };
    let encoder = train(&base, &setup.logs[0]);
    let encoder_url = last_checkpoint_url(&encoder);

    // A decoder (CLM) from the encoder, then an encoder (MNTP) from that
    // decoder: each starts from the other's final weights, with a fresh
    // optimizer.
    let mut parent = (final_weights(&encoder), encoder_url.clone());
    for (i, (name, objective)) in [("decoder", "clm"), ("mntp", "mntp")]
        .into_iter()
        .enumerate()
    {
        let init = format!("init_from = \"{}\"", parent.1);
        let recipe = Recipe {
            name,
            objective,
            extra: &init,
            ..base
        };
        let child = train(&recipe, &setup.logs[1 + i]);
        let first = first_checkpoint(&child);
        assert_eq!(
            first.optimizer.step, first.state.info.step,
            "{name}: a fresh optimizer has taken only this run's steps"
        );
        let early: BTreeMap<String, Vec<f32>> =
            first.model.into_iter().map(|(n, _, v)| (n, v)).collect();
        // Two warm-up steps move a weight by about the LR (3e-3) at most;
        // a random start would be ~0.02 away from the parent.
        let moved = max_difference(&early, &parent.0);
        assert!(
            moved < 1e-2,
            "{name} moved {moved} from its parent's weights"
        );
        parent = (final_weights(&child), last_checkpoint_url(&child));
    }

    // Refused, naming what is wrong: a checkpoint without its COMMITTED
    // marker, and one whose shapes do not fit the model.
    let uncommitted = setup.dir.path().join("uncommitted");
    std::fs::create_dir(&uncommitted).expect("mkdir");
    let committed_dir = PathBuf::from(encoder_url.trim_start_matches("file://"));
    for file in ["model.safetensors", "optimizer.safetensors", "state.json"] {
        std::fs::copy(committed_dir.join(file), uncommitted.join(file)).expect("copy");
    }
    let wider = setup.dir.path().join("wider.toml");
    let tiny = std::fs::read_to_string(repo().join("configs/models/tiny.toml")).expect("tiny");
    std::fs::write(
        &wider,
        tiny.replace("intermediate_size = 96", "intermediate_size = 128"),
    )
    .expect("model file");
    let wider = wider.display().to_string();
    let cases = [
        (
            "uncommitted",
            "tiny",
            format!(
                "init_from = \"file://{}\"\nmax_restarts = 0",
                uncommitted.display()
            ),
            "not committed".to_string(),
        ),
        (
            "misshapen",
            wider.as_str(),
            format!("init_from = \"{encoder_url}\"\nmax_restarts = 0"),
            "does not match".to_string(),
        ),
    ];
    for (i, (name, model, extra, expected)) in cases.iter().enumerate() {
        let recipe = Recipe {
            name,
            model,
            extra,
            ..base
        };
        let run = submit(&setup.url, &recipe.write(setup.dir.path()));
        let mut worker = worker(&setup.url, &setup.logs[3 + i]);
        let failed = wait_for(&setup.url, &run, &setup.logs, "the run did not fail", |s| {
            s["state"] == "failed"
        });
        wait_exit(&mut worker, &setup.logs);
        let message = failed["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("init_from") && message.contains(expected.as_str()),
            "{name}: {message}"
        );
    }
}
