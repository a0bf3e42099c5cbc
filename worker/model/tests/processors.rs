//! The repetition controls and warpers of `tessera_model::logits` against Hugging Face
//! transformers (goldens from `scripts/golden/make_processor_golden.py`), hand-computed cases for
//! the ones transformers lacks (presence/frequency penalties, DRY), the sampler applying them in
//! the same order, `no_repeat_ngram_size` breaking a model that loops under greedy decoding, and
//! validation errors that name their field.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use serde_json::Value;
use tessera_collective::SingleRank;
use tessera_model::fixture::scripted::{write_scripted, Script};
use tessera_model::fixture::WriteOptions;
use tessera_model::logits::{self, dry_penalty, presence_frequency_penalty, repetition_penalty, DryParams, TokenHistory};
use tessera_model::sampler::{
    argmax, Sampler, SamplingParams, SeededRng, MAX_DRY_ALLOWED_LENGTH, MAX_DRY_BREAKERS, MAX_DRY_BREAKER_TOKENS, MAX_NO_REPEAT_NGRAM_SIZE,
};
use tessera_model::{Batch, LoadConfig, LogitsMode, Model, SeqChunk};

/// Largest relative difference allowed on unmasked logits: transformers and Tessera do the same
/// f32 operations, so only the order of a multiply and a divide can differ (a few ulps).
const REL_TOL: f32 = 1e-6;

// ---------------------------------------------------------------------------------------------
// Goldens

struct Case {
    name: String,
    vocab: usize,
    prompt_len: usize,
    do_sample: bool,
    params: Value,
    processors: Vec<String>,
    logits: Vec<f32>,
    input_ids: Vec<u32>,
    expected: Vec<f32>,
}

impl Case {
    fn sampling_params(&self) -> SamplingParams {
        let f = |k: &str| self.params.get(k).and_then(Value::as_f64).map(|v| v as f32);
        let u = |k: &str| self.params.get(k).and_then(Value::as_u64).map(|v| v as usize);
        SamplingParams {
            // transformers' greedy path runs no warpers; Tessera's is temperature 0.
            temperature: if self.do_sample { f("temperature").unwrap_or(1.0) } else { 0.0 },
            top_k: u("top_k"),
            top_p: f("top_p"),
            min_p: f("min_p").unwrap_or(0.0),
            repetition_penalty: f("repetition_penalty").unwrap_or(1.0),
            no_repeat_ngram_size: u("no_repeat_ngram_size").unwrap_or(0),
            ..Default::default()
        }
    }

    fn history(&self) -> TokenHistory {
        let (prompt, generated) = self.input_ids.split_at(self.prompt_len);
        TokenHistory::from_tokens(prompt, generated)
    }
}

fn golden() -> (HashMap<String, String>, Vec<Case>) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/processors.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("golden header");
    let meta = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu).expect("golden tensors");
    let cases: Value = serde_json::from_str(meta.get("cases").expect("cases metadata")).expect("cases JSON");
    let cases = cases
        .as_array()
        .expect("cases is a list")
        .iter()
        .map(|c| {
            let name = c["name"].as_str().expect("case name").to_string();
            let row = |k: &str| tensors[&format!("{name}.{k}")].to_vec1::<f32>().expect("f32 row");
            let ids = tensors[&format!("{name}.input_ids")].to_vec1::<i64>().expect("int64 ids");
            let input_ids = ids.into_iter().map(|v| v as u32).collect();
            Case {
                vocab: c["vocab"].as_u64().expect("vocab") as usize,
                prompt_len: c["prompt_len"].as_u64().expect("prompt_len") as usize,
                do_sample: c["do_sample"].as_bool().expect("do_sample"),
                params: c["params"].clone(),
                processors: c["processors"]
                    .as_array()
                    .expect("processors")
                    .iter()
                    .map(|p| p.as_str().expect("class name").to_string())
                    .collect(),
                logits: row("logits"),
                expected: row("expected"),
                input_ids,
                name,
            }
        })
        .collect();
    (meta, cases)
}

