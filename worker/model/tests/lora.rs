//! LoRA adapters: Tessera equals PEFT, tensor parallelism equals one rank, a batch that mixes
//! adapters equals each request alone, and adapters that do not fit are refused with the reason.
//!
//! The adapters and their goldens in `tests/golden/lora/` were written by
//! `scripts/golden/make_lora_golden.py` (PEFT on the base fixtures, random A and B, rank 8 and
//! 16); each golden records the hashes of the base weights and of the adapter it came from.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::{sha256_hex, Golden};

use candle_core::{DType, Tensor};
use tessera_collective::{Collective, InProcessGroup, SingleRank};
use tessera_model::fixture::{max_rel_diff, prompt_ids};
use tessera_model::{Adapter, Batch, LoadConfig, LogitsMode, Model, ModelError, Numerics, SeqChunk};

const TOLERANCE: f32 = 1e-4;

/// (adapter, base fixture) as the golden script's table has them.
const ADAPTERS: [(&str, &str); 5] = [
    ("r8-attn", "llama-gqa"),
    ("r16-all-rslora", "llama-gqa"),
    ("r8-mlp", "llama-gqa"),
    ("r8-qv", "qwen2-tied"),
    ("r16-all", "qwen2-tied"),
];

fn golden_dir() -> PathBuf {
    common::golden_root().join("lora")
}

fn adapter_dir(name: &str) -> PathBuf {
    golden_dir().join(name)
}

fn golden(name: &str) -> Golden {
    common::read_golden(&golden_dir().join(format!("{name}.safetensors")))
}

/// Every adapter at TP=1 against PEFT: all prompt positions, 32 cached decode steps, the tokens.
#[test]
fn tp1_matches_peft_on_every_adapter() {
    for (adapter, base) in ADAPTERS {
        let g = golden(adapter);
        let dir = common::fixture_dir(base);
        assert_eq!(g.meta.get("fixture").map(String::as_str), Some(base));
        assert_eq!(g.meta.get("model_sha256"), Some(&sha256_hex(&dir.join("model.safetensors"))), "{adapter}: other base weights");
        assert_eq!(g.meta.get("config_sha256"), Some(&sha256_hex(&dir.join("config.json"))), "{adapter}: other base config");
        let weights = adapter_dir(adapter).join("adapter_model.safetensors");
        assert_eq!(g.meta.get("adapter_sha256"), Some(&sha256_hex(&weights)), "{adapter}: golden made from another adapter");
        assert_eq!(g.prompt, prompt_ids(&common::spec(base)));

        let ours =
            common::run_tp_adapted(&dir, &LoadConfig::default(), 1, &g.prompt, g.greedy.len(), Some(&adapter_dir(adapter))).remove(0);
        let pre = common::max_abs_diff(&ours.prefill, &g.prefill);
        let dec = common::max_abs_diff(&ours.decode, &g.decode);
        eprintln!("{adapter} on {base}: max abs diff prefill {pre:.2e}, decode {dec:.2e}");
        assert!(pre <= TOLERANCE, "{adapter}: prefill max abs diff {pre} vs PEFT");
        assert!(dec <= TOLERANCE, "{adapter}: decode max abs diff {dec} vs PEFT");
        assert_eq!(ours.greedy, g.greedy, "{adapter}: greedy tokens differ from PEFT");

        // The adapter is not a no-op: without it the logits are far from PEFT's.
        let plain = common::run_tp_adapted(&dir, &LoadConfig::default(), 1, &g.prompt, 0, None).remove(0);
        let off = common::max_abs_diff(&plain.prefill, &g.prefill);
        assert!(off > 1e-2, "{adapter}: the base alone is within {off} of the adapted golden");
    }
}

/// TP=2 splits A or B like the base layer; every rank's logits equal TP=1's and PEFT's tokens.
#[test]
fn tp2_equals_tp1_with_an_adapter() {
    for adapter in ["r16-all-rslora", "r8-attn", "r8-mlp"] {
        let g = golden(adapter);
        let dir = common::fixture_dir("llama-gqa");
        let ranks = common::run_tp_adapted(&dir, &LoadConfig::default(), 2, &g.prompt, 16, Some(&adapter_dir(adapter)));
        assert_eq!(ranks.len(), 2);
        for (rank, t) in ranks.iter().enumerate() {
            let pre = max_rel_diff(&t.prefill, &g.prefill);
            let dec = max_rel_diff(&t.decode, &g.decode[..16]);
            assert!(pre <= TOLERANCE && dec <= TOLERANCE, "{adapter} rank {rank}: rel diff prefill {pre}, decode {dec}");
            assert_eq!(t.greedy, g.greedy[..16], "{adapter} rank {rank}: tokens differ");
        }
    }
}

/// Per sequence: prompt, adapter (index into the loaded three, or the base).
fn mixed_requests() -> Vec<(Vec<u32>, Option<usize>)> {
    (0..8u32)
        .map(|i| {
            let prompt = (0..5 + i as usize).map(|j| (i * 37 + j as u32 * 11 + 3) % 250 + 1).collect();
            let adapter = [Some(0), Some(1), None, Some(2), Some(1), Some(0), None, Some(2)][i as usize];
            (prompt, adapter)
        })
        .collect()
}

