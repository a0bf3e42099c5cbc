//! What the repetition controls do to a model that loops: every control runs on the same fixed
//! prompts with the same model, and the table compares repetition metrics over what it generated.
//!
//! Models: the demo fixture (`fixture::demo()`: random weights, 4 layers, hidden 128, the real
//! byte-level BPE tokenizer of the fixtures, vocabulary 320) and two variants of it with the same
//! seed (2026), written in f32 into a temporary directory and run at TP=1 with `Model::forward`
//! and `Sampler`, as `benches/model.rs` does. Greedy decoding of the demo fixture as written
//! ends in a loop on only a few prompts (the bench prints the share first), so the controls are
//! compared on two variants that do loop:
//! - "demo, 1 layer" (`num_hidden_layers` 1): weak loops — mostly one token repeated, some
//!   cycles of several tokens, which the model sometimes leaves by itself;
//! - "demo, tied embeddings" (`tie_word_embeddings` true): strong loops — the residual stream
//!   keeps the input token's embedding and `lm_head` is that same matrix, so every generation
//!   repeats one token with a margin of tens of logits.
//!
//! Prompts: 8 English and 8 Chinese sentences, encoded with `fixture_tokenizer()`; each
//! generation is exactly 128 new tokens (end-of-sequence is not a stop here, so every control is
//! measured over the same length), except under the loop guard, which stops early.
//!
//! Metrics, over generated tokens only:
//! - seq-rep-4: the share of a generation's 4-grams that repeat an earlier 4-gram of the same
//!   generation (1 − distinct/total), averaged over generations;
//! - distinct-2: distinct bigrams over total bigrams in a generation, averaged;
//! - longest one-token run: the longest stretch of one token repeated back to back, averaged;
//! - stuck: the share of generations whose 128 tokens end in a loop — a tail made of one unit of
//!   1..=32 tokens repeated at least 3 times. This is the token rule of the coordinator's loop
//!   guard (`coordinator/src/loop_guard.rs`, `LoopGuard` with `max_period` 32, `min_repeats` 3,
//!   no sentence signal), written out again here because this crate may not depend on the
//!   coordinator.
//!
//! The "loop guard" row decodes greedily and stops at the first token after which that rule
//! holds, as the coordinator does; the bench reports how many generations it stopped, and which
//! of them the metric does not call stuck (the full 128-token greedy generation left the loop).
//! The remedy row applies `LOOP_ACTION_RAISE_TEMPERATURE` with the API's defaults instead of
//! stopping (see `generate_with_remedy`), over 3 seeds.
//! DRY runs without sequence breakers (the API's default).
//!
//! usage: cargo bench -p tessera-model --bench repetition

use std::collections::HashSet;
use std::time::Instant;

use serde_json::json;

use tessera_collective::SingleRank;
use tessera_model::fixture::{self, scripted::fixture_tokenizer, FixtureSpec, WriteOptions};
use tessera_model::sampler::{DryParams, Sampler, SamplingParams};
use tessera_model::{Batch, LoadConfig, LogitsMode, Model, SeqChunk};

/// New tokens per generation.
const NEW_TOKENS: usize = 128;
/// Longest loop unit the "stuck" rule looks for (the loop guard's `max_period`).
const MAX_PERIOD: usize = 32;
/// Copies of the unit that make a loop (the loop guard's `min_repeats`).
const MIN_REPEATS: usize = 3;
/// Seeds the sampled control is averaged over.
const SEEDS: [u64; 3] = [1, 2, 3];

const ENGLISH: [&str; 8] = [
    "The weather today is",
    "Once upon a time, there was a little girl who",
    "The capital of France is",
    "To make a cup of tea, first",
    "In the beginning of the twentieth century, scientists discovered",
    "My favourite book is about",
    "The quick brown fox jumps over the lazy dog and then",
    "Here is a short list of things to pack for a trip:",
];

const CHINESE: [&str; 8] = [
    "今天的天气",
    "从前有一个小女孩，她",
    "法国的首都是",
    "泡一杯茶，首先",
    "二十世纪初，科学家们发现",
    "我最喜欢的书讲的是",
    "风和日丽的早晨，我们",
    "下面是旅行需要带的东西：",
];

/// Whether `tokens` ends in a unit of 1..=`MAX_PERIOD` tokens repeated `MIN_REPEATS` times in a
/// row: the token rule of the coordinator's `LoopGuard`, applied to the whole sequence so far.
fn ends_in_loop(tokens: &[u32]) -> bool {
    loop_period(tokens).is_some()
}

