//! Byte layouts on the wire: the rendezvous hello, the header in front of every message, and
//! f32 payloads. Everything is little-endian, so ranks on any host agree on the bytes.
//!
//! The header names the operation and its length so that ranks calling different operations,
//! or the same one with different sizes, get [`CollectiveError::Protocol`] instead of reading
//! each other's payloads as garbage.
//!
//! On a little-endian host the wire encoding of an f32 slice is its own memory, so bulk
//! transfers read and write the caller's buffer through [`as_bytes`] / [`as_bytes_mut`] with no
//! conversion pass: on loopback, such passes cost as much CPU as the kernel's copies.

use std::fmt;

use crate::{CollectiveError, Result};

/// Bytes in a rendezvous hello (and in the acknowledgement, which has the same layout).
pub(super) const HELLO_LEN: usize = 16;
/// Bytes in a message header.
pub(super) const HEADER_LEN: usize = 16;
/// Bumped whenever the byte layout changes, so mixed builds refuse to form a group.
pub(super) const WIRE_VERSION: u32 = 2;

const HELLO_MAGIC: [u8; 4] = *b"TSRH";
const HEADER_MAGIC: [u8; 4] = *b"TSRM";

/// First bytes on a fresh connection, in both directions: who is speaking and in which group
/// shape, so accepted connections can be matched to ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hello {
    pub version: u32,
    pub rank: u32,
    pub world: u32,
}

impl Hello {
    pub fn new(rank: usize, world: usize) -> Self {
        Hello { version: WIRE_VERSION, rank: rank as u32, world: world as u32 }
    }

    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[0..4].copy_from_slice(&HELLO_MAGIC);
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.rank.to_le_bytes());
        b[12..16].copy_from_slice(&self.world.to_le_bytes());
        b
    }

    /// `None` when the bytes do not start with the hello magic: the connection is not a rank.
    pub fn decode(b: &[u8; HELLO_LEN]) -> Option<Hello> {
        if b[0..4] != HELLO_MAGIC {
            return None;
        }
        Some(Hello { version: u32_at(b, 4), rank: u32_at(b, 8), world: u32_at(b, 12) })
    }
}

/// Which operation a message belongs to. Direct and ring variants are distinct so that ranks
/// configured with different ring thresholds are caught rather than deadlocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    DirectAllReduce,
    RingAllReduce,
    DirectAllGather,
    RingAllGather,
    Send,
}

impl Op {
    fn code(self) -> u32 {
        match self {
            Op::DirectAllReduce => 1,
            Op::RingAllReduce => 2,
            Op::DirectAllGather => 3,
            Op::RingAllGather => 4,
            Op::Send => 5,
        }
    }

    fn from_code(code: u32) -> Option<Op> {
        Some(match code {
            1 => Op::DirectAllReduce,
            2 => Op::RingAllReduce,
            3 => Op::DirectAllGather,
            4 => Op::RingAllGather,
            5 => Op::Send,
            _ => return None,
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::DirectAllReduce => "all_reduce_sum (direct)",
            Op::RingAllReduce => "all_reduce_sum (ring)",
            Op::DirectAllGather => "all_gather (direct)",
            Op::RingAllGather => "all_gather (ring)",
            Op::Send => "send",
        })
    }
}

/// Announces one message: the operation and its length in f32 values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    pub op: Op,
    pub len: u64,
}

impl Header {
    pub fn new(op: Op, len: usize) -> Self {
        Header { op, len: len as u64 }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&HEADER_MAGIC);
        b[4..8].copy_from_slice(&self.op.code().to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Checks that `bytes` (at least [`HEADER_LEN`] long) announce exactly `self`, sent by
    /// rank `peer`.
    pub fn expect_in(&self, bytes: &[u8], peer: usize) -> Result<()> {
        if bytes.len() < HEADER_LEN || bytes[0..4] != HEADER_MAGIC {
            return Err(CollectiveError::Protocol(format!(
                "rank {peer} sent bytes that are not a message header while this rank expected \
                 {} of {} values; the streams are out of step",
                self.op, self.len
            )));
        }
        let code = u32_at(bytes, 4);
        let len = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or([0; 8]));
        match Op::from_code(code) {
            Some(op) if op == self.op && len == self.len => Ok(()),
            Some(op) => Err(CollectiveError::Protocol(format!(
                "rank {peer} is in {op} of {len} values while this rank is in {} of {} values",
                self.op, self.len
            ))),
            None => Err(CollectiveError::Protocol(format!("rank {peer} sent unknown operation code {code}"))),
        }
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!(
    "the TCP collective sends f32 values in their in-memory layout, which matches its \
     little-endian wire format only on little-endian hosts"
);

/// The wire encoding of `values`, which on a little-endian host is their own memory.
pub(super) fn as_bytes(values: &[f32]) -> &[u8] {
    // SAFETY: the view covers exactly the memory of `values` (`size_of_val` bytes from its
    // start) and borrows it for the same lifetime; `u8` has alignment 1 and f32 has no padding,
    // so every byte is initialised.
    unsafe { std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

/// A writable view of `values` as wire bytes: receiving into it decodes for free.
pub(super) fn as_bytes_mut(values: &mut [f32]) -> &mut [u8] {
    // SAFETY: as for `as_bytes`, and the view is the only access to that memory while it lives;
    // every bit pattern is a valid f32, so whatever bytes are written leave valid values.
    unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(values)) }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Writes `src` as little-endian bytes into `dst` (`dst.len() == 4 * src.len()`).
pub(super) fn encode_f32(src: &[f32], dst: &mut [u8]) {
    for (d, s) in dst.chunks_exact_mut(4).zip(src) {
        d.copy_from_slice(&s.to_le_bytes());
    }
}

/// Reads little-endian f32 values from `src` into `dst`.
pub(super) fn decode_f32(src: &[u8], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    }
}

/// Adds the little-endian f32 values in `src` to `acc`.
pub(super) fn add_f32(src: &[u8], acc: &mut [f32]) {
    for (d, s) in acc.iter_mut().zip(src.chunks_exact(4)) {
        *d += f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_mismatch() {
        let h = Header::new(Op::RingAllReduce, 12345);
        let b = h.encode();
        assert!(h.expect_in(&b, 1).is_ok());
        let other = Header::new(Op::RingAllReduce, 12346);
        assert!(matches!(other.expect_in(&b, 1), Err(CollectiveError::Protocol(_))));
        let other = Header::new(Op::Send, 12345);
        assert!(matches!(other.expect_in(&b, 1), Err(CollectiveError::Protocol(_))));
        assert!(matches!(h.expect_in(&[0u8; HEADER_LEN], 1), Err(CollectiveError::Protocol(_))));
    }

    #[test]
    fn hello_round_trip() {
        let h = Hello::new(3, 8);
        assert_eq!(Hello::decode(&h.encode()), Some(h));
        assert_eq!(Hello::decode(&[0u8; HELLO_LEN]), None);
    }

    #[test]
    fn payload_helpers() {
        let a = [1.5f32, -2.0, 3.25];
        let mut bytes = [0u8; 12];
        encode_f32(&a, &mut bytes);
        let mut back = [0f32; 3];
        decode_f32(&bytes, &mut back);
        assert_eq!(a, back);
        add_f32(&bytes, &mut back);
        assert_eq!(back, [3.0, -4.0, 6.5]);
        assert_eq!(as_bytes(&a), &bytes[..]);
        as_bytes_mut(&mut back).copy_from_slice(&bytes);
        assert_eq!(back, a);
    }
}
