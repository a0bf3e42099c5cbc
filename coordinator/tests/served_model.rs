//! What the coordinator reads from a model directory agrees with the model crate: context
//! length (including dynamic-NTK scaling), end-of-sequence ids and vocabulary size.

use tessera_coordinator::model::{ModelSpec, ServedModel};
use tessera_model::fixture::{demo, test_fixtures, write_fixture, WriteOptions};
use tessera_model::ModelConfig;

fn spec(dir: std::path::PathBuf, max_context: Option<usize>) -> ModelSpec {
    ModelSpec { name: "m".into(), dir, tp: 1, dtype: "f32".into(), max_context, batch_invariant: false }
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

fn refusal(spec: ModelSpec) -> String {
    match ServedModel::load(spec) {
        Ok(_) => panic!("the model was accepted"),
        Err(e) => e.to_string(),
    }
}

/// A config with `architectures` removed, as some tools save it: `model_type` names the family,
/// as transformers reads it. With neither, or an unknown one, the reason is given at start.
#[test]
fn configs_name_the_family_by_architectures_or_model_type() {
    let root = tempfile::tempdir().expect("temp dir");
    let fixture = test_fixtures().into_iter().next().expect("fixture");
    let dir = write_fixture(&fixture, root.path(), &WriteOptions::default()).expect("write fixture");
    let path = dir.join("config.json");
    let original: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("parse");
    let write = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut config = original.clone();
        edit(config.as_object_mut().expect("object"));
        std::fs::write(&path, config.to_string()).expect("write");
    };
    write(&|c| {
        c.remove("architectures");
        c.insert("model_type".into(), "llama".into());
    });
    ServedModel::load(spec(dir.clone(), None)).expect("model_type alone names the family");
    write(&|c| {
        c.remove("architectures");
        c.remove("model_type");
    });
    let why = refusal(spec(dir.clone(), None));
    assert!(why.contains("neither `architectures` nor `model_type`"), "{why}");
    write(&|c| {
        c.insert("architectures".into(), serde_json::json!(["GPTNeoXForCausalLM"]));
    });
    let why = refusal(spec(dir.clone(), None));
    assert!(why.contains("unsupported architecture") && why.contains("GPTNeoXForCausalLM"), "{why}");
}

#[test]
fn a_template_that_always_raises_is_refused_at_start() {
    let root = tempfile::tempdir().expect("temp dir");
    let fixture = test_fixtures().into_iter().next().expect("fixture");
    let dir = write_fixture(&fixture, root.path(), &WriteOptions::default()).expect("write fixture");
    std::fs::write(dir.join("chat_template.jinja"), "{{ raise_exception('this template is broken') }}").expect("write");
    let why = refusal(spec(dir, None));
    assert!(why.contains("chat_template.jinja") && why.contains("this template is broken"), "{why}");
}

/// Broken GGUF files are refused with what is wrong, before any worker is asked to load them.
#[test]
fn broken_gguf_files_are_refused_at_start() {
    let real = std::fs::read(tessera_model::fixture::smollm2_gguf()).expect("read SmolLM2");
    let root = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, bytes: &[u8]| {
        let path = root.path().join(name);
        std::fs::write(&path, bytes).expect("write");
        path
    };
    // The file itself loads.
    let served = ServedModel::load(spec(write("whole.gguf", &real), None)).expect("SmolLM2 GGUF");
    assert_eq!(served.eos, vec![2]);
    assert!(served.chat.is_some(), "the GGUF's chat template");

    // Cut inside the metadata, and cut inside the tensor data.
    let why = refusal(spec(write("header.gguf", &real[..64 << 10]), None));
    assert!(why.contains("invalid GGUF file"), "{why}");
    let why = refusal(spec(write("data.gguf", &real[..real.len() / 2]), None));
    assert!(why.contains("truncated"), "{why}");

    // A tensor type Tessera has no kernel for (16: IQ2_XXS): its info's type field follows the
    // name, the dimension count and the dimensions.
    let mut patched = real.clone();
    let name = b"token_embd.weight";
    let at = patched.windows(name.len()).position(|w| w == name).expect("tensor info") + name.len();
    let dims = u32::from_le_bytes(patched[at..at + 4].try_into().expect("4 bytes")) as usize;
    let ty = at + 4 + 8 * dims;
    patched[ty..ty + 4].copy_from_slice(&16u32.to_le_bytes());
    let why = refusal(spec(write("iq2.gguf", &patched), None));
    assert!(why.contains("invalid GGUF file") && why.contains("16"), "{why}");

    // Named as a file that is not GGUF.
    let why = refusal(spec(write("model.bin", b"not a model"), None));
    assert!(why.contains("not a .gguf file"), "{why}");
}

/// `generation_config.json`'s sampling settings become the model's defaults; values a request
/// could not use are refused at start, naming the file.
#[test]
fn generation_config_sampling_defaults_are_read_and_checked_at_start() {
    let root = tempfile::tempdir().expect("temp dir");
    let dir = write_fixture(&demo(), root.path(), &WriteOptions::default()).expect("write fixture");
    assert_eq!(ServedModel::load(spec(dir.clone(), None)).expect("load").sampling_defaults, Default::default());
    let path = dir.join("generation_config.json");
    std::fs::write(&path, r#"{"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}"#).expect("write");
    let d = ServedModel::load(spec(dir.clone(), None)).expect("load").sampling_defaults;
    assert_eq!((d.temperature, d.top_k, d.top_p, d.repetition_penalty), (Some(0.7), Some(20), Some(0.8), Some(1.05)));
    for (text, message) in [
        (r#"{"temperature": -1}"#, "temperature must be a finite number >= 0"),
        (r#"{"top_p": 1.5}"#, "top_p must be in (0, 1]"),
        (r#"{"repetition_penalty": 0}"#, "repetition_penalty must be a finite number > 0"),
        (r#"{"top_k": "many"}"#, "top_k is \"many\", not a number"),
    ] {
        std::fs::write(&path, text).expect("write");
        let why = refusal(spec(dir.clone(), None));
        assert!(why.contains("generation_config.json") && why.contains(message), "{text}: {why}");
    }
}