/// Largest relative difference over unmasked entries; panics unless the −∞ masks are identical.
fn compare(name: &str, ours: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(ours.len(), expected.len(), "{name}: row length");
    let mut worst = 0f32;
    for (i, (&o, &e)) in ours.iter().zip(expected).enumerate() {
        if e == f32::NEG_INFINITY || o == f32::NEG_INFINITY {
            assert_eq!(o, e, "{name}: token {i} masked on one side only (ours {o}, transformers {e})");
            continue;
        }
        let rel = if e == 0.0 { o.abs() } else { (o - e).abs() / e.abs() };
        assert!(rel <= REL_TOL, "{name}: token {i}: ours {o}, transformers {e} (relative {rel:e})");
        worst = worst.max(rel);
    }
    worst
}

#[test]
fn processors_match_transformers() {
    let (meta, cases) = golden();
    for key in ["transformers_version", "torch_version", "seed"] {
        assert!(meta.contains_key(key), "golden metadata lacks {key}");
    }
    assert!(cases.len() >= 20, "only {} golden cases", cases.len());
    for case in &cases {
        assert_eq!(case.logits.len(), case.vocab, "{}", case.name);
        let mut ours = case.logits.clone();
        logits::process(&mut ours, &case.sampling_params(), &case.history());
        let worst = compare(&case.name, &ours, &case.expected);
        let masked = ours.iter().filter(|l| l.is_infinite()).count();
        eprintln!("{}: {:?} — max relative diff {worst:.2e}, {masked} masked", case.name, case.processors);
    }
    eprintln!("transformers {} torch {}", meta["transformers_version"], meta["torch_version"]);
}

/// The chain cases were built by transformers' `generate` machinery itself; the classes it chose
/// must be, in order, the steps Tessera documents for the same settings.
#[test]
fn transformers_orders_processors_as_tessera_does() {
    let (_, cases) = golden();
    let mut chains = 0;
    for case in cases.iter().filter(|c| c.name.starts_with("chain_")) {
        let p = case.sampling_params();
        let steps = [
            (p.repetition_penalty != 1.0, "RepetitionPenaltyLogitsProcessor"),
            (p.no_repeat_ngram_size > 0, "NoRepeatNGramLogitsProcessor"),
            (p.temperature > 0.0 && p.temperature != 1.0, "TemperatureLogitsWarper"),
            (p.temperature > 0.0 && p.top_k.is_some(), "TopKLogitsWarper"),
            (p.temperature > 0.0 && p.top_p.is_some(), "TopPLogitsWarper"),
            (p.temperature > 0.0 && p.min_p > 0.0, "MinPLogitsWarper"),
        ];
        let ours: Vec<&str> = steps.iter().filter(|(on, _)| *on).map(|(_, name)| *name).collect();
        assert_eq!(case.processors, ours, "{}", case.name);
        chains += 1;
    }
    assert!(chains >= 4, "only {chains} chain cases");
}

