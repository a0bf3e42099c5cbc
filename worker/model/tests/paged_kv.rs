//! The paged KV cache: where a sequence's blocks lie in the pool changes no bit of its logits;
//! forked beams share blocks until they write; every block ends used, cached or free, none
//! lost; and a sequence that reuses a cached prefix samples what it would have sampled
//! computing it, alone, at tensor-parallel size 2, and in a pool too small to keep everything.

mod common;

use candle_core::DType;
use tessera_collective::{Collective, InProcessGroup, SingleRank};
use tessera_model::fixture::{write_fixture, WriteOptions};
use tessera_model::sampler::{argmax, Sampler, SamplingParams};
use tessera_model::{Batch, KvCache, KvCacheConfig, LoadConfig, LogitsMode, Model, PrefixCaching, SeqChunk, KV_BLOCK_TOKENS};

fn load(name: &str, dtype: DType) -> Model {
    Model::load(&common::fixture_dir(name), &LoadConfig { dtype, ..LoadConfig::default() }).expect("load")
}

fn forward(m: &Model, kv: &mut KvCache, comm: &mut dyn Collective, tokens: &[u32], chunks: &[SeqChunk]) -> Vec<Vec<f32>> {
    m.forward(&Batch { tokens, chunks }, kv, comm, LogitsMode::LastPerChunk).expect("forward").to_vec2().expect("to host")
}

fn tokens(len: usize, salt: usize) -> Vec<u32> {
    (0..len).map(|i| 3 + ((i * 31 + salt * 17 + i * i % 7) % 250) as u32).collect()
}

/// Three sequences in interleaved prefill chunks, then ten batched greedy decode steps;
/// every step's logits.
fn interleaved(m: &Model, kv: &mut KvCache) -> Vec<Vec<Vec<f32>>> {
    let (p1, p2, p3) = (tokens(37, 1), tokens(7, 2), tokens(40, 3));
    let mut out = Vec::new();
    let step1: Vec<u32> = [&p1[..20], &p2[..]].concat();
    out.push(forward(m, kv, &mut SingleRank, &step1, &[SeqChunk { seq: 1, start: 0, len: 20 }, SeqChunk { seq: 2, start: 0, len: 7 }]));
    let step2: Vec<u32> = [&p1[20..], &p3[..]].concat();
    out.push(forward(m, kv, &mut SingleRank, &step2, &[SeqChunk { seq: 1, start: 20, len: 17 }, SeqChunk { seq: 3, start: 0, len: 40 }]));
    let mut next = vec![argmax(&out[1][0]), argmax(&out[0][1]), argmax(&out[1][1])];
    let mut lens = [37, 7, 40];
    for _ in 0..10 {
        let chunks: Vec<SeqChunk> = (0..3).map(|i| SeqChunk { seq: i as u64 + 1, start: lens[i], len: 1 }).collect();
        let rows = forward(m, kv, &mut SingleRank, &next, &chunks);
        next = rows.iter().map(|r| argmax(r)).collect();
        lens.iter_mut().for_each(|l| *l += 1);
        out.push(rows);
    }
    out
}

/// The same steps give the same bits whether the blocks come fresh from an empty pool or from
/// a full one (blocks another sequence left cached, evicted and handed out in another order):
/// decode attention and chunked prefill read through the tables, in every type, with a
/// sliding window.
#[test]
fn where_the_blocks_lie_changes_no_bit() {
    for (name, dtype) in
        [("llama-gqa", DType::F32), ("llama-headdim-bias", DType::BF16), ("llama-gqa", DType::F16), ("mistral-swa", DType::F32)]
    {
        let m = load(name, dtype);
        let mut fresh = m.new_kv_cache();
        let reference = interleaved(&m, &mut fresh);

        let mut used = m.new_kv_cache_with(KvCacheConfig { max_blocks: Some(12), ..KvCacheConfig::default() });
        let other = tokens(150, 9);
        forward(&m, &mut used, &mut SingleRank, &other, &[SeqChunk { seq: 100, start: 0, len: 150 }]);
        forward(&m, &mut used, &mut SingleRank, &tokens(30, 10), &[SeqChunk { seq: 101, start: 0, len: 30 }]);
        used.release(101);
        used.release(100);
        assert_eq!(used.pool_counts().cached, 10, "{name}: the full blocks of 150 and 30 tokens");
        let again = interleaved(&m, &mut used);
        assert!(used.prefix_stats().evictions > 0, "{name}: the steps needed evicted blocks");
        assert_eq!(again, reference, "{name} {dtype:?}");
        for kv in [&mut fresh, &mut used] {
            kv.check().expect("books balance");
            for seq in 1..=3 {
                kv.release(seq);
            }
            let counts = kv.check().expect("books balance after release");
            assert_eq!(counts.used, 0, "{name}: released sequences use no block");
        }
    }
}

