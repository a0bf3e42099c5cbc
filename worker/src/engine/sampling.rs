//! A sequence's sampler and what it reports, shared by group steps and ring steps: the one
//! place a row of logits becomes a token, its log-probability and the alternatives asked for.

use tessera_model::sampler::{LogProbs, Sampler};

/// A sequence's sampler and what it reports.
#[derive(Clone)]
pub(super) struct SeqSampling {
    pub sampler: Sampler,
    pub top_logprobs: usize,
    /// Beam search: candidates reported per step (0: the sampler picks the token).
    pub beam_candidates: usize,
}

/// What one row of logits gave a sequence.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Pick {
    pub token: u32,
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first: the candidates of
    /// a beam search, else the `top_logprobs` asked for (empty when none were).
    pub top: Vec<(u32, f32)>,
    /// Random numbers the sampler has drawn so far.
    pub rng_draws: u64,
}

impl SeqSampling {
    /// Picks from `row`: a beam search reports its candidates (the best first, as the token),
    /// a sampled sequence draws one token.
    pub fn pick(&mut self, row: &[f32]) -> Pick {
        if self.beam_candidates > 0 {
            let mut top = Vec::with_capacity(self.beam_candidates);
            self.sampler.score(row, self.beam_candidates, &mut top);
            let (token, logprob) = top.first().copied().unwrap_or((0, f32::NEG_INFINITY));
            return Pick { token, logprob, top, rng_draws: 0 };
        }
        let token = self.sampler.sample(row);
        let log_probs = LogProbs::of(row);
        let top = if self.top_logprobs > 0 { log_probs.top(self.top_logprobs) } else { Vec::new() };
        Pick { token, logprob: log_probs.at(token as usize), top, rng_draws: self.sampler.rng_draws() }
    }
}

#[cfg(test)]
mod tests {
    use tessera_model::sampler::SamplingParams;

    use super::*;

    fn greedy(top_logprobs: usize, beam_candidates: usize) -> SeqSampling {
        SeqSampling { sampler: Sampler::new(SamplingParams::greedy()), top_logprobs, beam_candidates }
    }

    #[test]
    fn a_sampled_pick_reports_the_token_its_logprob_and_the_top_asked_for() {
        let row = [0.5, 2.0, f32::NAN, 1.0];
        let pick = greedy(2, 0).pick(&row);
        assert_eq!(pick.token, 1);
        assert_eq!(pick.logprob, LogProbs::of(&row).at(1));
        assert_eq!(pick.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3]);
        assert!(greedy(0, 0).pick(&row).top.is_empty());
    }

    #[test]
    fn a_beam_pick_reports_its_candidates_best_first() {
        let row = [0.5, 2.0, 1.0];
        let pick = greedy(0, 2).pick(&row);
        assert_eq!(pick.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
        assert_eq!((pick.token, pick.logprob), pick.top[0]);
    }
}
