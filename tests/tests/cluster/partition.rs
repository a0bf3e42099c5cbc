//! A network partition between the coordinator and a worker, made for real: the worker runs in
//! a network namespace of its own, joined to this one by a veth pair, and the test takes the
//! link down. Nothing is killed; the worker stays alive on the far side, cut off from the
//! coordinator and from etcd alike, as a machine whose switch port died.
//!
//! - A cut longer than the worker's lease: its streams stop arriving, the step timeout moves
//!   them to the other group and they finish exactly; its lease lapses, so the coordinator
//!   drops it. When the link comes back the worker registers again, drops what it held, and is
//!   admitted and serves.
//! - A cut shorter than the lease (a blip), but longer than the coordinator's reset RPC: the
//!   worker never learns of it, but the coordinator failed its group and, unanswered,
//!   quarantined the worker; it keeps asking, and once the link is back the worker answers and
//!   the group forms again.
//!
//! Needs root (or CAP_NET_ADMIN) and iproute2's `ip`; where `ip netns add` is refused, the test
//! says so on stderr and runs nothing else.

use crate::netns::Host;
use crate::support::*;
use tessera_etcd_harness::EtcdServer;
use tessera_model::fixture::demo;
use tessera_proto::v1 as pb;

/// Worker lease TTL: a blip (the step timeout, 2 s, then the reset RPC's, 3 s, and a
/// ClusterStatus that waits as long on the cut worker) stays well inside it.
const TTL: u64 = 12;
const STREAMS: u64 = 8;
const TOKENS: u32 = 400;

fn requests() -> Vec<pb::GenerateRequest> {
    greedy_and_seeded(STREAMS, "Partitioned story", TOKENS, 0.9, 70)
}

fn holds_sequences(status: &pb::ClusterStatusResponse, id: &str) -> bool {
    status.workers.iter().any(|w| w.id == id && w.sequences > 0)
}

fn both_back_and_empty(status: &pb::ClusterStatusResponse) -> bool {
    status.workers.len() == 2
        && status.workers.iter().all(|w| w.state == "serving" && w.sequences == 0 && w.kv_blocks == 0)
        && status.models.first().is_some_and(|m| m.serving_groups == 2)
}

/// Runs [`requests`] while `disturb` cuts the link, and checks every stream against
/// `reference`; returns how many moved.
async fn disturbed(client: &Client, reference: &[Vec<u32>], disturb: impl std::future::Future<Output = ()>) -> usize {
    let runs: Vec<_> = requests()
        .into_iter()
        .map(|r| {
            let mut client = client.clone();
            tokio::spawn(async move { generate(&mut client, r).await })
        })
        .collect();
    disturb.await;
    let runs = tokio::time::timeout(PATIENCE * 2, futures::future::join_all(runs)).await.expect("no stream may hang");
    let mut moved = 0;
    for (i, run) in runs.into_iter().enumerate() {
        let run = run.expect("join").unwrap_or_else(|status| panic!("stream {i} failed: {status:?}"));
        assert_eq!(run.tokens(), reference[i], "stream {i} differs from its undisturbed run");
        moved += usize::from(run.finished.as_ref().is_some_and(|f| f.migrations > 0));
    }
    moved
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_worker_loses_its_streams_to_another_group_and_is_admitted_again() {
    let host = match Host::create() {
        Ok(host) => host,
        Err(why) => {
            eprintln!("NOT RUN: this machine cannot make a network namespace ({why}), so the partition case is untested here");
            return;
        }
    };
    let etcd = EtcdServer::start_also_on(host.near.into()).await;
    let dir = fixture(&demo(), "partition");
    let args = ["--step-timeout-secs", "2", "--batch-invariant"];
    let coordinator = coordinator_with(&dir, &etcd.url(), 1, &args).expect("start coordinator");
    let mut client = connect(&coordinator.url).await;
    let _a = etcd_worker(&etcd.url(), "w-a", TTL).expect("start w-a");
    let _b = host.worker(&etcd.url_on(host.near.into()), "w-b", TTL, &[]);
    until_serving_groups(&mut client, 2).await;

    let calls = requests().into_iter().map(|r| {
        let mut client = client.clone();
        async move { generate(&mut client, r).await.expect("undisturbed run").tokens() }
    });
    let reference: Vec<Vec<u32>> = futures::future::join_all(calls).await;

    // A cut longer than the lease.
    let moved = disturbed(&client, &reference, async {
        until_status(&client, "w-b running streams", |s| holds_sequences(s, "w-b")).await;
        host.cut();
        until_status(&client, "w-b's lease lapsed and the coordinator dropped it", |s| !s.workers.iter().any(|w| w.id == "w-b")).await;
    })
    .await;
    assert!(moved > 0, "the cut struck streams running on w-b");
    host.mend();
    until_status(&client, "w-b registered again, admitted, serving and empty", both_back_and_empty).await;
    let calls = (0..4).map(|_| {
        let mut client = client.clone();
        async move { generate(&mut client, greedy(prompt("After the cut"), 8)).await.expect("after the cut") }
    });
    let placed: Vec<String> = futures::future::join_all(calls).await.iter().flat_map(|c| c.workers()).collect();
    assert!(placed.iter().any(|w| w == "w-b"), "w-b takes requests again: {placed:?}");

    // A blip: the link comes back before the lease could lapse. The worker never noticed (it
    // keeps its registration); the coordinator failed its group, quarantined the worker when
    // its reset went unanswered, and must take it back and form the group again.
    let lease = registration_lease(&etcd, "w-b").await;
    let moved = disturbed(&client, &reference, async {
        until_status(&client, "w-b running streams", |s| holds_sequences(s, "w-b")).await;
        host.cut();
        let missed_reset = |s: &pb::ClusterStatusResponse| s.workers.iter().any(|w| w.id == "w-b" && w.state.contains("quarantined"));
        until_status(&client, "w-b's group failed and w-b quarantined, having missed its reset", missed_reset).await;
        host.mend();
    })
    .await;
    assert!(moved > 0, "the blip struck streams running on w-b");
    until_status(&client, "w-b's group formed again, serving and empty", both_back_and_empty).await;
    assert_eq!(registration_lease(&etcd, "w-b").await, lease, "the blip did not cost w-b its registration");
}

/// The lease a worker's registration key is held under.
async fn registration_lease(etcd: &EtcdServer, id: &str) -> i64 {
    let mut client = etcd.client().await;
    let found = client.get(tessera_registry::keys::worker_key(id), None).await.expect("read the registration");
    found.kvs().first().map(|kv| kv.lease()).unwrap_or_else(|| panic!("{id} is not registered"))
}
