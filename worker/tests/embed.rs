//! A worker serving an encoder: `Embed` on all-MiniLM-L6-v2 gives sentence-transformers' vectors
//! (`tests/golden/minilm-embeddings.json`); decoder calls on an encoder group and `Embed` on a
//! decoder group are `INVALID_ARGUMENT`. The model comes from `scripts/setup.sh`.

use std::path::{Path, PathBuf};

use tessera_model::fixture::{demo, minilm_dir, write_fixture, WriteOptions};
use tessera_proto::worker as pb;
use tessera_proto::worker::worker_server::Worker;
use tessera_worker::engine::{EngineConfig, EngineHandle};
use tessera_worker::service::WorkerService;
use tonic::{Code, Request};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn service() -> WorkerService {
    let config = EngineConfig { collective_host: "127.0.0.1".into(), kv_capacity_tokens: 4096, collective_tls: None, max_adapters: 8 };
    let engine = EngineHandle::spawn(config.clone()).expect("spawn the engine thread");
    WorkerService::new("w-embed".into(), engine, config)
}

async fn load(service: &WorkerService, dir: &Path) -> Result<(), tonic::Status> {
    let assign = pb::AssignRequest {
        group_id: "g".into(),
        model_dir: dir.display().to_string(),
        dtype: "f32".into(),
        tp_rank: 0,
        tp_size: 1,
        batch_invariant: false,
    };
    service.assign(Request::new(assign)).await?;
    service.rendezvous(Request::new(pb::RendezvousRequest { group_id: "g".into(), peers: Vec::new() })).await?;
    Ok(())
}

fn embed_request(inputs: Vec<Vec<u32>>) -> Request<pb::EmbedRequest> {
    Request::new(pb::EmbedRequest { group_id: "g".into(), inputs: inputs.into_iter().map(|ids| pb::EmbedInput { ids }).collect() })
}

fn step_request() -> Request<pb::StepRequest> {
    Request::new(pb::StepRequest { group_id: "g".into(), ..Default::default() })
}

#[tokio::test]
async fn encoder_worker_embeds_like_sentence_transformers() {
    let service = service();
    load(&service, &minilm_dir()).await.expect("load MiniLM");
    let status = service.status(Request::new(pb::StatusRequest {})).await.expect("status").into_inner();
    assert_eq!(status.state, "serving");

    let text = std::fs::read_to_string(workspace_root().join("tests/golden/minilm-embeddings.json")).expect("golden");
    let golden: serde_json::Value = serde_json::from_str(&text).expect("parse golden");
    let cases = golden["cases"].as_array().expect("cases");
    let ids: Vec<Vec<u32>> =
        cases.iter().map(|c| c["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect()).collect();
    // More inputs than the engine's internal batch, so batches are joined in order.
    let repeated: Vec<Vec<u32>> = ids.iter().chain(&ids).cloned().collect();
    let got = service.embed(embed_request(repeated.clone())).await.expect("embed").into_inner().embeddings;
    assert_eq!(got.len(), repeated.len());
    for (i, v) in got.iter().enumerate() {
        let want: Vec<f64> = cases[i % cases.len()]["vector"].as_array().expect("vector").iter().map(|x| x.as_f64().expect("f")).collect();
        let dot: f64 = v.values.iter().zip(&want).map(|(a, b)| f64::from(*a) * b).sum();
        let na: f64 = v.values.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
        let cos = dot / (na * nb);
        assert!(cos >= 0.9999, "input {i}: cosine {cos}");
    }

    let step = service.step(step_request()).await.expect_err("Step on an encoder");
    assert_eq!(step.code(), Code::InvalidArgument, "{}", step.message());
    assert!(step.message().contains("encoder"), "{}", step.message());

    let too_long = service.embed(embed_request(vec![vec![101, 102], vec![1996; 513]])).await.expect_err("513 tokens");
    assert_eq!(too_long.code(), Code::InvalidArgument);
    assert!(too_long.message().contains("input 1 has 513 tokens"), "{}", too_long.message());
    let late = (0..20).map(|i| if i == 17 { vec![1996; 600] } else { vec![101, 102] }).collect();
    let too_long = service.embed(embed_request(late)).await.expect_err("600 tokens");
    assert!(too_long.message().contains("input 17 has 600 tokens"), "{}", too_long.message());
    let none = service.embed(embed_request(Vec::new())).await.expect_err("no inputs");
    assert_eq!(none.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn encoder_needs_one_rank_and_decoders_refuse_embed() {
    let service = service();
    let assign = pb::AssignRequest {
        group_id: "tp2".into(),
        model_dir: minilm_dir().display().to_string(),
        dtype: "f32".into(),
        tp_rank: 0,
        tp_size: 2,
        batch_invariant: false,
    };
    let addr = service.assign(Request::new(assign)).await.expect("assign").into_inner().collective_address;
    let refused = service
        .rendezvous(Request::new(pb::RendezvousRequest { group_id: "tp2".into(), peers: vec![addr.clone(), addr] }))
        .await
        .expect_err("encoder at tp 2");
    assert_eq!(refused.code(), Code::InvalidArgument, "{}", refused.message());

    let root = tempfile::tempdir().expect("temp dir");
    let dir = write_fixture(&demo(), root.path(), &WriteOptions::default()).expect("write demo decoder");
    service.reset(Request::new(pb::ResetRequest {})).await.expect("reset");
    load(&service, &dir).await.expect("load decoder");
    let embed = service.embed(embed_request(vec![vec![1, 2, 3]])).await.expect_err("Embed on a decoder");
    assert_eq!(embed.code(), Code::InvalidArgument, "{}", embed.message());
    assert!(embed.message().contains("decoder"), "{}", embed.message());
}
