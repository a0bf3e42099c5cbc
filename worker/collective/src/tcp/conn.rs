//! One connection to a peer, shared by the engine thread and the sender threads: the socket,
//! and on a TLS collective the record layer of each direction (`records`).
//!
//! The directions are locked separately, so one thread can read while another writes, as a
//! ring of two ranks does on its single connection. Each lock is only ever contended by
//! accident: the mesh's rules already keep two threads from writing (or reading) one connection
//! at once. A plain connection has no layer and reads and writes the caller's buffers directly.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::records::{Opener, Sealer, SessionKeys};

pub(super) struct Conn {
    stream: TcpStream,
    records: Option<Records>,
}

struct Records {
    seal: Mutex<Sealer>,
    open: Mutex<Opener>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A thread that panicked mid-record leaves the connection failed anyway: the group shuts
    // every connection down, so the state behind the lock is never trusted again.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Conn {
    /// A connection carrying plain bytes.
    pub fn plain(stream: TcpStream) -> Self {
        Conn { stream, records: None }
    }

    /// A connection whose bytes travel in records sealed with `keys`.
    pub fn sealed(stream: TcpStream, keys: SessionKeys) -> io::Result<Self> {
        let (seal, open) = keys.split()?;
        Ok(Conn { stream, records: Some(Records { seal: Mutex::new(seal), open: Mutex::new(open) }) })
    }

    /// The socket, for its options, shutdown and clones that only shut it down.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Writes all of `bytes`; the socket must be blocking.
    pub fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        match &self.records {
            None => (&self.stream).write_all(bytes),
            Some(r) => lock(&r.seal).write_all(&self.stream, bytes),
        }
    }

    /// One non-blocking write: `Ok(None)` when the socket buffer is full.
    pub fn try_write(&self, bytes: &[u8]) -> io::Result<Option<usize>> {
        match &self.records {
            None => match (&self.stream).write(bytes) {
                Ok(0) if !bytes.is_empty() => Err(io::Error::new(io::ErrorKind::WriteZero, "connection accepted no bytes")),
                Ok(n) => Ok(Some(n)),
                Err(e) if would_block(&e) => Ok(None),
                Err(e) => Err(e),
            },
            Some(r) => lock(&r.seal).try_write(&self.stream, bytes),
        }
    }

    /// One non-blocking read: `Ok(None)` when nothing has arrived, an error at EOF.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match &self.records {
            None => match (&self.stream).read(buf) {
                Ok(0) if !buf.is_empty() => Err(closed()),
                Ok(n) => Ok(Some(n)),
                Err(e) if would_block(&e) => Ok(None),
                Err(e) => Err(e),
            },
            Some(r) => lock(&r.open).try_read(&self.stream, buf),
        }
    }

    /// Fills `buf`; the socket must be blocking. EOF before the end is an error.
    pub fn read_full(&self, buf: &mut [u8]) -> io::Result<()> {
        match &self.records {
            None => read_full(&self.stream, buf),
            Some(r) => lock(&r.open).read_full(&self.stream, buf),
        }
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
