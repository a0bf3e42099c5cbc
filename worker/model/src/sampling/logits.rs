//! Logits processors against repetition, and the Hugging Face-shaped warpers, as plain functions
//! over one f32 logits row and the sequence's [`TokenHistory`] (prompt ids, then generated ids).
//!
//! Order, when all are on ([`process`] applies exactly this; [`crate::sampler::Sampler`] applies
//! the same steps, the warpers on its sorted candidate list):
//!
//! 1. [`repetition_penalty`] — Hugging Face `RepetitionPenaltyLogitsProcessor` (CTRL), over the
//!    distinct tokens of prompt + generated;
//! 2. [`presence_frequency_penalty`] — OpenAI, over generated tokens only;
//! 3. [`Dry`] — llama.cpp's DRY, over the last `penalty_last_n` tokens of prompt + generated;
//! 4. [`no_repeat_ngram`] — Hugging Face `NoRepeatNGramLogitsProcessor`, prompt + generated;
//! 5. only when sampling (temperature > 0): [`temperature`] → [`top_k`] → [`top_p`] → [`min_p`].
//!
//! Steps 1, 4 and 5 are the order `GenerationMixin._get_logits_processor` builds in transformers
//! (processors first, then the warpers, which greedy decoding skips); `tests/processors.rs` checks
//! it against the chain that transformers itself builds. Transformers has no presence, frequency
//! or DRY penalty: they sit with the other penalties on raw logits, after the repetition penalty
//! as in vLLM and before any truncation as in llama.cpp. Steps 2–4 commute with each other up to
//! f32 rounding (n-gram bans are −∞, the others subtract finite amounts); step 1 does not, being
//! multiplicative.
//!
//! The functions never panic on odd input: token ids outside the row are skipped (transformers
//! clamps them away too), and NaN logits are left to the sampler, which never picks them.

use std::collections::HashMap;

use crate::sampling::sampler::SamplingParams;

/// The tokens of one sequence so far, with the per-token bookkeeping the penalties need, kept
/// up to date per token so that applying a penalty costs O(distinct tokens), not O(length).
#[derive(Debug, Clone, Default)]
pub struct TokenHistory {
    /// Prompt and generated tokens in order (n-gram bans and DRY look at positions).
    tokens: Vec<u32>,
    /// One entry per distinct token: (id, times generated), in first-seen order, so iteration
    /// is deterministic.
    entries: Vec<(u32, u32)>,
    /// Token id → index into `entries`.
    index: HashMap<u32, usize>,
    /// Indices into `entries` of the tokens generated at least once, in first-generated order.
    generated: Vec<usize>,
    generated_len: usize,
}

impl TokenHistory {
    pub fn new() -> Self {
        Self::default()
    }

    /// A history of `prompt` followed by `generated`.
    pub fn from_tokens(prompt: &[u32], generated: &[u32]) -> Self {
        let mut h = Self::new();
        h.push_prompt(prompt);
        for &t in generated {
            h.push_generated(t);
        }
        h
    }

    /// Appends context the model was given (a prompt, or one chunk of it).
    pub fn push_prompt(&mut self, ids: &[u32]) {
        self.tokens.extend_from_slice(ids);
        for &id in ids {
            self.entry(id);
        }
    }

    /// Appends a token the model generated; only these count for presence and frequency.
    pub fn push_generated(&mut self, id: u32) {
        self.tokens.push(id);
        self.generated_len += 1;
        let e = self.entry(id);
        if self.entries[e].1 == 0 {
            self.generated.push(e);
        }
        self.entries[e].1 = self.entries[e].1.saturating_add(1);
    }

    fn entry(&mut self, id: u32) -> usize {
        let next = self.entries.len();
        let e = *self.index.entry(id).or_insert(next);
        if e == next {
            self.entries.push((id, 0));
        }
        e
    }

    /// Prompt and generated tokens, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// How many tokens were generated (as opposed to given).
    pub fn generated_len(&self) -> usize {
        self.generated_len
    }

    /// Every distinct token of prompt and output, once each.
    pub fn distinct(&self) -> impl Iterator<Item = u32> + '_ {
        self.entries.iter().map(|&(id, _)| id)
    }

    /// `(token, count)` for every token generated at least once.
    pub fn generated_counts(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.generated.iter().map(|&e| self.entries[e])
    }
}

