//! The loop guard: notices a generation that has started repeating itself.
//!
//! Two signals, both over what the model generated (never the prompt): a tail of tokens made
//! of one unit of 1..=`max_period` tokens repeated at least `min_repeats` times in a row, and,
//! optionally, one whole sentence produced `min_repeats` times. Checking costs at most
//! `max_period² · min_repeats / 2` comparisons per token, and only over the recent tail.

use std::collections::HashMap;

/// Largest period a request may ask the guard to look for.
pub const MAX_PERIOD: u32 = 256;
/// Largest repeat count a request may ask for.
pub const MAX_REPEATS: u32 = 1024;

/// Remedies applied before a loop that keeps coming back ends the generation.
pub const MAX_REMEDIES: u32 = 3;
/// Longest a remedy may last, in tokens.
pub const MAX_REMEDY_TOKENS: u32 = 1024;

/// What the request asked the guard to do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoopGuardConfig {
    pub max_period: usize,
    pub min_repeats: usize,
    pub sentences: bool,
    /// `None`: stop at the first loop. Otherwise sample hotter for a while, up to
    /// [`MAX_REMEDIES`] times.
    pub remedy: Option<Remedy>,
}

/// Sampling at a raised temperature for a number of tokens, to leave a loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Remedy {
    pub temperature: f32,
    pub tokens: u32,
}

/// A loop the guard found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loop {
    /// The last `period * repeats` tokens are `repeats` copies of one `period`-token unit.
    Tokens { period: usize, repeats: usize, unit: Vec<u32> },
    /// The same sentence was completed `repeats` times.
    Sentence { text: String, repeats: usize },
}

/// Per-sequence state of the guard.
#[derive(Debug)]
pub struct LoopGuard {
    config: LoopGuardConfig,
    tokens: Vec<u32>,
    /// Text since the last sentence end.
    sentence: String,
    seen: HashMap<String, usize>,
}

/// Characters that end a sentence, in Latin and CJK punctuation.
pub(crate) fn ends_sentence(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '\n' | '。' | '！' | '？')
}

impl LoopGuard {
    pub fn new(config: LoopGuardConfig) -> Self {
        Self { config, tokens: Vec::new(), sentence: String::new(), seen: HashMap::new() }
    }

    /// Forgets the tokens seen so far (after a remedy, only a loop that forms again counts).
    /// Sentence counts are kept: a sentence said again after the remedy still repeats.
    pub fn reset(&mut self) {
        self.tokens.clear();
    }

    /// Takes the next generated token and the text it completed; returns the loop it closes.
    pub fn push(&mut self, token: u32, text: &str) -> Option<Loop> {
        self.tokens.push(token);
        if let Some(found) = self.token_loop() {
            return Some(found);
        }
        if self.config.sentences {
            return self.sentence_loop(text);
        }
        None
    }

    fn token_loop(&self) -> Option<Loop> {
        let k = self.config.min_repeats;
        let n = self.tokens.len();
        for period in 1..=self.config.max_period {
            if period * k > n {
                break;
            }
            let tail = &self.tokens[n - period * k..];
            let unit = &tail[tail.len() - period..];
            if tail.chunks_exact(period).all(|c| c == unit) {
                return Some(Loop::Tokens { period, repeats: k, unit: unit.to_vec() });
            }
        }
        None
    }

    fn sentence_loop(&mut self, text: &str) -> Option<Loop> {
        for c in text.chars() {
            self.sentence.push(c);
            if !ends_sentence(c) {
                continue;
            }
            let sentence = std::mem::take(&mut self.sentence);
            let key = sentence.trim();
            // Punctuation alone (a blank line, "...") is not a sentence worth counting.
            if !key.chars().any(char::is_alphanumeric) {
                continue;
            }
            let count = self.seen.entry(key.to_string()).or_insert(0);
            *count += 1;
            if *count >= self.config.min_repeats {
                return Some(Loop::Sentence { text: key.to_string(), repeats: *count });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(max_period: usize, min_repeats: usize, sentences: bool) -> LoopGuard {
        LoopGuard::new(LoopGuardConfig { max_period, min_repeats, sentences, remedy: None })
    }

    #[test]
    fn a_repeating_unit_is_found_at_its_period() {
        let mut g = guard(8, 3, false);
        let stream = [9, 1, 2, 3, 1, 2, 3, 1, 2];
        assert!(stream.iter().all(|&t| g.push(t, "").is_none()), "two and a half repeats are not a loop yet");
        assert_eq!(g.push(3, ""), Some(Loop::Tokens { period: 3, repeats: 3, unit: vec![1, 2, 3] }));
    }

    #[test]
    fn a_single_token_run_is_period_one() {
        let mut g = guard(4, 4, false);
        assert_eq!(g.push(7, ""), None);
        assert_eq!(g.push(7, ""), None);
        assert_eq!(g.push(7, ""), None);
        assert_eq!(g.push(7, ""), Some(Loop::Tokens { period: 1, repeats: 4, unit: vec![7] }));
    }

    #[test]
    fn periods_longer_than_the_limit_are_not_reported() {
        let mut g = guard(2, 2, false);
        for t in [1, 2, 3, 1, 2, 3] {
            assert_eq!(g.push(t, ""), None);
        }
    }

    #[test]
    fn varied_text_never_fires() {
        let mut g = guard(16, 3, true);
        for t in 0..500u32 {
            let text = format!("word{t} ");
            assert_eq!(g.push(t * 7 % 101, &text), None, "token {t}");
        }
    }

    #[test]
    fn a_sentence_said_again_and_again_is_a_loop() {
        let mut g = guard(2, 3, true);
        let pieces = ["The cat ", "sat. ", "A dog ran. ", "The cat sat.", " The cat", " sat."];
        let found: Vec<_> = pieces.iter().enumerate().filter_map(|(i, p)| g.push(i as u32 + 100, p)).collect();
        assert_eq!(found, [Loop::Sentence { text: "The cat sat.".into(), repeats: 3 }]);
    }

    #[test]
    fn chinese_sentences_count_too() {
        let mut g = guard(1, 2, true);
        assert_eq!(g.push(1, "今天天气很好。"), None);
        assert_eq!(g.push(2, "今天天气很好。"), Some(Loop::Sentence { text: "今天天气很好。".into(), repeats: 2 }));
    }
}
