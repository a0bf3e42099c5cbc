//! One connection to a peer as the engine thread sees it: a stream whose blocking mode is
//! tracked, so switching costs a syscall only when the mode actually changes.
//!
//! Waiting for data spins on non-blocking reads for a short while (a reply usually arrives
//! within microseconds during a forward pass) and then blocks in the kernel, so a worker idling
//! for minutes between steps burns no core. Blocking reads have no timeout: a dead peer is
//! noticed through EOF or a reset, never through a clock.
//!
//! The mode is a property of the socket, shared with the sender threads through the same
//! [`Conn`], so the owner switches a link to non-blocking only while that thread has nothing queued for
//! it (see `Mesh` in the parent module).

use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::conn::Conn;

pub(super) struct Link {
    conn: Arc<Conn>,
    nonblocking: bool,
}

impl Link {
    /// Wraps a connection whose stream is in blocking mode.
    pub fn new(conn: Conn) -> Self {
        Link { conn: Arc::new(conn), nonblocking: false }
    }

    /// The connection itself, for reading and writing from several threads at once; the caller
    /// must have put the link in blocking mode.
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    pub fn set_nonblocking(&mut self, nonblocking: bool) -> io::Result<()> {
        if self.nonblocking != nonblocking {
            self.conn.stream().set_nonblocking(nonblocking)?;
            self.nonblocking = nonblocking;
        }
        Ok(())
    }

    /// One non-blocking write: `Ok(None)` when the socket buffer is full. The link must be in
    /// non-blocking mode.
    pub fn try_write(&mut self, buf: &[u8]) -> io::Result<Option<usize>> {
        self.conn.try_write(buf)
    }

    /// One non-blocking read: `Ok(None)` when nothing has arrived, an error at EOF. The link
    /// must be in non-blocking mode.
    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.conn.try_read(buf)
    }

    /// Fills `buf`, blocking in the kernel.
    pub fn read_blocking(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.set_nonblocking(false)?;
        self.conn.read_full(buf)
    }

    /// Fills `buf`, busy-polling while bytes keep arriving within `spin` of each other and
    /// blocking in the kernel after the first longer gap.
    pub fn read_spin(&mut self, buf: &mut [u8], spin: Duration) -> io::Result<()> {
        if spin.is_zero() {
            return self.read_blocking(buf);
        }
        self.set_nonblocking(true)?;
        let mut filled = 0;
        let mut last_progress = Instant::now();
        while filled < buf.len() {
            match self.try_read(&mut buf[filled..])? {
                Some(n) => {
                    filled += n;
                    last_progress = Instant::now();
                }
                None if last_progress.elapsed() >= spin => {
                    return self.read_blocking(&mut buf[filled..]);
                }
                // Yielding rather than spinning hot lets a peer rank sharing this core run.
                None => std::thread::yield_now(),
            }
        }
        Ok(())
    }

    /// A clone of the socket that can only be used to shut it down (see `Collective::interrupt`).
    pub fn shutdown_handle(&self) -> io::Result<TcpStream> {
        self.conn.stream().try_clone()
    }

    /// Makes every blocked or future operation on this connection, in any thread and at both
    /// ends, fail promptly.
    pub fn shutdown(&self) {
        // Already-closed sockets report an error here; there is nothing left to do for them.
        let _ = self.conn.stream().shutdown(Shutdown::Both);
    }
}
