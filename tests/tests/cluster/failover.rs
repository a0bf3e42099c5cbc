//! Several coordinators on one etcd: the elected one serves, the others stand by (alive, not
//! ready, refusing work with the leader's name); when the leader dies a standby takes over the
//! same workers within the lease TTL plus 2 s, and at once when the leader resigns on shutdown.

use std::time::{Duration, Instant};

use tessera_etcd_harness::EtcdServer;
use tessera_model::fixture::demo;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::*;

const INFERENCE: &str = "tessera.v1.Inference";

/// A coordinator named `id` with a leadership lease of `ttl` seconds.
fn candidate(dir: &std::path::Path, etcd: &EtcdServer, id: &str, ttl: u64) -> Served {
    let ttl = ttl.to_string();
    coordinator_with(dir, &etcd.url(), 1, &["--coordinator-id", id, "--lease-ttl-secs", &ttl]).expect("start a coordinator")
}

/// Starts `leader` and waits until it is elected, then starts the standby, so the order is
/// known; then two workers, and waits until the leader serves on both.
async fn leader_and_standby(dir: &std::path::Path, etcd: &EtcdServer, ttl: u64) -> (Served, Served, Vec<tessera_tests::ChildGuard>) {
    let leader = candidate(dir, etcd, "coord-a", ttl);
    until_status(&connect(&leader.url).await, "coord-a elected", |s| s.leading).await;
    let standby = candidate(dir, etcd, "coord-b", ttl);
    let workers = ["w-1", "w-2"].iter().map(|id| etcd_worker(&etcd.url(), id, 2 * PATIENCE.as_secs()).expect("start worker")).collect();
    until_serving_groups(&mut connect(&leader.url).await, 2).await;
    (leader, standby, workers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_serves_no_one_and_takes_over_within_the_lease_ttl_when_the_leader_dies() {
    const TTL: u64 = 2;
    let etcd = EtcdServer::start().await;
    let dir = fixture(&demo(), "failover-kill");
    let (mut leader, standby, _workers) = leader_and_standby(&dir, &etcd, TTL).await;
    let mut a = connect(&leader.url).await;
    let mut b = connect(&standby.url).await;

    // The standby is alive but not ready, holds no worker, and refuses work naming the leader.
    assert_eq!(service_health(&standby.url, "").await.expect("health"), ServingStatus::Serving);
    assert_eq!(service_health(&standby.url, INFERENCE).await.expect("health"), ServingStatus::NotServing);
    assert_eq!(service_health(&leader.url, INFERENCE).await.expect("health"), ServingStatus::Serving);
    let status = cluster_status(&b).await;
    assert!(!status.leading && status.leader == "coord-a" && status.workers.is_empty(), "{status:?}");
    let refused = generate(&mut b, greedy(prompt("Hello"), 4)).await.expect_err("a standby serves no request");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert!(refused.message().contains("standby") && refused.message().contains("coord-a"), "{refused:?}");

    let request = greedy(prompt("The failover story begins"), 48);
    let reference = generate(&mut a, request.clone()).await.expect("the leader serves").tokens();

    // A stream in flight when the leader dies breaks with its connection: tonic reports a
    // broken HTTP/2 body as UNKNOWN, grpc-go and grpcio as UNAVAILABLE; either way the client
    // retries against the new leader.
    let mut stream = a.generate(greedy(prompt("A long story"), 2000)).await.expect("accepted").into_inner();
    read_chunks(&mut stream, 2).await;
    leader._process.0.kill().expect("SIGKILL the leader");
    let killed = Instant::now();
    let ended = until_error(&mut stream).await;
    let transport = ended.code() == tonic::Code::Unavailable || (ended.code() == tonic::Code::Unknown && ended.message().contains("h2"));
    assert!(transport, "the stream must break with the connection: {ended:?}");

    wait_health(&standby.url, ServingStatus::Serving).await.expect("the standby becomes ready");
    let answer = generate(&mut b, request).await.expect("the new leader serves");
    let took = killed.elapsed();
    eprintln!("takeover: ready and served {took:?} after the leader died (lease TTL {TTL} s)");
    assert_eq!(answer.tokens(), reference, "the same workers give the same tokens under the new leader");
    assert!(took <= Duration::from_secs(TTL + 2), "took {took:?}, more than the lease TTL plus 2 s");
    // The new leader adopted both workers and nothing of the old leader's stream is left.
    let status = until_status(&b, "both workers adopted and empty", |s| {
        s.workers.len() == 2 && s.workers.iter().all(|w| w.state == "serving" && w.sequences == 0 && w.kv_blocks == 0)
    })
    .await;
    assert!(status.leading && status.leader == "coord-b", "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_shuts_down_resigns_and_the_standby_takes_over_at_once() {
    // A lease far longer than the test waits: only the resignation can hand over in time.
    const TTL: u64 = 60;
    let etcd = EtcdServer::start().await;
    let dir = fixture(&demo(), "failover-term");
    let (leader, standby, _workers) = leader_and_standby(&dir, &etcd, TTL).await;
    sigterm(&leader._process);
    let stopped = Instant::now();
    let exit = exit_of(leader._process).await;
    assert!(exit.success(), "a resigning leader exits cleanly: {exit:?}");
    wait_health(&standby.url, ServingStatus::Serving).await.expect("the standby becomes ready");
    let took = stopped.elapsed();
    assert!(took < Duration::from_secs(TTL / 2), "took {took:?}: the lease was waited out instead of resigned");
    let mut b = connect(&standby.url).await;
    let answer = generate(&mut b, greedy(prompt("After the handover"), 8)).await.expect("the new leader serves");
    assert_eq!(answer.tokens().len(), 8);
}
