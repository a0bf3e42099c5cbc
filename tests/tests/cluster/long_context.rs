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
    let refused = generate(&mut connect(&one.url).await, request()).await.expect_err("one group of 1024 cannot hold 3016 tokens");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("prompt plus max_new_tokens is 3016 tokens; the most this cluster can hold for one request now is 1024"),
        "{}",
        refused.message()
    );
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
