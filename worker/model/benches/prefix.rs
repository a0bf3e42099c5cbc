//! Time to first token of a request whose 1,000-token system prompt is in the prefix cache,
//! against the same request computed whole.
//!
//! usage: cargo bench -p tessera-model --bench prefix -- MODEL_DIR [f32|bf16|f16|q8_0] [RUNS]
//! Each run warms the cache with one request (the system prompt and one user turn), releases
//! it, then times a request with the same system prompt and another user turn from its arrival
//! to its first token: once reusing the cached blocks, once with the cache off (a fresh cache,
//! `PrefixCaching::Off`). Prints medians and each run.

use std::path::PathBuf;
use std::time::Instant;

use tessera_collective::SingleRank;
use tessera_model::{sampler::argmax, Batch, KvCache, LoadConfig, LogitsMode, Model, PrefixCaching, SeqChunk};

const SYSTEM: usize = 1000;
const USER: usize = 40;

fn prompt(len: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 7919 + 13 + salt * 104_729) % vocab) as u32).collect()
}

/// Feeds `tokens` as sequence `seq` as a worker does (reusing what the cache holds, then one
/// forward over the rest) and returns the first token and the tokens reused.
fn first_token(model: &Model, kv: &mut KvCache, seq: u64, tokens: &[u32], caching: PrefixCaching) -> anyhow::Result<(u32, usize)> {
    let reused = kv.reuse_prefix(seq, 0, tokens, caching)?;
    let fed = &tokens[reused..];
    let chunk = [SeqChunk { seq, start: reused, len: fed.len() }];
    let logits: Vec<Vec<f32>> =
        model.forward(&Batch { tokens: fed, chunks: &chunk }, kv, &mut SingleRank, LogitsMode::LastPerChunk)?.to_vec2()?;
    Ok((argmax(&logits[0]), reused))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    tessera_model::limit_candle_spinning();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let Some(dir) = args.first().map(PathBuf::from) else { anyhow::bail!("usage: prefix MODEL_DIR [DTYPE] [RUNS]") };
    let dtype_name = args.get(1).map(String::as_str).unwrap_or("f32");
    let Some((dtype, quantization)) = tessera_model::weight_format(dtype_name) else { anyhow::bail!("unknown dtype {dtype_name}") };
    let runs: usize = args.get(2).map(|r| r.parse()).transpose()?.unwrap_or(5);
    let model = Model::load(&dir, &LoadConfig { dtype, quantization, ..LoadConfig::default() })?;
    let vocab = model.config().vocab_size;
    let system = prompt(SYSTEM, vocab, 1);
    println!("{} ({dtype_name}), threads {}", dir.display(), candle_core::utils::get_num_threads());
    let (mut cached, mut computed) = (Vec::new(), Vec::new());
    // Run 0 warms up (weights paged in, buffers sized) and is not counted.
    for r in 0..=runs {
        let request = |salt: usize| [&system[..], &prompt(USER, vocab, 100 + 2 * r + salt)[..]].concat();
        let mut kv = model.new_kv_cache();
        first_token(&model, &mut kv, 1, &request(0), PrefixCaching::On)?;
        kv.release(1);
        let next = request(1);
        let t = Instant::now();
        let (with_cache, reused) = first_token(&model, &mut kv, 2, &next, PrefixCaching::On)?;
        let with_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut fresh = model.new_kv_cache();
        let t = Instant::now();
        let (without, _) = first_token(&model, &mut fresh, 2, &next, PrefixCaching::Off)?;
        let without_ms = t.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(with_cache == without, "run {r}: the cached prefix gave token {with_cache}, computing it {without}");
        println!("run {r}: TTFT cached {with_ms:.1} ms ({reused} tokens reused), uncached {without_ms:.1} ms");
        if r > 0 {
            cached.push(with_ms);
            computed.push(without_ms);
        }
    }
    let (c, u) = (median(cached), median(computed));
    println!("RESULT prefix {dtype_name} prompt={} ttft_cached_ms={c:.1} ttft_uncached_ms={u:.1} speedup={:.1}x", SYSTEM + USER, u / c);
    Ok(())
}
