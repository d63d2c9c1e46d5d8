//! The ring's bytes on the wire: the rendezvous token, the handshake
//! messages and the header that opens every operation.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};

use super::sockets::HANDSHAKE_READ_TIMEOUT;
use crate::collective::{CollectiveError, Result};

pub(super) const TOKEN_MAGIC: &[u8; 4] = b"THRT";
pub(super) const TOKEN_VERSION: u8 = 1;
pub(super) const HELLO_MAGIC: &[u8; 4] = b"THRH";
pub(super) const WELCOME_MAGIC: &[u8; 4] = b"THRW";
pub(super) const DATA_MAGIC: &[u8; 4] = b"THRD";
pub(super) const OP_MAGIC: &[u8; 4] = b"THRO";
pub(super) const NONCE_LEN: usize = 16;
pub(super) const MAX_TEXT_LEN: usize = 1024;
pub(super) const KIND_ALL_REDUCE: u8 = 1;
pub(super) const KIND_BROADCAST: u8 = 2;
pub(super) const KIND_BARRIER: u8 = 3;
/// Sent whenever a rank has had nothing to send for a keepalive interval,
/// before an operation's header or a chunk, so that a silent link means a
/// stalled one.
pub(super) const KEEPALIVE: u8 = b'K';
/// Opens every chunk of an operation's data.
pub(super) const CHUNK: u8 = b'D';

/// The header every rank sends its right neighbour at the start of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OpHeader {
    pub(super) seq: u64,
    pub(super) kind: u8,
    pub(super) root: u32,
    pub(super) len: u64,
}

pub(super) const OP_HEADER_LEN: usize = 4 + 8 + 1 + 4 + 8;

impl OpHeader {
    pub(super) fn encode(&self) -> [u8; OP_HEADER_LEN] {
        let mut b = [0u8; OP_HEADER_LEN];
        b[..4].copy_from_slice(OP_MAGIC);
        b[4..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12] = self.kind;
        b[13..17].copy_from_slice(&self.root.to_le_bytes());
        b[17..25].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub(super) fn decode(b: &[u8; OP_HEADER_LEN]) -> Option<Self> {
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

    pub(super) fn describe(&self) -> String {
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

pub(super) fn encode_token(nonce: &[u8; NONCE_LEN], addr: &SocketAddr) -> Vec<u8> {
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

pub(super) fn decode_token(t: &[u8]) -> Result<([u8; NONCE_LEN], SocketAddr)> {
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

pub(super) fn write_text(out: &mut impl Write, text: &str) -> io::Result<()> {
    let bytes = text.as_bytes();
    let n = bytes.len().min(MAX_TEXT_LEN);
    out.write_all(&(n as u16).to_le_bytes())?;
    out.write_all(&bytes[..n])
}

pub(super) fn read_text(inp: &mut impl Read) -> io::Result<String> {
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

pub(super) fn read_u32(inp: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    inp.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

pub(super) fn read_magic(inp: &mut impl Read, magic: &[u8; 4]) -> io::Result<()> {
    let mut b = [0u8; 4];
    inp.read_exact(&mut b)?;
    if &b != magic {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "wrong magic"));
    }
    Ok(())
}

pub(super) fn read_nonce(inp: &mut impl Read) -> io::Result<[u8; NONCE_LEN]> {
    let mut b = [0u8; NONCE_LEN];
    inp.read_exact(&mut b)?;
    Ok(b)
}

pub(super) fn random_nonce() -> Result<[u8; NONCE_LEN]> {
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce)
        .map_err(|e| CollectiveError::Rendezvous(format!("no randomness for the nonce: {e}")))?;
    Ok(nonce)
}

pub(super) fn send_welcome(
    s: &mut TcpStream,
    answer: std::result::Result<&str, &str>,
) -> io::Result<()> {
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