/// The sampler works on a sorted candidate list, not a masked row; what it can draw, and how
/// often, must still be the softmax of the full-row chain transformers computed.
#[test]
fn the_sampler_draws_from_the_golden_chains() {
    let (_, cases) = golden();
    for case in cases.iter().filter(|c| c.name.starts_with("chain_")) {
        let params = case.sampling_params();
        let (prompt, generated) = case.input_ids.split_at(case.prompt_len);
        let sampler_for = |seed: u64| {
            let mut s = Sampler::new(SamplingParams { seed, ..params.clone() });
            s.observe_prompt(prompt);
            s.observe_generated(generated);
            s
        };
        if !case.do_sample {
            assert_eq!(sampler_for(0).sample(&case.logits), argmax(&case.expected), "{}: greedy pick", case.name);
            continue;
        }
        let max = case.expected.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f64 = case.expected.iter().map(|&l| ((l - max) as f64).exp()).sum();
        let draws = 3000;
        let mut counts = HashMap::<u32, usize>::new();
        for seed in 0..draws {
            let t = sampler_for(seed).sample(&case.logits);
            assert!(case.expected[t as usize].is_finite(), "{}: drew masked token {t}", case.name);
            *counts.entry(t).or_default() += 1;
        }
        for (&t, &c) in &counts {
            let p = ((case.expected[t as usize] - max) as f64).exp() / z;
            let freq = c as f64 / draws as f64;
            let sd = (p * (1.0 - p) / draws as f64).sqrt();
            let name = &case.name;
            assert!((freq - p).abs() <= 5.0 * sd + 1e-9, "{name}: token {t}: frequency {freq} vs probability {p}");
        }
        eprintln!("{}: {} distinct tokens in {draws} draws", case.name, counts.len());
    }
}

// ---------------------------------------------------------------------------------------------
// Presence and frequency (OpenAI), worked by hand

#[test]
fn presence_and_frequency_count_generated_tokens_only() {
    // Prompt 0 4 4, then generated 1 1 1 3 5: counts 1→3, 3→1, 5→1; tokens 0, 2, 4 untouched.
    let h = TokenHistory::from_tokens(&[0, 4, 4], &[1, 1, 1, 3, 5]);
    let logits = [1.0f32, 2.0, -1.0, 0.5, 3.0, 0.0];

    // presence 0.5, frequency 0.25: token 1: 2 − (0.5 + 3·0.25) = 0.75; token 3: 0.5 − 0.75 =
    // −0.25; token 5: 0 − 0.75 = −0.75.
    let mut both = logits;
    presence_frequency_penalty(&mut both, &h, 0.5, 0.25);
    assert_eq!(both, [1.0, 0.75, -1.0, -0.25, 3.0, -0.75]);

    // Presence alone is once per token, whatever the count: 2 − 0.5, 0.5 − 0.5, 0 − 0.5.
    let mut presence = logits;
    presence_frequency_penalty(&mut presence, &h, 0.5, 0.0);
    assert_eq!(presence, [1.0, 1.5, -1.0, 0.0, 3.0, -0.5]);

    // Frequency alone scales with the count: 2 − 0.75, 0.5 − 0.25, 0 − 0.25.
    let mut frequency = logits;
    presence_frequency_penalty(&mut frequency, &h, 0.0, 0.25);
    assert_eq!(frequency, [1.0, 1.25, -1.0, 0.25, 3.0, -0.25]);

    // Negative values encourage: presence −0.5 adds 0.5.
    let mut negative = logits;
    presence_frequency_penalty(&mut negative, &h, -0.5, 0.0);
    assert_eq!(negative, [1.0, 2.5, -1.0, 1.0, 3.0, 0.5]);

    // The repetition penalty, unlike them, also counts the prompt: every distinct token of
    // 0 4 1 3 5 is divided by 2 (multiplied when negative); token 2 never occurred.
    let mut rep = logits;
    repetition_penalty(&mut rep, &h, 2.0);
    assert_eq!(rep, [0.5, 1.0, -1.0, 0.25, 1.5, 0.0]);

    assert_eq!(h.generated_len(), 5);
    let mut counts: Vec<(u32, u32)> = h.generated_counts().collect();
    counts.sort();
    assert_eq!(counts, [(1, 3), (3, 1), (5, 1)]);
}

