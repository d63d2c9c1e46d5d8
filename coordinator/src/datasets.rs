//! Dataset builds as jobs: a build walks dataprep's steps (plan, scan,
//! prepare, tokenize, phases, finalize); each step's tasks are handed to
//! whichever dataprep process asks, under a lease, and the next step starts
//! when every task of the current one is done.
//!
//! This module is the builds' state and its rules; the coordinator's
//! dataset methods are in `lib.rs` and the tonic services in `service.rs`.
//!
//! Only what a restart must keep is persisted: the build's record with its
//! step and finished tasks. Leases live in memory; after a restart the
//! tasks in flight are handed out again, which is safe because a task whose
//! result is already stored finds it and does nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use twinhead_proto::build_tasks::{Task, check_parts, steps};
use twinhead_proto::dataset::DatasetConfig;
use twinhead_proto::v1::{
    BuildDatasetRequest, CompleteTaskRequest, DataprepStep, DataprepTask, Dataset, DatasetState,
    FailTaskRequest,
};

use crate::Error;
use crate::store::{Snapshot, Write};

/// A task lost (lease lapsed) or failed retryably this many times fails
/// its build.
pub const MAX_TASK_ATTEMPTS: u32 = 3;

struct Lease {
    process: String,
    expires: Instant,
}

struct Build {
    seq: u64,
    record: Dataset,
    /// Tasks handed out and not yet finished.
    leases: HashMap<String, Lease>,
    /// Lost or retryably failed tries per task.
    attempts: HashMap<String, u32>,
}

impl Build {
    fn building(&self) -> bool {
        self.record.state == DatasetState::Building as i32
    }

    /// Keys of the current step's tasks.
    fn step_tasks(&self) -> Vec<String> {
        let parts: Vec<usize> = self
            .record
            .parts_per_source
            .iter()
            .map(|&n| n as usize)
            .collect();
        let all = steps(&parts, self.record.phases as usize);
        let index = (self.record.step as usize).saturating_sub(1);
        all.get(index)
            .map(|tasks| tasks.iter().map(Task::key).collect())
            .unwrap_or_default()
    }

    /// Whether `key` is leased to a process other than `process`.
    fn leased_to_another(&self, key: &str, process: &str) -> bool {
        self.leases
            .get(key)
            .is_some_and(|lease| lease.process != process)
    }

    fn is_current(&self, key: &str) -> bool {
        self.building()
            && !self.record.done_tasks.iter().any(|k| k == key)
            && self.step_tasks().iter().any(|k| k == key)
    }

    /// Moves to the next step with any tasks, or completes the build after
    /// the last one.
    fn advance(&mut self, now_ms: i64) {
        loop {
            let next = self.record.step + 1;
            if next > DataprepStep::Finalize as i32 {
                self.finish(DatasetState::Complete, String::new(), now_ms);
                return;
            }
            self.record.step = next;
            self.record.done_tasks.clear();
            self.leases.clear();
            self.attempts.clear();
            let tasks = self.step_tasks().len() as u32;
            self.record.step_tasks = tasks;
            self.record.step_tasks_done = 0;
            if tasks > 0 {
                return;
            }
        }
    }

    fn finish(&mut self, state: DatasetState, error: String, now_ms: i64) {
        self.record.state = state as i32;
        self.record.error = error;
        self.record.finished_ms = now_ms;
        self.leases.clear();
    }

    /// Counts one lost or failed try; too many fail the build.
    fn count_attempt(&mut self, key: &str, why: &str, now_ms: i64) {
        let n = self.attempts.entry(key.to_string()).or_insert(0);
        *n += 1;
        if *n >= MAX_TASK_ATTEMPTS {
            let error = format!("task {key} failed {n} times; last: {why}");
            self.finish(DatasetState::Failed, error, now_ms);
        }
    }
}

/// Every dataset build, oldest first.
pub(crate) struct Builds {
    builds: BTreeMap<u64, Build>,
    next_seq: u64,
    /// A task is handed out again when its process has not renewed it for
    /// this long (the workers' lease timeout).
    lease: Duration,
}

