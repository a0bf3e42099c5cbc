//! Requests longer than any one group's KV cache: refused clearly where no placement can hold
//! them, and served by a sequence-parallel ring of groups where one can, with the same greedy
//! tokens as one unlimited group.

use std::time::Duration;

use tessera_model::fixture::demo;
use tessera_proto::v1 as pb;

use crate::support::*;

/// A 3,000-token prompt from the demo vocabulary.
fn long_prompt() -> Vec<u32> {
    (0..3000).map(|i| 3 + (i * 37 % 300) as u32).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_groups_of_1024_tokens_serve_a_3000_token_prompt_that_one_group_refuses() {
    let dir = fixture(&demo(), "long-context");
    let request = || greedy(tokens(long_prompt()), 16);

    let unlimited = up(&dir, &["--workers", "1"]).expect("tessera up, one unlimited group");
    let reference = generate(&mut connect(&unlimited.url).await, request()).await.expect("unlimited run");
    assert_eq!(reference.tokens().len(), 16);
    assert_eq!(reference.started.as_ref().and_then(|s| s.placement.as_ref()).map(|p| p.sp), Some(1));
    drop(unlimited);

    let one = up(&dir, &["--workers", "1", "--kv-capacity-tokens", "1024"]).expect("tessera up, one small group");
    let mut one_client = connect(&one.url).await;
    let refused = generate(&mut one_client, request()).await.expect_err("one group of 1024 cannot hold 3016 tokens");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("prompt plus max_new_tokens is 3016 tokens; the most this cluster can hold for one request now is 1024"),
        "{}",
        refused.message()
    );
    // The refused demand is counted, for autoscaling on it.
    let status = one_client.cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
    assert_eq!(status.counters.map(|c| c.capacity_refused_tokens), Some(3016));
    assert_eq!(status.ring_waiting_tokens, 0);
    drop(one);

    let three = up(&dir, &["--workers", "3", "--tp", "1", "--kv-capacity-tokens", "1024"]).expect("tessera up, three small groups");
    let mut client = connect(&three.url).await;
    let ring = generate(&mut client, request()).await.expect("served by a ring");
    let placement = ring.started.as_ref().and_then(|s| s.placement.clone()).expect("placement");
    assert_eq!((placement.sp, placement.tp, placement.workers.len()), (3, 1, 3), "{placement:?}");
    assert_eq!(ring.tokens(), reference.tokens(), "ring of three vs one unlimited group");
    assert_eq!(ring.text(), reference.text());
    assert_eq!(ring.reason(), Some(pb::FinishReason::Length));

    // The ring let its groups go: short requests are served by single groups again, and no
    // worker still holds any of the long sequence.
    let short = generate(&mut client, greedy(prompt("Hello"), 4)).await.expect("short request after the ring");
    assert_eq!(short.started.as_ref().and_then(|s| s.placement.as_ref()).map(|p| p.sp), Some(1));
    let status = client.cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
    assert!(status.workers.iter().all(|w| w.sequences == 0 && w.kv_tokens == 0), "{status:?}");
    // One token more than three members can hold is refused with the cluster's maximum.
    let too_long = greedy(tokens((0..3070).map(|i| 3 + (i * 37 % 300) as u32).collect()), 16);
    let refused = generate(&mut client, too_long).await.expect_err("past three groups");
    assert!(refused.message().contains("the most this cluster can hold for one request now is 3066"), "{}", refused.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rings_of_tp2_groups_and_rings_chosen_for_prefill_cost_give_the_same_tokens() {
    let dir = fixture(&demo(), "ring-tp2");
    let prompt: Vec<u32> = (0..1500).map(|i| 5 + (i * 53 % 290) as u32).collect();
    let request = || greedy(tokens(prompt.clone()), 12);
    let sp_of = |c: &Collected| c.started.as_ref().and_then(|s| s.placement.as_ref()).map(|p| (p.sp, p.tp));

    let unlimited = up(&dir, &["--workers", "1"]).expect("tessera up, one group");
    let reference = generate(&mut connect(&unlimited.url).await, request()).await.expect("one group");
    drop(unlimited);

    // Two TP=2 groups of 1024 tokens each: a ring of two, TP inside each member.
    let tp2 = up(&dir, &["--workers", "4", "--tp", "2", "--kv-capacity-tokens", "1024"]).expect("tessera up, 2 × TP=2");
    let ring = generate(&mut connect(&tp2.url).await, request()).await.expect("ring of TP=2 groups");
    assert_eq!(sp_of(&ring), Some((2, 2)));
    assert_eq!(ring.tokens(), reference.tokens(), "SP=2 × TP=2 vs one TP=1 group");
    drop(tp2);

    // Unlimited groups, but prompts of 600+ tokens are spread for a faster prefill.
    let fast = up(&dir, &["--workers", "2", "--tp", "1", "--ring-prefill-tokens", "600"]).expect("tessera up, prefill rule");
    let mut client = connect(&fast.url).await;
    let spread = generate(&mut client, request()).await.expect("ring chosen for prefill cost");
    assert_eq!(sp_of(&spread), Some((2, 1)), "1500 tokens at 600 per member: as many groups as serve (2)");
    assert_eq!(spread.tokens(), reference.tokens());
    let short = generate(&mut client, greedy(tokens(prompt[..100].to_vec()), 4)).await.expect("short prompt");
    assert_eq!(sp_of(&short), Some((1, 1)), "a short prompt stays on one group");
}

/// Two unlimited groups where prompts of 600+ tokens go to a ring: a 1,500-token prompt is served
/// by a ring of both.
fn ring_of_two(name: &str) -> Served {
    up(&fixture(&demo(), name), &["--workers", "2", "--tp", "1", "--ring-prefill-tokens", "600"]).expect("tessera up, ring rule")
}

fn ring_request(max_new_tokens: u32) -> pb::GenerateRequest {
    greedy(tokens((0..1500).map(|i| 5 + (i * 53 % 290) as u32).collect()), max_new_tokens)
}

/// Asserts that no worker holds a sequence or a KV block, then that the groups serve again: a
/// ring request (every worker left the ring, so a new one forms over the same groups) and a
/// short one.
async fn assert_freed_and_serving(client: &Client) {
    let status = client.clone().cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
    assert!(status.workers.iter().all(|w| w.sequences == 0 && w.kv_blocks == 0), "{:?}", status.workers);
    let ring = generate(&mut client.clone(), ring_request(4)).await.expect("a ring request afterwards");
    assert_eq!(ring.started.as_ref().and_then(|s| s.placement.as_ref()).map(|p| (p.sp, p.tp)), Some((2, 1)));
    assert_eq!(ring.tokens().len(), 4);
    let short = generate(&mut client.clone(), greedy(prompt("Hello"), 4)).await.expect("a short request afterwards");
    assert_eq!(short.tokens().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_request_past_its_deadline_leaves_the_ring_then_ends_deadline_exceeded() {
    let cluster = ring_of_two("ring-deadline");
    let client = connect(&cluster.url).await;

    // A deadline at an eighth of the time 2,500 ring steps take here (a quarter of 1,250), so
    // the request cannot finish first even when the machine gets much less busy after the
    // probe (a 2,000-token request with a quarter once did, on a machine shared with builds).
    let per_token = seconds_per_token(&client, ring_request(32)).await;
    let mut request = tonic::Request::new(ring_request(2500));
    request.set_timeout(deadline_well_before(per_token, 1250));
    let mut stream = client.clone().generate(request).await.expect("accepted").into_inner();
    let status = until_error(&mut stream).await;
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("deadline passed after"), "{}", status.message());
    let counters = client.clone().cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner().counters;
    assert_eq!(counters.map(|c| c.deadlines_exceeded), Some(1));
    // The ring was left on every rank before the error was sent.
    assert_freed_and_serving(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ring_request_cancelled_mid_stream_leaves_the_ring() {
    let cluster = ring_of_two("ring-cancel");
    let client = connect(&cluster.url).await;

    let mut stream = client.clone().generate(ring_request(2000)).await.expect("accepted").into_inner();
    let first = stream.message().await.expect("stream healthy").and_then(|m| m.event);
    let Some(pb::generate_response::Event::Started(started)) = first else { panic!("expected Started first, got {first:?}") };
    assert_eq!(started.placement.map(|p| p.sp), Some(2), "served by a ring");
    read_chunks(&mut stream, 2).await;
    // The ring request counts as one running request, though no group's loop runs it.
    let running = client.clone().cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner().running_requests;
    assert_eq!(running, 1, "a ring request is a running request");
    drop(stream);

    // The ring counts the cancellation once it has left the ring on every rank.
    let cancelled = async {
        let mut tick = tokio::time::interval(POLL);
        loop {
            tick.tick().await;
            let status = client.clone().cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
            if status.counters.and_then(|c| c.finished.get("CANCELLED").copied()) == Some(1) {
                return;
            }
        }
    };
    tokio::time::timeout(PATIENCE, cancelled).await.expect("the ring did not notice the cancellation in time");
    assert_freed_and_serving(&client).await;
}

/// While a ring holds every group, short requests wait for a group as they would on a busy one,
/// never UNAVAILABLE: they count as queued, one whose deadline passes first ends
/// DEADLINE_EXCEEDED saying why, and once the ring ends the others run with the tokens an idle
/// cluster gives them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_requests_wait_for_the_groups_a_ring_holds() {
    let cluster = ring_of_two("ring-wait");
    let client = connect(&cluster.url).await;
    let shorts: Vec<pb::GenerateRequest> = ["Hello", "The sky is", "Once upon a"].iter().map(|p| greedy(prompt(p), 6)).collect();
    let mut idle = Vec::new();
    for request in &shorts {
        idle.push(generate(&mut client.clone(), request.clone()).await.expect("on the idle cluster").tokens());
    }

    let mut ring = client.clone().generate(ring_request(2000)).await.expect("accepted").into_inner();
    read_chunks(&mut ring, 2).await;
    // The ring holds both groups now and generates for a long while: nothing else can start.
    let mut late = tonic::Request::new(shorts[0].clone());
    late.set_timeout(Duration::from_millis(500));
    let expired = match client.clone().generate(late).await {
        Ok(stream) => until_error(&mut stream.into_inner()).await,
        Err(status) => status,
    };
    assert_eq!(expired.code(), tonic::Code::DeadlineExceeded, "{expired:?}");
    assert!(expired.message().contains("sequence-parallel ring"), "{}", expired.message());
    let waiting: Vec<_> = shorts
        .iter()
        .cloned()
        .map(|request| {
            let mut client = client.clone();
            tokio::spawn(async move { generate(&mut client, request).await })
        })
        .collect();
    let status = until_status(&client, "three short requests waiting behind the ring", |s| s.queued_requests == 3).await;
    assert_eq!(status.counters.map(|c| c.deadlines_exceeded), Some(1), "the expired wait is counted");
    assert!(waiting.iter().all(|w| !w.is_finished()), "no short request may run while the ring holds every group");

    // The ring ends (its client leaves); the waiting requests run on single groups.
    drop(ring);
    for (task, idle) in waiting.into_iter().zip(&idle) {
        let done = task.await.expect("task").expect("a waiting request runs once the ring ends");
        assert_eq!(done.started.as_ref().and_then(|s| s.placement.as_ref()).map(|p| p.sp), Some(1));
        assert_eq!(&done.tokens(), idle, "the same tokens as on an idle cluster");
    }
    until_status(&client, "nothing queued", |s| s.queued_requests == 0).await;
    assert_freed_and_serving(&client).await;
}