/// Greedy decoding of a fixed row shows the three controls act differently.
#[test]
fn the_sampler_applies_each_penalty_to_its_own_history() {
    let row = [0.0f32, 1.0, 0.75];
    let run = |params: SamplingParams, prompt: &[u32], steps: usize| {
        let mut s = Sampler::new(params);
        s.observe_prompt(prompt);
        (0..steps).map(|_| s.sample(&row)).collect::<Vec<u32>>()
    };
    // Frequency 0.5 (counts c0, c1, c2 after each step):
    //   1 (1.0 > 0.75)                  → c1=1
    //   2 (1 − 0.5 = 0.5 < 0.75)        → c2=1
    //   1 (0.5 > 0.75 − 0.5 = 0.25)     → c1=2
    //   2 (0.0 < 0.25)                  → c2=2
    //   0 (0, 0, −0.25: tie, lowest id) → c0=1
    //   1 (−0.5, 0, −0.25)              → c1=3
    //   2 (−0.5, −0.5, −0.25)
    let frequency = SamplingParams { frequency_penalty: 0.5, ..Default::default() };
    assert_eq!(run(frequency.clone(), &[], 7), [1, 2, 1, 2, 0, 1, 2]);
    // The prompt does not count for frequency: same picks after a prompt full of token 1.
    assert_eq!(run(frequency, &[1, 1, 1], 7), [1, 2, 1, 2, 0, 1, 2]);
    // Presence 0.5 is paid once: 1, then 2 (0.5 < 0.75), then 1 for ever (0.5 > 0.25 > 0).
    let presence = SamplingParams { presence_penalty: 0.5, ..Default::default() };
    assert_eq!(run(presence, &[], 5), [1, 2, 1, 1, 1]);
    // The repetition penalty counts the prompt: 1.0 / 2 = 0.5 < 0.75, so token 2 first.
    let rep = SamplingParams { repetition_penalty: 2.0, ..Default::default() };
    assert_eq!(run(rep, &[1], 1), [2]);
}

#[test]
fn with_every_penalty_off_the_sampler_is_unchanged_and_records_nothing() {
    let row: Vec<f32> = (0..50).map(|i| ((i * 37 % 11) as f32) * 0.3).collect();
    let params = SamplingParams { temperature: 0.9, top_k: Some(20), top_p: Some(0.9), seed: 5, ..Default::default() };
    assert!(!params.needs_history());
    let mut plain = Sampler::new(params.clone());
    let mut observed = Sampler::new(params);
    observed.observe_prompt(&[1, 2, 3, 1, 2, 3]);
    assert!(observed.history().is_none());
    let a: Vec<u32> = (0..100).map(|_| plain.sample(&row)).collect();
    let b: Vec<u32> = (0..100).map(|_| observed.sample(&row)).collect();
    assert_eq!(a, b);
}

// ---------------------------------------------------------------------------------------------
// DRY (llama.cpp), worked by hand

/// llama.cpp's own example (`llama_sampler_dry_apply`): a b c c b c y a b c, with a=0 b=1 c=2
/// y=3. Suffixes of the context that recur end at: index 2 ("a b c", 3 long, next c), index 3
/// ("c", 1, next b) and index 5 ("b c", 2, next y). With allowed_length 2, c is penalised
/// 0.8·1.75^(3−2) = 1.4 and y 0.8·1.75^0 = 0.8; b's repeat is too short.
const ABC: [u32; 10] = [0, 1, 2, 2, 1, 2, 3, 0, 1, 2];

fn dry(params: DryParams) -> Vec<f32> {
    let mut row = vec![0f32; 5];
    dry_penalty(&mut row, &ABC, &params);
    row
}

fn base_dry() -> DryParams {
    DryParams { multiplier: 0.8, base: 1.75, allowed_length: 2, ..Default::default() }
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{got:?} vs {want:?}");
    }
}

#[test]
fn dry_penalises_the_token_that_extends_the_longest_repeat() {
    assert_close(&dry(base_dry()), &[0.0, 0.0, -1.4, -0.8, 0.0]);
    // allowed_length 1: c 0.8·1.75², y 0.8·1.75, b 0.8.
    assert_close(&dry(DryParams { allowed_length: 1, ..base_dry() }), &[0.0, -0.8, -2.45, -1.4, 0.0]);
    // Off: no multiplier, or a base below 1 (llama.cpp's rule), or no tokens to look at.
    assert_eq!(dry(DryParams { multiplier: 0.0, ..base_dry() }), [0.0; 5]);
    assert_eq!(dry(DryParams { base: 0.9, ..base_dry() }), [0.0; 5]);
    assert_eq!(dry(DryParams { penalty_last_n: Some(0), ..base_dry() }), [0.0; 5]);
}

