//! Collectives between the data-parallel ranks of one world.
//!
//! The training thread talks to a [`Collective`]: a small synchronous trait
//! (`all_reduce_mean`, `broadcast`, `barrier`, `check_fingerprint`) with
//! three engines behind it:
//!
//! * [`SingleProcess`]: world size 1, every call is a no-op.
//! * [`CpuRingEngine`]: processes on CPUs connected by TCP, a ring
//!   all-reduce that is bitwise deterministic (see [`ring`] for the rule).
//!   Rank 0 opens a [`RingHost`] whose [`RingHost::token`] travels through
//!   the coordinator; other ranks call [`CpuRingEngine::connect`] with it.
//! * `NcclEngine` (cargo feature `cuda`): NCCL through `cudarc`, on device
//!   buffers; its rendezvous token is the 128-byte NCCL unique id.
//!
//! # Use
//!
//! ```no_run
//! use twinhead_worker::collective::{Collective, CpuRingEngine, RingConfig};
//! # fn publish(_: &[u8]) {}
//! # fn fetch() -> Vec<u8> { Vec::new() }
//! # fn main() -> Result<(), twinhead_worker::collective::CollectiveError> {
//! # let (rank, world, fingerprint) = (0usize, 2usize, 0u64);
//! let cfg = RingConfig::default();
//! let mut c: Box<dyn Collective> = if rank == 0 {
//!     let host = CpuRingEngine::host(world, cfg)?;
//!     publish(host.token()); // WorkerService.Rendezvous
//!     Box::new(host.accept()?)
//! } else {
//!     Box::new(CpuRingEngine::connect(&fetch(), rank, world, cfg)?)
//! };
//! c.check_fingerprint(fingerprint)?; // same gradient layout everywhere
//! let abort = c.abort_handle(); // give to the heartbeat thread
//! let mut grads = vec![0.0f32; 1000]; // all gradients, flattened in module order
//! c.all_reduce_mean(&mut grads)?;
//! # drop(abort);
//! # Ok(())
//! # }
//! ```
//!
//! Every blocking call has a deadline, and [`AbortHandle::abort`] (from any
//! thread) makes a blocked call on this rank return
//! [`CollectiveError::Aborted`] at once; the other ranks see their
//! connections close and fail promptly too. After any error an engine is
//! poisoned: later calls fail with [`CollectiveError::Poisoned`] and the
//! world must be re-formed.

pub mod ring;

#[cfg(feature = "cuda")]
pub mod nccl;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub use ring::{CpuRingEngine, RingConfig, RingHost, RingPeer};

#[cfg(feature = "cuda")]
pub use nccl::NcclEngine;

/// Errors of every collective engine. Messages name the ranks involved.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// `abort()` was called on this rank.
    #[error("rank {rank}: collective aborted")]
    Aborted { rank: usize },
    /// A peer's connection closed (the peer died or aborted).
    #[error("rank {rank}: rank {peer} closed its connection during {op}")]
    PeerClosed {
        rank: usize,
        peer: usize,
        op: &'static str,
    },
    /// No progress with a peer for longer than the configured timeout.
    #[error("rank {rank}: no progress with rank {peer} for {secs:.1} s during {op}")]
    Timeout {
        rank: usize,
        peer: usize,
        op: &'static str,
        secs: f64,
    },
    /// A device-side collective did not complete in time (NCCL does not say
    /// which peer is missing).
    #[error("rank {rank}: {op} did not complete within {secs:.1} s")]
    DeviceTimeout {
        rank: usize,
        op: &'static str,
        secs: f64,
    },
    /// Any other socket error.
    #[error("rank {rank}: i/o error with rank {peer} during {op}: {source}")]
    Io {
        rank: usize,
        peer: usize,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Neighbouring ranks entered different collective calls.
    #[error("rank {rank}: call mismatch: this rank called {mine}, rank {peer} called {theirs}")]
    CallMismatch {
        rank: usize,
        peer: usize,
        mine: String,
        theirs: String,
    },
    /// Ranks disagree on the model's shape fingerprint.
    #[error("rank {rank}: shape fingerprint mismatch: {}", describe_groups(.groups))]
    FingerprintMismatch {
        rank: usize,
        /// Each distinct fingerprint with the ranks that reported it.
        groups: Vec<(u64, Vec<usize>)>,
    },
    /// A rendezvous token that cannot be parsed.
    #[error("invalid rendezvous token: {0}")]
    BadToken(String),
    /// The world could not be formed (wrong nonce, rank out of range, ...).
    #[error("rendezvous failed: {0}")]
    Rendezvous(String),
    /// A caller error (root out of range, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An earlier call failed; the world has to be re-formed.
    #[error("rank {rank}: collective unusable after an earlier error: {first}")]
    Poisoned { rank: usize, first: String },
    /// The accelerator runtime failed (CUDA, NCCL).
    #[error("{0}")]
    Backend(String),
    /// A runtime library (libcuda, libnccl) could not be loaded.
    #[error("library not available: {0}")]
    LibraryMissing(String),
}

fn describe_groups(groups: &[(u64, Vec<usize>)]) -> String {
    groups
        .iter()
        .map(|(fp, ranks)| format!("{fp:#018x} on ranks {ranks:?}"))
        .collect::<Vec<_>>()
        .join("; ")
}

pub type Result<T, E = CollectiveError> = std::result::Result<T, E>;

/// Something that can abort an engine from another thread.
pub trait Abort: Send + Sync {
    fn abort(&self);
    fn is_aborted(&self) -> bool;
}

/// A cloneable handle that aborts one engine from any thread: a call
/// blocked in that engine returns [`CollectiveError::Aborted`] promptly and
/// the engine stays unusable.
#[derive(Clone)]
pub struct AbortHandle(Arc<dyn Abort>);

