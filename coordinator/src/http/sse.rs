//! Server-sent events for streamed completions and chats: each core event of each choice becomes
//! one `data: {chunk}` event, in the order the choices produce them; the stream ends with the
//! usage chunk when `stream_options.include_usage` asked for it, then `data: [DONE]`.
//!
//! The body owns the core's response streams: when the client goes away, hyper drops the body,
//! which drops the streams, and the group loop releases each sequence on every rank before its
//! next step — the same path a cancelled gRPC call takes.

use std::convert::Infallible;

use futures_util::stream::{self, BoxStream, StreamExt};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use serde::Serialize;
use tessera_proto::v1 as pb;
use tonic::Status;

use super::error::ApiError;
use super::openai::Endpoint;
use super::response::{ChatChoice, CompletionChoice, Delta, Ending, Envelope, Head, TokenText, Usage};
use super::HttpBody;

/// `data: {json}` and the blank line that ends an event.
pub fn event(json: &impl Serialize) -> Bytes {
    let body = serde_json::to_string(json).unwrap_or_default();
    Bytes::from(format!("data: {body}\n\n"))
}

const DONE: &[u8] = b"data: [DONE]\n\n";

/// One choice's core stream, tagged with its choice index.
pub type ChoiceStream = BoxStream<'static, (u32, Result<pb::GenerateResponse, Status>)>;

/// Turns the core's events into OpenAI chunks.
pub struct Streamer {
    pub head: Head,
    pub endpoint: Endpoint,
    pub include_usage: bool,
    /// Set when the request asked for log-probabilities.
    pub logprobs: Option<TokenText>,
    pub return_token_ids: bool,
    /// Choices per prompt (`n`): choice `i` belongs to prompt `i / n`.
    pub n: u32,
    /// Per choice: characters streamed so far (the completions logprobs' `text_offset`).
    offsets: Vec<u32>,
    /// Per prompt: its tokens, once a choice of it reported them.
    prompt_tokens: Vec<Option<u32>>,
    completion_tokens: u32,
}

impl Streamer {
    pub fn new(head: Head, endpoint: Endpoint, choices: usize, n: u32) -> Self {
        let prompts = choices / n.max(1) as usize;
        Self {
            head,
            endpoint,
            include_usage: false,
            logprobs: None,
            return_token_ids: false,
            n,
            offsets: vec![0; choices],
            prompt_tokens: vec![None; prompts],
            completion_tokens: 0,
        }
    }

    /// The usage field of a chunk: `null` on every chunk when the stream ends with the usage.
    fn usage_field(&self) -> Option<Option<Usage>> {
        self.include_usage.then_some(None)
    }

    /// Chat's first chunk of each choice: the assistant role, no content yet.
    pub fn opening(&self) -> Bytes {
        if self.endpoint != Endpoint::Chat {
            return Bytes::new();
        }
        let mut out = Vec::new();
        for index in 0..self.offsets.len() as u32 {
            let delta = Delta { role: Some("assistant"), content: Some(String::new()) };
            out.extend_from_slice(&self.chat(index, delta, None, Ending::default(), None));
        }
        Bytes::from(out)
    }

    fn chat(&self, index: u32, delta: Delta, logprobs: Option<&[pb::Token]>, ending: Ending, ids: Option<Vec<u32>>) -> Bytes {
        let logprobs = logprobs.and_then(|t| self.logprobs.as_ref().map(|lp| lp.chat(t)));
        let choice = ChatChoice { index, message: None, delta: Some(delta), logprobs, ending, token_ids: ids };
        event(&Envelope { head: self.head.clone(), choices: vec![choice], usage: self.usage_field() })
    }

    fn completion(&mut self, index: u32, text: String, logprobs: Option<&[pb::Token]>, ending: Ending, ids: Option<Vec<u32>>) -> Bytes {
        let offset = &mut self.offsets[index as usize];
        let logprobs = match (logprobs, self.logprobs.as_ref()) {
            (Some(tokens), Some(lp)) => {
                let (logprobs, next) = lp.completion(tokens, *offset);
                *offset = next;
                Some(logprobs)
            }
            _ => None,
        };
        let choice = CompletionChoice { index, text, logprobs, ending, token_ids: ids };
        event(&Envelope { head: self.head.clone(), choices: vec![choice], usage: self.usage_field() })
    }

