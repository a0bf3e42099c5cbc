//! `tessera-tls` on its own: a client that opens a connection and never completes a handshake
//! is dropped at the deadline, one address cannot take every handshake slot, stalled handshakes
//! from many addresses give way to a real client (the oldest is evicted), and a certificate
//! replaced on disk is served from the next connection on, without a restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_tests::certs::TestCa;
use tessera_tls::accept::{incoming, AcceptConfig};
use tessera_tls::rustls::pki_types::ServerName;
use tessera_tls::{ClientTls, ServerTls, TlsFiles, ALPN_H2};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;

const PATIENCE: Duration = Duration::from_secs(30);

fn scratch(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-accept-{}-{name}", std::process::id()))
}

/// Accepts on a fresh loopback port with `config`; completed connections are held open.
async fn serve(tls: Arc<ServerTls>, config: AcceptConfig) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut connections = incoming(listener, tls, config);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(Ok(connection)) = connections.next().await {
            held.push(connection);
        }
    });
    addr
}

#[tokio::test]
async fn a_handshake_that_never_completes_is_dropped_at_the_deadline() {
    let ca = TestCa::new(&scratch("timeout"), "cluster").expect("CA");
    let tls = Arc::new(ServerTls::new(&ca.leaf("server").expect("leaf"), &[ALPN_H2]).expect("server TLS"));
    let timeout = Duration::from_millis(300);
    let addr = serve(tls, AcceptConfig { handshake_timeout: timeout, ..AcceptConfig::new("test") }).await;
    let start = Instant::now();
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(PATIENCE, silent.read(&mut byte)).await.expect("the server must close the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(start.elapsed() >= timeout, "closed after {:?}, before the deadline", start.elapsed());
}

/// The leaf certificate the server at `addr` presents.
async fn served_certificate(addr: std::net::SocketAddr, ca: &TlsFiles) -> Vec<u8> {
    let config = ClientTls::trusting(ca.ca.as_ref().expect("CA"), &[ALPN_H2]).expect("client TLS").config();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.expect("handshake");
    stream.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
}

#[tokio::test]
async fn a_replaced_certificate_is_served_from_the_next_connection() {
    let ca = TestCa::new(&scratch("reload"), "cluster").expect("CA");
    let (first, second) = (ca.leaf("first").expect("leaf"), ca.leaf("second").expect("leaf"));
    let tls = Arc::new(ServerTls::new(&first, &[ALPN_H2]).expect("server TLS"));
    let addr = serve(tls, AcceptConfig::new("test")).await;
    let pem = |path: &PathBuf| std::fs::read_to_string(path).expect("read PEM");
    let der = |files: &TlsFiles| {
        use tessera_tls::rustls::pki_types::{pem::PemObject, CertificateDer};
        CertificateDer::from_pem_file(&files.cert).expect("certificate").to_vec()
    };
    let first_der = der(&first);
    assert_eq!(served_certificate(addr, &first).await, first_der);
    // Renewal: the files are rewritten in place, key first.
    std::fs::write(&first.key, pem(&second.key)).expect("write key");
    std::fs::write(&first.cert, pem(&second.cert)).expect("write certificate");
    assert_eq!(served_certificate(addr, &first).await, der(&second));
    assert_ne!(der(&second), first_der);
}

/// A TCP connection to `addr` from the loopback address `source`.
async fn connect_from(source: &str, addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(format!("{source}:0").parse().expect("source address")).expect("bind the source address");
    socket.connect(addr).await.expect("connect")
}

#[tokio::test]
async fn one_address_cannot_take_every_handshake_slot() {
    let ca = TestCa::new(&scratch("per-peer"), "cluster").expect("CA");
    let files = ca.leaf("server").expect("leaf");
    let tls = Arc::new(ServerTls::new(&files, &[ALPN_H2]).expect("server TLS"));
    // Eight slots in all; two per address once four are taken. Stalled handshakes would hold
    // theirs for a minute, so anything refused below is refused by the caps, not the deadline.
    let config = AcceptConfig {
        handshake_timeout: Duration::from_secs(60),
        max_handshakes: 8,
        max_handshakes_per_peer: 2,
        ..AcceptConfig::new("test")
    };
    let addr = serve(tls, config).await;
    // While fewer than half the slots are taken, one address may take more than its share.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(connect_from("127.0.0.2", addr).await);
    }
    // Half are taken now: the fifth from the same address is closed at once.
    let mut fifth = connect_from("127.0.0.2", addr).await;
    let start = Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(PATIENCE, fifth.read(&mut byte)).await.expect("the fifth connection from one address must be closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(start.elapsed() < Duration::from_secs(60), "closed by the deadline, not the per-address cap");
    // Connections are taken in order, so the first four were decided before the fifth was
    // closed: each is still open, waiting for its handshake.
    for (i, socket) in stalled.iter().enumerate() {
        let open = matches!(socket.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        assert!(open, "stalled connection {i} was closed, though fewer than half the slots were taken when it came");
    }
    // Another address still gets a slot.
    let served = tokio::time::timeout(PATIENCE, served_certificate(addr, &files))
        .await
        .expect("a client from another address completes its handshake");
    assert!(!served.is_empty());
    drop(stalled);
}

/// Whether the server has left `socket` open: nothing to read, not even the end of the stream.
fn is_open(socket: &TcpStream) -> bool {
    matches!(socket.try_read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Returns once the server has closed `socket`; fails after [`PATIENCE`].
async fn until_closed(socket: &mut TcpStream, what: &str) {
    let read = tokio::time::timeout(PATIENCE, socket.read(&mut [0u8; 1])).await.unwrap_or_else(|_| panic!("{what} must be closed"));
    assert!(matches!(read, Ok(0) | Err(_)), "{what}: {read:?}");
}

/// Handshake slots in the eviction test below (two per address once half are taken).
const SLOTS: usize = 8;

/// Fills every slot with stalled handshakes from `sources` (two from each, in turn), has a real
/// client served past them, and closes what is left, so that the server holds nothing after.
async fn stalls_give_way(
    sources: &[&str],
    addr: std::net::SocketAddr,
    files: &TlsFiles,
    connections: &mut (impl tokio_stream::Stream<Item = std::io::Result<impl Sized>> + Unpin),
) {
    let mut stalled = Vec::new();
    for source in sources {
        for _ in 0..2 {
            stalled.push(connect_from(source, addr).await);
        }
    }
    // Over its address's share: closed at once, and it evicts no one.
    let last = sources.last().expect("a source");
    until_closed(&mut connect_from(last, addr).await, "a connection over its address's share").await;
    // Every slot was taken at the eighth stall: each stall after it, and the real client, took
    // the slot of the oldest. The deadline is a minute away, so only an eviction lets it in.
    let start = Instant::now();
    let served = tokio::time::timeout(PATIENCE, served_certificate(addr, files))
        .await
        .expect("a real client completes its handshake while stalled ones hold every slot");
    assert!(!served.is_empty());
    // Handed on, so its slot was given back (a slot goes back before its connection is handed on).
    let delivered = tokio::time::timeout(PATIENCE, connections.next()).await.expect("the real client's connection is handed on");
    assert!(matches!(delivered, Some(Ok(_))), "the accept stream ended or failed");
    eprintln!("a real client was served {:?} after {} stalled handshakes", start.elapsed(), stalled.len());
    let evicted = stalled.len() + 1 - SLOTS;
    for (i, socket) in stalled.iter_mut().enumerate() {
        if i < evicted {
            until_closed(socket, &format!("stalled connection {i}, among the oldest")).await;
        } else {
            assert!(is_open(socket), "stalled connection {i} was closed, though {evicted} were older");
        }
    }
    // The rest give up: the server sees the end of the stream and drops each in one poll of its
    // task, which gives back the slot too. The test runs on one thread (`#[tokio::test]`'s
    // default), so once a close is seen here that poll is over.
    for (i, socket) in stalled.iter_mut().enumerate().skip(evicted) {
        socket.shutdown().await.expect("shut down");
        until_closed(socket, &format!("stalled connection {i}, given up")).await;
    }
}

#[tokio::test]
async fn stalled_handshakes_from_many_addresses_give_way_to_a_real_client() {
    let ca = TestCa::new(&scratch("evict"), "cluster").expect("CA");
    let files = ca.leaf("server").expect("leaf");
    let tls = Arc::new(ServerTls::new(&files, &[ALPN_H2]).expect("server TLS"));
    let config = AcceptConfig {
        handshake_timeout: Duration::from_secs(60),
        max_handshakes: SLOTS,
        max_handshakes_per_peer: 2,
        ..AcceptConfig::new("test")
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut connections = incoming(listener, tls, config);
    // Six addresses, each under its share, twelve stalls in all for eight slots.
    let sources = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.7"];
    stalls_give_way(&sources, addr, &files, &mut connections).await;
    // The same again, the addresses in reverse, so the first ones now come once the per-address
    // cap applies: a slot, or an address's count, not given back in the first round (evicted,
    // served, over its share or given up) would change what this one sees.
    let reversed: Vec<&str> = sources.iter().rev().copied().collect();
    stalls_give_way(&reversed, addr, &files, &mut connections).await;
}
