//! Single-rank speed of the model on a real checkpoint, in the same shape as the peer-engine
//! scripts (`../shared/bench/peers/`): prefill of one 512-token prompt, and 128 greedy decode
//! tokens after a 128-token prompt, at batch 1 and batch 8.
//!
//! usage: cargo bench -p tessera-model --bench model -- MODEL_DIR [f32|bf16|f16|q8_0|q4_k] [RUNS]
//! `TESSERA_BATCH_INVARIANT=1` loads with `Numerics::BatchInvariant` (the RESULT label says so).
//! MODEL_DIR holds config.json and safetensors, or config.json and one llama.cpp `.gguf` (its
//! quantized tensors are used as stored); q8_0 / q4_k quantize the projections on load.
//! Prints one `RESULT tessera ...` line with medians, like the peer scripts, and what the
//! model allocated per decode step (a counting allocator around `Model::forward`).

use std::path::PathBuf;
use std::time::Instant;

use tessera_collective::SingleRank;
use tessera_model::fixture::counting::{Allocated, Counting};
use tessera_model::{sampler::argmax, Batch, LoadConfig, LogitsMode, Model, Numerics, SeqChunk};

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations and bytes the model made in each decode step of a run.
#[derive(Default)]
struct StepAllocations(Vec<Allocated>);

impl std::fmt::Display for StepAllocations {
    /// The median step (most steps: those that do not grow the KV cache), then the mean over all
    /// steps (every 16th grows each sequence's cache by a block).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let steps = self.0.len().max(1) as f64;
        let mut counts = self.0.clone();
        counts.sort_unstable();
        let median = counts.get(counts.len() / 2).copied().unwrap_or_default();
        let (total, total_bytes) = counts.iter().fold((0, 0), |(a, b), c| (a + c.allocations, b + c.bytes));
        write!(
            f,
            "median step {} allocations / {} bytes, mean {:.1} / {:.0}",
            median.allocations,
            median.bytes,
            total as f64 / steps,
            total_bytes as f64 / steps
        )
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn prompt(len: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 7919 + 13 + salt * 104_729) % vocab) as u32).collect()
}

/// Prefills `batch` sequences of 128 tokens, then decodes 128 greedy tokens each, all sequences
/// in every step. Returns decode tokens/s (all sequences), the first sequence's first tokens
/// and what the decode steps allocated.
fn decode(model: &Model, batch: usize) -> anyhow::Result<(f64, Vec<u32>, StepAllocations)> {
    let vocab = model.config().vocab_size;
    let mut kv = model.new_kv_cache();
    let prompts: Vec<Vec<u32>> = (0..batch).map(|s| prompt(128, vocab, s)).collect();
    let mut next = Vec::with_capacity(batch);
    for (s, p) in prompts.iter().enumerate() {
        let chunk = [SeqChunk { seq: s as u64, start: 0, len: p.len() }];
        let logits: Vec<Vec<f32>> =
            model.forward(&Batch { tokens: p, chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk)?.to_vec2()?;
        next.push(argmax(&logits[0]));
    }
    let mut first = vec![next[0]];
    let steps = 128;
    let mut counted = StepAllocations(Vec::with_capacity(128));
    let start = Instant::now();
    for i in 0..steps {
        let chunks: Vec<SeqChunk> = (0..batch).map(|s| SeqChunk { seq: s as u64, start: 128 + i, len: 1 }).collect();
        let before = Counting::now();
        let logits = model.forward(&Batch { tokens: &next, chunks: &chunks }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk)?;
        counted.0.push(Counting::now() - before);
        let logits: Vec<Vec<f32>> = logits.to_vec2()?;
        for (n, row) in next.iter_mut().zip(&logits) {
            *n = argmax(row);
        }
        if first.len() < 8 {
            first.push(next[0]);
        }
    }
    Ok(((batch * steps) as f64 / start.elapsed().as_secs_f64(), first, counted))
}

fn prefill(model: &Model) -> anyhow::Result<f64> {
    let p = prompt(512, model.config().vocab_size, 0);
    let mut kv = model.new_kv_cache();
    let chunk = [SeqChunk { seq: 0, start: 0, len: p.len() }];
    let start = Instant::now();
    let logits = model.forward(&Batch { tokens: &p, chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk)?;
    let _ = argmax(&logits.to_vec2::<f32>()?[0]);
    Ok(p.len() as f64 / start.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    // As the `tessera` binary does, so the bench measures what a worker runs.
    tessera_model::limit_candle_spinning();
    // `cargo bench` appends `--bench`; ignore flags.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let dir = PathBuf::from(args.first().map(String::as_str).unwrap_or("/opt/peers/ckpt/smol135-f32"));
    let dtype_name = args.get(1).map(String::as_str).unwrap_or("f32");
    let Some((dtype, quantization)) = tessera_model::weight_format(dtype_name) else { anyhow::bail!("unknown dtype {dtype_name}") };
    let runs: usize = args.get(2).map(|r| r.parse()).transpose()?.unwrap_or(3);
    // Optional: "prefill", "decode" (batch 1) or "decode8" alone, for profiling one phase.
    let only = args.get(3).map(String::as_str);
    // A directory holding a GGUF instead of safetensors is labelled as such in the RESULT line.
    let gguf = !dir.join("model.safetensors").exists()
        && std::fs::read_dir(&dir)?.filter_map(|e| e.ok()).any(|e| e.path().extension().is_some_and(|x| x == "gguf"));
    let invariant = std::env::var("TESSERA_BATCH_INVARIANT").is_ok_and(|v| v == "1");
    let numerics = if invariant { Numerics::BatchInvariant } else { Numerics::Fast };
    let label = if gguf { format!("{dtype_name}-gguf") } else { dtype_name.to_string() };
    let label = if invariant { format!("{label}-batch-invariant") } else { label };
    let t = Instant::now();
    let model = Model::load(&dir, &LoadConfig { dtype, quantization, numerics, ..LoadConfig::default() })?;
    println!(
        "loaded {} ({dtype_name}) in {:.2} s, threads {}",
        dir.display(),
        t.elapsed().as_secs_f64(),
        candle_core::utils::get_num_threads()
    );
    // Warm-up: page in the weights and size the caches.
    decode(&model, 1)?;
    prefill(&model)?;
    let (mut pre, mut d1, mut d8) = (vec![], vec![], vec![]);
    let mut first = vec![];
    let (mut allocated_b1, mut allocated_b8) = (StepAllocations::default(), StepAllocations::default());
    for r in 0..runs {
        let p = if only.is_some_and(|o| o != "prefill") { f64::NAN } else { prefill(&model)? };
        let (a, f, alloc_b1) =
            if only.is_some_and(|o| o != "decode") { (f64::NAN, vec![], StepAllocations::default()) } else { decode(&model, 1)? };
        let (b, _, alloc_b8) =
            if only.is_some_and(|o| o != "decode8") { (f64::NAN, vec![], StepAllocations::default()) } else { decode(&model, 8)? };
        println!("run {r}: prefill512 {p:.1} tok/s, decode b1 {a:.2} tok/s, decode b8 {b:.2} tok/s");
        pre.push(p);
        d1.push(a);
        d8.push(b);
        first = f;
        (allocated_b1, allocated_b8) = (alloc_b1, alloc_b8);
    }
    println!("first 8 generated ids: {first:?}");
    println!("model allocations per decode step (last run): batch 1 {allocated_b1}; batch 8 {allocated_b8}");
    println!(
        "RESULT tessera {label} prefill512_median={:.1} decode_median={:.2} decode_b8_median={:.2}",
        median(pre),
        median(d1),
        median(d8)
    );
    Ok(())
}
