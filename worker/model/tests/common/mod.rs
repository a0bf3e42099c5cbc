//! Helpers shared by the model crate's integration tests.

#![allow(dead_code)] // each test binary uses a different subset

pub mod ring;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Tensor;
use tessera_collective::{Collective, InProcessGroup, SingleRank};
use tessera_model::fixture::{test_fixtures, write_fixture, FixtureSpec, WriteOptions};
use tessera_model::{Adapter, Batch, LoadConfig, LogitsMode, Model, SeqChunk};

/// Writes every test fixture once per test process and returns the root directory.
pub fn fixtures_root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("model-fixtures-{}", std::process::id()));
        for spec in test_fixtures() {
            write_fixture(&spec, &root, &WriteOptions::default()).expect("write fixture");
        }
        root
    })
}

pub fn fixture_dir(name: &str) -> PathBuf {
    fixtures_root().join(name)
}

pub fn spec(name: &str) -> FixtureSpec {
    test_fixtures().into_iter().find(|s| s.name == name).expect("known fixture")
}

/// What one rank computed for a prompt: all prefill logits, then the logits of each greedy step.
#[derive(Debug, Clone)]
pub struct Trace {
    pub prefill: Vec<Vec<f32>>,
    pub decode: Vec<Vec<f32>>,
    pub greedy: Vec<u32>,
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().expect("logits to host")
}

/// Prefill `prompt`, then `steps` greedy decode steps, on one rank of a group.
pub fn run_trace(model: &Model, comm: &mut dyn Collective, prompt: &[u32], steps: usize) -> Trace {
    run_trace_adapted(model, comm, prompt, steps, None)
}

/// [`run_trace`] with a LoRA adapter's update on every product.
pub fn run_trace_adapted(model: &Model, comm: &mut dyn Collective, prompt: &[u32], steps: usize, adapter: Option<&Adapter>) -> Trace {
    let mut kv = model.new_kv_cache();
    let adapters = [adapter];
    let chunk = [SeqChunk { seq: 7, start: 0, len: prompt.len() }];
    let logits =
        model.forward_adapted(&Batch { tokens: prompt, chunks: &chunk }, &adapters, &mut kv, comm, LogitsMode::All).expect("prefill");
    let prefill = rows(&logits);
    // `argmax` skips NaN: a non-finite logit must fail the trace, not pick another token.
    assert!(prefill.iter().flatten().all(|v| v.is_finite()), "a non-finite logit in the prefill");
    let mut next = tessera_model::sampler::argmax(prefill.last().expect("non-empty prompt"));
    let mut greedy = vec![next];
    let mut decode = Vec::with_capacity(steps);
    for i in 0..steps {
        let chunk = [SeqChunk { seq: 7, start: prompt.len() + i, len: 1 }];
        let batch = Batch { tokens: &[next], chunks: &chunk };
        let logits = model.forward_adapted(&batch, &adapters, &mut kv, comm, LogitsMode::LastPerChunk).expect("decode");
        let row = rows(&logits).remove(0);
        assert!(row.iter().all(|v| v.is_finite()), "a non-finite logit at decode step {i}");
        next = tessera_model::sampler::argmax(&row);
        decode.push(row);
        if i + 1 < steps {
            greedy.push(next);
        }
    }
    Trace { prefill, decode, greedy }
}

/// Runs the same trace on every rank of an in-process group of `tp` threads; returns each rank's.
pub fn run_tp(name: &str, tp: usize, prompt: &[u32], steps: usize) -> Vec<Trace> {
    run_tp_loaded(&fixture_dir(name), &LoadConfig::default(), tp, prompt, steps)
}

/// [`run_tp`] for the model in `dir`, loaded as `base` says (its rank and size are set here).
pub fn run_tp_loaded(dir: &Path, base: &LoadConfig, tp: usize, prompt: &[u32], steps: usize) -> Vec<Trace> {
    run_tp_adapted(dir, base, tp, prompt, steps, None)
}

/// [`run_tp_loaded`] with every rank adding its share of the LoRA adapter in `adapter`.
pub fn run_tp_adapted(dir: &Path, base: &LoadConfig, tp: usize, prompt: &[u32], steps: usize, adapter: Option<&Path>) -> Vec<Trace> {
    let run = |model: &Model, comm: &mut dyn Collective| {
        let adapter = adapter.map(|a| model.load_adapter("test", a).expect("load adapter"));
        run_trace_adapted(model, comm, prompt, steps, adapter.as_ref())
    };
    if tp == 1 {
        let model = Model::load(dir, base).expect("load tp=1");
        return vec![run(&model, &mut SingleRank)];
    }
    let run = &run;
    let comms = InProcessGroup::new(tp);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, mut comm)| {
                let load = LoadConfig { tp_rank: rank, tp_size: tp, ..base.clone() };
                s.spawn(move || {
                    let model = Model::load(dir, &load).expect("load shard");
                    run(&model, &mut comm)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    })
}

pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row counts differ");
    a.iter()
        .zip(b)
        .flat_map(|(ra, rb)| {
            assert_eq!(ra.len(), rb.len(), "row widths differ");
            // A non-finite value is an infinite difference: `f32::max` alone would skip a NaN.
            ra.iter().zip(rb).map(|(x, y)| if x.is_finite() && y.is_finite() { (x - y).abs() } else { f32::INFINITY })
        })
        .fold(0f32, f32::max)
}

/// A golden reference written by `scripts/golden/make_golden.py` or `make_lora_golden.py`.
pub struct Golden {
    pub meta: std::collections::HashMap<String, String>,
    pub prompt: Vec<u32>,
    pub prefill: Vec<Vec<f32>>,
    pub greedy: Vec<u32>,
    pub decode: Vec<Vec<f32>>,
}

/// Reads the golden at `path` (under `tests/golden/`).
pub fn read_golden(path: &Path) -> Golden {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("golden header");
    let meta = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu).expect("golden tensors");
    let ids = |k: &str| -> Vec<u32> { tensors[k].to_vec1::<i64>().unwrap().into_iter().map(|v| v as u32).collect() };
    let rows = |k: &str| -> Vec<Vec<f32>> { tensors[k].to_vec2::<f32>().unwrap() };
    Golden { prompt: ids("prompt_ids"), prefill: rows("prefill_logits"), greedy: ids("greedy_ids"), decode: rows("decode_logits"), meta }
}

/// The directory of the committed goldens.
pub fn golden_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden")
}

/// SHA-256 of a file, as the golden scripts record it.
pub fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(std::fs::read(path).expect("file to hash")).iter().map(|b| format!("{b:02x}")).collect()
}
