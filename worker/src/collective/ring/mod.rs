//! CPU collective engine: a ring over TCP between worker processes.
//!
//! # Rendezvous
//!
//! ```text
//!  rank 0: CpuRingEngine::host(world, cfg) -> RingHost      (binds control + data listeners)
//!          host.token()  --- coordinator --->  ranks 1..n   (opaque bytes: magic, nonce, host:port)
//!  rank k: CpuRingEngine::connect(token, k, world, cfg)      (binds its data listener,
//!          --hello{nonce, k, world, data addr}--> rank 0     sends it to rank 0)
//!  rank 0: once all n-1 hellos are in, replies to each rank k with the data address of rank k+1
//!  all:    connect to the right neighbour's data listener (hello with the nonce),
//!          accept the left neighbour's connection           -> CpuRingEngine
//! ```
//!
//! Every rank sends to rank `r+1 mod n` and receives from rank `r-1 mod n`
//! on two TCP connections (`TCP_NODELAY`). The nonce is random per world, so
//! a stale process from an earlier world cannot join a new one.
//!
//! # All-reduce and its summation order
//!
//! The buffer of `len` elements is cut into `n` segments, segment `c` being
//! elements `[⌊c·len/n⌋, ⌊(c+1)·len/n⌋)`, and each segment into chunks of
//! `chunk_bytes`. Reduce-scatter: in step `s = 0..n-1` rank `r` sends segment
//! `r-s` and receives segment `r-s-1` (mod `n`), adding its own values to the
//! received partial sums. The partial sum of segment `c` therefore starts at
//! rank `c` and travels up the ring, so every element `i` of segment `c` is
//! reduced as
//!
//! ```text
//! mean[i] = ((((x_c[i] + x_{c+1}[i]) + x_{c+2}[i]) + … ) + x_{c+n-1}[i]) / n     (rank indices mod n)
//! ```
//!
//! on exactly one rank (rank `c-1`), which then sends the finished value
//! around the ring (all-gather) where it is copied, never recomputed. The
//! order depends only on `len` and `n`, not on chunk size, timing or thread
//! scheduling, so the result is bitwise identical on every rank and in
//! every run with the same world size.
//!
//! # Pipelining
//!
//! A scoped sender thread writes chunks to the right neighbour while the
//! calling thread reads and reduces chunks from the left neighbour. A chunk
//! reduced in step `s` is queued for sending in step `s+1` at once, so the
//! link is busy in both directions throughout. Chunks move between the two
//! threads as `&mut` borrows through channels (no copies, no locks).
//!
//! # Failure
//!
//! A rank with nothing to send for `keepalive_interval` (between calls, or
//! inside one while the ring waits on a slower rank) sends its right
//! neighbour a one-byte keepalive; data chunks carry a one-byte tag. So a
//! read that hears nothing for `silence_timeout` means a stalled link or a
//! stopped process, found in seconds whatever the compute skew, while a
//! neighbour that is alive but slow is waited for up to `op_timeout` (which
//! also bounds every write). Each operation starts with a header (sequence
//! number, kind, root, length) that the receiver checks against its own, so
//! ranks that disagree about the call fail with
//! [`CollectiveError::CallMismatch`] instead of exchanging garbage. On any
//! error, and on [`AbortHandle::abort`], the engine shuts its sockets down;
//! the neighbours then see their connections close, fail and shut down
//! theirs, so a failure anywhere reaches every rank within milliseconds.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use bytemuck::Pod;

use super::{Abort, AbortHandle, Collective, CollectiveError, Result};

mod rendezvous;
mod sockets;
mod wire;

pub use rendezvous::{RingHost, RingPeer};
use sockets::net_err;
use wire::{
    CHUNK, KEEPALIVE, KIND_ALL_REDUCE, KIND_BARRIER, KIND_BROADCAST, OP_HEADER_LEN, OpHeader,
};

