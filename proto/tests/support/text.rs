//! Byte-level mutations of a file: bit flips, truncations, splices of its
//! own bytes, inserted and deleted runs.

use proptest::prelude::*;

/// One change to a byte string; positions are taken modulo its length.
#[derive(Debug, Clone, PartialEq)]
pub enum Mutation {
    FlipBit {
        at: usize,
        bit: u8,
    },
    SetByte {
        at: usize,
        value: u8,
    },
    Truncate {
        keep: usize,
    },
    /// Drop the first bytes (a read from the wrong offset).
    DropHead {
        count: usize,
    },
    Delete {
        at: usize,
        len: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    /// Copy a run of the file's own bytes over another place.
    Splice {
        from: usize,
        to: usize,
        len: usize,
    },
    /// Repeat a run of the file's own bytes in place.
    Repeat {
        at: usize,
        len: usize,
        times: u8,
    },
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        2 => (any::<usize>(), prop_oneof![Just(0u8), Just(0xff), Just(0x7f), Just(0x80), any::<u8>()])
            .prop_map(|(at, value)| Mutation::SetByte { at, value }),
        2 => any::<usize>().prop_map(|keep| Mutation::Truncate { keep }),
        1 => any::<usize>().prop_map(|count| Mutation::DropHead { count }),
        1 => (any::<usize>(), 1usize..64).prop_map(|(at, len)| Mutation::Delete { at, len }),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        2 => (any::<usize>(), any::<usize>(), 1usize..256)
            .prop_map(|(from, to, len)| Mutation::Splice { from, to, len }),
        1 => (any::<usize>(), 1usize..32, 1u8..8)
            .prop_map(|(at, len, times)| Mutation::Repeat { at, len, times }),
    ]
}

/// One to `n` mutations.
pub fn mutations(n: usize) -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..=n)
}

/// `bytes` after `m`.
pub fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    let at = |i: usize| if n == 0 { 0 } else { i % n };
    match m {
        Mutation::FlipBit { at: i, bit } if n > 0 => bytes[at(*i)] ^= 1 << bit,
        Mutation::SetByte { at: i, value } if n > 0 => bytes[at(*i)] = *value,
        Mutation::Truncate { keep } => bytes.truncate(keep % (n + 1)),
        Mutation::DropHead { count } => {
            bytes.drain(..count % (n + 1));
        }
        Mutation::Delete { at: i, len } if n > 0 => {
            let start = at(*i);
            bytes.drain(start..(start + len).min(n));
        }
        Mutation::Insert { at: i, bytes: more } => {
            let start = i % (n + 1);
            bytes.splice(start..start, more.iter().copied());
        }
        Mutation::Splice { from, to, len } if n > 0 => {
            let (from, to) = (at(*from), at(*to));
            let len = (*len).min(n - from).min(n - to);
            let run: Vec<u8> = bytes[from..from + len].to_vec();
            bytes[to..to + len].copy_from_slice(&run);
        }
        Mutation::Repeat { at: i, len, times } if n > 0 => {
            let start = at(*i);
            let end = (start + len).min(n);
            let run: Vec<u8> = bytes[start..end].to_vec();
            for _ in 0..*times {
                bytes.splice(end..end, run.iter().copied());
            }
        }
        _ => {}
    }
}

/// `bytes` after every mutation of `ms`.
pub fn mutated(bytes: &[u8], ms: &[Mutation]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for m in ms {
        apply(&mut out, m);
    }
    out
}
