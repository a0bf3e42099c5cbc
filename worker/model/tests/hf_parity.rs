//! TP=1 equals Hugging Face transformers on every fixture: all prompt positions, 32 greedy decode
//! steps, and the greedy tokens themselves — including positions past the original context of
//! each rope-scaled fixture. The golden files in `tests/golden/` were written by
//! `scripts/golden/make_golden.py`; they record the hash of the weights they came from, so a
//! change to the fixture maker cannot silently compare against stale references.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use tessera_model::fixture::{prompt_ids, test_fixtures};

const TOLERANCE: f32 = 1e-4;

struct Golden {
    meta: HashMap<String, String>,
    prompt: Vec<u32>,
    prefill: Vec<Vec<f32>>,
    greedy: Vec<u32>,
    decode: Vec<Vec<f32>>,
}

fn golden(name: &str) -> Golden {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden").join(format!("{name}.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("golden header");
    let meta = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu).expect("golden tensors");
    let ids = |k: &str| -> Vec<u32> { tensors[k].to_vec1::<i64>().unwrap().into_iter().map(|v| v as u32).collect() };
    let rows = |k: &str| -> Vec<Vec<f32>> { tensors[k].to_vec2::<f32>().unwrap() };
    Golden { prompt: ids("prompt_ids"), prefill: rows("prefill_logits"), greedy: ids("greedy_ids"), decode: rows("decode_logits"), meta }
}

fn sha256_hex(path: PathBuf) -> String {
    let digest = Sha256::digest(std::fs::read(&path).expect("fixture file"));
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn tp1_matches_transformers_on_every_fixture() {
    let mut checked = 0;
    for spec in test_fixtures() {
        let g = golden(spec.name);
        let dir = common::fixture_dir(spec.name);
        assert_eq!(
            g.meta.get("model_sha256"),
            Some(&sha256_hex(dir.join("model.safetensors"))),
            "{}: golden made from other weights",
            spec.name
        );
        assert_eq!(
            g.meta.get("config_sha256"),
            Some(&sha256_hex(dir.join("config.json"))),
            "{}: golden made from another config",
            spec.name
        );
        assert_eq!(g.prompt, prompt_ids(&spec));
        let steps = g.greedy.len();
        assert_eq!(steps, 32);

        let ours = common::run_tp(spec.name, 1, &g.prompt, steps).remove(0);
        let pre = common::max_abs_diff(&ours.prefill, &g.prefill);
        let dec = common::max_abs_diff(&ours.decode, &g.decode);
        eprintln!("{}: max abs diff prefill {pre:.2e}, decode {dec:.2e}", spec.name);
        assert!(pre <= TOLERANCE, "{}: prefill max abs diff {pre} vs transformers", spec.name);
        assert!(dec <= TOLERANCE, "{}: decode max abs diff {dec} vs transformers", spec.name);
        assert_eq!(ours.greedy, g.greedy, "{}: greedy continuation differs from transformers", spec.name);
        checked += 1;
    }
    assert_eq!(checked, 8);
}

/// The rope-scaled fixtures were trained (nominally) at 32 positions; the golden run goes to 72.
#[test]
fn rope_scaled_fixtures_reach_past_the_original_context() {
    for name in ["llama-rope-linear", "llama-rope-dynamic", "llama-rope-yarn", "llama-rope-llama3"] {
        let g = golden(name);
        assert!(g.prompt.len() + g.greedy.len() > 64, "{name}: golden stops too early");
    }
}