/// Settings of the CPU ring engine. The same values should be used on
/// every rank.
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// Address the listeners bind to (port chosen by the OS). Tests use
    /// loopback.
    pub bind_ip: IpAddr,
    /// Address other ranks should dial to reach this one; defaults to
    /// `bind_ip`, or, when that is unspecified (`0.0.0.0`), to the local
    /// address of the connection to rank 0 (rank 0 itself then needs it).
    pub advertise_ip: Option<IpAddr>,
    /// A collective call fails when a write makes no progress, or the left
    /// neighbour does not start the same call, for this long (so it must
    /// exceed the largest compute skew between ranks).
    pub op_timeout: Duration,
    /// Between calls every rank sends its right neighbour a keepalive this
    /// often, so that a silent link means a stalled link or process rather
    /// than a slow step.
    pub keepalive_interval: Duration,
    /// Reading fails when nothing at all (data or keepalive) arrives from
    /// the left neighbour for this long: a stalled link or a stopped
    /// process is found in seconds whatever the compute skew. Capped at
    /// `op_timeout`.
    pub silence_timeout: Duration,
    /// Deadline for forming the world.
    pub connect_timeout: Duration,
    /// Pipelining granularity.
    pub chunk_bytes: usize,
    /// `SO_SNDBUF`/`SO_RCVBUF` of the data sockets; `None` keeps the OS
    /// default (and its autotuning).
    pub socket_buffer_bytes: Option<usize>,
}

impl RingConfig {
    /// How long a read from the left neighbour may wait for a byte.
    fn read_timeout(&self) -> Duration {
        self.silence_timeout
            .min(self.op_timeout)
            .max(Duration::from_millis(1))
    }
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            advertise_ip: None,
            op_timeout: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(1),
            silence_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(120),
            chunk_bytes: 512 * 1024,
            socket_buffer_bytes: None,
        }
    }
}

/// State reachable from an [`AbortHandle`].
struct Shared {
    rank: usize,
    aborted: AtomicBool,
    /// The first error, once the engine has failed.
    poisoned: Mutex<Option<String>>,
    /// Clones of the data sockets, shut down on failure or abort.
    sockets: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn new(rank: usize) -> Arc<Self> {
        Arc::new(Self {
            rank,
            aborted: AtomicBool::new(false),
            poisoned: Mutex::new(None),
            sockets: Mutex::new(Vec::new()),
        })
    }

    fn shutdown_sockets(&self) {
        let sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        for s in sockets.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn poison(&self, why: &CollectiveError) {
        {
            let mut p = self.poisoned.lock().unwrap_or_else(|p| p.into_inner());
            if p.is_none() {
                *p = Some(why.to_string());
            }
        }
        self.shutdown_sockets();
    }

    fn poisoned(&self) -> Option<String> {
        self.poisoned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }

    fn check_aborted(&self) -> Result<()> {
        if self.is_aborted() {
            return Err(CollectiveError::Aborted { rank: self.rank });
        }
        Ok(())
    }
}

impl Abort for Shared {
    fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        self.shutdown_sockets();
    }
    fn is_aborted(&self) -> bool {
        Shared::is_aborted(self)
    }
}

/// The first error of one operation; recording it shuts the sockets down so
/// that the other thread of the operation stops blocking.
struct OpFailure<'a> {
    shared: &'a Shared,
    first: Mutex<Option<CollectiveError>>,
}

impl<'a> OpFailure<'a> {
    fn new(shared: &'a Shared) -> Self {
        Self {
            shared,
            first: Mutex::new(None),
        }
    }

    fn record(&self, e: CollectiveError) {
        {
            let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
            if first.is_none() {
                *first = Some(e);
            }
        }
        self.shared.shutdown_sockets();
    }

