//! Clusters on a real etcd: `tessera coordinator` plus `tessera worker` processes that register
//! themselves with leases.

use std::time::Instant;

use tessera_collective::SingleRank;
use tessera_etcd_harness::EtcdServer;
use tessera_model::fixture::{demo, prompt_ids, test_fixtures};
use tessera_model::{LoadConfig, Model};
use tessera_proto::v1 as pb;
use tessera_tests::greedy_trace;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::*;

/// Lease TTL of the workers in these tests; the coordinator must notice a dead worker within
/// this plus two seconds.
const TTL_SECS: u64 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_tp2_group_streams_the_tp1_greedy_tokens() {
    let etcd = EtcdServer::start().await;
    let spec = test_fixtures().into_iter().find(|s| s.name == "llama-gqa").expect("llama-gqa fixture");
    let dir = fixture(&spec, "parity");
    let prompt = prompt_ids(&spec);
    let steps = 16;
    let model = Model::load(&dir, &LoadConfig::default()).expect("load TP=1 reference");
    let reference = greedy_trace(&model, &mut SingleRank, &prompt, steps).expect("reference trace");

    let coordinator = coordinator(&dir, &etcd.url(), 2).expect("start coordinator");
    wait_health(&coordinator.url, ServingStatus::NotServing).await.expect("NOT_SERVING before any worker");
    let mut client = connect(&coordinator.url).await;
    // A lone coordinator leads as soon as its campaign reaches etcd; until then it is a standby.
    until_status(&client, "the coordinator elected", |s| s.leading).await;
    let early = generate(&mut client, greedy(tokens(prompt.clone()), 4)).await.expect_err("no group yet");
    assert_eq!(early.code(), Code::Unavailable, "{early:?}");
    assert!(early.message().contains("no serving group"), "{}", early.message());

    let _workers = [etcd_worker(&etcd.url(), "w-a", TTL_SECS).unwrap(), etcd_worker(&etcd.url(), "w-b", TTL_SECS).unwrap()];
    wait_health(&coordinator.url, ServingStatus::Serving).await.expect("SERVING once the group loaded");

    let out = generate(&mut client, greedy(tokens(prompt.clone()), steps as u32)).await.expect("generate");
    assert_eq!(out.tokens(), reference.greedy, "TP=2 over etcd-registered workers must stream the TP=1 greedy tokens");
    assert_eq!(out.reason(), Some(pb::FinishReason::Length));
    let started = out.started.as_ref().expect("Started first");
    assert_eq!(started.prompt_tokens as usize, prompt.len());
    let mut workers = out.workers();
    workers.sort();
    assert_eq!(workers, ["w-a", "w-b"]);
    assert_eq!(started.placement.as_ref().map(|p| p.tp), Some(2));
    let usage = out.finished.as_ref().and_then(|f| f.usage).expect("usage");
    assert_eq!((usage.prompt_tokens as usize, usage.completion_tokens as usize), (prompt.len(), steps));

    let models = client.list_models(pb::ListModelsRequest {}).await.expect("ListModels").into_inner().models;
    assert_eq!(models.len(), 1);
    assert_eq!((models[0].tp, models[0].serving_groups, models[0].max_context), (2, 1, 256));

    for listed in [reflection_v1(&coordinator.url).await, reflection_v1alpha(&coordinator.url).await] {
        assert!(listed.iter().any(|s| s == "tessera.v1.Inference"), "reflection lists {listed:?}");
        assert!(listed.iter().any(|s| s == "grpc.health.v1.Health"), "reflection lists {listed:?}");
    }
}

