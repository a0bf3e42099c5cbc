//! Small and medium collectives: every rank sends its whole buffer to every other rank at once.
//!
//! For a few KiB the cost is latency, not bandwidth, and one exchange has the latency of a
//! single message where a ring needs `2 (n - 1)` hops and a thread start; at 2 ranks it even
//! moves the same bytes as the ring. Each rank then sums all contributions itself in rank
//! order `0..n`, so results are bit-identical on every rank.
//!
//! The engine thread drives all sockets with non-blocking reads and writes, so it never sits in
//! `write` while peers wait for it to read. If the exchange stalls for longer than the spin
//! budget, unwritten bytes go to the sender thread and the remaining reads block.

use std::time::Instant;

use super::mesh::{io_error, sized, Mesh};
use super::wire::{add_f32, decode_f32, encode_f32, Header, Op, HEADER_LEN};
use crate::{CollectiveError, Result};

/// Buffers reused across direct exchanges.
#[derive(Default)]
pub(super) struct DirectScratch {
    /// This rank's message: header then payload.
    send: Vec<u8>,
    /// `inbox[p]`: the message from rank `p`.
    inbox: Vec<Vec<u8>>,
    written: Vec<usize>,
    read: Vec<usize>,
    /// This rank's own values, kept while `data` accumulates the sum.
    own: Vec<f32>,
}

/// Sum of `data` over all ranks, in place.
pub(super) fn all_reduce(mesh: &mut Mesh, scratch: &mut DirectScratch, data: &mut [f32]) -> Result<()> {
    let header = Header::new(Op::DirectAllReduce, data.len());
    exchange(mesh, scratch, header, data)?;
    let rank = mesh.rank;
    let body = HEADER_LEN..HEADER_LEN + data.len() * 4;
    if rank != 0 {
        scratch.own.clear();
        scratch.own.extend_from_slice(data);
    }
    // Rank order, starting from rank 0's values rather than from zero, so every rank performs
    // exactly the same additions.
    for q in 0..mesh.world {
        if q == 0 {
            if rank != 0 {
                decode_f32(&scratch.inbox[0][body.clone()], data);
            }
        } else if q == rank {
            data.iter_mut().zip(&scratch.own).for_each(|(d, s)| *d += *s);
        } else {
            add_f32(&scratch.inbox[q][body.clone()], data);
        }
    }
    Ok(())
}

/// Every rank's `local`, in rank order, into `out`.
pub(super) fn all_gather(mesh: &mut Mesh, scratch: &mut DirectScratch, local: &[f32], out: &mut [f32]) -> Result<()> {
    let header = Header::new(Op::DirectAllGather, local.len());
    exchange(mesh, scratch, header, local)?;
    if local.is_empty() {
        return Ok(());
    }
    let body = HEADER_LEN..HEADER_LEN + local.len() * 4;
    for (q, block) in out.chunks_exact_mut(local.len()).enumerate() {
        if q == mesh.rank {
            block.copy_from_slice(local);
        } else {
            decode_f32(&scratch.inbox[q][body.clone()], block);
        }
    }
    Ok(())
}

/// Sends `header` and `values` to every peer and receives the same-sized message from each
/// into `scratch.inbox`, checking each peer's header.
fn exchange(mesh: &mut Mesh, scratch: &mut DirectScratch, header: Header, values: &[f32]) -> Result<()> {
    let (rank, world) = (mesh.rank, mesh.world);
    let len = HEADER_LEN + values.len() * 4;
    let msg = sized(&mut scratch.send, len);
    msg[..HEADER_LEN].copy_from_slice(&header.encode());
    encode_f32(values, &mut msg[HEADER_LEN..]);
    scratch.inbox.resize_with(world, Vec::new);
    scratch.written.clear();
    scratch.written.resize(world, 0);
    scratch.read.clear();
    scratch.read.resize(world, 0);
    for inbox in &mut scratch.inbox {
        sized(inbox, len);
    }
    // Bytes queued earlier (an eager `send`) must reach the wire before ours.
    mesh.writer.wait_idle()?;
    for peer in (0..world).filter(|&p| p != rank) {
        mesh.link(peer)?.set_nonblocking(true).map_err(io_error(peer))?;
    }

    let DirectScratch { send, inbox, written, read, .. } = scratch;
    let msg = &send[..len];
    let mut last_progress = Instant::now();
    loop {
        let mut progressed = false;
        let mut pending = false;
        for peer in (0..world).filter(|&p| p != rank) {
            let link = mesh.link(peer)?;
            if written[peer] < len {
                if let Some(n) = link.try_write(&msg[written[peer]..]).map_err(io_error(peer))? {
                    written[peer] += n;
                    progressed |= n > 0;
                }
                pending |= written[peer] < len;
            }
            if read[peer] < len {
                let before = read[peer];
                if let Some(n) = link.try_read(&mut inbox[peer][before..len]).map_err(io_error(peer))? {
                    read[peer] += n;
                    progressed |= n > 0;
                }
                // Check the header as soon as it is complete: a peer in a different operation
                // may never send the bytes this rank is waiting for.
                if before < HEADER_LEN && read[peer] >= HEADER_LEN {
                    header.expect_in(&inbox[peer][..HEADER_LEN], peer)?;
                }
                pending |= read[peer] < len;
            }
        }
        if !pending {
            return Ok(());
        }
        if progressed {
            last_progress = Instant::now();
        } else if last_progress.elapsed() >= mesh.spin {
            break;
        } else {
            // Yielding rather than spinning hot lets a peer rank sharing this core run.
            std::thread::yield_now();
        }
    }

    // Stalled: a peer is not reading or not sending yet (it may be busy for a long time).
    // Hand unwritten bytes to the sender thread so this thread can block on reads alone.
    for peer in (0..world).filter(|&p| p != rank) {
        if written[peer] < len {
            mesh.submit_copy(peer, &msg[written[peer]..])?;
        }
    }
    for peer in (0..world).filter(|&p| p != rank) {
        let at = read[peer];
        if at < HEADER_LEN {
            mesh.read_blocking(peer, &mut inbox[peer][at..HEADER_LEN])?;
            header.expect_in(&inbox[peer][..HEADER_LEN], peer)?;
            mesh.read_blocking(peer, &mut inbox[peer][HEADER_LEN..len])?;
        } else if at < len {
            mesh.read_blocking(peer, &mut inbox[peer][at..len])?;
        }
    }
    mesh.writer.wait_idle()
}

/// Rejects an `all_gather` whose output does not hold every rank's block.
pub(super) fn check_gather_len(local: usize, out: usize, world: usize) -> Result<()> {
    if out != local * world {
        return Err(CollectiveError::InvalidArgument(format!(
            "all_gather output has {out} values, expected {} ({local} per rank x {world} ranks)",
            local * world
        )));
    }
    Ok(())
}
