//! Batched decode against the machine's ceilings, all measured in one run: decode tokens/s at
//! batch 1, 8, 16 and 32 on one rank, each batch's speed-up over batch 1, the multiply-add rate
//! its projections reach against the peak of the instruction family the dtype's kernels use
//! (f32 FMA, bf16 `vdpbf16ps`, int8 `vpdpbusd` for the block formats), and its weight stream
//! against the measured read bandwidth.
//!
//! usage: cargo bench -p tessera-model --bench batch_decode -- MODEL_DIR [f32|bf16|f16|q8_0|q4_k] [STEPS]
//! MODEL_DIR: safetensors (the dtype picks the weights' format), or a GGUF file or a directory
//! holding one (its block formats as stored, read against the int8 peak).
//! Every sequence first prefills a 128-token prompt, then the batch decodes STEPS (default 64)
//! greedy tokens per sequence together. Prints a Markdown table and one `RESULT` line.

#[path = "support/ceilings.rs"]
mod ceilings;

use std::path::PathBuf;
use std::time::Instant;

use tessera_collective::SingleRank;
use tessera_model::{sampler::argmax, Batch, LoadConfig, LogitsMode, Model, ModelConfig, SeqChunk};

fn prompt(len: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 7919 + 13 + salt * 104_729) % vocab) as u32).collect()
}

/// Multiply-adds of one token's projections and output head.
fn macs_per_token(c: &ModelConfig) -> f64 {
    let (h, d) = (c.hidden_size, c.head_dim);
    let attention = h * (c.num_attention_heads + 2 * c.num_key_value_heads) * d + c.num_attention_heads * d * h;
    let mlp = 3 * h * c.intermediate_size;
    (c.num_hidden_layers * (attention + mlp) + c.vocab_size * h) as f64
}

/// Decode tokens/s (all sequences) of `batch` sequences decoding `steps` tokens each together.
fn decode(model: &Model, batch: usize, steps: usize) -> anyhow::Result<f64> {
    let vocab = model.config().vocab_size;
    let mut kv = model.new_kv_cache();
    let mut next = Vec::with_capacity(batch);
    for s in 0..batch {
        let p = prompt(128, vocab, s);
        let chunk = [SeqChunk { seq: s as u64, start: 0, len: p.len() }];
        let logits: Vec<Vec<f32>> =
            model.forward(&Batch { tokens: &p, chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk)?.to_vec2()?;
        next.push(argmax(&logits[0]));
    }
    let start = Instant::now();
    for i in 0..steps {
        let chunks: Vec<SeqChunk> = (0..batch).map(|s| SeqChunk { seq: s as u64, start: 128 + i, len: 1 }).collect();
        let logits = model.forward(&Batch { tokens: &next, chunks: &chunks }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk)?;
        for (n, row) in next.iter_mut().zip(logits.to_vec2::<f32>()?) {
            *n = argmax(&row);
        }
    }
    Ok((batch * steps) as f64 / start.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    tessera_model::limit_candle_spinning();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let Some(dir) = args.first().map(PathBuf::from) else { anyhow::bail!("usage: batch_decode MODEL_DIR [DTYPE] [STEPS]") };
    let dtype_name = args.get(1).map(String::as_str).unwrap_or("f32");
    let Some((dtype, quantization)) = tessera_model::weight_format(dtype_name) else { anyhow::bail!("unknown dtype {dtype_name}") };
    let steps: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(64);
    let model = Model::load(&dir, &LoadConfig { dtype, quantization, ..LoadConfig::default() })?;
    let peaks = ceilings::peaks(300);
    let bandwidth = ceilings::read_bandwidth(1024, 5);
    // A directory holding a GGUF keeps the file's block formats, whose kernels are int8.
    let gguf = !dir.join("model.safetensors").exists()
        && (dir.extension().is_some_and(|x| x == "gguf")
            || std::fs::read_dir(&dir)?.filter_map(|e| e.ok()).any(|e| e.path().extension().is_some_and(|x| x == "gguf")));
    let (family, peak) = match dtype_name {
        _ if gguf => ("int8 dot", peaks.int8),
        "f32" => ("f32 FMA", peaks.f32),
        "bf16" if peaks.bf16 > 0.0 => ("bf16 dot", peaks.bf16),
        "bf16" | "f16" => ("f32 FMA", peaks.f32),
        _ => ("int8 dot", peaks.int8),
    };
    let macs = macs_per_token(model.config());
    let bytes = model.weight_bytes() as f64;
    println!(
        "{} ({dtype_name}), {} threads: weights {:.1} MB, {:.1} M multiply-adds per token; peaks (G multiply-adds/s) f32 {:.1}, bf16 {:.1}, int8 {:.1}; read bandwidth {bandwidth:.1} GB/s",
        dir.display(),
        rayon::current_num_threads(),
        bytes / 1e6,
        macs / 1e6,
        peaks.f32,
        peaks.bf16,
        peaks.int8
    );
    decode(&model, 1, 8)?; // warm-up: page in the weights
    println!("| batch | tok/s | ÷ batch 1 | G multiply-adds/s | ÷ {family} peak | weight stream GB/s | ÷ read bandwidth |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut result = format!("RESULT batch_decode {dtype_name} peak_gmacs={peak:.1} read_gbs={bandwidth:.1}");
    let mut base = None;
    for batch in [1usize, 8, 16, 32] {
        let tps = decode(&model, batch, steps)?;
        let b1 = *base.get_or_insert(tps);
        let gmacs = tps * macs / 1e9;
        let stream = tps / batch as f64 * bytes / 1e9;
        println!(
            "| {batch} | {tps:.1} | {:.2}× | {gmacs:.1} | {:.0}% | {stream:.1} | {:.0}% |",
            tps / b1,
            100.0 * gmacs / peak,
            100.0 * stream / bandwidth
        );
        result.push_str(&format!(" b{batch}={tps:.1}"));
    }
    println!("{result}");
    Ok(())
}
