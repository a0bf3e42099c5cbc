//! Turning logits into the next token: greedy, temperature, top-k, top-p and min-p, after the
//! repetition penalties of [`crate::logits`], with a per-request seeded random stream so the same
//! request and seed always give the same tokens.
//!
//! Order: repetition penalty → presence/frequency penalty → DRY → n-gram ban (on raw logits, also
//! under greedy), then, when sampling, temperature → top-k → top-p → min-p, as transformers'
//! `generate` orders the ones it has (see [`crate::logits`]).

pub use crate::sampling::logits::DryParams;
use crate::sampling::logits::{apply_penalties, Dry, TokenHistory};

/// Largest `no_repeat_ngram_size` [`SamplingParams::validate`] accepts: each step scans the
/// history comparing n−1 tokens per window, and longer n-grams practically never repeat anyway.
pub const MAX_NO_REPEAT_NGRAM_SIZE: usize = 64;
/// Largest DRY `allowed_length` accepted: only longer repeats are penalised, and past this DRY
/// would practically never fire, while the search still costs O(window) per step.
pub const MAX_DRY_ALLOWED_LENGTH: usize = 1024;
/// Most DRY sequence breakers accepted: the coordinator's 16 strings of up to 256 bytes each
/// tokenize to at most 4096 tokens.
pub const MAX_DRY_BREAKERS: usize = 4096;
/// Most tokens in one DRY sequence breaker (llama.cpp keeps a head and at most 20 tail tokens).
pub const MAX_DRY_BREAKER_TOKENS: usize = 21;
/// Most tokens one request may bias (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;
/// Largest bias magnitude (OpenAI's range: ±100 bans or forces a token).
pub const MAX_BIAS: f32 = 100.0;

/// Per-request sampling settings. [`SamplingParams::validate`] checks ranges at the API edge.
/// The sampler never panics on unvalidated values, but what it draws from them is unspecified
/// (a negative top-p keeps one token, a NaN DRY multiplier is off, NaN logits are skipped).
///
/// `Default` is greedy with every penalty off, so callers write
/// `SamplingParams { temperature: 0.7, ..Default::default() }`.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None` or 0: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p` (`None` or ≥ 1: all).
    pub top_p: Option<f32>,
    pub seed: u64,
    /// Keep tokens whose probability is at least `min_p` times the most likely one's, after
    /// temperature, top-k and top-p (Hugging Face `MinPLogitsWarper`). 0 keeps all.
    pub min_p: f32,
    /// Hugging Face / CTRL: the logit of every token in prompt or output is divided by this
    /// (multiplied when negative). 1 is off; must be > 0.
    pub repetition_penalty: f32,
    /// OpenAI: subtracted once from the logit of every token generated so far. In [−2, 2].
    pub presence_penalty: f32,
    /// OpenAI: subtracted per occurrence from the logit of every generated token. In [−2, 2].
    pub frequency_penalty: f32,
    /// Hugging Face: no n-gram of this size occurs twice in prompt + output. 0 is off.
    pub no_repeat_ngram_size: usize,
    /// llama.cpp's DRY penalty; off unless `dry.multiplier` is non-zero.
    pub dry: DryParams,
    /// OpenAI's `logit_bias`: added to these tokens' logits before the penalties (as vLLM
    /// does); ids past the vocabulary are ignored. At most [`MAX_LOGIT_BIAS`], each within
    /// ±[`MAX_BIAS`].
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

