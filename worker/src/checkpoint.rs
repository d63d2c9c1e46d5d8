//! Checkpoints on object storage: weights, StableAdamW state and the
//! training position, written from a snapshot on a background thread and
//! committed by a marker written last.
//!
//! # Layout
//!
//! ```text
//! <ckpt_root>/<run_id>/<phase_index>-<phase_name>/step-NNNNNNN/
//!     model.safetensors      named f32 tensors, metadata format = "pt"
//!     optimizer.safetensors  NNNNN.exp_avg / NNNNN.exp_avg_sq per tensor; metadata: step, decay
//!     state.json             CheckpointState (position, RNG, data cursor, file hashes)
//!     COMMITTED              written last: a folder without it does not exist
//! ```
//!
//! `NNNNNNN` is the number of steps of the phase done. In data-parallel
//! training every rank holds the same weights and optimizer state after a
//! step, so rank 0 alone writes the checkpoint. A reader refuses a folder
//! without `COMMITTED` or whose files do not hash to what `state.json`
//! records. Tensors are stored little-endian, bit for bit.

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::loader::sha256_hex;
use crate::optim::TensorState;
use twinhead_data::store::{Location, StoreError};

/// Named f32 tensors: `(name, shape, values)` in model order.
pub type NamedTensors = Vec<(String, Vec<usize>, Vec<f32>)>;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const COMMITTED_FILE: &str = "COMMITTED";

/// Version of [`CheckpointState`]'s layout.
pub const FORMAT_VERSION: u32 = 1;

/// Errors of writing and loading checkpoints, naming the folder or file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("checkpoint {location} is not committed (no COMMITTED marker)")]
    NotCommitted { location: String },
    #[error("{location} has sha256 {actual}, state.json says {expected}")]
    Hash {
        location: String,
        expected: String,
        actual: String,
    },
    #[error("bad checkpoint file {location}: {message}")]
    Format { location: String, message: String },
    #[error("invalid checkpoint snapshot: {0}")]
    Snapshot(String),
    #[error("the checkpoint writer thread stopped")]
    WriterStopped,
    #[error("checkpoint {location} left uncommitted: {reason}")]
    Fenced { location: String, reason: String },
}

/// The optimizer state saved with a checkpoint
/// ([`crate::optim::StableAdamW::steps`] and `state()`; give it back with
/// `restore(step, tensors)`).
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    pub step: u64,
    pub tensors: Vec<TensorState>,
}

/// Where a checkpoint belongs and what the training loop knows at save.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub run_id: String,
    pub phase_index: u32,
    pub phase_name: String,
    /// Steps of the phase done (the next step to train).
    pub step: u64,
    /// Tokens seen by the run so far.
    pub tokens: u64,
    /// RNG seed and state words, as the training loop defines them.
    pub rng: Vec<u64>,
    /// Phase rows consumed by the whole world (steps × global batch).
    pub data_cursor: u64,
    /// Ranks when saved.
    pub world_size: u32,
    /// Run spec name.
    pub spec_name: String,
    /// The world (attempt) that wrote it.
    #[serde(default)]
    pub attempt: String,
    /// Whether it ends its phase (never pruned).
    #[serde(default)]
    pub phase_end: bool,
}

/// `state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub format_version: u32,
    #[serde(flatten)]
    pub info: CheckpointInfo,
    pub model_sha256: String,
    pub optimizer_sha256: String,
}

/// Everything a checkpoint holds, copied out of the training loop.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointSnapshot {
    pub info: CheckpointInfo,
    pub model: NamedTensors,
    pub optimizer: OptimizerState,
}

/// A committed checkpoint: its URL (to report to the coordinator) and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub url: String,
    pub state: CheckpointState,
}

/// A checkpoint read back.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedCheckpoint {
    pub url: String,
    pub state: CheckpointState,
    pub model: NamedTensors,
    pub optimizer: OptimizerState,
}