    /// The bytes one core event of choice `index` becomes (possibly none), or the error event
    /// that ends the stream.
    pub fn on_event(&mut self, index: u32, event: Result<pb::GenerateResponse, Status>) -> Result<Bytes, Bytes> {
        use pb::generate_response::Event;
        let event = event.map_err(|status| error_event(&ApiError::from_status(&status)))?;
        match event.event {
            Some(Event::Chunk(chunk)) => {
                let wants_tokens = self.logprobs.is_some() || self.return_token_ids;
                if chunk.text.is_empty() && (!wants_tokens || chunk.tokens.is_empty()) {
                    return Ok(Bytes::new());
                }
                let ids = self.return_token_ids.then(|| chunk.tokens.iter().map(|t| t.id).collect());
                let logprobs = self.logprobs.is_some().then_some(chunk.tokens.as_slice());
                Ok(match self.endpoint {
                    Endpoint::Chat => self.chat(index, Delta { role: None, content: Some(chunk.text) }, logprobs, Ending::default(), ids),
                    Endpoint::Completions => self.completion(index, chunk.text, logprobs, Ending::default(), ids),
                })
            }
            Some(Event::Finished(finished)) => {
                let usage = finished.usage.unwrap_or_default();
                self.completion_tokens += usage.completion_tokens;
                self.prompt_tokens[(index / self.n.max(1)) as usize] = Some(usage.prompt_tokens);
                let ending = Ending::of(&finished);
                Ok(match self.endpoint {
                    Endpoint::Chat => self.chat(index, Delta::default(), None, ending, None),
                    Endpoint::Completions => self.completion(index, String::new(), None, ending, None),
                })
            }
            Some(Event::Started(_) | Event::Progress(_)) | None => Ok(Bytes::new()),
        }
    }

    /// The end of the stream: the usage chunk when asked for, then `[DONE]`.
    pub fn closing(&self) -> Bytes {
        let mut out = Vec::new();
        if self.include_usage {
            let prompt: u32 = self.prompt_tokens.iter().flatten().sum();
            let usage = Some(Some(Usage::new(prompt, self.completion_tokens)));
            let bytes = match self.endpoint {
                Endpoint::Chat => event(&Envelope::<ChatChoice> { head: self.head.clone(), choices: Vec::new(), usage }),
                Endpoint::Completions => event(&Envelope::<CompletionChoice> { head: self.head.clone(), choices: Vec::new(), usage }),
            };
            out.extend_from_slice(&bytes);
        }
        out.extend_from_slice(DONE);
        Bytes::from(out)
    }
}

/// An error mid-stream, after the 200 was sent: OpenAI's error object as an event (the SDK
/// raises it as an `APIError`).
pub fn error_event(error: &ApiError) -> Bytes {
    Bytes::from(format!("data: {}\n\n", error.to_json()))
}

/// Where the body is in its life.
enum Phase {
    Opening,
    Running,
    Done,
}

