//! The coordinator's state and every change to it.
//!
//! Each operation validates first and mutates second, recording in
//! [`Effects`] what must be persisted and which run events to publish; the
//! caller ([`crate::Coordinator`]) commits the writes before it answers.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use twinhead_proto::v1::{
    Assignment, Attempt, Checkpoint, CheckpointEvalState, PhaseProgress, ReportEvalRequest,
    ReportFailureRequest, ReportProgressRequest, Run, RunEvent, RunEventKind, RunSpec, RunState,
    WorkerAction,
};
use twinhead_proto::{num_steps, validate_run_spec};

use crate::Error;
use crate::scheduler::{self, WaitingRun};

mod checkpoint_evals;
use crate::store::{ProgressRow, Snapshot, WorkerRow, WorkerStatus, Write};

/// The longest wait before a run whose worlds keep failing is re-formed.
const MAX_RETRY_DELAY_MS: i64 = 60_000;

/// The longest rendezvous token a world may publish.
pub const MAX_RENDEZVOUS_TOKEN: usize = 4096;

pub(crate) struct RunEntry {
    pub seq: u64,
    pub run: Run,
}

pub(crate) struct WorkerEntry {
    pub row: WorkerRow,
    pub last_seen: Instant,
    /// (world id, rank) while the worker belongs to a live world.
    pub world: Option<(String, u32)>,
    /// (run id, eval id) while it scores a checkpoint's tasks.
    pub job: Option<(String, String)>,
    /// A world that failed while this worker was in it, until the worker
    /// asks for its next assignment (it has left that world). Worlds wait
    /// for such workers for [`DRAIN_GRACE_MS`], then form without them: a
    /// worker whose step hangs (a deadlock, a stuck device) stays out of
    /// new worlds, which it would only make fail at their rendezvous.
    pub draining: Option<Draining>,
}

/// How long worlds wait, after a failure, for its members to ask for work
/// before forming without the ones that have not.
pub(crate) const DRAIN_GRACE_MS: i64 = 10_000;

#[derive(Debug, Clone)]
pub(crate) struct Draining {
    pub world_id: String,
    pub since_ms: i64,
    /// Past the grace: worlds no longer wait for it.
    pub given_up: bool,
}

/// A worker as monitoring sees it.
#[derive(Debug, Clone)]
pub(crate) struct WorkerView {
    pub row: WorkerRow,
    /// Since its last heartbeat (or since this coordinator started).
    pub heartbeat_age: Duration,
    /// Its world while it belongs to a live one.
    pub placement: Option<Placement>,
    /// (run id, eval id) while it scores a checkpoint's tasks.
    pub job: Option<(String, String)>,
}

#[derive(Debug, Clone)]
pub(crate) struct Placement {
    pub run_id: String,
    pub world_id: String,
    pub rank: u32,
    pub world_size: u32,
}

/// What an operation changed: rows to write and events to publish.
#[derive(Default)]
pub(crate) struct Effects {
    dirty_runs: BTreeSet<String>,
    writes: Vec<Write>,
    events: Vec<(String, RunEventKind, String)>,
}

impl Effects {
    fn run(&mut self, run_id: &str) {
        self.dirty_runs.insert(run_id.to_string());
    }

    fn event(&mut self, run_id: &str, kind: RunEventKind, message: impl Into<String>) {
        self.dirty_runs.insert(run_id.to_string());
        self.events.push((run_id.to_string(), kind, message.into()));
    }
}

/// An operation's outcome for the caller to carry out: commit the writes,
/// then wake the reassigned workers' long-polls and publish the events.
pub(crate) struct Finished {
    pub writes: Vec<Write>,
    pub events: Vec<RunEvent>,
    /// Workers whose assignment may have changed: an assignment comes from
    /// the worker's run (its world, phase or checkpoint evaluation) or its
    /// own record, so the members and scorers of every changed run and
    /// every worker whose record was written.
    pub reassigned: Vec<String>,
}

pub(crate) struct State {
    runs: HashMap<String, RunEntry>,
    workers: HashMap<String, WorkerEntry>,
    /// Every world ever formed, to its run.
    worlds: HashMap<String, String>,
    next_run: u64,
    next_worker: u64,
    next_world: u64,
}

fn active(run: &Run) -> Option<&Attempt> {
    run.attempts.last().filter(|a| a.ended_ms == 0)
}

fn active_mut(run: &mut Run) -> Option<&mut Attempt> {
    run.attempts.last_mut().filter(|a| a.ended_ms == 0)
}

/// A worker's `what` (a report, a checkpoint) must be for the run's current
/// phase and within its step budget, which is returned.
fn check_in_phase(
    run: &Run,
    what: &str,
    step_field: &str,
    phase_index: u32,
    step: u64,
) -> Result<u64, Error> {
    if phase_index != run.phase_index {
        return Err(Error::FailedPrecondition(format!(
            "run {} is in phase {}, the {what} is for phase {phase_index}",
            run.id, run.phase_index
        )));
    }
    let budget = run
        .phases
        .get(run.phase_index as usize)
        .map_or(0, |p| p.num_steps);
    if step > budget {
        return Err(Error::InvalidArgument(format!(
            "{step_field}: {step} is past the phase's {budget} steps"
        )));
    }
    Ok(budget)
}

fn is_terminal(run: &Run) -> bool {
    matches!(
        RunState::try_from(run.state),
        Ok(RunState::Completed | RunState::Failed | RunState::Cancelled)
    )
}

impl State {
    /// Rebuilds state from the store. Live workers get a fresh lease: while
    /// the coordinator was down they could not renew theirs.
    pub fn load(snapshot: Snapshot, now: Instant) -> State {
        let counter = |name: &str| {
            snapshot
                .counters
                .iter()
                .find(|(n, _)| n == name)
                .map_or(1, |(_, v)| *v)
        };
        let mut state = State {
            runs: HashMap::new(),
            workers: HashMap::new(),
            worlds: HashMap::new(),
            next_run: counter("next_run"),
            next_worker: counter("next_worker"),
            next_world: counter("next_world"),
        };
        for row in snapshot.workers {
            state.workers.insert(
                row.id.clone(),
                WorkerEntry {
                    row,
                    last_seen: now,
                    world: None,
                    job: None,
                    draining: None,
                },
            );
        }
        for (seq, run) in snapshot.runs {
            for attempt in &run.attempts {
                state
                    .worlds
                    .insert(attempt.world_id.clone(), run.id.clone());
            }
            if let Some(attempt) = active(&run) {
                for (rank, worker) in attempt.workers.iter().enumerate() {
                    if let Some(entry) = state.workers.get_mut(worker) {
                        entry.world = Some((attempt.world_id.clone(), rank as u32));
                    }
                }
            }
            state.runs.insert(run.id.clone(), RunEntry { seq, run });
        }
        // Checkpoint evaluations in progress stay with their live workers;
        // those of workers gone while the coordinator was down wait again.
        for entry in state.runs.values_mut() {
            for job in &mut entry.run.checkpoint_evals {
                if job.state != CheckpointEvalState::Running as i32 {
                    continue;
                }
                match state.workers.get_mut(&job.worker_id) {
                    Some(w) if w.row.status == WorkerStatus::Alive => {
                        w.job = Some((entry.run.id.clone(), job.id.clone()));
                    }
                    _ => job.state = CheckpointEvalState::Pending as i32,
                }
            }
        }
        state
    }

