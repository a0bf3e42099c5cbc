//! Large collectives: the bandwidth-optimal ring.
//!
//! All-reduce is a reduce-scatter followed by an all-gather. The buffer is cut into `n` chunks;
//! in `n - 1` steps every rank adds the chunk arriving from the previous rank to its own and
//! forwards the partial sum, after which rank `r` holds the complete sum of chunk `r + 1`.
//! `n - 1` more steps circulate the complete chunks. Every rank sends and receives
//! `2 (n - 1) / n` of the buffer, whatever `n` is.
//!
//! Each chunk's final sum is computed once, by one rank, and then only copied, so all ranks
//! end with identical bits even though different chunks are summed in different rank orders.
//!
//! Chunks move in pieces of [`PIECE`] values. A piece is forwarded as soon as it is reduced, so
//! the next rank works on it while this one receives the following piece. Sending and
//! receiving overlap: a sender thread, scoped to the operation, writes pieces straight from the
//! caller's buffer while this thread blocks reading from the previous rank, also straight into
//! the caller's buffer. The two threads never touch the same piece at once because each piece
//! is a separate `&mut` slice that moves between them through channels.

use std::io;
use std::ops::Range;
use std::sync::mpsc::{self, Receiver, Sender};

use super::conn::Conn;
use super::mesh::{io_error, sized, Mesh};
use super::wire::{add_f32, as_bytes, as_bytes_mut, Header, Op, HEADER_LEN};
use crate::{CollectiveError, Result};

/// Values per piece (256 KiB): the unit of pipelining and of hand-over between the threads.
/// Small enough that the next rank starts forwarding early, large enough that per-piece costs
/// vanish; 128 KiB to 1 MiB measured the same on loopback.
const PIECE: usize = 64 * 1024;

/// Sum of `data` over all ranks, in place. `recv` is scratch reused across calls.
pub(super) fn all_reduce(mesh: &mut Mesh, recv: &mut Vec<u8>, data: &mut [f32]) -> Result<()> {
    let (rank, world, len) = (mesh.rank, mesh.world, data.len());
    let recv = sized(recv, PIECE * 4);
    let header = Header::new(Op::RingAllReduce, len);
    run(
        mesh,
        header,
        data,
        |c| c * len / world..(c + 1) * len / world,
        |ring| {
            ring.send_chunk(rank)?;
            ring.expect_header()?;
            for step in 0..world - 1 {
                // The chunk the previous rank sends now is the one it received a step earlier.
                let c = (rank + 2 * world - step - 1) % world;
                for id in ring.chunk(c) {
                    // After the last step this chunk is complete, and forwarding it is already the
                    // first step of the all-gather.
                    ring.receive_add_forward(id, recv)?;
                }
            }
            ring.gather((rank + 1) % world)
        },
    )
}

/// Every rank's `local`, in rank order, into `out` (`out.len() == local.len() * world`).
pub(super) fn all_gather(mesh: &mut Mesh, local: &[f32], out: &mut [f32]) -> Result<()> {
    let (rank, m) = (mesh.rank, local.len());
    out[rank * m..(rank + 1) * m].copy_from_slice(local);
    let header = Header::new(Op::RingAllGather, m);
    run(
        mesh,
        header,
        out,
        |c| c * m..(c + 1) * m,
        |ring| {
            ring.send_chunk(rank)?;
            ring.expect_header()?;
            ring.gather(rank)
        },
    )
}

/// Cuts `data` into pieces along the chunks given by `chunk` (consecutive ranges covering
/// `data`), starts the sender thread, and runs `body`. On failure every connection is shut
/// down first, so the sender thread cannot stay blocked on a peer and the scope can end.
fn run<'a>(
    mesh: &'a mut Mesh,
    header: Header,
    data: &'a mut [f32],
    chunk: impl Fn(usize) -> Range<usize>,
    body: impl FnOnce(&mut Ring<'a>) -> Result<()>,
) -> Result<()> {
    let (world, next, prev) = (mesh.world, mesh.next(), mesh.prev());
    // Bytes queued earlier (an eager `send`) must reach the wire first; after that the
    // sockets are this operation's alone, and both threads need them blocking.
    mesh.writer.wait_idle()?;
    mesh.link(next)?.set_nonblocking(false).map_err(io_error(next))?;
    mesh.link(prev)?.set_nonblocking(false).map_err(io_error(prev))?;
    let mesh: &'a Mesh = mesh;
    let next_conn: &Conn = mesh.conn(next)?;
    let prev_conn: &Conn = mesh.conn(prev)?;

    let mut pieces = Vec::new();
    let mut first = Vec::with_capacity(world + 1);
    let mut rest = data;
    for c in 0..world {
        first.push(pieces.len());
        let (mut chunk_data, tail) = std::mem::take(&mut rest).split_at_mut(chunk(c).len());
        rest = tail;
        while !chunk_data.is_empty() {
            let take = PIECE.min(chunk_data.len());
            let (piece, tail) = std::mem::take(&mut chunk_data).split_at_mut(take);
            pieces.push(Some(piece));
            chunk_data = tail;
        }
    }
    first.push(pieces.len());

    std::thread::scope(|scope| {
        // Should this thread panic, the scope still joins the sender, which must then not stay
        // blocked writing to a peer that stopped reading.
        let _unblock = ShutdownOnPanic(mesh);
        let (jobs, job_rx) = mpsc::channel();
        let (done_tx, done) = mpsc::channel();
        // The sender only loops over `write_all`, so a small stack keeps its start cheap.
        let sender = std::thread::Builder::new()
            .name("tessera-tcp-ring".into())
            .stack_size(64 * 1024)
            .spawn_scoped(scope, move || write_pieces(next_conn, header, job_rx, done_tx))
            .map_err(io_error(next))?;
        let mut ring = Ring { world, next, prev, header, pieces, first, jobs, done, prev_conn };
        let result = body(&mut ring);
        if result.is_err() {
            mesh.shutdown();
        }
        ring.finish();
        let written = match sender.join() {
            Ok(written) => written.map_err(io_error(next)),
            Err(_) => Err(sender_gone(next)),
        };
        result.and(written)
    })
}

