//! Failures that land while work is running: a live worker's lease lost mid-stream, a deadline
//! or a cancel reaching a preempted sequence, a drain whose limit passes with a stream still
//! running (the stream moves to another worker), and a drain of a worker that serves a
//! sequence-parallel ring.

use std::time::{Duration, Instant};

use tessera_etcd_harness::EtcdServer;
use tessera_model::fixture::demo;
use tessera_proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::*;

/// Lease TTL of the etcd workers in these tests.
const TTL_SECS: u64 = 2;

/// The name a worker's readiness is reported under.
const WORKER_SERVICE: &str = "tessera.worker.v1.Worker";

/// The lease that holds worker `id`'s key in etcd now, if it is registered.
async fn lease_of(etcd: &EtcdServer, id: &str) -> Option<i64> {
    let key = tessera_registry::keys::worker_key(id);
    let answer = etcd.client().await.get(key, None).await.expect("read the worker's key");
    answer.kvs().first().map(|kv| kv.lease())
}

/// The coordinator's group of worker `id` (0: in none, or not known).
fn group_of(status: &pb::ClusterStatusResponse, id: &str) -> u32 {
    status.workers.iter().find(|w| w.id == id).map_or(0, |w| w.group)
}

/// Asserts that `status` is how a group loop ends its streams when the group is torn down for
/// worker `id`: `UNAVAILABLE`, naming the group and the worker. The reason is the worker's key
/// leaving etcd or, should the coordinator see it first, the worker failing a step.
fn assert_lost(status: &tonic::Status, group: u32, id: &str) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let message = status.message();
    assert!(message.starts_with(&format!("worker group g{group} was lost mid-request: ")), "{message}");
    assert!(message.ends_with("; retry") && message.contains(&format!("worker {id}")), "{message}");
}

/// The first message of a `Generate` stream, which must be `Started`.
async fn started(stream: &mut tonic::Streaming<pb::GenerateResponse>) -> pb::Started {
    match stream.message().await.expect("stream healthy").and_then(|m| m.event) {
        Some(pb::generate_response::Event::Started(started)) => started,
        other => panic!("expected Started first, got {other:?}"),
    }
}

/// Reads `stream` until at least `n` tokens have arrived and returns them; the stream must stay
/// healthy meanwhile.
async fn next_tokens(stream: &mut tonic::Streaming<pb::GenerateResponse>, n: usize) -> Vec<u32> {
    let mut tokens = Vec::new();
    while tokens.len() < n {
        let message = stream.message().await.expect("stream healthy").expect("stream open");
        if let Some(pb::generate_response::Event::Chunk(c)) = message.event {
            tokens.extend(c.tokens.iter().map(|t| t.id));
        }
    }
    tokens
}

