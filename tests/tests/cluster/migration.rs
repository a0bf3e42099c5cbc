//! Requests that outlive their group: when a group is lost mid-request, its streams move to
//! another group, re-prefill what they had, and finish exactly as an uninterrupted run would.

use tessera_etcd_harness::EtcdServer;
use tessera_model::fixture::demo;
use tessera_proto::v1 as pb;

use crate::support::*;

/// Streams of this many tokens cannot finish before a kill lands after their first chunks.
const TOKENS: u32 = 2000;

/// Four greedy and four seeded streams.
fn requests() -> Vec<pb::GenerateRequest> {
    (0..8u64)
        .map(|i| {
            let mut r = greedy(prompt(&format!("Story number {i} begins")), TOKENS);
            if i % 2 == 1 {
                r.sampling = Some(pb::SamplingParams { temperature: Some(0.9), seed: Some(100 + i), ..Default::default() });
            }
            r
        })
        .collect()
}

/// What one stream gave: its tokens, where it started, and its end.
struct Run {
    tokens: Vec<u32>,
    workers: Vec<String>,
    finished: Option<pb::Finished>,
}

/// Reads `stream` to its end.
async fn finish(mut stream: tonic::Streaming<pb::GenerateResponse>, mut run: Run) -> Result<Run, tonic::Status> {
    while let Some(m) = stream.message().await? {
        match m.event {
            Some(pb::generate_response::Event::Started(s)) => run.workers = s.placement.map(|p| p.workers).unwrap_or_default(),
            Some(pb::generate_response::Event::Chunk(c)) => run.tokens.extend(c.tokens.iter().map(|t| t.id)),
            Some(pb::generate_response::Event::Finished(f)) => run.finished = Some(f),
            None => {}
        }
    }
    Ok(run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_of_a_killed_worker_move_to_the_other_group_and_finish_as_if_uninterrupted() {
    let etcd = EtcdServer::start().await;
    let dir = fixture(&demo(), "migrate");
    let coordinator = coordinator(&dir, &etcd.url(), 2).expect("start coordinator");
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

    // Again, and w-b dies once every stream has started streaming.
    let mut started = Vec::new();
    for r in requests() {
        let mut stream = client.clone().generate(r).await.expect("accepted").into_inner();
        let mut run = Run { tokens: Vec::new(), workers: Vec::new(), finished: None };
        while run.tokens.len() < 3 {
            match stream.message().await.expect("stream healthy").and_then(|m| m.event) {
                Some(pb::generate_response::Event::Started(s)) => run.workers = s.placement.map(|p| p.workers).unwrap_or_default(),
                Some(pb::generate_response::Event::Chunk(c)) => run.tokens.extend(c.tokens.iter().map(|t| t.id)),
                other => panic!("a stream ended before the kill: {other:?}"),
            }
        }
        started.push((stream, run));
    }
    let on_killed = started.iter().filter(|(_, run)| run.workers.iter().any(|w| w == "w-b")).count();
    assert!(on_killed > 0, "the streams are spread over both groups");
    workers[1].0.kill().expect("SIGKILL w-b");

    let runs = futures::future::join_all(started.into_iter().map(|(stream, run)| finish(stream, run))).await;
    for (i, (run, expected)) in runs.into_iter().zip(&reference).enumerate() {
        let run = run.unwrap_or_else(|status| panic!("stream {i} did not survive the kill: {status:?}"));
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
    drop(workers);
}
