//! The Slurm deploy files on a real Slurm: a single-node cluster started
//! for the test (munged, slurmctld and slurmd on this machine, its CPUs as
//! the node's), `configs/deploy/dataprep.sbatch` building a dataset through
//! a coordinator process, and `configs/deploy/twinhead.sbatch` with CPU
//! workers joining a run, checkpointing and leaving at a time-limit
//! warning, requeued, resuming from that checkpoint and finishing the run.
//!
//! Needs root and Debian's `slurm-wlm` and `munge` (`.ci/run` installs them
//! where it can); without them the test reports itself skipped.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{CoordinatorProcess, fixture_data_config, json, repo_root, tree, twinhead};

/// The coordinator's worker token, which the jobs get from the environment.
const TOKEN: &str = "slurm-worker-token";

/// What Slurm needs that this machine lacks, if anything.
fn missing() -> Option<String> {
    let uid = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if uid != Some(0) {
        return Some("the single-node Slurm runs its daemons as root".into());
    }
    let absent: Vec<&str> = [
        "munged",
        "slurmctld",
        "slurmd",
        "sbatch",
        "scontrol",
        "scancel",
        "squeue",
        "sinfo",
    ]
    .into_iter()
    .filter(|p| program(p).is_none())
    .collect();
    if !absent.is_empty() {
        return Some(format!(
            "{} not found (apt-get install slurm-wlm munge)",
            absent.join(", ")
        ));
    }
    if cpus() < 2 {
        return Some("the worker job needs two CPUs".into());
    }
    None
}

/// A program on PATH or in an sbin folder (where Debian puts the daemons).
fn program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Polls `ready` every 200 ms for up to `limit`; panics with `context()`
/// (logs) naming `what` if it never holds.
fn wait_until<T>(
    what: &str,
    limit: Duration,
    context: impl Fn() -> String,
    mut ready: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = ready() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}\n{}", context());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A single-node Slurm in a temporary folder: munged with its own key and
/// socket, slurmctld and slurmd on free ports, node `localhost` with this
/// machine's CPUs. Dropping it cancels the jobs it ran, waits for them to
/// end, and stops the daemons.
struct Slurm {
    conf: PathBuf,
    /// munged, slurmctld, slurmd, in start order.
    daemons: Vec<Child>,
    jobs: Vec<String>,
    dir: tempfile::TempDir,
}

