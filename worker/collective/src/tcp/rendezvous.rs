//! Forming the full mesh: rank `i` connects to every rank `j < i` and accepts from every
//! rank `j > i`, and a hello in each direction says who is on each end.
//!
//! This order cannot deadlock: rank 0 only accepts, and rank `j` starts accepting once its
//! own connections to lower ranks are up, which by induction they all eventually are. The
//! caller binds every listener before anyone connects, so a refused connection only means a
//! peer process or host has not started yet; it is retried until `connect_timeout`.
//!
//! With [`TcpConfig::tls`] every connection first completes mutual TLS and the hellos travel
//! inside it (see `tls`); a peer without the cluster's certificate is dropped there. The
//! connection then carries sealed records (`records`) with keys exported from that session.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::conn::Conn;
use super::mesh::io_error;
use super::tls::Secured;
use super::wire::{Hello, HELLO_LEN, WIRE_VERSION};
use super::TcpConfig;
use crate::{CollectiveError, Result};

/// Pause between polls of the listener and between connection attempts. Rendezvous happens
/// once per group, so a millisecond or so of extra start-up latency is irrelevant.
const ACCEPT_POLL: Duration = Duration::from_millis(1);
const CONNECT_RETRY: Duration = Duration::from_millis(20);
/// How long an accepted connection may take to introduce itself. Real ranks send their hello
/// right after connecting; this only bounds how long a silent stray client can hold up the
/// accept loop.
const HELLO_WAIT: Duration = Duration::from_secs(5);

/// Returns `conns[p]` connected to rank `p` (`None` at `config.rank`), in blocking mode with
/// `TCP_NODELAY` set and no timeouts.
pub(super) fn establish(config: &TcpConfig, listener: TcpListener) -> Result<Vec<Option<Conn>>> {
    let (rank, world) = (config.rank, config.peers.len());
    let deadline = Instant::now() + config.connect_timeout;
    let mut streams: Vec<Option<Conn>> = (0..world).map(|_| None).collect();

    for (peer, addr) in config.peers.iter().enumerate().take(rank) {
        let stream = connect_with_retry(peer, *addr, deadline)?;
        prepare(&stream, deadline).map_err(io_error(peer))?;
        let reply = match &config.tls {
            None => (&stream).write_all(&Hello::new(rank, world).encode()).and_then(|()| Ok((read_hello(&stream)?, None))),
            Some(tls) => Secured::connect(&stream, tls, addr.ip()).and_then(|mut secured| {
                secured.write_all(&Hello::new(rank, world).encode())?;
                Ok((read_secured_hello(&mut secured)?, Some(secured.session_keys()?)))
            }),
        };
        let (reply, keys) = reply.map_err(io_error(peer))?;
        let reply = reply.ok_or_else(|| {
            CollectiveError::Protocol(format!("{addr} (rank {peer} in the peer list) answered with something that is not a rank"))
        })?;
        check_hello(&reply, world, peer..peer + 1)?;
        finish(&stream).map_err(io_error(peer))?;
        streams[peer] = Some(conn(stream, keys).map_err(io_error(peer))?);
    }

    listener.set_nonblocking(true).map_err(io_error(rank))?;
    while let Some(missing) = (rank + 1..world).find(|&p| streams[p].is_none()) {
        let (stream, from) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {
                if Instant::now() >= deadline {
                    return Err(CollectiveError::Io {
                        peer: missing,
                        source: io::Error::new(io::ErrorKind::TimedOut, format!("rank {missing} did not connect to rank {rank} in time")),
                    });
                }
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
            // A client that gave up before being accepted is no reason to give up ourselves.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted || e.kind() == io::ErrorKind::ConnectionReset => continue,
            Err(e) => return Err(CollectiveError::Io { peer: missing, source: e }),
        };
        // Some platforms hand out accepted sockets with the listener's non-blocking flag.
        let hello_deadline = deadline.min(Instant::now() + HELLO_WAIT);
        let hello = stream.set_nonblocking(false).and_then(|()| prepare(&stream, hello_deadline)).and_then(|()| match &config.tls {
            None => Ok((read_hello(&stream)?, None)),
            Some(tls) => {
                let mut secured = Secured::accept(&stream, tls)?;
                Ok((read_secured_hello(&mut secured)?, Some(secured)))
            }
        });
        let (hello, mut secured) = match hello {
            Ok((Some(hello), secured)) => (hello, secured),
            // Not a rank (a port scanner, a health check) or a client that went away: keep
            // waiting for the real peers.
            Ok((None, _)) => {
                tracing::warn!(%from, rank, "ignoring a connection without a rank hello");
                continue;
            }
            // With TLS this is also a peer without the cluster's certificate: refused before
            // anything but handshake records was read from it.
            Err(e) => {
                tracing::warn!(%from, rank, error = %e, "ignoring a connection whose TLS handshake or hello failed");
                continue;
            }
        };
        check_hello(&hello, world, rank + 1..world)?;
        let peer = hello.rank as usize;
        if streams[peer].is_some() {
            return Err(CollectiveError::Protocol(format!("rank {peer} connected to rank {rank} twice")));
        }
        let reply = Hello::new(rank, world).encode();
        let keys = match secured.as_mut() {
            None => (&stream).write_all(&reply).map(|()| None),
            Some(secured) => secured.write_all(&reply).and_then(|()| secured.session_keys()).map(Some),
        }
        .map_err(io_error(peer))?;
        drop(secured);
        finish(&stream).map_err(io_error(peer))?;
        streams[peer] = Some(conn(stream, keys).map_err(io_error(peer))?);
    }
    tracing::debug!(rank, world, "TCP collective mesh established");
    Ok(streams)
}

