//! Requests that outlive their group: when a group is lost mid-request, its streams move to
//! another group, re-prefill what they had, and finish exactly as an uninterrupted run would.

use tessera_etcd_harness::EtcdServer;
use tessera_model::fixture::demo;
use tessera_proto::v1 as pb;

use crate::support::*;

/// Streams of this many tokens cannot finish before a fault lands after their first chunks.
const TOKENS: u32 = 1200;

/// Eight greedy and eight seeded streams.
fn requests() -> Vec<pb::GenerateRequest> {
    greedy_and_seeded(16, "Story number", TOKENS, 0.9, 100)
}

/// What one stream gave: its tokens, where it started, and its end.
struct Run {
    tokens: Vec<u32>,
    workers: Vec<String>,
    finished: Option<pb::Finished>,
}

/// Starts `request` and reads it until it has streamed a few tokens: where it runs, and them.
async fn streaming(client: &Client, request: pb::GenerateRequest) -> (tonic::Streaming<pb::GenerateResponse>, Run) {
    let mut stream = client.clone().generate(request).await.expect("accepted").into_inner();
    let mut run = Run { tokens: Vec::new(), workers: Vec::new(), finished: None };
    while run.tokens.len() < 3 {
        match stream.message().await.expect("stream healthy").and_then(|m| m.event) {
            Some(pb::generate_response::Event::Started(s)) => run.workers = s.placement.map(|p| p.workers).unwrap_or_default(),
            Some(pb::generate_response::Event::Chunk(c)) => run.tokens.extend(c.tokens.iter().map(|t| t.id)),
            other => panic!("a stream ended before the fault: {other:?}"),
        }
    }
    (stream, run)
}

/// Reads `stream` to its end.
async fn finish(mut stream: tonic::Streaming<pb::GenerateResponse>, mut run: Run) -> Result<Run, tonic::Status> {
    while let Some(m) = stream.message().await? {
        match m.event {
            Some(pb::generate_response::Event::Started(s)) => run.workers = s.placement.map(|p| p.workers).unwrap_or_default(),
            Some(pb::generate_response::Event::Chunk(c)) => run.tokens.extend(c.tokens.iter().map(|t| t.id)),
            Some(pb::generate_response::Event::Finished(f)) => run.finished = Some(f),
            Some(pb::generate_response::Event::Progress(_)) | None => {}
        }
    }
    Ok(run)
}

