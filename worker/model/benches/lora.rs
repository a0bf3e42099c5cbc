//! Batched decode with LoRA adapters: 16 sequences stepped together with no adapter, all with
//! one adapter, and over 8 distinct adapters (two sequences each), on one rank.
//!
//! usage: cargo bench -p tessera-model --bench lora -- MODEL_DIR [f32|bf16|f16|q8_0] [ROUNDS]
//! The adapters are `MODEL_DIR-lora-0` .. `-lora-7` (`tessera-fixtures OUT smol135 --adapters 8`
//! writes them: rank 16 on all seven projections). Each round decodes 32 steps in each mode,
//! the modes interleaved so machine noise falls on all three alike; prints each round and the
//! medians of ms per step, and the ratios to the base.

use std::path::PathBuf;
use std::time::Instant;

use tessera_collective::SingleRank;
use tessera_model::{sampler::argmax, Adapter, Batch, LoadConfig, LogitsMode, Model, SeqChunk};

const BATCH: usize = 16;
const PROMPT: usize = 64;
const STEPS: usize = 32;
const ADAPTERS: usize = 8;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Prefills the batch, then times `STEPS` decode steps; returns ms per step.
fn decode(model: &Model, adapters: &[Option<&Adapter>], round: usize) -> anyhow::Result<f64> {
    let vocab = model.config().vocab_size;
    let mut kv = model.new_kv_cache();
    let mut next = Vec::with_capacity(BATCH);
    for s in 0..BATCH {
        let prompt: Vec<u32> = (0..PROMPT).map(|i| ((i * 7919 + s * 104_729 + round * 31 + 13) % vocab) as u32).collect();
        let chunk = [SeqChunk { seq: s as u64, start: 0, len: PROMPT }];
        let logits: Vec<Vec<f32>> = model
            .forward_adapted(
                &Batch { tokens: &prompt, chunks: &chunk },
                &adapters[s..=s],
                &mut kv,
                &mut SingleRank,
                LogitsMode::LastPerChunk,
            )?
            .to_vec2()?;
        next.push(argmax(&logits[0]));
    }
    let start = Instant::now();
    for step in 0..STEPS {
        let chunks: Vec<SeqChunk> = (0..BATCH).map(|s| SeqChunk { seq: s as u64, start: PROMPT + step, len: 1 }).collect();
        let logits: Vec<Vec<f32>> = model
            .forward_adapted(&Batch { tokens: &next, chunks: &chunks }, adapters, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk)?
            .to_vec2()?;
        next = logits.iter().map(|row| argmax(row)).collect();
    }
    Ok(start.elapsed().as_secs_f64() * 1e3 / STEPS as f64)
}

fn main() -> anyhow::Result<()> {
    tessera_model::limit_candle_spinning();
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let Some(dir) = args.first().map(PathBuf::from) else { anyhow::bail!("usage: lora MODEL_DIR [DTYPE] [ROUNDS]") };
    let dtype_name = args.get(1).map(String::as_str).unwrap_or("f32");
    let Some((dtype, quantization)) = tessera_model::weight_format(dtype_name) else { anyhow::bail!("unknown dtype {dtype_name}") };
    let rounds: usize = args.get(2).map(|r| r.parse()).transpose()?.unwrap_or(5);
    let model = Model::load(&dir, &LoadConfig { dtype, quantization, ..LoadConfig::default() })?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let adapters = (0..ADAPTERS)
        .map(|i| model.load_adapter(&format!("lora-{i}"), &dir.with_file_name(format!("{name}-lora-{i}"))))
        .collect::<tessera_model::Result<Vec<_>>>()?;
    let rank = adapters[0].config().rank;
    let mb = adapters[0].bytes() as f64 / 1e6;
    println!(
        "{} ({dtype_name}), threads {}, batch {BATCH}, rank {rank} on all 7 projections ({mb:.1} MB f32 each)",
        dir.display(),
        candle_core::utils::get_num_threads()
    );
    let modes: [(&str, Vec<Option<&Adapter>>); 3] = [
        ("base", vec![None; BATCH]),
        ("1 adapter", vec![Some(&adapters[0]); BATCH]),
        ("8 adapters", (0..BATCH).map(|s| Some(&adapters[s % ADAPTERS])).collect()),
    ];
    let mut times = vec![Vec::new(); modes.len()];
    // Round 0 warms up and is not counted.
    for round in 0..=rounds {
        let mut line = format!("round {round}:");
        for (m, (label, chosen)) in modes.iter().enumerate() {
            let ms = decode(&model, chosen, round)?;
            line.push_str(&format!(" {label} {ms:.2} ms/step"));
            if round > 0 {
                times[m].push(ms);
            }
        }
        println!("{line}");
    }
    let base = median(times[0].clone());
    for ((label, _), t) in modes.iter().zip(&times) {
        let m = median(t.clone());
        println!("{label:>10}: median {m:.2} ms/step, {:.1} tok/s, {:.3}x the base", BATCH as f64 * 1e3 / m, m / base);
    }
    Ok(())
}