    /// Turns effects into store writes, run events and the workers to wake,
    /// stamping changed runs.
    pub fn finish(&mut self, effects: Effects, now_ms: i64) -> Finished {
        let mut writes = effects.writes;
        let mut reassigned: BTreeSet<String> = writes
            .iter()
            .filter_map(|w| match w {
                Write::Worker(row) => Some(row.id.clone()),
                _ => None,
            })
            .collect();
        for run in effects
            .dirty_runs
            .iter()
            .filter_map(|id| self.runs.get(id))
            .map(|e| &e.run)
        {
            reassigned.extend(
                active(run)
                    .into_iter()
                    .flat_map(|a| a.workers.iter().cloned()),
            );
            reassigned.extend(
                run.checkpoint_evals
                    .iter()
                    .filter(|c| c.state == CheckpointEvalState::Running as i32)
                    .map(|c| c.worker_id.clone()),
            );
        }
        for id in &effects.dirty_runs {
            if let Some(entry) = self.runs.get_mut(id) {
                entry.run.updated_ms = now_ms;
                writes.push(Write::Run {
                    seq: entry.seq,
                    run: Box::new(entry.run.clone()),
                });
            }
        }
        let events = effects
            .events
            .into_iter()
            .filter_map(|(id, kind, message)| {
                self.runs.get(&id).map(|entry| RunEvent {
                    kind: kind as i32,
                    run: Some(entry.run.clone()),
                    message,
                })
            })
            .collect();
        Finished {
            writes,
            events,
            reassigned: reassigned.into_iter().collect(),
        }
    }

    fn take_counter(&mut self, name: &'static str, fx: &mut Effects) -> u64 {
        let slot = match name {
            "next_run" => &mut self.next_run,
            "next_worker" => &mut self.next_worker,
            _ => &mut self.next_world,
        };
        let value = *slot;
        *slot += 1;
        fx.writes.push(Write::Counter { name, value: *slot });
        value
    }

    // ------------------------------------------------------------- runs

    pub fn run(&self, id: &str) -> Result<&Run, Error> {
        self.runs
            .get(id)
            .map(|e| &e.run)
            .ok_or_else(|| Error::NotFound(format!("no run {id:?}")))
    }

    /// Runs in submission order, optionally only some states.
    pub fn list_runs(&self, states: &[i32]) -> Vec<Run> {
        let mut entries: Vec<&RunEntry> = self
            .runs
            .values()
            .filter(|e| states.is_empty() || states.contains(&e.run.state))
            .collect();
        entries.sort_by_key(|e| e.seq);
        entries.into_iter().map(|e| e.run.clone()).collect()
    }

    pub fn submit(
        &mut self,
        spec: RunSpec,
        now_ms: i64,
        fx: &mut Effects,
    ) -> Result<String, Error> {
        validate_run_spec(&spec).map_err(|e| Error::InvalidArgument(format!("spec.{e}")))?;
        let seq = self.take_counter("next_run", fx);
        let id = format!("run-{seq:06}");
        let phases = spec
            .phases
            .iter()
            .enumerate()
            .map(|(i, p)| PhaseProgress {
                name: p.name.clone(),
                token_budget: p.tokens,
                num_steps: num_steps(&spec, i),
                ..Default::default()
            })
            .collect();
        let run = Run {
            id: id.clone(),
            spec: Some(spec),
            state: RunState::Pending as i32,
            phase_index: 0,
            phases,
            created_ms: now_ms,
            updated_ms: now_ms,
            ..Default::default()
        };
        self.runs.insert(id.clone(), RunEntry { seq, run });
        fx.event(&id, RunEventKind::StateChanged, "submitted");
        self.form_worlds(now_ms, fx);
        Ok(id)
    }

    pub fn cancel(
        &mut self,
        id: &str,
        reason: &str,
        now_ms: i64,
        fx: &mut Effects,
    ) -> Result<Run, Error> {
        let run = self.run(id)?;
        if is_terminal(run) {
            return Err(Error::FailedPrecondition(format!(
                "run {id} is already {}",
                twinhead_proto::names::run_state(run.state)
            )));
        }
        let reason = if reason.trim().is_empty() {
            "cancelled by user".to_string()
        } else {
            format!("cancelled by user: {}", reason.trim())
        };
        self.end_world(id, &reason, false, now_ms, fx);
        if let Some(entry) = self.runs.get_mut(id) {
            entry.run.state = RunState::Cancelled as i32;
            entry.run.message = reason.clone();
        }
        fx.event(id, RunEventKind::StateChanged, reason);
        self.form_worlds(now_ms, fx);
        self.run(id).cloned()
    }

    // ---------------------------------------------------------- workers

    pub fn register(
        &mut self,
        hostname: String,
        device: String,
        pid: u32,
        now: Instant,
        now_ms: i64,
        fx: &mut Effects,
    ) -> String {
        let seq = self.take_counter("next_worker", fx);
        let id = format!("w-{seq:06}");
        let row = WorkerRow {
            id: id.clone(),
            seq,
            hostname,
            device,
            pid,
            registered_ms: now_ms,
            status: WorkerStatus::Alive,
            dead_reason: String::new(),
        };
        fx.writes.push(Write::Worker(row.clone()));
        self.workers.insert(
            id.clone(),
            WorkerEntry {
                row,
                last_seen: now,
                world: None,
                job: None,
                draining: None,
            },
        );
        self.form_worlds(now_ms, fx);
        id
    }

    /// Every registered worker in registration order, with the time since
    /// its last heartbeat and its place in a live world, for monitoring.
    pub fn workers(&self, now: Instant) -> Vec<WorkerView> {
        let mut entries: Vec<&WorkerEntry> = self.workers.values().collect();
        entries.sort_by_key(|w| w.row.seq);
        entries
            .into_iter()
            .map(|w| {
                let placement = w.world.as_ref().and_then(|(world_id, rank)| {
                    let run_id = self.worlds.get(world_id)?;
                    let world_size = self
                        .runs
                        .get(run_id)
                        .and_then(|e| active(&e.run))
                        .map_or(0, |a| a.workers.len() as u32);
                    Some(Placement {
                        run_id: run_id.clone(),
                        world_id: world_id.clone(),
                        rank: *rank,
                        world_size,
                    })
                });
                WorkerView {
                    row: w.row.clone(),
                    heartbeat_age: now.saturating_duration_since(w.last_seen),
                    placement,
                    job: w.job.clone(),
                }
            })
            .collect()
    }

    fn live_worker(&self, id: &str) -> Result<&WorkerEntry, Error> {
        match self.workers.get(id) {
            None => Err(Error::NotFound(format!(
                "worker {id:?} is not registered; register again"
            ))),
            Some(w) if w.row.status == WorkerStatus::Dead => Err(Error::NotFound(format!(
                "worker {id} was declared dead ({}); register again",
                w.row.dead_reason
            ))),
            Some(w) => Ok(w),
        }
    }

    /// Why `world_id` is no longer the worker's world.
    fn left_world_reason(&self, world_id: &str) -> String {
        self.worlds
            .get(world_id)
            .and_then(|run_id| self.runs.get(run_id))
            .and_then(|e| e.run.attempts.iter().find(|a| a.world_id == world_id))
            .map(|a| {
                if a.end_reason.is_empty() {
                    format!("not a member of world {world_id}")
                } else {
                    format!("world {world_id} ended: {}", a.end_reason)
                }
            })
            .unwrap_or_else(|| format!("no world {world_id:?}"))
    }