/// A [`SamplingParams`] field out of range; `field` is the parameter's API name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} must be {expected}; got {value}")]
pub struct InvalidSamplingParam {
    pub field: &'static str,
    /// What the field must be, in words.
    pub expected: String,
    /// The offending value, printed.
    pub value: String,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            no_repeat_ngram_size: 0,
            dry: DryParams::default(),
            logit_bias: Vec::new(),
        }
    }

    /// Whether any step needs the sequence's tokens (penalties, n-gram ban, DRY).
    pub fn needs_history(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || self.no_repeat_ngram_size > 0
            || self.dry.enabled()
    }

    /// Rejects out-of-range and non-finite values, naming the first offending field.
    pub fn validate(&self) -> Result<(), InvalidSamplingParam> {
        fn check(field: &'static str, value: f32, ok: bool, expected: &str) -> Result<(), InvalidSamplingParam> {
            if ok && value.is_finite() {
                Ok(())
            } else {
                Err(InvalidSamplingParam { field, expected: expected.into(), value: value.to_string() })
            }
        }
        fn at_most(field: &'static str, value: usize, cap: usize) -> Result<(), InvalidSamplingParam> {
            if value <= cap {
                Ok(())
            } else {
                Err(InvalidSamplingParam { field, expected: format!("at most {cap}"), value: value.to_string() })
            }
        }
        let t = self.temperature;
        check("temperature", t, t >= 0.0, "a finite number >= 0 (0 means greedy)")?;
        if let Some(p) = self.top_p {
            check("top_p", p, p > 0.0 && p <= 1.0, "in (0, 1]")?;
        }
        check("min_p", self.min_p, (0.0..=1.0).contains(&self.min_p), "in [0, 1]")?;
        let r = self.repetition_penalty;
        check("repetition_penalty", r, r > 0.0, "a finite number > 0 (1 means off)")?;
        let (pp, fp) = (self.presence_penalty, self.frequency_penalty);
        check("presence_penalty", pp, (-2.0..=2.0).contains(&pp), "in [-2, 2]")?;
        check("frequency_penalty", fp, (-2.0..=2.0).contains(&fp), "in [-2, 2]")?;
        at_most("no_repeat_ngram_size", self.no_repeat_ngram_size, MAX_NO_REPEAT_NGRAM_SIZE)?;
        at_most("logit_bias", self.logit_bias.len(), MAX_LOGIT_BIAS)?;
        for &(_, b) in &self.logit_bias {
            check("logit_bias", b, (-MAX_BIAS..=MAX_BIAS).contains(&b), "in [-100, 100]")?;
        }
        let d = &self.dry;
        check("dry_multiplier", d.multiplier, d.multiplier >= 0.0, "a finite number >= 0 (0 means off)")?;
        if d.multiplier == 0.0 {
            // Off: the rest is never read, and an unset wire field may leave it zero.
            return Ok(());
        }
        check("dry_base", d.base, d.base >= 1.0, "a finite number >= 1")?;
        at_most("dry_allowed_length", d.allowed_length, MAX_DRY_ALLOWED_LENGTH)?;
        at_most("dry_sequence_breakers", d.sequence_breakers.len(), MAX_DRY_BREAKERS)?;
        for (i, b) in d.sequence_breakers.iter().enumerate() {
            if b.is_empty() || b.len() > MAX_DRY_BREAKER_TOKENS {
                return Err(InvalidSamplingParam {
                    field: "dry_sequence_breakers",
                    expected: format!("sequences of 1 to {MAX_DRY_BREAKER_TOKENS} tokens"),
                    value: format!("{} tokens in entry {i}", b.len()),
                });
            }
        }
        Ok(())
    }
}

/// SplitMix64: tiny, fast, and fully specified, so a seed means the same stream on every
/// platform and every version of this crate.
/// Its state advances by a constant per draw, so skipping ahead is one multiplication.
#[derive(Debug, Clone)]
pub struct SeededRng {
    state: u64,
    draws: u64,
}