/// Reads a stream to its clean end: every token, and the `Finished` message.
async fn rest_of(stream: &mut tonic::Streaming<pb::GenerateResponse>) -> Collected {
    let run = async {
        let mut out = Collected::default();
        while let Some(message) = stream.message().await.expect("the stream must end cleanly") {
            match message.event {
                Some(pb::generate_response::Event::Started(s)) => out.started = Some(s),
                Some(pb::generate_response::Event::Chunk(c)) => out.chunks.push(c),
                Some(pb::generate_response::Event::Finished(f)) => out.finished = Some(f),
                Some(pb::generate_response::Event::Progress(_)) | None => {}
            }
        }
        out
    };
    tokio::time::timeout(PATIENCE, run).await.expect("the stream must not hang")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_worker_whose_lease_is_revoked_mid_stream_registers_again_and_its_group_serves_again() {
    let etcd = EtcdServer::start().await;
    let dir = fixture(&demo(), "lease-revoked");
    let coordinator = coordinator(&dir, &etcd.url(), 2).expect("start coordinator");
    let (_a, _) = etcd_worker_at(&etcd.url(), "w-a", TTL_SECS, 65536).expect("start w-a");
    let (mut b, b_url) = etcd_worker_at(&etcd.url(), "w-b", TTL_SECS, 65536).expect("start w-b");
    wait_health(&coordinator.url, ServingStatus::Serving).await.expect("the TP=2 group loaded");
    let client = connect(&coordinator.url).await;
    let request = || greedy(prompt("Once upon a time"), 24);
    let reference = generate(&mut client.clone(), request()).await.expect("reference run");
    assert_eq!(reference.tokens().len(), 24);
    let old_group = group_of(&cluster_status(&client).await, "w-b");
    assert_ne!(old_group, 0, "w-b serves in a group");
    let old_lease = lease_of(&etcd, "w-b").await.expect("w-b is registered");

    // Long enough that it cannot finish before the lease is gone.
    let mut stream = client.clone().generate(greedy(prompt("Once upon a time"), 4000)).await.expect("generate").into_inner();
    read_chunks(&mut stream, 3).await;
    // Behind the worker's back: the process lives on, only its registration is gone.
    etcd.client().await.lease_revoke(old_lease).await.expect("revoke w-b's lease");

    // The coordinator writes the group off: the stream ends UNAVAILABLE. No migration.
    assert_lost(&until_error(&mut stream).await, old_group, "w-b");

    // The worker registers again under a fresh lease, and the coordinator forms a new group of
    // the same two workers.
    let regrouped = until_status(&client, "a new group of w-a and w-b serving", |s| {
        let grouped = ["w-a", "w-b"].iter().all(|id| s.workers.iter().any(|w| w.id == *id && w.group > old_group && w.state == "serving"));
        let serving = s.models.first().is_some_and(|m| m.state == "serving" && m.serving_groups == 1);
        grouped && serving
    })
    .await;
    assert_eq!(group_of(&regrouped, "w-a"), group_of(&regrouped, "w-b"), "{:?}", regrouped.workers);
    assert_eq!(finished_count(&regrouped, "LOST"), 1, "the cut stream is counted as lost");
    let new_lease = lease_of(&etcd, "w-b").await.expect("w-b is registered again");
    assert_ne!(new_lease, old_lease, "registered again under a new lease");
    wait_service_health(&b_url, WORKER_SERVICE, ServingStatus::Serving).await.expect("w-b ready again");

    let again = generate(&mut client.clone(), request()).await.expect("served by the re-formed group");
    assert_eq!(again.tokens(), reference.tokens(), "the re-formed group streams the reference tokens");
    let mut placed = again.workers();
    placed.sort();
    assert_eq!(placed, ["w-a", "w-b"]);
    assert!(b.0.try_wait().expect("w-b's state").is_none(), "w-b lived through it all");
}

/// A free loopback port, for a listener whose address the process does not print.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// The value of an unlabelled sample in the Prometheus text served on `port`.
fn metric(port: u16, name: &str) -> u64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the response");
    let line = response.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')));
    line.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no {name} in\n{response}"))
}

/// The long request of the preemption test: 10 prompt tokens and 1,000 generated, so it grows
/// to 64 blocks, the whole group; it is the oldest, so it is never the one preempted.
fn long_request() -> pb::GenerateRequest {
    greedy(tokens((0..10).map(|i| 5 + i * 7).collect()), 1000)
}

/// The request that gets preempted: its 940-token prompt (59 blocks) fits beside the long
/// request while that holds at most 5 blocks (80 tokens), and stops fitting some 35 tokens
/// later, well before its 80; from then on it cannot fit again until the long request ends.
fn late_request() -> pb::GenerateRequest {
    greedy(tokens((0..940).map(|i| 3 + (i * 13 % 290) as u32).collect()), 80)
}

/// Counts the tokens of `stream` until it ends, cleanly or with an error.
async fn tokens_until_end(stream: &mut tonic::Streaming<pb::GenerateResponse>) -> (usize, Result<(), tonic::Status>) {
    let run = async {
        let mut n = 0;
        loop {
            match stream.message().await {
                Ok(Some(pb::GenerateResponse { event: Some(pb::generate_response::Event::Chunk(c)) })) => n += c.tokens.len(),
                Ok(Some(_)) => {}
                Ok(None) => return (n, Ok(())),
                Err(status) => return (n, Err(status)),
            }
        }
    };
    tokio::time::timeout(PATIENCE, run).await.expect("the stream must not hang")
}

/// `tessera_output_tokens_total`: every token any group sampled so far.
async fn sampled_tokens(port: u16) -> u64 {
    tokio::task::spawn_blocking(move || metric(port, "tessera_output_tokens_total")).await.expect("scrape")
}

