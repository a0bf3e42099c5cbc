//! One forward call serves many sequences: batched decode of sequences of different lengths and
//! chunked prefill give the same logits as running each sequence alone in one piece.

mod common;

use candle_core::Tensor;
use tessera_collective::SingleRank;
use tessera_model::{Batch, LoadConfig, LogitsMode, Model, ModelError, SeqChunk};

fn model(name: &str) -> Model {
    Model::load(&common::fixture_dir(name), &LoadConfig::default()).expect("load")
}

fn rows(t: Tensor) -> Vec<Vec<f32>> {
    t.to_vec2().expect("to host")
}

/// Prompts of different lengths, drawn from the fixture vocabulary.
fn prompts() -> Vec<Vec<u32>> {
    [5usize, 17, 1, 33].iter().enumerate().map(|(s, &len)| (0..len).map(|i| 3 + ((i * 31 + s * 7) % 300) as u32).collect()).collect()
}

#[test]
fn batched_decode_equals_each_sequence_alone() {
    for name in ["llama-gqa", "mistral-swa", "llama-rope-dynamic"] {
        let m = model(name);
        let prompts = prompts();
        let steps = 20;

        // Alone: each sequence in its own cache, greedy.
        let mut alone = Vec::new();
        for p in &prompts {
            let mut kv = m.new_kv_cache();
            let mut out = Vec::new();
            let chunk = [SeqChunk { seq: 1, start: 0, len: p.len() }];
            let mut row =
                rows(m.forward(&Batch { tokens: p, chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk).unwrap())
                    .remove(0);
            for i in 0..steps {
                let next = tessera_model::sampler::argmax(&row);
                let chunk = [SeqChunk { seq: 1, start: p.len() + i, len: 1 }];
                row = rows(
                    m.forward(&Batch { tokens: &[next], chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk).unwrap(),
                )
                .remove(0);
                out.push(row.clone());
            }
            alone.push(out);
        }

        // Together: all prefills in one call, then every decode step batched.
        let mut kv = m.new_kv_cache();
        let tokens: Vec<u32> = prompts.concat();
        let chunks: Vec<SeqChunk> = prompts.iter().enumerate().map(|(s, p)| SeqChunk { seq: s as u64, start: 0, len: p.len() }).collect();
        let mut last =
            rows(m.forward(&Batch { tokens: &tokens, chunks: &chunks }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk).unwrap());
        let mut together: Vec<Vec<Vec<f32>>> = vec![Vec::new(); prompts.len()];
        for i in 0..steps {
            let next: Vec<u32> = last.iter().map(|r| tessera_model::sampler::argmax(r)).collect();
            let chunks: Vec<SeqChunk> =
                prompts.iter().enumerate().map(|(s, p)| SeqChunk { seq: s as u64, start: p.len() + i, len: 1 }).collect();
            last = rows(m.forward(&Batch { tokens: &next, chunks: &chunks }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk).unwrap());
            for (s, r) in last.iter().enumerate() {
                together[s].push(r.clone());
            }
        }
        for s in 0..prompts.len() {
            let d = tessera_model::fixture::max_rel_diff(&together[s], &alone[s]);
            assert!(d <= 1e-5, "{name} seq {s}: batched vs alone max rel diff {d}");
        }
        assert_eq!(kv.num_sequences(), prompts.len());
        let held: usize = prompts.iter().map(|p| p.len() + steps).sum();
        assert_eq!(kv.tokens(), held);
    }
}

#[test]
fn chunked_prefill_equals_one_piece() {
    for name in ["llama-gqa", "mistral-swa", "qwen2-tied"] {
        let m = model(name);
        let prompt: Vec<u32> = (0..40).map(|i| 3 + (i * 13 % 300) as u32).collect();
        let whole_chunk = [SeqChunk { seq: 9, start: 0, len: 40 }];
        let mut kv = m.new_kv_cache();
        let whole = rows(m.forward(&Batch { tokens: &prompt, chunks: &whole_chunk }, &mut kv, &mut SingleRank, LogitsMode::All).unwrap());

        let mut kv = m.new_kv_cache();
        let mut pieces = Vec::new();
        let mut start = 0;
        for len in [7usize, 1, 20, 12] {
            let chunk = [SeqChunk { seq: 9, start, len }];
            let t = &prompt[start..start + len];
            pieces.extend(rows(m.forward(&Batch { tokens: t, chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::All).unwrap()));
            start += len;
        }
        let d = tessera_model::fixture::max_rel_diff(&pieces, &whole);
        assert!(d <= 1e-5, "{name}: chunked prefill max rel diff {d}");
    }
}

#[test]
fn malformed_batches_are_refused_and_leave_the_cache_usable() {
    let m = model("llama-gqa");
    let mut kv = m.new_kv_cache();
    let call = |tokens: &[u32], chunks: &[SeqChunk], kv: &mut tessera_model::KvCache| {
        m.forward(&Batch { tokens, chunks }, kv, &mut SingleRank, LogitsMode::LastPerChunk)
    };
    assert!(matches!(call(&[1, 2], &[SeqChunk { seq: 1, start: 0, len: 3 }], &mut kv), Err(ModelError::InvalidBatch(_))));
    assert!(matches!(call(&[], &[], &mut kv), Err(ModelError::InvalidBatch(_))));
    assert!(
        matches!(call(&[1, 999], &[SeqChunk { seq: 1, start: 0, len: 2 }], &mut kv), Err(ModelError::InvalidBatch(m)) if m.contains("999"))
    );
    assert!(matches!(call(&[1], &[SeqChunk { seq: 5, start: 3, len: 1 }], &mut kv), Err(ModelError::UnknownSequence(5))));
    assert!(matches!(
        call(&[1, 2], &[SeqChunk { seq: 1, start: 0, len: 1 }, SeqChunk { seq: 1, start: 1, len: 1 }], &mut kv),
        Err(ModelError::InvalidBatch(_))
    ));
    call(&[1, 2, 3], &[SeqChunk { seq: 1, start: 0, len: 3 }], &mut kv).expect("valid prefill");
    assert!(matches!(call(&[4], &[SeqChunk { seq: 1, start: 5, len: 1 }], &mut kv), Err(ModelError::InvalidBatch(_))), "gap in positions");
    call(&[4], &[SeqChunk { seq: 1, start: 3, len: 1 }], &mut kv).expect("decode continues");
    assert_eq!(kv.len(1), Some(4));
    assert!(kv.release(1));
    assert_eq!(kv.num_sequences(), 0);
}

/// Beam search copies one beam's cache into another slot: the copy continues exactly as the
/// original would, and the two are independent afterwards.
#[test]
fn a_forked_sequence_continues_like_its_source_and_independently() {
    let m = model("llama-gqa");
    let prompt: Vec<u32> = (0..23).map(|i| 3 + (i * 17 % 200) as u32).collect();
    let mut kv = m.new_kv_cache();
    let step = |kv: &mut tessera_model::KvCache, seq: u64, start: usize, tokens: &[u32]| {
        let chunk = [SeqChunk { seq, start, len: tokens.len() }];
        rows(m.forward(&Batch { tokens, chunks: &chunk }, kv, &mut SingleRank, LogitsMode::LastPerChunk).unwrap()).remove(0)
    };
    step(&mut kv, 1, 0, &prompt);
    kv.fork(1, 2).expect("fork");
    assert_eq!(kv.len(2), Some(prompt.len()));
    // Source and copy fed different tokens, then the same one: each matches a fresh run.
    let a = step(&mut kv, 1, prompt.len(), &[7]);
    let b = step(&mut kv, 2, prompt.len(), &[9]);
    let a2 = step(&mut kv, 1, prompt.len() + 1, &[11]);
    let b2 = step(&mut kv, 2, prompt.len() + 1, &[11]);
    for (fed, got) in [(vec![7u32], &a), (vec![9], &b), (vec![7, 11], &a2), (vec![9, 11], &b2)] {
        let mut fresh = m.new_kv_cache();
        let mut all = prompt.clone();
        all.extend(&fed);
        let want = step(&mut fresh, 5, 0, &all);
        let d = tessera_model::fixture::max_rel_diff(std::slice::from_ref(got), &[want]);
        assert!(d <= 1e-5, "after {fed:?}: fork vs fresh max rel diff {d}");
    }
    // Forking over an existing sequence replaces it; an unknown source is an error.
    kv.fork(1, 2).expect("fork over");
    assert_eq!(kv.len(2), kv.len(1));
    assert!(matches!(kv.fork(42, 3), Err(ModelError::UnknownSequence(42))));
}
