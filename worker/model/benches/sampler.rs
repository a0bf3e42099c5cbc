//! Cost of `Sampler::sample` per token at a 128k vocabulary, against the decode step it follows.
//!
//! Logits: two sets of 8 rows of 128256 f32 values (seeded), used in turn: "flat", drawn from
//! N(0, 2²), where top-p 0.9 at temperature 0.8 keeps thousands of tokens, and "peaked", from
//! N(0, 6²), where it keeps a handful (the bench prints both counts). History: a 1000-token
//! prompt and 880 generated tokens drawn from a Zipf-like law over the vocabulary (id ≈ V^u for
//! uniform u, so low ids repeat often, as frequent tokens do), then 20 untimed calls; the timed
//! calls follow, each recording its own token, so the history grows from 1900 to 2100 tokens
//! over them (≈ 2000 at the median). One long-lived sampler per configuration, as a sequence
//! has; the time is `sample` alone (the logits row is ready in memory), medians of the timed
//! calls. A counting allocator reports heap allocations per call.
//!
//! For the sampled configurations without penalties, the same run also times `full_sort_draw`,
//! a copy of the draw this crate used before it sorted only the candidates that can survive,
//! with the same seed, and checks that both pick the same token on every call.
//!
//! The decode step divided by: `Model::forward` of one token at batch 1 after a 128-token
//! prompt plus copying its logits row to a `Vec<f32>`, f32, TP=1, median of 48 steps, for the
//! SmolLM-135M shape (`fixture::smol135()`) with the vocabulary set to 128256 (tied embeddings,
//! so the output projection grows with it), and at its own vocabulary (49152) for reference.
//! Both are written into a temporary directory (≈ 0.75 and 0.5 GB) and timed in the same run.
//!
//! usage: cargo bench -p tessera-model --bench sampler

#![deny(unsafe_op_in_unsafe_fn)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde_json::json;
use tessera_collective::SingleRank;
use tessera_model::fixture::{self, FixtureSpec, WriteOptions};
use tessera_model::logits;
use tessera_model::sampler::{argmax, DryParams, Sampler, SamplingParams, SeededRng};
use tessera_model::{Batch, LoadConfig, LogitsMode, Model, SeqChunk};

