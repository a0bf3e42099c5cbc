//! Turning logits into the next token: greedy, temperature, top-k and top-p, with a per-request
//! seeded random stream so the same request and seed always give the same tokens.

/// Per-request sampling settings. Validation of client input happens at the API edge; here
/// out-of-range values are clamped to the nearest meaningful one.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None` or 0: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p` (`None` or ≥ 1: all).
    pub top_p: Option<f32>,
    pub seed: u64,
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: None, top_p: None, seed: 0 }
    }
}

/// SplitMix64: tiny, fast, and fully specified, so a seed means the same stream on every
/// platform and every version of this crate.
#[derive(Debug, Clone)]
pub struct SeededRng(u64);

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
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
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SeededRng,
    /// Reused candidate buffer: (scaled logit, token id).
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = SeededRng::new(params.seed);
        Self { params, rng, candidates: Vec::new() }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let top_k = p.top_k.filter(|&k| k > 0);
        if p.temperature <= 0.0 || top_k == Some(1) || logits.len() <= 1 {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        self.candidates.clear();
        self.candidates.extend(
            logits.iter().enumerate().filter(|(_, l)| !l.is_nan()).map(|(i, &l)| (l * inv_t, i as u32)),
        );
        if self.candidates.is_empty() {
            return 0;
        }
        // Highest logit first; ties by lower id, so the order never depends on the sort.
        let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if let Some(k) = top_k.filter(|&k| k < self.candidates.len()) {
            self.candidates.select_nth_unstable_by(k - 1, order);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(order);

        let max = self.candidates[0].0;
        let mut total = 0f64;
        for c in self.candidates.iter_mut() {
            c.0 = (c.0 - max).exp();
            total += c.0 as f64;
        }
        if let Some(top_p) = p.top_p.filter(|&t| t < 1.0) {
            // Keep the shortest prefix whose mass reaches top_p (always at least one token).
            let target = top_p.max(0.0) as f64 * total;
            let mut mass = 0f64;
            let mut keep = self.candidates.len();
            for (i, c) in self.candidates.iter().enumerate() {
                mass += c.0 as f64;
                if mass >= target {
                    keep = i + 1;
                    break;
                }
            }
            self.candidates.truncate(keep);
            total = mass.min(total);
        }
        let mut u = self.rng.next_f64() * total;
        for c in &self.candidates {
            u -= c.0 as f64;
            if u < 0.0 {
                return c.1;
            }
        }
        self.candidates[self.candidates.len() - 1].1
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

    fn logits() -> Vec<f32> {
        vec![0.5, 2.0, -1.0, 1.5, 2.0, 0.0]
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&logits()), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0]), 2, "NaN is skipped");
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&logits()), 1);
        let mut k1 = Sampler::new(SamplingParams { temperature: 1.0, top_k: Some(1), top_p: None, seed: 3 });
        assert_eq!(k1.sample(&logits()), 1, "top_k = 1 is greedy");
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let params = |seed| SamplingParams { temperature: 1.0, top_k: None, top_p: None, seed };
        let draw = |seed| {
            let mut s = Sampler::new(params(seed));
            (0..64).map(|_| s.sample(&logits())).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let mut k2 = Sampler::new(SamplingParams { temperature: 5.0, top_k: Some(2), top_p: None, seed: 1 });
        for _ in 0..200 {
            let t = k2.sample(&logits());
            assert!(t == 1 || t == 4, "top_k=2 keeps only the two tied maxima, got {t}");
        }
        // Probabilities at T=1: ids 1 and 4 hold ~0.36 each, id 3 ~0.22; top_p 0.5 needs two tokens.
        let mut p = Sampler::new(SamplingParams { temperature: 1.0, top_k: None, top_p: Some(0.5), seed: 2 });
        let mut seen = [0usize; 6];
        for _ in 0..400 {
            seen[p.sample(&logits()) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[2] + seen[3] + seen[5], 0, "only the top two survive top_p=0.5: {seen:?}");
        assert!(seen[1] > 100 && seen[4] > 100, "both survivors are drawn: {seen:?}");
    }

    #[test]
    fn temperature_one_follows_the_softmax() {
        let l = logits();
        let max = l.iter().cloned().fold(f32::MIN, f32::max);
        let z: f64 = l.iter().map(|v| ((v - max) as f64).exp()).sum();
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: None, top_p: None, seed: 9 });
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
