//! Accepting TLS connections: a deadline on each handshake, a cap on handshakes in flight (in
//! all, and per source address), and a log line for every peer refused.
//!
//! A handshake runs in its own task, so a client that opens a connection and says nothing holds
//! up no one else, and is dropped when [`AcceptConfig::handshake_timeout`] passes. Once half
//! the slots are taken, one address holds at most [`AcceptConfig::max_handshakes_per_peer`] of
//! them, so a single source that stalls handshakes cannot lock every other client out until its
//! timeouts run, while a client or proxy that opens many connections at once on a quiet server
//! is not turned away.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::ServerTls;

/// How connections are accepted.
#[derive(Debug, Clone)]
pub struct AcceptConfig {
    /// Which plane this listener serves, for the log (`client API`, `worker`, ...).
    pub plane: &'static str,
    /// Longest a TLS handshake may take before the connection is dropped.
    pub handshake_timeout: Duration,
    /// Handshakes in flight at once; connections past it are closed at once.
    pub max_handshakes: usize,
    /// Handshakes in flight at once from one IP address while at least half of
    /// `max_handshakes` are in flight; its connections past it are then closed at once.
    pub max_handshakes_per_peer: usize,
}

impl AcceptConfig {
    /// The defaults for `plane`: 10 s per handshake, 256 at once, 32 from one address.
    pub fn new(plane: &'static str) -> Self {
        Self { plane, handshake_timeout: Duration::from_secs(10), max_handshakes: 256, max_handshakes_per_peer: 32 }
    }
}

/// Handshakes in flight per source address.
#[derive(Default)]
struct PerPeer(Mutex<HashMap<IpAddr, usize>>);

/// One handshake's place in [`PerPeer`]; given back when dropped.
struct PeerSlot {
    peers: Arc<PerPeer>,
    ip: IpAddr,
}

impl PerPeer {
    /// A slot for `ip`, unless it already holds `max` (when there is a limit).
    fn try_take(self: &Arc<Self>, ip: IpAddr, max: Option<usize>) -> Option<PeerSlot> {
        let mut counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let held = counts.get(&ip).copied().unwrap_or(0);
        if max.is_some_and(|max| held >= max) {
            return None;
        }
        counts.insert(ip, held + 1);
        Some(PeerSlot { peers: self.clone(), ip })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = self.peers.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Addresses with nothing in flight are forgotten: the map holds only live handshakes.
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// TLS over an accepted connection; `None` (logged) when the handshake fails or times out.
pub async fn handshake(tls: &ServerTls, stream: TcpStream, peer: SocketAddr, config: &AcceptConfig) -> Option<TlsStream<TcpStream>> {
    let acceptor = TlsAcceptor::from(tls.config());
    match tokio::time::timeout(config.handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            tracing::warn!(plane = config.plane, %peer, error = %e, "refused a connection: TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::warn!(plane = config.plane, %peer, timeout = ?config.handshake_timeout, "dropped a connection: TLS handshake did not finish in time");
            None
        }
    }
}

/// Accepts on `listener` and yields every connection whose handshake completed, for
/// `tonic::transport::Server::serve_with_incoming`. Accepting stops when the stream is dropped.
pub fn incoming(listener: TcpListener, tls: Arc<ServerTls>, config: AcceptConfig) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(config.max_handshakes.max(1));
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(config.max_handshakes));
        let peers = Arc::new(PerPeer::default());
        let config = Arc::new(config);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(plane = config.plane, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let in_flight = config.max_handshakes - slots.available_permits();
            let per_peer = (in_flight >= config.max_handshakes / 2).then_some(config.max_handshakes_per_peer);
            let Some(peer_slot) = peers.try_take(peer.ip(), per_peer) else {
                tracing::warn!(plane = config.plane, %peer, "dropped a connection: too many TLS handshakes in flight from this address");
                continue;
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(plane = config.plane, %peer, "dropped a connection: too many TLS handshakes in flight");
                continue;
            };
            // A streamed token must not wait on Nagle's algorithm and a delayed ACK.
            let _ = stream.set_nodelay(true);
            let (tls, config, tx) = (tls.clone(), config.clone(), tx.clone());
            tokio::spawn(async move {
                let stream = handshake(&tls, stream, peer, &config).await;
                drop((slot, peer_slot));
                if let Some(stream) = stream {
                    let _ = tx.send(Ok(stream)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