const MIXED_STEPS: usize = 8;

/// Runs the requests as one batch per step (all prefills in one pass, then batched decode), or
/// each alone; returns per request its logits rows (the prefill's last, then each step's).
/// Without `adapters` every request runs on the base.
fn run_mixed(model: &Model, comm: &mut dyn Collective, adapters: Option<&[Adapter]>, together: bool) -> Vec<Vec<Vec<f32>>> {
    let requests = mixed_requests();
    let groups: Vec<Vec<usize>> =
        if together { vec![(0..requests.len()).collect()] } else { (0..requests.len()).map(|i| vec![i]).collect() };
    let mut out = vec![Vec::new(); requests.len()];
    for members in groups {
        let mut kv = model.new_kv_cache();
        let chosen: Vec<Option<&Adapter>> = members.iter().map(|&i| requests[i].1.zip(adapters).map(|(a, all)| &all[a])).collect();
        let mut fed: Vec<Vec<u32>> = members.iter().map(|&i| requests[i].0.clone()).collect();
        let mut lens = vec![0; members.len()];
        for _ in 0..=MIXED_STEPS {
            let tokens: Vec<u32> = fed.iter().flatten().copied().collect();
            let chunks: Vec<SeqChunk> =
                members.iter().zip(&fed).zip(&lens).map(|((&i, f), &start)| SeqChunk { seq: i as u64, start, len: f.len() }).collect();
            let logits = model
                .forward_adapted(&Batch { tokens: &tokens, chunks: &chunks }, &chosen, &mut kv, comm, LogitsMode::LastPerChunk)
                .expect("forward");
            for (k, row) in logits.to_vec2::<f32>().unwrap().into_iter().enumerate() {
                lens[k] += fed[k].len();
                fed[k] = vec![tessera_model::sampler::argmax(&row)];
                out[members[k]].push(row);
            }
        }
    }
    out
}

fn load_three(model: &Model) -> Vec<Adapter> {
    ["r8-attn", "r16-all-rslora", "r8-mlp"].iter().map(|a| model.load_adapter(a, &adapter_dir(a)).expect("adapter loads")).collect()
}

/// Eight requests over three adapters and the base in one batch give each request's tokens run
/// alone: bit for bit under batch-invariant numerics, within 1e-5 with the fast kernels (which
/// may pick another product kernel for another batch size).
#[test]
fn a_batch_mixing_three_adapters_and_the_base_equals_each_request_alone() {
    let dir = common::fixture_dir("llama-gqa");
    for numerics in [Numerics::BatchInvariant, Numerics::Fast] {
        let model = Model::load(&dir, &LoadConfig { numerics, ..LoadConfig::default() }).unwrap();
        let adapters = load_three(&model);
        let alone = run_mixed(&model, &mut SingleRank, Some(&adapters), false);
        let together = run_mixed(&model, &mut SingleRank, Some(&adapters), true);
        let base = run_mixed(&model, &mut SingleRank, None, true);
        for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
            let diff = common::max_abs_diff(a, t);
            match numerics {
                Numerics::BatchInvariant => assert_eq!(diff, 0.0, "request {i}: batched logits differ from alone"),
                Numerics::Fast => assert!(diff <= 1e-5, "request {i}: batched logits differ from alone by {diff}"),
            }
            let tokens = |rows: &[Vec<f32>]| rows.iter().map(|r| tessera_model::sampler::argmax(r)).collect::<Vec<_>>();
            assert_eq!(tokens(a), tokens(t), "request {i}: tokens differ");
            // Each row really took its adapter: adapted requests part from the base, the others
            // equal it.
            let from_base = common::max_abs_diff(&t[..1], &base[i][..1]);
            match mixed_requests()[i].1 {
                Some(_) => assert!(from_base > 1e-2, "request {i}: its adapter changed the logits by only {from_base}"),
                None if numerics == Numerics::BatchInvariant => assert_eq!(from_base, 0.0, "request {i}: the base row moved"),
                None => assert!(from_base <= 1e-5, "request {i}: the base row moved by {from_base}"),
            }
        }
    }
}

