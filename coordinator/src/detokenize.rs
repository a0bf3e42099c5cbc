//! Incremental detokenization for streaming.
//!
//! Byte-level tokenizers split multi-byte characters (most Chinese characters are three bytes)
//! across tokens, and decoding a token alone can produce a replacement character. So text is
//! decoded over a small window of recent tokens and only the part that became final is emitted:
//! the window's text is compared with the text before the newest tokens, and nothing is emitted
//! while it ends in an incomplete character. Concatenating the emitted pieces gives exactly the
//! decode of all tokens at once, less a last character cut off by the end of the sequence.

use std::sync::Arc;

use tokenizers::Tokenizer;

/// A UTF-8 character spans at most four bytes, so at most four byte tokens can be pending before
/// the text is final: past that the bytes are invalid and are emitted as the full decode shows
/// them (U+FFFD), instead of stalling the stream forever.
const MAX_PENDING: usize = 4;

/// Streaming decoder for one sequence's generated tokens.
pub struct IncrementalDecoder {
    tokenizer: Arc<Tokenizer>,
    tokens: Vec<u32>,
    /// Start of the window whose decode anchors the comparison.
    prefix: usize,
    /// Tokens before this index have been emitted.
    read: usize,
    skip_special: bool,
}

/// A decode failure of the tokenizer (unknown id).
#[derive(Debug, thiserror::Error)]
#[error("cannot decode token ids: {0}")]
pub struct DecodeError(String);

impl IncrementalDecoder {
    pub fn new(tokenizer: Arc<Tokenizer>, skip_special: bool) -> Self {
        Self { tokenizer, tokens: Vec::new(), prefix: 0, read: 0, skip_special }
    }

    fn decode(&self, ids: &[u32]) -> Result<String, DecodeError> {
        self.tokenizer.decode(ids, self.skip_special).map_err(|e| DecodeError(e.to_string()))
    }

    /// Adds one token; returns the text it completed (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, DecodeError> {
        self.tokens.push(id);
        let before = self.decode(&self.tokens[self.prefix..self.read])?;
        let now = self.decode(&self.tokens[self.prefix..])?;
        let pending = self.tokens.len() - self.read;
        let waiting = now.ends_with('\u{FFFD}') && pending < MAX_PENDING;
        if waiting || now.len() <= before.len() || !now.is_char_boundary(before.len()) {
            return Ok(String::new());
        }
        let text = now[before.len()..].to_string();
        self.prefix = self.read;
        self.read = self.tokens.len();
        Ok(text)
    }

    /// Emits whatever is still pending (at the end of the sequence), except a last character
    /// whose bytes did not all arrive.
    pub fn flush(&mut self) -> Result<String, DecodeError> {
        if self.read == self.tokens.len() {
            return Ok(String::new());
        }
        let before = self.decode(&self.tokens[self.prefix..self.read])?;
        let now = self.decode(&self.tokens[self.prefix..])?;
        let pending = self.tokens.len() - self.read;
        self.prefix = self.read;
        self.read = self.tokens.len();
        let mut text = now.get(before.len()..).unwrap_or("").to_string();
        // The sequence ended inside a character (e.g. at max_new_tokens): the stream never
        // carries half a character, so its bytes are withheld; the token ids still report them.
        if pending < MAX_PENDING {
            while text.ends_with('\u{FFFD}') {
                text.pop();
            }
        }
        Ok(text)
    }

    /// Every token pushed so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
}
