//! Checkpoint variants load to the same model: multi-file with an index, and bf16/f16 weights.

mod common;

use std::path::PathBuf;

use candle_core::DType;
use tessera_collective::SingleRank;
use tessera_model::fixture::{prompt_ids, write_fixture, WriteOptions};
use tessera_model::{LoadConfig, Model};

fn write(name: &str, tag: &str, opts: WriteOptions) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("load-{tag}-{}", std::process::id()));
    write_fixture(&common::spec(name), &root, &opts).expect("write fixture")
}

#[test]
fn multi_file_checkpoint_equals_single_file() {
    for name in ["llama-gqa", "qwen2-tied"] {
        let dir = write(name, "multi", WriteOptions { files: 3, ..WriteOptions::default() });
        assert!(dir.join("model.safetensors.index.json").exists());
        assert!(!dir.join("model.safetensors").exists());
        let prompt = prompt_ids(&common::spec(name));
        let single = common::run_tp(name, 1, &prompt, 8).remove(0);
        for (rank, tp) in [(0, 1), (1, 2)] {
            let model = Model::load(&dir, &LoadConfig { tp_rank: rank, tp_size: tp, ..LoadConfig::default() }).unwrap();
            if tp == 1 {
                let multi = common::run_trace(&model, &mut SingleRank, &prompt, 8);
                assert_eq!(multi.prefill, single.prefill, "{name}: same weights, same bits");
                assert_eq!(multi.greedy, single.greedy);
            } else {
                assert_eq!(model.layout().heads, 2);
            }
        }
    }
}

/// Half-precision weights computed in half precision stay close to f32 and mostly agree on
/// greedy tokens; the exact numbers are reported by the dtype benchmark.
#[test]
fn half_precision_checkpoints_track_f32() {
    let name = "llama-gqa";
    let prompt = prompt_ids(&common::spec(name));
    let reference = common::run_tp(name, 1, &prompt, 8).remove(0);
    let scale = reference.prefill.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    for (dtype, tol) in [(DType::BF16, 0.05), (DType::F16, 0.01)] {
        // Weights stored in the half type, loaded and run in it.
        let dir = write(name, &format!("{dtype:?}"), WriteOptions { dtype, ..WriteOptions::default() });
        let model = Model::load(&dir, &LoadConfig { dtype, ..LoadConfig::default() }).unwrap();
        let t = common::run_trace(&model, &mut SingleRank, &prompt, 8);
        let d = common::max_abs_diff(&t.prefill, &reference.prefill) / scale;
        assert!(d <= tol, "{dtype:?}: prefill max abs diff / max |logit| = {d} > {tol}");
        // f32 weights loaded as the half type give the same as half weights on disk.
        let f32_dir = common::fixture_dir(name);
        let converted = Model::load(&f32_dir, &LoadConfig { dtype, ..LoadConfig::default() }).unwrap();
        let c = common::run_trace(&converted, &mut SingleRank, &prompt, 8);
        assert_eq!(c.prefill, t.prefill, "{dtype:?}: conversion on load equals conversion on write");
    }
}