/// The shortest unit `tokens` ends in `MIN_REPEATS` copies of, if any.
fn loop_period(tokens: &[u32]) -> Option<usize> {
    let n = tokens.len();
    (1..=MAX_PERIOD).take_while(|p| p * MIN_REPEATS <= n).find(|&period| {
        let tail = &tokens[n - period * MIN_REPEATS..];
        let unit = &tail[tail.len() - period..];
        tail.chunks_exact(period).all(|c| c == unit)
    })
}

/// 1 − distinct 4-grams / 4-grams; 0 for a generation too short to have a 4-gram.
fn seq_rep_4(tokens: &[u32]) -> f64 {
    let total = tokens.windows(4).count();
    if total == 0 {
        return 0.0;
    }
    let distinct: HashSet<&[u32]> = tokens.windows(4).collect();
    1.0 - distinct.len() as f64 / total as f64
}

/// Distinct bigrams / bigrams; 0 for a generation too short to have one.
fn distinct_2(tokens: &[u32]) -> f64 {
    let total = tokens.windows(2).count();
    if total == 0 {
        return 0.0;
    }
    let distinct: HashSet<&[u32]> = tokens.windows(2).collect();
    distinct.len() as f64 / total as f64
}

/// Length of the longest run of one token repeated back to back.
fn longest_run(tokens: &[u32]) -> f64 {
    tokens.chunk_by(|a, b| a == b).map(<[u32]>::len).max().unwrap_or(0) as f64
}

