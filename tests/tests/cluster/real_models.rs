//! A real model nobody on the project made (SmolLM2-135M-Instruct, one Q4_1 GGUF file with no
//! side files) served the way a newcomer runs it, and models that cannot be served failing
//! fast with their reason instead of being retried for ever.

use std::io::Read as _;
use std::process::{Command, Stdio};

use tessera_etcd_harness::EtcdServer;
use tessera_model::fixture::{demo, smollm2_gguf};
use tessera_proto::v1 as pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::*;

fn chat(text: &str) -> pb::generate_request::Input {
    pb::generate_request::Input::Chat(pb::ChatInput { messages: vec![pb::ChatMessage { role: "user".into(), content: text.into() }] })
}

/// The golden's chat case: transformers' prompt ids for it, rendered and tokenized from the
/// same GGUF file.
fn golden_chat_prompt_len() -> usize {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/golden/smollm2-greedy.json");
    let golden: serde_json::Value = serde_json::from_slice(&std::fs::read(path).expect("golden")).expect("parse");
    let case = golden["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| c["chat"] == true && c["text"].as_str().is_some_and(|t| t.contains("capital of France")))
        .expect("chat case");
    case["prompt_ids"].as_array().expect("ids").len()
}

/// `tessera up --model FILE.gguf` with three workers picks TP=3 by itself (9 heads), renders the
/// chat with the file's own template exactly as transformers does, and answers the question.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_gguf_chats_through_grpc() {
    let cluster = up(&smollm2_gguf(), &["--workers", "3"]).expect("tessera up");
    let mut client = connect(&cluster.url).await;
    let mut request = greedy(chat("What is the capital of France?"), 12);
    request.stopping.as_mut().expect("stopping").ignore_eos = false;
    let answer = generate(&mut client, request).await.expect("chat");
    let started = answer.started.as_ref().expect("started");
    assert_eq!(started.placement.as_ref().expect("placement").tp, 3, "up chose TP=3 for 9 heads on 3 workers");
    assert_eq!(started.prompt_tokens as usize, golden_chat_prompt_len(), "the rendered chat tokenizes as transformers'");
    assert!(!answer.text().trim().is_empty() && !answer.text().contains('\u{FFFD}'), "{:?}", answer.text());
    // The answer everyone knows, through three shards of the quantized weights.
    let plain = generate(&mut client, greedy(prompt("The capital of France is"), 2)).await.expect("generate");
    assert!(plain.text().starts_with(" Paris"), "{:?}", plain.text());
}

/// Two workers cannot split 9 heads: `up` falls back to the largest degree that does (1), so the
/// documented default commands work on this model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_picks_a_tp_size_the_heads_divide_into() {
    let cluster = up(&smollm2_gguf(), &["--workers", "2"]).expect("tessera up");
    let mut client = connect(&cluster.url).await;
    let models = client.list_models(pb::ListModelsRequest {}).await.expect("ListModels").into_inner().models;
    assert_eq!(models[0].serving_groups, 2, "two groups of TP=1");
    let answer = generate(&mut client, greedy(prompt("The capital of France is"), 2)).await.expect("generate");
    assert_eq!(answer.started.as_ref().and_then(|s| s.placement.as_ref()).map(|p| p.tp), Some(1));
    assert!(answer.text().starts_with(" Paris"), "{:?}", answer.text());
}

/// A model whose files pass the coordinator's checks but that a worker cannot load (here the
/// config promises a wider MLP than the weights have): the load error is permanent, so the model
/// is marked failed with the worker's reason instead of being formed again every 30 s.
fn unloadable_model(name: &str) -> std::path::PathBuf {
    let dir = fixture(&demo(), name);
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("parse");
    let wider = config["intermediate_size"].as_u64().expect("intermediate_size") * 2;
    config["intermediate_size"] = wider.into();
    std::fs::write(&path, config.to_string()).expect("write");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_load_error_fails_the_model_with_its_reason() {
    let etcd = EtcdServer::start().await;
    let dir = unloadable_model("unloadable");
    let coordinator = coordinator(&dir, &etcd.url(), 1).expect("the coordinator starts: config and tokenizer are fine");
    let _worker = etcd_worker(&etcd.url(), "w-a", 2).expect("worker");
    let mut client = connect(&coordinator.url).await;
    let status = until_status(&client, "the model marked failed", |status| {
        let model = status.models.first().expect("the served model is listed");
        assert!(model.state == "failed" || model.state == "loading", "{model:?}");
        model.state == "failed"
    })
    .await;
    let model = status.models.first().cloned().expect("the served model is listed");
    assert!(model.error.contains("cannot load the model") && model.error.contains("mlp"), "{}", model.error);
    let refused = generate(&mut client, greedy(prompt("Hello"), 2)).await.expect_err("a failed model serves nothing");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("failed to load") && refused.message().contains("mlp"), "{}", refused.message());
    assert_eq!(service_health(&coordinator.url, "tessera.v1.Inference").await.expect("health"), ServingStatus::NotServing);
    // Not retried: the worker is free again and stays out of any group.
    let status = client.cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
    assert!(status.workers.iter().all(|w| w.group == 0), "{status:?}");
}

/// `tessera up` on the same model exits non-zero with the reason, instead of never printing
/// "serving".
#[test]
fn up_exits_with_the_reason_a_model_cannot_load() {
    let dir = unloadable_model("up-unloadable");
    let mut child = Command::new(tessera_tests::tessera_bin())
        .args(["up", "--threads", "1", "--port", "0", "--workers", "1", "--model"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tessera up");
    // Read while it runs, so a full pipe can never block it; the pipe reaches its end when
    // `up` and the workers it started have exited.
    let mut pipe = child.stderr.take().expect("stderr");
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = done.send(pipe.read_to_string(&mut text).map(|_| text));
    });
    let stderr = match finished.recv_timeout(PATIENCE) {
        Ok(text) => text.expect("read stderr"),
        Err(_) => {
            let _ = child.kill();
            panic!("tessera up did not exit on a model that cannot load");
        }
    };
    let status = child.wait().expect("wait");
    assert!(!status.success(), "{status}");
    assert!(stderr.contains("cannot serve") && stderr.contains("cannot load the model"), "{stderr}");
}
