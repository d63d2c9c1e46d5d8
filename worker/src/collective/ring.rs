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
//! Every socket has a read or write timeout (no progress for
//! `op_timeout` fails the call). Each operation starts with a header (sequence
//! number, kind, root, length) that the receiver checks against its own, so
//! ranks that disagree about the call fail with
//! [`CollectiveError::CallMismatch`] instead of exchanging garbage. On any
//! error, and on [`AbortHandle::abort`], the engine shuts its sockets down;
//! the neighbours then see their connections close, fail and shut down
//! theirs, so a failure anywhere reaches every rank within milliseconds.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use bytemuck::Pod;

use super::{Abort, AbortHandle, Collective, CollectiveError, Result};

const TOKEN_MAGIC: &[u8; 4] = b"THRT";
const TOKEN_VERSION: u8 = 1;
const HELLO_MAGIC: &[u8; 4] = b"THRH";
const WELCOME_MAGIC: &[u8; 4] = b"THRW";
const DATA_MAGIC: &[u8; 4] = b"THRD";
const OP_MAGIC: &[u8; 4] = b"THRO";
const NONCE_LEN: usize = 16;
const MAX_TEXT_LEN: usize = 1024;
/// Longest wait for one handshake message from a connection that has been
/// accepted, so one silent client cannot hold the rendezvous up.
const HANDSHAKE_READ_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(2);

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
    /// A collective call fails when a socket makes no progress for this
    /// long (so it must exceed the largest compute skew between ranks).
    pub op_timeout: Duration,
    /// Deadline for forming the world.
    pub connect_timeout: Duration,
    /// Pipelining granularity.
    pub chunk_bytes: usize,
    /// `SO_SNDBUF`/`SO_RCVBUF` of the data sockets; `None` keeps the OS
    /// default (and its autotuning).
    pub socket_buffer_bytes: Option<usize>,
}

impl Default for RingConfig {
    fn default() -> Self {
        Self {
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            advertise_ip: None,
            op_timeout: Duration::from_secs(300),
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

/// Maps a socket error to a collective error.
fn net_err(
    rank: usize,
    peer: usize,
    op: &'static str,
    timeout: Duration,
    e: io::Error,
) -> CollectiveError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CollectiveError::Timeout {
            rank,
            peer,
            op,
            secs: timeout.as_secs_f64(),
        },
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::NotConnected => CollectiveError::PeerClosed { rank, peer, op },
        _ => CollectiveError::Io {
            rank,
            peer,
            op,
            source: e,
        },
    }
}

const KIND_ALL_REDUCE: u8 = 1;
const KIND_BROADCAST: u8 = 2;
const KIND_BARRIER: u8 = 3;

/// The header every rank sends its right neighbour at the start of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OpHeader {
    seq: u64,
    kind: u8,
    root: u32,
    len: u64,
}

const OP_HEADER_LEN: usize = 4 + 8 + 1 + 4 + 8;