impl AbortHandle {
    pub fn new(inner: Arc<dyn Abort>) -> Self {
        Self(inner)
    }
    pub fn abort(&self) {
        self.0.abort();
    }
    pub fn is_aborted(&self) -> bool {
        self.0.is_aborted()
    }
}

impl fmt::Debug for AbortHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AbortHandle")
            .field("aborted", &self.is_aborted())
            .finish()
    }
}

/// The collective operations the training loop needs. Calls are
/// synchronous and must be made by every rank of the world in the same
/// order with the same lengths (engines detect a mismatch where they can).
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;

    /// Replaces `buf` on every rank by the element-wise mean over ranks.
    /// The result is bitwise identical on every rank.
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()>;

    /// Copies `buf` of rank `root` into `buf` on every other rank.
    fn broadcast_bytes(&mut self, buf: &mut [u8], root: usize) -> Result<()>;

    /// [`Collective::broadcast_bytes`] for `f32` buffers.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.broadcast_bytes(bytemuck::cast_slice_mut(buf), root)
    }

    /// Returns once every rank has entered the barrier.
    fn barrier(&mut self) -> Result<()>;

    /// A handle that aborts this engine from another thread.
    fn abort_handle(&self) -> AbortHandle;

    /// The NCCL engine behind this collective, for buffers that are already
    /// on the GPU ([`nccl::all_reduce_mean_tensor`]).
    #[cfg(feature = "cuda")]
    fn as_nccl(&mut self) -> Option<&mut NcclEngine> {
        None
    }

    /// Aborts this engine (see [`AbortHandle`]).
    fn abort(&self) {
        self.abort_handle().abort();
    }

    /// Checks that every rank computed the same shape fingerprint (of the
    /// flattened gradient layout, say) before the first step. On a mismatch
    /// every rank returns [`CollectiveError::FingerprintMismatch`] naming
    /// which ranks hold which fingerprint.
    fn check_fingerprint(&mut self, fingerprint: u64) -> Result<()> {
        let world = self.world_size();
        let rank = self.rank();
        let mut all = Vec::with_capacity(world);
        for root in 0..world {
            let mut bytes = if root == rank {
                fingerprint.to_le_bytes()
            } else {
                [0u8; 8]
            };
            self.broadcast_bytes(&mut bytes, root)?;
            all.push(u64::from_le_bytes(bytes));
        }
        fingerprint_groups(rank, &all)
    }
}

/// Groups the fingerprints by value (in order of the lowest rank holding
/// each) and returns an error when there is more than one group.
pub fn fingerprint_groups(rank: usize, all: &[u64]) -> Result<()> {
    let mut groups: Vec<(u64, Vec<usize>)> = Vec::new();
    for (r, &fp) in all.iter().enumerate() {
        match groups.iter_mut().find(|(g, _)| *g == fp) {
            Some((_, ranks)) => ranks.push(r),
            None => groups.push((fp, vec![r])),
        }
    }
    if groups.len() > 1 {
        return Err(CollectiveError::FingerprintMismatch { rank, groups });
    }
    Ok(())
}

/// World size 1: nothing to exchange.
#[derive(Debug, Default)]
pub struct SingleProcess {
    aborted: Arc<Flag>,
}

#[derive(Debug, Default)]
struct Flag(AtomicBool);

impl Abort for Flag {
    fn abort(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    fn is_aborted(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl SingleProcess {
    pub fn new() -> Self {
        Self::default()
    }

    fn check(&self, root: Option<usize>) -> Result<()> {
        if self.aborted.is_aborted() {
            return Err(CollectiveError::Aborted { rank: 0 });
        }
        if let Some(root) = root.filter(|&r| r != 0) {
            return Err(CollectiveError::InvalidArgument(format!(
                "broadcast root {root} is not a rank of a world of size 1"
            )));
        }
        Ok(())
    }
}

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_mean(&mut self, _buf: &mut [f32]) -> Result<()> {
        self.check(None)
    }
    fn broadcast_bytes(&mut self, _buf: &mut [u8], root: usize) -> Result<()> {
        self.check(Some(root))
    }
    fn barrier(&mut self) -> Result<()> {
        self.check(None)
    }
    fn abort_handle(&self) -> AbortHandle {
        AbortHandle::new(self.aborted.clone())
    }
    fn check_fingerprint(&mut self, _fingerprint: u64) -> Result<()> {
        self.check(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_process_is_identity_and_aborts() {
        let mut c = SingleProcess::new();
        let mut buf = vec![1.5f32, -2.0, 3.25];
        c.all_reduce_mean(&mut buf).expect("all-reduce");
        assert_eq!(buf, vec![1.5, -2.0, 3.25]);
        c.broadcast(&mut buf, 0).expect("broadcast");
        assert!(matches!(
            c.broadcast(&mut buf, 1),
            Err(CollectiveError::InvalidArgument(_))
        ));
        c.barrier().expect("barrier");
        c.check_fingerprint(42).expect("fingerprint");
        let h = c.abort_handle();
        h.abort();
        assert!(matches!(
            c.barrier(),
            Err(CollectiveError::Aborted { rank: 0 })
        ));
    }

    #[test]
    fn fingerprint_groups_names_ranks() {
        assert!(fingerprint_groups(0, &[7, 7, 7]).is_ok());
        let err = fingerprint_groups(1, &[7, 9, 7]).expect_err("mismatch");
        match &err {
            CollectiveError::FingerprintMismatch { groups, .. } => {
                assert_eq!(groups, &vec![(7, vec![0, 2]), (9, vec![1])]);
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("ranks [0, 2]"), "{msg}");
        assert!(msg.contains("ranks [1]"), "{msg}");
    }
}
