//! A CPU decode step allocates nothing but the logits it returns: every intermediate of every
//! layer lives in the model's workspace (`workspace.rs`), and the kernels' own bookkeeping
//! (quantized activations, attention partials, tiles) is kept per thread between steps.
//!
//! Counted with a counting global allocator, so this binary holds this one test. The model's
//! pool gets one thread: which thread first meets a longer cache (and grows its scratch rows)
//! then does not depend on scheduling, so the counts are exact. With more threads the same
//! buffers are reused, only first grown on whichever thread meets them first.

use candle_core::DType;
use tessera_collective::SingleRank;
use tessera_model::fixture::counting::{Allocated, Counting};
use tessera_model::fixture::{test_fixtures, write_fixture, FixtureSpec, WriteOptions};
use tessera_model::{Batch, LoadConfig, LogitsMode, Model, Quantization, SeqChunk};

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Prefills `batch` sequences of 20 tokens, runs three decode steps to warm the workspace up,
/// then counts what each of `steps` more decode steps allocates (the logits they return are
/// dropped outside the count).
fn decode_steps(model: &Model, batch: usize, steps: usize) -> Vec<Allocated> {
    let vocab = model.config().vocab_size as u32;
    let mut kv = model.new_kv_cache();
    let prompt_len = 20;
    for s in 0..batch {
        let prompt: Vec<u32> = (0..prompt_len as u32).map(|i| (i * 7 + s as u32 * 3) % vocab).collect();
        let chunk = [SeqChunk { seq: s as u64, start: 0, len: prompt_len }];
        model.forward(&Batch { tokens: &prompt, chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk).expect("prefill");
    }
    let tokens: Vec<u32> = (0..batch as u32).map(|s| (s * 5 + 1) % vocab).collect();
    let mut chunks: Vec<SeqChunk> = (0..batch).map(|s| SeqChunk { seq: s as u64, start: prompt_len, len: 1 }).collect();
    let mut counted = Vec::with_capacity(steps);
    for step in 0..3 + steps {
        let before = Counting::now();
        let logits = model.forward(&Batch { tokens: &tokens, chunks: &chunks }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk);
        let allocated = Counting::now() - before;
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
    // shorter than the caches; in each weight type a decode step runs in.
    let cases: [(&str, DType, Option<Quantization>); 5] = [
        ("llama-gqa", DType::F32, None),
        ("llama-headdim-bias", DType::BF16, None),
        ("llama-gqa", DType::F16, None),
        ("qwen2-tied", DType::F32, Some(Quantization::Q8_0)),
        ("mistral-swa", DType::F32, None),
    ];
    for (name, dtype, quantization) in cases {
        let load = LoadConfig { dtype, quantization, ..LoadConfig::default() };
        let spec = spec(name);
        let mut by_layers = Vec::new();
        for layers in [2, 6] {
            let model = Model::load(&fixture(&spec, layers, &root.join(name)), &load).expect("load");
            for batch in [1usize, 3] {
                let steps = decode_steps(&model, batch, 4);
                let case = format!("{name} {dtype:?} {quantization:?}, {layers} layers, batch {batch}");
                // The logits: one f32 buffer of `batch × vocab` and candle's handle around it;
                // a half-precision model's head writes its own type first, then widens.
                let logits = batch * model.config().vocab_size * 4;
                let (most_allocations, most_bytes) = if dtype == DType::F32 { (5, logits + 256) } else { (10, logits * 3 / 2 + 512) };
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
            assert_eq!(allocations(i), allocations(0), "{name}: {:?} against {:?}", by_layers[i].0, by_layers[0].0);
        }
    }
    std::fs::remove_dir_all(&root).expect("remove fixtures");
}
