//! TP=1 equals Hugging Face transformers on every fixture: all prompt positions, 32 greedy decode
//! steps, and the greedy tokens themselves — including positions past the original context of
//! each rope-scaled fixture. The golden files in `tests/golden/` were written by
//! `scripts/golden/make_golden.py`; they record the hash of the weights they came from, so a
//! change to the fixture maker cannot silently compare against stale references.

mod common;

use std::path::PathBuf;

use common::Golden;

use tessera_model::fixture::{prompt_ids, test_fixtures};

const TOLERANCE: f32 = 1e-4;

fn golden(name: &str) -> Golden {
    common::read_golden(&common::golden_root().join(format!("{name}.safetensors")))
}

fn sha256_hex(path: PathBuf) -> String {
    common::sha256_hex(&path)
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
