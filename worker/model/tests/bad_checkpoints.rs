//! Broken checkpoints fail with typed errors that name the problem, never a panic.

mod common;

use std::path::{Path, PathBuf};

use candle_core::DType;
use tessera_model::fixture::{write_fixture, WriteOptions};
use tessera_model::{LoadConfig, Model, ModelError};

/// A fresh private copy of a fixture that a test may damage.
fn scratch_root(tag: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("bad-{tag}-{}", std::process::id()))
}

fn scratch(name: &str, tag: &str) -> PathBuf {
    let root = scratch_root(tag);
    let _ = std::fs::remove_dir_all(&root);
    write_fixture(&common::spec(name), &root, &WriteOptions::default()).expect("write fixture")
}

fn load(dir: &Path, tp_rank: usize, tp_size: usize) -> Result<Model, ModelError> {
    Model::load(dir, &LoadConfig { tp_rank, tp_size, ..LoadConfig::default() })
}

/// Rewrites `model.safetensors` without `drop` and with `reshape` applied to one tensor.
fn rewrite(dir: &Path, drop: Option<&str>, reshape: Option<(&str, Vec<usize>)>) {
    let path = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).expect("read back");
    if let Some(name) = drop {
        assert!(tensors.remove(name).is_some(), "fixture has {name}");
    }
    if let Some((name, shape)) = reshape {
        let t = tensors.get(name).expect("tensor to reshape");
        let n: usize = shape.iter().product();
        let flat = t.flatten_all().unwrap().narrow(0, 0, n).unwrap();
        tensors.insert(name.to_string(), flat.reshape(shape).unwrap());
    }
    candle_core::safetensors::save(&tensors, &path).expect("write back");
}

#[test]
fn missing_tensor_is_named() {
    let dir = scratch("llama-gqa", "missing");
    rewrite(&dir, Some("model.layers.1.mlp.up_proj.weight"), None);
    match load(&dir, 0, 1) {
        Err(ModelError::MissingTensor { name }) => assert_eq!(name, "model.layers.1.mlp.up_proj.weight"),
        other => panic!("expected MissingTensor, got {:?}", other.err()),
    }
}

#[test]
fn wrong_shape_is_named_with_both_shapes() {
    let dir = scratch("llama-gqa", "shape");
    rewrite(&dir, None, Some(("model.layers.0.self_attn.k_proj.weight", vec![16, 64])));
    match load(&dir, 0, 2) {
        Err(ModelError::TensorShape { name, expected, actual }) => {
            assert_eq!(name, "model.layers.0.self_attn.k_proj.weight");
            assert_eq!((expected, actual), (vec![32, 64], vec![16, 64]));
        }
        other => panic!("expected TensorShape, got {:?}", other.err()),
    }
}

#[test]
fn heads_not_divisible_by_tp_are_refused() {
    let dir = common::fixture_dir("llama-gqa");
    match load(&dir, 0, 3) {
        Err(ModelError::UnevenSplit { what, size, tp }) => assert_eq!((what, size, tp), ("num_attention_heads", 4, 3)),
        other => panic!("expected UnevenSplit, got {:?}", other.err()),
    }
    // 4 query heads split over 4 ranks, but 2 KV heads cannot serve tp=8 and 4 heads cannot either.
    assert!(matches!(load(&dir, 0, 8), Err(ModelError::UnevenSplit { .. })));
    assert!(matches!(load(&dir, 4, 4), Err(ModelError::InvalidConfig(_))), "rank outside the group");
}

#[test]
fn unknown_rope_type_is_named() {
    let dir = scratch("llama-gqa", "rope");
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "su", "factor": 2.0});
    std::fs::write(&path, cfg.to_string()).unwrap();
    match load(&dir, 0, 1) {
        Err(e @ ModelError::UnsupportedRopeType(_)) => assert!(e.to_string().contains("\"su\""), "{e}"),
        other => panic!("expected UnsupportedRopeType, got {:?}", other.err()),
    }
}