    /// The worker's standing in `world_id`: its rank, or why it has none.
    fn membership(&self, worker_id: &str, world_id: &str) -> Result<Result<u32, String>, Error> {
        let worker = self.live_worker(worker_id)?;
        Ok(match &worker.world {
            Some((w, rank)) if w == world_id => Ok(*rank),
            _ => Err(self.left_world_reason(world_id)),
        })
    }

    /// Renews the lease; tells a worker whose world has ended to abort.
    pub fn heartbeat(
        &mut self,
        worker_id: &str,
        world_id: &str,
        now: Instant,
    ) -> Result<(WorkerAction, String), Error> {
        self.live_worker(worker_id)?;
        if let Some(w) = self.workers.get_mut(worker_id) {
            // A heartbeat that waited for the lock behind a lease check
            // that extended the lease past its arrival keeps the later time.
            w.last_seen = w.last_seen.max(now);
        }
        if world_id.is_empty() {
            return Ok((WorkerAction::Continue, String::new()));
        }
        Ok(match self.membership(worker_id, world_id)? {
            Ok(_) => (WorkerAction::Continue, String::new()),
            Err(reason) => (WorkerAction::Abort, reason),
        })
    }

    /// Extends every live worker's lease by `by` (up to `now`): time the
    /// coordinator could not serve heartbeats is no worker's silence.
    pub fn extend_leases(&mut self, by: Duration, now: Instant) {
        for w in self.workers.values_mut() {
            if w.row.status == WorkerStatus::Alive {
                w.last_seen = (w.last_seen + by).min(now);
            }
        }
    }

    /// Declares workers whose lease ran out dead and tears down their worlds.
    pub fn expire_leases(
        &mut self,
        now: Instant,
        timeout: Duration,
        now_ms: i64,
        fx: &mut Effects,
    ) {
        let mut expired: Vec<(u64, String)> = self
            .workers
            .values()
            .filter(|w| {
                w.row.status == WorkerStatus::Alive && now.duration_since(w.last_seen) > timeout
            })
            .map(|w| (w.row.seq, w.row.id.clone()))
            .collect();
        // Worlds form on every change; a tick adds only expired leases and
        // runs whose backoff after failures has just run out.
        let backoff_over = self.runs.values().any(|e| {
            e.run.retry_after_ms > 0 && e.run.retry_after_ms <= now_ms && !is_terminal(&e.run)
        });
        // Workers still in a failed world past the grace: stop waiting.
        let mut gave_up = false;
        for w in self.workers.values_mut() {
            if let Some(d) = w.draining.as_mut()
                && !d.given_up
                && now_ms - d.since_ms >= DRAIN_GRACE_MS
            {
                d.given_up = true;
                gave_up = true;
                tracing::warn!(worker = %w.row.id, world = %d.world_id, "worker has not left its failed world; forming worlds without it");
            }
        }
        if expired.is_empty() && !backoff_over && !gave_up {
            return;
        }
        expired.sort();
        for (_, id) in expired {
            let Some(worker) = self.workers.get_mut(&id) else {
                continue;
            };
            let silent = now.duration_since(worker.last_seen).as_secs_f64();
            worker.row.status = WorkerStatus::Dead;
            worker.row.dead_reason = format!("no heartbeat for {silent:.1}s");
            fx.writes.push(Write::Worker(worker.row.clone()));
            tracing::warn!(worker = %id, silent_s = silent, "worker declared dead");
            let world = worker.world.clone();
            self.release_checkpoint_eval(
                &id,
                &format!("sent no heartbeat for {silent:.1}s"),
                now_ms,
                fx,
            );
            if let Some((world_id, rank)) = world
                && let Some(run_id) = self.worlds.get(&world_id).cloned()
            {
                let reason =
                    format!("worker {id} (rank {rank}) sent no heartbeat for {silent:.1}s");
                self.end_world(&run_id, &reason, true, now_ms, fx);
            }
        }
        self.form_worlds(now_ms, fx);
    }

    /// Ends the run's live world, if any, freeing its members.
    fn end_world(
        &mut self,
        run_id: &str,
        reason: &str,
        failed: bool,
        now_ms: i64,
        fx: &mut Effects,
    ) {
        let Some(entry) = self.runs.get_mut(run_id) else {
            return;
        };
        let Some(attempt) = active_mut(&mut entry.run) else {
            return;
        };
        attempt.ended_ms = now_ms;
        attempt.end_reason = reason.to_string();
        attempt.failed = failed;
        let world_id = attempt.world_id.clone();
        let members = attempt.workers.clone();
        for member in members {
            if let Some(w) = self.workers.get_mut(&member)
                && w.world.as_ref().is_some_and(|(id, _)| *id == world_id)
            {
                w.world = None;
                if failed {
                    w.draining = Some(Draining {
                        world_id: world_id.clone(),
                        since_ms: now_ms,
                        given_up: false,
                    });
                }
            }
        }
        fx.event(
            run_id,
            RunEventKind::WorldEnded,
            format!("world {world_id} ended: {reason}"),
        );
        if !failed {
            return;
        }
        let run = &mut entry.run;
        // Worlds of the same workers that fail again from the same
        // checkpoint (no progress in between) are re-formed after 1, 2, 4…
        // up to 60 s: a store or a network that is down gets time to come
        // back before the restarts run out. A world that lost a member is
        // re-formed at once: its replacement is no reason to wait.
        let last = run
            .attempts
            .last()
            .map(|a| (a.start_checkpoint.clone(), a.workers.clone()));
        let in_a_row = run
            .attempts
            .iter()
            .rev()
            .take_while(|a| {
                a.failed
                    && last.as_ref().is_some_and(|(from, workers)| {
                        a.start_checkpoint == *from && a.workers == *workers
                    })
            })
            .count();
        if in_a_row >= 2 {
            let delay = (1000i64 << (in_a_row - 2).min(6)).min(MAX_RETRY_DELAY_MS);
            run.retry_after_ms = now_ms + delay;
        }
        let failures = run.attempts.iter().filter(|a| a.failed).count();
        let allowed = run.spec.as_ref().map_or(0, |s| s.max_restarts) as usize;
        if failures > allowed && !is_terminal(run) {
            run.state = RunState::Failed as i32;
            run.message = format!(
                "{failures} worlds failed, more than max_restarts {allowed}; last: {reason}"
            );
            let message = run.message.clone();
            fx.event(run_id, RunEventKind::StateChanged, message);
        }
    }

    /// Forms worlds for runs that wait, out of free live workers.
    fn form_worlds(&mut self, now_ms: i64, fx: &mut Effects) {
        // Members of a world that just failed are usually out of it within
        // moments: wait for them rather than form smaller worlds.
        let waiting_for_members = self.workers.values().any(|w| {
            w.row.status == WorkerStatus::Alive && w.draining.as_ref().is_some_and(|d| !d.given_up)
        });
        if waiting_for_members {
            return;
        }
        let free = self.free_workers();
        if free.is_empty() {
            return;
        }
        self.plan_and_form_worlds(free, now_ms, fx);
        // Workers no world could use score checkpoints meanwhile.
        self.assign_checkpoint_evals(now_ms, fx);
    }

    /// Live workers in no world, holding no checkpoint evaluation and out
    /// of any failed world, in registration order.
    fn free_workers(&self) -> Vec<String> {
        let mut free: Vec<(u64, String)> = self
            .workers
            .values()
            .filter(|w| {
                w.row.status == WorkerStatus::Alive
                    && w.world.is_none()
                    && w.job.is_none()
                    && w.draining.is_none()
            })
            .map(|w| (w.row.seq, w.row.id.clone()))
            .collect();
        free.sort();
        free.into_iter().map(|(_, id)| id).collect()
    }

