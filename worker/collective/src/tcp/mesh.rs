//! The connections of one rank to all others, with the rules for using them from the engine
//! thread and the sender thread at once.
//!
//! Invariant: a link is in non-blocking mode only while the sender thread has nothing queued
//! for it. The mode belongs to the socket, which both threads share; the sender thread must
//! always find its sockets blocking, and the engine thread restores that before queueing.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use super::conn::Conn;
use super::link::Link;
use super::wire::{encode_f32, Header, HEADER_LEN};
use super::writer::{Writer, BUF_BYTES};
use crate::{CollectiveError, Result};

pub(super) struct Mesh {
    pub rank: usize,
    pub world: usize,
    /// `links[p]` connects to rank `p`; `None` at this rank's own index.
    pub links: Vec<Option<Link>>,
    pub writer: Writer,
    pub spin: Duration,
}

impl Mesh {
    pub fn next(&self) -> usize {
        (self.rank + 1) % self.world
    }

    pub fn prev(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    /// The link to `peer`; the caller has checked `peer` is another rank of the group.
    pub fn link(&mut self, peer: usize) -> Result<&mut Link> {
        let rank = self.rank;
        self.links
            .get_mut(peer)
            .and_then(Option::as_mut)
            .ok_or_else(|| CollectiveError::InvalidArgument(format!("rank {rank} has no connection to rank {peer}")))
    }

    /// The connection to `peer`, for use from several threads at once.
    pub fn conn(&self, peer: usize) -> Result<&Arc<Conn>> {
        let rank = self.rank;
        self.links
            .get(peer)
            .and_then(Option::as_ref)
            .map(Link::conn)
            .ok_or_else(|| CollectiveError::InvalidArgument(format!("rank {rank} has no connection to rank {peer}")))
    }

    /// Fills `buf` from `peer`, spinning briefly first when the socket is ours alone.
    pub fn read(&mut self, peer: usize, buf: &mut [u8]) -> Result<()> {
        let spin = if self.writer.idle_for(peer) { self.spin } else { Duration::ZERO };
        self.link(peer)?.read_spin(buf, spin).map_err(io_error(peer))
    }

    /// Fills `buf` from `peer`, blocking in the kernel. Used for bulk data, where a wake-up is
    /// cheap next to the transfer and the sender thread may be using the same socket.
    pub fn read_blocking(&mut self, peer: usize, buf: &mut [u8]) -> Result<()> {
        self.link(peer)?.read_blocking(buf).map_err(io_error(peer))
    }

    /// Reads a header from `peer` and checks it announces `expected`.
    pub fn expect_header(&mut self, peer: usize, expected: Header, spin: bool) -> Result<()> {
        let mut bytes = [0u8; HEADER_LEN];
        if spin {
            self.read(peer, &mut bytes)?;
        } else {
            self.read_blocking(peer, &mut bytes)?;
        }
        expected.expect_in(&bytes, peer)
    }

    /// Queues `buf[..len]` for `peer` on the sender thread.
    pub fn submit(&mut self, peer: usize, buf: Vec<u8>, len: usize) -> Result<()> {
        self.link(peer)?.set_nonblocking(false).map_err(io_error(peer))?;
        self.writer.submit(peer, buf, len)
    }

    /// Queues a copy of `bytes` for `peer`.
    pub fn submit_copy(&mut self, peer: usize, bytes: &[u8]) -> Result<()> {
        for piece in bytes.chunks(BUF_BYTES) {
            let mut buf = self.writer.buffer();
            buf[..piece.len()].copy_from_slice(piece);
            self.submit(peer, buf, piece.len())?;
        }
        Ok(())
    }

    pub fn send_header(&mut self, peer: usize, header: Header) -> Result<()> {
        self.submit_copy(peer, &header.encode())
    }

    /// Queues `values` for `peer`, encoded in buffer-sized pieces.
    pub fn send_values(&mut self, peer: usize, values: &[f32]) -> Result<()> {
        for piece in values.chunks(BUF_BYTES / 4) {
            let mut buf = self.writer.buffer();
            let len = piece.len() * 4;
            encode_f32(piece, &mut buf[..len]);
            self.submit(peer, buf, len)?;
        }
        Ok(())
    }

    /// Breaks every connection so blocked peers (and our sender thread) fail promptly.
    pub fn shutdown(&self) {
        self.links.iter().flatten().for_each(Link::shutdown);
    }
}

/// Wraps an I/O error with the rank it happened with.
pub(super) fn io_error(peer: usize) -> impl Fn(io::Error) -> CollectiveError {
    move |source| CollectiveError::Io { peer, source }
}

/// `v[..len]`, growing `v` first if needed; buffers only grow, so steady use allocates nothing.
pub(super) fn sized(v: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if v.len() < len {
        v.resize(len, 0);
    }
    &mut v[..len]
}
