//! Single-rank prefill throughput from 512 to 16k tokens, and how much of it attention's
//! quadratic cost explains.
//!
//! usage: cargo bench -p tessera-model --bench long_prefill [-- LONGEST [RUNS]]
//! (LONGEST default 16384; RUNS default 2, medians; about 6 min per run of every length on two
//! cores.)
//!
//! Model: the SmolLM-135M shape (`fixture::smol135()`, random weights, f32) with its context
//! raised to 16,384 positions, written into a temporary directory. Each prompt is prefilled in
//! one `Model::forward` into an empty cache, as a worker runs a prompt that fits its step
//! budget (chunked prefill runs the same kernels on shorter query blocks).
//!
//! Beside tokens/s, each length's arithmetic rate: `2·P` FLOPs per token for the projections
//! and MLP (`P` = parameters in the layers, the last token's output projection added) plus
//! causal attention's `2·L·H·d·n²` (scores and weighted values over the n²/2 visible pairs, at
//! two FLOPs a multiply-add). `rate ÷ 512` compares it with the 512-token prompt's: a rate that
//! holds as n grows means attention costs only its FLOPs, with no score matrix to write,
//! allocate or fault in.

use std::time::Instant;

use tessera_collective::SingleRank;
use tessera_model::fixture::{self, WriteOptions};
use tessera_model::{sampler::argmax, Batch, LoadConfig, LogitsMode, Model, SeqChunk};

const LENGTHS: [usize; 6] = [512, 1024, 2048, 4096, 8192, 16384];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Seconds to prefill `len` tokens into a fresh cache.
fn prefill(model: &Model, len: usize) -> anyhow::Result<f64> {
    let vocab = model.config().vocab_size;
    let tokens: Vec<u32> = (0..len).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
    let mut kv = model.new_kv_cache();
    let chunk = [SeqChunk { seq: 0, start: 0, len }];
    let start = Instant::now();
    let logits = model.forward(&Batch { tokens: &tokens, chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk)?;
    let _ = argmax(&logits.to_vec2::<f32>()?[0]);
    Ok(start.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    tessera_model::limit_candle_spinning();
    let args: Vec<usize> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let longest = args.first().copied().unwrap_or(16384);
    let runs = args.get(1).copied().unwrap_or(2);

    let mut spec = fixture::smol135();
    spec.config["max_position_embeddings"] = 16384.into();
    let root = tempfile::tempdir()?;
    let dir = fixture::write_fixture(&spec, root.path(), &WriteOptions::default())?;
    let model = Model::load(&dir, &LoadConfig::default())?;
    let c = model.config();
    let (layers, heads, head_dim, hidden, inter, vocab) =
        (c.num_hidden_layers, c.num_attention_heads, c.head_dim, c.hidden_size, c.intermediate_size, c.vocab_size);
    let kv_width = c.num_key_value_heads * head_dim;
    // Per layer: q and o (hidden × heads·d), k and v (hidden × kv width), the MLP's three.
    let layer_params = 2 * hidden * heads * head_dim + 2 * hidden * kv_width + 3 * hidden * inter;
    let flops = |n: usize| -> f64 {
        let dense = 2.0 * (layers * layer_params) as f64 * n as f64 + 2.0 * (hidden * vocab) as f64;
        let attention = 2.0 * (layers * heads * head_dim) as f64 * (n as f64) * (n as f64);
        dense + attention
    };
    println!("smol135 shape, f32, threads {}; {runs} runs per length", candle_core::utils::get_num_threads());
    prefill(&model, 512)?; // warm-up: page the weights in
    let mut base_rate = None;
    println!("| tokens | prefill s | tok/s | attention share of FLOPs | GFLOP/s | rate ÷ 512 |");
    println!("|---|---|---|---|---|---|");
    for &n in LENGTHS.iter().filter(|&&n| n <= longest) {
        let secs = median((0..runs).map(|_| prefill(&model, n)).collect::<anyhow::Result<_>>()?);
        let rate = flops(n) / secs / 1e9;
        let base = *base_rate.get_or_insert(rate);
        let attention = 2.0 * (layers * heads * head_dim) as f64 * (n * n) as f64 / flops(n);
        println!("| {n} | {secs:.2} | {:.0} | {:.0}% | {rate:.1} | {:.2} |", n as f64 / secs, attention * 100.0, rate / base);
    }
    Ok(())
}
