//! Sockets with deadlines: accepting and connecting the control and data
//! connections of the rendezvous, and naming network failures.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::wire::{DATA_MAGIC, NONCE_LEN, read_magic, read_nonce, read_u32};
use super::*;
use crate::collective::{CollectiveError, Result};

/// Longest wait for one handshake message from a connection that has been
/// accepted, so one silent client cannot hold the rendezvous up.
pub(super) const HANDSHAKE_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub(super) const POLL_INTERVAL: Duration = Duration::from_millis(2);

/// Maps a socket error to a collective error.
pub(super) fn net_err(
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

pub(super) fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

/// Accepts one connection before `deadline`, polling the abort flag.
pub(super) fn accept_before(
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
pub(super) fn connect_before(
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

/// Who is connecting the data ring, and until when.
pub(super) struct DataRing<'a> {
    pub nonce: &'a [u8; NONCE_LEN],
    pub rank: usize,
    pub world: usize,
    pub deadline: Instant,
    pub shared: &'a Shared,
}

impl<'a> DataRing<'a> {
    fn parts(&self) -> (&'a [u8; NONCE_LEN], usize, usize, Instant, &'a Shared) {
        (
            self.nonce,
            self.rank,
            self.world,
            self.deadline,
            self.shared,
        )
    }
}

/// Test hook: `TWINHEAD_TEST_RING_PROXY=HOST:PORT` makes every rank dial
/// its right neighbour through a proxy there, which is told the real
/// address in one line and can then stall or reset the link.
const RING_PROXY_ENV: &str = "TWINHEAD_TEST_RING_PROXY";

/// Dials the right neighbour's data listener and introduces itself.
pub(super) fn connect_data(addr: SocketAddr, ring: &DataRing<'_>) -> Result<TcpStream> {
    let (nonce, rank, world, deadline, shared) = ring.parts();
    let right = (rank + 1) % world;
    let proxy = std::env::var(RING_PROXY_ENV)
        .ok()
        .and_then(|p| p.parse::<SocketAddr>().ok());
    let s = match proxy {
        Some(proxy) => {
            let s = connect_before(
                proxy,
                deadline,
                shared,
                &format!("the proxy to rank {right}"),
            )?;
            (&s).write_all(format!("{addr}\n").as_bytes())
                .map_err(|e| {
                    CollectiveError::Rendezvous(format!("rank {rank}: proxy at {proxy}: {e}"))
                })?;
            s
        }
        None => connect_before(addr, deadline, shared, &format!("rank {right}"))?,
    };
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
pub(super) fn accept_data(listener: &TcpListener, ring: &DataRing<'_>) -> Result<TcpStream> {
    let (nonce, rank, world, deadline, shared) = ring.parts();
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