/// Counts heap allocations, so the table can say whether a step allocates.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's layout, as given.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above: the caller's block and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const VOCAB: usize = 128_256;
const ROWS: usize = 8;
const PROMPT: usize = 1000;
const GENERATED: usize = 880;
const WARMUP: usize = 20;
const TIMED: usize = 200;
const DECODE_STEPS: usize = 48;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn normal_rows(rng: &mut SeededRng, sigma: f64) -> Vec<Vec<f32>> {
    (0..ROWS)
        .map(|_| {
            (0..VOCAB)
                .map(|_| {
                    // Box–Muller, one value per pair of draws.
                    let u1 = rng.next_f64().max(f64::MIN_POSITIVE);
                    let u2 = rng.next_f64();
                    (sigma * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
                })
                .collect()
        })
        .collect()
}

fn zipf_tokens(rng: &mut SeededRng, n: usize) -> Vec<u32> {
    (0..n).map(|_| ((VOCAB as f64).powf(rng.next_f64()) as usize - 1).min(VOCAB - 1) as u32).collect()
}

/// The draw this crate used before it sorted only the candidates that can survive (every
/// candidate sorted, then temperature → top-k → top-p → min-p), kept as the reference.
fn full_sort_draw(p: &SamplingParams, rng: &mut SeededRng, candidates: &mut Vec<(f32, u32)>, logits: &[f32]) -> u32 {
    let top_k = p.top_k.filter(|&k| k > 0);
    if p.temperature <= 0.0 || top_k == Some(1) || logits.len() <= 1 {
        return argmax(logits);
    }
    let inv_t = 1.0 / p.temperature;
    candidates.clear();
    candidates.extend(logits.iter().enumerate().filter(|(_, l)| !l.is_nan()).map(|(i, &l)| (l * inv_t, i as u32)));
    if candidates.is_empty() {
        return 0;
    }
    let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if let Some(k) = top_k.filter(|&k| k < candidates.len()) {
        candidates.select_nth_unstable_by(k - 1, order);
        candidates.truncate(k);
    }
    candidates.sort_unstable_by(order);
    let max = candidates[0].0;
    let mut total = 0f64;
    for c in candidates.iter_mut() {
        c.0 = (c.0 - max).exp();
        total += c.0 as f64;
    }
    if let Some(top_p) = p.top_p.filter(|&t| t < 1.0) {
        let target = top_p.max(0.0) as f64 * total;
        let mut mass = 0f64;
        let mut keep = candidates.len();
        for (i, c) in candidates.iter().enumerate() {
            mass += c.0 as f64;
            if mass >= target {
                keep = i + 1;
                break;
            }
        }
        candidates.truncate(keep);
        total = mass.min(total);
    }
    if p.min_p > 0.0 {
        let keep = candidates.iter().position(|c| (c.0 as f64) < p.min_p as f64).unwrap_or(candidates.len()).max(1);
        candidates.truncate(keep);
        total = candidates.iter().map(|c| c.0 as f64).sum();
    }
    let mut u = rng.next_f64() * total;
    for c in candidates.iter() {
        u -= c.0 as f64;
        if u < 0.0 {
            return c.1;
        }
    }
    candidates[candidates.len() - 1].1
}

struct Timing {
    median_us: f64,
    allocs_per_call: f64,
    tokens: Vec<u32>,
}

/// Times `step` over the timed calls, after the untimed ones; `step` returns the token picked.
fn time_calls(rows: &[Vec<f32>], mut step: impl FnMut(&[f32]) -> u32) -> Timing {
    for i in 0..WARMUP {
        std::hint::black_box(step(&rows[i % ROWS]));
    }
    let mut times = Vec::with_capacity(TIMED);
    let mut tokens = Vec::with_capacity(TIMED);
    let allocs_before = ALLOCATIONS.load(Ordering::Relaxed);
    for i in 0..TIMED {
        let row = &rows[(WARMUP + i) % ROWS];
        let start = Instant::now();
        let token = step(row);
        times.push(start.elapsed().as_secs_f64() * 1e6);
        tokens.push(token);
    }
    // Both vectors were reserved up front, so every allocation counted here is the step's.
    let allocs = ALLOCATIONS.load(Ordering::Relaxed) - allocs_before;
    Timing { median_us: median(times), allocs_per_call: allocs as f64 / TIMED as f64, tokens }
}

fn time_sampler(params: &SamplingParams, rows: &[Vec<f32>], prompt: &[u32], generated: &[u32]) -> Timing {
    let mut sampler = Sampler::new(params.clone());
    sampler.observe_prompt(prompt);
    sampler.observe_generated(generated);
    time_calls(rows, |row| sampler.sample(row))
}

fn time_full_sort(params: &SamplingParams, rows: &[Vec<f32>]) -> Timing {
    let mut rng = SeededRng::new(params.seed);
    let mut candidates = Vec::new();
    time_calls(rows, |row| full_sort_draw(params, &mut rng, &mut candidates, row))
}

/// How many tokens temperature `t` then top-p `p` keep of `row` (the full-row reference chain).
fn nucleus_size(row: &[f32], t: f32, p: f32) -> usize {
    let mut row = row.to_vec();
    logits::temperature(&mut row, t);
    logits::top_p(&mut row, p);
    row.iter().filter(|l| l.is_finite()).count()
}

/// Median time (ms) of one decode step of `spec`: forward of one token after a 128-token prompt,
/// logits copied out.
fn decode_step_ms(spec: &FixtureSpec) -> anyhow::Result<f64> {
    let root = tempfile::tempdir()?;
    let t = Instant::now();
    let dir = fixture::write_fixture(spec, root.path(), &WriteOptions::default())?;
    let model = Model::load(&dir, &LoadConfig::default())?;
    let vocab = model.config().vocab_size;
    println!("  wrote and loaded {} (vocab {vocab}) in {:.1} s", spec.name, t.elapsed().as_secs_f64());
    let prompt: Vec<u32> = (0..128).map(|i| ((i * 7919 + 13) % vocab) as u32).collect();
    let mut kv = model.new_kv_cache();
    let chunk = [SeqChunk { seq: 0, start: 0, len: prompt.len() }];
    let logits = model.forward(&Batch { tokens: &prompt, chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk)?;
    let mut row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
    let mut times = Vec::with_capacity(DECODE_STEPS);
    for i in 0..DECODE_STEPS + 4 {
        let token = [tessera_model::sampler::argmax(&row)];
        let chunk = [SeqChunk { seq: 0, start: prompt.len() + i, len: 1 }];
        let start = Instant::now();
        let logits = model.forward(&Batch { tokens: &token, chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk)?;
        row = logits.squeeze(0)?.to_vec1()?;
        // The first steps page the weights in and size the caches.
        if i >= 4 {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(times))
}

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut rng = SeededRng::new(128_256);
    let flat = normal_rows(&mut rng, 2.0);
    let peaked = normal_rows(&mut rng, 6.0);
    let history = zipf_tokens(&mut rng, PROMPT + GENERATED);
    let (prompt, generated) = history.split_at(PROMPT);
    let distinct = history.iter().collect::<std::collections::HashSet<_>>().len();
    let kept = |rows: &[Vec<f32>]| {
        let mut n: Vec<f64> = rows.iter().map(|r| nucleus_size(r, 0.8, 0.9) as f64).collect();
        n.sort_by(f64::total_cmp);
        format!("{}–{}", n[0], n[n.len() - 1])
    };
    println!(
        "vocab {VOCAB}; history {PROMPT} prompt + {GENERATED} generated ({distinct} distinct) + {WARMUP} untimed, then {TIMED} \
         timed calls; T 0.8 + top-p 0.9 keeps {} tokens of the flat rows, {} of the peaked rows; threads {}",
        kept(&flat),
        kept(&peaked),
        candle_core::utils::get_num_threads()
    );

    let greedy = SamplingParams::greedy();
    let sampled = SamplingParams { temperature: 0.8, seed: 7, ..greedy.clone() };
    let penalties = SamplingParams { repetition_penalty: 1.3, presence_penalty: 0.6, frequency_penalty: 0.6, ..greedy.clone() };
    let ngram = SamplingParams { no_repeat_ngram_size: 3, ..penalties.clone() };
    let dry = SamplingParams { dry: DryParams { multiplier: 0.8, base: 1.75, allowed_length: 2, ..DryParams::default() }, ..ngram.clone() };
    // (name, params, whether to time the full-sort reference too)
    let configs: Vec<(&str, SamplingParams, bool)> = vec![
        ("greedy", greedy.clone(), false),
        ("T 0.8 alone", sampled.clone(), true),
        ("T 0.8 + top-p 0.9", SamplingParams { top_p: Some(0.9), ..sampled.clone() }, true),
        ("T 0.8 + top-k 50 + top-p 0.9", SamplingParams { top_k: Some(50), top_p: Some(0.9), ..sampled.clone() }, true),
        ("T 0.8 + min-p 0.05", SamplingParams { min_p: 0.05, ..sampled.clone() }, true),
        ("greedy + repetition 1.3 + presence 0.6 + frequency 0.6", penalties, false),
        ("… + no_repeat_ngram 3", ngram, false),
        ("… + DRY 0.8 / 1.75 / 2", dry.clone(), false),
        (
            "full chain: … + T 0.8 + top-p 0.9 + min-p 0.05",
            SamplingParams { temperature: 0.8, top_p: Some(0.9), min_p: 0.05, seed: 7, ..dry },
            false,
        ),
    ];
    let mut results = Vec::new();
    for (name, params, reference) in &configs {
        let f = time_sampler(params, &flat, prompt, generated);
        let p = time_sampler(params, &peaked, prompt, generated);
        let refs = if *reference {
            let (rf, rp) = (time_full_sort(params, &flat), time_full_sort(params, &peaked));
            anyhow::ensure!(rf.tokens == f.tokens && rp.tokens == p.tokens, "{name}: the sampler and the full-sort draw disagree");
            Some((rf, rp))
        } else {
            None
        };
        results.push((*name, f, p, refs));
    }

    println!("decode steps (same run):");
    let smol = fixture::smol135();
    let mut wide = FixtureSpec { name: "smol135-v128k", ..smol.clone() };
    if let Some(config) = wide.config.as_object_mut() {
        config.insert("vocab_size".into(), json!(VOCAB));
    }
    let step_128k = decode_step_ms(&wide)?;
    let step_49k = decode_step_ms(&smol)?;
    println!("  smol135 shape at vocab {VOCAB}: {step_128k:.2} ms; smol135 (vocab 49152): {step_49k:.2} ms");

    let share = |us: f64| 100.0 * us / (step_128k * 1e3);
    println!();
    println!(
        "| sampler configuration | µs/token, flat rows | µs/token, peaked rows | allocations per call | \
         share of the 128k-vocab step ({step_128k:.1} ms), flat / peaked |"
    );
    println!("|---|---:|---:|---:|---:|");
    for (name, f, p, _) in &results {
        println!(
            "| {name} | {:.1} | {:.1} | {:.2} | {:.2}% / {:.2}% |",
            f.median_us,
            p.median_us,
            (f.allocs_per_call + p.allocs_per_call) / 2.0,
            share(f.median_us),
            share(p.median_us)
        );
    }
    println!();
    println!("| sampled configuration | full-sort draw µs, flat | this sampler µs, flat | speed-up | full-sort draw µs, peaked | this sampler µs, peaked | speed-up |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, f, p, refs) in &results {
        if let Some((rf, rp)) = refs {
            println!(
                "| {name} | {:.1} | {:.1} | {:.2}× | {:.1} | {:.1} | {:.2}× |",
                rf.median_us,
                f.median_us,
                rf.median_us / f.median_us,
                rp.median_us,
                p.median_us,
                rp.median_us / p.median_us
            );
        }
    }
    println!("(same tokens from both on every timed call)");
    println!();
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