impl OpHeader {
    fn encode(&self) -> [u8; OP_HEADER_LEN] {
        let mut b = [0u8; OP_HEADER_LEN];
        b[..4].copy_from_slice(OP_MAGIC);
        b[4..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12] = self.kind;
        b[13..17].copy_from_slice(&self.root.to_le_bytes());
        b[17..25].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    fn decode(b: &[u8; OP_HEADER_LEN]) -> Option<Self> {
        if &b[..4] != OP_MAGIC {
            return None;
        }
        Some(Self {
            seq: u64::from_le_bytes(b[4..12].try_into().ok()?),
            kind: b[12],
            root: u32::from_le_bytes(b[13..17].try_into().ok()?),
            len: u64::from_le_bytes(b[17..25].try_into().ok()?),
        })
    }

    fn describe(&self) -> String {
        let name = match self.kind {
            KIND_ALL_REDUCE => "all_reduce_mean",
            KIND_BROADCAST => "broadcast",
            KIND_BARRIER => "barrier",
            _ => "unknown",
        };
        match self.kind {
            KIND_BROADCAST => format!(
                "{name}(root {}, {} bytes) as call #{}",
                self.root, self.len, self.seq
            ),
            _ => format!("{name}({} elements) as call #{}", self.len, self.seq),
        }
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
/// order, handing each back when written.
fn send_loop<'a, T: Pod>(
    mut out: &TcpStream,
    rx: mpsc::Receiver<Chunk<'a, T>>,
    back: mpsc::Sender<Chunk<'a, T>>,
) -> io::Result<()> {
    for (seg, k, data) in rx {
        out.write_all(bytemuck::cast_slice(&*data))?;
        // The reducing thread may be done with this chunk already.
        let _ = back.send((seg, k, data));
    }
    Ok(())
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

/// Rank 0's half of the rendezvous: listening, with a token to hand out.
pub struct RingHost {
    world: usize,
    cfg: RingConfig,
    nonce: [u8; NONCE_LEN],
    control: TcpListener,
    data: TcpListener,
    data_addr: SocketAddr,
    token: Vec<u8>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RingHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingHost")
            .field("world", &self.world)
            .field("data_addr", &self.data_addr)
            .finish()
    }
}

fn encode_token(nonce: &[u8; NONCE_LEN], addr: &SocketAddr) -> Vec<u8> {
    let text = addr.to_string();
    let mut t = Vec::with_capacity(4 + 1 + NONCE_LEN + 2 + text.len());
    t.extend_from_slice(TOKEN_MAGIC);
    t.push(TOKEN_VERSION);
    t.extend_from_slice(nonce);
    // Addresses are at most ~50 bytes, far below u16::MAX.
    t.extend_from_slice(&(text.len() as u16).to_le_bytes());
    t.extend_from_slice(text.as_bytes());
    t
}

fn decode_token(t: &[u8]) -> Result<([u8; NONCE_LEN], SocketAddr)> {
    let bad = |why: &str| CollectiveError::BadToken(why.to_string());
    if t.len() < 4 + 1 + NONCE_LEN + 2 || &t[..4] != TOKEN_MAGIC {
        return Err(bad("not a twinhead ring token"));
    }
    if t[4] != TOKEN_VERSION {
        return Err(bad(&format!(
            "token version {} (expected {TOKEN_VERSION})",
            t[4]
        )));
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&t[5..5 + NONCE_LEN]);
    let at = 5 + NONCE_LEN;
    let n = u16::from_le_bytes([t[at], t[at + 1]]) as usize;
    let text = t
        .get(at + 2..at + 2 + n)
        .ok_or_else(|| bad("truncated address"))?;
    if t.len() != at + 2 + n {
        return Err(bad("trailing bytes"));
    }
    let text = std::str::from_utf8(text).map_err(|_| bad("address is not utf-8"))?;
    let addr = text
        .parse::<SocketAddr>()
        .map_err(|e| bad(&format!("address {text:?}: {e}")))?;
    Ok((nonce, addr))
}

fn write_text(out: &mut impl Write, text: &str) -> io::Result<()> {
    let bytes = text.as_bytes();
    let n = bytes.len().min(MAX_TEXT_LEN);
    out.write_all(&(n as u16).to_le_bytes())?;
    out.write_all(&bytes[..n])
}

fn read_text(inp: &mut impl Read) -> io::Result<String> {
    let mut n = [0u8; 2];
    inp.read_exact(&mut n)?;
    let n = u16::from_le_bytes(n) as usize;
    if n > MAX_TEXT_LEN {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "text too long"));
    }
    let mut b = vec![0u8; n];
    inp.read_exact(&mut b)?;
    String::from_utf8(b)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "text is not utf-8"))
}

fn read_u32(inp: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    inp.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_magic(inp: &mut impl Read, magic: &[u8; 4]) -> io::Result<()> {
    let mut b = [0u8; 4];
    inp.read_exact(&mut b)?;
    if &b != magic {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "wrong magic"));
    }
    Ok(())
}

fn read_nonce(inp: &mut impl Read) -> io::Result<[u8; NONCE_LEN]> {
    let mut b = [0u8; NONCE_LEN];
    inp.read_exact(&mut b)?;
    Ok(b)
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// Accepts one connection before `deadline`, polling the abort flag.
fn accept_before(
    listener: &TcpListener,
    deadline: Instant,
    shared: &Shared,
    what: &str,
) -> Result<TcpStream> {
    listener
        .set_nonblocking(true)
        .map_err(|e| CollectiveError::Rendezvous(format!("listener: {e}")))?;
    loop {
        shared.check_aborted()?;
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)
                    .map_err(|e| CollectiveError::Rendezvous(format!("accepted socket: {e}")))?;
                return Ok(s);
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                if remaining(deadline).is_none() {
                    return Err(CollectiveError::Rendezvous(format!(
                        "rank {}: timed out waiting for {what}",
                        shared.rank
                    )));
                }
                thread::sleep(POLL_INTERVAL);
            }
            Err(e) => {
                return Err(CollectiveError::Rendezvous(format!(
                    "rank {}: accept failed while waiting for {what}: {e}",
                    shared.rank
                )));
            }
        }
    }
}