impl Slurm {
    fn start() -> Slurm {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        for sub in ["munge", "state", "spool", "log", "jobs"] {
            std::fs::create_dir_all(root.join(sub)).expect("slurm folders");
        }
        let mut slurm = Slurm {
            conf: root.join("slurm.conf"),
            daemons: Vec::new(),
            jobs: Vec::new(),
            dir,
        };

        // munged refuses a key others can read.
        let key = root.join("munge/munge.key");
        let mut bytes = vec![0; 1024];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
            .expect("random munge key");
        std::fs::write(&key, &bytes).expect("munge key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).expect("key mode");
        let socket = root.join("munge/socket");
        let munged = Command::new(program("munged").expect("munged"))
            .arg("--foreground")
            // As root, munged wants --force.
            .arg("--force")
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--key-file={}", key.display()))
            .arg(format!(
                "--log-file={}",
                root.join("log/munged.log").display()
            ))
            .arg(format!(
                "--pid-file={}",
                root.join("munge/munged.pid").display()
            ))
            .arg(format!("--seed-file={}", root.join("munge/seed").display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(root.join("log/munged.err")).expect("log"))
            .spawn()
            .expect("start munged");
        slurm.daemons.push(munged);
        wait_until(
            "munged never made its socket",
            Duration::from_secs(10),
            || slurm.dump(),
            || socket.exists().then_some(()),
        );

        // No systemd or cgroups: Linux process tracking, no task plugin, no
        // accounting. A requeued job waits for its credential to expire
        // (cred_expire, 120 s by default) and for the scheduler's next
        // pass (60 s by default): 5 s and 1 s here.
        let conf = format!(
            "ClusterName=twinhead-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket},cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MailProg=/bin/true
KillWait=5
SchedulerParameters=sched_interval=1
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=twinhead Nodes=localhost Default=YES MaxTime=INFINITE State=UP
",
            ctld_port = free_port(),
            slurmd_port = free_port(),
            socket = socket.display(),
            root = root.display(),
            cpus = cpus(),
        );
        std::fs::write(&slurm.conf, conf).expect("slurm.conf");
        std::fs::write(root.join("plugstack.conf"), "").expect("plugstack.conf");
        for (daemon, args) in [
            ("slurmctld", &["-D", "-i"][..]),
            ("slurmd", &["-D", "-N", "localhost"][..]),
        ] {
            let child = slurm
                .command(daemon)
                .args(args)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(root.join(format!("log/{daemon}.err"))).expect("log"))
                .spawn()
                .unwrap_or_else(|e| panic!("start {daemon}: {e}"));
            slurm.daemons.push(child);
        }
        wait_until(
            "the node never came up idle",
            Duration::from_secs(30),
            || slurm.dump(),
            || {
                let out = slurm.run("sinfo", &["-h", "-n", "localhost", "-o", "%T"]);
                (out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "idle")
                    .then_some(())
            },
        );
        slurm
    }

    /// A Slurm program (client or daemon) pointed at this cluster.
    fn command(&self, name: &str) -> Command {
        let mut command = Command::new(program(name).unwrap_or_else(|| PathBuf::from(name)));
        command.env("SLURM_CONF", &self.conf);
        command
    }

    fn run(&self, name: &str, args: &[&str]) -> Output {
        self.command(name)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {name}: {e}"))
    }

    /// The folder jobs run in (`--chdir`), where their output files go.
    fn jobs_dir(&self) -> PathBuf {
        self.dir.path().join("jobs")
    }

    /// Submits `script` (relative to the repository) with `options` and
    /// the environment `env`; returns the job id.
    fn sbatch(&mut self, options: &[&str], script: &str, env: &[(&str, &str)]) -> String {
        let out = self
            .command("sbatch")
            .arg("--parsable")
            .arg(format!("--chdir={}", self.jobs_dir().display()))
            .args(options)
            .arg(repo_root().join(script))
            .envs(env.iter().copied())
            .output()
            .expect("run sbatch");
        assert!(
            out.status.success(),
            "sbatch {script} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.dump()
        );
        let id = String::from_utf8_lossy(&out.stdout)
            .trim()
            .split(';')
            .next()
            .unwrap_or_default()
            .to_string();
        assert!(!id.is_empty(), "sbatch printed no job id");
        self.jobs.push(id.clone());
        id
    }

    /// `scontrol show job`'s fields, one map per job (array tasks are jobs
    /// of their own).
    fn show(&self, job: &str) -> Vec<BTreeMap<String, String>> {
        let out = self.run("scontrol", &["show", "job", "-o", job]);
        assert!(
            out.status.success(),
            "scontrol show job {job}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                line.split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .collect()
    }

    /// Whether any part of `job` is pending, running or completing.
    fn active(&self, job: &str) -> bool {
        let out = self.run("squeue", &["-h", "-j", job, "-o", "%i %T"]);
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    }

    /// The daemons' logs and every job's output, for failure messages.
    fn dump(&self) -> String {
        let mut files: Vec<PathBuf> = ["log", "jobs"]
            .iter()
            .filter_map(|sub| std::fs::read_dir(self.dir.path().join(sub)).ok())
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        files.sort();
        files
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(f).unwrap_or_default();
                // The tail: the daemons are chatty.
                let start = text.len().saturating_sub(6000);
                let start = (start..text.len())
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(text.len());
                format!("--- {}\n{}\n", f.display(), &text[start..])
            })
            .collect()
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        // Job steps outlive slurmd: end them first, while it can.
        if !self.jobs.is_empty() {
            let _ = self.command("scancel").args(&self.jobs).output();
            let deadline = Instant::now() + Duration::from_secs(20);
            while self.jobs.iter().any(|j| self.active(j)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        for daemon in self.daemons.iter_mut().rev() {
            let _ = daemon.kill();
            let _ = daemon.wait();
        }
    }
}

fn status(url: &str, run: &str) -> serde_json::Value {
    json(
        &twinhead()
            .args(["status", "--json", "--coordinator", url, run])
            .output()
            .expect("status"),
    )
}

/// The worker ids a job's output says registered.
fn registered(log: &str) -> BTreeSet<String> {
    log.lines()
        .filter(|l| l.contains("registered"))
        .filter_map(|l| l.split("worker=").nth(1))
        .map(|w| w.trim().to_string())
        .collect()
}

fn ids(workers: &serde_json::Value) -> BTreeSet<String> {
    workers
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w.as_str().map(str::to_string))
        .collect()
}

/// The tiny encoder on two CPU workers: 16 steps of seq 64 with no
/// checkpoint inside the phase (so one there can only come from the
/// warning), then 2 steps of seq 256.
fn recipe(dir: &Path, dataset: &str) -> PathBuf {
    let text = format!(
        r#"
name = "on-slurm"
model = "tiny"
objective = "mlm"
dataset = "{dataset}"
seed = 7
world_size = 2
global_batch = 8
micro_batch = 2
[optimizer]
peak_lr = 3e-3
[checkpoint]
root = "file://{ckpt}"
every_tokens = 0
[[phases]]
name = "short"
tokens = 8192
seq_len = 64
mask_ratio = 0.3
[[phases]]
name = "long"
tokens = 4096
seq_len = 256
mask_ratio = 0.15
"#,
        ckpt = dir.join("ckpt").display()
    );
    let path = dir.join("on-slurm.toml");
    std::fs::write(&path, text).expect("recipe");
    path
}

const SHORT_STEPS: u64 = 16;

#[test]
fn the_sbatch_files_build_a_dataset_and_train_through_a_requeue_on_a_real_slurm() {
    if let Some(reason) = missing() {
        eprintln!("skipped: {reason}");
        return;
    }
    let began = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    // Declared before the cluster, so it outlives the jobs when dropped.
    let coordinator = CoordinatorProcess::start(
        &dir.path().join("c.db"),
        &[
            "--worker-token",
            TOKEN,
            "--heartbeat-interval-ms",
            "300",
            "--lease-timeout-ms",
            "3000",
        ],
    );
    let url = coordinator.url.clone();
    let mut slurm = Slurm::start();
    eprintln!("slurm up after {:?}", began.elapsed());
    let bin = env!("CARGO_BIN_EXE_twinhead");
    let env = [
        ("TWINHEAD_COORDINATOR", url.as_str()),
        ("TWINHEAD_TOKEN", TOKEN),
        ("TWINHEAD_BIN", bin),
        ("TWINHEAD_DEVICE", "cpu"),
        ("TWINHEAD_LOG", "info"),
        ("TWINHEAD_DATAPREP_IDLE_S", "1"),
    ];

    // The dataprep array, one CPU and the node's memory per task, builds
    // the fixture dataset queued on the coordinator.
    let array = slurm.sbatch(
        &["--array=0-1", "--cpus-per-task=1", "--mem=0"],
        "configs/deploy/dataprep.sbatch",
        &env,
    );
    let config = fixture_data_config(dir.path());
    let shared = dir.path().join("shared");
    let submit_err = dir.path().join("submit.err");
    let mut submit = twinhead()
        .args([
            "dataset",
            "submit",
            "--json",
            "--coordinator",
            &url,
            "--out",
        ])
        .arg(&shared)
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&submit_err).expect("submit.err"))
        .spawn()
        .expect("dataset submit");
    wait_until(
        "the dataset build did not end",
        Duration::from_secs(120),
        || slurm.dump(),
        || submit.try_wait().expect("try_wait"),
    );
    let out = submit.wait_with_output().expect("dataset submit output");
    assert!(
        out.status.success(),
        "dataset submit failed: {}\n{}",
        std::fs::read_to_string(&submit_err).unwrap_or_default(),
        slurm.dump()
    );
    let built = json(&out);
    assert_eq!(built["state"], "complete", "{built}\n{}", slurm.dump());
    // Every process that took a task was an array task.
    let array_logs: String = (0..2)
        .map(|i| {
            let log = slurm
                .jobs_dir()
                .join(format!("twinhead-dataprep-{array}_{i}.out"));
            std::fs::read_to_string(log).unwrap_or_default()
        })
        .collect();
    let processes = built["processes"].as_array().expect("processes");
    assert!(!processes.is_empty(), "{built}");
    for p in processes {
        let p = p.as_str().expect("process name");
        assert!(
            array_logs.contains(&format!("process={p} ")),
            "{p} is not an array task\n{}",
            slurm.dump()
        );
    }
    // The bytes of a single-process build.
    let local = twinhead_dataprep::build(
        &config,
        &format!("file://{}", dir.path().join("local").display()),
        1,
        &twinhead_dataprep::NoProgress,
    )
    .expect("local build");
    let dataset = built["url"].as_str().expect("url").to_string();
    let want = tree(&dir.path().join("local/train-fixture"));
    assert!(want.contains_key("manifest.json"), "{:?}", want.keys());
    assert_eq!(
        tree(&shared.join("train-fixture")),
        want,
        "the array's build differs from {}",
        local.url
    );
    // Idle, the array tasks exit by themselves.
    wait_until(
        "the dataprep array did not end once idle",
        Duration::from_secs(60),
        || slurm.dump(),
        || (!slurm.active(&array)).then_some(()),
    );
    for task in slurm.show(&array) {
        assert_eq!(task["JobState"], "COMPLETED", "{task:?}");
        assert_eq!(task["ExitCode"], "0:0", "{task:?}");
    }
    eprintln!("dataset built by the array after {:?}", began.elapsed());

    // Two CPU workers (no GPUs) join the run.
    let run = json(
        &twinhead()
            .args(["submit", "--json", "--coordinator", &url])
            .arg(recipe(dir.path(), &dataset))
            .output()
            .expect("submit"),
    )["run_id"]
        .as_str()
        .expect("run_id")
        .to_string();
    let job = slurm.sbatch(
        &[
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            "--gpus-per-task=0",
        ],
        "configs/deploy/twinhead.sbatch",
        &env,
    );
    let job_log = slurm.jobs_dir().join(format!("twinhead-{job}.out"));
    let read_log = || std::fs::read_to_string(&job_log).unwrap_or_default();
    let context = || format!("{}\n{}", status(&url, &run), slurm.dump());
    let training = wait_until(
        "the workers did not train",
        Duration::from_secs(120),
        context,
        || {
            let s = status(&url, &run);
            (s["phases"][0]["steps_done"].as_u64().unwrap_or(0) >= 2).then_some(s)
        },
    );
    let seen = training["phases"][0]["steps_done"].as_u64().unwrap_or(0);
    assert!(seen < SHORT_STEPS, "the phase ended too soon: {training}");

    // The time-limit warning, as Slurm sends it with --signal=B:USR1@…:
    // to the batch script only.
    let warned = slurm.run("scancel", &["--batch", "--signal=USR1", &job]);
    assert!(
        warned.status.success(),
        "scancel --batch --signal=USR1: {}",
        String::from_utf8_lossy(&warned.stderr)
    );
    wait_until(
        "the job was not requeued and restarted",
        Duration::from_secs(60),
        context,
        || {
            let shown = slurm.show(&job);
            let restarted = shown.first().is_some_and(|j| {
                j.get("Restarts").map(String::as_str) == Some("1")
                    && j.get("JobState").map(String::as_str) == Some("RUNNING")
            });
            restarted.then_some(())
        },
    );
    eprintln!("job requeued and running again after {:?}", began.elapsed());
    let done = wait_until(
        "the run did not complete",
        Duration::from_secs(120),
        context,
        || {
            let s = status(&url, &run);
            assert!(
                s["state"] != "failed" && s["state"] != "cancelled",
                "{s}\n{}",
                slurm.dump()
            );
            (s["state"] == "completed").then_some(s)
        },
    );
    eprintln!("run completed after {:?}", began.elapsed());

    // The job's first start: both workers checkpointed, left with status
    // 75, and the script requeued the job; its second start's workers are
    // new ones.
    let log = read_log();
    let requeue = format!("twinhead: workers exited with status 75; requeueing job {job}");
    let (first_start, second_start) = log
        .split_once(&requeue)
        .unwrap_or_else(|| panic!("no {requeue:?}\n{}", slurm.dump()));
    assert!(first_start.contains("time limit near"), "{}", slurm.dump());
    assert_eq!(
        first_start
            .matches("worker left after checkpointing status=75")
            .count(),
        2,
        "{}",
        slurm.dump()
    );
    let attempts = done["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "one stop, one resume: {done}");
    let (first, second) = (&attempts[0], &attempts[1]);
    assert_eq!(ids(&first["workers"]), registered(first_start), "{done}");
    assert_eq!(ids(&second["workers"]), registered(second_start), "{done}");
    assert_eq!(registered(second_start).len(), 2, "{}", slurm.dump());
    assert_eq!(first["failed"].as_bool(), Some(false), "{first}");
    assert!(
        first["end_reason"]
            .as_str()
            .is_some_and(|r| r.contains("left")),
        "{first}"
    );
    // The checkpoint the warning made, inside the first phase, is where the
    // requeued job's world started.
    let stop = done["checkpoints"]
        .as_array()
        .expect("checkpoints")
        .iter()
        .find(|c| c["world_id"] == first["world_id"])
        .unwrap_or_else(|| panic!("no checkpoint from the warning: {done}"));
    let stopped_at = stop["step"].as_u64().unwrap_or(0);
    assert_eq!(stop["phase_index"], 0, "{stop}");
    assert!(
        (seen..SHORT_STEPS).contains(&stopped_at),
        "stopped at {stopped_at}, saw {seen}"
    );
    assert_eq!(second["start_checkpoint"]["url"], stop["url"], "{done}");
    assert_eq!(done["phases"][1]["tokens_done"], 4096, "{done}");

    // Cancelled from outside, the job ends and is not requeued again.
    let cancelled = slurm.run("scancel", &[&job]);
    assert!(cancelled.status.success(), "scancel");
    wait_until(
        "the cancelled job did not end",
        Duration::from_secs(30),
        || slurm.dump(),
        || (!slurm.active(&job)).then_some(()),
    );
    let end = slurm.show(&job);
    assert_eq!(end[0]["JobState"], "CANCELLED", "{end:?}");
    assert_eq!(end[0]["Restarts"], "1", "{end:?}");
    eprintln!("done after {:?}", began.elapsed());
    drop(slurm);
    drop(coordinator);
}