/// The folder of a checkpoint relative to the checkpoint root.
pub fn checkpoint_dir(run_id: &str, phase_index: u32, phase_name: &str, step: u64) -> String {
    format!("{run_id}/{phase_index}-{phase_name}/step-{step:07}")
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn bytes_f32(
    location: &str,
    name: &str,
    view: &TensorView<'_>,
) -> Result<Vec<f32>, CheckpointError> {
    if view.dtype() != Dtype::F32 {
        return Err(CheckpointError::Format {
            location: location.to_string(),
            message: format!("tensor `{name}` is {:?}, expected F32", view.dtype()),
        });
    }
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn serialize(
    tensors: &[(String, Vec<usize>, Vec<u8>)],
    mut metadata: HashMap<String, String>,
) -> Result<Vec<u8>, CheckpointError> {
    metadata.insert("format".into(), "pt".into());
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.as_str(), v))
                .map_err(|e| CheckpointError::Snapshot(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| CheckpointError::Snapshot(e.to_string()))
}

fn model_bytes(model: &NamedTensors) -> Result<Vec<u8>, CheckpointError> {
    let mut seen = std::collections::HashSet::new();
    for (name, shape, values) in model {
        if !seen.insert(name.as_str()) {
            return Err(CheckpointError::Snapshot(format!(
                "tensor `{name}` appears twice"
            )));
        }
        if shape.iter().product::<usize>() != values.len() {
            return Err(CheckpointError::Snapshot(format!(
                "tensor `{name}` has shape {shape:?} but {} values",
                values.len()
            )));
        }
    }
    let order: Vec<&str> = model.iter().map(|(n, _, _)| n.as_str()).collect();
    let order =
        serde_json::to_string(&order).map_err(|e| CheckpointError::Snapshot(e.to_string()))?;
    let tensors: Vec<_> = model
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), f32_bytes(v)))
        .collect();
    serialize(
        &tensors,
        HashMap::from([("tensor_order".to_string(), order)]),
    )
}

fn optimizer_bytes(optimizer: &OptimizerState) -> Result<Vec<u8>, CheckpointError> {
    let mut tensors = Vec::with_capacity(optimizer.tensors.len() * 2);
    for (i, t) in optimizer.tensors.iter().enumerate() {
        tensors.push((
            format!("{i:05}.exp_avg"),
            vec![t.exp_avg.len()],
            f32_bytes(&t.exp_avg),
        ));
        tensors.push((
            format!("{i:05}.exp_avg_sq"),
            vec![t.exp_avg_sq.len()],
            f32_bytes(&t.exp_avg_sq),
        ));
    }
    let decay: String = optimizer
        .tensors
        .iter()
        .map(|t| if t.decay { '1' } else { '0' })
        .collect();
    serialize(
        &tensors,
        HashMap::from([
            ("step".to_string(), optimizer.step.to_string()),
            ("tensors".to_string(), optimizer.tensors.len().to_string()),
            ("decay".to_string(), decay),
        ]),
    )
}

fn parse_metadata(
    location: &str,
    bytes: &[u8],
) -> Result<HashMap<String, String>, CheckpointError> {
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| CheckpointError::Format {
        location: location.to_string(),
        message: e.to_string(),
    })?;
    Ok(metadata.metadata().clone().unwrap_or_default())
}

fn parse_model(location: &str, bytes: &[u8]) -> Result<NamedTensors, CheckpointError> {
    let bad = |message: String| CheckpointError::Format {
        location: location.to_string(),
        message,
    };
    let metadata = parse_metadata(location, bytes)?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let order: Vec<String> = match metadata.get("tensor_order") {
        Some(order) => {
            serde_json::from_str(order).map_err(|e| bad(format!("tensor_order: {e}")))?
        }
        None => {
            let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
            names.sort();
            names
        }
    };
    if order.len() != st.len() {
        return Err(bad(format!(
            "tensor_order names {} tensors, the file holds {}",
            order.len(),
            st.len()
        )));
    }
    order
        .into_iter()
        .map(|name| {
            let view = st
                .tensor(&name)
                .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
            let values = bytes_f32(location, &name, &view)?;
            Ok((name, view.shape().to_vec(), values))
        })
        .collect()
}