#[test]
fn truncated_safetensors_file_is_an_error() {
    let dir = scratch("llama-gqa", "truncated");
    let path = dir.join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len / 2).unwrap();
    drop(file);
    match load(&dir, 0, 1) {
        Err(e @ ModelError::Safetensors { .. }) => assert!(e.to_string().contains("safetensors"), "{e}"),
        other => panic!("expected Safetensors error, got {:?}", other.err()),
    }
    // A file cut inside its header fails the same way.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(5).unwrap();
    drop(file);
    assert!(matches!(load(&dir, 0, 1), Err(ModelError::Safetensors { .. })));
}

/// Replaces `model.safetensors` with an 8-byte header length and then `rest`.
fn hostile_safetensors(dir: &Path, header_len: u64, rest: &[u8]) {
    let mut bytes = header_len.to_le_bytes().to_vec();
    bytes.extend_from_slice(rest);
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
}

#[test]
fn hostile_safetensors_headers_are_errors() {
    let dir = scratch("llama-gqa", "hostile");
    // Header lengths past the file, over the safetensors crate's 100 MB cap, and at u64::MAX:
    // refused before anything of that size is read or allocated.
    for header_len in [64, 200 << 20, u64::MAX] {
        hostile_safetensors(&dir, header_len, b"{}");
        assert!(matches!(load(&dir, 0, 1), Err(ModelError::Safetensors { .. })), "header length {header_len}");
    }
    // A header whose tensor data lies past the end of the file, or whose offsets overlap.
    for header in [
        r#"{"w":{"dtype":"F32","shape":[1024,1024],"data_offsets":[0,4194304]}}"#,
        r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"v":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
        r#"{"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}}"#,
        r#"not json"#,
    ] {
        let mut rest = header.as_bytes().to_vec();
        rest.extend_from_slice(&[0u8; 16]);
        hostile_safetensors(&dir, header.len() as u64, &rest);
        assert!(matches!(load(&dir, 0, 1), Err(ModelError::Safetensors { .. })), "{header}");
    }
}

#[test]
fn missing_weights_file_is_an_io_error() {
    let dir = scratch("llama-gqa", "nofile");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert!(matches!(load(&dir, 0, 1), Err(ModelError::Io { .. })));
}

/// Seeded mutation fuzzing of the safetensors header a checkpoint starts with (its length
/// prefix and JSON: names, dtypes, shapes, offsets), joined to the fixture's real data: every
/// load ends in a model or a typed error, never a panic or an allocation the file does not
/// justify. 100,000 inputs like every other target (`TESSERA_FUZZ_INPUTS` changes it), each a
/// full load: about 50 s on two cores in the test profile.
#[test]
fn hostile_safetensors_headers_load_or_fail() {
    // Each input rewrites the checkpoint, so it is kept small (one layer, bf16) and in memory
    // where the machine has a tmpfs: the run then costs copies, not a disk's page-cache churn.
    let shm = Path::new("/dev/shm");
    let root = if shm.is_dir() { shm.join(format!("tessera-bad-fuzz-{}", std::process::id())) } else { scratch_root("fuzz") };
    let _ = std::fs::remove_dir_all(&root);
    let mut spec = common::spec("llama-gqa");
    spec.config["num_hidden_layers"] = 1.into();
    let dir = write_fixture(&spec, &root, &WriteOptions { dtype: DType::BF16, files: 1 }).expect("write fixture");
    let path = dir.join("model.safetensors");
    let file = std::fs::read(&path).expect("read checkpoint");
    let header_len = u64::from_le_bytes(file[..8].try_into().expect("length prefix")) as usize;
    let (header, data) = file.split_at(8 + header_len);
    let campaign = tessera_mutate::Campaign::new("safetensors header");
    let inputs = std::env::var("TESSERA_FUZZ_INPUTS").ok().and_then(|v| v.parse().ok()).unwrap_or(tessera_mutate::DEFAULT_INPUTS);
    let loaded = campaign.inputs(inputs).run(&[header.to_vec()], |header| {
        std::fs::write(&path, [header, data].concat()).expect("write checkpoint");
        load(&dir, 0, 1).is_ok()
    });
    let _ = std::fs::remove_dir_all(&root);
    assert!(loaded > 0, "the valid header loads");
}
