//! `EmbedRequest` validation against an encoder (all-MiniLM-L6-v2 from `scripts/setup.sh`) and
//! a decoder: caps, kinds, truncation (to sentence-transformers' `max_seq_length`) only when
//! asked and reported, `[SEP]` kept when cutting.

use std::path::PathBuf;
use std::sync::Arc;

use tessera_coordinator::embed::{cap_at_max_seq_length, prepare_embed};
use tessera_coordinator::model::{ModelKind, ModelSpec, ServedModel};
use tessera_coordinator::{CoordinatorError, Limits};
use tessera_model::fixture::{demo, minilm_dir, write_fixture, WriteOptions};
use tessera_proto::v1 as pb;

/// A served model as the coordinator loads it.
fn served(name: &str, dir: PathBuf, tp: usize) -> Result<ServedModel, CoordinatorError> {
    ServedModel::load(ModelSpec { name: name.into(), dir, tp, dtype: "f32".into(), max_context: None, batch_invariant: false })
        .and_then(cap_at_max_seq_length)
}

fn texts(model: &str, texts: &[&str], truncate: bool) -> pb::EmbedRequest {
    pb::EmbedRequest { model: model.into(), texts: texts.iter().map(|t| t.to_string()).collect(), token_ids: Vec::new(), truncate }
}

fn invalid(r: Result<impl std::fmt::Debug, CoordinatorError>) -> String {
    match r {
        Err(CoordinatorError::InvalidArgument(m)) => m,
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[test]
fn embed_requests_are_checked_tokenized_and_cut_only_when_asked() {
    let root = tempfile::tempdir().expect("temp dir");
    let decoder = write_fixture(&demo(), root.path(), &WriteOptions::default()).expect("demo");
    let encoder = served("minilm", minilm_dir(), 1).expect("load MiniLM");
    assert_eq!(encoder.kind, ModelKind::Encoder);
    // sentence_bert_config.json's max_seq_length, not the 512 positions.
    assert_eq!(encoder.max_context, 256);
    let models = vec![Arc::new(encoder), Arc::new(served("demo", decoder, 1).expect("load demo"))];
    let limits = Limits::default();

    // tokenizer.json's fixed 128-token padding and truncation are off.
    let ok = prepare_embed(texts("minilm", &["Hello world!", "你好"], false), &models, &limits).expect("prepare");
    assert_eq!(ok.inputs[0], vec![101, 7592, 2088, 999, 102]);
    assert_eq!((ok.inputs[1].first(), ok.inputs[1].last()), (Some(&101), Some(&102)));
    let long = "word ".repeat(254);
    assert_eq!(prepare_embed(texts("minilm", &[&long], false), &models, &limits).expect("254 words").inputs[0].len(), 256);

    // Past max_seq_length but within the positions: refused, naming the limit, unless cut.
    let longer = "word ".repeat(300);
    let m = invalid(prepare_embed(texts("minilm", &[&longer], false), &models, &limits));
    assert!(m.contains("302 tokens") && m.contains("at most 256") && m.contains("truncate"), "{m}");
    let cut = prepare_embed(texts("minilm", &["short", &longer], true), &models, &limits).expect("truncate");
    assert_eq!(cut.truncated, vec![false, true]);
    assert_eq!(cut.inputs[1].len(), 256);
    assert_eq!((cut.inputs[1][0], cut.inputs[1][255]), (101, 102), "[CLS] … [SEP] survive the cut");

    let ids = |lists: Vec<Vec<u32>>, truncate: bool| pb::EmbedRequest {
        model: "minilm".into(),
        token_ids: lists.into_iter().map(|ids| pb::TokenIds { ids }).collect(),
        truncate,
        ..Default::default()
    };
    assert!(invalid(prepare_embed(ids(vec![vec![101, 30522, 102]], false), &models, &limits)).contains("30522"));
    assert!(invalid(prepare_embed(ids(vec![vec![]], false), &models, &limits)).contains("empty"));
    let cut = prepare_embed(ids(vec![vec![7; 300]], true), &models, &limits).expect("cut ids");
    assert_eq!((cut.inputs[0].len(), cut.truncated[0]), (256, true));

    let both = pb::EmbedRequest { token_ids: vec![pb::TokenIds { ids: vec![101, 102] }], ..texts("minilm", &["a"], false) };
    assert!(invalid(prepare_embed(both, &models, &limits)).contains("either"));
    assert!(invalid(prepare_embed(texts("minilm", &[], false), &models, &limits)).contains("either"));
    let many: Vec<&str> = vec!["a"; limits.max_embed_inputs + 1];
    assert!(invalid(prepare_embed(texts("minilm", &many, false), &models, &limits)).contains("limit"));
    let big = "a".repeat(limits.max_embed_bytes + 1);
    assert!(invalid(prepare_embed(texts("minilm", &[&big], true), &models, &limits)).contains("bytes"));
    assert!(invalid(prepare_embed(texts("demo", &["a"], false), &models, &limits)).contains("decoder"));
    assert!(matches!(prepare_embed(texts("nope", &["a"], false), &models, &limits), Err(CoordinatorError::NotFound(_))));
}

#[test]
fn an_encoder_runs_on_one_rank_within_its_positions() {
    assert!(matches!(served("minilm", minilm_dir(), 2), Err(CoordinatorError::Model { .. })));
    let spec =
        ModelSpec { name: "m".into(), dir: minilm_dir(), tp: 1, dtype: "f32".into(), max_context: Some(1024), batch_invariant: false };
    assert!(matches!(ServedModel::load(spec), Err(CoordinatorError::Model { .. })));
}
