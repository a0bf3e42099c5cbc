//! Collectives over TCP: ranks are processes or hosts joined in a full mesh of connections.
//!
//! - Rendezvous (`rendezvous`): every rank's listen address is known up front; lower ranks
//!   accept, higher ranks connect, and a hello matches connections to ranks. With
//!   [`TcpConfig::tls`], mutual TLS (`tls`) admits only peers holding the cluster's certificate.
//! - Small and medium all-reduces and all-gathers (`direct`): one exchange with every peer,
//!   then each rank combines the contributions in rank order, for the latency of a single
//!   message.
//! - Large ones (`ring`): the bandwidth-optimal ring, pipelined in pieces, zero-copy.
//! - Point-to-point (`p2p`): a header and the values.
//!
//! Waiting for data spins for [`TcpConfig::spin`] and then blocks in the kernel. Writes that
//! could block go to a sender thread (`writer`, or the ring's own), so no rank ever blocks in
//! `write` while its peers wait for it to read.
//!
//! Failure is fail-stop: the first error (a closed peer, a protocol mismatch) shuts every
//! connection down, so ranks blocked on this one fail promptly instead of hanging, and later
//! calls return [`CollectiveError::PeerLost`].

mod conn;
mod direct;
mod link;
mod mesh;
mod p2p;
mod records;
mod rendezvous;
mod ring;
mod tls;
mod wire;
mod writer;

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use crate::{Collective, CollectiveError, Result};
use direct::DirectScratch;
use link::Link;
use mesh::{io_error, Mesh};
use writer::Writer;

pub use tls::CollectiveTls;

/// Where the ranks of a TCP group listen and how this rank waits for them.
#[derive(Debug, Clone)]
pub struct TcpConfig {
    /// This rank's index in `peers`.
    pub rank: usize,
    /// Listen address of every rank, indexed by rank; identical on all ranks.
    pub peers: Vec<SocketAddr>,
    /// How long rendezvous may take, counting retries while peers start up.
    pub connect_timeout: Duration,
    /// How long a receiver busy-polls before blocking. Spinning saves the kernel wake-up on
    /// replies that arrive within microseconds; blocking keeps idle workers off the CPU.
    pub spin: Duration,
    /// Mutual TLS at rendezvous (every rank must agree); `None` for plain TCP.
    pub tls: Option<CollectiveTls>,
}

impl TcpConfig {
    /// Rendezvous budget of [`TcpConfig::new`].
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
    /// Spin budget of [`TcpConfig::new`]: a little longer than a loopback round trip.
    pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

    /// A configuration with the default timeout and spin.
    pub fn new(rank: usize, peers: Vec<SocketAddr>) -> Self {
        TcpConfig { rank, peers, connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT, spin: Self::DEFAULT_SPIN, tls: None }
    }
}

/// One rank of a group connected by TCP. Owned by one thread; it keeps a sender thread of
/// its own for writes that could block, which makes large `send`s eager: they return once the
/// values are copied, before the peer receives them. Dropping it waits (up to the connect
/// timeout) for such queued sends to be written, then closes every connection.
pub struct TcpCollective {
    mesh: Mesh,
    direct: DirectScratch,
    /// Encoded small point-to-point messages.
    send_scratch: Vec<u8>,
    /// Received pieces of the ring's reduce-scatter.
    recv_scratch: Vec<u8>,
    ring_threshold: usize,
    /// How long dropping the group waits for queued sends to leave.
    drain_timeout: Duration,
    failed: bool,
}

impl TcpCollective {
    /// Default switch-over from the direct exchange to the ring, in bytes one rank sends in a
    /// direct exchange (buffer bytes x (world - 1)). The direct exchange needs one message
    /// latency and no thread start; the ring sends `2 (n - 1) / n` of the buffer instead of
    /// `n - 1` times it, but starts a sender thread and needs `2 (n - 1)` hops. Measured on
    /// loopback with `cargo bench --bench tcp_collective`: the ring wins above 2-4 MiB at 2
    /// ranks and above 512 KiB-1 MiB at 4 ranks, both around 2 MiB of direct traffic.
    pub const DEFAULT_RING_THRESHOLD: usize = 2 * 1024 * 1024;

