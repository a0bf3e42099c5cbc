//! The TCP collective with mutual TLS at rendezvous: ranks holding the cluster's certificates
//! form a group and reduce exactly; a connection without the cluster's certificate (a foreign
//! CA's, or plain TCP) is dropped before it can pose as a rank, and the real rank still joins.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use tessera_collective::{Collective, CollectiveTls, TcpCollective, TcpConfig};
use tessera_tests::certs::TestCa;
use tessera_tls::rustls::pki_types::ServerName;
use tessera_tls::rustls::{ClientConnection, StreamOwned};
use tessera_tls::{ClientTls, ServerTls, TlsFiles};

fn scratch(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("collective-tls-{}-{name}", std::process::id()))
}

fn collective_tls(files: &TlsFiles) -> CollectiveTls {
    CollectiveTls {
        server: ServerTls::mutual(files, &[]).expect("server TLS").config(),
        client: ClientTls::mutual(files, &[]).expect("client TLS").config(),
    }
}

/// Two ranks on loopback; rank `r` uses `tls[r]`.
fn configs(tls: [CollectiveTls; 2], connect_timeout: Duration) -> Vec<(TcpConfig, TcpListener)> {
    let listeners: Vec<TcpListener> = (0..2).map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind")).collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().expect("local_addr")).collect();
    listeners
        .into_iter()
        .zip(tls)
        .enumerate()
        .map(|(rank, (listener, tls))| (TcpConfig { connect_timeout, tls: Some(tls), ..TcpConfig::new(rank, peers.clone()) }, listener))
        .collect()
}

fn reduce(mut comm: TcpCollective) -> Vec<f32> {
    let mut data: Vec<f32> = (0..1000).map(|i| (i + comm.rank() * 1000) as f32).collect();
    comm.all_reduce_sum(&mut data).expect("all-reduce");
    data
}

/// What an intruder that speaks TLS with `files` learns from rank 0: `Err` when it is refused.
fn intrude(addr: std::net::SocketAddr, files: &TlsFiles) -> std::io::Result<()> {
    let config = ClientTls::mutual(files, &[]).expect("intruder TLS").config();
    let conn = ClientConnection::new(config, ServerName::IpAddress(addr.ip().into())).map_err(std::io::Error::other)?;
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut tls = StreamOwned::new(conn, stream);
    // A rank hello's worth of bytes, then wait for rank 0's hello: a refused client gets an
    // alert or a closed connection instead.
    tls.write_all(&[0u8; 16])?;
    let mut reply = [0u8; 16];
    tls.read_exact(&mut reply)
}

#[test]
fn ranks_with_the_cluster_certificate_reduce_and_a_foreign_certificate_is_refused() {
    let dir = scratch("foreign");
    let (cluster, foreign) = (TestCa::new(&dir, "cluster").expect("CA"), TestCa::new(&dir, "foreign").expect("CA"));
    let ranks = [collective_tls(&cluster.leaf("rank0").expect("leaf")), collective_tls(&cluster.leaf("rank1").expect("leaf"))];
    let mut configs = configs(ranks, Duration::from_secs(60));
    let (config1, listener1) = configs.pop().expect("rank 1");
    let (config0, listener0) = configs.pop().expect("rank 0");
    let rank0_addr = config0.peers[0];
    let rank0 = std::thread::spawn(move || reduce(TcpCollective::connect(config0, listener0).expect("rank 0 connects")));

    // Trusts the cluster CA but holds a foreign CA's certificate.
    let mut stranger = foreign.leaf("stranger").expect("leaf");
    stranger.ca = Some(cluster.cert.clone());
    assert!(intrude(rank0_addr, &stranger).is_err(), "rank 0 must refuse a certificate from another CA");
    // Plain TCP bytes where a TLS handshake belongs.
    let mut plain = TcpStream::connect(rank0_addr).expect("connect");
    plain.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let _ = plain.write_all(&[1u8; 16]);
    let mut byte = [0u8; 1];
    assert!(!matches!(plain.read(&mut byte), Ok(1)), "a plaintext peer must get no hello");

    let rank1 = std::thread::spawn(move || reduce(TcpCollective::connect(config1, listener1).expect("rank 1 connects")));
    let expected: Vec<f32> = (0..1000).map(|i| (2 * i + 1000) as f32).collect();
    assert_eq!(rank0.join().expect("rank 0"), expected);
    assert_eq!(rank1.join().expect("rank 1"), expected);
}

#[test]
fn a_rank_with_a_foreign_certificate_cannot_join() {
    let dir = scratch("rank");
    let (cluster, foreign) = (TestCa::new(&dir, "cluster").expect("CA"), TestCa::new(&dir, "foreign").expect("CA"));
    let mut impostor = foreign.leaf("rank1").expect("leaf");
    impostor.ca = Some(cluster.cert.clone());
    let ranks = [collective_tls(&cluster.leaf("rank0").expect("leaf")), collective_tls(&impostor)];
    let outcomes: Vec<bool> = configs(ranks, Duration::from_secs(3))
        .into_iter()
        .map(|(config, listener)| std::thread::spawn(move || TcpCollective::connect(config, listener).is_ok()))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("rank thread"))
        .collect();
    assert_eq!(outcomes, [false, false], "neither rank may form a group with the impostor");
}
