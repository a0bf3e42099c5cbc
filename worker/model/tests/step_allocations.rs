//! A CPU decode step allocates nothing but the logits it returns: every intermediate of every
//! layer lives in the model's workspace (`workspace.rs`), and the kernels' own bookkeeping
//! (quantized activations, attention partials, tiles) is kept per thread between steps.
//!
//! Counted with a counting global allocator, so this binary holds this one test. The model's
//! pool gets one thread: which thread first meets a longer cache (and grows its scratch rows)
//! then does not depend on scheduling, so the counts are exact. With more threads the same
//! buffers are reused, only first grown on whichever thread meets them first.

use std::path::Path;
use std::sync::Barrier;

use candle_core::DType;
use tessera_collective::{Collective, InProcessGroup, SingleRank};
use tessera_model::fixture::counting::{Allocated, Counting};
use tessera_model::fixture::{test_fixtures, write_fixture, FixtureSpec, WriteOptions};
use tessera_model::{Batch, LoadConfig, LogitsMode, Model, Quantization, SeqChunk};

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Prefills `batch` sequences of 20 tokens, runs three decode steps to warm the workspace up,
/// then counts what each of `steps` more decode steps allocates (the logits they return are
/// dropped outside the count). The ranks of a group meet at `sync` around each counted step, so
/// the count covers every rank's whole step and nothing else.
fn decode_steps(model: &Model, comm: &mut dyn Collective, sync: &Barrier, batch: usize, steps: usize) -> Vec<Allocated> {
    let vocab = model.config().vocab_size as u32;
    let mut kv = model.new_kv_cache();
    let prompt_len = 20;
    for s in 0..batch {
        let prompt: Vec<u32> = (0..prompt_len as u32).map(|i| (i * 7 + s as u32 * 3) % vocab).collect();
        let chunk = [SeqChunk { seq: s as u64, start: 0, len: prompt_len }];
        model.forward(&Batch { tokens: &prompt, chunks: &chunk }, &mut kv, comm, LogitsMode::LastPerChunk).expect("prefill");
    }
    let tokens: Vec<u32> = (0..batch as u32).map(|s| (s * 5 + 1) % vocab).collect();
    let mut chunks: Vec<SeqChunk> = (0..batch).map(|s| SeqChunk { seq: s as u64, start: prompt_len, len: 1 }).collect();
    let mut counted = Vec::with_capacity(steps);
    for step in 0..3 + steps {
        sync.wait();
        let before = Counting::now();
        sync.wait();
        let logits = model.forward(&Batch { tokens: &tokens, chunks: &chunks }, &mut kv, comm, LogitsMode::LastPerChunk);
        sync.wait();
        let allocated = Counting::now() - before;
        sync.wait();
        let logits = logits.expect("decode step");
        assert_eq!(logits.dims(), &[batch, vocab as usize]);
        drop(logits);
        if step >= 3 {
            counted.push(allocated);
        }
        for c in &mut chunks {
            c.start += 1;
        }
    }
    counted
}

/// [`decode_steps`] on every rank of a `tp`-rank group in this process (threads, the in-process
/// collective); rank 0's counts, which cover all ranks.
fn group_decode_steps(dir: &Path, load: &LoadConfig, tp: usize, batch: usize, steps: usize) -> (usize, Vec<Allocated>) {
    let sync = Barrier::new(tp);
    if tp == 1 {
        let model = Model::load(dir, load).expect("load");
        let vocab = model.config().vocab_size;
        return (vocab, decode_steps(&model, &mut SingleRank, &sync, batch, steps));
    }
    let mut ranks: Vec<(usize, Vec<Allocated>)> = std::thread::scope(|s| {
        let handles: Vec<_> = InProcessGroup::new(tp)
            .into_iter()
            .enumerate()
            .map(|(rank, mut comm)| {
                let load = LoadConfig { tp_rank: rank, tp_size: tp, ..load.clone() };
                let sync = &sync;
                s.spawn(move || {
                    let model = Model::load(dir, &load).expect("load shard");
                    (model.config().vocab_size, decode_steps(&model, &mut comm, sync, batch, steps))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    });
    ranks.swap_remove(0)
}

/// `spec` with `layers` layers, written under `root`.
fn fixture(spec: &FixtureSpec, layers: usize, root: &std::path::Path) -> std::path::PathBuf {
    let mut spec = spec.clone();
    spec.config["num_hidden_layers"] = layers.into();
    write_fixture(&spec, &root.join(format!("{layers}-layers")), &WriteOptions::default()).expect("write fixture")
}

#[test]
fn decode_steps_allocate_only_their_logits() {
    // One pool thread (see the module notes); read when each model builds its pool.
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let root = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("step-allocations-{}", std::process::id()));
    let specs = test_fixtures();
    let spec = |name: &str| specs.iter().find(|s| s.name == name).expect("known fixture").clone();
    // Plain GQA, biases with a head size of 24, a tied head with one KV head, a sliding window
    // shorter than the caches; in each weight type a decode step runs in; alone and as two
    // tensor-parallel ranks (whose all-reduces sum in place).
    let cases: [(&str, DType, Option<Quantization>, usize); 7] = [
        ("llama-gqa", DType::F32, None, 1),
        ("llama-headdim-bias", DType::BF16, None, 1),
        ("llama-gqa", DType::F16, None, 1),
        ("qwen2-tied", DType::F32, Some(Quantization::Q8_0), 1),
        ("mistral-swa", DType::F32, None, 1),
        ("llama-gqa", DType::F32, None, 2),
        ("llama-headdim-bias", DType::BF16, None, 2),
    ];
    for (name, dtype, quantization, tp) in cases {
        let load = LoadConfig { dtype, quantization, ..LoadConfig::default() };
        let spec = spec(name);
        let mut by_layers = Vec::new();
        for layers in [2, 6] {
            let dir = fixture(&spec, layers, &root.join(format!("{name}-tp{tp}")));
            for batch in [1usize, 3] {
                let (vocab, steps) = group_decode_steps(&dir, &load, tp, batch, 4);
                let case = format!("{name} {dtype:?} {quantization:?} tp={tp}, {layers} layers, batch {batch}");
                // Per rank, the logits: one f32 buffer of `batch × vocab` and candle's handle
                // around it; a half-precision model's head writes its own type first, then widens.
                let logits = batch * vocab * 4;
                let (allocations, bytes) = if dtype == DType::F32 { (5, logits + 256) } else { (10, logits * 3 / 2 + 512) };
                let (most_allocations, most_bytes) = (tp * allocations, tp * bytes);
                for step in &steps {
                    assert!(
                        step.allocations <= most_allocations && step.bytes <= most_bytes,
                        "{case}: a step allocated {step:?}, more than its logits ({most_allocations} allocations, {most_bytes} bytes)"
                    );
                }
                by_layers.push(((layers, batch), steps));
            }
        }
        // Nothing per layer and nothing per sequence: the counts of 2 and 6 layers, and of
        // batches of 1 and 3, are the same.
        let allocations = |i: usize| by_layers[i].1.iter().map(|s| s.allocations).collect::<Vec<_>>();
        for i in 1..by_layers.len() {
            assert_eq!(allocations(i), allocations(0), "{name} tp={tp}: {:?} against {:?}", by_layers[i].0, by_layers[0].0);
        }
    }
    std::fs::remove_dir_all(&root).expect("remove fixtures");
}