/// The same mixed batch at TP=2 equals TP=1.
#[test]
fn a_mixed_batch_at_tp2_equals_tp1() {
    let dir = common::fixture_dir("llama-gqa");
    let one = {
        let model = Model::load(&dir, &LoadConfig::default()).unwrap();
        run_mixed(&model, &mut SingleRank, Some(&load_three(&model)), true)
    };
    let comms = InProcessGroup::new(2);
    let ranks: Vec<_> = std::thread::scope(|s| {
        let dir = &dir;
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, mut comm)| {
                s.spawn(move || {
                    let model = Model::load(dir, &LoadConfig { tp_rank: rank, tp_size: 2, ..LoadConfig::default() }).unwrap();
                    let adapters = load_three(&model);
                    run_mixed(&model, &mut comm, Some(&adapters), true)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, two) in ranks.iter().enumerate() {
        for (i, (a, b)) in one.iter().zip(two).enumerate() {
            let diff = max_rel_diff(a, b);
            assert!(diff <= TOLERANCE, "rank {rank} request {i}: rel diff {diff} from TP=1");
        }
    }
}

/// A copy of a golden adapter in a temporary directory, its config and tensors changed by `edit`.
fn broken_adapter(root: &Path, name: &str, from: &str, edit: impl FnOnce(&mut serde_json::Value, &mut HashMap<String, Tensor>)) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let src = adapter_dir(from);
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(src.join("adapter_config.json")).unwrap()).unwrap();
    let mut tensors = candle_core::safetensors::load(src.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    edit(&mut config, &mut tensors);
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    dir
}

/// Adapters that do not fit the base, or use what is not implemented, are refused with the
/// reason, and nothing panics.
#[test]
fn bad_adapters_are_refused_with_the_reason() {
    let root = tempfile::tempdir().unwrap();
    let model = Model::load(&common::fixture_dir("llama-gqa"), &LoadConfig::default()).unwrap();
    let a = |k: &str| format!("base_model.model.model.layers.0.self_attn.q_proj.lora_{k}.weight");
    let cases: Vec<(PathBuf, &str)> = vec![
        (broken_adapter(root.path(), "rank", "r8-attn", |c, _| c["r"] = 4.into()), "rank r = 4"),
        (broken_adapter(root.path(), "other-base", "r16-all", |_, _| ()), "expected [32, 16]"),
        (
            broken_adapter(root.path(), "embedding", "r8-attn", |_, t| {
                t.insert(
                    "base_model.model.model.embed_tokens.lora_embedding_A".into(),
                    Tensor::zeros((8, 320), DType::F32, &candle_core::Device::Cpu).unwrap(),
                );
            }),
            "is not a LoRA A or B",
        ),
        (
            broken_adapter(root.path(), "target", "r8-attn", |c, _| c["target_modules"] = serde_json::json!(["q_proj", "lm_head"])),
            "target module \"lm_head\"",
        ),
        (
            broken_adapter(root.path(), "module", "r8-attn", |_, t| {
                let w = t.remove(&a("A")).unwrap();
                t.insert(a("A").replace("q_proj", "rotary_emb"), w);
            }),
            "targets \"self_attn.rotary_emb\"",
        ),
        (broken_adapter(root.path(), "no-b", "r8-attn", |_, t| drop(t.remove(&a("B")))), "has no matching"),
        (
            broken_adapter(root.path(), "layer", "r8-attn", |_, t| {
                let w = t.remove(&a("A")).unwrap();
                t.insert(a("A").replace("layers.0", "layers.9"), w);
            }),
            "the model has 2",
        ),
        (
            broken_adapter(root.path(), "to-save", "r8-attn", |c, _| c["modules_to_save"] = serde_json::json!(["lm_head"])),
            "modules_to_save",
        ),
        (broken_adapter(root.path(), "dora", "r8-attn", |c, _| c["use_dora"] = true.into()), "DoRA"),
        (broken_adapter(root.path(), "bias", "r8-attn", |c, _| c["bias"] = "all".into()), "trained bias"),
        (broken_adapter(root.path(), "huge", "r8-attn", |c, _| c["r"] = 1_000_000.into()), "outside 1..="),
        (broken_adapter(root.path(), "alpha", "r8-attn", |c, _| c["lora_alpha"] = "x".into()), "lora_alpha"),
        (broken_adapter(root.path(), "empty", "r8-attn", |_, t| t.clear()), "holds no LoRA weights"),
    ];
    for (dir, want) in &cases {
        let err = model.load_adapter("bad", dir).expect_err(&format!("{} loaded", dir.display()));
        assert!(matches!(err, ModelError::InvalidAdapter { .. }), "{}: {err:?}", dir.display());
        assert!(err.to_string().contains(want), "{}: {err} does not say {want:?}", dir.display());
    }
    // No weights file, and a truncated one.
    let missing = root.path().join("missing");
    std::fs::create_dir_all(&missing).unwrap();
    std::fs::copy(adapter_dir("r8-attn").join("adapter_config.json"), missing.join("adapter_config.json")).unwrap();
    let err = model.load_adapter("bad", &missing).unwrap_err().to_string();
    assert!(err.contains("adapter_model.safetensors not found"), "{err}");
    let bytes = std::fs::read(adapter_dir("r8-attn").join("adapter_model.safetensors")).unwrap();
    std::fs::write(missing.join("adapter_model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let err = model.load_adapter("bad", &missing).unwrap_err().to_string();
    assert!(err.contains("adapter_model.safetensors"), "{err}");
    // And no config at all.
    let err = model.load_adapter("bad", root.path()).unwrap_err().to_string();
    assert!(err.contains("adapter_config.json"), "{err}");
}
