//! Point-to-point messages: a header (operation and length) and the values.
//!
//! Small sends are written by the engine thread directly, without waiting for the sender
//! thread to wake up; whatever the socket cannot take at once, and every large send, is queued
//! on the sender thread. So `send` never blocks on a peer that is not receiving yet, and a ring
//! of ranks that all send before they receive cannot deadlock.

use super::mesh::{io_error, sized, Mesh};
use super::wire::{as_bytes_mut, encode_f32, Header, Op, HEADER_LEN};
use crate::Result;

/// Largest message (header included) written by the engine thread itself.
const DIRECT_MAX: usize = 64 * 1024;

pub(super) fn send(mesh: &mut Mesh, scratch: &mut Vec<u8>, peer: usize, data: &[f32]) -> Result<()> {
    let header = Header::new(Op::Send, data.len());
    let len = HEADER_LEN + data.len() * 4;
    if len > DIRECT_MAX || !mesh.writer.idle_for(peer) {
        // Queued after whatever is already queued for this peer, which keeps the order.
        mesh.send_header(peer, header)?;
        return mesh.send_values(peer, data);
    }
    let msg = sized(scratch, len);
    msg[..HEADER_LEN].copy_from_slice(&header.encode());
    encode_f32(data, &mut msg[HEADER_LEN..]);
    let link = mesh.link(peer)?;
    link.set_nonblocking(true).map_err(io_error(peer))?;
    let mut written = 0;
    while written < len {
        match link.try_write(&msg[written..]).map_err(io_error(peer))? {
            Some(n) => written += n,
            None => break,
        }
    }
    if written < len {
        mesh.submit_copy(peer, &msg[written..])?;
    }
    Ok(())
}

pub(super) fn recv(mesh: &mut Mesh, peer: usize, out: &mut [f32]) -> Result<()> {
    mesh.expect_header(peer, Header::new(Op::Send, out.len()), true)?;
    mesh.read(peer, as_bytes_mut(out))
}