/// How a worker fails mid-stream.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL: its connections break, and the group's next step fails at once.
    Kill,
    /// SIGSTOP: it hangs with its connections open; only the step timeout notices.
    Stop,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_of_a_killed_worker_move_to_the_other_group_and_finish_as_if_uninterrupted() {
    streams_survive(Fault::Kill, "migrate-kill").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_of_a_hung_worker_move_when_the_step_timeout_fires_and_finish_as_if_uninterrupted() {
    streams_survive(Fault::Stop, "migrate-stop").await;
}

/// Two TP=2 groups on etcd run sixteen greedy and seeded streams; `fault` strikes one worker
/// once every stream has streamed. Every stream finishes equal to its uninterrupted run, moved
/// exactly once if it was on the struck group, and no live worker holds a sequence afterwards.
async fn streams_survive(fault: Fault, name: &str) {
    let etcd = EtcdServer::start().await;
    let dir = fixture(&demo(), name);
    // A short step timeout, far above a step of this model (milliseconds), so a hung worker is
    // noticed quickly. Batch-invariant numerics: a token's logits do not depend on what shares
    // its step, so neither the load nor the re-prefill after a move can change a seeded draw.
    let args = ["--step-timeout-secs", "3", "--batch-invariant"];
    let coordinator = coordinator_with(&dir, &etcd.url(), 2, &args).expect("start coordinator");
    // Leases outlive the test: the loss is learnt from the broken connection, mid-step.
    let ttl = 2 * PATIENCE.as_secs();
    let ids = ["w-a", "w-b", "w-c", "w-d"];
    let mut workers: Vec<_> = ids.iter().map(|id| etcd_worker(&etcd.url(), id, ttl).expect("start worker")).collect();
    let mut client = connect(&coordinator.url).await;
    until_serving_groups(&mut client, 2).await;

    // The uninterrupted runs, all at once (a seed gives the same tokens in any batch).
    let calls = requests().into_iter().map(|r| {
        let mut client = client.clone();
        async move { generate(&mut client, r).await }
    });
    let reference: Vec<Vec<u32>> =
        futures::future::join_all(calls).await.into_iter().map(|r| r.expect("uninterrupted run").tokens()).collect();
    assert!(reference.iter().all(|t| t.len() == TOKENS as usize));

    // Again, and w-b fails once every stream has started streaming.
    let mut started = Vec::new();
    for r in requests() {
        started.push(streaming(&client, r).await);
    }
    let on_killed = started.iter().filter(|(_, run)| run.workers.iter().any(|w| w == "w-b")).count();
    assert!(on_killed > 0, "the streams are spread over both groups");
    let partner = started
        .iter()
        .flat_map(|(_, run)| run.workers.iter())
        .find(|w| *w != "w-b" && started.iter().any(|(_, r)| r.workers.contains(w) && r.workers.iter().any(|x| x == "w-b")))
        .cloned()
        .expect("w-b's partner in its group");
    match fault {
        Fault::Kill => workers[1].0.kill().expect("SIGKILL w-b"),
        Fault::Stop => signal(&workers[1], "-STOP"),
    }

    let runs = futures::future::join_all(started.into_iter().map(|(stream, run)| finish(stream, run))).await;
    for (i, (run, expected)) in runs.into_iter().zip(&reference).enumerate() {
        let run = run.unwrap_or_else(|status| panic!("stream {i} did not survive {fault:?}: {status:?}"));
        if &run.tokens != expected {
            let at = run.tokens.iter().zip(expected.iter()).position(|(a, b)| a != b);
            let moved = run.finished.as_ref().map(|f| f.migrations);
            eprintln!(
                "stream {i}: {} tokens against {}, first difference at {at:?}, on {:?}, moved {moved:?}",
                run.tokens.len(),
                expected.len(),
                run.workers
            );
        }
        assert_eq!(&run.tokens, expected, "stream {i} differs from its uninterrupted run");
        let finished = run.finished.expect("finished");
        let moved = u32::from(run.workers.iter().any(|w| w == "w-b"));
        assert_eq!(finished.migrations, moved, "stream {i} on {:?}", run.workers);
        assert_eq!(finished.usage.map(|u| u.completion_tokens), Some(TOKENS), "every token counted once");
    }
    let status = until_status(&client, "no sequence left on any worker", |s| {
        s.workers.iter().filter(|w| w.id != "w-b").all(|w| w.sequences == 0 && w.kv_blocks == 0)
    })
    .await;
    assert_eq!(status.counters.map(|c| c.migrations), Some(on_killed as u64));
    if let Fault::Stop = fault {
        // The partner was blocked mid-step on the hung w-b. The coordinator's reset shuts its
        // group connections, so it answers at once and is free (no partner for a new group,
        // so idle), not quarantined until w-b dies.
        until_status(&client, "w-b's partner reset and free", |s| s.workers.iter().any(|w| w.id == partner && w.state == "idle")).await;
    }
    drop(workers);
}

/// A 3,000-token request that only a ring of three 1,024-token groups can hold, with a spare
/// group: killing a ring member mid-decode moves the request to a new ring (the two survivors,
/// reset, and the spare), which prefills prompt and outputs and goes on to the same tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_request_whose_member_dies_moves_to_a_new_ring_and_finishes_as_if_uninterrupted() {
    const NEW_TOKENS: u32 = 48;
    let etcd = EtcdServer::start().await;
    let dir = fixture(&demo(), "migrate-ring");
    let coordinator = coordinator(&dir, &etcd.url(), 1).expect("start coordinator");
    let ttl = 2 * PATIENCE.as_secs();
    let ids = ["w-a", "w-b", "w-c", "w-d"];
    let mut workers: Vec<_> = ids.iter().map(|id| etcd_worker_with_kv(&etcd.url(), id, ttl, 1024).expect("start worker")).collect();
    let mut client = connect(&coordinator.url).await;
    until_serving_groups(&mut client, 4).await;
    let request = || greedy(tokens((0..3000).map(|i| 3 + (i * 37 % 300) as u32).collect()), NEW_TOKENS);
    let reference = generate(&mut client, request()).await.expect("uninterrupted ring run");
    assert_eq!(reference.started.as_ref().and_then(|s| s.placement.as_ref()).map(|p| p.sp), Some(3), "a ring of three");

    let (stream, run) = streaming(&client, request()).await;
    let victim = ids.iter().position(|id| run.workers.iter().any(|w| w == id)).expect("a ring member");
    workers[victim].0.kill().expect("SIGKILL a ring member");
    let run = finish(stream, run).await.unwrap_or_else(|status| panic!("the ring request did not survive: {status:?}"));
    assert_eq!(run.tokens, reference.tokens(), "the moved ring request differs from its uninterrupted run");
    let finished = run.finished.expect("finished");
    assert_eq!(finished.migrations, 1);
    assert_eq!(finished.usage.map(|u| u.completion_tokens), Some(NEW_TOKENS), "every token counted once");
    let dead = ids[victim];
    let status = until_status(&client, "no sequence left on any live worker", |s| {
        s.workers.iter().filter(|w| w.id != dead).all(|w| w.sequences == 0 && w.kv_blocks == 0)
    })
    .await;
    assert_eq!(status.counters.map(|c| c.migrations), Some(1));
}
