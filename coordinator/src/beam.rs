//! Beam search over worker sequences, with Hugging Face transformers' semantics (its `generate`
//! with `num_beams`, `length_penalty`, `early_stopping`, `num_return_sequences`).
//!
//! Pure state, no I/O. Each beam lives in a worker sequence ("lane"). Every step the workers
//! report, per live lane, its best next tokens by log-probability after the penalties
//! ([`Candidates`]); [`BeamSearch::advance`] adds each beam's running score, keeps the best
//! `k = max(2, 1 + end tokens) · num_beams` continuations over all beams, turns the ones that end
//! (an end token, or the length limit) among the first `num_beams` into finished hypotheses
//! scored `sum_logprobs / generated_len^length_penalty`, and continues the best `num_beams`
//! that do not end. A beam continues in its parent's lane when it is the parent's first child;
//! other children take a free lane, which is first made a copy of the parent ([`Fork`]).
//!
//! Per step only the `k` best continuations of each beam can matter (`k` over all beams are
//! kept), so workers report `k` per lane and the vocabulary never leaves them.

/// When beam search may stop before the length limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStopping {
    /// transformers' `early_stopping=False`: stop once `num_beams` hypotheses are finished and
    /// the best running beam, scored at its current length, cannot beat the worst of them.
    Heuristic,
    /// `early_stopping=True`: stop as soon as `num_beams` hypotheses are finished.
    First,
    /// `early_stopping="never"`: as `Heuristic`, but a positive length penalty scores the
    /// running beam at the longest length it could reach (the canonical beam search).
    Never,
}

/// A request's beam search settings, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeamConfig {
    pub num_beams: usize,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    /// Hypotheses returned, best first (1..=num_beams).
    pub num_return: usize,
}

/// Most beams a request may ask for: each costs a whole sequence of KV cache.
pub const MAX_BEAMS: u32 = 8;
/// Most candidates a worker reports per sequence and step (its own limit). Only a request with
/// dozens of stop tokens reaches it, and then still keeps far more than `num_beams` that go on.
const MAX_CANDIDATES: usize = 64;

/// One lane's best next tokens and their log-probabilities, most likely first.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidates {
    pub lane: usize,
    pub top: Vec<(u32, f32)>,
}

/// `to` becomes a copy of `from` before the next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fork {
    pub from: usize,
    pub to: usize,
}

/// A finished hypothesis: its generated tokens (the end token included, as transformers
/// returns it), their log-probabilities, and its length-penalised score.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    pub tokens: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub score: f32,
    /// Ended by an end token, not by the length limit.
    pub ended: bool,
}

/// What the next step does.
#[derive(Debug, Clone, PartialEq)]
pub enum Advance {
    /// Apply `forks`, then feed each `(lane, token)`.
    Continue { forks: Vec<Fork>, feed: Vec<(usize, u32)> },
    /// Search over: the best hypotheses, best first.
    Done(Vec<Hypothesis>),
}

/// A live beam.
#[derive(Debug, Clone)]
struct Beam {
    lane: usize,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    /// Sum of the log-probabilities of `tokens`.
    score: f32,
}

/// One request's beam search.
#[derive(Debug)]
pub struct BeamSearch {
    config: BeamConfig,
    max_new_tokens: usize,
    end_tokens: Vec<u32>,
    /// Continuations kept per step.
    keep: usize,
    /// Live beams, best first.
    running: Vec<Beam>,
    /// Finished hypotheses, best first, at most `num_beams`.
    finished: Vec<Hypothesis>,
    /// transformers' `is_early_stop_heuristic_unsatisfied`: once false, stays false.
    improvable: bool,
    /// Tokens generated so far by every live beam.
    generated: usize,
}

/// The score transformers gives a finished hypothesis.
fn normalised(sum: f32, len: usize, length_penalty: f32) -> f32 {
    sum / (len as f32).powf(length_penalty)
}

impl BeamSearch {
    /// A search over `max_new_tokens` at most, where any of `end_tokens` ends a hypothesis.
    /// It starts with one beam, in lane 0, that has generated nothing.
    pub fn new(config: BeamConfig, max_new_tokens: usize, end_tokens: Vec<u32>) -> Self {
        let keep = ((1 + end_tokens.len()).max(2) * config.num_beams).min(MAX_CANDIDATES);
        let start = Beam { lane: 0, tokens: Vec::new(), logprobs: Vec::new(), score: 0.0 };
        Self { config, max_new_tokens, end_tokens, keep, running: vec![start], finished: Vec::new(), improvable: true, generated: 0 }
    }

    /// Candidates each lane must report per step.
    pub fn candidates_per_lane(&self) -> usize {
        self.keep
    }

