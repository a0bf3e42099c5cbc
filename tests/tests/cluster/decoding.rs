//! Decoding controls through a running cluster: repetition controls reach the workers'
//! samplers, and a seed means the same tokens whatever the TP degree or the batch.

use std::collections::HashSet;

use tessera_model::fixture::demo;
use tessera_model::fixture::scripted::{write_scripted, Script};
use tessera_model::fixture::WriteOptions;
use tessera_proto::v1 as pb;

use crate::support::*;

fn sampled(seed: u64, max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        sampling: Some(pb::SamplingParams { temperature: 1.0, top_p: Some(0.95), seed: Some(seed), ..Default::default() }),
        ..greedy(prompt("Once upon a time"), max_new_tokens)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_repeat_ngram_size_breaks_a_greedy_loop_in_the_cluster() {
    let cycle: Vec<u32> = (0..6).map(|i| 50 + 11 * i).collect();
    let script = Script::cycle("scripted-ngram", &cycle).expect("script");
    let dir = write_scripted(&script, &scratch("ngram"), &WriteOptions::default()).expect("write scripted model");
    let cluster = up(&dir, &["--workers", "1"]).expect("tessera up");
    let mut client = connect(&cluster.url).await;

    let looping = generate(&mut client, greedy(tokens(vec![cycle[0]]), 40)).await.expect("generate");
    assert_eq!(looping.tokens()[..6], looping.tokens()[6..12], "without controls the model loops");

    for n in [2u32, 3, 4] {
        let request = pb::GenerateRequest {
            sampling: Some(pb::SamplingParams { no_repeat_ngram_size: n, ..Default::default() }),
            ..greedy(tokens(vec![cycle[0]]), 40)
        };
        let out = generate(&mut client, request).await.expect("generate");
        let mut all = vec![cycle[0]];
        all.extend(out.tokens());
        let mut seen = HashSet::new();
        for gram in all.windows(n as usize) {
            assert!(seen.insert(gram.to_vec()), "n={n}: {gram:?} occurs twice in {all:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_gives_the_same_tokens_at_any_tp_and_in_any_batch() {
    let dir = fixture(&demo(), "seeds");
    let tp1 = up(&dir, &["--workers", "1"]).expect("tessera up TP=1");
    let tp2 = up(&dir, &["--workers", "2", "--tp", "2"]).expect("tessera up TP=2");
    let (mut c1, mut c2) = (connect(&tp1.url).await, connect(&tp2.url).await);

    let alone = generate(&mut c1, sampled(7, 32)).await.expect("TP=1").tokens();
    let on_tp2 = generate(&mut c2, sampled(7, 32)).await.expect("TP=2").tokens();
    assert_eq!(alone, on_tp2, "seed 7 at TP=1 and TP=2");

    // The same request batched with others (different seeds, different lengths) on TP=2.
    let (mut a, mut b, mut c) = (c2.clone(), c2.clone(), c2.clone());
    let (batched, other, third) =
        tokio::join!(generate(&mut a, sampled(7, 32)), generate(&mut b, sampled(8, 48)), generate(&mut c, sampled(9, 16)));
    assert_eq!(batched.expect("batched").tokens(), alone, "seed 7 in a batch of three");
    let other = other.expect("seed 8").tokens();
    assert_ne!(other[..32], alone[..], "another seed gives other tokens");
    assert_eq!(third.expect("seed 9").tokens().len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_report_the_top_alternatives_and_are_capped() {
    let dir = fixture(&demo(), "logprobs");
    let cluster = up(&dir, &["--workers", "2", "--tp", "2"]).expect("tessera up");
    let mut client = connect(&cluster.url).await;
    let request = |logprobs: u32| pb::GenerateRequest {
        sampling: Some(pb::SamplingParams { logprobs, ..Default::default() }),
        ..greedy(prompt("Once upon a time"), 8)
    };
    let out = generate(&mut client, request(5)).await.expect("generate");
    let tokens: Vec<&pb::Token> = out.chunks.iter().flat_map(|c| c.tokens.iter()).collect();
    assert_eq!(tokens.len(), 8);
    for t in tokens {
        assert_eq!(t.top.len(), 5, "{t:?}");
        // Greedy: the chosen token is the most likely one, with the same log-probability.
        assert_eq!(t.top[0].id, t.id);
        assert_eq!(Some(t.top[0].logprob), t.logprob);
        assert!(t.top.windows(2).all(|w| w[0].logprob >= w[1].logprob), "most likely first: {:?}", t.top);
        let mass: f32 = t.top.iter().map(|a| a.logprob.exp()).sum();
        assert!(t.top.iter().all(|a| a.logprob <= 0.0) && mass <= 1.0 + 1e-5, "{:?}", t.top);
    }
    let plain = generate(&mut client, request(0)).await.expect("generate");
    assert!(plain.chunks.iter().flat_map(|c| &c.tokens).all(|t| t.top.is_empty() && t.logprob.is_some()));
    let refused = generate(&mut client, request(21)).await.expect_err("over the cap");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("logprobs is 21; the limit is 20"), "{}", refused.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_sentences_are_removed_from_the_streamed_text() {
    // A model that says "Birds sing." for ever.
    let tokenizer = tessera_model::fixture::scripted::fixture_tokenizer().expect("tokenizer");
    let sentence: Vec<u32> = tokenizer.encode(" Birds sing.", false).expect("encode").get_ids().to_vec();
    let script = Script::cycle("scripted-sentence", &sentence).expect("script");
    let dir = write_scripted(&script, &scratch("sentences"), &WriteOptions::default()).expect("write scripted model");
    let cluster = up(&dir, &["--workers", "1"]).expect("tessera up");
    let mut client = connect(&cluster.url).await;
    let n = 5 * sentence.len() as u32;
    let request = |remove: bool| pb::GenerateRequest {
        sampling: Some(pb::SamplingParams { remove_repeated_sentences: remove, ..Default::default() }),
        ..greedy(tokens(vec![*sentence.last().expect("token")]), n)
    };
    let plain = generate(&mut client, request(false)).await.expect("generate");
    assert_eq!(plain.text(), " Birds sing.".repeat(5));
    let removed = generate(&mut client, request(true)).await.expect("generate");
    assert_eq!(removed.text(), " Birds sing.");
    assert_eq!(removed.finished.as_ref().map(|f| f.removed_sentences), Some(4));
    assert_eq!(removed.tokens(), plain.tokens(), "every token is still reported");
}