const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self { state: seed, draws: 0 }
    }

    /// Numbers drawn so far.
    pub fn draws(&self) -> u64 {
        self.draws
    }

    /// Moves on as if `n` more numbers had been drawn.
    pub fn skip(&mut self, n: u64) {
        self.state = self.state.wrapping_add(n.wrapping_mul(SPLITMIX_GAMMA));
        self.draws += n;
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(SPLITMIX_GAMMA);
        self.draws += 1;
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Samples tokens for one sequence.
///
/// The penalties need the sequence's tokens: give the prompt with [`Sampler::observe_prompt`]
/// (all of it, or chunk by chunk, before the first sample); every token [`Sampler::sample`]
/// returns is recorded as generated. Tokens generated elsewhere (e.g. replayed after a restart)
/// go through [`Sampler::observe_generated`]. With every penalty off nothing is recorded.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SeededRng,
    /// Reused candidate buffer: (scaled logit, token id).
    candidates: Vec<(f32, u32)>,
    /// Prompt and generated tokens, kept only when some step needs them.
    history: Option<TokenHistory>,
    /// Reused copy of the logits row that the penalties are written into.
    penalised: Vec<f32>,
    /// DRY's scratch buffers.
    dry: Dry,
    /// Whether `sample` has run: until then, tokens fed to the sequence are its prompt.
    sampled: bool,
    /// Set for a sequence recomputed after preemption: positions from here on were generated.
    resumed_prompt_len: Option<usize>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = SeededRng::new(params.seed);
        let history = params.needs_history().then(TokenHistory::new);
        Self {
            params,
            rng,
            candidates: Vec::new(),
            history,
            penalised: Vec::new(),
            dry: Dry::new(),
            sampled: false,
            resumed_prompt_len: None,
        }
    }

    /// A sampler for a sequence recomputed after preemption: it had drawn `rng_draws` random
    /// numbers, and what it is fed from position `prompt_len` on was generated. Fed the same
    /// tokens again, it then samples exactly what the first sampler would have sampled next.
    pub fn resumed(params: SamplingParams, prompt_len: usize, rng_draws: u64) -> Self {
        let mut s = Self::new(params);
        s.rng.skip(rng_draws);
        s.resumed_prompt_len = Some(prompt_len);
        s
    }

    /// Random numbers drawn so far (over the whole sequence, across resumptions).
    pub fn rng_draws(&self) -> u64 {
        self.rng.draws()
    }

    /// Changes how the next tokens are drawn, keeping the random stream (the new seed is
    /// ignored) and the history. A history started only now sees the tokens from here on.
    pub fn set_params(&mut self, params: SamplingParams) {
        if self.history.is_none() && params.needs_history() {
            self.history = Some(TokenHistory::new());
        }
        self.params = params;
    }

    /// Whether this sampler has picked a token yet.
    pub fn has_sampled(&self) -> bool {
        self.sampled
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records context the model was given: the prompt, or one chunk of it.
    pub fn observe_prompt(&mut self, ids: &[u32]) {
        if let Some(h) = &mut self.history {
            h.push_prompt(ids);
        }
    }

    /// Records what a sequence is fed before its first sample, starting at position `start`:
    /// prompt, except that a resumed sequence's tokens past its original prompt were generated.
    pub fn observe_context(&mut self, start: usize, ids: &[u32]) {
        let prompt = match self.resumed_prompt_len {
            Some(p) => p.saturating_sub(start).min(ids.len()),
            None => ids.len(),
        };
        self.observe_prompt(&ids[..prompt]);
        self.observe_generated(&ids[prompt..]);
    }

    /// Records tokens generated for this sequence that this sampler did not pick itself.
    pub fn observe_generated(&mut self, ids: &[u32]) {
        if let Some(h) = &mut self.history {
            for &id in ids {
                h.push_generated(id);
            }
        }
    }

    /// The tokens recorded so far (`None` when no step needs them).
    pub fn history(&self) -> Option<&TokenHistory> {
        self.history.as_ref()
    }

    /// Picks the next token from one row of logits, and records it as generated.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let history = self.history.as_ref().filter(|h| !h.is_empty());
        // The row is copied only when there is something to bias or penalise, so with every
        // penalty off the draw sees exactly the caller's logits.
        let token = if history.is_some() || !self.params.logit_bias.is_empty() {
            self.penalised.clear();
            self.penalised.extend_from_slice(logits);
            apply_bias(&mut self.penalised, &self.params.logit_bias);
            if let Some(h) = history {
                apply_penalties(&mut self.penalised, &self.params, h, &mut self.dry);
            }
            draw(&self.params, &mut self.rng, &mut self.candidates, &self.penalised)
        } else {
            draw(&self.params, &mut self.rng, &mut self.candidates, logits)
        };
        if let Some(h) = &mut self.history {
            h.push_generated(token);
        }
        self.sampled = true;
        token
    }

    /// Beam search's view of one row: the `n` most likely next tokens by `log_softmax(row)`
    /// after the penalties (applied to log-probabilities, as transformers' beam search applies
    /// its processors), most likely first (ties: lower id first), written into `out`. Nothing is
    /// recorded: the caller chooses what the sequence is fed next and reports it with
    /// [`Sampler::observe_generated`]. Marks the prompt as done, like [`Sampler::sample`].
    pub fn score(&mut self, logits: &[f32], n: usize, out: &mut Vec<(u32, f32)>) {
        self.penalised.clear();
        let log_probs = LogProbs::of(logits);
        self.penalised.extend((0..logits.len()).map(|i| log_probs.at(i)));
        apply_bias(&mut self.penalised, &self.params.logit_bias);
        if let Some(h) = self.history.as_ref().filter(|h| !h.is_empty()) {
            apply_penalties(&mut self.penalised, &self.params, h, &mut self.dry);
        }
        self.candidates.clear();
        self.candidates.extend(self.penalised.iter().enumerate().filter(|(_, l)| !l.is_nan()).map(|(i, &l)| (l, i as u32)));
        let n = n.min(self.candidates.len());
        if n > 0 && n < self.candidates.len() {
            self.candidates.select_nth_unstable_by(n - 1, by_logit);
        }
        self.candidates.truncate(n);
        self.candidates.sort_unstable_by(by_logit);
        out.clear();
        out.extend(self.candidates.iter().map(|&(l, i)| (i, l)));
        self.sampled = true;
    }
}