/// A piece on its way back from the sender thread, with the outcome of writing it.
type Returned<'a> = (usize, &'a mut [f32], io::Result<()>);

/// This thread's side of one ring operation.
struct Ring<'a> {
    world: usize,
    next: usize,
    prev: usize,
    header: Header,
    /// Every piece of the buffer; `None` while the sender thread holds it.
    pieces: Vec<Option<&'a mut [f32]>>,
    /// Chunk `c` consists of pieces `first[c]..first[c + 1]`.
    first: Vec<usize>,
    jobs: Sender<(usize, &'a mut [f32])>,
    done: Receiver<Returned<'a>>,
    prev_conn: &'a Conn,
}

impl<'a> Ring<'a> {
    fn chunk(&self, c: usize) -> Range<usize> {
        self.first[c]..self.first[c + 1]
    }

    /// Takes piece `id`, waiting for the sender thread to finish writing it if needed.
    fn take(&mut self, id: usize) -> Result<&'a mut [f32]> {
        loop {
            if let Some(piece) = self.pieces[id].take() {
                return Ok(piece);
            }
            let (returned, piece, written) = self.done.recv().map_err(|_| sender_gone(self.next))?;
            self.pieces[returned] = Some(piece);
            written.map_err(io_error(self.next))?;
        }
    }

    fn forward(&mut self, id: usize, piece: &'a mut [f32]) -> Result<()> {
        self.jobs.send((id, piece)).map_err(|_| sender_gone(self.next))
    }

    fn send_chunk(&mut self, c: usize) -> Result<()> {
        for id in self.chunk(c) {
            let piece = self.take(id)?;
            self.forward(id, piece)?;
        }
        Ok(())
    }

    fn expect_header(&mut self) -> Result<()> {
        let mut bytes = [0u8; HEADER_LEN];
        self.prev_conn.read_full(&mut bytes).map_err(io_error(self.prev))?;
        self.header.expect_in(&bytes, self.prev)
    }

    /// Adds the previous rank's partial sum of piece `id` to ours and passes the result on.
    fn receive_add_forward(&mut self, id: usize, scratch: &mut [u8]) -> Result<()> {
        let piece = self.take(id)?;
        let incoming = &mut scratch[..piece.len() * 4];
        self.prev_conn.read_full(incoming).map_err(io_error(self.prev))?;
        add_f32(incoming, piece);
        self.forward(id, piece)
    }

    /// The all-gather half of the ring: this rank holds the complete chunk `held` and has
    /// queued it; receive the other `n - 1` chunks from the previous rank, forwarding each one
    /// the next rank still lacks.
    fn gather(&mut self, held: usize) -> Result<()> {
        for step in 0..self.world - 1 {
            let c = (held + 2 * self.world - step - 1) % self.world;
            // The chunk arriving in the last step is the one the next rank started with.
            let forward = step + 2 < self.world;
            for id in self.chunk(c) {
                let piece = self.take(id)?;
                self.prev_conn.read_full(as_bytes_mut(piece)).map_err(io_error(self.prev))?;
                if forward {
                    self.forward(id, piece)?;
                } else {
                    self.pieces[id] = Some(piece);
                }
            }
        }
        Ok(())
    }

    /// Closes the queue and waits until the sender thread has written (or failed to write)
    /// everything queued; its first error comes with its exit.
    fn finish(self) {
        let Ring { jobs, done, .. } = self;
        drop(jobs);
        for _ in done {}
    }
}

/// The sender thread: the header, then each queued piece, handing every piece back. Returns
/// the first write error.
fn write_pieces<'a>(conn: &Conn, header: Header, jobs: Receiver<(usize, &'a mut [f32])>, done: Sender<Returned<'a>>) -> io::Result<()> {
    let mut first_error = conn.write_all(&header.encode()).err();
    for (id, piece) in jobs {
        // After a failure the stream is unusable; keep returning pieces so nobody waits.
        let written = match &first_error {
            Some(e) => Err(io::Error::new(e.kind(), "an earlier write to this rank failed")),
            None => conn.write_all(as_bytes(piece)),
        };
        if let Err(e) = &written {
            if first_error.is_none() {
                first_error = Some(io::Error::new(e.kind(), e.to_string()));
            }
        }
        if done.send((id, piece, written)).is_err() {
            break;
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Shuts every connection down if dropped during a panic.
struct ShutdownOnPanic<'a>(&'a Mesh);

impl Drop for ShutdownOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.shutdown();
        }
    }
}

fn sender_gone(peer: usize) -> CollectiveError {
    CollectiveError::Io { peer, source: io::Error::new(io::ErrorKind::BrokenPipe, "the ring's sender thread has exited") }
}
