//! Accepting TLS connections: a deadline on each handshake, a cap on handshakes in flight, and
//! a log line for every peer refused.
//!
//! A handshake runs in its own task, so a client that opens a connection and says nothing holds
//! up no one else, and is dropped when [`AcceptConfig::handshake_timeout`] passes.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
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
}

impl AcceptConfig {
    /// The defaults for `plane`: 10 s per handshake, 256 at once.
    pub fn new(plane: &'static str) -> Self {
        Self { plane, handshake_timeout: Duration::from_secs(10), max_handshakes: 256 }
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
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(plane = config.plane, %peer, "dropped a connection: too many TLS handshakes in flight");
                continue;
            };
            // A streamed token must not wait on Nagle's algorithm and a delayed ACK.
            let _ = stream.set_nodelay(true);
            let (tls, config, tx) = (tls.clone(), config.clone(), tx.clone());
            tokio::spawn(async move {
                let stream = handshake(&tls, stream, peer, &config).await;
                drop(slot);
                if let Some(stream) = stream {
                    let _ = tx.send(Ok(stream)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