/// Connects to `addr` before `deadline`, retrying while it is refused.
fn connect_before(
    addr: SocketAddr,
    deadline: Instant,
    shared: &Shared,
    what: &str,
) -> Result<TcpStream> {
    loop {
        shared.check_aborted()?;
        let Some(left) = remaining(deadline) else {
            return Err(CollectiveError::Rendezvous(format!(
                "rank {}: timed out connecting to {what} at {addr}",
                shared.rank
            )));
        };
        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(5))) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(CollectiveError::Rendezvous(format!(
                    "rank {}: cannot connect to {what} at {addr}: {e}",
                    shared.rank
                )));
            }
        }
    }
}

/// Dials the right neighbour's data listener and introduces itself.
fn connect_data(
    addr: SocketAddr,
    nonce: &[u8; NONCE_LEN],
    rank: usize,
    world: usize,
    deadline: Instant,
    shared: &Shared,
) -> Result<TcpStream> {
    let right = (rank + 1) % world;
    let s = connect_before(addr, deadline, shared, &format!("rank {right}"))?;
    let mut hello = Vec::with_capacity(4 + NONCE_LEN + 8);
    hello.extend_from_slice(DATA_MAGIC);
    hello.extend_from_slice(nonce);
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world as u32).to_le_bytes());
    s.set_write_timeout(Some(HANDSHAKE_READ_TIMEOUT))
        .and_then(|()| (&s).write_all(&hello))
        .map_err(|e| {
            CollectiveError::Rendezvous(format!(
                "rank {rank}: hello to rank {right} at {addr}: {e}"
            ))
        })?;
    Ok(s)
}

/// Accepts the left neighbour's data connection, dropping any connection
/// that does not present this world's nonce and the expected rank.
fn accept_data(
    listener: &TcpListener,
    nonce: &[u8; NONCE_LEN],
    rank: usize,
    world: usize,
    deadline: Instant,
    shared: &Shared,
) -> Result<TcpStream> {
    let left = (rank + world - 1) % world;
    loop {
        let mut s = accept_before(
            listener,
            deadline,
            shared,
            &format!("rank {left} to connect"),
        )?;
        let ok = (|| -> io::Result<bool> {
            s.set_read_timeout(Some(HANDSHAKE_READ_TIMEOUT))?;
            read_magic(&mut s, DATA_MAGIC)?;
            let their_nonce = read_nonce(&mut s)?;
            let from = read_u32(&mut s)? as usize;
            let their_world = read_u32(&mut s)? as usize;
            Ok(&their_nonce == nonce && from == left && their_world == world)
        })();
        if let Ok(true) = ok {
            return Ok(s);
        }
        // A stray or stale connection: drop it and keep waiting.
    }
}

fn random_nonce() -> Result<[u8; NONCE_LEN]> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce)
        .map_err(|e| CollectiveError::Rendezvous(format!("no randomness for the nonce: {e}")))?;
    Ok(nonce)
}

fn check_world(rank: usize, world: usize) -> Result<()> {
    if world == 0 || world > u32::MAX as usize {
        return Err(CollectiveError::InvalidArgument(format!(
            "world size {world}"
        )));
    }
    if rank >= world {
        return Err(CollectiveError::InvalidArgument(format!(
            "rank {rank} is not in a world of size {world}"
        )));
    }
    Ok(())
}

