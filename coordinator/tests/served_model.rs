//! What the coordinator reads from a model directory agrees with the model crate: context
//! length (including dynamic-NTK scaling), end-of-sequence ids and vocabulary size.

use tessera_coordinator::model::{ModelSpec, ServedModel};
use tessera_model::fixture::{demo, test_fixtures, write_fixture, WriteOptions};
use tessera_model::ModelConfig;

fn spec(dir: std::path::PathBuf, max_context: Option<usize>) -> ModelSpec {
    ModelSpec { name: "m".into(), dir, tp: 1, dtype: "f32".into(), max_context }
}

#[test]
fn context_eos_and_vocabulary_match_the_model_crate() {
    let root = tempfile::tempdir().expect("temp dir");
    let mut checked = 0;
    for fixture in test_fixtures().into_iter().chain([demo()]) {
        let dir = write_fixture(&fixture, root.path(), &WriteOptions::default()).expect("write fixture");
        let config = ModelConfig::from_json_bytes(&std::fs::read(dir.join("config.json")).expect("config")).expect("parse");
        let served = ServedModel::load(spec(dir, None)).expect("load");
        assert_eq!(served.max_context, config.max_context(), "{}", fixture.name);
        assert_eq!(served.eos, config.eos_token_ids, "{}", fixture.name);
        assert_eq!(served.vocab_size, config.vocab_size, "{}", fixture.name);
        checked += 1;
    }
    assert_eq!(checked, test_fixtures().len() + 1);
}

#[test]
fn dynamic_ntk_reaches_factor_times_further() {
    let root = tempfile::tempdir().expect("temp dir");
    let fixture = test_fixtures().into_iter().find(|f| f.name == "llama-rope-dynamic").expect("dynamic fixture");
    let dir = write_fixture(&fixture, root.path(), &WriteOptions::default()).expect("write fixture");
    let served = ServedModel::load(spec(dir, None)).expect("load");
    let positions = fixture.config["max_position_embeddings"].as_u64().expect("positions") as usize;
    assert!(served.max_context > positions, "dynamic scaling must extend {positions}, got {}", served.max_context);
}

#[test]
fn an_operator_may_allow_longer_sequences_but_not_a_useless_limit() {
    let root = tempfile::tempdir().expect("temp dir");
    let dir = write_fixture(&demo(), root.path(), &WriteOptions::default()).expect("write fixture");
    assert_eq!(ServedModel::load(spec(dir.clone(), Some(10_000))).expect("load").max_context, 10_000);
    let refused = ServedModel::load(spec(dir, Some(1))).expect_err("no room to generate");
    assert!(refused.to_string().contains("leaves no room"), "{refused}");
}

#[test]
fn a_tp_degree_the_model_cannot_split_over_is_refused_at_start() {
    let root = tempfile::tempdir().expect("temp dir");
    let dir = write_fixture(&demo(), root.path(), &WriteOptions::default()).expect("write fixture");
    let with_tp = |tp| ModelSpec { tp, ..spec(dir.clone(), None) };
    for tp in [1, 2, 4] {
        ServedModel::load(with_tp(tp)).unwrap_or_else(|e| panic!("tp {tp}: {e}"));
    }
    // The demo model has 4 attention heads, as the model crate's own split check also says.
    let refused = ServedModel::load(with_tp(3)).expect_err("4 heads over 3 ranks");
    assert!(refused.to_string().contains("cannot split num_attention_heads = 4 evenly over tensor-parallel size 3"), "{refused}");
}

/// The workers' quantized formats pass the coordinator's check; anything else is refused when
/// the model is configured, not when a worker tries to load it.
#[test]
fn quantized_dtypes_are_accepted_and_unknown_ones_refused() {
    let root = tempfile::tempdir().expect("temp dir");
    let fixture = test_fixtures().into_iter().next().expect("a fixture");
    let dir = write_fixture(&fixture, root.path(), &WriteOptions::default()).expect("write fixture");
    for dtype in ["q8_0", "q4_k"] {
        let spec = ModelSpec { dtype: dtype.into(), ..spec(dir.clone(), None) };
        ServedModel::load(spec).unwrap_or_else(|e| panic!("{dtype}: {e}"));
    }
    let spec = ModelSpec { dtype: "q5_0".into(), ..spec(dir, None) };
    assert!(ServedModel::load(spec).is_err(), "q5_0 accepted");
}