    fn plan_and_form_worlds(&mut self, free: Vec<String>, now_ms: i64, fx: &mut Effects) {
        let mut waiting: Vec<(u64, WaitingRun)> = self
            .runs
            .values()
            .filter(|e| !is_terminal(&e.run) && active(&e.run).is_none())
            .filter(|e| e.run.retry_after_ms <= now_ms)
            .filter_map(|e| {
                let spec = e.run.spec.as_ref()?;
                Some((
                    e.seq,
                    WaitingRun {
                        run_id: e.run.id.clone(),
                        world_size: spec.world_size,
                        min_world_size: spec.min_world_size,
                        global_batch: spec.global_batch,
                        started: !e.run.attempts.is_empty(),
                    },
                ))
            })
            .collect();
        if waiting.is_empty() {
            return;
        }
        waiting.sort_by_key(|(seq, _)| *seq);
        let waiting: Vec<WaitingRun> = waiting.into_iter().map(|(_, w)| w).collect();
        for (run_id, members) in scheduler::plan_worlds(&waiting, &free) {
            let number = self.take_counter("next_world", fx);
            let world_id = format!("world-{number:06}");
            for (rank, member) in members.iter().enumerate() {
                if let Some(w) = self.workers.get_mut(member) {
                    w.world = Some((world_id.clone(), rank as u32));
                }
            }
            self.worlds.insert(world_id.clone(), run_id.clone());
            let Some(entry) = self.runs.get_mut(&run_id) else {
                continue;
            };
            let run = &mut entry.run;
            run.retry_after_ms = 0;
            let start_checkpoint = run.checkpoints.last().cloned();
            let from = start_checkpoint
                .as_ref()
                .map(|c| format!("from checkpoint phase {} step {}", c.phase_index, c.step))
                .unwrap_or_else(|| "from initial weights".to_string());
            run.attempts.push(Attempt {
                world_id: world_id.clone(),
                workers: members.clone(),
                phase_index: run.phase_index,
                start_checkpoint,
                started_ms: now_ms,
                ..Default::default()
            });
            let message = format!(
                "world {world_id} formed with {} ranks ({}) {from}",
                members.len(),
                members.join(", ")
            );
            if run.state == RunState::Pending as i32 {
                run.state = RunState::Running as i32;
                if let Some(p) = run.phases.get_mut(run.phase_index as usize)
                    && p.started_ms == 0
                {
                    p.started_ms = now_ms;
                }
                fx.event(&run_id, RunEventKind::StateChanged, "running");
            }
            tracing::info!(run = %run_id, world = %world_id, ranks = members.len(), "world formed");
            fx.event(&run_id, RunEventKind::WorldFormed, message);
        }
    }

    // ------------------------------------------------------ assignments

    /// The worker's current assignment, if it belongs to a live world.
    /// Whether the worker is still out of a failed world (see
    /// `WorkerEntry::draining`).
    pub fn draining(&self, worker_id: &str) -> bool {
        self.workers
            .get(worker_id)
            .is_some_and(|w| w.draining.is_some())
    }

    /// The worker asks for work, so it has left the failed world it was in:
    /// it may join the next one.
    pub fn drained(&mut self, worker_id: &str, now_ms: i64, fx: &mut Effects) {
        if let Some(w) = self.workers.get_mut(worker_id)
            && w.draining.take().is_some()
        {
            self.form_worlds(now_ms, fx);
        }
    }

    pub fn assignment(&self, worker_id: &str) -> Result<Option<Assignment>, Error> {
        let worker = self.live_worker(worker_id)?;
        if let Some((run_id, eval_id)) = &worker.job {
            return Ok(self.checkpoint_eval_assignment(worker_id, run_id, eval_id));
        }
        let Some((world_id, rank)) = &worker.world else {
            return Ok(None);
        };
        let Some(run) = self
            .worlds
            .get(world_id)
            .and_then(|id| self.runs.get(id))
            .map(|e| &e.run)
        else {
            return Ok(None);
        };
        let (Some(spec), Some(attempt)) = (run.spec.as_ref(), active(run)) else {
            return Ok(None);
        };
        if spec.phases.get(run.phase_index as usize).is_none() {
            return Ok(None);
        }
        let steps = num_steps(spec, run.phase_index as usize);
        let checkpoint = run.checkpoints.last();
        let (first_step, phase_start) = match checkpoint {
            Some(c) if c.phase_index == run.phase_index => (c.step, false),
            Some(_) => (0, true),
            None => (0, false),
        };
        Ok(Some(Assignment {
            assignment_id: format!("{world_id}/phase-{}", run.phase_index),
            run_id: run.id.clone(),
            world_id: world_id.clone(),
            rank: *rank,
            world_size: attempt.workers.len() as u32,
            spec: Some(spec.clone()),
            phase_index: run.phase_index,
            first_step,
            last_step: steps.saturating_sub(1),
            num_steps: steps,
            start_checkpoint: checkpoint.cloned(),
            phase_start,
            checkpoint_eval: None,
        }))
    }

    /// Whether a run the worker took part in has not ended, or has a
    /// checkpoint waiting to be scored (see `GetAssignmentResponse`).
    pub fn work_pending(&self, worker_id: &str) -> bool {
        self.runs.values().any(|e| {
            let run = &e.run;
            let took_part = run
                .attempts
                .iter()
                .any(|a| a.workers.iter().any(|w| w == worker_id));
            took_part
                && (!is_terminal(run)
                    || run.checkpoint_evals.iter().any(|c| {
                        c.state == CheckpointEvalState::Pending as i32
                            || c.state == CheckpointEvalState::Running as i32
                    }))
        })
    }

    /// Rank 0 publishes the world's bootstrap token; others read it.
    /// Returns the token once there is one.
    pub fn rendezvous(
        &mut self,
        worker_id: &str,
        world_id: &str,
        publish: Vec<u8>,
        fx: &mut Effects,
    ) -> Result<Option<Vec<u8>>, Error> {
        let rank = self
            .membership(worker_id, world_id)?
            .map_err(Error::FailedPrecondition)?;
        let run_id = self.worlds.get(world_id).cloned().unwrap_or_default();
        let attempt = self
            .runs
            .get_mut(&run_id)
            .and_then(|e| active_mut(&mut e.run))
            .ok_or_else(|| Error::FailedPrecondition(format!("world {world_id} is not live")))?;
        if publish.is_empty() {
            return Ok(
                (!attempt.rendezvous_token.is_empty()).then(|| attempt.rendezvous_token.clone())
            );
        }
        if rank != 0 {
            return Err(Error::FailedPrecondition(format!(
                "only rank 0 publishes the rendezvous token of world {world_id}; {worker_id} is rank {rank}"
            )));
        }
        if publish.len() > MAX_RENDEZVOUS_TOKEN {
            return Err(Error::InvalidArgument(format!(
                "publish: token of {} bytes is longer than {MAX_RENDEZVOUS_TOKEN}",
                publish.len()
            )));
        }
        if !attempt.rendezvous_token.is_empty() && attempt.rendezvous_token != publish {
            return Err(Error::FailedPrecondition(format!(
                "world {world_id} already has a different rendezvous token"
            )));
        }
        attempt.rendezvous_token = publish.clone();
        fx.run(&run_id);
        Ok(Some(publish))
    }

    // ---------------------------------------------------------- reports