impl CpuRingEngine {
    /// Rank 0: binds the listeners and returns a [`RingHost`] whose token
    /// the other ranks need; then call [`RingHost::accept`].
    pub fn host(world: usize, cfg: RingConfig) -> Result<RingHost> {
        check_world(0, world)?;
        let advertise = cfg.advertise_ip.unwrap_or(cfg.bind_ip);
        if advertise.is_unspecified() {
            return Err(CollectiveError::InvalidArgument(format!(
                "rank 0 binds {} and needs an advertise_ip the other ranks can reach",
                cfg.bind_ip
            )));
        }
        let bind = |what: &str| {
            TcpListener::bind((cfg.bind_ip, 0)).map_err(|e| {
                CollectiveError::Rendezvous(format!(
                    "rank 0: cannot bind {what} on {}: {e}",
                    cfg.bind_ip
                ))
            })
        };
        let control = bind("the rendezvous listener")?;
        let data = bind("the data listener")?;
        let port = |l: &TcpListener| {
            l.local_addr()
                .map(|a| a.port())
                .map_err(|e| CollectiveError::Rendezvous(format!("rank 0: listener address: {e}")))
        };
        let control_addr = SocketAddr::new(advertise, port(&control)?);
        let data_addr = SocketAddr::new(advertise, port(&data)?);
        let nonce = random_nonce()?;
        let token = encode_token(&nonce, &control_addr);
        Ok(RingHost {
            world,
            cfg,
            nonce,
            control,
            data,
            data_addr,
            token,
            shared: Shared::new(0),
        })
    }

    /// Ranks 1..world: joins the world announced by `token` (from rank 0's
    /// [`RingHost::token`]). Blocks until the ring is connected, at most
    /// `cfg.connect_timeout`. [`CpuRingEngine::peer`] does the same with an
    /// abort handle available while it waits.
    pub fn connect(token: &[u8], rank: usize, world: usize, cfg: RingConfig) -> Result<Self> {
        Self::peer(rank, world, cfg)?.join(token)
    }

    /// Ranks 1..world: prepares to join; see [`RingPeer::join`].
    pub fn peer(rank: usize, world: usize, cfg: RingConfig) -> Result<RingPeer> {
        check_world(rank, world)?;
        if rank == 0 {
            return Err(CollectiveError::InvalidArgument(
                "rank 0 hosts the world: use CpuRingEngine::host".into(),
            ));
        }
        Ok(RingPeer {
            rank,
            world,
            cfg,
            shared: Shared::new(rank),
        })
    }

    fn join_world(
        token: &[u8],
        rank: usize,
        world: usize,
        cfg: RingConfig,
        shared: Arc<Shared>,
    ) -> Result<Self> {
        let (nonce, host_addr) = decode_token(token)?;
        let deadline = Instant::now() + cfg.connect_timeout;
        let data = TcpListener::bind((cfg.bind_ip, 0)).map_err(|e| {
            CollectiveError::Rendezvous(format!("rank {rank}: cannot bind on {}: {e}", cfg.bind_ip))
        })?;
        let mut ctrl = connect_before(host_addr, deadline, &shared, "rank 0")?;
        // Lets abort() interrupt the wait for rank 0's answer.
        if let Ok(clone) = ctrl.try_clone() {
            shared
                .sockets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(clone);
        }
        let advertise = match cfg.advertise_ip {
            Some(ip) => ip,
            None if cfg.bind_ip.is_unspecified() => ctrl
                .local_addr()
                .map_err(|e| {
                    CollectiveError::Rendezvous(format!("rank {rank}: local address: {e}"))
                })?
                .ip(),
            None => cfg.bind_ip,
        };
        let data_port = data
            .local_addr()
            .map_err(|e| {
                CollectiveError::Rendezvous(format!("rank {rank}: listener address: {e}"))
            })?
            .port();
        let data_addr = SocketAddr::new(advertise, data_port);

        let handshake = |e: io::Error| {
            CollectiveError::Rendezvous(format!("rank {rank}: handshake with rank 0: {e}"))
        };
        let mut hello = Vec::new();
        hello.extend_from_slice(HELLO_MAGIC);
        hello.extend_from_slice(&nonce);
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(world as u32).to_le_bytes());
        ctrl.set_write_timeout(Some(HANDSHAKE_READ_TIMEOUT))
            .map_err(handshake)?;
        ctrl.write_all(&hello).map_err(handshake)?;
        write_text(&mut ctrl, &data_addr.to_string()).map_err(handshake)?;

        // Rank 0 answers once every rank has said hello.
        let wait = remaining(deadline).unwrap_or(Duration::from_millis(1));
        ctrl.set_read_timeout(Some(wait)).map_err(handshake)?;
        read_magic(&mut ctrl, WELCOME_MAGIC).map_err(handshake)?;
        let mut status = [0u8; 1];
        ctrl.read_exact(&mut status).map_err(handshake)?;
        let text = read_text(&mut ctrl).map_err(handshake)?;
        if status[0] != 0 {
            return Err(CollectiveError::Rendezvous(format!(
                "rank 0 refused rank {rank}: {text}"
            )));
        }
        let right_addr: SocketAddr = text.parse().map_err(|e| {
            CollectiveError::Rendezvous(format!("rank 0 sent a bad address {text:?}: {e}"))
        })?;
        drop(ctrl);
        shared
            .sockets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();