fn parse_optimizer(location: &str, bytes: &[u8]) -> Result<OptimizerState, CheckpointError> {
    let bad = |message: String| CheckpointError::Format {
        location: location.to_string(),
        message,
    };
    let metadata = parse_metadata(location, bytes)?;
    let get = |key: &str| {
        metadata
            .get(key)
            .ok_or_else(|| bad(format!("no `{key}` in the metadata")))
    };
    let step: u64 = get("step")?
        .parse()
        .map_err(|e| bad(format!("step: {e}")))?;
    let count: usize = get("tensors")?
        .parse()
        .map_err(|e| bad(format!("tensors: {e}")))?;
    let decay: Vec<bool> = get("decay")?.chars().map(|c| c == '1').collect();
    if decay.len() != count {
        return Err(bad(format!(
            "decay has {} flags for {count} tensors",
            decay.len()
        )));
    }
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let read = |name: String| -> Result<Vec<f32>, CheckpointError> {
        let view = st
            .tensor(&name)
            .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        bytes_f32(location, &name, &view)
    };
    let tensors = decay
        .into_iter()
        .enumerate()
        .map(|(i, decay)| {
            Ok(TensorState {
                decay,
                exp_avg: read(format!("{i:05}.exp_avg"))?,
                exp_avg_sq: read(format!("{i:05}.exp_avg_sq"))?,
            })
        })
        .collect::<Result<Vec<_>, CheckpointError>>()?;
    Ok(OptimizerState { step, tensors })
}

/// Asked just before a checkpoint's `COMMITTED` marker is written: `Err`
/// (why) leaves the folder uncommitted. Workers pass their world's
/// liveness and lease (`runtime::Link::commit_fence`).
pub type Fence = std::sync::Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// A fence that always lets the commit through.
pub fn no_fence() -> Fence {
    std::sync::Arc::new(|| Ok(()))
}

/// Writes `snapshot` under the checkpoint root `root` and commits it,
/// synchronously. A folder left by an earlier, interrupted write of the
/// same step is overwritten (its marker is removed first).
pub fn write(root: &Location, snapshot: &CheckpointSnapshot) -> Result<Committed, CheckpointError> {
    write_fenced(root, snapshot, &no_fence())
}

/// [`write`], committing only if `fence` still allows it once every file
/// is written.
pub fn write_fenced(
    root: &Location,
    snapshot: &CheckpointSnapshot,
    fence: &Fence,
) -> Result<Committed, CheckpointError> {
    let info = &snapshot.info;
    let dir = root.child(&checkpoint_dir(
        &info.run_id,
        info.phase_index,
        &info.phase_name,
        info.step,
    ));
    let model = model_bytes(&snapshot.model)?;
    let optimizer = optimizer_bytes(&snapshot.optimizer)?;
    let state = CheckpointState {
        format_version: FORMAT_VERSION,
        info: info.clone(),
        model_sha256: sha256_hex(&model),
        optimizer_sha256: sha256_hex(&optimizer),
    };
    let state_json =
        serde_json::to_vec_pretty(&state).map_err(|e| CheckpointError::Snapshot(e.to_string()))?;
    let marker = format!("{}\n", sha256_hex(&state_json));
    dir.delete(COMMITTED_FILE)?;
    dir.put(MODEL_FILE, model)?;
    dir.put(OPTIMIZER_FILE, optimizer)?;
    dir.put(STATE_FILE, state_json)?;
    // A writer of this folder killed inside a write (an earlier attempt at
    // the same step) left its half-written file beside the whole ones.
    dir.remove_interrupted_writes()?;
    stall_before_commit();
    fence().map_err(|reason| CheckpointError::Fenced {
        location: dir.url().to_string(),
        reason,
    })?;
    dir.put(COMMITTED_FILE, marker)?;
    Ok(Committed {
        url: dir.url().to_string(),
        state,
    })
}

/// Test hook, off unless set: `TWINHEAD_TEST_STALL_CHECKPOINT_MS=N` makes
/// every checkpoint write wait N ms between its files and its `COMMITTED`
/// marker, so a process-level test can kill a worker mid-write.
const STALL_CHECKPOINT_ENV: &str = "TWINHEAD_TEST_STALL_CHECKPOINT_MS";