/// Adds each `(token, bias)` to its logit; ids past the row are ignored.
fn apply_bias(row: &mut [f32], bias: &[(u32, f32)]) {
    for &(token, b) in bias {
        if let Some(l) = row.get_mut(token as usize) {
            *l += b;
        }
    }
}

/// `log_softmax` of one row of logits, NaNs skipped: the normaliser is computed once (stably, in
/// f64), then any entry or the most likely ones are read off it.
pub struct LogProbs<'a> {
    row: &'a [f32],
    /// `max(row) + ln Σ exp(row − max)`.
    log_z: f64,
}

impl<'a> LogProbs<'a> {
    pub fn of(row: &'a [f32]) -> Self {
        let max = row.iter().copied().filter(|l| !l.is_nan()).fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = row.iter().filter(|l| !l.is_nan()).map(|&l| ((l - max) as f64).exp()).sum();
        Self { row, log_z: max as f64 + sum.ln() }
    }

    /// The log-probability of token `i` (NaN for a NaN logit).
    pub fn at(&self, i: usize) -> f32 {
        (self.row[i] as f64 - self.log_z) as f32
    }

    /// The `n` most likely tokens with their log-probabilities, most likely first (ties: lower
    /// id first); NaN logits are never among them.
    pub fn top(&self, n: usize) -> Vec<(u32, f32)> {
        let mut ids: Vec<(f32, u32)> = self.row.iter().enumerate().filter(|(_, l)| !l.is_nan()).map(|(i, &l)| (l, i as u32)).collect();
        let n = n.min(ids.len());
        if n > 0 && n < ids.len() {
            ids.select_nth_unstable_by(n - 1, by_logit);
        }
        ids.truncate(n);
        ids.sort_unstable_by(by_logit);
        ids.into_iter().map(|(_, i)| (i, self.at(i as usize))).collect()
    }
}