/// Asserts that no rank holds a sequence or a KV block.
fn assert_freed(status: &pb::ClusterStatusResponse) {
    assert!(status.workers.iter().all(|w| w.sequences == 0 && w.kv_blocks == 0), "every rank freed every block: {:?}", status.workers);
}

/// Tries of the deadline case before the test gives up finding the window (see below).
const DEADLINE_TRIES: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_sequence_whose_client_leaves_or_whose_deadline_passes_is_dropped_and_never_recomputed() {
    let dir = fixture(&demo(), "preempted-dropped");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // 1,024 KV tokens are 64 blocks on each of the two ranks.
    let cluster =
        up(&dir, &["--workers", "2", "--tp", "2", "--kv-capacity-tokens", "1024", "--metrics-listen", &listen]).expect("tessera up");
    let client = connect(&cluster.url).await;
    let reference = generate(&mut client.clone(), long_request()).await.expect("the long request alone");
    assert_eq!(reference.tokens().len(), 1000);
    let status = cluster_status(&client).await;
    assert_eq!(status.counters.as_ref().map(|c| c.preemptions), Some(0), "the long request alone fits its group");

    // 1. A cancel. The long request is in the group's queue (its `Started` is sent once it is)
    // before the late one arrives; the late one's client leaves once the group has preempted it.
    let mut long = client.clone().generate(long_request()).await.expect("long").into_inner();
    started(&mut long).await;
    let sent = Instant::now();
    let mut late = client.clone().generate(late_request()).await.expect("late").into_inner();
    started(&mut late).await;
    read_chunks(&mut late, 1).await;
    until_status(&client, "the late request preempted", |s| s.counters.as_ref().is_some_and(|c| c.preemptions == 1)).await;
    let to_preemption = sent.elapsed();
    drop(late);
    // Counted while the long request still runs (each rank holds only it), so the late one was
    // still waiting for recompute: it cannot fit again before the long request ends.
    let cancelled = until_status(&client, "the cancel counted", |s| finished_count(s, "CANCELLED") == 1).await;
    assert!(cancelled.workers.iter().all(|w| w.sequences == 1), "only the long request is held: {:?}", cancelled.workers);
    let long = rest_of(&mut long).await;
    let to_end = sent.elapsed();
    assert_eq!(long.tokens(), reference.tokens(), "the long request is unaffected");
    let done = cluster_status(&client).await;
    assert_freed(&done);
    assert_eq!(done.counters.map(|c| c.preemptions), Some(1), "never admitted again, so never preempted again");
    let late_tokens = sampled_tokens(port).await - 2 * 1000;
    assert!((1..80).contains(&late_tokens), "the late request sampled {late_tokens} tokens: some, and never all 80");

    // 2. A deadline that passes while the late request waits for recompute. Where that window
    // lies depends on the machine's speed: after the few dozen steps before the preemption,
    // before the long request's remaining steps. It starts between what the cancel case took to
    // reach the preemption and to end, and each try checks where its deadline fell: before
    // the preemption (the late request ends while running, never preempted) or after the long
    // request ended (the late one was admitted again). Every try must end correctly either way;
    // the window is narrowed after a miss.
    let (mut early, mut late_bound) = (to_preemption, to_end);
    let mut sampled = sampled_tokens(port).await;
    let mut hit = false;
    for _ in 0..DEADLINE_TRIES {
        let deadline = Duration::from_secs_f64((early.as_secs_f64() * late_bound.as_secs_f64()).sqrt());
        let before = cluster_status(&client).await.counters.unwrap_or_default();
        let mut long = client.clone().generate(long_request()).await.expect("long").into_inner();
        started(&mut long).await;
        let mut late = tonic::Request::new(late_request());
        late.set_timeout(deadline);
        let mut late = client.clone().generate(late).await.expect("late").into_inner();
        let (generated, end) = tokens_until_end(&mut late).await;
        let now = cluster_status(&client).await;
        let counters = now.counters.clone().unwrap_or_default();
        let preempted = counters.preemptions - before.preemptions;
        let long_held = now.workers.iter().all(|w| w.sequences == 1);
        let long = rest_of(&mut long).await;
        assert_eq!(long.tokens(), reference.tokens(), "the long request is unaffected");
        assert_freed(&cluster_status(&client).await);
        // Every token sampled is one streamed: the late request was never recomputed after it
        // ended (a recompute samples a token).
        sampled += 1000 + generated as u64;
        assert_eq!(sampled_tokens(port).await, sampled, "tokens sampled beyond those streamed");
        match end {
            Err(status) if status.code() == Code::DeadlineExceeded => {
                assert!(status.message().contains(&format!("after {generated} generated tokens")), "{}", status.message());
                assert_eq!(counters.deadlines_exceeded - before.deadlines_exceeded, 1);
                if preempted == 1 && long_held {
                    // Preempted (only the late request can be, and only while it runs) before
                    // its deadline, and ended while the long request still ran, so while it
                    // waited to be recomputed.
                    assert!(generated > 0, "the late request was generating before its preemption");
                    hit = true;
                    break;
                }
                eprintln!("deadline {deadline:?}: missed the window (preempted: {preempted}, long request running: {long_held})");
                if preempted == 0 {
                    early = deadline;
                } else {
                    late_bound = deadline;
                }
            }
            Ok(()) => {
                eprintln!("deadline {deadline:?}: the late request finished after the long one");
                late_bound = deadline;
            }
            Err(status) => panic!("the late request failed: {status:?}"),
        }
    }
    assert!(hit, "no deadline in {DEADLINE_TRIES} tries passed while the late request waited ({early:?} .. {late_bound:?})");
    let status = cluster_status(&client).await;
    assert_freed(&status);
    assert_eq!(finished_count(&status, "CANCELLED"), 1);
    let after = generate(&mut client.clone(), greedy(prompt("Hello"), 4)).await.expect("the group serves on");
    assert_eq!(after.tokens().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_whose_limit_passes_moves_the_running_stream_to_the_other_worker() {
    let etcd = EtcdServer::start().await;
    // The demo model with room for a stream far longer than the drain limit.
    let mut spec = demo();
    spec.config["max_position_embeddings"] = serde_json::json!(8192);
    let dir = fixture(&spec, "drain-limit");
    let coordinator = coordinator(&dir, &etcd.url(), 1).expect("start coordinator");
    let drain = ["--drain-timeout-secs", "3"];
    let mut workers = vec![
        etcd_worker_with(&etcd.url(), "w-a", TTL_SECS, 65536, &drain).expect("start w-a").0,
        etcd_worker_with(&etcd.url(), "w-b", TTL_SECS, 65536, &drain).expect("start w-b").0,
    ];
    let client = connect(&coordinator.url).await;
    until_serving_groups(&mut client.clone(), 2).await;

    // Far longer than the drain limit.
    let mut stream = client.clone().generate(greedy(prompt("Once upon a time"), 8000)).await.expect("generate").into_inner();
    let busy = started(&mut stream).await.placement.expect("placement").workers[0].clone();
    let (index, other) = if busy == "w-a" { (0, "w-b") } else { (1, "w-a") };
    read_chunks(&mut stream, 3).await;
    sigterm(&workers[index]);

    // The worker announces its drain; the stream goes on meanwhile.
    until_status(&client, "the busy worker draining", |s| s.workers.iter().any(|w| w.id == busy && w.state.ends_with("(draining)"))).await;
    // When the limit passes the worker leaves with the sequence still running: its group is
    // torn down and the request moves to the other worker, which holds it from then on.
    let moved = until_status(&client, "the stream moved to the other worker", |s| {
        s.counters.as_ref().is_some_and(|c| c.migrations == 1) && s.workers.iter().any(|w| w.id == other && w.sequences == 1)
    })
    .await;
    assert_eq!(finished_count(&moved, "LOST"), 0, "no request was lost");
    read_chunks(&mut stream, 3).await;
    let exit = exit_of(workers.remove(index)).await;
    assert!(exit.success(), "a worker whose drain limit passed still exits cleanly: {exit:?}");
    assert_eq!(lease_of(&etcd, &busy).await, None, "the drained worker left etcd");

    // The moved request is an ordinary one on its new group: cancelling it frees it there.
    drop(stream);
    until_status(&client, "the moved request freed", |s| s.workers.iter().all(|w| w.id != busy && w.sequences == 0)).await;
    let routed = generate(&mut client.clone(), greedy(prompt("Hello"), 8)).await.expect("a new request");
    assert_eq!(routed.workers(), vec![other.to_string()], "served by the remaining worker");
    assert_eq!(routed.tokens().len(), 8);
}

/// A request that needs a ring of two of the ring test's groups of 1,024 KV tokens: a
/// 1,500-token prompt and `max_new_tokens` of at most 500 are at most 2,000 tokens, 1,002 per
/// member.
fn ring_request(max_new_tokens: u32) -> pb::GenerateRequest {
    greedy(tokens((0..1500).map(|i| 5 + (i * 53 % 290) as u32).collect()), max_new_tokens)
}

/// Tokens of the ring request that is running when its member drains: a few seconds of ring
/// steps, so the drain and a second request both land while it runs.
const RING_TOKENS: u32 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_ring_member_lets_the_ring_request_finish_and_the_next_ring_forms_without_it() {
    let etcd = EtcdServer::start().await;
    let dir = fixture(&demo(), "ring-drain");
    let coordinator = coordinator(&dir, &etcd.url(), 1).expect("start coordinator");
    let drain = ["--drain-timeout-secs", "120"];
    let mut workers: Vec<(String, tessera_tests::ChildGuard)> = ["w-a", "w-b", "w-c"]
        .into_iter()
        .map(|id| (id.to_string(), etcd_worker_with(&etcd.url(), id, TTL_SECS, 1024, &drain).expect("start a worker").0))
        .collect();
    let client = connect(&coordinator.url).await;
    until_serving_groups(&mut client.clone(), 3).await;
    let reference = generate(&mut client.clone(), ring_request(RING_TOKENS)).await.expect("a ring request");
    let placement = reference.started.as_ref().and_then(|s| s.placement.clone()).expect("placement");
    assert_eq!((placement.sp, placement.tp), (2, 1), "{placement:?}");

    let mut stream = client.clone().generate(ring_request(RING_TOKENS)).await.expect("generate").into_inner();
    let ring = started(&mut stream).await.placement.expect("placement");
    assert_eq!(ring.sp, 2, "{ring:?}");
    let first = next_tokens(&mut stream, 2).await;
    let victim = ring.workers[0].clone();
    let index = workers.iter().position(|(id, _)| *id == victim).expect("a ring member");
    sigterm(&workers[index].1);
    until_status(&client, "the ring member draining", |s| s.workers.iter().any(|w| w.id == victim && w.state.ends_with("(draining)")))
        .await;

    // A ring request sent during the drain waits for groups: the draining one takes no new
    // work, and the other member of the running ring is held by it.
    let next = tokio::spawn({
        let mut client = client.clone();
        async move { generate(&mut client, ring_request(40)).await }
    });
    until_status(&client, "the next ring request waiting", |s| s.ring_waiting_tokens > 0).await;

    // The running ring request finishes in full: the drain waits for it.
    let finished = rest_of(&mut stream).await;
    let streamed: Vec<u32> = first.into_iter().chain(finished.tokens()).collect();
    assert_eq!(streamed, reference.tokens(), "the ring request finishes as if no drain had begun");
    assert_eq!(finished.reason(), Some(pb::FinishReason::Length));
    // Then the worker leaves etcd and exits.
    let exit = exit_of(workers.remove(index).1).await;
    assert!(exit.success(), "{exit:?}");
    assert_eq!(lease_of(&etcd, &victim).await, None, "the drained worker left etcd");

    // The waiting request is served by a ring of the two other workers.
    let next = tokio::time::timeout(PATIENCE, next).await.expect("the next ring request must not hang").expect("join");
    let next = next.expect("served by a ring re-formed without the drained worker");
    let placement = next.started.as_ref().and_then(|s| s.placement.clone()).expect("placement");
    let mut members = placement.workers.clone();
    members.sort();
    let mut survivors: Vec<String> = workers.iter().map(|(id, _)| id.clone()).collect();
    survivors.sort();
    assert_eq!((placement.sp, members), (2, survivors), "a ring of the two workers left");
    assert_eq!(next.tokens(), reference.tokens()[..40], "greedy: the first 40 tokens of the reference");

    // Nothing is left on the survivors, and the drained worker is gone from the coordinator.
    let status = until_status(&client, "the drained worker gone", |s| s.workers.iter().all(|w| w.id != victim)).await;
    assert_eq!(status.workers.len(), 2, "{:?}", status.workers);
    assert!(status.workers.iter().all(|w| w.sequences == 0 && w.kv_blocks == 0), "{:?}", status.workers);
    assert_eq!(finished_count(&status, "LOST"), 0, "no request was cut");
}