/// The connection as the data path uses it: sealed when the rendezvous ran TLS.
fn conn(stream: TcpStream, keys: Option<super::records::SessionKeys>) -> io::Result<Conn> {
    match keys {
        Some(keys) => Conn::sealed(stream, keys),
        None => Ok(Conn::plain(stream)),
    }
}

fn connect_with_retry(peer: usize, addr: SocketAddr, deadline: Instant) -> Result<TcpStream> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = if left.is_zero() {
            Err(io::Error::new(io::ErrorKind::TimedOut, "connect timeout elapsed"))
        } else {
            TcpStream::connect_timeout(&addr, left)
        };
        match attempt {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() + CONNECT_RETRY < deadline => {
                tracing::debug!(peer, %addr, error = %e, "rank not reachable yet, retrying");
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(e) => {
                return Err(CollectiveError::Io {
                    peer,
                    source: io::Error::new(e.kind(), format!("connecting to rank {peer} at {addr}: {e}")),
                })
            }
        }
    }
}

/// Options for the handshake: no Nagle delay, and timeouts so a silent peer cannot stall the
/// rendezvous past its deadline.
fn prepare(stream: &TcpStream, deadline: Instant) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))
}

/// Clears the handshake timeouts: once the group is formed a rank may idle for minutes
/// between steps, and a dead peer is detected through EOF instead.
fn finish(stream: &TcpStream) -> io::Result<()> {
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)
}

/// `Ok(None)` when the bytes are not a hello at all.
fn read_hello(mut stream: &TcpStream) -> io::Result<Option<Hello>> {
    let mut bytes = [0u8; HELLO_LEN];
    stream.read_exact(&mut bytes)?;
    Ok(Hello::decode(&bytes))
}

/// [`read_hello`] inside TLS.
fn read_secured_hello(secured: &mut Secured<'_>) -> io::Result<Option<Hello>> {
    let mut bytes = [0u8; HELLO_LEN];
    secured.read_exact(&mut bytes)?;
    Ok(Hello::decode(&bytes))
}

/// A real rank that disagrees about the group is a configuration error, not a stray client.
fn check_hello(hello: &Hello, world: usize, expected_ranks: std::ops::Range<usize>) -> Result<()> {
    if hello.version != WIRE_VERSION {
        return Err(CollectiveError::Protocol(format!(
            "rank {} speaks wire version {}, this rank speaks {WIRE_VERSION}",
            hello.rank, hello.version
        )));
    }
    if hello.world as usize != world {
        return Err(CollectiveError::Protocol(format!(
            "rank {} believes the group has {} ranks, this rank believes {world}",
            hello.rank, hello.world
        )));
    }
    if !expected_ranks.contains(&(hello.rank as usize)) {
        return Err(CollectiveError::Protocol(format!(
            "a peer introduced itself as rank {}, expected a rank in {expected_ranks:?}",
            hello.rank
        )));
    }
    Ok(())
}