        let right = connect_data(right_addr, &nonce, rank, world, deadline, &shared)?;
        let left = accept_data(&data, &nonce, rank, world, deadline, &shared)?;
        Self::from_streams(rank, world, left, right, shared, cfg)
    }

    fn from_streams(
        rank: usize,
        world: usize,
        left: TcpStream,
        right: TcpStream,
        shared: Arc<Shared>,
        cfg: RingConfig,
    ) -> Result<Self> {
        let setup =
            |e: io::Error| CollectiveError::Rendezvous(format!("rank {rank}: socket options: {e}"));
        let timeout = Some(cfg.op_timeout.max(Duration::from_millis(1)));
        for s in [&left, &right] {
            if let Some(bytes) = cfg.socket_buffer_bytes {
                let sock = socket2::SockRef::from(s);
                sock.set_send_buffer_size(bytes).map_err(setup)?;
                sock.set_recv_buffer_size(bytes).map_err(setup)?;
            }
            s.set_nodelay(true).map_err(setup)?;
            s.set_read_timeout(timeout).map_err(setup)?;
            s.set_write_timeout(timeout).map_err(setup)?;
        }
        {
            let mut sockets = shared.sockets.lock().unwrap_or_else(|p| p.into_inner());
            sockets.push(left.try_clone().map_err(setup)?);
            sockets.push(right.try_clone().map_err(setup)?);
        }
        let chunk_elems = (cfg.chunk_bytes / 4).max(1);
        Ok(Self {
            rank,
            world,
            left: Some(left),
            right: Some(right),
            shared,
            cfg,
            seq: 0,
            scratch: vec![0.0; chunk_elems],
        })
    }

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
    fn check_header(&self, mut left: &TcpStream, mine: &OpHeader, op: &'static str) -> Result<()> {
        let peer = self.left_rank();
        let mut b = [0u8; OP_HEADER_LEN];
        left.read_exact(&mut b)
            .map_err(|e| net_err(self.rank, peer, op, self.cfg.op_timeout, e))?;
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
        // The header goes out before anything can fail, so that a neighbour
        // that disagrees about the call reads it and reports the mismatch.
        (&*right)
            .write_all(&header.encode())
            .map_err(|e| net_err(rank, rrank, op, timeout, e))?;

        thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<Chunk<'_, f32>>();
            let (back_tx, back_rx) = mpsc::channel::<Chunk<'_, f32>>();
            let failure = &failure;
            let sender = s.spawn(move || {
                if let Err(e) = send_loop(right, rx, back_tx) {
                    failure.record(net_err(rank, rrank, op, timeout, e));
                }
            });

            let result = (|| -> Result<()> {
                // Reduce-scatter step 0 sends this rank's own segment.
                for (k, slot) in slots[r].iter_mut().enumerate() {
                    if let Some(c) = slot.take() {
                        tx.send((r, k, c)).map_err(|_| lost())?;
                    }
                }
                self.check_header(left, &header, op)?;
                let mut left = left;
                let net = |e| net_err(rank, lrank, op, timeout, e);
                // Reduce-scatter: step s receives segment r-s-1 and adds this
                // rank's values to the partial sums of ranks r-s-1 .. r-1.
                for step in 0..n - 1 {
                    let seg = (r + 2 * n - step - 1) % n;
                    let last = step == n - 2;
                    for k in 0..slots[seg].len() {
                        let dst = slots[seg][k].take().ok_or_else(lost)?;
                        let m = dst.len();
                        let incoming = &mut scratch[..m];
                        left.read_exact(bytemuck::cast_slice_mut(incoming))
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
                            let (s2, k2, c) = back_rx.recv().map_err(|_| lost())?;
                            slots[s2][k2] = Some(c);
                        };
                        left.read_exact(bytemuck::cast_slice_mut(&mut *dst))
                            .map_err(net)?;
                        if step < n - 2 {
                            tx.send((seg, k, dst)).map_err(|_| lost())?;
                        }
                    }
                }
                Ok(())
            })();
            drop(tx);
            if let Err(e) = result {
                failure.record(e);
            }
            if sender.join().is_err() {
                failure.record(lost());
            }
        });
        self.scratch = scratch;
        match failure.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
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
        (&*right)
            .write_all(&header.encode())
            .map_err(|e| net_err(rank, rrank, op, timeout, e))?;
        thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<Chunk<'_, u8>>();
            let (back_tx, _back_rx) = mpsc::channel::<Chunk<'_, u8>>();
            let failure = &failure;
            let sender = s.spawn(move || {
                if let Err(e) = send_loop(right, rx, back_tx) {
                    failure.record(net_err(rank, rrank, op, timeout, e));
                }
            });
            let result = (|| -> Result<()> {
                if rank == root {
                    for (k, c) in chunks.into_iter().enumerate() {
                        tx.send((0, k, c)).map_err(|_| lost())?;
                    }
                    self.check_header(left, &header, op)?;
                } else {
                    self.check_header(left, &header, op)?;
                    let mut left = left;
                    for (k, c) in chunks.into_iter().enumerate() {
                        left.read_exact(c)
                            .map_err(|e| net_err(rank, lrank, op, timeout, e))?;
                        if rrank != root {
                            tx.send((0, k, c)).map_err(|_| lost())?;
                        }
                    }
                }
                Ok(())
            })();
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
}

