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
        sampling: Some(pb::SamplingParams { temperature: Some(1.0), top_p: Some(0.95), seed: Some(seed), ..Default::default() }),
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
async fn a_logit_bias_bans_and_forces_tokens_and_is_checked() {
    let cycle: Vec<u32> = (0..6).map(|i| 50 + 11 * i).collect();
    let script = Script::cycle("scripted-bias", &cycle).expect("script");
    let dir = write_scripted(&script, &scratch("bias"), &WriteOptions::default()).expect("write scripted model");
    let cluster = up(&dir, &["--workers", "1"]).expect("tessera up");
    let mut client = connect(&cluster.url).await;
    let biased = |bias: Vec<(u32, f32)>| pb::GenerateRequest {
        sampling: Some(pb::SamplingParams {
            logit_bias: bias.into_iter().map(|(token, bias)| pb::TokenBias { token, bias }).collect(),
            ..Default::default()
        }),
        ..greedy(tokens(vec![cycle[0]]), 12)
    };

    let plain = generate(&mut client, biased(Vec::new())).await.expect("generate").tokens();
    assert_eq!(plain[..5], cycle[1..], "the script's own next tokens");
    let banned = generate(&mut client, biased(vec![(cycle[1], -100.0)])).await.expect("generate").tokens();
    assert!(!banned.contains(&cycle[1]), "a banned token never appears: {banned:?}");
    let forced = generate(&mut client, biased(vec![(7, 100.0)])).await.expect("generate").tokens();
    assert_eq!(forced, vec![7; 12], "a forced token is every token");

    let too_many = biased((0..301).map(|t| (t, 1.0)).collect());
    let refused = generate(&mut client, too_many).await.expect_err("301 biases");
    assert!(refused.message().contains("logit_bias has 301 entries; the limit is 300"), "{}", refused.message());
    let out_of_range = generate(&mut client, biased(vec![(7, 150.0)])).await.expect_err("a bias of 150");
    assert!(out_of_range.message().contains("logit_bias"), "{}", out_of_range.message());
    let outside = generate(&mut client, biased(vec![(1 << 30, 1.0)])).await.expect_err("a token outside the vocabulary");
    assert!(outside.message().contains("outside the vocabulary"), "{}", outside.message());
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

/// A model's `generation_config.json` fills the sampling fields a request leaves unset (as
/// vLLM does), and a field the request sets wins: the "tuned" model below is the demo model
/// with such a file, served beside the plain one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_config_supplies_the_sampling_a_request_leaves_unset() {
    let plain = fixture(&demo(), "generation-config");
    let tuned = scratch("generation-config-tuned");
    std::fs::create_dir_all(&tuned).expect("mkdir");
    for entry in std::fs::read_dir(&plain).expect("read fixture") {
        let entry = entry.expect("entry");
        std::os::unix::fs::symlink(entry.path(), tuned.join(entry.file_name())).expect("link");
    }
    std::fs::write(tuned.join("generation_config.json"), r#"{"temperature": 1.3, "top_k": 7, "top_p": 0.9, "repetition_penalty": 1.2}"#)
        .expect("write generation_config.json");
    let tuned_arg = format!("tuned={}", tuned.display());
    let cluster = up(&plain, &["--workers", "2", "--model", &tuned_arg]).expect("tessera up");
    let mut client = connect(&cluster.url).await;

    let models = client.list_models(pb::ListModelsRequest {}).await.expect("list models").into_inner().models;
    let defaults = |name: &str| models.iter().find(|m| m.name == name).and_then(|m| m.default_sampling.clone());
    let recommended = pb::SamplingParams {
        temperature: Some(1.3),
        top_k: Some(7),
        top_p: Some(0.9),
        repetition_penalty: Some(1.2),
        ..Default::default()
    };
    assert_eq!(defaults("tuned"), Some(recommended.clone()), "{models:?}");
    assert_eq!(defaults("demo"), Some(pb::SamplingParams::default()), "{models:?}");

    let request = |model: &str, sampling: pb::SamplingParams| pb::GenerateRequest {
        model: model.into(),
        sampling: Some(sampling),
        ..greedy(prompt("Once upon a time"), 24)
    };
    let seeded = |sampling: pb::SamplingParams| pb::SamplingParams { seed: Some(11), ..sampling };
    // Unset fields: the tuned model samples as its file says, which the plain model does when
    // asked for the same values explicitly.
    let by_default = generate(&mut client, request("tuned", seeded(Default::default()))).await.expect("tuned, unset");
    let explicit = generate(&mut client, request("demo", seeded(recommended.clone()))).await.expect("demo, explicit");
    assert_eq!(by_default.tokens(), explicit.tokens());
    // A field the request sets wins: temperature 0 is greedy on both.
    let greedy_tuned = generate(
        &mut client,
        request("tuned", seeded(pb::SamplingParams { temperature: Some(0.0), repetition_penalty: Some(1.0), ..Default::default() })),
    )
    .await
    .expect("tuned, greedy");
    let greedy_plain = generate(&mut client, request("demo", Default::default())).await.expect("demo, greedy");
    assert_eq!(greedy_tuned.tokens(), greedy_plain.tokens());
    // The defaults did change the output (the comparison above is not between two greedy runs).
    assert_ne!(by_default.tokens(), greedy_plain.tokens());
}