impl Builds {
    pub fn load(snapshot: &Snapshot, lease: Duration) -> Builds {
        let mut builds = Builds {
            builds: BTreeMap::new(),
            next_seq: 1,
            lease,
        };
        for (seq, record) in &snapshot.datasets {
            builds.next_seq = builds.next_seq.max(seq + 1);
            builds.builds.insert(
                *seq,
                Build {
                    seq: *seq,
                    record: record.clone(),
                    leases: HashMap::new(),
                    attempts: HashMap::new(),
                },
            );
        }
        builds
    }

    fn find(&self, id: &str) -> Result<&Build, Error> {
        self.builds
            .values()
            .find(|b| b.record.id == id)
            .ok_or_else(|| Error::NotFound(format!("dataset build {id:?} does not exist")))
    }

    /// The build whose task `key` a process reports on, if that task is
    /// still current (not finished by another process, not from an older
    /// step): a stale report is ignored, its result is on storage either way.
    fn current_task(&mut self, id: &str, key: &str) -> Result<Option<&mut Build>, Error> {
        let build = self.find_mut(id)?;
        Ok(build.is_current(key).then_some(build))
    }

    fn find_mut(&mut self, id: &str) -> Result<&mut Build, Error> {
        self.builds
            .values_mut()
            .find(|b| b.record.id == id)
            .ok_or_else(|| Error::NotFound(format!("dataset build {id:?} does not exist")))
    }

    fn write(build: &mut Build, now_ms: i64, writes: &mut Vec<Write>) {
        build.record.updated_ms = now_ms;
        writes.push(Write::Dataset {
            seq: build.seq,
            record: Box::new(build.record.clone()),
        });
    }

