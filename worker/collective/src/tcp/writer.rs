//! The long-lived sender thread: writes queued copies of messages to peers while the engine
//! thread goes on.
//!
//! If every rank wrote with blocking calls before reading, all could sit in `write` on full
//! socket buffers while nobody reads. So whatever cannot be written at once goes to this
//! thread, in order per peer: large point-to-point sends (which makes `send` eager: it returns
//! before the peer receives) and the unwritten rest of a stalled direct exchange. The engine
//! thread then only ever blocks on reads. (The ring has its own sender, which writes straight
//! from the caller's buffer; see `ring`.)
//!
//! Buffers travel to the thread and back through channels and are reused, so a steady stream
//! of same-sized operations allocates nothing.

use std::io;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::conn::Conn;
use crate::{CollectiveError, Result};

/// Size of every pooled buffer: queued messages are copied and written in pieces this big.
pub(super) const BUF_BYTES: usize = 256 * 1024;

/// Pooled buffers kept after an operation; beyond this, returned buffers are freed so one huge
/// operation does not pin its peak memory forever.
const POOL_KEEP: usize = 64;

struct Job {
    peer: usize,
    buf: Vec<u8>,
    len: usize,
}

struct Done {
    peer: usize,
    buf: Vec<u8>,
    result: io::Result<()>,
}

pub(super) struct Writer {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    /// Jobs queued or being written, per peer.
    in_flight: Vec<usize>,
    total: usize,
    pool: Vec<Vec<u8>>,
    /// First write error, reported by the next `wait_idle`.
    failure: Option<(usize, io::Error)>,
}

impl Writer {
    /// Starts the thread; `conns[p]` is this rank's connection to rank `p`.
    pub fn spawn(rank: usize, conns: Vec<Option<Arc<Conn>>>) -> io::Result<Self> {
        let world = conns.len();
        let (job_tx, job_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let thread = std::thread::Builder::new().name(format!("tessera-tcp-send-{rank}")).spawn(move || run(conns, job_rx, done_tx))?;
        Ok(Writer {
            jobs: Some(job_tx),
            done: done_rx,
            thread: Some(thread),
            in_flight: vec![0; world],
            total: 0,
            pool: Vec::new(),
            failure: None,
        })
    }

    /// A writer with no thread, for a group of one rank, which never sends.
    pub fn none() -> Self {
        let (_, done_rx) = mpsc::channel();
        Writer { jobs: None, done: done_rx, thread: None, in_flight: vec![0; 1], total: 0, pool: Vec::new(), failure: None }
    }

    /// A buffer of [`BUF_BYTES`] bytes, from the pool when one has come back.
    pub fn buffer(&mut self) -> Vec<u8> {
        if self.pool.is_empty() {
            self.poll();
        }
        self.pool.pop().unwrap_or_else(|| vec![0u8; BUF_BYTES])
    }

    /// Returns an unused buffer to the pool.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if buf.len() == BUF_BYTES && self.pool.len() < POOL_KEEP {
            self.pool.push(buf);
        }
    }

    /// Queues `buf[..len]` for `peer`. The caller must have put the link in blocking mode.
    pub fn submit(&mut self, peer: usize, buf: Vec<u8>, len: usize) -> Result<()> {
        let jobs = self.jobs.as_ref().ok_or_else(|| thread_gone(peer))?;
        jobs.send(Job { peer, buf, len }).map_err(|_| thread_gone(peer))?;
        self.in_flight[peer] += 1;
        self.total += 1;
        Ok(())
    }

    /// Collects finished jobs without waiting.
    pub fn poll(&mut self) {
        while let Ok(done) = self.done.try_recv() {
            self.complete(done);
        }
    }

    /// Whether nothing is queued for `peer`, so the engine thread may use its socket directly.
    pub fn idle_for(&mut self, peer: usize) -> bool {
        if self.in_flight[peer] > 0 {
            self.poll();
        }
        self.in_flight[peer] == 0
    }

    /// Waits until every queued job is written, reporting the first write error.
    pub fn wait_idle(&mut self) -> Result<()> {
        while self.total > 0 {
            match self.done.recv() {
                Ok(done) => self.complete(done),
                Err(_) => return Err(self.lost_thread()),
            }
        }
        match self.failure.take() {
            Some((peer, source)) => Err(CollectiveError::Io { peer, source }),
            None => Ok(()),
        }
    }

    /// Like [`Writer::wait_idle`] but gives up after `limit`; true when everything was written.
    pub fn drain_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.total > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.done.recv_timeout(left) {
                Ok(done) => self.complete(done),
                Err(_) => return false,
            }
        }
        self.failure.is_none()
    }

    fn complete(&mut self, done: Done) {
        self.in_flight[done.peer] = self.in_flight[done.peer].saturating_sub(1);
        self.total = self.total.saturating_sub(1);
        if let Err(e) = done.result {
            self.failure.get_or_insert((done.peer, e));
        }
        self.recycle(done.buf);
    }

    /// The thread is gone (it only exits early by panicking): nothing queued will be written.
    fn lost_thread(&mut self) -> CollectiveError {
        let peer = self.in_flight.iter().position(|&n| n > 0).unwrap_or(0);
        self.in_flight.iter_mut().for_each(|n| *n = 0);
        self.total = 0;
        thread_gone(peer)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has written what was queued; the owner
        // shuts the sockets down first if that could take forever.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn thread_gone(peer: usize) -> CollectiveError {
    CollectiveError::Io { peer, source: io::Error::new(io::ErrorKind::BrokenPipe, "the TCP sender thread has exited") }
}

fn run(conns: Vec<Option<Arc<Conn>>>, jobs: Receiver<Job>, done: Sender<Done>) {
    for job in jobs {
        let result = match conns.get(job.peer).and_then(Option::as_ref) {
            Some(conn) => conn.write_all(&job.buf[..job.len]),
            None => Err(io::Error::new(io::ErrorKind::NotConnected, "no connection to that rank")),
        };
        if done.send(Done { peer: job.peer, buf: job.buf, result }).is_err() {
            return;
        }
    }
}