/// A rank other than 0 about to join a world (see [`CpuRingEngine::peer`]).
pub struct RingPeer {
    rank: usize,
    world: usize,
    cfg: RingConfig,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RingPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingPeer")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

impl RingPeer {
    /// Aborts [`RingPeer::join`] (and the engine it returns) from another
    /// thread.
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle::new(self.shared.clone())
    }

    /// Joins the world announced by `token` (rank 0's [`RingHost::token`]);
    /// blocks until the ring is connected, at most `connect_timeout`.
    pub fn join(self, token: &[u8]) -> Result<CpuRingEngine> {
        let RingPeer {
            rank,
            world,
            cfg,
            shared,
        } = self;
        let res = CpuRingEngine::join_world(token, rank, world, cfg, shared.clone());
        if res.is_err() && shared.is_aborted() {
            return Err(CollectiveError::Aborted { rank });
        }
        res
    }
}

impl RingHost {
    /// The opaque rendezvous token (well under 100 bytes) to hand to every
    /// other rank through the coordinator.
    pub fn token(&self) -> &[u8] {
        &self.token
    }

    /// Aborts [`RingHost::accept`] from another thread.
    pub fn abort_handle(&self) -> AbortHandle {
        AbortHandle::new(self.shared.clone())
    }

    /// Waits (at most `connect_timeout`) for ranks 1..world, tells each its
    /// right neighbour and connects the ring.
    pub fn accept(self) -> Result<CpuRingEngine> {
        let RingHost {
            world,
            cfg,
            nonce,
            control,
            data,
            data_addr,
            shared,
            ..
        } = self;
        if world == 1 {
            let mut e = CpuRingEngine::single();
            e.cfg = cfg;
            e.shared = shared;
            return Ok(e);
        }
        let deadline = Instant::now() + cfg.connect_timeout;
        let mut joined: Vec<Option<(TcpStream, SocketAddr)>> = (0..world).map(|_| None).collect();
        let mut count = 0;
        let mut refusal: Option<String> = None;
        while count < world - 1 && refusal.is_none() {
            let mut s = accept_before(
                &control,
                deadline,
                &shared,
                &format!("{} more rank(s) to join", world - 1 - count),
            )?;
            let hello = (|| -> io::Result<([u8; NONCE_LEN], usize, usize, String)> {
                s.set_read_timeout(Some(HANDSHAKE_READ_TIMEOUT))?;
                read_magic(&mut s, HELLO_MAGIC)?;
                let their_nonce = read_nonce(&mut s)?;
                let rank = read_u32(&mut s)? as usize;
                let their_world = read_u32(&mut s)? as usize;
                let addr = read_text(&mut s)?;
                Ok((their_nonce, rank, their_world, addr))
            })();
            let Ok((their_nonce, rank, their_world, addr)) = hello else {
                continue; // not one of ours
            };
            if their_nonce != nonce {
                continue; // a process from another world
            }
            let problem = if their_world != world {
                Some(format!(
                    "rank {rank} believes the world has {their_world} ranks, rank 0 has {world}"
                ))
            } else if rank == 0 || rank >= world {
                Some(format!(
                    "rank {rank} is out of range for a world of {world}"
                ))
            } else if joined[rank].is_some() {
                Some(format!("rank {rank} joined twice"))
            } else {
                None
            };
            let parsed = addr.parse::<SocketAddr>();
            match (problem, parsed) {
                (Some(p), _) => {
                    let _ = send_welcome(&mut s, Err(&p));
                    refusal = Some(p);
                }
                (None, Err(e)) => {
                    let p = format!("rank {rank} sent a bad address {addr:?}: {e}");
                    let _ = send_welcome(&mut s, Err(&p));
                    refusal = Some(p);
                }
                (None, Ok(a)) => {
                    joined[rank] = Some((s, a));
                    count += 1;
                }
            }
        }
        if let Some(p) = refusal {
            for (s, _) in joined.iter_mut().flatten() {
                let _ = send_welcome(s, Err(&p));
            }
            return Err(CollectiveError::Rendezvous(p));
        }
        let addrs: Vec<SocketAddr> = (0..world)
            .map(|k| joined[k].as_ref().map_or(data_addr, |(_, a)| *a))
            .collect();
        for (k, j) in joined.iter_mut().enumerate() {
            if let Some((s, _)) = j {
                let right = addrs[(k + 1) % world].to_string();
                send_welcome(s, Ok(&right)).map_err(|e| {
                    CollectiveError::Rendezvous(format!("rank 0: cannot answer rank {k}: {e}"))
                })?;
            }
        }
        drop(joined);
        let right = connect_data(addrs[1], &nonce, 0, world, deadline, &shared)?;
        let left = accept_data(&data, &nonce, 0, world, deadline, &shared)?;
        CpuRingEngine::from_streams(0, world, left, right, shared, cfg)
    }
}