#[test]
fn forked_beams_share_blocks_until_they_write_and_match_separate_sequences() {
    let m = load("llama-gqa", DType::F32);
    let prompt = tokens(20, 4);
    let prefill = |kv: &mut KvCache, seq: u64| forward(&m, kv, &mut SingleRank, &prompt, &[SeqChunk { seq, start: 0, len: 20 }]);
    let decode = |kv: &mut KvCache| {
        let chunks: Vec<SeqChunk> = (1..=3).map(|seq| SeqChunk { seq, start: 20, len: 1 }).collect();
        forward(&m, kv, &mut SingleRank, &[11, 12, 13], &chunks)
    };

    let mut forked = m.new_kv_cache();
    prefill(&mut forked, 1);
    forked.fork(1, 2).expect("fork");
    forked.fork(1, 3).expect("fork");
    assert_eq!(forked.blocks(), 2, "three beams of 20 tokens share two blocks");
    assert_eq!(forked.seq_blocks(3), 2);
    let assert_needs = |kv: &KvCache, n: usize| {
        let writes: Vec<_> = (1..=3).map(|seq| (seq, 20, 21)).collect();
        assert_eq!(kv.blocks_after(&[], &writes).expect("count"), n);
    };
    assert_needs(&forked, 4);
    let shared = decode(&mut forked);
    assert_eq!(forked.blocks(), 4, "the first two writers copied the shared last block, the third wrote it in place");
    forked.check().expect("books balance");

    let mut separate = m.new_kv_cache();
    for seq in 1..=3 {
        prefill(&mut separate, seq);
    }
    assert_eq!(shared, decode(&mut separate), "the same bits as three separate sequences");

    // A fork replacing a longer sequence gives its blocks back.
    forked.fork(2, 1).expect("fork over");
    forked.check().expect("books balance");
    for seq in 1..=3 {
        forked.release(seq);
    }
    assert_eq!(forked.check().expect("books balance").used, 0);
}

/// How a request is fed: its prompt in chunks of at most `chunk` tokens, then `steps` tokens
/// sampled by `params`.
struct Feed<'a> {
    chunk: usize,
    steps: usize,
    params: &'a SamplingParams,
    caching: PrefixCaching,
}

/// Feeds `prompt` as a worker does: each chunk after reusing what the prefix cache holds of it.
/// Returns the sampled tokens and the prompt tokens reused.
fn generate(m: &Model, kv: &mut KvCache, comm: &mut dyn Collective, seq: u64, prompt: &[u32], feed: &Feed) -> (Vec<u32>, usize) {
    let Feed { chunk, steps, params, caching } = *feed;
    let mut sampler = Sampler::new(params.clone());
    sampler.observe_prompt(prompt);
    let (mut start, mut reused_total, mut last) = (0, 0, Vec::new());
    while start < prompt.len() {
        let part = &prompt[start..(start + chunk).min(prompt.len())];
        let reused = kv.reuse_prefix(seq, start, part, caching).expect("reuse");
        reused_total += reused;
        let fed = &part[reused..];
        last = forward(m, kv, comm, fed, &[SeqChunk { seq, start: start + reused, len: fed.len() }]).remove(0);
        start += part.len();
    }
    let mut out = vec![sampler.sample(&last)];
    while out.len() < steps {
        let pos = prompt.len() + out.len() - 1;
        let row = forward(m, kv, comm, &out[out.len() - 1..], &[SeqChunk { seq, start: pos, len: 1 }]).remove(0);
        out.push(sampler.sample(&row));
    }
    (out, reused_total)
}

