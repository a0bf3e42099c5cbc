//! `Numerics::BatchInvariant`: a token's logits are bit for bit the same whether it is decoded
//! alone, decoded in a batch of more rows than the decode kernels' tile, or computed inside a
//! prefill chunk of any size beside other sequences' work. This is what lets a seeded stream
//! give the same tokens under any load, and a sequence re-prefilled on another group after a
//! failure continue exactly.

mod common;

use candle_core::DType;
use tessera_collective::SingleRank;
use tessera_model::{Batch, KvCache, LoadConfig, LogitsMode, Model, Numerics, SeqChunk};

fn model(name: &str, dtype: DType) -> Model {
    let load = LoadConfig { dtype, numerics: Numerics::BatchInvariant, ..LoadConfig::default() };
    Model::load(&common::fixture_dir(name), &load).expect("load")
}

/// The logits rows of one forward call, as bits.
fn forward(m: &Model, kv: &mut KvCache, tokens: &[u32], chunks: &[SeqChunk], mode: LogitsMode) -> Vec<Vec<u32>> {
    let logits = m.forward(&Batch { tokens, chunks }, kv, &mut SingleRank, mode).expect("forward");
    let rows: Vec<Vec<f32>> = logits.to_vec2().expect("to host");
    rows.into_iter().map(|r| r.into_iter().map(f32::to_bits).collect()).collect()
}

fn prompt(seed: usize, len: usize) -> Vec<u32> {
    (0..len).map(|i| 3 + ((i * 31 + seed * 7) % 300) as u32).collect()
}

const CASES: [(&str, DType); 5] = [
    ("llama-gqa", DType::F32),
    ("mistral-swa", DType::F32),
    ("qwen2-tied", DType::F32),
    ("llama-gqa", DType::BF16),
    ("llama-gqa", DType::F16),
];

/// Every position's logits: fed one token per step, as chunks of uneven sizes, and as one
/// chunk (with another sequence's decode rows beside it) are the same bits.
#[test]
fn a_prompt_gives_the_same_bits_token_by_token_in_chunks_and_in_one_piece() {
    for (name, dtype) in CASES {
        let m = model(name, dtype);
        let p = prompt(1, 40);
        let mut kv = m.new_kv_cache();
        let mut by_token = Vec::new();
        for (i, t) in p.iter().enumerate() {
            by_token.extend(forward(&m, &mut kv, &[*t], &[SeqChunk { seq: 1, start: i, len: 1 }], LogitsMode::All));
        }

        let mut kv = m.new_kv_cache();
        let mut in_chunks = Vec::new();
        let mut start = 0;
        for len in [7usize, 1, 20, 12] {
            in_chunks.extend(forward(&m, &mut kv, &p[start..start + len], &[SeqChunk { seq: 1, start, len }], LogitsMode::All));
            start += len;
        }
        assert!(in_chunks == by_token, "{name} {dtype:?}: chunked prefill differs from token-by-token decode");

        // One chunk, in a step that also carries twenty decode rows of other sequences.
        let mut kv = m.new_kv_cache();
        let others: Vec<Vec<u32>> = (0..20).map(|s| prompt(10 + s, 3)).collect();
        for (s, o) in others.iter().enumerate() {
            forward(&m, &mut kv, o, &[SeqChunk { seq: 100 + s as u64, start: 0, len: o.len() }], LogitsMode::LastPerChunk);
        }
        let mut tokens: Vec<u32> = others.iter().map(|o| o[0]).collect();
        let mut chunks: Vec<SeqChunk> = (0..20).map(|s| SeqChunk { seq: 100 + s as u64, start: 3, len: 1 }).collect();
        tokens.extend(&p);
        chunks.push(SeqChunk { seq: 1, start: 0, len: p.len() });
        let all = forward(&m, &mut kv, &tokens, &chunks, LogitsMode::All);
        assert!(all[20..] == by_token[..], "{name} {dtype:?}: a prefill chunk beside decode rows differs from token-by-token decode");
    }
}

/// Twenty sequences decoded in one batch (more rows than one kernel tile) give each sequence's
/// bits from decoding it alone.
#[test]
fn a_batch_wider_than_a_tile_decodes_each_sequence_as_alone() {
    for (name, dtype) in CASES {
        let m = model(name, dtype);
        let prompts: Vec<Vec<u32>> = (0..20).map(|s| prompt(s, 1 + s % 7)).collect();
        let steps = 4;
        let mut alone = Vec::new();
        for p in &prompts {
            let mut kv = m.new_kv_cache();
            let mut row = forward(&m, &mut kv, p, &[SeqChunk { seq: 1, start: 0, len: p.len() }], LogitsMode::LastPerChunk).remove(0);
            let mut out = vec![row.clone()];
            for i in 0..steps {
                let next = argmax(&row);
                row = forward(&m, &mut kv, &[next], &[SeqChunk { seq: 1, start: p.len() + i, len: 1 }], LogitsMode::LastPerChunk).remove(0);
                out.push(row.clone());
            }
            alone.push(out);
        }

        let mut kv = m.new_kv_cache();
        let tokens = prompts.concat();
        let mut start = 0;
        let chunks: Vec<SeqChunk> = prompts
            .iter()
            .enumerate()
            .map(|(s, p)| {
                start += p.len();
                SeqChunk { seq: s as u64, start: 0, len: p.len() }
            })
            .collect();
        let mut last = forward(&m, &mut kv, &tokens, &chunks, LogitsMode::LastPerChunk);
        let mut together: Vec<Vec<Vec<u32>>> = last.iter().map(|r| vec![r.clone()]).collect();
        for i in 0..steps {
            let next: Vec<u32> = last.iter().map(|r| argmax(r)).collect();
            let chunks: Vec<SeqChunk> =
                prompts.iter().enumerate().map(|(s, p)| SeqChunk { seq: s as u64, start: p.len() + i, len: 1 }).collect();
            last = forward(&m, &mut kv, &next, &chunks, LogitsMode::LastPerChunk);
            for (s, r) in last.iter().enumerate() {
                together[s].push(r.clone());
            }
        }
        for s in 0..prompts.len() {
            assert!(together[s] == alone[s], "{name} {dtype:?}: sequence {s} batched differs from alone");
        }
    }
}

fn argmax(bits: &[u32]) -> u32 {
    let row: Vec<f32> = bits.iter().map(|b| f32::from_bits(*b)).collect();
    tessera_model::sampler::argmax(&row)
}