    /// Records a progress report; rank 0's become the run's progress.
    pub fn progress(
        &mut self,
        req: &ReportProgressRequest,
        now_ms: i64,
        fx: &mut Effects,
    ) -> Result<(WorkerAction, String), Error> {
        let rank = match self.membership(&req.worker_id, &req.world_id)? {
            Ok(rank) => rank,
            Err(reason) => return Ok((WorkerAction::Abort, reason)),
        };
        let run_id = self.worlds.get(&req.world_id).cloned().unwrap_or_default();
        let run = self.run(&run_id)?;
        check_in_phase(run, "report", "step", req.phase_index, req.step)?;
        // Progress rows are stored as SQLite integers (i64): a larger count
        // would fail the whole commit it shares with other calls.
        if i64::try_from(req.tokens).is_err() {
            return Err(Error::InvalidArgument(format!(
                "tokens: {} is past {}, the largest count stored",
                req.tokens,
                i64::MAX
            )));
        }
        // SQLite stores NaN as NULL, which the columns refuse.
        for (field, value) in [
            ("loss", req.loss),
            ("tokens_per_sec", req.tokens_per_sec),
            ("lr", req.lr),
            ("grad_norm", req.grad_norm),
            ("mfu", req.mfu),
        ] {
            if !value.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "{field}: {value} is not a finite number"
                )));
            }
        }
        if rank != 0 {
            return Ok((WorkerAction::Continue, String::new()));
        }
        if let Some(entry) = self.runs.get_mut(&run_id)
            && let Some(p) = entry.run.phases.get_mut(req.phase_index as usize)
        {
            p.steps_done = req.step;
            p.tokens_done = req.tokens;
            p.loss = req.loss;
            p.tokens_per_sec = req.tokens_per_sec;
            p.lr = req.lr;
            p.grad_norm = req.grad_norm;
            p.mfu = req.mfu;
        }
        fx.writes.push(Write::Progress(ProgressRow {
            run_id: run_id.clone(),
            world_id: req.world_id.clone(),
            phase_index: req.phase_index,
            step: req.step,
            tokens: req.tokens,
            loss: req.loss,
            tokens_per_sec: req.tokens_per_sec,
            lr: req.lr,
            grad_norm: req.grad_norm,
            mfu: req.mfu,
            time_ms: now_ms,
        }));
        fx.event(
            &run_id,
            RunEventKind::Progress,
            format!("step {} loss {:.4}", req.step, req.loss),
        );
        Ok((WorkerAction::Continue, String::new()))
    }

    /// Records a held-out evaluation of rank 0 in the run's `evals`, in
    /// (phase, step) order; one of the same step replaces the earlier one
    /// (a world that repeated the step after a restart).
    pub fn eval(
        &mut self,
        req: &ReportEvalRequest,
        now_ms: i64,
        fx: &mut Effects,
    ) -> Result<(WorkerAction, String), Error> {
        let mut point = req
            .eval
            .clone()
            .ok_or_else(|| Error::InvalidArgument("eval: is required".into()))?;
        let rank = match self.membership(&req.worker_id, &req.world_id)? {
            Ok(rank) => rank,
            Err(reason) => return Ok((WorkerAction::Abort, reason)),
        };
        let run_id = self.worlds.get(&req.world_id).cloned().unwrap_or_default();
        let run = self.run(&run_id)?;
        check_in_phase(
            run,
            "evaluation",
            "eval.step",
            point.phase_index,
            point.step,
        )?;
        if !(point.loss.is_finite() && point.accuracy.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "eval: loss {} and accuracy {} must be finite",
                point.loss, point.accuracy
            )));
        }
        if rank != 0 {
            return Ok((WorkerAction::Continue, String::new()));
        }
        point.world_id = req.world_id.clone();
        point.time_ms = now_ms;
        let message = if point.error.is_empty() {
            format!("step {} held-out loss {:.4}", point.step, point.loss)
        } else {
            format!(
                "step {} held-out evaluation failed: {}",
                point.step, point.error
            )
        };
        if let Some(entry) = self.runs.get_mut(&run_id) {
            let evals = &mut entry.run.evals;
            let key = (point.phase_index, point.step);
            let at = evals.partition_point(|e| (e.phase_index, e.step) < key);
            match evals.get_mut(at) {
                Some(same) if (same.phase_index, same.step) == key => *same = point,
                _ => evals.insert(at, point),
            }
        }
        fx.event(&run_id, RunEventKind::Eval, message);
        Ok((WorkerAction::Continue, String::new()))
    }

    /// Records a committed checkpoint; the one that ends a phase moves the
    /// run to the next phase, or completes it.
    pub fn checkpoint(
        &mut self,
        worker_id: &str,
        world_id: &str,
        checkpoint: Option<Checkpoint>,
        now_ms: i64,
        fx: &mut Effects,
    ) -> Result<(WorkerAction, String), Error> {
        let mut checkpoint =
            checkpoint.ok_or_else(|| Error::InvalidArgument("checkpoint: is required".into()))?;
        if checkpoint.url.trim().is_empty() {
            return Err(Error::InvalidArgument(
                "checkpoint.url: must not be empty".into(),
            ));
        }
        if let Err(reason) = self.membership(worker_id, world_id)? {
            return Ok((WorkerAction::Abort, reason));
        }
        let run_id = self.worlds.get(world_id).cloned().unwrap_or_default();
        let run = self.run(&run_id)?;
        let budget = check_in_phase(
            run,
            "checkpoint",
            "checkpoint.step",
            checkpoint.phase_index,
            checkpoint.step,
        )?;
        let phases = run.phases.len();
        if let Some(last) = run
            .checkpoints
            .last()
            .filter(|c| c.phase_index == checkpoint.phase_index)
        {
            if last.step == checkpoint.step && last.url == checkpoint.url {
                return Ok((WorkerAction::Continue, String::new()));
            }
            if last.step >= checkpoint.step {
                return Err(Error::FailedPrecondition(format!(
                    "checkpoint.step: {} is not after the last committed step {}",
                    checkpoint.step, last.step
                )));
            }
        }
        let previous_tokens = run
            .checkpoints
            .last()
            .filter(|c| c.phase_index == checkpoint.phase_index)
            .map_or(0, |c| c.tokens);
        checkpoint.world_id = world_id.to_string();
        checkpoint.committed_ms = now_ms;
        let phase = checkpoint.phase_index as usize;
        let step = checkpoint.step;
        let queued =
            self.queue_checkpoint_eval(&run_id, &checkpoint, step >= budget, previous_tokens, fx);
        let message = format!("checkpoint phase {phase} step {step}: {}", checkpoint.url);
        let Some(entry) = self.runs.get_mut(&run_id) else {
            return Err(Error::NotFound(run_id));
        };
        let run = &mut entry.run;
        if let Some(p) = run.phases.get_mut(phase) {
            p.steps_done = p.steps_done.max(step);
            p.tokens_done = p.tokens_done.max(checkpoint.tokens);
        }
        run.checkpoints.push(checkpoint);
        fx.event(&run_id, RunEventKind::Checkpoint, message);
        if step < budget {
            if queued {
                self.form_worlds(now_ms, fx);
            }
            return Ok((WorkerAction::Continue, String::new()));
        }
        if let Some(p) = run.phases.get_mut(phase) {
            p.finished_ms = now_ms;
        }
        if phase + 1 < phases {
            run.phase_index += 1;
            if let Some(p) = run.phases.get_mut(phase + 1) {
                p.started_ms = now_ms;
            }
            let name = run
                .phases
                .get(phase + 1)
                .map(|p| p.name.clone())
                .unwrap_or_default();
            fx.event(
                &run_id,
                RunEventKind::PhaseStarted,
                format!("phase {} ({name}) started", phase + 1),
            );
            if queued {
                self.form_worlds(now_ms, fx);
            }
            return Ok((WorkerAction::Continue, String::new()));
        }
        self.end_world(&run_id, "run completed", false, now_ms, fx);
        if let Some(entry) = self.runs.get_mut(&run_id) {
            entry.run.state = RunState::Completed as i32;
        }
        fx.event(&run_id, RunEventKind::StateChanged, "completed");
        self.form_worlds(now_ms, fx);
        Ok((WorkerAction::Continue, String::new()))
    }

    /// A rank reports that it cannot go on: its world is torn down and
    /// re-formed from the last committed checkpoint.
    pub fn failure(
        &mut self,
        req: &ReportFailureRequest,
        now_ms: i64,
        fx: &mut Effects,
    ) -> Result<(WorkerAction, String), Error> {
        let ReportFailureRequest {
            worker_id,
            world_id,
            message,
            bad_checkpoint,
            permanent,
        } = req;
        let (worker_id, world_id, permanent) = (worker_id.as_str(), world_id.as_str(), *permanent);
        let rank = match self.membership(worker_id, world_id)? {
            Ok(rank) => rank,
            Err(reason) => return Ok((WorkerAction::Abort, reason)),
        };
        let run_id = self.worlds.get(world_id).cloned().unwrap_or_default();
        let reason = format!(
            "worker {worker_id} (rank {rank}) failed: {}",
            message.trim()
        );
        if !bad_checkpoint.is_empty() {
            self.forget_checkpoint(&run_id, bad_checkpoint.as_str(), fx);
        }
        tracing::warn!(run = %run_id, world = %world_id, %reason, permanent, "world failed");
        self.end_world(&run_id, &reason, true, now_ms, fx);
        // The reporter's trainer has returned: it is out of the world.
        if let Some(w) = self.workers.get_mut(worker_id) {
            w.draining = None;
        }
        if permanent
            && let Some(entry) = self.runs.get_mut(&run_id)
            && !is_terminal(&entry.run)
        {
            entry.run.state = RunState::Failed as i32;
            entry.run.message = format!("{reason} (a retry cannot fix this)");
            let message = entry.run.message.clone();
            fx.event(&run_id, RunEventKind::StateChanged, message);
        }
        self.form_worlds(now_ms, fx);
        Ok((WorkerAction::Abort, reason))
    }

    /// A worker leaves for good (asked to stop, e.g. before a Slurm
    /// pre-emption), after its world committed a checkpoint. Its world ends
    /// without counting as a failure and is re-formed from that checkpoint
    /// when enough workers are free.
    pub fn leave(
        &mut self,
        worker_id: &str,
        reason: &str,
        now_ms: i64,
        fx: &mut Effects,
    ) -> Result<(), Error> {
        self.live_worker(worker_id)?;
        let reason = match reason.trim() {
            "" => "asked to stop".to_string(),
            r => r.to_string(),
        };
        let Some(worker) = self.workers.get_mut(worker_id) else {
            return Ok(());
        };
        worker.row.status = WorkerStatus::Dead;
        worker.row.dead_reason = format!("left: {reason}");
        fx.writes.push(Write::Worker(worker.row.clone()));
        let world = worker.world.clone();
        tracing::info!(worker = %worker_id, %reason, "worker left");
        self.release_checkpoint_eval(worker_id, &format!("left: {reason}"), now_ms, fx);
        if let Some((world_id, rank)) = world
            && let Some(run_id) = self.worlds.get(&world_id).cloned()
        {
            let reason = format!("worker {worker_id} (rank {rank}) left: {reason}");
            self.end_world(&run_id, &reason, false, now_ms, fx);
        }
        self.form_worlds(now_ms, fx);
        Ok(())
    }

    /// Drops an unusable checkpoint and every later one, moving the run
    /// back to the phase and step of the newest checkpoint left.
    fn forget_checkpoint(&mut self, run_id: &str, url: &str, fx: &mut Effects) {
        let Some(entry) = self.runs.get_mut(run_id) else {
            return;
        };
        let run = &mut entry.run;
        let Some(index) = run.checkpoints.iter().position(|c| c.url == url) else {
            return;
        };
        let bad = run.checkpoints[index].clone();
        run.checkpoints.truncate(index);
        run.phase_index = bad.phase_index;
        let kept = run
            .checkpoints
            .last()
            .filter(|c| c.phase_index == bad.phase_index)
            .map_or(0, |c| c.step);
        for (i, p) in run.phases.iter_mut().enumerate() {
            if i as u32 >= bad.phase_index {
                p.finished_ms = 0;
            }
            if i as u32 == bad.phase_index {
                p.steps_done = kept;
            }
        }
        tracing::warn!(run = %run_id, checkpoint = %url, "checkpoint unusable; resuming from the previous one");
        fx.event(
            run_id,
            RunEventKind::Checkpoint,
            format!(
                "checkpoint phase {} step {} is unusable and was dropped: {url}",
                bad.phase_index, bad.step
            ),
        );
    }
}