/// The response body: the opening chunks, every choice's chunks as they come, the closing.
pub fn body(streamer: Streamer, choices: Vec<ChoiceStream>) -> HttpBody {
    let merged = stream::select_all(choices);
    let frames = stream::unfold((merged, streamer, Phase::Opening), |(mut merged, mut streamer, phase)| async move {
        match phase {
            Phase::Done => None,
            Phase::Opening => {
                let bytes = streamer.opening();
                Some((bytes, (merged, streamer, Phase::Running)))
            }
            Phase::Running => loop {
                match merged.next().await {
                    Some((index, event)) => match streamer.on_event(index, event) {
                        Ok(bytes) if bytes.is_empty() => continue,
                        Ok(bytes) => break Some((bytes, (merged, streamer, Phase::Running))),
                        // The other choices' streams are dropped with the state: cancelled.
                        Err(error) => break Some((error, (merged, streamer, Phase::Done))),
                    },
                    None => break Some((streamer.closing(), (merged, streamer, Phase::Done))),
                }
            },
        }
    });
    let frames = frames.filter(|bytes| std::future::ready(!bytes.is_empty())).map(|bytes| Ok::<_, Infallible>(Frame::data(bytes)));
    StreamBody::new(frames).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> Head {
        Head { id: "chatcmpl-1".into(), object: "chat.completion.chunk", created: 1, model: "m".into(), system_fingerprint: "fp_0".into() }
    }

    fn chunk(text: &str, id: u32) -> Result<pb::GenerateResponse, Status> {
        let tokens = vec![pb::Token { id, logprob: Some(-0.5), top: Vec::new() }];
        let chunk = pb::TokenChunk { index: 0, text: text.into(), tokens };
        Ok(pb::GenerateResponse { event: Some(pb::generate_response::Event::Chunk(chunk)) })
    }

    fn finished(prompt: u32, completion: u32) -> Result<pb::GenerateResponse, Status> {
        let finished = pb::Finished {
            reason: pb::FinishReason::Length as i32,
            usage: Some(pb::Usage { prompt_tokens: prompt, completion_tokens: completion }),
            ..Default::default()
        };
        Ok(pb::GenerateResponse { event: Some(pb::generate_response::Event::Finished(finished)) })
    }

    /// The JSON of every `data:` event in `bytes`, `[DONE]` as a string.
    fn events(bytes: &[u8]) -> Vec<serde_json::Value> {
        let text = std::str::from_utf8(bytes).expect("utf-8");
        assert!(text.ends_with("\n\n"), "{text:?}");
        text.split_terminator("\n\n")
            .map(|e| {
                let data = e.strip_prefix("data: ").expect("a data line");
                serde_json::from_str(data).unwrap_or_else(|_| serde_json::Value::String(data.into()))
            })
            .collect()
    }

    #[test]
    fn chat_chunks_open_with_the_role_and_close_with_usage_and_done() {
        let mut s = Streamer::new(head(), Endpoint::Chat, 2, 2);
        s.include_usage = true;
        let opening = events(&s.opening());
        assert_eq!(opening.len(), 2);
        assert_eq!(opening[1]["choices"][0]["delta"], serde_json::json!({"role": "assistant", "content": ""}));
        assert_eq!(opening[0]["usage"], serde_json::Value::Null);
        let e = events(&s.on_event(1, chunk("你好", 5)).expect("chunk"));
        assert_eq!((e[0]["choices"][0]["index"].as_u64(), e[0]["choices"][0]["delta"]["content"].as_str()), (Some(1), Some("你好")));
        // A chunk whose text is still held back (half a character) sends nothing ...
        assert!(s.on_event(0, chunk("", 6)).expect("empty").is_empty());
        // ... unless the client asked for every token.
        s.return_token_ids = true;
        let e = events(&s.on_event(0, chunk("", 6)).expect("ids"));
        assert_eq!(e[0]["choices"][0]["token_ids"], serde_json::json!([6]));
        let end = events(&s.on_event(0, finished(7, 3)).expect("finished"));
        assert_eq!(end[0]["choices"][0]["finish_reason"], "length");
        assert_eq!(end[0]["choices"][0]["delta"], serde_json::json!({}));
        s.on_event(1, finished(7, 4)).expect("finished");
        let closing = events(&s.closing());
        // The prompt is counted once for its two choices.
        assert_eq!(closing[0]["usage"], serde_json::json!({"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14}));
        assert_eq!(closing[0]["choices"], serde_json::json!([]));
        assert_eq!(closing[1], "[DONE]");
    }

    #[test]
    fn completion_chunks_carry_logprobs_and_errors_end_the_stream() {
        let mut s = Streamer::new(Head { object: "text_completion", ..head() }, Endpoint::Completions, 1, 1);
        assert!(s.opening().is_empty());
        let tokenizer = tokenizers::Tokenizer::new(tokenizers::models::bpe::BPE::default());
        s.logprobs = Some(TokenText::new(std::sync::Arc::new(tokenizer)));
        let e = events(&s.on_event(0, chunk("a", 0)).expect("chunk"));
        let lp = &e[0]["choices"][0]["logprobs"];
        assert_eq!((lp["token_logprobs"][0].as_f64(), lp["text_offset"][0].as_u64()), (Some(-0.5), Some(0)));
        assert!(e[0].get("usage").is_none(), "no usage field unless include_usage");
        let error = s.on_event(0, Err(Status::unavailable("the group was lost"))).expect_err("an error ends the stream");
        let e = events(&error);
        assert_eq!((e[0]["error"]["message"].as_str(), e[0]["error"]["code"].as_str()), (Some("the group was lost"), Some("no_capacity")));
    }
}