/// Hugging Face / CTRL repetition penalty: every distinct token of prompt + output has its logit
/// divided by `penalty`, or multiplied when negative, so `penalty > 1` always makes it less
/// likely. Applied once per token however often it occurred.
pub fn repetition_penalty(logits: &mut [f32], history: &TokenHistory, penalty: f32) {
    for id in history.distinct() {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// OpenAI presence and frequency penalties over generated tokens only:
/// `logit −= presence · [count > 0] + frequency · count`.
pub fn presence_frequency_penalty(logits: &mut [f32], history: &TokenHistory, presence: f32, frequency: f32) {
    for (id, count) in history.generated_counts() {
        if let Some(l) = logits.get_mut(id as usize) {
            *l -= presence + frequency * count as f32;
        }
    }
}

/// Hugging Face `no_repeat_ngram_size`: bans (sets to −∞) every token that would complete an
/// n-gram already present in `tokens`. With `n = 1` every token seen is banned; `n = 0` is off.
///
/// One scan over `tokens` per call, as transformers does: O(len · n) worst case, and in practice
/// O(len) since most windows differ at their last prefix token, which is compared first.
pub fn no_repeat_ngram(logits: &mut [f32], tokens: &[u32], n: usize) {
    if n == 0 || tokens.len() < n {
        return;
    }
    // The last n−1 tokens; a window whose first n−1 tokens equal them bans its last token. The
    // window starting at the prefix itself would need one token more, so it never bans anything.
    let prefix = &tokens[tokens.len() + 1 - n..];
    for window in tokens.windows(n) {
        let (head, last) = window.split_at(n - 1);
        if head.iter().rev().eq(prefix.iter().rev()) {
            if let Some(l) = logits.get_mut(last[0] as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// llama.cpp's DRY ("don't repeat yourself") settings.
///
/// Sequence breakers are token-id sequences rather than strings: llama.cpp tokenizes each
/// string into every token sequence that can spell it (including tokens that merely contain it);
/// here the caller does the tokenizing. A breaker is a head token plus a tail that must follow
/// it, as in llama.cpp; most are one token long.
#[derive(Debug, Clone, PartialEq)]
pub struct DryParams {
    /// Penalty scale; 0 means off.
    pub multiplier: f32,
    /// Growth per token of repeat beyond `allowed_length`; below 1 means off (as llama.cpp).
    pub base: f32,
    /// Repeats this long or shorter are not penalised.
    pub allowed_length: usize,
    /// How many of the most recent tokens (prompt included) to search; `None`: all of them.
    pub penalty_last_n: Option<usize>,
    /// Token sequences that end a repeat: a repeat is never matched across one.
    pub sequence_breakers: Vec<Vec<u32>>,
}

impl Default for DryParams {
    /// Off, with llama.cpp's defaults for the rest (base 1.75, allowed length 2).
    fn default() -> Self {
        Self { multiplier: 0.0, base: 1.75, allowed_length: 2, penalty_last_n: None, sequence_breakers: Vec::new() }
    }
}

impl DryParams {
    /// Whether applying DRY can change anything; the same test as llama.cpp's, plus finiteness
    /// so that unvalidated NaNs switch it off instead of poisoning every logit.
    pub fn enabled(&self) -> bool {
        self.multiplier != 0.0 && self.multiplier.is_finite() && self.base >= 1.0 && self.base.is_finite() && self.penalty_last_n != Some(0)
    }
}

/// DRY with its scratch buffers, kept so that a step allocates nothing once warmed up.
///
/// A port of llama.cpp's `llama_sampler_dry_apply` (itself from koboldcpp): over the last
/// `penalty_last_n` tokens, find for every earlier position the longest suffix ending there that
/// equals a suffix of the whole window (a reversed Z-algorithm, O(window)); the token right after
/// such a repeat of length `len ≥ allowed_length` would extend it, and is penalised by
/// `multiplier · base^(len − allowed_length)` (its longest repeat counts). A repeat is cut at the
/// most recent sequence breaker, and single-token breakers are never penalised themselves.
#[derive(Debug, Clone, Default)]
pub struct Dry {
    /// Per window position: length of the repeated suffix ending there.
    repeat: Vec<usize>,
    /// Token → longest repeat it would extend.
    max_repeat: HashMap<u32, usize>,
    /// Sorted, deduplicated breaker heads, for a cheap "could a breaker start here?" test.
    heads: Vec<u32>,
}

/// `ln(f32::MAX)`, as llama.cpp spells it, to keep `base^exponent` finite.
const FLOAT_MAX_LOG: f32 = 88.722_84;

impl Dry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Subtracts the DRY penalty from `logits`, given the sequence so far.
    pub fn apply(&mut self, logits: &mut [f32], tokens: &[u32], params: &DryParams) {
        if !params.enabled() {
            return;
        }
        let n = tokens.len().min(params.penalty_last_n.unwrap_or(usize::MAX));
        if n <= params.allowed_length {
            return;
        }
        let window = &tokens[tokens.len() - n..];
        // Position `i` counted from the end: rat(0) is the last token.
        let rat = |i: usize| window[n - 1 - i];

        // Step 1: the most recent breaker limits how long a repeat can be.
        self.heads.clear();
        self.heads.extend(params.sequence_breakers.iter().filter_map(|b| b.first().copied()));
        self.heads.sort_unstable();
        self.heads.dedup();
        let mut rep_limit = n;
        for i in 0..n {
            let token = rat(i);
            if self.heads.binary_search(&token).is_err() {
                continue;
            }
            let mut longest: Option<usize> = None;
            for breaker in params.sequence_breakers.iter().filter(|b| b.first() == Some(&token)) {
                let tail = &breaker[1..];
                // The tail follows the head, so it lies nearer the end; it must fit in the window.
                if longest.is_none_or(|l| tail.len() > l) && tail.len() <= i && tail.iter().enumerate().all(|(o, &t)| t == rat(i - o - 1)) {
                    longest = Some(tail.len());
                }
            }
            if let Some(l) = longest {
                rep_limit = i - l;
                break;
            }
        }
        if rep_limit < params.allowed_length {
            return;
        }

        // Step 2: reversed Z-algorithm. repeat[last − k] = length of the longest common suffix
        // of window[..n−k] and window, capped at rep_limit. Capping stored values keeps the
        // algorithm exact for the capped quantity (a capped value only stands in for a longer
        // match where the answer is capped anyway).
        self.repeat.clear();
        self.repeat.resize(n, 0);
        let last = n - 1;
        let (mut lt, mut rt) = (0usize, 0usize);
        for k in 1..n {
            if k > rt {
                let mut m = 0;
                while m + k < n && rat(m) == rat(m + k) {
                    m += 1;
                }
                self.repeat[last - k] = m.min(rep_limit);
                if m > 0 {
                    lt = k;
                    rt = k + m - 1;
                }
            } else {
                let p = k - lt;
                let right_part_len = rt - k + 1;
                if self.repeat[last - p] < right_part_len {
                    self.repeat[last - k] = self.repeat[last - p].min(rep_limit);
                } else {
                    let mut i = rt + 1;
                    while i < n && rat(i) == rat(i - k) {
                        i += 1;
                    }
                    self.repeat[last - k] = (i - k).min(rep_limit);
                    lt = k;
                    rt = i - 1;
                }
            }
        }

        // Step 3: the token after each long enough repeat would extend it.
        self.max_repeat.clear();
        for (i, &len) in self.repeat[..last].iter().enumerate() {
            if len >= params.allowed_length {
                let best = self.max_repeat.entry(window[i + 1]).or_insert(len);
                *best = (*best).max(len);
            }
        }

        // Step 4: penalise, with llama.cpp's arithmetic (its `std::pow(float, int)` is a double
        // pow) and its clamp on the exponent.
        let max_exponent = if params.base > 1.000_001 { (FLOAT_MAX_LOG / params.base.ln()) as i64 } else { 0 };
        for (&token, &len) in &self.max_repeat {
            let Some(l) = logits.get_mut(token as usize) else { continue };
            if params.sequence_breakers.iter().any(|b| b.len() == 1 && b[0] == token) {
                continue;
            }
            let mut exponent = len as i64 - params.allowed_length as i64;
            if max_exponent > 0 && exponent > max_exponent {
                exponent = max_exponent;
            }
            let penalty = (params.multiplier as f64 * (params.base as f64).powf(exponent as f64)) as f32;
            *l -= penalty;
        }
    }
}

/// [`Dry::apply`] with fresh scratch buffers.
pub fn dry_penalty(logits: &mut [f32], tokens: &[u32], params: &DryParams) {
    Dry::new().apply(logits, tokens, params);
}

/// Hugging Face `TemperatureLogitsWarper`: divides every logit by `t` (> 0).
pub fn temperature(logits: &mut [f32], t: f32) {
    for l in logits.iter_mut() {
        *l /= t;
    }
}

/// Hugging Face `TopKLogitsWarper`: masks (−∞) every logit below the k-th largest, so ties with
/// the k-th are all kept. `k = 0` or `k ≥ len` keeps everything. NaNs are not counted.
pub fn top_k(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let mut values: Vec<f32> = logits.iter().copied().filter(|l| !l.is_nan()).collect();
    if k >= values.len() {
        return;
    }
    let (_, kth, _) = values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = *kth;
    for l in logits.iter_mut() {
        if *l < kth {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Hugging Face `TopPLogitsWarper`: sorts ascending, and masks every token whose cumulative
/// probability (its own included, counted from the least likely) is at most `1 − p`; the most
/// likely token always stays. Probabilities are summed in f64. Ties are ordered by id, lower id
/// counting as more likely (the sampler's order).
pub fn top_p(logits: &mut [f32], p: f32) {
    if p.is_nan() || p >= 1.0 || logits.len() <= 1 {
        return;
    }
    let mut order: Vec<u32> = (0..logits.len() as u32).filter(|&i| !logits[i as usize].is_nan()).collect();
    order.sort_unstable_by(|&a, &b| logits[a as usize].total_cmp(&logits[b as usize]).then(b.cmp(&a)));
    let Some(&top) = order.last() else { return };
    let max = logits[top as usize] as f64;
    if !max.is_finite() {
        return;
    }
    let total: f64 = order.iter().map(|&i| (logits[i as usize] as f64 - max).exp()).sum();
    let cutoff = 1.0 - p as f64;
    let mut cum = 0f64;
    for &i in &order[..order.len() - 1] {
        cum += (logits[i as usize] as f64 - max).exp() / total;
        if cum > cutoff {
            break;
        }
        logits[i as usize] = f32::NEG_INFINITY;
    }
}

/// Hugging Face `MinPLogitsWarper`: masks every token whose probability is below `min_p` times
/// the largest probability, i.e. `exp(logit − max) < min_p`; the most likely token always stays.
pub fn min_p(logits: &mut [f32], min_p: f32) {
    if min_p.is_nan() || min_p <= 0.0 {
        return;
    }
    let best = crate::sampling::sampler::argmax(logits) as usize;
    let Some(&max) = logits.get(best) else { return };
    if !max.is_finite() {
        return;
    }
    for (i, l) in logits.iter_mut().enumerate() {
        if i != best && (*l as f64 - max as f64).exp() < min_p as f64 {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Steps 1–4 of the module order: the penalties and bans, on raw logits. `dry` is scratch.
pub fn apply_penalties(logits: &mut [f32], params: &SamplingParams, history: &TokenHistory, dry: &mut Dry) {
    if params.repetition_penalty != 1.0 {
        repetition_penalty(logits, history, params.repetition_penalty);
    }
    if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
        presence_frequency_penalty(logits, history, params.presence_penalty, params.frequency_penalty);
    }
    dry.apply(logits, history.tokens(), &params.dry);
    no_repeat_ngram(logits, history.tokens(), params.no_repeat_ngram_size);
}

/// The whole chain in the module order, on a full row, with masks as −∞ — the reference the
/// sampler's candidate-list path is tested against, and the shape transformers' goldens have.
/// Greedy parameters (temperature ≤ 0) stop after the penalties, as `generate` does without
/// `do_sample`.
pub fn process(logits: &mut [f32], params: &SamplingParams, history: &TokenHistory) {
    apply_penalties(logits, params, history, &mut Dry::new());
    // The sampler's own test for greedy, so NaN takes the same path in both.
    if params.temperature <= 0.0 {
        return;
    }
    if params.temperature != 1.0 {
        temperature(logits, params.temperature);
    }
    if let Some(k) = params.top_k {
        top_k(logits, k);
    }
    if let Some(p) = params.top_p {
        top_p(logits, p);
    }
    min_p(logits, params.min_p);
}
