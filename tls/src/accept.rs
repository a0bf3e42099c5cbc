//! Accepting TLS connections: a deadline on each handshake, a cap on handshakes in flight (in
//! all, and per source address), and a log line for every peer refused or cut off.
//!
//! A handshake runs in its own task, so a client that opens a connection and says nothing holds
//! up no one else, and is dropped when [`AcceptConfig::handshake_timeout`] passes. When every
//! slot is taken, a new connection is still admitted: the oldest handshake in flight is
//! cancelled to make room. A real handshake finishes in milliseconds and a stalled one is old,
//! so connections that open and say nothing, from however many addresses, cannot lock real
//! clients out until their timeouts run; to starve anyone they would have to come faster than
//! [`AcceptConfig::max_handshakes`] per real handshake's time. Once half the slots are taken,
//! one address holds at most [`AcceptConfig::max_handshakes_per_peer`] of them (its
//! connections past that are closed at once, and evict no one), so a single source cannot churn
//! every slot either, while a client or proxy that opens many connections at once on a quiet
//! server is not turned away.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
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
    /// Handshakes in flight at once; a connection past it cancels the oldest to make room.
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

/// The handshakes in flight, oldest first, and how many each source address holds. An entry
/// is a slot: it is removed exactly once, by the handshake's end or by an eviction, and the
/// count of its address goes down with it, so neither count can drift.
#[derive(Default)]
struct InFlight {
    /// By admission order: the first is the oldest.
    handshakes: BTreeMap<u64, Handshake>,
    /// Only addresses with a handshake in flight.
    per_peer: HashMap<IpAddr, usize>,
    /// The key of the next admission.
    next: u64,
}

/// One handshake in flight.
struct Handshake {
    peer: SocketAddr,
    /// Never sent: dropping it (with the entry) cancels the handshake.
    _cancel: oneshot::Sender<()>,
}

/// A handshake's slot in [`InFlight`]; given back when dropped, unless an eviction took it first.
struct Slot {
    in_flight: Arc<Mutex<InFlight>>,
    id: u64,
}

/// An admitted connection: its slot, what resolves when it is evicted, and whom it evicted.
struct Admitted {
    slot: Slot,
    cancelled: oneshot::Receiver<()>,
    evicted: Option<SocketAddr>,
}

/// Why a connection was not admitted.
enum Refused {
    /// Its address already holds its share of the slots.
    PeerFull,
    /// There are no slots at all (`max_handshakes` is 0).
    NoSlots,
}

/// The handshakes in flight, even after a panic elsewhere: no change to them is left half made.
fn lock(in_flight: &Mutex<InFlight>) -> MutexGuard<'_, InFlight> {
    in_flight.lock().unwrap_or_else(PoisonError::into_inner)
}

impl InFlight {
    /// Admits a handshake with `peer`, evicting the oldest in flight when every slot is taken.
    fn admit(this: &Arc<Mutex<Self>>, peer: SocketAddr, config: &AcceptConfig) -> Result<Admitted, Refused> {
        let mut state = lock(this);
        let held = state.per_peer.get(&peer.ip()).copied().unwrap_or(0);
        if state.handshakes.len() >= config.max_handshakes / 2 && held >= config.max_handshakes_per_peer {
            return Err(Refused::PeerFull);
        }
        let mut evicted = None;
        if state.handshakes.len() >= config.max_handshakes {
            let oldest = state.handshakes.first_key_value().map(|(&id, _)| id).ok_or(Refused::NoSlots)?;
            evicted = state.release(oldest);
        }
        let id = state.next;
        state.next += 1;
        let (cancel, cancelled) = oneshot::channel();
        state.handshakes.insert(id, Handshake { peer, _cancel: cancel });
        *state.per_peer.entry(peer.ip()).or_default() += 1;
        drop(state);
        // Dropped out of the lock: the evicted handshake's task wakes to its cancellation.
        let evicted = evicted.map(|handshake| handshake.peer);
        Ok(Admitted { slot: Slot { in_flight: this.clone(), id }, cancelled, evicted })
    }

    /// Removes handshake `id` and its address's count, unless it is already gone.
    fn release(&mut self, id: u64) -> Option<Handshake> {
        let handshake = self.handshakes.remove(&id)?;
        let ip = handshake.peer.ip();
        // Addresses with nothing in flight are forgotten: the map holds only live handshakes.
        match self.per_peer.get_mut(&ip) {
            Some(count) if *count > 1 => *count -= 1,
            _ => {
                self.per_peer.remove(&ip);
            }
        }
        Some(handshake)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Nothing to give back if an eviction already took the slot.
        let _ = lock(&self.in_flight).release(self.id);
    }
}

/// Admits the connection from `peer`, or logs why not.
fn admit(in_flight: &Arc<Mutex<InFlight>>, peer: SocketAddr, config: &AcceptConfig) -> Option<Admitted> {
    match InFlight::admit(in_flight, peer, config) {
        Ok(admitted) => Some(admitted),
        Err(Refused::PeerFull) => {
            tracing::warn!(plane = config.plane, %peer, "dropped a connection: too many TLS handshakes in flight from this address");
            None
        }
        Err(Refused::NoSlots) => {
            tracing::warn!(plane = config.plane, %peer, "dropped a connection: no TLS handshake slots (max_handshakes is 0)");
            None
        }
    }
}

/// TLS over an accepted connection; `None` (logged) when the handshake fails or times out.
async fn handshake(tls: &ServerTls, stream: TcpStream, peer: SocketAddr, config: &AcceptConfig) -> Option<TlsStream<TcpStream>> {
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
        let in_flight = Arc::new(Mutex::new(InFlight::default()));
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
            let Some(Admitted { slot, cancelled, evicted }) = admit(&in_flight, peer, &config) else {
                continue;
            };
            if let Some(evicted) = evicted {
                tracing::warn!(
                    plane = config.plane,
                    peer = %evicted,
                    "dropped a connection: its TLS handshake was the oldest in flight when every slot was taken"
                );
            }
            // A streamed token must not wait on Nagle's algorithm and a delayed ACK.
            let _ = stream.set_nodelay(true);
            let (tls, config, tx) = (tls.clone(), config.clone(), tx.clone());
            tokio::spawn(async move {
                let stream = tokio::select! {
                    stream = handshake(&tls, stream, peer, &config) => stream,
                    // Evicted (and logged as such): dropping the handshake closes the connection.
                    _ = cancelled => None,
                };
                // Given back before the connection is handed on: one waiting for the consumer
                // is no longer a handshake.
                drop(slot);
                if let Some(stream) = stream {
                    let _ = tx.send(Ok(stream)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
