//! An encoder beside a decoder in one cluster: `tessera up --model DEMO --model minilm=DIR`
//! serves the demo decoder and all-MiniLM-L6-v2 together. `Embed` gives sentence-transformers'
//! vectors (`tests/golden/minilm-embeddings.json`), `ListModels` tells the kinds apart, and each
//! kind refuses the other's call. The model comes from `scripts/setup.sh`.

use std::path::Path;

use tessera_model::fixture::{demo, minilm_dir};
use tessera_proto::v1 as pb;
use tonic::Code;

use crate::support::*;

struct Case {
    text: String,
    /// What sentence-transformers fed the model: cut to its max_seq_length when `truncated`.
    ids: Vec<u32>,
    truncated: bool,
    vector: Vec<f64>,
}

fn golden() -> Vec<Case> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/minilm-embeddings.json");
    let value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).expect("read golden")).expect("parse golden");
    let list = value["cases"].as_array().expect("cases");
    list.iter()
        .map(|c| Case {
            text: c["text"].as_str().expect("text").to_string(),
            ids: c["ids"].as_array().expect("ids").iter().map(|v| v.as_u64().expect("id") as u32).collect(),
            truncated: c["truncated"].as_bool().expect("truncated"),
            vector: c["vector"].as_array().expect("vector").iter().map(|v| v.as_f64().expect("f")).collect(),
        })
        .collect()
}

/// 1 − cosine the served vectors may be from sentence-transformers' (measured ≤ 5e-13; see
/// worker/model/tests/bert_parity.rs).
const MAX_ONE_MINUS_COSINE: f64 = 1e-6;

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "vector length");
    assert!(a.iter().all(|x| x.is_finite()), "a non-finite value in the vector");
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * y).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn embed_texts(texts: Vec<String>, truncate: bool) -> pb::EmbedRequest {
    pb::EmbedRequest { model: "minilm".into(), texts, token_ids: Vec::new(), truncate }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoder_and_a_decoder_serve_side_by_side() {
    let decoder = fixture(&demo(), "encoders");
    let minilm = format!("minilm={}", minilm_dir().display());
    let cluster = up(&decoder, &["--workers", "2", "--model", &minilm]).expect("tessera up");
    let mut client = connect(&cluster.url).await;

    let models = client.list_models(pb::ListModelsRequest {}).await.expect("list models").into_inner().models;
    let kind = |name: &str| models.iter().find(|m| m.name == name).map(|m| (m.kind, m.tp, m.max_context, m.serving_groups));
    assert_eq!(kind("demo"), Some((pb::ModelKind::Decoder as i32, 1, 4096, 1)), "{models:?}");
    // sentence-transformers' max_seq_length (sentence_bert_config.json), not the 512 positions.
    assert_eq!(kind("minilm"), Some((pb::ModelKind::Encoder as i32, 1, 256, 1)), "{models:?}");

    // Texts, tokenized by the coordinator and cut as sentence-transformers cuts them: the golden
    // ids' lengths and vectors.
    let cases = golden();
    assert!(cases.iter().any(|c| c.truncated), "the golden must hold a text past max_seq_length");
    let texts: Vec<String> = cases.iter().map(|c| c.text.clone()).collect();
    let out = client.embed(embed_texts(texts.clone(), true)).await.expect("embed texts").into_inner().embeddings;
    assert_eq!(out.len(), cases.len());
    for (e, c) in out.iter().zip(&cases) {
        let cos = cosine(&e.values, &c.vector);
        assert!(1.0 - cos <= MAX_ONE_MINUS_COSINE, "1 - cosine = {:e} for {:?}", 1.0 - cos, c.text);
        assert_eq!((e.tokens as usize, e.truncated), (c.ids.len(), c.truncated), "{:?}", c.text);
    }
    // Without truncate, the text past max_seq_length is refused, naming the limit.
    let refused = client.embed(embed_texts(texts, false)).await.expect_err("a text past max_seq_length");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("at most 256"), "{}", refused.message());
    // Token ids as given.
    let by_ids = pb::EmbedRequest {
        model: "minilm".into(),
        token_ids: cases.iter().map(|c| pb::TokenIds { ids: c.ids.clone() }).collect(),
        ..Default::default()
    };
    let out = client.embed(by_ids).await.expect("embed ids").into_inner().embeddings;
    assert_eq!(out.len(), cases.len());
    for (e, c) in out.iter().zip(&cases) {
        assert!(1.0 - cosine(&e.values, &c.vector) <= MAX_ONE_MINUS_COSINE, "ids of {:?}", c.text);
    }

    // One text per request, all at once: the coordinator batches what waits, and each request
    // still gets its own vector.
    let singles = cases.iter().map(|c| {
        let mut client = client.clone();
        let request = embed_texts(vec![c.text.clone()], true);
        async move { client.embed(request).await.expect("concurrent embed").into_inner().embeddings }
    });
    for (out, c) in futures::future::join_all(singles).await.iter().zip(&cases) {
        assert_eq!(out.len(), 1);
        assert!(1.0 - cosine(&out[0].values, &c.vector) <= MAX_ONE_MINUS_COSINE, "concurrent {:?}", c.text);
    }

    // Past the model's 512 positions too: refused, or cut to max_seq_length and reported.
    let long = "tessera ".repeat(600);
    let refused = client.embed(embed_texts(vec![long.clone()], false)).await.expect_err("too long");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("at most 256"), "{}", refused.message());
    let cut = client.embed(embed_texts(vec!["short".into(), long], true)).await.expect("truncate").into_inner().embeddings;
    assert_eq!((cut[0].truncated, cut[1].truncated, cut[1].tokens), (false, true, 256));

    // Each kind refuses the other's call; the decoder still generates.
    let generate_on_encoder = pb::GenerateRequest { model: "minilm".into(), ..greedy(prompt("hello"), 4) };
    let status = generate(&mut client, generate_on_encoder).await.expect_err("Generate on an encoder");
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    let embed_on_decoder = pb::EmbedRequest { model: "demo".into(), ..embed_texts(vec!["hello".into()], false) };
    let status = client.embed(embed_on_decoder).await.expect_err("Embed on a decoder");
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    let text = generate(&mut client, pb::GenerateRequest { model: "demo".into(), ..greedy(prompt("Once upon a time"), 8) })
        .await
        .expect("the decoder generates");
    assert_eq!(text.tokens().len(), 8);
}
