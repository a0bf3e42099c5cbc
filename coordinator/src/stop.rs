//! Stop strings over streamed text.
//!
//! Text is released as soon as it can no longer be part of a stop string: only the longest
//! suffix that is a prefix of some stop string is held back. When a stop string appears, the
//! text before it is released and generation ends; the stop string itself is never sent.

/// Result of feeding text to a [`StopMatcher`].
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text that is safe to send now (possibly empty).
    Continue(String),
    /// A stop string matched: send this text, then finish with the matched string.
    Stopped { text: String, matched: String },
}

#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// Empty strings are ignored (they would match everywhere).
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome::Continue(text.to_string());
        }
        self.held.push_str(text);
        // The earliest match wins; among matches at one position, the longest stop string.
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s)))
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.len().cmp(&a.1.len())));
        if let Some((at, s)) = found {
            let text = self.held[..at].to_string();
            let matched = s.clone();
            self.held.clear();
            return StopOutcome::Stopped { text, matched };
        }
        let keep = self.longest_partial_suffix();
        let release = self.held.len() - keep;
        let out = self.held[..release].to_string();
        self.held.drain(..release);
        StopOutcome::Continue(out)
    }

    /// Releases held-back text at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Byte length of the longest suffix of `held` that is a proper prefix of a stop string.
    fn longest_partial_suffix(&self) -> usize {
        let mut best = 0;
        for s in &self.stops {
            for (i, _) in self.held.char_indices() {
                let suffix = &self.held[i..];
                if suffix.len() < s.len() && s.starts_with(suffix) {
                    best = best.max(suffix.len());
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()));
        let mut out = String::new();
        for p in pieces {
            match m.push(p) {
                StopOutcome::Continue(t) => out.push_str(&t),
                StopOutcome::Stopped { text, matched } => {
                    out.push_str(&text);
                    return (out, Some(matched));
                }
            }
        }
        out.push_str(&m.finish());
        (out, None)
    }

    #[test]
    fn stop_split_across_pieces_is_found_and_not_sent() {
        assert_eq!(run(&["END"], &["abc E", "N", "D tail"]), ("abc ".to_string(), Some("END".into())));
    }

    #[test]
    fn partial_match_is_held_then_released() {
        let mut m = StopMatcher::new(["STOP".to_string()]);
        assert_eq!(m.push("go ST"), StopOutcome::Continue("go ".into()));
        assert_eq!(m.push("ay"), StopOutcome::Continue("STay".into()));
        assert_eq!(run(&["STOP"], &["a S", "T"]), ("a ST".to_string(), None));
    }

    #[test]
    fn earliest_match_wins_and_multibyte_text_is_safe() {
        assert_eq!(run(&["。", "好"], &["你好。"]), ("你".to_string(), Some("好".into())));
        assert_eq!(run(&["世界"], &["你好，世", "界！"]), ("你好，".to_string(), Some("世界".into())));
        assert_eq!(run(&[], &["plain"]), ("plain".to_string(), None));
        assert_eq!(run(&[""], &["empty stops ignored"]), ("empty stops ignored".to_string(), None));
    }
}
