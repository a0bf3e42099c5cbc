//! Requests longer than any one group's KV cache: refused clearly where no placement can hold
//! them, and served by a sequence-parallel ring of groups where one can, with the same greedy
//! tokens as one unlimited group.

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