#[test]
fn dry_looks_only_at_the_last_n_tokens() {
    // Window y a b c: nothing in it recurs.
    assert_eq!(dry(DryParams { penalty_last_n: Some(4), ..base_dry() }), [0.0; 5]);
    // Window c b c y a b c: "c" at index 0 (next b, 1 long) and "b c" at index 2 (next y, 2 long):
    // only y reaches allowed_length. The long "a b c" repeat starts outside the window.
    assert_close(&dry(DryParams { penalty_last_n: Some(7), ..base_dry() }), &[0.0, 0.0, 0.0, -0.8, 0.0]);
}

#[test]
fn dry_sequence_breakers_cut_repeats() {
    // y is a breaker 3 tokens from the end: repeats are capped at 3 (c keeps its 3), and a
    // single-token breaker is never penalised itself.
    let y = DryParams { sequence_breakers: vec![vec![3]], ..base_dry() };
    assert_close(&dry(y), &[0.0, 0.0, -1.4, 0.0, 0.0]);
    // b is a breaker 1 token from the end: the cap is 1 < allowed_length, so nothing at all.
    let b = DryParams { sequence_breakers: vec![vec![1]], ..base_dry() };
    assert_eq!(dry(b), [0.0; 5]);
    // The two-token breaker "y a" starts 3 from the end and its tail takes 1 more: cap 3 − 1 = 2,
    // so c's repeat counts 2 (penalty 0.8·1.75^0), and y, not a single-token breaker, pays 0.8.
    let ya = DryParams { sequence_breakers: vec![vec![3, 0]], ..base_dry() };
    assert_close(&dry(ya), &[0.0, 0.0, -0.8, -0.8, 0.0]);
    // A breaker whose tail does not follow its head ("y b") does not break.
    let yb = DryParams { sequence_breakers: vec![vec![3, 1]], ..base_dry() };
    assert_close(&dry(yb), &[0.0, 0.0, -1.4, -0.8, 0.0]);
}

#[test]
fn dry_clamps_the_exponent_so_the_penalty_stays_finite() {
    // 200 × token 0: the repeat that next 0 would extend is 199 long; 2^(199−2) would overflow
    // f32, so the exponent is clamped to ⌊88.72 / ln 2⌋ = 128, as in llama.cpp.
    let tokens = vec![0u32; 200];
    let mut row = vec![0f32; 2];
    dry_penalty(&mut row, &tokens, &DryParams { multiplier: 0.8, base: 2.0, allowed_length: 2, ..Default::default() });
    assert_eq!(row, [-((0.8f64 * 2f64.powi(128)) as f32), 0.0]);
    assert!(row[0].is_finite());
}

/// The definition DRY computes, by brute force: for each earlier position, the longest common
/// suffix with the whole window (capped by the most recent breaker).
fn naive_dry(logits: &mut [f32], tokens: &[u32], p: &DryParams) {
    let n = tokens.len().min(p.penalty_last_n.unwrap_or(usize::MAX));
    if !p.enabled() || n <= p.allowed_length {
        return;
    }
    let w = &tokens[tokens.len() - n..];
    let mut limit = n;
    'scan: for i in 0..n {
        let pos = n - 1 - i;
        let mut longest = None::<usize>;
        for b in &p.sequence_breakers {
            let tail = b.len() - 1;
            if b[0] == w[pos] && tail <= i && w[pos + 1..=pos + tail] == b[1..] && longest.is_none_or(|l| tail > l) {
                longest = Some(tail);
            }
        }
        if let Some(l) = longest {
            limit = i - l;
            break 'scan;
        }
    }
    if limit < p.allowed_length {
        return;
    }
    let mut best = HashMap::<u32, usize>::new();
    for end in 0..n - 1 {
        let len = (0..=end).take_while(|&j| w[end - j] == w[n - 1 - j]).count().min(limit);
        if len >= p.allowed_length {
            let e = best.entry(w[end + 1]).or_insert(len);
            *e = (*e).max(len);
        }
    }
    for (t, len) in best {
        if p.sequence_breakers.iter().any(|b| b == &[t]) {
            continue;
        }
        let exp = (len - p.allowed_length) as f64;
        logits[t as usize] -= (p.multiplier as f64 * (p.base as f64).powf(exp)) as f32;
    }
}