fn long_context_model(name: &str, dtype: DType, tp: (usize, usize)) -> Model {
    let root = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("paged-kv-{}", std::process::id()));
    let mut spec = common::spec(name);
    spec.config["max_position_embeddings"] = 2048.into();
    let dir = write_fixture(&spec, &root.join(name), &WriteOptions::default()).expect("write fixture");
    Model::load(&dir, &LoadConfig { dtype, tp_rank: tp.0, tp_size: tp.1, ..LoadConfig::default() }).expect("load")
}

fn seeded() -> SamplingParams {
    SamplingParams { temperature: 0.9, seed: 1234, ..SamplingParams::greedy() }
}

/// A 1,000-token system prompt shared by two requests: the second reuses its 62 full blocks
/// (992 tokens) and samples what a run without the cache samples, greedy and seeded, whole
/// and in chunks of 256.
#[test]
fn a_reused_1000_token_prefix_samples_what_computing_it_samples() {
    for dtype in [DType::F32, DType::BF16] {
        let m = long_context_model("llama-gqa", dtype, (0, 1));
        let system = tokens(1000, 5);
        let (a, b) = ([&system[..], &tokens(23, 6)].concat(), [&system[..], &tokens(31, 7)].concat());
        for chunk in [usize::MAX, 256] {
            for params in [SamplingParams::greedy(), seeded()] {
                let mut kv = m.new_kv_cache();
                let on = Feed { chunk, steps: 12, params: &params, caching: PrefixCaching::On };
                let (_, none) = generate(&m, &mut kv, &mut SingleRank, 1, &a, &on);
                assert_eq!(none, 0);
                kv.release(1);
                let (cached, reused) = generate(&m, &mut kv, &mut SingleRank, 2, &b, &on);
                // Whole: 62 blocks. In chunks of 256, each chunk keeps its last token to compute,
                // so the first three reuse 15 blocks each and the last, from 768, 14 (to 992).
                let (hits, expected) = if chunk == 256 { (4, 3 * 240 + 224) } else { (1, 992) };
                assert_eq!(reused, expected, "{dtype:?} chunk {chunk}");
                let mut off = m.new_kv_cache();
                let (computed, _) = generate(&m, &mut off, &mut SingleRank, 2, &b, &Feed { caching: PrefixCaching::Off, ..on });
                assert_eq!(cached, computed, "{dtype:?} chunk {chunk} {params:?}");
                let stats = kv.prefix_stats();
                assert_eq!((stats.hits, stats.hit_tokens), (hits, expected as u64));
                kv.release(2);
                kv.check().expect("books balance");
            }
        }
    }
}

/// Two tensor-parallel ranks make the same reuse decisions and stay bit-identical, and sample
/// what one rank does.
#[test]
fn tensor_parallel_ranks_reuse_the_same_blocks() {
    let system = tokens(300, 8);
    let (a, b) = ([&system[..], &tokens(9, 1)].concat(), [&system[..], &tokens(12, 2)].concat());
    let run = |m: &Model, comm: &mut dyn Collective| {
        let mut kv = m.new_kv_cache();
        let params = seeded();
        let feed = Feed { chunk: 128, steps: 6, params: &params, caching: PrefixCaching::On };
        generate(m, &mut kv, comm, 1, &a, &feed);
        kv.release(1);
        let out = generate(m, &mut kv, comm, 2, &b, &feed);
        (out, kv.prefix_stats())
    };
    let single = run(&long_context_model("llama-gqa", DType::F32, (0, 1)), &mut SingleRank);
    let ranks: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = InProcessGroup::new(2)
            .into_iter()
            .enumerate()
            .map(|(rank, mut comm)| {
                let m = long_context_model("llama-gqa", DType::F32, (rank, 2));
                s.spawn(move || run(&m, &mut comm))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank")).collect()
    });
    assert_eq!(ranks[0], ranks[1], "ranks agree");
    assert_eq!(ranks[0].0, single.0, "tp=2 samples what tp=1 does");
    // Chunks of 128 keep their last token to compute: 7 + 7 blocks, then 2 up to 288.
    assert_eq!(single.0 .1, 256);
}