    fn take(self) -> Option<CollectiveError> {
        self.first.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

/// A chunk travelling between the reducing thread and the sender thread:
/// (segment, chunk index, data).
type Chunk<'a, T> = (usize, usize, &'a mut [T]);

/// Splits `buf` into `n` segments (segment `c` = `[c·len/n, (c+1)·len/n)`)
/// of chunks of at most `chunk` elements.
fn split_segments<T>(buf: &mut [T], n: usize, chunk: usize) -> Vec<Vec<Option<&mut [T]>>> {
    let len = buf.len();
    let mut out = Vec::with_capacity(n);
    let mut rest = buf;
    for c in 0..n {
        let size = (c + 1) * len / n - c * len / n;
        let (seg, tail) = std::mem::take(&mut rest).split_at_mut(size);
        rest = tail;
        out.push(seg.chunks_mut(chunk.max(1)).map(Some).collect());
    }
    out
}

/// The sender half of an operation: writes every chunk it is handed, in
/// order, handing each back when written; while it waits for the next one
/// (the ring is waiting on a slower rank) it sends keepalives.
fn send_loop<'a, T: Pod>(
    mut out: &TcpStream,
    rx: mpsc::Receiver<Chunk<'a, T>>,
    back: mpsc::Sender<Chunk<'a, T>>,
    keepalive: Duration,
) -> io::Result<()> {
    loop {
        match rx.recv_timeout(keepalive) {
            Ok((seg, k, data)) => {
                write_chunk(out, bytemuck::cast_slice(&*data))?;
                // The reducing thread may be done with this chunk already.
                let _ = back.send((seg, k, data));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => out.write_all(&[KEEPALIVE])?,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// Writes the chunk tag and the chunk in one call where the kernel takes
/// both.
fn write_chunk(mut out: &TcpStream, data: &[u8]) -> io::Result<()> {
    let tag = [CHUNK];
    let mut sent = 0;
    let total = 1 + data.len();
    while sent < total {
        let n = if sent == 0 {
            out.write_vectored(&[io::IoSlice::new(&tag), io::IoSlice::new(data)])?
        } else {
            out.write(&data[sent - 1..])?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        sent += n;
    }
    Ok(())
}

/// A neighbour that kept its link alive but did not send what the call
/// needs before the op timeout.
#[derive(Debug)]
struct NotArrived;

impl std::fmt::Display for NotArrived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("only keepalives arrived until the op timeout")
    }
}

impl std::error::Error for NotArrived {}

/// Names a failed read from the left neighbour: silence for the read
/// timeout, or keepalives only for the op timeout.
fn read_failed(
    rank: usize,
    peer: usize,
    op: &'static str,
    cfg: &RingConfig,
    e: io::Error,
) -> CollectiveError {
    let waited = if e.get_ref().is_some_and(|inner| inner.is::<NotArrived>()) {
        cfg.op_timeout
    } else {
        cfg.read_timeout()
    };
    net_err(rank, peer, op, waited, e)
}

/// Reads bytes until one that is not a keepalive and returns it; keepalives
/// past `deadline` (a neighbour alive but not arriving) are a timeout.
fn skip_keepalives(mut left: &TcpStream, deadline: Instant) -> io::Result<u8> {
    loop {
        let mut b = [0u8; 1];
        left.read_exact(&mut b)?;
        if b[0] != KEEPALIVE {
            return Ok(b[0]);
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, NotArrived));
        }
    }
}

/// Reads the next chunk of an operation from the left neighbour.
fn read_chunk(left: &TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    match skip_keepalives(left, deadline)? {
        CHUNK => {
            let mut left = left;
            left.read_exact(buf)
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected a chunk, got byte {other:#04x}"),
        )),
    }
}

/// The ends of an operation's sender thread: chunks sent on `to_right` are
/// written to the right neighbour in order and come back on `written`.
struct Sender<'s, 'a, T> {
    to_right: &'s mpsc::Sender<Chunk<'a, T>>,
    written: &'s mpsc::Receiver<Chunk<'a, T>>,
}

/// The connection to the right neighbour, as an operation writes to it.
struct RightLink<'a> {
    stream: &'a TcpStream,
    /// Held for the whole operation, keeping the keepalive thread out.
    writing: &'a Mutex<()>,
    /// How long the sender may wait for a chunk before a keepalive.
    keepalive: Duration,
}