    /// Validates the config and queues a build, or returns the existing
    /// build of the same config into the same location unless it failed.
    pub fn submit(
        &mut self,
        request: BuildDatasetRequest,
        now_ms: i64,
        writes: &mut Vec<Write>,
    ) -> Result<Dataset, Error> {
        if request.out_url.trim().is_empty() {
            return Err(Error::InvalidArgument("out_url: is required".into()));
        }
        if request.config_path.trim().is_empty() {
            return Err(Error::InvalidArgument("config_path: is required".into()));
        }
        let cfg = DatasetConfig::parse(Path::new(&request.config_path), &request.config_text)
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        let out_url = request.out_url.trim_end_matches('/').to_string();
        if let Some(existing) = self.builds.values().find(|b| {
            b.record.config_sha256 == cfg.sha256
                && b.record.out_url == out_url
                && b.record.state != DatasetState::Failed as i32
        }) {
            return Ok(existing.record.clone());
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut build = Build {
            seq,
            record: Dataset {
                id: format!("ds-{seq:06}"),
                name: cfg.name.clone(),
                config_path: request.config_path,
                config_text: request.config_text,
                config_sha256: cfg.sha256.clone(),
                url: format!("{out_url}/{}", cfg.name),
                out_url,
                state: DatasetState::Building as i32,
                step: DataprepStep::Unspecified as i32,
                phases: cfg.phases.len() as u32,
                sources: cfg.sources.len() as u32,
                created_ms: now_ms,
                ..Dataset::default()
            },
            leases: HashMap::new(),
            attempts: HashMap::new(),
        };
        build.advance(now_ms);
        Self::write(&mut build, now_ms, writes);
        let record = build.record.clone();
        self.builds.insert(seq, build);
        Ok(record)
    }

    pub fn get(&self, id: &str) -> Result<Dataset, Error> {
        self.find(id).map(|b| b.record.clone())
    }

    pub fn list(&self) -> Vec<Dataset> {
        self.builds.values().map(|b| b.record.clone()).collect()
    }

    /// The first unleased task of the oldest build that has one.
    pub fn claim(&mut self, process: &str, now: Instant) -> Option<DataprepTask> {
        for build in self.builds.values_mut().filter(|b| b.building()) {
            let free = build.step_tasks().into_iter().find(|key| {
                !build.record.done_tasks.contains(key) && !build.leases.contains_key(key)
            });
            if let Some(key) = free {
                build.leases.insert(
                    key.clone(),
                    Lease {
                        process: process.to_string(),
                        expires: now + self.lease,
                    },
                );
                return Some(DataprepTask {
                    dataset_id: build.record.id.clone(),
                    key,
                    config_path: build.record.config_path.clone(),
                    config_text: build.record.config_text.clone(),
                    out_url: build.record.out_url.clone(),
                    lease_ms: u32::try_from(self.lease.as_millis()).unwrap_or(u32::MAX),
                });
            }
        }
        None
    }

    /// Extends a task's lease; `false` when the task is no longer wanted.
    pub fn renew(
        &mut self,
        id: &str,
        key: &str,
        process: &str,
        now: Instant,
    ) -> Result<bool, Error> {
        let lease = self.lease;
        let Some(build) = self.current_task(id, key)? else {
            return Ok(false);
        };
        if build.leased_to_another(key, process) {
            // Its lease lapsed (the process hung) and the task went to
            // another process: that one keeps it.
            return Ok(false);
        }
        build.leases.insert(
            key.to_string(),
            Lease {
                process: process.to_string(),
                expires: now + lease,
            },
        );
        Ok(true)
    }

    /// Records a finished task. A task that is not current (finished by
    /// another process, or from an older step) is ignored: its result is
    /// on storage either way.
    pub fn complete(
        &mut self,
        request: &CompleteTaskRequest,
        now_ms: i64,
        writes: &mut Vec<Write>,
    ) -> Result<(), Error> {
        let Some(build) = self.current_task(&request.dataset_id, &request.key)? else {
            return Ok(());
        };
        let task = Task::from_key(&request.key).ok_or_else(|| {
            Error::InvalidArgument(format!("key: {:?} is not a task", request.key))
        })?;
        // The config was parsed once, at submit; 0 is a record from before
        // the count was stored, whose plan is taken as reported.
        let sources = build.record.sources as usize;
        if task == Task::Plan
            && !request.already_complete
            && sources > 0
            && request.parts_per_source.len() != sources
        {
            return Err(Error::InvalidArgument(format!(
                "parts_per_source: {} sources reported, the config has {sources}",
                request.parts_per_source.len()
            )));
        }
        if task == Task::Plan && !request.already_complete {
            check_parts(request.parts_per_source.iter().map(|&n| u64::from(n)))
                .map_err(Error::InvalidArgument)?;
        }
        build.leases.remove(&request.key);
        build.record.done_tasks.push(request.key.clone());
        build.record.step_tasks_done += 1;
        if !build.record.processes.contains(&request.process) {
            build.record.processes.push(request.process.clone());
        }
        match task {
            Task::Plan if request.already_complete => {
                build.record.tokens = request.tokens;
                build.finish(DatasetState::Complete, String::new(), now_ms);
            }
            Task::Plan => {
                build.record.parts_per_source = request.parts_per_source.clone();
                build.advance(now_ms);
            }
            Task::Finalize => {
                build.record.tokens = request.tokens;
                build.advance(now_ms);
            }
            _ if build.record.step_tasks_done >= build.record.step_tasks => build.advance(now_ms),
            _ => {}
        }
        Self::write(build, now_ms, writes);
        Ok(())
    }

    /// A task failed: bad input fails the build; a retryable failure puts
    /// the task back (up to [`MAX_TASK_ATTEMPTS`] tries).
    pub fn fail(
        &mut self,
        request: &FailTaskRequest,
        now_ms: i64,
        writes: &mut Vec<Write>,
    ) -> Result<(), Error> {
        let Some(build) = self.current_task(&request.dataset_id, &request.key)? else {
            return Ok(());
        };
        if build.leased_to_another(&request.key, &request.process) {
            // A process whose lease lapsed while it hung reports on a task
            // another process now holds: its failure (often the other's
            // work moving files under it) says nothing about the input.
            tracing::warn!(task = %request.key, process = %request.process, error = %request.error, "failure from a process that no longer holds the task; ignored");
            return Ok(());
        }
        build.leases.remove(&request.key);
        let why = format!("{} (on {})", request.error, request.process);
        if request.retry {
            build.count_attempt(&request.key, &why, now_ms);
        } else {
            let error = format!("task {}: {why}", request.key);
            build.finish(DatasetState::Failed, error, now_ms);
        }
        Self::write(build, now_ms, writes);
        Ok(())
    }

    /// Takes back tasks whose process stopped renewing them.
    pub fn expire(&mut self, now: Instant, now_ms: i64, writes: &mut Vec<Write>) {
        for build in self.builds.values_mut().filter(|b| b.building()) {
            let lapsed: Vec<(String, String)> = build
                .leases
                .iter()
                .filter(|(_, l)| l.expires <= now)
                .map(|(k, l)| (k.clone(), l.process.clone()))
                .collect();
            if lapsed.is_empty() {
                continue;
            }
            for (key, process) in lapsed {
                build.leases.remove(&key);
                tracing::warn!(dataset = %build.record.id, task = %key, %process, "task lease lapsed; handing it out again");
                build.count_attempt(
                    &key,
                    &format!("{process} stopped renewing its lease"),
                    now_ms,
                );
            }
            Self::write(build, now_ms, writes);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
name = "t"
[tokenizer]
train = { vocab_size = 300 }
[[sources]]
name = "a"
input = "a/*.txt"
format = "text"
[[sources]]
name = "b"
input = "b/*.txt"
format = "text"
[[phases]]
name = "p"
seq_len = 16
tokens = 1000
seed = 1
[phases.weights]
a = 1.0
b = 1.0
"#;

    const LEASE: Duration = Duration::from_secs(5);

    fn builds() -> Builds {
        Builds::load(&Snapshot::default(), LEASE)
    }

    /// Submits the test config; the build and how many writes it made.
    fn submit(b: &mut Builds) -> (Dataset, usize) {
        let mut writes = Vec::new();
        let d = b
            .submit(
                BuildDatasetRequest {
                    config_path: "/cfg/t.toml".into(),
                    config_text: CONFIG.into(),
                    out_url: "/out/".into(),
                },
                1,
                &mut writes,
            )
            .unwrap();
        (d, writes.len())
    }

    fn complete(b: &mut Builds, id: &str, key: &str, parts: Vec<u32>) {
        let r = CompleteTaskRequest {
            dataset_id: id.into(),
            key: key.into(),
            process: "p1".into(),
            parts_per_source: parts,
            ..Default::default()
        };
        b.complete(&r, 2, &mut Vec::new()).unwrap();
    }

    fn claim_all(b: &mut Builds) -> Vec<String> {
        let now = Instant::now();
        std::iter::from_fn(|| b.claim("p1", now).map(|t| t.key)).collect()
    }

    #[test]
    fn a_build_walks_every_step_in_order() {
        let mut b = builds();
        let (d, writes) = submit(&mut b);
        assert_eq!(writes, 1, "a new build is persisted");
        assert_eq!((d.id.as_str(), d.url.as_str()), ("ds-000001", "/out/t"));
        assert_eq!(claim_all(&mut b), ["plan"]);
        // A plan for the wrong number of sources is refused and changes nothing.
        let wrong = CompleteTaskRequest {
            dataset_id: d.id.clone(),
            key: "plan".into(),
            process: "p1".into(),
            parts_per_source: vec![2],
            ..Default::default()
        };
        assert!(matches!(
            b.complete(&wrong, 2, &mut Vec::new()),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(b.get(&d.id).unwrap().step_tasks_done, 0);
        complete(&mut b, &d.id, "plan", vec![2, 0]);
        // Scan step: two parts of source a, none of b; nothing else yet.
        assert_eq!(claim_all(&mut b), ["scan/0/0", "scan/0/1"]);
        complete(&mut b, &d.id, "scan/0/1", vec![]);
        assert_eq!(b.get(&d.id).unwrap().step, DataprepStep::Scan as i32);
        complete(&mut b, &d.id, "scan/0/1", vec![]);
        assert_eq!(
            b.get(&d.id).unwrap().step_tasks_done,
            1,
            "a repeat counts once"
        );
        complete(&mut b, &d.id, "scan/0/0", vec![]);
        assert_eq!(claim_all(&mut b), ["prepare"]);
        complete(&mut b, &d.id, "prepare", vec![]);
        assert_eq!(claim_all(&mut b), ["tokenize/0/0", "tokenize/0/1"]);
        complete(&mut b, &d.id, "tokenize/0/0", vec![]);
        complete(&mut b, &d.id, "tokenize/0/1", vec![]);
        assert_eq!(claim_all(&mut b), ["phase/0"]);
        complete(&mut b, &d.id, "phase/0", vec![]);
        assert_eq!(claim_all(&mut b), ["finalize"]);
        complete(&mut b, &d.id, "finalize", vec![]);
        let done = b.get(&d.id).unwrap();
        assert_eq!(done.state, DatasetState::Complete as i32);
        assert!(claim_all(&mut b).is_empty());
        // Same config and location: the same build comes back.
        assert_eq!(submit(&mut b), (done, 0));
    }

    #[test]
    fn lost_and_failed_tasks() {
        let mut b = builds();
        let (d, _) = submit(&mut b);
        let t0 = Instant::now();
        assert!(b.claim("p1", t0).is_some());
        assert!(b.claim("p2", t0).is_none(), "plan is leased");
        // The lease lapses: the task is handed out again.
        b.expire(t0 + LEASE, 5, &mut Vec::new());
        assert_eq!(b.claim("p2", t0 + LEASE).unwrap().key, "plan");
        // A renewed lease does not lapse.
        assert!(b.renew(&d.id, "plan", "p2", t0 + LEASE * 2).unwrap());
        b.expire(t0 + LEASE * 2, 6, &mut Vec::new());
        assert!(b.claim("p3", t0 + LEASE * 2).is_none());
        // Bad input fails the build with the process's message.
        let f = FailTaskRequest {
            dataset_id: d.id.clone(),
            key: "plan".into(),
            process: "p2".into(),
            error: "source \"a\": input a/*.txt: matches no file".into(),
            retry: false,
        };
        b.fail(&f, 7, &mut Vec::new()).unwrap();
        let failed = b.get(&d.id).unwrap();
        assert_eq!(failed.state, DatasetState::Failed as i32);
        assert!(failed.error.contains("matches no file"), "{}", failed.error);
        assert!(!b.renew(&d.id, "plan", "p2", t0).unwrap());
        // A failed build is not returned for a new request.
        assert_ne!(submit(&mut b).0.id, d.id);
    }

    #[test]
    fn a_process_that_hung_past_its_lease_cannot_take_back_or_fail_the_task() {
        let mut b = builds();
        let (d, _) = submit(&mut b);
        let t0 = Instant::now();
        assert!(b.claim("hung", t0).is_some());
        // It stops renewing; the task goes to another process.
        b.expire(t0 + LEASE, 5, &mut Vec::new());
        assert_eq!(b.claim("live", t0 + LEASE).unwrap().key, "plan");
        // Continued, the hung one renews and reports a failure: neither
        // takes the task from the live one nor ends the build.
        assert!(!b.renew(&d.id, "plan", "hung", t0 + LEASE).unwrap());
        let stale = FailTaskRequest {
            dataset_id: d.id.clone(),
            key: "plan".into(),
            process: "hung".into(),
            error: "the source's plan is missing".into(),
            retry: false,
        };
        b.fail(&stale, 6, &mut Vec::new()).unwrap();
        assert_eq!(b.get(&d.id).unwrap().state, DatasetState::Building as i32);
        assert!(b.renew(&d.id, "plan", "live", t0 + LEASE).unwrap());
        // With nobody holding the task (a restarted coordinator forgets
        // leases), its process's renewal and report are taken.
        b.expire(t0 + LEASE * 3, 7, &mut Vec::new());
        assert!(b.renew(&d.id, "plan", "live", t0 + LEASE * 3).unwrap());
    }

    #[test]
    fn retried_failures_give_up_after_max_attempts() {
        let mut b = builds();
        let (d, _) = submit(&mut b);
        for i in 0..MAX_TASK_ATTEMPTS {
            assert_eq!(
                b.get(&d.id).unwrap().state,
                DatasetState::Building as i32,
                "try {i}"
            );
            assert!(b.claim("p", Instant::now()).is_some());
            let f = FailTaskRequest {
                dataset_id: d.id.clone(),
                key: "plan".into(),
                process: "p".into(),
                error: "storage timeout".into(),
                retry: true,
            };
            b.fail(&f, 1, &mut Vec::new()).unwrap();
        }
        assert_eq!(b.get(&d.id).unwrap().state, DatasetState::Failed as i32);
    }

    #[test]
    fn bad_configs_are_refused_naming_the_key() {
        let mut b = builds();
        let e = b
            .submit(
                BuildDatasetRequest {
                    config_path: "/cfg/t.toml".into(),
                    config_text: CONFIG.replace("seq_len = 16", "seq_len = 0"),
                    out_url: "/out".into(),
                },
                1,
                &mut Vec::new(),
            )
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)));
        assert!(e.to_string().contains("seq_len"), "{e}");
    }
}