/// The state's rules with hand-made instants: no sockets, no store, no sleeps.
#[cfg(test)]
mod tests {
    use std::path::Path;

    use twinhead_proto::v1::Checkpoint;

    use super::*;

    const LEASE: Duration = Duration::from_secs(5);

    /// The tiny two-phase run of the coordinator's tests
    /// (`tests/tiny-run.toml`): world size 2, global batch 4, 3 steps of 16
    /// tokens then 2 of 32.
    fn spec(overrides: &[&str]) -> RunSpec {
        let text = include_str!("../tests/tiny-run.toml");
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        twinhead_proto::config::parse_run("tiny-run.toml", text, &overrides, Path::new("."))
            .expect("valid spec")
    }

    fn empty() -> State {
        State::load(
            Snapshot {
                runs: Vec::new(),
                workers: Vec::new(),
                counters: Vec::new(),
                datasets: Vec::new(),
            },
            Instant::now(),
        )
    }

    /// A state with one submitted run and `workers` registered at `t0`.
    fn started(overrides: &[&str], workers: usize, t0: Instant) -> (State, String, Vec<String>) {
        let mut state = empty();
        let mut fx = Effects::default();
        let run = state.submit(spec(overrides), 0, &mut fx).expect("submit");
        let ids = (0..workers)
            .map(|i| state.register(format!("host-{i}"), "cpu".into(), 1, t0, 0, &mut fx))
            .collect();
        (state, run, ids)
    }

    fn world_of(state: &State, worker: &str) -> Option<(String, u32)> {
        state
            .assignment(worker)
            .expect("live worker")
            .map(|a| (a.world_id, a.rank))
    }

    fn commit(state: &mut State, worker: &str, world: &str, phase: u32, step: u64) -> Run {
        let mut fx = Effects::default();
        let checkpoint = Checkpoint {
            url: format!("file:///tmp/ckpt/p{phase}-s{step}"),
            phase_index: phase,
            step,
            ..Default::default()
        };
        let (action, reason) = state
            .checkpoint(worker, world, Some(checkpoint), 10, &mut fx)
            .expect("checkpoint accepted");
        assert_eq!(action, WorkerAction::Continue, "{reason}");
        let run = state.worlds.get(world).cloned().unwrap_or_default();
        state.run(&run).expect("run").clone()
    }

