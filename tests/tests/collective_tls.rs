//! The TCP collective with mutual TLS: ranks holding the cluster's certificates form a group and
//! compute exactly what plain TCP computes, in every operation; a connection without the
//! cluster's certificate (a foreign CA's, or plain TCP) is dropped before it can pose as a rank,
//! and the real rank still joins; on the wire between ranks no tensor byte appears in the clear,
//! and a byte altered on the way fails the group instead of changing a sum.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_collective::{Collective, CollectiveTls, TcpCollective, TcpConfig};
use tessera_tests::certs::{collective_tls, TestCa};
use tessera_tls::rustls::pki_types::ServerName;
use tessera_tls::rustls::{ClientConnection, StreamOwned};
use tessera_tls::{ClientTls, TlsFiles};

fn scratch(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("collective-tls-{}-{name}", std::process::id()))
}

/// Ranks on loopback, rank `r` with `tls[r]` (`None`: plain TCP).
fn configs(tls: Vec<Option<CollectiveTls>>, connect_timeout: Duration) -> Vec<(TcpConfig, TcpListener)> {
    let listeners: Vec<TcpListener> = tls.iter().map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind")).collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().expect("local_addr")).collect();
    listeners
        .into_iter()
        .zip(tls)
        .enumerate()
        .map(|(rank, (listener, tls))| (TcpConfig { connect_timeout, tls, ..TcpConfig::new(rank, peers.clone()) }, listener))
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
    let mut configs = configs(ranks.map(Some).into(), Duration::from_secs(60));
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
    let outcomes: Vec<bool> = configs(ranks.map(Some).into(), Duration::from_secs(3))
        .into_iter()
        .map(|(config, listener)| std::thread::spawn(move || TcpCollective::connect(config, listener).is_ok()))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().expect("rank thread"))
        .collect();
    assert_eq!(outcomes, [false, false], "neither rank may form a group with the impostor");
}

/// `world` ranks on loopback, each with its own certificate when `ca` is given.
fn group(world: usize, ca: Option<&TestCa>) -> Vec<(TcpConfig, TcpListener)> {
    let tls = (0..world).map(|rank| ca.map(|ca| collective_tls(&ca.leaf(&format!("rank{rank}")).expect("leaf")))).collect();
    configs(tls, TcpConfig::DEFAULT_CONNECT_TIMEOUT)
}

/// Every path of the TCP collective on one rank: direct and ring all-reduce and all-gather,
/// small point-to-point sends (written by the engine thread) and large ones (by the sender
/// thread), around the ring. Returns every result, in order.
fn every_operation(mut comm: TcpCollective) -> Vec<Vec<f32>> {
    let (rank, world) = (comm.rank(), comm.world_size());
    let values = |n: usize, salt: usize| -> Vec<f32> { (0..n).map(|i| ((i * 7 + salt * 13) % 1009) as f32 * 0.25 - 100.0).collect() };
    let mut results = Vec::new();
    for (n, ring) in [(1000, false), (300_000, true)] {
        comm.set_ring_threshold(if ring { 0 } else { TcpCollective::DEFAULT_RING_THRESHOLD });
        let mut data = values(n, rank);
        comm.all_reduce_sum(&mut data).expect("all-reduce");
        results.push(data);
        let mut out = vec![0.0; n * world];
        comm.all_gather(&values(n, rank + 10), &mut out).expect("all-gather");
        results.push(out);
    }
    for n in [100, 200_000] {
        comm.send((rank + 1) % world, &values(n, rank + 20)).expect("send");
        let mut got = vec![0.0; n];
        comm.recv((rank + world - 1) % world, &mut got).expect("recv");
        results.push(got);
    }
    results
}

fn run_group<T: Send + 'static>(configs: Vec<(TcpConfig, TcpListener)>, body: fn(TcpCollective) -> T) -> Vec<T> {
    let threads: Vec<_> = configs
        .into_iter()
        .map(|(config, listener)| std::thread::spawn(move || body(TcpCollective::connect(config, listener).expect("connect"))))
        .collect();
    threads.into_iter().map(|t| t.join().expect("rank thread")).collect()
}

#[test]
fn every_operation_over_tls_gives_the_bits_plain_tcp_gives() {
    let dir = scratch("every-op");
    let ca = TestCa::new(&dir, "cluster").expect("CA");
    let plain = run_group(group(3, None), every_operation);
    let sealed = run_group(group(3, Some(&ca)), every_operation);
    assert_eq!(sealed.len(), 3);
    for (rank, (sealed, plain)) in sealed.iter().zip(&plain).enumerate() {
        assert_eq!(sealed.len(), 6);
        for (op, (s, p)) in sealed.iter().zip(plain).enumerate() {
            assert!(!s.is_empty());
            assert!(s.iter().zip(p).all(|(a, b)| a.to_bits() == b.to_bits()), "rank {rank}, operation {op} differs from plain TCP");
        }
    }
    // And plain TCP is right: the small all-reduce is the sum over ranks.
    let expected: Vec<f32> = (0..1000).map(|i| (0..3).map(|r| ((i * 7 + r * 13) % 1009) as f32 * 0.25 - 100.0).sum()).collect();
    assert_eq!(plain[1][0], expected);
}