/// Runs one operation: sends `header` to the right neighbour, starts the
/// thread that writes chunks to it, and runs `receive` (reading from the
/// left) on this thread. The first failure on either side is recorded in
/// `failure` (aborting the world) and returned; `send_failed` names a
/// failed write.
fn with_sender<'a, T: Pod + Send>(
    link: RightLink<'_>,
    header: &OpHeader,
    failure: OpFailure<'_>,
    send_failed: impl Fn(io::Error) -> CollectiveError + Send + Sync,
    lost: impl Fn() -> CollectiveError,
    receive: impl FnOnce(Sender<'_, 'a, T>) -> Result<()>,
) -> Result<()> {
    let RightLink {
        stream: right,
        writing,
        keepalive,
    } = link;
    // The keepalive thread writes only between calls.
    let _writing = writing.lock().unwrap_or_else(|p| p.into_inner());
    // The header goes out before anything can fail, so that a neighbour
    // that disagrees about the call reads it and reports the mismatch.
    let mut out = right;
    out.write_all(&header.encode()).map_err(&send_failed)?;
    thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<Chunk<'a, T>>();
        let (back_tx, back_rx) = mpsc::channel::<Chunk<'a, T>>();
        let (send_failed, failure) = (&send_failed, &failure);
        let sender = s.spawn(move || {
            if let Err(e) = send_loop(right, rx, back_tx, keepalive) {
                failure.record(send_failed(e));
            }
        });
        let result = receive(Sender {
            to_right: &tx,
            written: &back_rx,
        });
        drop(tx);
        if let Err(e) = result {
            failure.record(e);
        }
        if sender.join().is_err() {
            failure.record(lost());
        }
    });
    match failure.take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A world of processes connected in a ring over TCP. See the module
/// documentation for the protocol and the summation order.
pub struct CpuRingEngine {
    rank: usize,
    world: usize,
    /// Receives from rank `rank-1`; `None` in a world of one.
    left: Option<TcpStream>,
    /// Sends to rank `rank+1`; `None` in a world of one.
    right: Option<TcpStream>,
    shared: Arc<Shared>,
    cfg: RingConfig,
    seq: u64,
    scratch: Vec<f32>,
    /// Held while a call writes to the right neighbour.
    writing: Arc<Mutex<()>>,
    /// Dropping it stops the keepalive thread.
    _keepalive: Option<mpsc::Sender<()>>,
}

impl std::fmt::Debug for CpuRingEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuRingEngine")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("seq", &self.seq)
            .finish()
    }
}

impl CpuRingEngine {
    /// A world of one: every call is a no-op (no sockets).
    pub fn single() -> Self {
        Self {
            rank: 0,
            world: 1,
            left: None,
            right: None,
            shared: Shared::new(0),
            cfg: RingConfig::default(),
            seq: 0,
            scratch: Vec::new(),
            writing: Arc::default(),
            _keepalive: None,
        }
    }

    fn left_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    fn right_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn precheck(&self) -> Result<()> {
        self.shared.check_aborted()?;
        if let Some(first) = self.shared.poisoned() {
            return Err(CollectiveError::Poisoned {
                rank: self.rank,
                first,
            });
        }
        Ok(())
    }

    fn next_header(&mut self, kind: u8, root: usize, len: usize) -> OpHeader {
        self.seq += 1;
        OpHeader {
            seq: self.seq,
            kind,
            root: root as u32,
            len: len as u64,
        }
    }

