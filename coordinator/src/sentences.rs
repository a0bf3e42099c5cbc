//! Removal of repeated sentences from streamed text: the after-the-fact remedy for a model that
//! says the same sentence again, applied as the text streams.
//!
//! A sentence ends at the characters the loop guard also uses ([`ends_sentence`]). Its text is
//! held back until it ends, then released unless the same sentence (compared without surrounding
//! whitespace, otherwise exactly) was released before; a dropped sentence takes its leading
//! whitespace with it. So with removal on, text streams a sentence at a time; the tokens are
//! streamed as they come either way.

use std::collections::HashSet;

use crate::loop_guard::ends_sentence;

/// Held-back text and the sentences already released.
#[derive(Debug, Default)]
pub struct SentenceFilter {
    pending: String,
    seen: HashSet<String>,
    removed: u32,
}

impl SentenceFilter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes newly completed text; returns what can be released now.
    pub fn push(&mut self, text: &str) -> String {
        let mut out = String::new();
        for c in text.chars() {
            self.pending.push(c);
            if ends_sentence(c) {
                self.release(&mut out);
            }
        }
        out
    }

    /// Releases whatever is still held back (an unfinished last sentence is kept unless it
    /// repeats one exactly).
    pub fn finish(&mut self) -> String {
        let mut out = String::new();
        self.release(&mut out);
        out
    }

    /// Sentences dropped so far.
    pub fn removed(&self) -> u32 {
        self.removed
    }

    fn release(&mut self, out: &mut String) {
        let sentence = std::mem::take(&mut self.pending);
        let key = sentence.trim();
        // Whitespace alone (between sentences, or trailing) is passed on, never "repeated".
        if key.is_empty() || self.seen.insert(key.to_string()) {
            out.push_str(&sentence);
        } else {
            self.removed += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&str]) -> (String, u32) {
        let mut f = SentenceFilter::new();
        let mut out: String = pieces.iter().map(|p| f.push(p)).collect();
        out.push_str(&f.finish());
        (out, f.removed())
    }

    #[test]
    fn repeated_sentences_are_dropped_with_their_leading_space() {
        let (out, removed) = run(&["The cat sat. The", " cat sat. The dog", " ran! The cat sat.", " Done"]);
        assert_eq!(out, "The cat sat. The dog ran! Done");
        assert_eq!(removed, 2);
    }

    #[test]
    fn chinese_sentences_and_newlines_end_sentences() {
        let (out, removed) = run(&["风和日丽。", "风和日丽。", "天气很好\n", "天气很好\n"]);
        assert_eq!(out, "风和日丽。天气很好\n");
        assert_eq!(removed, 2);
    }

    #[test]
    fn text_without_repeats_is_unchanged_and_held_back_only_until_the_sentence_ends() {
        let mut f = SentenceFilter::new();
        assert_eq!(f.push("One two"), "");
        assert_eq!(f.push(" three. Four"), "One two three.");
        assert_eq!(f.finish(), " Four");
        assert_eq!(f.removed(), 0);
    }

    #[test]
    fn similar_but_different_sentences_are_kept() {
        let (out, removed) = run(&["It is. It is! it is. It is"]);
        assert_eq!(out, "It is. It is! it is. It is");
        assert_eq!(removed, 0);
    }
}
