//! `tessera-tls` on its own: a client that opens a connection and never completes a handshake
//! is dropped at the deadline, and a certificate replaced on disk is served from the next
//! connection on, without a restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_tests::certs::TestCa;
use tessera_tls::accept::{incoming, AcceptConfig};
use tessera_tls::rustls::pki_types::ServerName;
use tessera_tls::{ClientTls, ServerTls, TlsFiles, ALPN_H2};
use tokio::io::AsyncReadExt;
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