/// Generates up to `NEW_TOKENS` tokens after `prompt`; with `guard`, stops after the first token
/// that closes a loop. Returns the generated tokens.
fn generate(model: &Model, prompt: &[u32], params: &SamplingParams, guard: bool) -> anyhow::Result<Vec<u32>> {
    let mut kv = model.new_kv_cache();
    let mut sampler = Sampler::new(params.clone());
    sampler.observe_prompt(prompt);
    let mut out = Vec::with_capacity(NEW_TOKENS);
    let mut pos = 0;
    let mut input = prompt.to_vec();
    while out.len() < NEW_TOKENS {
        let chunk = [SeqChunk { seq: 0, start: pos, len: input.len() }];
        let logits = model.forward(&Batch { tokens: &input, chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk)?;
        let row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        let token = sampler.sample(&row);
        out.push(token);
        if guard && ends_in_loop(&out) {
            break;
        }
        pos += input.len();
        input = vec![token];
    }
    Ok(out)
}

/// The loop guard's remedy, as the coordinator applies it (`coordinator/src/generation.rs`):
/// greedy until the tail loops, then `REMEDY_TOKENS` tokens at temperature `REMEDY_T` with the
/// same sampler (so the same random stream), then greedy again with the guard looking only at
/// what came after the remedy started; after `MAX_REMEDIES` remedies the next loop stops.
/// Returns the tokens and how many remedies ran.
fn generate_with_remedy(model: &Model, prompt: &[u32], seed: u64) -> anyhow::Result<(Vec<u32>, usize)> {
    let greedy = SamplingParams { seed, ..SamplingParams::greedy() };
    let mut kv = model.new_kv_cache();
    let mut sampler = Sampler::new(greedy.clone());
    let mut out = Vec::with_capacity(NEW_TOKENS);
    let (mut pos, mut input) = (0, prompt.to_vec());
    let (mut remedies, mut remedy_left, mut since) = (0, 0, 0);
    while out.len() < NEW_TOKENS {
        let chunk = [SeqChunk { seq: 0, start: pos, len: input.len() }];
        let logits = model.forward(&Batch { tokens: &input, chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk)?;
        let token = sampler.sample(&logits.squeeze(0)?.to_vec1::<f32>()?);
        out.push(token);
        if remedy_left > 0 {
            remedy_left -= 1;
            if remedy_left == 0 {
                sampler.set_params(greedy.clone());
            }
        }
        if ends_in_loop(&out[since..]) {
            if remedies == MAX_REMEDIES {
                break;
            }
            remedies += 1;
            remedy_left = REMEDY_TOKENS;
            since = out.len();
            sampler.set_params(SamplingParams { temperature: REMEDY_T, ..greedy.clone() });
        }
        pos += input.len();
        input = vec![token];
    }
    Ok((out, remedies))
}

/// The remedy row's settings: the API's defaults for `LOOP_ACTION_RAISE_TEMPERATURE`.
const REMEDY_T: f32 = 1.0;
const REMEDY_TOKENS: usize = 32;
const MAX_REMEDIES: usize = 3;

/// One control's generations, one per prompt (and per seed for the sampled control).
struct Outcome {
    name: &'static str,
    /// (prompt index, generated tokens).
    runs: Vec<(usize, Vec<u32>)>,
}

impl Outcome {
    fn mean(&self, f: impl Fn(&[u32]) -> f64) -> f64 {
        self.runs.iter().map(|(_, t)| f(t)).sum::<f64>() / self.runs.len() as f64
    }

    fn stuck_share(&self, lang: impl Fn(usize) -> bool) -> f64 {
        let runs: Vec<_> = self.runs.iter().filter(|(p, _)| lang(*p)).collect();
        runs.iter().filter(|(_, t)| ends_in_loop(t)).count() as f64 / runs.len() as f64
    }
}

/// One markdown row of the results table; `stuck_label` prefixes the stuck share.
fn table_row(o: &Outcome, stuck_label: &str) -> String {
    format!(
        "| {} | {:.3} | {:.3} | {stuck_label}{:.0}% | {:.0}% | {:.0}% | {:.1} | {:.1} |",
        o.name,
        o.mean(seq_rep_4),
        o.mean(distinct_2),
        100.0 * o.stuck_share(|_| true),
        100.0 * o.stuck_share(|p| p < ENGLISH.len()),
        100.0 * o.stuck_share(|p| p >= ENGLISH.len()),
        o.mean(longest_run),
        o.mean(|t| t.len() as f64),
    )
}

/// Copies of `tokens[at - period..at]` that `tokens` holds in a row from `at - MIN_REPEATS·period`.
fn copies_from(tokens: &[u32], at: usize, period: usize) -> usize {
    let unit = &tokens[at - period..at];
    MIN_REPEATS + tokens[at..].chunks(period).take_while(|c| *c == unit).count()
}

fn load(spec: &FixtureSpec, root: &std::path::Path) -> anyhow::Result<Model> {
    let dir = fixture::write_fixture(spec, root, &WriteOptions::default())?;
    Ok(Model::load(&dir, &LoadConfig::default())?)
}

fn variant(name: &'static str, overrides: serde_json::Value) -> FixtureSpec {
    let mut spec = FixtureSpec { name, ..fixture::demo() };
    if let (Some(config), Some(o)) = (spec.config.as_object_mut(), overrides.as_object()) {
        config.extend(o.clone());
    }
    spec
}

fn greedy_runs(model: &Model, prompts: &[Vec<u32>]) -> anyhow::Result<Outcome> {
    let runs = prompts.iter().enumerate().map(|(i, p)| Ok((i, generate(model, p, &SamplingParams::greedy(), false)?)));
    Ok(Outcome { name: "greedy", runs: runs.collect::<anyhow::Result<_>>()? })
}

/// Runs every control on `model` and prints its table and the loop guard's check.
fn bench_model(title: &str, model: &Model, prompts: &[Vec<u32>]) -> anyhow::Result<()> {
    let greedy = SamplingParams::greedy();
    let controls: Vec<(&'static str, Vec<SamplingParams>)> = vec![
        ("repetition_penalty 1.3", vec![SamplingParams { repetition_penalty: 1.3, ..greedy.clone() }]),
        ("presence 0.6 + frequency 0.6", vec![SamplingParams { presence_penalty: 0.6, frequency_penalty: 0.6, ..greedy.clone() }]),
        ("no_repeat_ngram_size 3", vec![SamplingParams { no_repeat_ngram_size: 3, ..greedy.clone() }]),
        (
            "DRY 0.8 / 1.75 / 2",
            vec![SamplingParams {
                dry: DryParams { multiplier: 0.8, base: 1.75, allowed_length: 2, ..DryParams::default() },
                ..greedy.clone()
            }],
        ),
        (
            "top-p 0.9, T 0.8 (3 seeds)",
            SEEDS.iter().map(|&seed| SamplingParams { temperature: 0.8, top_p: Some(0.9), seed, ..greedy.clone() }).collect(),
        ),
    ];

    let mut outcomes = vec![greedy_runs(model, prompts)?];
    for (name, params) in &controls {
        let mut runs = Vec::new();
        for p in params {
            for (i, prompt) in prompts.iter().enumerate() {
                runs.push((i, generate(model, prompt, p, false)?));
            }
        }
        outcomes.push(Outcome { name, runs });
    }
    let guard_runs = prompts.iter().enumerate().map(|(i, p)| Ok((i, generate(model, p, &greedy, true)?)));
    let guarded = Outcome { name: "loop guard (greedy, stop)", runs: guard_runs.collect::<anyhow::Result<_>>()? };
    let mut remedy_runs = Vec::new();
    let mut remedies = 0;
    for &seed in &SEEDS {
        for (i, p) in prompts.iter().enumerate() {
            let (tokens, n) = generate_with_remedy(model, p, seed)?;
            remedies += n;
            remedy_runs.push((i, tokens));
        }
    }
    let remedied = Outcome { name: "loop guard (greedy, raise T 1.0 × 32 tokens, ≤ 3 times; 3 seeds)", runs: remedy_runs };

    let greedy_out = &outcomes[0].runs;
    let mut periods: Vec<usize> = greedy_out.iter().filter_map(|(_, t)| loop_period(t)).collect();
    periods.sort_unstable();
    println!();
    println!("### {title}");
    println!();
    println!("greedy: loop periods of the stuck generations {periods:?}");
    println!();
    println!("| control | seq-rep-4 | distinct-2 | stuck in a loop | en | zh | longest one-token run | mean new tokens |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for o in &outcomes {
        println!("{}", table_row(o, ""));
    }
    // Under the guard a generation is stuck exactly when it was stopped.
    println!("{}", table_row(&guarded, "stopped "));
    println!("{}", table_row(&remedied, ""));

    // The guard against the metric: which stopped generations does the metric not call stuck?
    let mut stopped = 0;
    let mut not_stuck = Vec::new();
    for (p, t) in &guarded.runs {
        let full = &greedy_out[*p].1;
        // Same model, same argmax: the guarded run is the greedy run cut short.
        anyhow::ensure!(full.starts_with(t), "prompt {p}: the guarded run is not a prefix of the greedy run");
        if t.len() < NEW_TOKENS {
            stopped += 1;
            if !ends_in_loop(full) {
                let period = loop_period(t).unwrap_or(0);
                not_stuck.push(format!(
                    "prompt {p}: stopped after {} tokens on a {period}-token unit; the full run repeats it {} times, then leaves it",
                    t.len(),
                    copies_from(full, t.len(), period.max(1))
                ));
            }
        }
    }
    let missed = greedy_out.iter().filter(|(p, t)| ends_in_loop(t) && guarded.runs[*p].1.len() == NEW_TOKENS).count();
    println!();
    println!(
        "loop guard: stopped {stopped}/{} generations; {} of them are not stuck by the metric; {missed} stuck generations not stopped",
        guarded.runs.len(),
        not_stuck.len()
    );
    for line in &not_stuck {
        println!("  {line}");
    }
    let stopped_after = remedied.runs.iter().filter(|(_, t)| t.len() < NEW_TOKENS).count();
    println!(
        "loop guard remedy: {remedies} remedies over {} generations ({:.2} each); {stopped_after} stopped after the third",
        remedied.runs.len(),
        remedies as f64 / remedied.runs.len() as f64
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let root = tempfile::tempdir()?;
    let tokenizer = fixture_tokenizer()?;
    let prompts: Vec<Vec<u32>> = ENGLISH
        .iter()
        .chain(CHINESE.iter())
        .map(|text| tokenizer.encode(*text, false).map(|e| e.get_ids().to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("encoding a prompt: {e}"))?;
    println!(
        "{} prompts ({} en, {} zh, {}–{} tokens), {NEW_TOKENS} new tokens each, f32, TP=1, threads {}",
        prompts.len(),
        ENGLISH.len(),
        CHINESE.len(),
        prompts.iter().map(Vec::len).min().unwrap_or(0),
        prompts.iter().map(Vec::len).max().unwrap_or(0),
        candle_core::utils::get_num_threads()
    );

    // The check: does greedy decoding of the demo fixture as written loop on most prompts?
    let demo = greedy_runs(&load(&fixture::demo(), root.path())?, &prompts)?;
    println!(
        "demo fixture as written (4 layers, untied, seed 2026): greedy generations stuck in a loop {:.0}%, seq-rep-4 {:.3}",
        100.0 * demo.stuck_share(|_| true),
        demo.mean(seq_rep_4)
    );

    let weak = variant("demo-1-layer", json!({"num_hidden_layers": 1}));
    bench_model("demo, 1 layer (weak loops)", &load(&weak, root.path())?, &prompts)?;
    let strong = variant("demo-tied", json!({"tie_word_embeddings": true}));
    bench_model("demo, tied embeddings (strong loops)", &load(&strong, root.path())?, &prompts)?;
    println!();
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