    #[test]
    fn a_world_forms_when_enough_workers_are_free_with_ranks_in_registration_order() {
        let t0 = Instant::now();
        let (state, run, ids) = started(&[], 1, t0);
        assert_eq!(
            world_of(&state, &ids[0]),
            None,
            "one worker is not a world of 2"
        );
        assert_eq!(
            state.run(&run).expect("run").state,
            RunState::Pending as i32
        );

        let (state, run, ids) = started(&[], 3, t0);
        let (world, rank0) = world_of(&state, &ids[0]).expect("in a world");
        assert_eq!(rank0, 0);
        assert_eq!(world_of(&state, &ids[1]), Some((world.clone(), 1)));
        assert_eq!(world_of(&state, &ids[2]), None, "the third waits");
        let run = state.run(&run).expect("run");
        assert_eq!(run.state, RunState::Running as i32);
        assert_eq!(run.attempts.len(), 1);
        assert_eq!(run.attempts[0].workers, ids[..2]);
    }

    #[test]
    fn a_lease_expires_only_after_the_timeout_and_ends_the_world_as_a_failure() {
        let t0 = Instant::now();
        let (mut state, run, ids) = started(&[], 2, t0);
        let (world, _) = world_of(&state, &ids[0]).expect("world");
        let mut fx = Effects::default();
        // Worker 1 renews at t0 + 4 s; worker 0 stays silent.
        let at = |s: u64| t0 + Duration::from_secs(s);
        state.heartbeat(&ids[1], &world, at(4)).expect("heartbeat");
        state.expire_leases(at(5), LEASE, 5_000, &mut fx);
        assert!(
            world_of(&state, &ids[0]).is_some(),
            "exactly the timeout is not past it"
        );
        state.expire_leases(at(6), LEASE, 6_000, &mut fx);
        let dead = state.heartbeat(&ids[0], &world, at(6)).expect_err("dead");
        assert!(dead.to_string().contains("declared dead"), "{dead}");
        let (action, reason) = state.heartbeat(&ids[1], &world, at(6)).expect("alive");
        assert_eq!(action, WorkerAction::Abort);
        assert!(reason.contains("sent no heartbeat for 6.0s"), "{reason}");
        let run = state.run(&run).expect("run");
        assert!(run.attempts[0].failed && run.attempts[0].ended_ms == 6_000);
        assert_eq!(run.state, RunState::Running as i32, "within max_restarts");
        // A new worker arrives while the survivor has not yet asked for
        // work (its step may hang): no world forms with it.
        let w3 = state.register("host-3".into(), "cpu".into(), 1, at(7), 7_000, &mut fx);
        assert_eq!(
            world_of(&state, &w3),
            None,
            "the survivor is still in the failed world"
        );
        // Once it asks, a world forms again, from the initial weights.
        state.drained(&ids[1], 7_500, &mut fx);
        let (again, _) = world_of(&state, &ids[1]).expect("re-formed");
        assert_ne!(again, world);
        assert_eq!(world_of(&state, &w3), Some((again, 1)));
    }

    #[test]
    fn phase_end_checkpoints_move_the_run_on_and_the_last_completes_it() {
        let t0 = Instant::now();
        let (mut state, run_id, ids) = started(&[], 2, t0);
        let (world, _) = world_of(&state, &ids[0]).expect("world");
        let steps =
            |state: &State, phase: usize| state.run(&run_id).expect("run").phases[phase].num_steps;
        assert_eq!((steps(&state, 0), steps(&state, 1)), (3, 2));

        let run = commit(&mut state, &ids[0], &world, 0, 1);
        assert_eq!((run.phase_index, run.phases[0].steps_done), (0, 1));
        let mut fx = Effects::default();
        let stale = Checkpoint {
            url: "file:///tmp/ckpt/old".into(),
            phase_index: 0,
            step: 1,
            ..Default::default()
        };
        let refused = state
            .checkpoint(&ids[0], &world, Some(stale), 11, &mut fx)
            .expect_err("not after the last step");
        assert!(
            refused
                .to_string()
                .contains("not after the last committed step 1")
        );

        let run = commit(&mut state, &ids[0], &world, 0, 3);
        assert_eq!(
            run.phase_index, 1,
            "the phase's last step starts the next phase"
        );
        let assignment = state.assignment(&ids[1]).expect("live").expect("assigned");
        assert_eq!((assignment.phase_index, assignment.first_step), (1, 0));
        assert!(
            assignment.phase_start,
            "the new phase starts from the old one's end"
        );

        let run = commit(&mut state, &ids[1], &world, 1, 2);
        assert_eq!(run.state, RunState::Completed as i32);
        assert_eq!(world_of(&state, &ids[0]), None, "members are freed");
        assert_eq!(world_of(&state, &ids[1]), None);
    }

    #[test]
    fn worlds_failing_again_wait_longer_each_time_and_a_permanent_failure_ends_the_run() {
        let t0 = Instant::now();
        let (mut state, run_id, ids) = started(&["max_restarts=10"], 2, t0);
        let fail = |state: &mut State, now_ms: i64, permanent: bool| {
            let (world, _) = world_of(state, &ids[0]).expect("a world to fail");
            let report = ReportFailureRequest {
                worker_id: ids[1].clone(),
                world_id: world,
                message: "the store timed out".into(),
                permanent,
                ..Default::default()
            };
            let mut fx = Effects::default();
            state.failure(&report, now_ms, &mut fx).expect("reported");
            // The other rank asks for work once its step was aborted.
            state.drained(&ids[0], now_ms, &mut fx);
        };
        let tick = |state: &mut State, now_ms: i64| {
            let mut fx = Effects::default();
            state.expire_leases(t0, LEASE, now_ms, &mut fx);
        };
        let retry_after = |state: &State| state.run(&run_id).expect("run").retry_after_ms;
        // A first failure is re-formed at once (a lost worker is replaced).
        fail(&mut state, 1_000, false);
        assert!(world_of(&state, &ids[0]).is_some());
        assert_eq!(retry_after(&state), 0);
        // Again from the same checkpoint: 1 s, then 2 s.
        fail(&mut state, 2_000, false);
        assert!(world_of(&state, &ids[0]).is_none());
        assert_eq!(retry_after(&state), 3_000);
        tick(&mut state, 2_999);
        assert!(
            world_of(&state, &ids[0]).is_none(),
            "not before the backoff"
        );
        tick(&mut state, 3_000);
        assert!(
            world_of(&state, &ids[0]).is_some(),
            "the reaper's tick re-forms it"
        );
        assert_eq!(retry_after(&state), 0);
        fail(&mut state, 4_000, false);
        assert_eq!(retry_after(&state), 6_000);
        tick(&mut state, 6_000);
        // A failure a retry cannot fix ends the run with its message.
        fail(&mut state, 7_000, true);
        let run = state.run(&run_id).expect("run");
        assert_eq!(run.state, RunState::Failed as i32);
        assert!(
            run.message.contains("the store timed out")
                && run.message.contains("a retry cannot fix this"),
            "{}",
            run.message
        );
        tick(&mut state, 100_000);
        assert!(world_of(&state, &ids[0]).is_none());
    }

