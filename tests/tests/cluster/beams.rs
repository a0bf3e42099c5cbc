//! Beam search through a running cluster equals Hugging Face transformers' beam search: the same
//! hypotheses, in the same order, with the same scores, at TP=1 and TP=2. The reference is
//! `tests/golden/beam-search.json`, written by `scripts/golden/make_beam_golden.py`.

use serde_json::Value;
use sha2::{Digest, Sha256};
use tessera_model::fixture::by_name;
use tessera_proto::v1 as pb;

use crate::support::*;

fn golden() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/golden/beam-search.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("read the beam golden")).expect("beam golden is JSON")
}

fn sha256_hex(path: std::path::PathBuf) -> String {
    let bytes = std::fs::read(path).expect("read fixture file");
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|i| i.as_u64().expect("id") as u32).collect()
}

fn request(case: &Value, prompt: &[u32], end: u32) -> pb::GenerateRequest {
    let early_stopping = match &case["early_stopping"] {
        Value::Bool(true) => pb::EarlyStopping::First,
        Value::String(s) if s == "never" => pb::EarlyStopping::Never,
        _ => pb::EarlyStopping::Heuristic,
    };
    let num = |k: &str| case[k].as_u64().unwrap_or(0) as u32;
    pb::GenerateRequest {
        sampling: Some(pb::SamplingParams {
            repetition_penalty: case["repetition_penalty"].as_f64().map(|p| p as f32),
            no_repeat_ngram_size: num("no_repeat_ngram_size"),
            beam_search: Some(pb::BeamSearch {
                num_beams: num("num_beams"),
                length_penalty: case["length_penalty"].as_f64().map(|p| p as f32),
                early_stopping: early_stopping as i32,
                num_return_sequences: num("num_return_sequences"),
            }),
            ..Default::default()
        }),
        stopping: Some(pb::StoppingCriteria {
            max_new_tokens: num("max_new_tokens"),
            ignore_eos: true,
            stop_token_ids: vec![end],
            ..Default::default()
        }),
        ..greedy(tokens(prompt.to_vec()), 0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beam_search_equals_transformers_at_tp1_and_tp2() {
    let golden = golden();
    let spec = by_name(golden["fixture"].as_str().expect("fixture name")).expect("known fixture");
    let dir = fixture(&spec, "beams");
    assert_eq!(golden["model_sha256"].as_str(), Some(sha256_hex(dir.join("model.safetensors")).as_str()), "golden made from other weights");
    assert_eq!(golden["config_sha256"].as_str(), Some(sha256_hex(dir.join("config.json")).as_str()), "golden made from another config");
    let prompt = ids(&golden["prompt_ids"]);
    let end = golden["end_token"].as_u64().expect("end token") as u32;

    let tp1 = up(&dir, &["--workers", "1"]).expect("tessera up TP=1");
    let tp2 = up(&dir, &["--workers", "2", "--tp", "2"]).expect("tessera up TP=2");
    let mut ended_early = 0;
    for url in [&tp1.url, &tp2.url] {
        let mut client = connect(url).await;
        for case in golden["cases"].as_array().expect("cases") {
            let name = case["name"].as_str().expect("case name");
            let out = generate(&mut client, request(case, &prompt, end)).await.unwrap_or_else(|e| panic!("{name}: {e}"));
            let finished = out.finished.as_ref().expect("finished");
            let want = case["hypotheses"].as_array().expect("hypotheses");
            assert_eq!(finished.hypotheses.len(), want.len(), "{name}: number of hypotheses");
            for (i, (got, want)) in finished.hypotheses.iter().zip(want).enumerate() {
                let mut got_ids = got.ids.clone();
                if got.reason == pb::FinishReason::Stop as i32 {
                    got_ids.push(end);
                    ended_early += 1;
                }
                assert_eq!(got_ids, ids(&want["ids"]), "{name}: hypothesis {i} at {url}");
                let score = want["score"].as_f64().expect("score") as f32;
                assert!((got.score - score).abs() <= 1e-4 * score.abs().max(1.0), "{name}: hypothesis {i} scores {} vs {score}", got.score);
            }
            // The stream carries the best hypothesis.
            assert_eq!(out.tokens(), finished.hypotheses[0].ids, "{name}: streamed tokens");
            assert_eq!(out.text(), finished.hypotheses[0].text, "{name}: streamed text");
        }
    }
    assert!(ended_early > 0, "no hypothesis ended on the end token: the golden exercises nothing but the length limit");
    // Every beam's sequence was released.
    let status = connect(&tp2.url).await.cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
    assert!(status.workers.iter().all(|w| w.sequences == 0 && w.kv_tokens == 0), "{status:?}");
}