    /// Turns an operation's outcome into the caller's result, poisoning the
    /// engine on failure.
    fn finish(&self, res: Result<()>) -> Result<()> {
        match res {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = if self.shared.is_aborted() {
                    CollectiveError::Aborted { rank: self.rank }
                } else {
                    e
                };
                self.shared.poison(&e);
                Err(e)
            }
        }
    }

    fn streams(&self) -> Result<(&TcpStream, &TcpStream)> {
        match (&self.left, &self.right) {
            (Some(l), Some(r)) => Ok((l, r)),
            _ => Err(CollectiveError::InvalidArgument(
                "engine has no connections".into(),
            )),
        }
    }

    /// Reads the left neighbour's header and compares it with ours.
    /// The right neighbour's connection as an operation writes to it.
    fn right_link<'a>(&'a self, stream: &'a TcpStream) -> RightLink<'a> {
        RightLink {
            stream,
            writing: &self.writing,
            keepalive: self.cfg.keepalive_interval,
        }
    }

    /// Reads the left neighbour's header and compares it with ours,
    /// skipping the keepalives it sends while it has not reached the call
    /// (for at most `op_timeout`).
    fn check_header(&self, mut left: &TcpStream, mine: &OpHeader, op: &'static str) -> Result<()> {
        let peer = self.left_rank();
        let net = |e| read_failed(self.rank, peer, op, &self.cfg, e);
        let mut b = [0u8; OP_HEADER_LEN];
        b[0] = skip_keepalives(left, Instant::now() + self.cfg.op_timeout).map_err(net)?;
        left.read_exact(&mut b[1..]).map_err(net)?;
        let theirs = OpHeader::decode(&b).ok_or_else(|| CollectiveError::CallMismatch {
            rank: self.rank,
            peer,
            mine: mine.describe(),
            theirs: "an unknown message".into(),
        })?;
        if &theirs != mine {
            return Err(CollectiveError::CallMismatch {
                rank: self.rank,
                peer,
                mine: mine.describe(),
                theirs: theirs.describe(),
            });
        }
        Ok(())
    }

    /// Ring all-reduce (mean) of `buf`; `op` names the call in errors.
    fn ring_all_reduce(
        &mut self,
        buf: &mut [f32],
        header: OpHeader,
        op: &'static str,
    ) -> Result<()> {
        let n = self.world;
        let r = self.rank;
        let chunk_elems = (self.cfg.chunk_bytes / 4).max(1);
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(chunk_elems, 0.0);
        let (left, right) = self.streams()?;
        let (rank, lrank, rrank, timeout) =
            (r, self.left_rank(), self.right_rank(), self.cfg.op_timeout);
        let failure = OpFailure::new(&self.shared);
        let lost =
            || CollectiveError::Backend(format!("rank {rank}: internal: sender thread stopped"));
        let mut slots = split_segments(buf, n, chunk_elems);
        let n_f32 = n as f32;
        let send_failed = move |e| net_err(rank, rrank, op, timeout, e);
        let result = with_sender(
            self.right_link(right),
            &header,
            failure,
            send_failed,
            lost,
            |sender| {
                let tx = sender.to_right;
                // Reduce-scatter step 0 sends this rank's own segment.
                for (k, slot) in slots[r].iter_mut().enumerate() {
                    if let Some(c) = slot.take() {
                        tx.send((r, k, c)).map_err(|_| lost())?;
                    }
                }
                self.check_header(left, &header, op)?;
                let deadline = Instant::now() + self.cfg.op_timeout;
                let cfg = &self.cfg;
                let net = |e| read_failed(rank, lrank, op, cfg, e);
                // Reduce-scatter: step s receives segment r-s-1 and adds this
                // rank's values to the partial sums of ranks r-s-1 .. r-1.
                for step in 0..n - 1 {
                    let seg = (r + 2 * n - step - 1) % n;
                    let last = step == n - 2;
                    for k in 0..slots[seg].len() {
                        let dst = slots[seg][k].take().ok_or_else(lost)?;
                        let m = dst.len();
                        let incoming = &mut scratch[..m];
                        read_chunk(left, bytemuck::cast_slice_mut(incoming), deadline)
                            .map_err(net)?;
                        if last {
                            for (d, x) in dst.iter_mut().zip(incoming.iter()) {
                                *d = (*x + *d) / n_f32;
                            }
                        } else {
                            for (d, x) in dst.iter_mut().zip(incoming.iter()) {
                                *d += *x; // x: partial sum of the ranks before this one
                            }
                        }
                        // Sent in the next reduce-scatter step, or (the
                        // finished segment r+1) in all-gather step 0.
                        tx.send((seg, k, dst)).map_err(|_| lost())?;
                    }
                }
                // All-gather: step t receives the finished segment r-t.
                for step in 0..n - 1 {
                    let seg = (r + n - step) % n;
                    for k in 0..slots[seg].len() {
                        let dst = loop {
                            if let Some(c) = slots[seg][k].take() {
                                break c;
                            }
                            let (s2, k2, c) = sender.written.recv().map_err(|_| lost())?;
                            slots[s2][k2] = Some(c);
                        };
                        read_chunk(left, bytemuck::cast_slice_mut(&mut *dst), deadline)
                            .map_err(net)?;
                        if step < n - 2 {
                            tx.send((seg, k, dst)).map_err(|_| lost())?;
                        }
                    }
                }
                Ok(())
            },
        );
        self.scratch = scratch;
        result
    }

    fn ring_broadcast(&mut self, buf: &mut [u8], root: usize, header: OpHeader) -> Result<()> {
        let op = "broadcast";
        let (left, right) = self.streams()?;
        let (rank, lrank, rrank, timeout) = (
            self.rank,
            self.left_rank(),
            self.right_rank(),
            self.cfg.op_timeout,
        );
        let chunk = self.cfg.chunk_bytes.max(1);
        let failure = OpFailure::new(&self.shared);
        let lost =
            || CollectiveError::Backend(format!("rank {rank}: internal: sender thread stopped"));

        let chunks: Vec<&mut [u8]> = buf.chunks_mut(chunk).collect();
        let send_failed = move |e| net_err(rank, rrank, op, timeout, e);
        with_sender(
            self.right_link(right),
            &header,
            failure,
            send_failed,
            lost,
            |sender| {
                let tx = sender.to_right;
                if rank == root {
                    for (k, c) in chunks.into_iter().enumerate() {
                        tx.send((0, k, c)).map_err(|_| lost())?;
                    }
                    self.check_header(left, &header, op)?;
                } else {
                    self.check_header(left, &header, op)?;
                    let deadline = Instant::now() + self.cfg.op_timeout;
                    for (k, c) in chunks.into_iter().enumerate() {
                        read_chunk(left, c, deadline)
                            .map_err(|e| read_failed(rank, lrank, op, &self.cfg, e))?;
                        if rrank != root {
                            tx.send((0, k, c)).map_err(|_| lost())?;
                        }
                    }
                }
                Ok(())
            },
        )
    }
}

