//! Restarts under a running cluster: a worker that comes back under its own id is admitted
//! again and serves; etcd restarting under running streams ends none of them.

use tessera_etcd_harness::EtcdServer;
use tessera_model::fixture::demo;
use tessera_proto::v1 as pb;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_restarted_under_its_own_id_is_admitted_again_and_serves() {
    const TTL: u64 = 2;
    let etcd = EtcdServer::start().await;
    let dir = fixture(&demo(), "restart-worker");
    let coordinator = coordinator(&dir, &etcd.url(), 1).expect("start coordinator");
    let mut client = connect(&coordinator.url).await;
    let _a = etcd_worker(&etcd.url(), "w-a", TTL).expect("start w-a");
    let (mut b, first_url) = etcd_worker_at(&etcd.url(), "w-b", TTL, 65536).expect("start w-b");
    until_serving_groups(&mut client, 2).await;
    let request = greedy(prompt("Once more"), 16);
    let reference = generate(&mut client, request.clone()).await.expect("before the restart").tokens();

    // Killed and started again at once: its old lease still holds the id, so the new process
    // waits out the lease (within its start-up patience of two TTLs), then registers afresh.
    b.0.kill().expect("SIGKILL w-b");
    let (_b, second_url) = etcd_worker_at(&etcd.url(), "w-b", TTL, 65536).expect("restart w-b under the same id");
    assert_ne!(first_url, second_url, "the new process serves on a new port");
    let second_address = second_url.trim_start_matches("http://").to_string();
    let status = until_status(&client, "w-b re-admitted at its new address, two groups serving", |s| {
        s.workers.iter().any(|w| w.id == "w-b" && w.address == second_address && w.state == "serving")
            && s.models.first().is_some_and(|m| m.serving_groups == 2)
    })
    .await;
    assert_eq!(status.workers.len(), 2, "the old w-b is gone, not listed beside the new one: {status:?}");
    // Both groups serve the same tokens, the restarted one included.
    for _ in 0..4 {
        assert_eq!(generate(&mut client, request.clone()).await.expect("after the restart").tokens(), reference);
    }
    // Four at once spread over both groups (least busy first): the restarted worker takes some.
    let calls = (0..4).map(|_| {
        let (mut client, request) = (client.clone(), request.clone());
        async move { generate(&mut client, request).await.expect("after the restart") }
    });
    let placed: Vec<String> = futures::future::join_all(calls).await.iter().flat_map(|c| c.workers()).collect();
    assert!(placed.iter().any(|w| w == "w-b"), "the restarted worker takes requests: {placed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_streams_outlive_an_etcd_restart() {
    // Leases far longer than etcd takes to restart, which is what "a short outage" means.
    const TTL: u64 = 10;
    let mut etcd = EtcdServer::start().await;
    let dir = fixture(&demo(), "restart-etcd");
    let ttl = TTL.to_string();
    let coordinator = coordinator_with(&dir, &etcd.url(), 1, &["--lease-ttl-secs", &ttl, "--batch-invariant"]).expect("start coordinator");
    let mut client = connect(&coordinator.url).await;
    let _workers = [etcd_worker(&etcd.url(), "w-a", TTL).expect("w-a"), etcd_worker(&etcd.url(), "w-b", TTL).expect("w-b")];
    until_serving_groups(&mut client, 2).await;
    let requests: Vec<pb::GenerateRequest> = (0..4).map(|i| greedy(prompt(&format!("Long story {i}")), 2000)).collect();
    let calls = requests.iter().map(|r| {
        let (mut client, r) = (client.clone(), r.clone());
        async move { generate(&mut client, r).await.expect("uninterrupted run").tokens() }
    });
    let reference: Vec<Vec<u32>> = futures::future::join_all(calls).await;

    let mut streams = Vec::new();
    for r in &requests {
        let stream = client.clone().generate(r.clone()).await.expect("accepted").into_inner();
        streams.push(stream);
    }
    let mut heads = Vec::new();
    for stream in &mut streams {
        heads.push(first_tokens(stream).await);
    }
    etcd.restart().await;
    for (i, ((stream, head), expected)) in streams.into_iter().zip(heads).zip(&reference).enumerate() {
        let (rest, finished) = rest_of(stream).await;
        let finished = finished.unwrap_or_else(|| panic!("stream {i} did not finish"));
        assert_eq!(finished.migrations, 0, "stream {i} never left its group");
        assert_eq!([head, rest].concat(), *expected, "stream {i} differs from its run before the restart");
        assert_eq!(finished.usage.map(|u| u.completion_tokens), Some(2000));
    }
    // The cluster goes on: both groups still serve, and membership changes are seen again.
    let status = cluster_status(&client).await;
    assert_eq!(status.models.first().map(|m| m.serving_groups), Some(2), "{status:?}");
    assert!(status.leading);
    let _c = etcd_worker(&etcd.url(), "w-c", TTL).expect("w-c");
    until_serving_groups(&mut client, 3).await;
}