fn stall_before_commit() {
    let stall = std::env::var(STALL_CHECKPOINT_ENV)
        .ok()
        .and_then(|ms| ms.parse::<u64>().ok());
    if let Some(ms) = stall {
        tracing::warn!(
            ms,
            "test hook {STALL_CHECKPOINT_ENV}: stalling before COMMITTED"
        );
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

fn read_state(dir: &Location) -> Result<CheckpointState, CheckpointError> {
    if !dir.exists(COMMITTED_FILE)? {
        return Err(CheckpointError::NotCommitted {
            location: dir.url().to_string(),
        });
    }
    let bytes = dir.get(STATE_FILE)?;
    serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Format {
        location: dir.name(STATE_FILE),
        message: e.to_string(),
    })
}

fn get_checked(
    dir: &Location,
    file: &str,
    expected: &str,
) -> Result<bytes::Bytes, CheckpointError> {
    let bytes = dir.get(file)?;
    let actual = sha256_hex(&bytes);
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(CheckpointError::Hash {
            location: dir.name(file),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(bytes)
}

/// Loads the committed checkpoint at `url`, checking both files' hashes.
pub fn load(url: &str) -> Result<LoadedCheckpoint, CheckpointError> {
    let dir = Location::open(url, false)?;
    let state = read_state(&dir)?;
    let model_bytes = get_checked(&dir, MODEL_FILE, &state.model_sha256)?;
    let optimizer_bytes = get_checked(&dir, OPTIMIZER_FILE, &state.optimizer_sha256)?;
    Ok(LoadedCheckpoint {
        url: dir.url().to_string(),
        model: parse_model(&dir.name(MODEL_FILE), &model_bytes)?,
        optimizer: parse_optimizer(&dir.name(OPTIMIZER_FILE), &optimizer_bytes)?,
        state,
    })
}

/// A committed checkpoint found by listing.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CheckpointRef {
    pub phase_index: u32,
    pub step: u64,
    pub phase_name: String,
    pub url: String,
}

fn parse_phase_dir(name: &str) -> Option<(u32, String)> {
    let (index, phase) = name.split_once('-')?;
    Some((index.parse().ok()?, phase.to_string()))
}

fn parse_step_dir(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Every committed checkpoint of `run_id` under `ckpt_root`, oldest first
/// (by phase, then step). Folders without `COMMITTED` are left out.
pub fn committed(ckpt_root: &str, run_id: &str) -> Result<Vec<CheckpointRef>, CheckpointError> {
    let root = Location::open(ckpt_root, false)?;
    let run = root.child(run_id);
    let mut out = Vec::new();
    for phase_dir in run.list_dirs("")? {
        let Some((phase_index, phase_name)) = parse_phase_dir(&phase_dir) else {
            continue;
        };
        let phase = run.child(&phase_dir);
        for step_dir in phase.list_dirs("")? {
            let Some(step) = parse_step_dir(&step_dir) else {
                continue;
            };
            let dir = phase.child(&step_dir);
            if dir.exists(COMMITTED_FILE)? {
                out.push(CheckpointRef {
                    phase_index,
                    step,
                    phase_name: phase_name.clone(),
                    url: dir.url().to_string(),
                });
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest committed checkpoint of `run_id`, if any.
pub fn latest_committed(
    ckpt_root: &str,
    run_id: &str,
) -> Result<Option<CheckpointRef>, CheckpointError> {
    Ok(committed(ckpt_root, run_id)?.pop())
}

/// Loads the newest committed checkpoint of `run_id` that loads cleanly,
/// falling back to older ones when a newer one is corrupt; returns it with
/// the errors of the ones skipped (newest first).
pub fn load_latest_valid(
    ckpt_root: &str,
    run_id: &str,
) -> Result<(Option<LoadedCheckpoint>, Vec<CheckpointError>), CheckpointError> {
    let mut skipped = Vec::new();
    for found in committed(ckpt_root, run_id)?.into_iter().rev() {
        match load(&found.url) {
            Ok(loaded) => return Ok((Some(loaded), skipped)),
            Err(e) => {
                tracing::warn!(url = %found.url, error = %e, "skipping a corrupt checkpoint");
                skipped.push(e);
            }
        }
    }
    Ok((None, skipped))
}

/// Deletes all but the newest `keep_last` committed checkpoints of one
/// phase that do not end it. Returns the URLs removed.
pub fn prune(
    root: &Location,
    run_id: &str,
    phase_index: u32,
    phase_name: &str,
    keep_last: u32,
) -> Result<Vec<String>, CheckpointError> {
    if keep_last == 0 {
        return Ok(Vec::new());
    }
    let phase = root.child(&format!("{run_id}/{phase_index}-{phase_name}"));
    let mut candidates = Vec::new();
    for step_dir in phase.list_dirs("")? {
        let Some(step) = parse_step_dir(&step_dir) else {
            continue;
        };
        let dir = phase.child(&step_dir);
        match read_state(&dir) {
            Ok(state) if !state.info.phase_end => candidates.push((step, dir)),
            Ok(_) | Err(CheckpointError::NotCommitted { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    candidates.sort_by_key(|(step, _)| *step);
    let remove = candidates.len().saturating_sub(keep_last as usize);
    let mut removed = Vec::new();
    for (_, dir) in candidates.into_iter().take(remove) {
        // Uncommit first, so a crash half-way leaves an ignored folder.
        dir.delete(COMMITTED_FILE)?;
        dir.remove_all("")?;
        removed.push(dir.url().to_string());
    }
    Ok(removed)
}

struct Job {
    snapshot: CheckpointSnapshot,
    done: Sender<Result<Committed, CheckpointError>>,
}

/// Writes checkpoints on a background thread, one after another, so the
/// training step only pays for copying the snapshot. After each commit the
/// phase's older checkpoints are pruned to `keep_last` (0: keep all).
pub struct CheckpointWriter {
    tx: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
    root: Location,
}

impl std::fmt::Debug for CheckpointWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointWriter")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

/// A checkpoint being written.
#[derive(Debug)]
pub struct CheckpointHandle {
    url: String,
    rx: Receiver<Result<Committed, CheckpointError>>,
}

impl CheckpointHandle {
    /// Where the checkpoint is being written.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Blocks until the checkpoint is committed (then report
    /// `Committed::url` to the coordinator) or failed.
    pub fn wait(self) -> Result<Committed, CheckpointError> {
        self.rx.recv().map_err(|_| CheckpointError::WriterStopped)?
    }

    /// The result if the write has finished, without blocking.
    pub fn try_wait(&self) -> Option<Result<Committed, CheckpointError>> {
        match self.rx.try_recv() {
            Ok(result) => Some(result),
            Err(std::sync::mpsc::TryRecvError::Empty) => None,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                Some(Err(CheckpointError::WriterStopped))
            }
        }
    }
}

impl CheckpointWriter {
    /// Starts the writer thread for checkpoints under `ckpt_root` (a local
    /// path, `file://` or cloud URL).
    pub fn spawn(ckpt_root: &str, keep_last: u32) -> Result<Self, CheckpointError> {
        Self::spawn_fenced(ckpt_root, keep_last, no_fence())
    }

    /// [`CheckpointWriter::spawn`], each commit asking `fence` first.
    pub fn spawn_fenced(
        ckpt_root: &str,
        keep_last: u32,
        fence: Fence,
    ) -> Result<Self, CheckpointError> {
        let root = Location::open(ckpt_root, true)?;
        let (tx, rx) = channel::<Job>();
        let thread_root = root.clone();
        let handle = std::thread::Builder::new()
            .name("twinhead-checkpoint".into())
            .spawn(move || {
                for job in rx {
                    let result =
                        write_fenced(&thread_root, &job.snapshot, &fence).and_then(|committed| {
                            let info = &job.snapshot.info;
                            prune(
                                &thread_root,
                                &info.run_id,
                                info.phase_index,
                                &info.phase_name,
                                keep_last,
                            )?;
                            Ok(committed)
                        });
                    if let Err(e) = &result {
                        tracing::warn!(error = %e, "checkpoint write failed");
                    }
                    let _ = job.done.send(result);
                }
            })
            .map_err(|e| {
                CheckpointError::Snapshot(format!("cannot start the writer thread: {e}"))
            })?;
        Ok(Self {
            tx: Some(tx),
            handle: Some(handle),
            root,
        })
    }

    /// Queues `snapshot` for writing; returns at once.
    pub fn write_async(
        &self,
        snapshot: CheckpointSnapshot,
    ) -> Result<CheckpointHandle, CheckpointError> {
        let info = &snapshot.info;
        let url = self.root.name(&checkpoint_dir(
            &info.run_id,
            info.phase_index,
            &info.phase_name,
            info.step,
        ));
        let (done, rx) = channel();
        self.tx
            .as_ref()
            .ok_or(CheckpointError::WriterStopped)?
            .send(Job { snapshot, done })
            .map_err(|_| CheckpointError::WriterStopped)?;
        Ok(CheckpointHandle { url, rx })
    }

    /// Finishes the queued writes and stops the thread.
    pub fn wait(mut self) -> Result<(), CheckpointError> {
        self.tx = None;
        match self.handle.take() {
            Some(handle) => handle.join().map_err(|_| CheckpointError::WriterStopped),
            None => Ok(()),
        }
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests;