/// Greedy or seeded draw from one (already penalised) row: temperature → top-k → top-p → min-p
/// on a sorted candidate list, then inverse-CDF sampling with one `rng` draw.
///
/// Only the candidates that can matter are sorted: with top-p, the shortest head holding its
/// mass; with min-p alone, those at or above its threshold; with neither, the head up to the
/// drawn token (see [`sort_nucleus`]). Sorting the whole row instead costs milliseconds at a
/// 128k vocabulary; the tokens drawn are the same up to rounding, as the totals that targets are
/// taken of are summed in candidate order rather than sorted order.
fn draw(p: &SamplingParams, rng: &mut SeededRng, candidates: &mut Vec<(f32, u32)>, logits: &[f32]) -> u32 {
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
    if let Some(k) = top_k.filter(|&k| k < candidates.len()) {
        candidates.select_nth_unstable_by(k - 1, by_logit);
        candidates.truncate(k);
    }
    // Weights are exp(logit − max), so the first candidate in order weighs 1.
    let max = candidates.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.0));
    let mass_of_all = |candidates: &[(f32, u32)]| candidates.iter().map(|c| (c.0 - max).exp() as f64).sum::<f64>();

    let top_p = p.top_p.filter(|&t| t < 1.0);
    let min_p = p.min_p > 0.0;
    if top_p.is_none() && !min_p {
        // Plain temperature: the token is the first, in order, at which the mass passes u · total.
        let target = rng.next_f64() * mass_of_all(candidates);
        sort_nucleus(candidates, max, target);
        return candidates[candidates.len() - 1].1;
    }
    let mut total = 0f64;
    if let Some(top_p) = top_p {
        // Keep the shortest prefix whose mass reaches top_p (always at least one token).
        total = sort_nucleus(candidates, max, top_p.max(0.0) as f64 * mass_of_all(candidates));
    } else {
        // Min-p alone keeps the weights ≥ min_p, a prefix once sorted: sort only those.
        let mut kept = 0;
        for i in 0..candidates.len() {
            if ((candidates[i].0 - max).exp() as f64) >= p.min_p as f64 {
                candidates.swap(kept, i);
                kept += 1;
            }
        }
        if kept == 0 {
            candidates.select_nth_unstable_by(0, by_logit);
            kept = 1;
        }
        candidates.truncate(kept);
        candidates.sort_unstable_by(by_logit);
        for c in candidates.iter_mut() {
            c.0 = (c.0 - max).exp();
        }
    }
    if min_p {
        // Weights are exp(logit − max), so the first is 1 and "probability ≥ min_p · max
        // probability" is "weight ≥ min_p"; sorted descending, the survivors are a prefix.
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

/// Candidate order: highest logit first; ties by lower id, so the order never depends on the
/// sort.
fn by_logit(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Size of the first head [`sort_nucleus`] sorts; each next one is four times larger.
const FIRST_HEAD: usize = 256;

/// Sorts, in [`by_logit`] order, the shortest head of `candidates` whose weights
/// `exp(logit − max)`, added in that order, reach `target` (all of them if none does); turns the
/// head's logits into those weights, drops the rest, and returns the head's mass. Heads of
/// growing size are selected and sorted in turn, so a 128k-token row costs a few linear
/// selections instead of a full sort, with the same head, weights and mass a full sort gives.
/// Never empties a non-empty list (a target ≤ 0 keeps the first candidate).
fn sort_nucleus(candidates: &mut Vec<(f32, u32)>, max: f32, target: f64) -> f64 {
    let mut mass = 0f64;
    let mut sorted = 0;
    let mut end = candidates.len().min(FIRST_HEAD);
    loop {
        if end < candidates.len() {
            // The top `end` candidates to the front, the first `sorted` of them already placed.
            candidates[sorted..].select_nth_unstable_by(end - sorted - 1, by_logit);
        }
        candidates[sorted..end].sort_unstable_by(by_logit);
        for i in sorted..end {
            let w = (candidates[i].0 - max).exp();
            candidates[i].0 = w;
            mass += w as f64;
            if mass >= target {
                candidates.truncate(i + 1);
                return mass;
            }
        }
        if end >= candidates.len() {
            return mass;
        }
        sorted = end;
        end = end.saturating_mul(4).min(candidates.len());
    }
}

/// Index of the largest logit; the lowest index wins ties and NaNs are skipped.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logit_bias_forces_or_bans_tokens_and_is_capped() {
        let row = [1.0, 3.0, 2.0];
        let with = |bias: Vec<(u32, f32)>| Sampler::new(SamplingParams { logit_bias: bias, ..SamplingParams::greedy() });
        assert_eq!(with(Vec::new()).sample(&row), 1);
        assert_eq!(with(vec![(1, -100.0)]).sample(&row), 2, "a banned token is never picked");
        assert_eq!(with(vec![(0, 100.0)]).sample(&row), 0, "a forced token always is");
        assert_eq!(with(vec![(7, 100.0)]).sample(&row), 1, "ids past the vocabulary are ignored");
        let too_big = SamplingParams { logit_bias: vec![(0, 101.0)], ..SamplingParams::greedy() };
        assert_eq!(too_big.validate().map_err(|e| e.field), Err("logit_bias"));
        let too_many = SamplingParams { logit_bias: vec![(0, 1.0); MAX_LOGIT_BIAS + 1], ..SamplingParams::greedy() };
        assert_eq!(too_many.validate().map_err(|e| e.field), Err("logit_bias"));
    }

    #[test]
    fn log_probs_normalise_skip_nan_and_rank_the_most_likely() {
        let row = [1.0, f32::NAN, 3.0, 3.0, -2.0];
        let lp = LogProbs::of(&row);
        let total: f64 = [0, 2, 3, 4].iter().map(|&i| f64::from(lp.at(i)).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        assert!(lp.at(1).is_nan());
        let top = lp.top(3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [2, 3, 0], "ties by lower id; NaN never listed");
        assert_eq!(top[0].1, lp.at(2));
        assert_eq!(lp.top(10).len(), 4);
    }

    #[test]
    fn new_parameters_take_effect_and_keep_the_random_stream() {
        let row: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let greedy = SamplingParams { seed: 5, ..SamplingParams::default() };
        let hot = SamplingParams { temperature: 50.0, seed: 999, ..SamplingParams::default() };
        let mut switched = Sampler::new(greedy.clone());
        assert_eq!(switched.sample(&row), argmax(&row));
        switched.set_params(hot.clone());
        let draws: Vec<u32> = (0..32).map(|_| switched.sample(&row)).collect();
        assert!(draws.iter().any(|&t| t != argmax(&row)), "a high temperature must spread the draws");
        // The stream continues from seed 5 (greedy draws consume none of it), not from 999.
        let mut fresh = Sampler::new(SamplingParams { seed: 5, ..hot });
        let expected: Vec<u32> = (0..32).map(|_| fresh.sample(&row)).collect();
        assert_eq!(draws, expected);
        switched.set_params(greedy);
        assert_eq!(switched.sample(&row), argmax(&row));
        assert!(switched.has_sampled());
    }

    fn logits() -> Vec<f32> {
        vec![0.5, 2.0, -1.0, 1.5, 2.0, 0.0]
    }

    #[test]
    fn scoring_ranks_penalised_log_probabilities_and_records_nothing() {
        let row = logits();
        let params = SamplingParams { repetition_penalty: 2.0, no_repeat_ngram_size: 2, ..SamplingParams::default() };
        let mut s = Sampler::new(params.clone());
        s.observe_prompt(&[1, 3, 1]);
        let mut out = Vec::new();
        s.score(&row, 3, &mut out);
        // By hand: log_softmax, then token 1 and 3 (in the history) have their (negative)
        // log-probabilities doubled, and 3 is banned (the bigram "1 3" already occurred).
        let max = 2.0f64;
        let log_z = max + row.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
        let lp = |i: usize| (row[i] as f64 - log_z) as f32;
        let mut want = vec![(0u32, lp(0)), (1, lp(1) * 2.0), (2, lp(2)), (4, lp(4)), (5, lp(5))];
        want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        want.truncate(3);
        assert_eq!(out, want);
        assert!(s.has_sampled());
        assert_eq!(s.history().map(|h| h.generated_len()), Some(0), "scoring records no token");
        s.observe_generated(&[4]);
        assert_eq!(s.history().map(|h| h.tokens().to_vec()), Some(vec![1, 3, 1, 4]));
    }

    #[test]
    fn a_resumed_sampler_continues_the_random_stream_and_the_history() {
        let params =
            SamplingParams { temperature: 0.9, seed: 11, presence_penalty: 0.5, frequency_penalty: 0.3, ..SamplingParams::greedy() };
        let row = |i: usize| (0..40).map(|t| ((t * 7 + i * 3) % 11) as f32 * 0.3).collect::<Vec<f32>>();
        let prompt = [1u32, 2, 3, 4];
        let mut first = Sampler::new(params.clone());
        first.observe_prompt(&prompt);
        let before: Vec<u32> = (0..6).map(|i| first.sample(&row(i))).collect();
        let draws = first.rng_draws();
        assert_eq!(draws, 6, "one draw per sampled token at temperature > 0");
        let after: Vec<u32> = (6..12).map(|i| first.sample(&row(i))).collect();

        // Preempted after six tokens: the prompt and those tokens are fed again, in two chunks.
        let mut again = Sampler::resumed(params, prompt.len(), draws);
        let fed: Vec<u32> = prompt.iter().chain(&before).copied().collect();
        again.observe_context(0, &fed[..7]);
        again.observe_context(7, &fed[7..]);
        assert_eq!(again.history().map(|h| h.generated_len()), Some(6), "the tokens past the prompt count as output");
        let resumed: Vec<u32> = (6..12).map(|i| again.sample(&row(i))).collect();
        assert_eq!(resumed, after);
        assert!(after.iter().collect::<std::collections::HashSet<_>>().len() > 1, "the test draws more than one token");
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&logits()), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0]), 2, "NaN is skipped");
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&logits()), 1);
        let mut k1 = Sampler::new(SamplingParams { temperature: 1.0, top_k: Some(1), top_p: None, seed: 3, ..Default::default() });
        assert_eq!(k1.sample(&logits()), 1, "top_k = 1 is greedy");
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let params = |seed| SamplingParams { temperature: 1.0, top_k: None, top_p: None, seed, ..Default::default() };
        let draw = |seed| {
            let mut s = Sampler::new(params(seed));
            (0..64).map(|_| s.sample(&logits())).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let mut k2 = Sampler::new(SamplingParams { temperature: 5.0, top_k: Some(2), top_p: None, seed: 1, ..Default::default() });
        for _ in 0..200 {
            let t = k2.sample(&logits());
            assert!(t == 1 || t == 4, "top_k=2 keeps only the two tied maxima, got {t}");
        }
        // Probabilities at T=1: ids 1 and 4 hold ~0.36 each, id 3 ~0.22; top_p 0.5 needs two tokens.
        let mut p = Sampler::new(SamplingParams { temperature: 1.0, top_k: None, top_p: Some(0.5), seed: 2, ..Default::default() });
        let mut seen = [0usize; 6];
        for _ in 0..400 {
            seen[p.sample(&logits()) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[2] + seen[3] + seen[5], 0, "only the top two survive top_p=0.5: {seen:?}");
        assert!(seen[1] > 100 && seen[4] > 100, "both survivors are drawn: {seen:?}");
    }

    #[test]
    fn sort_nucleus_gives_the_head_of_a_full_sort() {
        // 3000 candidates with many tied logits, so heads cross several growth steps.
        let mut rng = SeededRng::new(5);
        let all: Vec<(f32, u32)> = (0..3000).map(|i| ((rng.next_u64() % 200) as f32 * 0.05, i)).collect();
        let max = all.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.0));
        let mut sorted = all.clone();
        sorted.sort_unstable_by(by_logit);
        let weights: Vec<f32> = sorted.iter().map(|c| (c.0 - max).exp()).collect();
        let total: f64 = weights.iter().map(|&w| w as f64).sum();
        for fraction in [-1.0, 0.0, 1e-9, 0.01, 0.5, 0.9, 0.999, 1.0, 2.0] {
            let target = fraction * total;
            let (mut mass, mut keep) = (0f64, sorted.len());
            for (i, &w) in weights.iter().enumerate() {
                mass += w as f64;
                if mass >= target {
                    keep = i + 1;
                    break;
                }
            }
            let mut head = all.clone();
            let got = sort_nucleus(&mut head, max, target);
            assert_eq!(head.len(), keep, "target {fraction} of the total");
            assert_eq!(got.to_bits(), mass.to_bits(), "target {fraction}: mass");
            for (h, (s, w)) in head.iter().zip(sorted.iter().zip(&weights)) {
                assert_eq!((h.1, h.0.to_bits()), (s.1, w.to_bits()), "target {fraction}");
            }
        }
    }

    #[test]
    fn temperature_one_follows_the_softmax() {
        let l = logits();
        let max = l.iter().cloned().fold(f32::MIN, f32::max);
        let z: f64 = l.iter().map(|v| ((v - max) as f64).exp()).sum();
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: None, top_p: None, seed: 9, ..Default::default() });
        let n = 20_000;
        let mut counts = [0usize; 6];
        for _ in 0..n {
            counts[s.sample(&l) as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let p = ((l[i] - max) as f64).exp() / z;
            let freq = c as f64 / n as f64;
            // 5 standard deviations of a binomial proportion.
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!((freq - p).abs() <= 5.0 * sd + 1e-9, "token {i}: frequency {freq} vs probability {p}");
        }
    }
}
