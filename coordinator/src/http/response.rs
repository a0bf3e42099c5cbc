//! OpenAI's response shapes for completions and chat, whole and as stream chunks, built from the
//! core's `Started` / `TokenChunk` / `Finished` events.
//!
//! Finish reasons: `LENGTH` is `length`; `STOP` (a stop string or stop token, named in
//! `stop_reason` as vLLM does), `EOS` and the loop guard's `REPETITION` are `stop`, the last with
//! an extra `repetition` object saying what repeated. Log-probabilities come in both of OpenAI's
//! shapes: the legacy completions one (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`)
//! and chat's (`content: [{token, logprob, bytes, top_logprobs}]`).

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Map, Value};
use tessera_proto::v1 as pb;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::Tokenizer;

/// Token counts of a whole request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// What every response and chunk of one request carries.
#[derive(Debug, Clone, Serialize)]
pub struct Head {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
}

/// What the loop guard saw when it ended a choice.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Repetition {
    /// Tokens in the repeating unit (0 for a repeated sentence).
    pub period: u32,
    pub repeats: u32,
    pub text: String,
}

/// How a choice ended, in OpenAI's terms.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Ending {
    pub finish_reason: Option<&'static str>,
    /// The stop string or token text that matched (vLLM's field); `null` otherwise.
    pub stop_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition: Option<Repetition>,
}

impl Ending {
    pub fn of(finished: &pb::Finished) -> Self {
        use pb::FinishReason as R;
        let reason = R::try_from(finished.reason).unwrap_or(R::Unspecified);
        let finish_reason = match reason {
            R::Length => Some("length"),
            R::Stop | R::Eos | R::Repetition => Some("stop"),
            R::Cancelled => Some("abort"),
            R::Unspecified => None,
        };
        let stop_reason = (reason == R::Stop && !finished.matched_stop.is_empty()).then(|| finished.matched_stop.clone());
        let repetition = (reason == R::Repetition).then(|| {
            let report = finished.r#loop.clone().unwrap_or_default();
            Repetition { period: report.period, repeats: report.repeats, text: report.text }
        });
        Self { finish_reason, stop_reason, repetition }
    }
}

/// One choice of `/v1/completions`, whole or as a chunk.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    #[serde(flatten)]
    pub ending: Ending,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// One choice of `/v1/chat/completions`: `message` when whole, `delta` in a chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<Delta>,
    pub logprobs: Option<ChatLogprobs>,
    #[serde(flatten)]
    pub ending: Ending,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A response or a chunk: `Head`, the choices, and the usage (`usage: None` leaves it out;
/// `Some(None)` writes `null`, as chunks do when the stream will end with the usage).
#[derive(Debug, Clone, Serialize)]
pub struct Envelope<C> {
    #[serde(flatten)]
    pub head: Head,
    pub choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// The legacy completions log-probabilities.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<Map<String, Value>>,
    pub text_offset: Vec<u32>,
}

/// Chat's log-probabilities.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// Text and bytes of single tokens, for log-probabilities.
#[derive(Clone)]
pub struct TokenText {
    tokenizer: Arc<Tokenizer>,
    /// GPT-2's byte-level vocabulary: each character of a piece stands for one byte.
    byte_level: bool,
}

impl TokenText {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        let byte_level = match tokenizer.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => true,
            Some(DecoderWrapper::Sequence(s)) => s.get_decoders().iter().any(|d| matches!(d, DecoderWrapper::ByteLevel(_))),
            _ => false,
        };
        Self { tokenizer, byte_level }
    }

    /// The token's text as its own decode gives it (a token holding part of a character
    /// decodes to U+FFFD, as vLLM reports it), and its exact bytes where the vocabulary says
    /// them: byte-level pieces and `<0xNN>` byte-fallback tokens.
    pub fn piece(&self, id: u32) -> (String, Vec<u8>) {
        let text = self.tokenizer.decode(&[id], false).unwrap_or_default();
        let raw = self.tokenizer.id_to_token(id).unwrap_or_default();
        let bytes = byte_fallback(&raw)
            .map(|b| vec![b])
            .or_else(|| if self.byte_level { raw.chars().map(byte_of_char).collect::<Option<Vec<u8>>>() } else { None })
            .unwrap_or_else(|| text.as_bytes().to_vec());
        (text, bytes)
    }

    /// Chat's shape for `tokens`.
    pub fn chat(&self, tokens: &[pb::Token]) -> ChatLogprobs {
        let top = |t: &pb::TopLogprob| {
            let (token, bytes) = self.piece(t.id);
            TopLogprob { token, logprob: t.logprob, bytes }
        };
        let content = tokens
            .iter()
            .map(|t| {
                let (token, bytes) = self.piece(t.id);
                ChatTokenLogprob { token, logprob: t.logprob.unwrap_or(f32::NAN), bytes, top_logprobs: t.top.iter().map(top).collect() }
            })
            .collect();
        ChatLogprobs { content }
    }

    /// The completions shape for `tokens`, whose text starts at character `offset` of the
    /// completion; returns the offset after them.
    pub fn completion(&self, tokens: &[pb::Token], mut offset: u32) -> (CompletionLogprobs, u32) {
        let mut out = CompletionLogprobs::default();
        for t in tokens {
            let (text, _) = self.piece(t.id);
            out.text_offset.push(offset);
            offset += text.chars().count() as u32;
            out.tokens.push(text);
            out.token_logprobs.push(t.logprob.unwrap_or(f32::NAN));
            let top = t.top.iter().map(|alt| (self.piece(alt.id).0, f32_value(alt.logprob))).collect();
            out.top_logprobs.push(top);
        }
        (out, offset)
    }
}