/// The name a worker's readiness is reported under.
const WORKER_SERVICE: &str = "tessera.worker.v1.Worker";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_is_ready_only_while_its_group_serves() {
    let etcd = EtcdServer::start().await;
    let dir = fixture(&demo(), "worker-health");
    let (_a, a_url) = etcd_worker_at(&etcd.url(), "w-a", TTL_SECS, 65536).expect("start w-a");
    // Registered, in no group: the process is alive, the worker not ready.
    assert_eq!(service_health(&a_url, "").await.expect("health of the process"), ServingStatus::Serving);
    assert_eq!(service_health(&a_url, WORKER_SERVICE).await.expect("health of w-a"), ServingStatus::NotServing);

    // A coordinator that sees it still has no group for it: TP=2 needs a second worker.
    let coordinator = coordinator(&dir, &etcd.url(), 2).expect("start coordinator");
    let mut client = connect(&coordinator.url).await;
    let seen = async {
        let mut tick = tokio::time::interval(POLL);
        loop {
            tick.tick().await;
            if client.cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner().workers.len() == 1 {
                return;
            }
        }
    };
    tokio::time::timeout(PATIENCE, seen).await.expect("the coordinator did not see w-a in time");
    assert_eq!(service_health(&a_url, WORKER_SERVICE).await.expect("health of w-a"), ServingStatus::NotServing);

    // With a second worker the group forms, and both report SERVING once their shards are loaded.
    let (mut b, b_url) = etcd_worker_at(&etcd.url(), "w-b", TTL_SECS, 65536).expect("start w-b");
    wait_health(&coordinator.url, ServingStatus::Serving).await.expect("the group loaded");
    for url in [&a_url, &b_url] {
        wait_service_health(url, WORKER_SERVICE, ServingStatus::Serving).await.expect("a grouped worker is ready");
    }

    // w-b dies: the coordinator tears the group down and resets w-a, which is not ready again.
    b.0.kill().expect("SIGKILL w-b");
    wait_health(&coordinator.url, ServingStatus::NotServing).await.expect("the group was torn down");
    wait_service_health(&a_url, WORKER_SERVICE, ServingStatus::NotServing).await.expect("a reset worker is not ready");
    assert_eq!(service_health(&a_url, "").await.expect("health of the process"), ServingStatus::Serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_fails_its_stream_fast_and_a_new_worker_restores_service() {
    let etcd = EtcdServer::start().await;
    let dir = fixture(&demo(), "kill");
    let coordinator = coordinator(&dir, &etcd.url(), 2).expect("start coordinator");
    // w-b's lease outlives the wait below, so the stream cannot learn of the loss from the
    // registry: only from the broken connection.
    let b_ttl = 2 * PATIENCE.as_secs();
    let mut workers = vec![etcd_worker(&etcd.url(), "w-a", TTL_SECS).unwrap(), etcd_worker(&etcd.url(), "w-b", b_ttl).unwrap()];
    wait_health(&coordinator.url, ServingStatus::Serving).await.expect("group loaded");
    let mut client = connect(&coordinator.url).await;

    // Long enough that it cannot finish before the kill lands.
    let mut stream = client.generate(greedy(prompt("Once upon a time"), 4000)).await.expect("generate").into_inner();
    read_chunks(&mut stream, 3).await;
    workers[1].0.kill().expect("SIGKILL w-b");
    let killed = Instant::now();
    let status = until_error(&mut stream).await;
    eprintln!("UNAVAILABLE {:?} after SIGKILL", killed.elapsed());
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("lost"), "the message should say the group was lost: {}", status.message());

    wait_health(&coordinator.url, ServingStatus::NotServing).await.expect("no group after the loss");
    let refused = generate(&mut client, greedy(prompt("Hello"), 4)).await.expect_err("no group to serve");
    assert_eq!(refused.code(), Code::Unavailable);

    workers.push(etcd_worker(&etcd.url(), "w-c", TTL_SECS).unwrap());
    wait_health(&coordinator.url, ServingStatus::Serving).await.expect("a new group forms with the newcomer");
    let out = generate(&mut client, greedy(prompt("Hello"), 8)).await.expect("served again without a restart");
    assert_eq!(out.tokens().len(), 8);
    let mut placed = out.workers();
    placed.sort();
    assert_eq!(placed, ["w-a", "w-c"], "the survivor and the newcomer form the new group");
}

async fn reflection_v1(url: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut client = ServerReflectionClient::new(channel(url).await);
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut responses = client.server_reflection_info(tokio_stream::iter([request])).await.expect("reflection v1 call").into_inner();
    match responses.message().await.expect("answer").and_then(|r| r.message_response) {
        Some(MessageResponse::ListServicesResponse(list)) => list.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

async fn reflection_v1alpha(url: &str) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    let mut client = ServerReflectionClient::new(channel(url).await);
    let request = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut responses = client.server_reflection_info(tokio_stream::iter([request])).await.expect("reflection v1alpha call").into_inner();
    match responses.message().await.expect("answer").and_then(|r| r.message_response) {
        Some(MessageResponse::ListServicesResponse(list)) => list.service.into_iter().map(|s| s.name).collect(),
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_started_later_join_a_ring_without_restarting_anything() {
    let etcd = EtcdServer::start().await;
    let dir = fixture(&demo(), "ring-scale");
    let coordinator = coordinator(&dir, &etcd.url(), 1).expect("start coordinator");
    let mut workers = vec![etcd_worker_with_kv(&etcd.url(), "w-a", TTL_SECS, 1024).unwrap()];
    wait_health(&coordinator.url, ServingStatus::Serving).await.expect("one group loaded");
    let mut client = connect(&coordinator.url).await;
    let long = || greedy(tokens((0..2000).map(|i| 3 + (i * 41 % 300) as u32).collect()), 8);

    let refused = generate(&mut client, long()).await.expect_err("one group of 1024 tokens");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("the most this cluster can hold for one request now is 1024"), "{}", refused.message());

    // Scale out: two more workers register; the same coordinator forms groups for them and
    // places the long request on a ring over all three.
    workers.push(etcd_worker_with_kv(&etcd.url(), "w-b", TTL_SECS, 1024).unwrap());
    workers.push(etcd_worker_with_kv(&etcd.url(), "w-c", TTL_SECS, 1024).unwrap());
    until_serving_groups(&mut client, 3).await;
    let served = generate(&mut client, long()).await.expect("served by a ring after scaling out");
    let placement = served.started.as_ref().and_then(|s| s.placement.clone()).expect("placement");
    assert_eq!(placement.sp, 2, "2008 tokens need two members of 1024: {placement:?}");
    assert_eq!(served.tokens().len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_worker_the_running_stream_finishes_and_new_requests_go_elsewhere() {
    use tessera_registry::{EtcdConfig, EtcdRegistry, MembershipEvent, Registry};

    let etcd = EtcdServer::start().await;
    let dir = fixture(&demo(), "drain");
    let coordinator = coordinator(&dir, &etcd.url(), 1).expect("start coordinator");
    let mut workers = vec![etcd_worker(&etcd.url(), "w-a", TTL_SECS).unwrap(), etcd_worker(&etcd.url(), "w-b", TTL_SECS).unwrap()];
    let mut client = connect(&coordinator.url).await;
    until_serving_groups(&mut client, 2).await;

    let long = 400u32;
    let mut stream = client.generate(greedy(prompt("Once upon a time"), long)).await.expect("generate").into_inner();
    let Some(pb::generate_response::Event::Started(started)) = stream.message().await.expect("started").and_then(|m| m.event) else {
        panic!("the stream did not start with Started");
    };
    let busy = started.placement.expect("placement").workers[0].clone();
    let (index, other) = if busy == "w-a" { (0, "w-b") } else { (1, "w-a") };
    read_chunks(&mut stream, 1).await;
    let pid = workers[index].0.id().to_string();
    let killed = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
    assert!(killed.success());

    // The coordinator learns of the drain from the registry (or sees the worker gone).
    let started_at = Instant::now();
    let seen = async {
        let mut tick = tokio::time::interval(POLL);
        loop {
            tick.tick().await;
            let status = client.cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
            let w = status.workers.iter().find(|w| w.id == busy);
            if w.is_none_or(|w| w.state.contains("draining")) {
                return;
            }
        }
    };
    tokio::time::timeout(PATIENCE, seen).await.expect("the drain was never seen");
    eprintln!("drain seen after {:?}", started_at.elapsed());
    let routed = generate(&mut client.clone(), greedy(prompt("Hello"), 4)).await.expect("a new request");
    assert_eq!(routed.workers(), vec![other.to_string()], "new work avoids the draining worker");

    // The running stream finishes in full.
    let mut tokens = 0usize;
    let mut finished = None;
    while let Some(message) = stream.message().await.expect("the draining worker's stream must not fail") {
        match message.event {
            Some(pb::generate_response::Event::Chunk(c)) => tokens += c.tokens.len(),
            Some(pb::generate_response::Event::Finished(f)) => finished = Some(f),
            _ => {}
        }
    }
    let finished = finished.expect("finished");
    assert_eq!(finished.reason, pb::FinishReason::Length as i32);
    assert_eq!(finished.usage.map(|u| u.completion_tokens), Some(long));
    assert!(tokens >= long as usize - 1, "{tokens} tokens streamed");

    eprintln!("stream done after {:?}", started_at.elapsed());
    // Then the worker exits cleanly and its key is gone from etcd.
    let mut drained = workers.remove(index);
    let exit = tokio::task::spawn_blocking(move || drained.0.wait());
    let exit = tokio::time::timeout(PATIENCE, exit).await.expect("the worker did not exit").expect("join").expect("wait");
    assert!(exit.success(), "{exit:?}");
    eprintln!("worker exited after {:?}", started_at.elapsed());
    let registry = EtcdRegistry::connect(EtcdConfig::new(vec![etcd.url()])).await.expect("etcd");
    let mut watch = registry.snapshot_and_watch().await.expect("watch");
    let Some(MembershipEvent::Snapshot(records)) = watch.next().await else { panic!("no snapshot") };
    let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, vec![other], "only the other worker is registered");
}