fn send_welcome(s: &mut TcpStream, answer: std::result::Result<&str, &str>) -> io::Result<()> {
    s.set_write_timeout(Some(HANDSHAKE_READ_TIMEOUT))?;
    let mut msg = Vec::new();
    msg.extend_from_slice(WELCOME_MAGIC);
    let (status, text) = match answer {
        Ok(t) => (0u8, t),
        Err(t) => (1u8, t),
    };
    msg.push(status);
    write_text(&mut msg, text)?;
    s.write_all(&msg)
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
mod tests {
    use super::*;

    fn quick() -> RingConfig {
        RingConfig {
            op_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(20),
            chunk_bytes: 64,
            ..RingConfig::default()
        }
    }

    /// Forms a world of `n` engines in threads of this process.
    fn world(n: usize, cfg: RingConfig) -> Vec<CpuRingEngine> {
        let host = CpuRingEngine::host(n, cfg.clone()).expect("host");
        let token = host.token().to_vec();
        let peers: Vec<_> = (1..n)
            .map(|r| {
                let token = token.clone();
                let cfg = cfg.clone();
                thread::spawn(move || CpuRingEngine::connect(&token, r, n, cfg))
            })
            .collect();
        let mut out = vec![host.accept().expect("accept")];
        for p in peers {
            out.push(p.join().expect("join").expect("connect"));
        }
        out
    }

    /// Runs `f` on every engine in its own thread; results in rank order.
    fn on_all<T: Send + 'static>(
        engines: Vec<CpuRingEngine>,
        f: impl Fn(&mut CpuRingEngine) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<(CpuRingEngine, T)> {
        let hs: Vec<_> = engines
            .into_iter()
            .map(|mut e| {
                let f = f.clone();
                thread::spawn(move || {
                    let t = f(&mut e);
                    (e, t)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("join")).collect()
    }

    #[test]
    fn token_round_trips_and_rejects_garbage() {
        let addr: SocketAddr = "127.0.0.1:4567".parse().expect("addr");
        let t = encode_token(&[7; NONCE_LEN], &addr);
        assert!(t.len() < 100);
        assert_eq!(decode_token(&t).expect("decode"), ([7; NONCE_LEN], addr));
        assert!(decode_token(b"nope").is_err());
        assert!(decode_token(&t[..t.len() - 1]).is_err());
        let mut longer = t.clone();
        longer.push(0);
        assert!(decode_token(&longer).is_err());
    }

    #[test]
    fn segments_cover_buffer_in_order() {
        let mut v: Vec<u32> = (0..10).collect();
        let segs = split_segments(&mut v, 3, 2);
        let lens: Vec<Vec<usize>> = segs
            .iter()
            .map(|s| {
                s.iter()
                    .map(|c| c.as_ref().map_or(0, |c| c.len()))
                    .collect()
            })
            .collect();
        assert_eq!(lens, vec![vec![2, 1], vec![2, 1], vec![2, 2]]);
        let mut small = [1u8, 2];
        let segs = split_segments(&mut small, 3, 4);
        assert_eq!(
            segs.iter().map(|s| s.len()).collect::<Vec<_>>(),
            vec![0, 1, 1]
        );
    }

    #[test]
    fn threads_all_reduce_and_broadcast() {
        for n in [2usize, 3] {
            let engines = world(n, quick());
            let out = on_all(engines, move |e| {
                let r = e.rank();
                let mut v: Vec<f32> = (0..37).map(|i| (i * (r + 1)) as f32).collect();
                e.all_reduce_mean(&mut v).expect("all-reduce");
                let mut b: Vec<u8> = if r == 1 {
                    (0..200).map(|i| i as u8).collect()
                } else {
                    vec![0; 200]
                };
                e.broadcast_bytes(&mut b, 1).expect("broadcast");
                e.barrier().expect("barrier");
                (v, b)
            });
            let ranks_sum: usize = (1..=n).sum();
            for (_, (v, b)) in &out {
                for (i, x) in v.iter().enumerate() {
                    assert_eq!(*x, (i * ranks_sum) as f32 / n as f32);
                }
                assert_eq!(b, &(0..200).map(|i| i as u8).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn abort_unblocks_a_waiting_call() {
        let mut engines = world(2, quick());
        let e1 = engines.pop().expect("rank 1");
        let mut e0 = engines.pop().expect("rank 0");
        let h = e0.abort_handle();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            h.abort();
        });
        let start = Instant::now();
        let mut v = vec![1.0f32; 1000];
        let err = e0.all_reduce_mean(&mut v).expect_err("aborted");
        assert!(matches!(err, CollectiveError::Aborted { rank: 0 }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
        t.join().expect("join");
        // The peer now fails at once instead of waiting for its timeout.
        let mut e1 = e1;
        let start = Instant::now();
        let err = e1.all_reduce_mean(&mut v).expect_err("peer gone");
        assert!(start.elapsed() < Duration::from_secs(5), "{err}");
        // And both stay poisoned.
        assert!(matches!(
            e1.barrier(),
            Err(CollectiveError::Poisoned { .. })
        ));
        assert!(matches!(e0.barrier(), Err(CollectiveError::Aborted { .. })));
    }

    #[test]
    fn timeout_when_a_peer_never_calls() {
        let cfg = RingConfig {
            op_timeout: Duration::from_millis(300),
            ..quick()
        };
        let mut engines = world(2, cfg);
        let _idle = engines.pop();
        let mut e0 = engines.pop().expect("rank 0");
        let mut v = vec![1.0f32; 4];
        let err = e0.all_reduce_mean(&mut v).expect_err("timeout");
        assert!(
            matches!(
                err,
                CollectiveError::Timeout {
                    rank: 0,
                    peer: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn abort_interrupts_a_join() {
        let cfg = quick();
        // A host that never accepts: the peer waits for its answer.
        let host = CpuRingEngine::host(2, cfg.clone()).expect("host");
        let peer = CpuRingEngine::peer(1, 2, cfg).expect("peer");
        let h = peer.abort_handle();
        let token = host.token().to_vec();
        let t = thread::spawn(move || peer.join(&token));
        thread::sleep(Duration::from_millis(300));
        let start = Instant::now();
        h.abort();
        let err = t.join().expect("join").expect_err("aborted");
        assert!(matches!(err, CollectiveError::Aborted { rank: 1 }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
        drop(host);
    }

    #[test]
    fn rendezvous_rejects_wrong_world_size() {
        let cfg = quick();
        let host = CpuRingEngine::host(2, cfg.clone()).expect("host");
        let token = host.token().to_vec();
        let peer = thread::spawn(move || CpuRingEngine::connect(&token, 1, 3, cfg));
        let err = host.accept().expect_err("refused");
        assert!(err.to_string().contains("3 ranks"), "{err}");
        let err = peer.join().expect("join").expect_err("refused");
        assert!(err.to_string().contains("rank 0 refused rank 1"), "{err}");
    }
}