#[test]
fn dry_z_algorithm_equals_brute_force() {
    let mut rng = SeededRng::new(77);
    let mut below = |n: usize| (rng.next_u64() % n as u64) as usize;
    let mut scratch = logits::Dry::new();
    for trial in 0..400 {
        let alphabet = 2 + below(3);
        let len = below(60);
        let tokens: Vec<u32> = (0..len).map(|_| below(alphabet) as u32).collect();
        let breakers = (0..below(3)).map(|_| (0..1 + below(2)).map(|_| below(alphabet) as u32).collect()).collect();
        let params = DryParams {
            multiplier: 0.5,
            base: 1.5,
            allowed_length: below(4),
            penalty_last_n: if below(2) == 0 { None } else { Some(below(40)) },
            sequence_breakers: breakers,
        };
        let mut fast = vec![0f32; alphabet];
        scratch.apply(&mut fast, &tokens, &params);
        let mut slow = vec![0f32; alphabet];
        naive_dry(&mut slow, &tokens, &params);
        assert_eq!(fast, slow, "trial {trial}: tokens {tokens:?}, {params:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// No-repeat n-gram in a real decode loop

fn ngrams(tokens: &[u32], n: usize) -> Option<Vec<u32>> {
    let mut seen = HashSet::new();
    tokens.windows(n).find(|w| !seen.insert(w.to_vec())).map(<[u32]>::to_vec)
}

/// Greedy (or sampled) decoding of a scripted fixture through `sampler`, `steps` tokens.
fn decode(model: &Model, prompt: &[u32], mut sampler: Sampler, steps: usize) -> Vec<u32> {
    let mut kv = model.new_kv_cache();
    sampler.observe_prompt(prompt);
    let mut fed = prompt.to_vec();
    let mut start = 0;
    let mut out = Vec::new();
    while out.len() < steps {
        let chunk = [SeqChunk { seq: 1, start, len: fed.len() }];
        let logits =
            model.forward(&Batch { tokens: &fed, chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk).expect("forward");
        let row = logits.to_vec2::<f32>().expect("logits to host").remove(0);
        let next = sampler.sample(&row);
        out.push(next);
        start += fed.len();
        fed = vec![next];
    }
    out
}

#[test]
fn no_repeat_ngram_breaks_a_greedy_loop() {
    let cycle = [40u32, 77, 150, 299, 12];
    let script = Script::cycle("processors-cycle", &cycle).expect("cycle");
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("processors-{}", std::process::id()));
    let dir = write_scripted(&script, &root, &WriteOptions::default()).expect("write scripted fixture");
    let model = Model::load(&dir, &LoadConfig::default()).expect("load");
    let prompt = [cycle[0]];
    let steps = 60;

    // Without a ban the model loops for ever.
    let looped = decode(&model, &prompt, Sampler::new(SamplingParams::greedy()), steps);
    assert_eq!(looped, script.follow(cycle[0], steps), "the fixture must loop under plain greedy");

    for n in [2, 3, 4] {
        let params = SamplingParams { no_repeat_ngram_size: n, ..Default::default() };
        let out = decode(&model, &prompt, Sampler::new(params), steps);
        let all: Vec<u32> = prompt.iter().chain(&out).copied().collect();
        assert_eq!(ngrams(&all, n), None, "n={n}: an n-gram repeats in {all:?}");
        // The first n-gram of the cycle closes after n tokens of its second lap, and is banned.
        assert_eq!(out[..cycle.len() + n - 2], looped[..cycle.len() + n - 2], "n={n}: the ban came too early");
        assert_ne!(out[cycle.len() + n - 2], looped[cycle.len() + n - 2], "n={n}: the loop was not broken");
        eprintln!("n={n}: {out:?}");
    }

    // DRY breaks it too, once the penalty 2^(repeat − 2) outgrows the scripted margin (~90).
    let dry =
        SamplingParams { dry: DryParams { multiplier: 1.0, base: 2.0, allowed_length: 2, ..Default::default() }, ..Default::default() };
    let out = decode(&model, &prompt, Sampler::new(dry), steps);
    let first_break = out.iter().zip(&looped).position(|(a, b)| a != b).expect("DRY never broke the loop");
    // A repeat of r tokens costs 2^(r−2); the margin is under 2^7, so r ≤ 9 suffices, reached
    // 9 tokens into the second lap.
    assert!(first_break <= cycle.len() + 9, "DRY broke the loop only at step {first_break}: {out:?}");
    eprintln!("dry: first break at step {first_break}: {out:?}");

    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn sampling_with_an_ngram_ban_never_repeats_one() {
    // Vocabulary 64 where tokens 0..4 hold almost all the mass, so sampling wants to repeat.
    let row: Vec<f32> = (0..64).map(|i| if i < 4 { 8.0 } else { (i % 7) as f32 * 0.1 }).collect();
    for n in [1, 2, 3] {
        let params = SamplingParams { temperature: 1.0, seed: n as u64, no_repeat_ngram_size: n, ..Default::default() };
        let mut s = Sampler::new(params);
        let prompt = [0, 1, 2, 3];
        s.observe_prompt(&prompt);
        // n = 1 bans every token seen: 60 are left, 50 are used.
        let steps = if n == 1 { 50 } else { 150 };
        let out: Vec<u32> = (0..steps).map(|_| s.sample(&row)).collect();
        let all: Vec<u32> = prompt.iter().chain(&out).copied().collect();
        assert_eq!(ngrams(&all, n), None, "n={n}: {all:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Validation

#[test]
fn validation_accepts_defaults_and_edges() {
    let ok = [
        SamplingParams::default(),
        SamplingParams { temperature: 1.0, top_p: Some(1.0), min_p: 1.0, ..Default::default() },
        with(|p| (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) = (-2.0, 2.0, 0.01)),
        SamplingParams { no_repeat_ngram_size: MAX_NO_REPEAT_NGRAM_SIZE, ..Default::default() },
        SamplingParams {
            dry: DryParams {
                multiplier: 0.8,
                base: 1.0,
                allowed_length: MAX_DRY_ALLOWED_LENGTH,
                penalty_last_n: Some(0),
                sequence_breakers: vec![vec![1; MAX_DRY_BREAKER_TOKENS]; 3],
            },
            ..Default::default()
        },
        // DRY off: its other fields are never read, so an unset (zero) base is fine.
        SamplingParams { dry: DryParams { multiplier: 0.0, base: 0.0, ..Default::default() }, ..Default::default() },
    ];
    for p in ok {
        assert_eq!(p.validate(), Ok(()), "{p:?}");
    }
}

/// Default parameters changed by `f`.
fn with(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams::default();
    f(&mut p);
    p
}

/// DRY switched on (multiplier 0.8), then changed by `f`.
fn dry_with(f: impl FnOnce(&mut DryParams)) -> SamplingParams {
    with(|p| {
        p.dry.multiplier = 0.8;
        f(&mut p.dry);
    })
}

#[test]
fn validation_errors_name_the_field() {
    let bad: Vec<(&str, SamplingParams)> = vec![
        ("temperature", with(|p| p.temperature = -0.1)),
        ("temperature", with(|p| p.temperature = f32::NAN)),
        ("top_p", with(|p| p.top_p = Some(0.0))),
        ("top_p", with(|p| p.top_p = Some(1.5))),
        ("min_p", with(|p| p.min_p = -0.01)),
        ("min_p", with(|p| p.min_p = 1.01)),
        ("min_p", with(|p| p.min_p = f32::NAN)),
        ("repetition_penalty", with(|p| p.repetition_penalty = 0.0)),
        ("repetition_penalty", with(|p| p.repetition_penalty = -1.2)),
        ("repetition_penalty", with(|p| p.repetition_penalty = f32::INFINITY)),
        ("repetition_penalty", with(|p| p.repetition_penalty = f32::NAN)),
        ("presence_penalty", with(|p| p.presence_penalty = 2.5)),
        ("presence_penalty", with(|p| p.presence_penalty = f32::NEG_INFINITY)),
        ("frequency_penalty", with(|p| p.frequency_penalty = -2.01)),
        ("frequency_penalty", with(|p| p.frequency_penalty = f32::NAN)),
        ("no_repeat_ngram_size", with(|p| p.no_repeat_ngram_size = MAX_NO_REPEAT_NGRAM_SIZE + 1)),
        ("dry_multiplier", with(|p| p.dry.multiplier = -1.0)),
        ("dry_multiplier", with(|p| p.dry.multiplier = f32::NAN)),
        ("dry_base", dry_with(|d| d.base = 0.99)),
        ("dry_base", dry_with(|d| d.base = f32::INFINITY)),
        ("dry_allowed_length", dry_with(|d| d.allowed_length = MAX_DRY_ALLOWED_LENGTH + 1)),
        ("dry_sequence_breakers", dry_with(|d| d.sequence_breakers = vec![vec![1], vec![]])),
        ("dry_sequence_breakers", dry_with(|d| d.sequence_breakers = vec![vec![1; MAX_DRY_BREAKER_TOKENS + 1]])),
        ("dry_sequence_breakers", dry_with(|d| d.sequence_breakers = vec![vec![1]; MAX_DRY_BREAKERS + 1])),
    ];
    for (field, params) in bad {
        let err = params.validate().expect_err(field);
        assert_eq!(err.field, field, "{params:?}");
        let message = err.to_string();
        assert!(message.starts_with(field), "message {message:?} does not name {field}");
    }
}

/// Unvalidated values must not panic the sampler (the worker may be handed anything).
#[test]
fn the_sampler_survives_unvalidated_values() {
    let row: Vec<f32> = (0..16).map(|i| i as f32 * 0.25).collect();
    let wild = [
        SamplingParams { repetition_penalty: 0.0, ..Default::default() },
        SamplingParams { repetition_penalty: f32::NAN, temperature: 1.0, ..Default::default() },
        with(|p| (p.presence_penalty, p.frequency_penalty, p.temperature) = (f32::INFINITY, -1e30, 0.5)),
        SamplingParams { min_p: 7.0, temperature: 1.0, ..Default::default() },
        SamplingParams { no_repeat_ngram_size: 10_000, ..Default::default() },
        SamplingParams { no_repeat_ngram_size: 1, temperature: 1.0, ..Default::default() },
        dry_with(|d| (d.multiplier, d.base, d.allowed_length, d.sequence_breakers) = (1e30, 1e30, 0, vec![vec![]])),
    ];
    for params in wild {
        let mut s = Sampler::new(params.clone());
        s.observe_prompt(&[1, 2, 3, 1, 2, 3]);
        for _ in 0..40 {
            let t = s.sample(&row);
            assert!((t as usize) < row.len(), "{params:?}: token {t}");
        }
    }
}