/// A relay between rank 1 and rank 0 that keeps a copy of every byte each way and, once
/// `tamper` is set, flips one bit of the next bytes it passes from rank 1 to rank 0.
struct Relay {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
    tamper: Arc<AtomicBool>,
}

impl Relay {
    fn start(to: SocketAddr) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let (seen, tamper) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (seen2, tamper2) = (seen.clone(), tamper.clone());
        std::thread::spawn(move || {
            let (from_rank1, _) = listener.accept().expect("relay accept");
            let to_rank0 = TcpStream::connect(to).expect("relay connect");
            let (r1, r0) = (from_rank1.try_clone().expect("clone"), to_rank0.try_clone().expect("clone"));
            let back = std::thread::spawn({
                let seen = seen2.clone();
                move || pump(r0, r1, &seen, &AtomicBool::new(false))
            });
            pump(from_rank1, to_rank0, &seen2, &tamper2);
            let _ = back.join();
        });
        Relay { addr, seen, tamper }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, seen: &Mutex<Vec<u8>>, tamper: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        seen.lock().expect("seen").extend_from_slice(&buf[..n]);
        // Past any header, inside the values (or a record) that follow it.
        if n > 64 && tamper.swap(false, Ordering::SeqCst) {
            buf[n - 1] ^= 0x10;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

/// Rank `r`'s values in the relay test: distinctive bit patterns.
fn marked(rank: usize) -> Vec<f32> {
    (0..4096).map(|i| 1.0e-3 * (i as f32) + 1234.5678 + rank as f32).collect()
}

fn as_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Two ranks, rank 1 reaching rank 0 through a relay. Each reduces its marked values, then
/// `tamper` is set and each reduces again. Returns the relay's copy of the traffic of the first
/// reduction and the outcomes of the second.
fn through_relay(ca: Option<&TestCa>) -> (Vec<u8>, Vec<Result<Vec<f32>, String>>) {
    let mut configs = group(2, ca);
    let relay = Relay::start(configs[0].0.peers[0]);
    configs[1].0.peers[0] = relay.addr;
    let (first_done, first) = std::sync::mpsc::channel();
    let barriers: Vec<_> = (0..2).map(|_| std::sync::mpsc::channel::<()>()).collect();
    let (starts, waits): (Vec<_>, Vec<_>) = barriers.into_iter().unzip();
    let threads: Vec<_> = configs
        .into_iter()
        .zip(waits)
        .map(|((config, listener), wait)| {
            let first_done = first_done.clone();
            std::thread::spawn(move || {
                let mut comm = TcpCollective::connect(config, listener).expect("connect");
                let mut data = marked(comm.rank());
                comm.all_reduce_sum(&mut data).expect("first all-reduce");
                first_done.send(data).expect("report");
                wait.recv().expect("second round");
                let mut again = marked(comm.rank());
                comm.all_reduce_sum(&mut again).map(|()| again).map_err(|e| e.to_string())
            })
        })
        .collect();
    let expected: Vec<f32> = marked(0).iter().zip(marked(1)).map(|(a, b)| a + b).collect();
    for _ in 0..2 {
        assert_eq!(first.recv().expect("first round"), expected);
    }
    let seen = relay.seen.lock().expect("seen").clone();
    relay.tamper.store(true, Ordering::SeqCst);
    starts.iter().for_each(|s| s.send(()).expect("start second round"));
    (seen, threads.into_iter().map(|t| t.join().expect("rank thread")).collect())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn the_wire_between_tls_ranks_carries_no_tensor_bytes_and_an_altered_byte_fails_the_group() {
    let dir = scratch("relay");
    let ca = TestCa::new(&dir, "cluster").expect("CA");
    // Plain TCP as the control: the relay does see each rank's values, and an altered byte
    // silently changes a sum.
    let (seen, outcomes) = through_relay(None);
    for rank in 0..2 {
        assert!(contains(&seen, &as_bytes(&marked(rank))[..64]), "plain TCP carries rank {rank}'s values in the clear");
    }
    let expected: Vec<f32> = marked(0).iter().zip(marked(1)).map(|(a, b)| a + b).collect();
    assert!(outcomes.iter().any(|o| o.as_ref().is_ok_and(|v| *v != expected)), "plain TCP: {outcomes:?}");

    let (seen, outcomes) = through_relay(Some(&ca));
    assert!(seen.len() > 2 * 4096 * 4, "the relay saw both ranks' traffic ({} bytes)", seen.len());
    for rank in 0..2 {
        let clear = as_bytes(&marked(rank));
        // No 16-byte run of either rank's values, anywhere in the traffic.
        assert!(clear.chunks(16).all(|run| !contains(&seen, run)), "rank {rank}'s values crossed the wire in the clear");
    }
    // Rank 0 read the altered record and refused it; no rank computed a wrong sum.
    let rank0 = outcomes[0].as_ref().expect_err("rank 0 must refuse the altered record");
    assert!(rank0.contains("failed authentication"), "{rank0}");
    assert!(outcomes.iter().all(|o| o.as_ref().map_or(true, |v| *v == expected)), "{outcomes:?}");
}