    #[test]
    fn a_world_that_lost_a_member_re_forms_at_once_however_often() {
        let t0 = Instant::now();
        let (mut state, run_id, mut ids) = started(&["max_restarts=10"], 2, t0);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Each round rank 0 dies and a new worker takes its place: no
        // failure repeats with the same workers, so no backoff.
        for round in 0..3u64 {
            let (world, _) = world_of(&state, &ids[1]).expect("a live world");
            let now = 10_000 * (round + 1);
            let mut fx = Effects::default();
            let fresh = state.register(
                format!("new-{round}"),
                "cpu".into(),
                1,
                at(now),
                now as i64,
                &mut fx,
            );
            state.heartbeat(&ids[1], &world, at(now)).expect("alive");
            state.expire_leases(at(now + 4_000), LEASE, (now + 4_000) as i64, &mut fx);
            state.drained(&ids[1], (now + 4_000) as i64, &mut fx);
            assert_eq!(
                state.run(&run_id).expect("run").retry_after_ms,
                0,
                "round {round}"
            );
            assert!(
                world_of(&state, &fresh).is_some(),
                "round {round}: re-formed at once"
            );
            ids = vec![fresh, ids[1].clone()];
            // The survivor is rank 1 again only if it registered later; keep
            // it as the one that heartbeats.
            if world_of(&state, &ids[1]).map(|(_, r)| r) == Some(0) {
                ids.swap(0, 1);
            }
        }
        assert!(state.run(&run_id).expect("run").attempts.len() >= 4);
    }

    #[test]
    fn work_stays_pending_for_a_worker_while_its_run_waits_to_re_form() {
        let t0 = Instant::now();
        let (mut state, _run_id, ids) = started(&["max_restarts=10"], 2, t0);
        let stranger = state.register(
            "late".into(),
            "cpu".into(),
            1,
            t0,
            0,
            &mut Effects::default(),
        );
        assert!(state.work_pending(&ids[0]), "training");
        assert!(!state.work_pending(&stranger), "never took part");
        for now_ms in [1_000, 2_000] {
            let (world, _) = world_of(&state, &ids[1]).expect("a world");
            let report = ReportFailureRequest {
                worker_id: ids[1].clone(),
                world_id: world,
                message: "the store timed out".into(),
                ..Default::default()
            };
            let mut fx = Effects::default();
            state.failure(&report, now_ms, &mut fx).expect("reported");
            state.drained(&ids[0], now_ms, &mut fx);
        }
        // Backing off with no world: an exit-when-idle worker must stay.
        assert!(world_of(&state, &ids[0]).is_none());
        assert!(state.work_pending(&ids[0]));
    }

    #[test]
    fn a_world_waits_briefly_for_the_members_of_a_failed_one_then_forms_without_a_hung_one() {
        let t0 = Instant::now();
        let (mut state, run_id, ids) = started(&["max_restarts=10"], 3, t0);
        let (world, _) = world_of(&state, &ids[0]).expect("a world of workers 0 and 1");
        let mut fx = Effects::default();
        let report = ReportFailureRequest {
            worker_id: ids[1].clone(),
            world_id: world.clone(),
            message: "collective timed out".into(),
            ..Default::default()
        };
        state.failure(&report, 1_000, &mut fx).expect("reported");
        // Worker 0's step hangs: it never asks for work, though it
        // heartbeats. Worker 2 is free, but the next world waits for 0.
        state.heartbeat(&ids[0], &world, t0).expect("alive");
        let tick = |state: &mut State, now_ms: i64| {
            state.expire_leases(t0, LEASE, now_ms, &mut Effects::default());
        };
        tick(&mut state, 1_000 + DRAIN_GRACE_MS - 1);
        assert_eq!(world_of(&state, &ids[1]), None, "waiting for worker 0");
        tick(&mut state, 1_000 + DRAIN_GRACE_MS);
        let (again, _) = world_of(&state, &ids[1]).expect("formed without worker 0");
        assert_ne!(again, world);
        assert!(world_of(&state, &ids[2]).is_some());
        assert_eq!(world_of(&state, &ids[0]), None);
        let run = state.run(&run_id).expect("run");
        assert_eq!(
            run.attempts.last().map(|a| a.workers.clone()),
            Some(vec![ids[1].clone(), ids[2].clone()])
        );
        // When it finally asks, it is free again.
        state.drained(&ids[0], 12_000, &mut fx);
        assert!(!state.draining(&ids[0]));
    }

    #[test]
    fn failures_beyond_max_restarts_fail_the_run() {
        let t0 = Instant::now();
        let (mut state, run_id, ids) = started(&["max_restarts=1"], 2, t0);
        for attempt in 1..=2 {
            let (world, _) = world_of(&state, &ids[0]).expect("world");
            let mut fx = Effects::default();
            let report = ReportFailureRequest {
                worker_id: ids[1].clone(),
                world_id: world,
                message: "out of memory".into(),
                ..Default::default()
            };
            let (action, _) = state.failure(&report, attempt, &mut fx).expect("reported");
            assert_eq!(action, WorkerAction::Abort);
            state.drained(&ids[0], attempt, &mut fx);
        }
        let run = state.run(&run_id).expect("run");
        assert_eq!(run.state, RunState::Failed as i32);
        assert!(
            run.message.contains("more than max_restarts 1"),
            "{}",
            run.message
        );
        assert_eq!(world_of(&state, &ids[0]), None, "no world for a failed run");
    }

    #[test]
    fn only_rank_zero_publishes_the_rendezvous_token_and_the_others_read_it() {
        let (mut state, _, ids) = started(&[], 2, Instant::now());
        let (world, _) = world_of(&state, &ids[0]).expect("world");
        let mut fx = Effects::default();
        assert_eq!(
            state
                .rendezvous(&ids[1], &world, Vec::new(), &mut fx)
                .expect("read"),
            None
        );
        let refused = state
            .rendezvous(&ids[1], &world, b"token".to_vec(), &mut fx)
            .expect_err("rank 1");
        assert!(refused.to_string().contains("only rank 0"));
        let long = vec![0u8; MAX_RENDEZVOUS_TOKEN + 1];
        assert!(state.rendezvous(&ids[0], &world, long, &mut fx).is_err());
        state
            .rendezvous(&ids[0], &world, b"token".to_vec(), &mut fx)
            .expect("publish");
        assert_eq!(
            state
                .rendezvous(&ids[1], &world, Vec::new(), &mut fx)
                .expect("read"),
            Some(b"token".to_vec())
        );
    }

    #[test]
    fn a_reloaded_state_keeps_worlds_and_gives_live_workers_a_fresh_lease() {
        let t0 = Instant::now();
        let (state, run_id, ids) = started(&[], 2, t0);
        let (world, _) = world_of(&state, &ids[0]).expect("world");
        let snapshot = Snapshot {
            runs: state
                .runs
                .values()
                .map(|e| (e.seq, e.run.clone()))
                .collect(),
            workers: state.workers.values().map(|w| w.row.clone()).collect(),
            counters: vec![
                ("next_run".into(), state.next_run),
                ("next_worker".into(), state.next_worker),
                ("next_world".into(), state.next_world),
            ],
            datasets: Vec::new(),
        };
        // Restarted an hour later: nobody has sent a heartbeat since t0.
        let later = t0 + Duration::from_secs(3600);
        let mut state = State::load(snapshot, later);
        let mut fx = Effects::default();
        state.expire_leases(later + Duration::from_secs(1), LEASE, 0, &mut fx);
        assert_eq!(world_of(&state, &ids[0]), Some((world.clone(), 0)));
        assert_eq!(world_of(&state, &ids[1]), Some((world, 1)));
        let next = state.submit(spec(&[]), 0, &mut fx).expect("submit");
        assert_ne!(next, run_id, "ids continue from the stored counters");
    }
}