/// A JSON number written as an f32 is (its shortest decimal), so a log-probability reads the
/// same in a map as in a list (widening to f64 would add digits).
fn f32_value(x: f32) -> Value {
    format!("{x}").parse::<f64>().ok().and_then(serde_json::Number::from_f64).map_or(Value::Null, Value::Number)
}

/// `<0xNN>`: a SentencePiece byte-fallback token.
fn byte_fallback(raw: &str) -> Option<u8> {
    let hex = raw.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

/// The byte a character of GPT-2's byte-level alphabet stands for: printable Latin-1 stands for
/// itself, the other 68 bytes were moved to U+0100.. in order.
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let code = c as u32;
    if code < 256 {
        return printable(code).then_some(code as u8);
    }
    let moved = (code - 256) as usize;
    (0u32..256).filter(|&b| !printable(b)).nth(moved).map(|b| b as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_reasons_map_to_openais() {
        let finished = |reason: pb::FinishReason, matched: &str| pb::Finished {
            reason: reason as i32,
            matched_stop: matched.into(),
            r#loop: (reason == pb::FinishReason::Repetition).then(|| pb::LoopReport {
                period: 2,
                repeats: 3,
                text: "ab".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(Ending::of(&finished(pb::FinishReason::Length, "")).finish_reason, Some("length"));
        assert_eq!(Ending::of(&finished(pb::FinishReason::Eos, "")), Ending { finish_reason: Some("stop"), ..Default::default() });
        let stop = Ending::of(&finished(pb::FinishReason::Stop, "\n\n"));
        assert_eq!((stop.finish_reason, stop.stop_reason.as_deref()), (Some("stop"), Some("\n\n")));
        let looped = Ending::of(&finished(pb::FinishReason::Repetition, ""));
        assert_eq!(looped.finish_reason, Some("stop"));
        assert_eq!(looped.repetition, Some(Repetition { period: 2, repeats: 3, text: "ab".into() }));
        let json = serde_json::to_value(&looped).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"finish_reason": "stop", "stop_reason": null, "repetition": {"period": 2, "repeats": 3, "text": "ab"}})
        );
    }

    #[test]
    fn envelopes_write_usage_as_openai_does() {
        let head =
            Head { id: "cmpl-1".into(), object: "text_completion", created: 5, model: "m".into(), system_fingerprint: "fp_1".into() };
        let choice = CompletionChoice { index: 0, text: "hi".into(), logprobs: None, ending: Ending::default(), token_ids: None };
        let whole = Envelope { head: head.clone(), choices: vec![choice.clone()], usage: Some(Some(Usage::new(3, 2))) };
        let v = serde_json::to_value(&whole).expect("json");
        assert_eq!(v["usage"], serde_json::json!({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}));
        assert_eq!((v["id"].as_str(), v["object"].as_str(), v["created"].as_u64()), (Some("cmpl-1"), Some("text_completion"), Some(5)));
        assert_eq!(
            v["choices"][0],
            serde_json::json!({"index": 0, "text": "hi", "logprobs": null, "finish_reason": null, "stop_reason": null})
        );
        let chunk = Envelope { head: head.clone(), choices: vec![choice.clone()], usage: Some(None) };
        assert_eq!(serde_json::to_value(&chunk).expect("json")["usage"], Value::Null);
        let plain = Envelope { head, choices: vec![choice], usage: None };
        assert!(serde_json::to_value(&plain).expect("json").get("usage").is_none());
        let delta = ChatChoice {
            index: 1,
            message: None,
            delta: Some(Delta { role: Some("assistant"), content: Some(String::new()) }),
            logprobs: None,
            ending: Ending::default(),
            token_ids: None,
        };
        assert_eq!(
            serde_json::to_value(&delta).expect("json"),
            serde_json::json!({"index": 1, "delta": {"role": "assistant", "content": ""}, "logprobs": null,
                "finish_reason": null, "stop_reason": null})
        );
    }

    #[test]
    fn logprobs_read_the_same_in_maps_and_lists() {
        let x = -3.839_353_6_f32;
        assert_eq!(serde_json::to_string(&f32_value(x)).expect("json"), serde_json::to_string(&x).expect("json"));
    }

    #[test]
    fn byte_level_characters_stand_for_their_bytes() {
        assert_eq!(byte_of_char('A'), Some(b'A'));
        assert_eq!(byte_of_char('Ġ'), Some(b' '), "GPT-2's space");
        assert_eq!(byte_of_char('Ċ'), Some(b'\n'));
        assert_eq!(byte_of_char('\u{0100}'), Some(0));
        assert_eq!(byte_of_char('ä'), Some(0xE4));
        assert_eq!(byte_of_char('中'), None);
        assert_eq!(byte_fallback("<0xE4>"), Some(0xE4));
        assert_eq!(byte_fallback("<0xE>"), None);
        assert_eq!(byte_fallback("hello"), None);
    }
}