    /// Joins the group described by `config`. `listener` is this rank's listener, already
    /// bound to `config.peers[config.rank]` (binding before publishing the address is what
    /// lets callers use port 0). Blocks until every rank is connected or
    /// `config.connect_timeout` has passed.
    pub fn connect(config: TcpConfig, listener: TcpListener) -> Result<Self> {
        let (rank, world) = (config.rank, config.peers.len());
        if rank >= world {
            return Err(CollectiveError::InvalidArgument(format!("rank {rank} is outside a peer list of {world} addresses")));
        }
        let conns = rendezvous::establish(&config, listener)?;
        let links: Vec<Option<Link>> = conns.into_iter().map(|c| c.map(Link::new)).collect();
        let writer = if world == 1 {
            Writer::none()
        } else {
            let conns = links.iter().map(|link| link.as_ref().map(|link| link.conn().clone())).collect();
            Writer::spawn(rank, conns).map_err(io_error(rank))?
        };
        Ok(TcpCollective {
            mesh: Mesh { rank, world, links, writer, spin: config.spin },
            direct: DirectScratch::default(),
            send_scratch: Vec::new(),
            recv_scratch: Vec::new(),
            ring_threshold: Self::DEFAULT_RING_THRESHOLD,
            drain_timeout: config.connect_timeout,
            failed: false,
        })
    }

    /// The direct/ring switch-over: all-reduce and all-gather use the ring when a direct
    /// exchange would make each rank send more than this many bytes (buffer bytes x
    /// (world - 1)).
    pub fn ring_threshold(&self) -> usize {
        self.ring_threshold
    }

    /// Changes the direct/ring switch-over (see [`TcpCollective::ring_threshold`]). Every rank
    /// must use the same value; ranks that disagree get [`CollectiveError::Protocol`].
    pub fn set_ring_threshold(&mut self, bytes: usize) {
        self.ring_threshold = bytes;
    }

    /// Whether a collective over `values` f32 values per rank takes the ring.
    fn use_ring(&self, values: usize) -> bool {
        values.saturating_mul(4).saturating_mul(self.mesh.world - 1) > self.ring_threshold
    }

    /// Runs one operation, turning its failure into a failure of the whole group.
    fn guarded<T>(&mut self, op: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.failed {
            return Err(CollectiveError::PeerLost);
        }
        let result = op(self);
        if let Err(e) = &result {
            let rank = self.mesh.rank;
            tracing::warn!(rank, error = %e, "TCP collective failed; closing the group");
            self.failed = true;
            self.mesh.shutdown();
        }
        result
    }

    fn check_peer(&self, peer: usize, what: &str) -> Result<()> {
        if peer >= self.mesh.world || peer == self.mesh.rank {
            return Err(CollectiveError::InvalidArgument(format!(
                "{what} rank {peer} from rank {} in a group of {}",
                self.mesh.rank, self.mesh.world
            )));
        }
        Ok(())
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.mesh.rank
    }

    fn interrupt(&self) -> Option<crate::Interrupt> {
        let streams: std::io::Result<Vec<std::net::TcpStream>> = self.mesh.links.iter().flatten().map(Link::shutdown_handle).collect();
        let streams = streams.ok()?;
        Some(crate::Interrupt::new(move || {
            for stream in &streams {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }))
    }

    fn world_size(&self) -> usize {
        self.mesh.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        if self.mesh.world == 1 {
            return Ok(());
        }
        self.guarded(|s| {
            if s.use_ring(data.len()) {
                ring::all_reduce(&mut s.mesh, &mut s.recv_scratch, data)
            } else {
                direct::all_reduce(&mut s.mesh, &mut s.direct, data)
            }
        })
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        if self.mesh.world == 1 {
            direct::check_gather_len(local.len(), out.len(), 1)?;
            out.copy_from_slice(local);
            return Ok(());
        }
        self.guarded(|s| {
            // A bad length fails the group too: the peers are already waiting for this rank.
            direct::check_gather_len(local.len(), out.len(), s.mesh.world)?;
            if s.use_ring(local.len()) {
                ring::all_gather(&mut s.mesh, local, out)
            } else {
                direct::all_gather(&mut s.mesh, &mut s.direct, local, out)
            }
        })
    }

    fn send(&mut self, peer: usize, data: &[f32]) -> Result<()> {
        self.check_peer(peer, "send to")?;
        self.guarded(|s| p2p::send(&mut s.mesh, &mut s.send_scratch, peer, data))
    }

    fn recv(&mut self, peer: usize, out: &mut [f32]) -> Result<()> {
        self.check_peer(peer, "recv from")?;
        self.guarded(|s| p2p::recv(&mut s.mesh, peer, out))
    }

    fn as_send(&mut self) -> Option<&mut (dyn Collective + Send)> {
        Some(self)
    }
}

impl Drop for TcpCollective {
    fn drop(&mut self) {
        // Let queued sends reach the wire (a peer may still be receiving the last message), but
        // do not wait forever on a peer that stopped reading: shutting the sockets down makes
        // the sender thread's writes fail, so it exits and can be joined.
        if self.failed || !self.mesh.writer.drain_within(self.drain_timeout) {
            self.mesh.shutdown();
        }
    }
}

impl std::fmt::Debug for TcpCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpCollective")
            .field("rank", &self.mesh.rank)
            .field("world_size", &self.mesh.world)
            .field("ring_threshold", &self.ring_threshold)
            .field("failed", &self.failed)
            .finish()
    }
}
