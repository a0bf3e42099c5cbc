//! A thousand connections that go away badly, in two rounds, against `tessera up` serving TLS:
//! half stop mid-handshake (a partial ClientHello, then silence, held open past the server's
//! handshake timeout), half mid-stream (a `Generate` stream that has sent tokens, dropped
//! without a goodbye). The stalled handshakes all come from one address (127.0.0.2), which the
//! per-address cap holds to half of the 256 slots, so a client from another address
//! gets through at its first attempt (stalls from many addresses are `tls_accept.rs`'s case).
//! The coordinator keeps serving, frees every
//! abandoned sequence, and after the second thousand holds no more memory than after the
//! first: nothing is kept per abandoned connection.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use tessera_model::fixture::demo;
use tessera_proto::v1::inference_client::InferenceClient;
use tessera_tests::certs::TestCa;
use tessera_tests::{spawn_logged, tessera_bin};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::*;
use crate::tls_client::*;

const STALLED: usize = 500;
const DROPPED_STREAMS: usize = 500;
/// Streams started at once before they are dropped.
const WAVE: usize = 50;
/// Memory the coordinator may gain between rounds without counting as a leak (allocator
/// caches and the like): a leak of a few KiB per connection would exceed it.
const SLACK_BYTES: u64 = 8 << 20;

/// The first bytes of a TLS record carrying a ClientHello that claims 512 bytes, of which
/// only a few follow: the server waits for the rest.
const PARTIAL_HELLO: [u8; 9] = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];

fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc status");
    kib * 1024
}

/// Generates over a fresh TLS connection, which must be served at the first attempt.
async fn served(url: &str, ca: &Path) -> std::time::Duration {
    let started = Instant::now();
    let attempt = async {
        let mut client = InferenceClient::new(tls_channel(url, ca).await?);
        anyhow::Ok(generate(&mut client, greedy(prompt("Still serving"), 4)).await?)
    };
    let out = tokio::time::timeout(PATIENCE, attempt)
        .await
        .expect("served within PATIENCE")
        .unwrap_or_else(|e| panic!("a client from another address was turned away: {e:#}"));
    assert_eq!(out.tokens().len(), 4);
    started.elapsed()
}

/// A TCP connection to `addr` from 127.0.0.2, an address of its own on the loopback.
async fn connect_from_elsewhere(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.2:0".parse().expect("address")).expect("bind 127.0.0.2");
    socket.connect(addr).await.expect("connect")
}

/// One round: stalled handshakes held open while a real client gets through, then streams
/// dropped mid-generation; returns once the cluster holds no sequence.
async fn round(url: &str, addr: SocketAddr, ca: &Path, status: &Client) {
    let mut stalled = Vec::with_capacity(STALLED);
    for _ in 0..STALLED {
        let mut socket = connect_from_elsewhere(addr).await;
        // The server may already have turned this one away (its address's slots taken).
        let _ = socket.write_all(&PARTIAL_HELLO).await;
        stalled.push(socket);
    }
    let waited = served(url, ca).await;
    eprintln!("abandoned: a client got through {waited:?} after {STALLED} stalled handshakes");
    drop(stalled);

    for _ in 0..DROPPED_STREAMS / WAVE {
        let wave = (0..WAVE).map(|i| async move {
            let mut client = InferenceClient::new(tls_channel(url, ca).await.expect("TLS channel"));
            let request = greedy(prompt(&format!("Abandoned story {i}")), 400);
            let mut stream = client.generate(request).await.expect("accepted").into_inner();
            read_chunks(&mut stream, 1).await;
            // Dropping the stream and the client closes the connection mid-generation.
        });
        futures::future::join_all(wave).await;
    }
    until_status(status, "every abandoned sequence freed", |s| {
        s.running_requests == 0 && s.queued_requests == 0 && s.workers.iter().all(|w| w.sequences == 0 && w.kv_blocks == 0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_abandoned_connections_leave_the_server_serving_and_its_memory_flat() {
    let dir = scratch("abandoned");
    let ca = TestCa::new(&dir, "cluster").expect("CA");
    let leaf = ca.leaf("node").expect("leaf");
    let model = fixture(&demo(), "abandoned");
    let mut args: Vec<std::ffi::OsString> =
        ["up", "--threads", "1", "--port", "0", "--workers", "1", "--tp", "1", "--tls-cert"].map(Into::into).to_vec();
    args.extend([leaf.cert.clone().into_os_string(), "--tls-key".into(), leaf.key.clone().into_os_string()]);
    args.extend(["--model".into(), model.into_os_string()]);
    let (up, lines, _stdout) = spawn_logged(tessera_bin(), &args, &dir.join("up.log"), 1).expect("tessera up with TLS");
    let url = lines[0].rsplit(' ').next().expect("URL").to_string();
    let addr = socket_of(&url);
    let status = InferenceClient::new(tls_channel(&url, &ca.cert).await.expect("TLS channel"));

    round(&url, addr, &ca.cert, &status).await;
    let after_first = resident_bytes(up.0.id());
    round(&url, addr, &ca.cert, &status).await;
    let after_second = resident_bytes(up.0.id());
    eprintln!("abandoned: coordinator resident memory {after_first} bytes after the first thousand, {after_second} after the second");
    assert!(
        after_second <= after_first + SLACK_BYTES,
        "the coordinator grew by {} bytes over a thousand abandoned connections",
        after_second.saturating_sub(after_first)
    );
    let cancelled = finished_count(&cluster_status(&status).await, "CANCELLED");
    assert_eq!(cancelled, 2 * DROPPED_STREAMS as u64, "every dropped stream was cancelled, none finished or was lost");
}
