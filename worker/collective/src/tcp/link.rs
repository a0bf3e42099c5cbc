//! One connection to a peer as the engine thread sees it: a stream whose blocking mode is
//! tracked, so switching costs a syscall only when the mode actually changes.
//!
//! Waiting for data spins on non-blocking reads for a short while (a reply usually arrives
//! within microseconds during a forward pass) and then blocks in the kernel, so a worker idling
//! for minutes between steps burns no core. Blocking reads have no timeout: a dead peer is
//! noticed through EOF or a reset, never through a clock.
//!
//! The mode is a property of the socket, shared with the sender thread's clone of the stream,
//! so the owner switches a link to non-blocking only while that thread has nothing queued for
//! it (see `Mesh` in the parent module).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

pub(super) struct Link {
    stream: TcpStream,
    nonblocking: bool,
}

impl Link {
    /// Wraps a connected stream, which must be in blocking mode.
    pub fn new(stream: TcpStream) -> Self {
        Link { stream, nonblocking: false }
    }

    pub fn try_clone_stream(&self) -> io::Result<TcpStream> {
        self.stream.try_clone()
    }

    /// The stream itself, for reading and writing from several threads at once; the caller
    /// must have put the link in blocking mode.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    pub fn set_nonblocking(&mut self, nonblocking: bool) -> io::Result<()> {
        if self.nonblocking != nonblocking {
            self.stream.set_nonblocking(nonblocking)?;
            self.nonblocking = nonblocking;
        }
        Ok(())
    }

    /// One non-blocking write: `Ok(None)` when the socket buffer is full. The link must be in
    /// non-blocking mode.
    pub fn try_write(&mut self, buf: &[u8]) -> io::Result<Option<usize>> {
        match self.stream.write(buf) {
            Ok(0) if !buf.is_empty() => Err(io::Error::new(io::ErrorKind::WriteZero, "connection accepted no bytes")),
            Ok(n) => Ok(Some(n)),
            Err(e) if would_block(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One non-blocking read: `Ok(None)` when nothing has arrived, an error at EOF. The link
    /// must be in non-blocking mode.
    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.stream.read(buf) {
            Ok(0) if !buf.is_empty() => Err(closed()),
            Ok(n) => Ok(Some(n)),
            Err(e) if would_block(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Fills `buf`, blocking in the kernel.
    pub fn read_blocking(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.set_nonblocking(false)?;
        read_full(&self.stream, buf)
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

    /// Makes every blocked or future operation on this connection, in any thread and at both
    /// ends, fail promptly.
    pub fn shutdown(&self) {
        // Already-closed sockets report an error here; there is nothing left to do for them.
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// Fills `buf` from a blocking stream; EOF before the end is an error.
pub(super) fn read_full(mut stream: &TcpStream, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match stream.read(buf) {
            Ok(0) => return Err(closed()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn would_block(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed the connection")
}