impl Collective for CpuRingEngine {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()> {
        self.precheck()?;
        if self.world == 1 {
            return Ok(());
        }
        let header = self.next_header(KIND_ALL_REDUCE, 0, buf.len());
        let res = self.ring_all_reduce(buf, header, "all_reduce_mean");
        self.finish(res)
    }

    fn broadcast_bytes(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        self.precheck()?;
        if root >= self.world {
            return Err(CollectiveError::InvalidArgument(format!(
                "broadcast root {root} is not a rank of a world of size {}",
                self.world
            )));
        }
        if self.world == 1 {
            return Ok(());
        }
        let header = self.next_header(KIND_BROADCAST, root, buf.len());
        let res = self.ring_broadcast(buf, root, header);
        self.finish(res)
    }

    /// An all-reduce of one element per rank: every segment carries data,
    /// so no rank leaves before every rank has arrived.
    fn barrier(&mut self) -> Result<()> {
        self.precheck()?;
        if self.world == 1 {
            return Ok(());
        }
        let mut token = vec![0.0f32; self.world];
        let header = self.next_header(KIND_BARRIER, 0, token.len());
        let res = self.ring_all_reduce(&mut token, header, "barrier");
        self.finish(res)
    }

    fn abort_handle(&self) -> AbortHandle {
        AbortHandle::new(self.shared.clone())
    }
}

#[cfg(test)]
mod tests;
