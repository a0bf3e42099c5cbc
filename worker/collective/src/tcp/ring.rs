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
//! Chunks move in pieces of one pooled buffer. A piece is forwarded as soon as it is reduced,
//! so the next rank works on it while this one receives the following piece. Writes go
//! through the sender thread; this thread only blocks reading from the previous rank.

use std::ops::Range;

use super::mesh::{sized, Mesh};
use super::wire::{add_encode_f32, decode_f32, Header, Op};
use super::writer::BUF_BYTES;
use crate::Result;

/// Values per piece.
const PIECE: usize = BUF_BYTES / 4;

/// Sum of `data` over all ranks, in place. `recv` is scratch reused across calls.
pub(super) fn all_reduce(mesh: &mut Mesh, recv: &mut Vec<u8>, data: &mut [f32]) -> Result<()> {
    let (rank, world) = (mesh.rank, mesh.world);
    let (next, prev) = (mesh.next(), mesh.prev());
    let len = data.len();
    let chunk = |c: usize| c * len / world..(c + 1) * len / world;
    let header = Header::new(Op::RingAllReduce, len);

    mesh.send_header(next, header)?;
    mesh.send_values(next, &data[chunk(rank)])?;
    mesh.expect_header(prev, header, false)?;

    let recv = sized(recv, BUF_BYTES);
    for step in 0..world - 1 {
        // The chunk the previous rank sends now is the one it received a step earlier.
        let c = (rank + 2 * world - step - 1) % world;
        for piece in pieces(chunk(c)) {
            let bytes = piece.len() * 4;
            mesh.read_blocking(prev, &mut recv[..bytes])?;
            let mut buf = mesh.writer.buffer();
            add_encode_f32(&mut data[piece], &recv[..bytes], &mut buf[..bytes]);
            // After the last step this chunk is complete, and sending it on is already the
            // first step of the all-gather.
            mesh.submit(next, buf, bytes)?;
        }
    }
    gather_steps(mesh, data, chunk, (rank + 1) % world)?;
    mesh.writer.wait_idle()
}

/// Every rank's `local`, in rank order, into `out` (`out.len() == local.len() * world`).
pub(super) fn all_gather(mesh: &mut Mesh, local: &[f32], out: &mut [f32]) -> Result<()> {
    let rank = mesh.rank;
    let (next, prev) = (mesh.next(), mesh.prev());
    let m = local.len();
    let block = |c: usize| c * m..(c + 1) * m;
    let header = Header::new(Op::RingAllGather, m);

    mesh.send_header(next, header)?;
    mesh.send_values(next, local)?;
    out[block(rank)].copy_from_slice(local);
    mesh.expect_header(prev, header, false)?;
    gather_steps(mesh, out, block, rank)?;
    mesh.writer.wait_idle()
}

/// The all-gather half of the ring: this rank already holds the complete chunk `held` and has
/// queued it for the next rank; receive the other `n - 1` chunks from the previous rank,
/// forwarding each one the next rank still lacks.
fn gather_steps(
    mesh: &mut Mesh,
    data: &mut [f32],
    chunk: impl Fn(usize) -> Range<usize>,
    held: usize,
) -> Result<()> {
    let world = mesh.world;
    let (next, prev) = (mesh.next(), mesh.prev());
    for step in 0..world - 1 {
        let c = (held + 2 * world - step - 1) % world;
        // The chunk arriving in the last step is the one the next rank started with.
        let forward = step + 2 < world;
        for piece in pieces(chunk(c)) {
            let bytes = piece.len() * 4;
            let mut buf = mesh.writer.buffer();
            // On error `buf` is simply dropped: the group is unusable anyway.
            mesh.read_blocking(prev, &mut buf[..bytes])?;
            decode_f32(&buf[..bytes], &mut data[piece]);
            if forward {
                mesh.submit(next, buf, bytes)?;
            } else {
                mesh.writer.recycle(buf);
            }
        }
    }
    Ok(())
}

/// `range` cut into consecutive pieces of at most [`PIECE`] values. Sender and receiver derive
/// the same pieces from the same length, so pieces need no framing of their own.
fn pieces(range: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let end = range.end;
    range.step_by(PIECE).map(move |start| start..(start + PIECE).min(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range() {
        let all: Vec<_> = pieces(3..3 + 2 * PIECE + 5).collect();
        assert_eq!(all, vec![3..3 + PIECE, 3 + PIECE..3 + 2 * PIECE, 3 + 2 * PIECE..3 + 2 * PIECE + 5]);
        assert_eq!(pieces(7..7).count(), 0);
    }
}