    /// Lanes holding a live beam (fed every step).
    pub fn live_lanes(&self) -> impl Iterator<Item = usize> + '_ {
        self.running.iter().map(|b| b.lane)
    }

    /// Takes the candidates of every live lane and decides the next step.
    pub fn advance(&mut self, candidates: &[Candidates]) -> Advance {
        let num_beams = self.config.num_beams;
        // Every continuation of every beam: (accumulated score, beam index, token, log-prob).
        let mut all: Vec<(f32, usize, u32, f32)> = Vec::with_capacity(self.running.len() * self.keep);
        for (b, beam) in self.running.iter().enumerate() {
            if let Some(c) = candidates.iter().find(|c| c.lane == beam.lane) {
                all.extend(c.top.iter().map(|&(token, lp)| (beam.score + lp, b, token, lp)));
            }
        }
        // Best first; ties go to the lower flat index (beam, token), as a stable top-k would.
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        all.truncate(self.keep);
        let at_limit = self.generated + 1 >= self.max_new_tokens;
        let ends = |token: u32| at_limit || self.end_tokens.contains(&token);
        let len = self.generated + 1;

        // Finished: the ending continuations among the first `num_beams`.
        let full = self.finished.len() >= num_beams && self.config.early_stopping == EarlyStopping::First;
        if self.improvable && !full {
            for &(score, b, token, lp) in all.iter().take(num_beams).filter(|c| ends(c.2)) {
                let beam = &self.running[b];
                let mut tokens = beam.tokens.clone();
                tokens.push(token);
                let mut logprobs = beam.logprobs.clone();
                logprobs.push(lp);
                let ended = self.end_tokens.contains(&token);
                let score = normalised(score, len, self.config.length_penalty);
                self.finished.push(Hypothesis { tokens, logprobs, score, ended });
            }
            // Stable: among equal scores the earlier hypothesis stays ahead.
            self.finished.sort_by(|a, b| b.score.total_cmp(&a.score));
            self.finished.truncate(num_beams);
        }

        // Running: the best `num_beams` continuations that do not end.
        let next: Vec<(f32, usize, u32, f32)> = all.iter().copied().filter(|c| !ends(c.2)).take(num_beams).collect();
        let all_end = next.is_empty();
        self.generated += 1;
        if let Some(&(best, ..)) = next.first() {
            self.check_improvable(best);
        }
        let stop_first = self.finished.len() >= num_beams && self.config.early_stopping == EarlyStopping::First;
        if all_end || !self.improvable || stop_first {
            let mut best = std::mem::take(&mut self.finished);
            best.truncate(self.config.num_return);
            return Advance::Done(best);
        }
        self.continue_with(next)
    }

    /// transformers' `_check_early_stop_heuristic`: can the best running beam still beat the
    /// worst finished hypothesis (only asked once `num_beams` are finished)?
    fn check_improvable(&mut self, best_running: f32) {
        if self.finished.len() < self.config.num_beams {
            return;
        }
        let lp = self.config.length_penalty;
        let len = if self.config.early_stopping == EarlyStopping::Never && lp > 0.0 { self.max_new_tokens } else { self.generated };
        let worst = self.finished.iter().map(|h| h.score).fold(f32::INFINITY, f32::min);
        self.improvable &= normalised(best_running, len, lp) > worst;
    }

    /// Places the next beams in lanes: a parent's first child keeps its lane, other children
    /// take free lanes that are first made copies of their parent.
    fn continue_with(&mut self, next: Vec<(f32, usize, u32, f32)>) -> Advance {
        let num_beams = self.config.num_beams;
        let mut slot_of: Vec<Option<usize>> = vec![None; next.len()];
        let mut taken = vec![false; num_beams];
        for (i, &(_, b, ..)) in next.iter().enumerate() {
            let parent = self.running[b].lane;
            if !taken[parent] {
                taken[parent] = true;
                slot_of[i] = Some(parent);
            }
        }
        let mut forks = Vec::new();
        let mut free = (0..num_beams).filter(|&s| !taken[s]).collect::<Vec<_>>().into_iter();
        for (i, &(_, b, ..)) in next.iter().enumerate() {
            if slot_of[i].is_none() {
                // `next` has at most `num_beams` entries, so a free lane is always left.
                let to = free.next().unwrap_or(0);
                forks.push(Fork { from: self.running[b].lane, to });
                slot_of[i] = Some(to);
            }
        }
        let mut running = Vec::with_capacity(next.len());
        let mut feed = Vec::with_capacity(next.len());
        for (&(score, b, token, lp), lane) in next.iter().zip(slot_of) {
            let lane = lane.unwrap_or(0);
            let parent = &self.running[b];
            let mut tokens = parent.tokens.clone();
            tokens.push(token);
            let mut logprobs = parent.logprobs.clone();
            logprobs.push(lp);
            running.push(Beam { lane, tokens, logprobs, score });
            feed.push((lane, token));
        }
        self.running = running;
        Advance::Continue { forks, feed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(num_beams: usize, early_stopping: EarlyStopping) -> BeamConfig {
        BeamConfig { num_beams, length_penalty: 1.0, early_stopping, num_return: num_beams }
    }

    /// A toy model: the log-probabilities of the next token given the beam's tokens so far.
    fn toy(tokens: &[u32]) -> Vec<(u32, f32)> {
        match tokens {
            [] => vec![(1, -0.5), (2, -1.0), (0, -3.0)],
            [1] => vec![(0, -0.2), (3, -2.0), (4, -2.5)],
            [2] => vec![(3, -0.1), (4, -0.3), (0, -4.0)],
            _ => vec![(0, -0.05), (3, -3.0), (4, -3.5)],
        }
    }

    /// Runs a search over the toy model, tracking lane contents as a worker would.
    fn run(search: &mut BeamSearch) -> (Vec<Hypothesis>, usize) {
        let mut lanes: Vec<Vec<u32>> = vec![Vec::new(); 8];
        let mut steps = 0;
        loop {
            steps += 1;
            let cands: Vec<Candidates> = search
                .live_lanes()
                .map(|s| {
                    let mut top = toy(&lanes[s]);
                    top.truncate(search.candidates_per_lane());
                    Candidates { lane: s, top }
                })
                .collect();
            match search.advance(&cands) {
                Advance::Done(h) => return (h, steps),
                Advance::Continue { forks, feed } => {
                    for f in forks {
                        assert!(f.from != f.to);
                        lanes[f.to] = lanes[f.from].clone();
                    }
                    for (s, t) in feed {
                        lanes[s].push(t);
                    }
                }
            }
        }
    }

    #[test]
    fn finds_the_hypothesis_greedy_misses() {
        // Greedy takes 1 (−0.5) then 0 (−0.2): −0.7 in 2 tokens, −0.35 per token. Beam search
        // also keeps 2 and finds 2 3 0: −1.15 in 3 tokens, −0.383; and 2 4 0 at −0.45.
        let mut search = BeamSearch::new(config(2, EarlyStopping::Never), 5, vec![0]);
        let (hyps, _) = run(&mut search);
        assert_eq!(hyps[0].tokens, vec![1, 0]);
        assert!((hyps[0].score - (-0.7 / 2.0)).abs() < 1e-6);
        assert!(hyps[0].ended);
        assert_eq!(hyps[1].tokens, vec![2, 3, 0]);
        assert!((hyps[1].score - (-1.15 / 3.0)).abs() < 1e-6);
        assert_eq!(hyps[1].logprobs, vec![-1.0, -0.1, -0.05]);
    }

    #[test]
    fn a_length_penalty_of_zero_prefers_the_highest_sum() {
        let mut search = BeamSearch::new(BeamConfig { length_penalty: 0.0, ..config(2, EarlyStopping::Never) }, 5, vec![0]);
        let (hyps, _) = run(&mut search);
        assert_eq!(hyps[0].tokens, vec![1, 0]);
        assert!((hyps[0].score - (-0.7)).abs() < 1e-6);
    }

    #[test]
    fn early_stopping_first_ends_once_num_beams_are_finished() {
        let mut first = BeamSearch::new(config(2, EarlyStopping::First), 50, vec![0]);
        let (hyps, steps) = run(&mut first);
        assert_eq!(hyps.len(), 2);
        assert!(steps <= 3, "took {steps} steps");
    }

    #[test]
    fn the_length_limit_finishes_every_beam() {
        // With no end token reachable in time, the limit ends the search after one step.
        let mut search = BeamSearch::new(BeamConfig { num_return: 1, ..config(2, EarlyStopping::Heuristic) }, 1, vec![0]);
        let (hyps, steps) = run(&mut search);
        assert_eq!(steps, 1);
        assert_eq!(hyps.len(), 1);
        assert_eq!(hyps[0].tokens, vec![1]);
        assert!(!hyps[0].ended);
    }

    #[test]
    fn children_of_one_beam_take_free_slots_by_forking() {
        let mut search = BeamSearch::new(config(3, EarlyStopping::Never), 10, vec![99]);
        let first = search.advance(&[Candidates { lane: 0, top: vec![(5, -0.1), (6, -0.2), (7, -0.3), (8, -0.4)] }]);
        let Advance::Continue { forks, feed } = first else { panic!("ended early") };
        assert_eq!(feed, vec![(0, 5), (1, 6), (2, 7)]);
        assert_eq!(forks, vec![Fork { from: 0, to: 1 }, Fork { from: 0, to: 2 }]);
        assert_eq!(search.candidates_per_lane(), 6);
    }
}