/// Eight requests sharing a 100-token prefix in a pool of twice one request's blocks, admitted
/// as blocks allow (counting each request's whole reservation, as the coordinator does), in
/// batched decode steps: cached blocks are evicted under pressure, never a running sequence's,
/// and every request gets the tokens of an unconstrained run.
#[test]
fn a_small_pool_evicts_only_unused_blocks() {
    let m = long_context_model("llama-gqa", DType::F32, (0, 1));
    let prefix = tokens(100, 3);
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| [&prefix[..], &tokens(10 + 3 * i, 20 + i)].concat()).collect();
    let steps = 10;
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            let mut kv = m.new_kv_cache();
            let greedy = SamplingParams::greedy();
            let feed = Feed { chunk: usize::MAX, steps, params: &greedy, caching: PrefixCaching::Off };
            generate(&m, &mut kv, &mut SingleRank, 1, p, &feed).0
        })
        .collect();

    let reserve = |p: &Vec<u32>| tessera_model::blocks_for(p.len() + steps);
    let max_blocks = 2 * reserve(&prompts[7]);
    let mut kv = m.new_kv_cache_with(KvCacheConfig { max_blocks: Some(max_blocks), ..KvCacheConfig::default() });
    let mut waiting: std::collections::VecDeque<usize> = (0..prompts.len()).collect();
    // (request, tokens so far)
    let mut running: Vec<(usize, Vec<u32>)> = Vec::new();
    let mut done: Vec<Option<Vec<u32>>> = vec![None; prompts.len()];
    while !waiting.is_empty() || !running.is_empty() {
        let reserved: usize = running.iter().map(|(r, _)| reserve(&prompts[*r])).sum();
        if let Some(&r) = waiting.front().filter(|&&r| reserved + reserve(&prompts[r]) <= max_blocks) {
            waiting.pop_front();
            let p = &prompts[r];
            let reused = kv.reuse_prefix(r as u64, 0, p, PrefixCaching::On).expect("reuse");
            let row =
                forward(&m, &mut kv, &mut SingleRank, &p[reused..], &[SeqChunk { seq: r as u64, start: reused, len: p.len() - reused }]);
            running.push((r, vec![argmax(&row[0])]));
            kv.check().expect("books balance after a prefill");
            continue;
        }
        let chunks: Vec<SeqChunk> =
            running.iter().map(|(r, out)| SeqChunk { seq: *r as u64, start: prompts[*r].len() + out.len() - 1, len: 1 }).collect();
        let fed: Vec<u32> = running.iter().map(|(_, out)| out[out.len() - 1]).collect();
        let rows = forward(&m, &mut kv, &mut SingleRank, &fed, &chunks);
        for ((_, out), row) in running.iter_mut().zip(&rows) {
            out.push(argmax(row));
        }
        assert!(kv.blocks() <= max_blocks);
        for (r, out) in std::mem::take(&mut running) {
            if out.len() == steps {
                kv.release(r as u64);
                done[r] = Some(out);
            } else {
                running.push((r, out));
            }
        }
        kv.check().expect("books balance after a decode step");
    }
    let done: Vec<Vec<u32>> = done.into_iter().map(|d| d.expect("every request finished")).collect();
    assert_eq!(done, expected);
    let stats = kv.prefix_stats();
    assert!(stats.hits >= 4 && stats.evictions > 0, "{stats:?}");
    assert_eq!(kv.check().expect("books balance").used, 0);
    assert_eq!(KV_BLOCK_TOKENS, 16);
}
