//! Forming a world: rank 0 hosts (a token to hand out), the other ranks
//! join with it, and every rank ends with its two ring neighbours.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::sockets::{
    DataRing, HANDSHAKE_READ_TIMEOUT, accept_before, accept_data, connect_before, connect_data,
    remaining,
};
use super::wire::{
    HELLO_MAGIC, NONCE_LEN, WELCOME_MAGIC, decode_token, encode_token, random_nonce, read_magic,
    read_nonce, read_text, read_u32, send_welcome, write_text,
};
use super::*;
use crate::collective::{CollectiveError, Result};

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

pub(super) fn check_world(rank: usize, world: usize) -> Result<()> {
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
        let ring = DataRing {
            nonce: &nonce,
            rank: 0,
            world,
            deadline,
            shared: &shared,
        };
        let right = connect_data(addrs[1], &ring)?;
        let left = accept_data(&data, &ring)?;
        CpuRingEngine::from_streams(0, world, left, right, shared, cfg)
    }
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

    pub(super) fn join_world(
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

        let ring = DataRing {
            nonce: &nonce,
            rank,
            world,
            deadline,
            shared: &shared,
        };
        let right = connect_data(right_addr, &ring)?;
        let left = accept_data(&data, &ring)?;
        Self::from_streams(rank, world, left, right, shared, cfg)
    }

    pub(super) fn from_streams(
        rank: usize,
        world: usize,
        left: TcpStream,
        right: TcpStream,
        shared: Arc<Shared>,
        cfg: RingConfig,
    ) -> Result<Self> {
        let setup =
            |e: io::Error| CollectiveError::Rendezvous(format!("rank {rank}: socket options: {e}"));
        // Writes may wait for a neighbour still computing (up to the op
        // timeout); reads from the left see data or keepalives every
        // keepalive interval, so silence is a stall.
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
        left.set_read_timeout(Some(cfg.read_timeout()))
            .map_err(setup)?;
        let writing = Arc::new(Mutex::new(()));
        let keepalive = spawn_keepalive(
            right.try_clone().map_err(setup)?,
            writing.clone(),
            cfg.keepalive_interval,
        )
        .map_err(setup)?;
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
            writing,
            _keepalive: Some(keepalive),
        })
    }
}

/// Starts the thread that sends the right neighbour a keepalive every
/// `every` while no call is writing; it stops when the returned sender is
/// dropped (with the engine) or the link fails.
fn spawn_keepalive(
    right: TcpStream,
    writing: Arc<Mutex<()>>,
    every: Duration,
) -> io::Result<mpsc::Sender<()>> {
    let (stop, stopped) = mpsc::channel::<()>();
    let every = every.max(Duration::from_millis(1));
    thread::Builder::new()
        .name("ring-keepalive".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                // A call in progress keeps the link busy by itself.
                let Ok(_writing) = writing.try_lock() else {
                    continue;
                };
                if (&right).write_all(&[KEEPALIVE]).is_err() {
                    // The calls find the failure themselves.
                    return;
                }
            }
        })?;
    Ok(stop)
}
