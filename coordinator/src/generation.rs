//! One sequence's output side: sampled tokens in, `TokenChunk`s and one `Finished` out.
//!
//! Pure state, no I/O, so every finishing rule is testable without a cluster: end-of-sequence
//! and stop tokens end generation without being streamed; stop strings end it before the
//! matched text; `max_new_tokens` ends it with `LENGTH`. Text is released only when final
//! ([`IncrementalDecoder`], [`StopMatcher`]), and whatever is still held back is flushed when
//! the sequence ends, so the streamed text always concatenates to the full completion.

use std::sync::Arc;
use std::time::Instant;

use tessera_proto::v1 as pb;
use tokenizers::Tokenizer;

use crate::beam::Hypothesis;
use crate::detokenize::{DecodeError, IncrementalDecoder};
use crate::loop_guard::{Loop, LoopGuard, MAX_REMEDIES};
use crate::request::Stopping;
use crate::sentences::SentenceFilter;
use crate::stop::{StopMatcher, StopOutcome};

/// What one accepted token produced for the client.
#[derive(Debug, Default, PartialEq)]
pub struct Emitted {
    pub chunk: Option<pb::TokenChunk>,
    /// Set when the sequence is done; release it on every rank.
    pub finished: Option<pb::Finished>,
    /// The loop guard's remedy starts or ends: change how the next tokens are sampled.
    pub resample: Option<Resample>,
}

/// A change of sampling the loop guard asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Resample {
    /// Sample at this temperature from the next token on.
    Raise { temperature: f32 },
    /// Go back to the request's own sampling.
    Restore,
}

/// Output state of one running sequence.
pub struct Generation {
    tokenizer: Arc<Tokenizer>,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    guard: Option<LoopGuard>,
    /// Set when the request asked for repeated sentences to be removed from the text.
    sentences: Option<SentenceFilter>,
    /// Remedies applied so far, and the loop that caused the last one.
    remedies: u32,
    last_loop: Option<Loop>,
    /// Tokens left in the running remedy.
    remedy_left: u32,
    stopping: Stopping,
    prompt_tokens: u32,
    generated: u32,
    streamed: u64,
    started: Instant,
    first_token: Option<Instant>,
}

impl Generation {
    /// `started` is when the request arrived, for time-to-first-token.
    pub fn new(tokenizer: Arc<Tokenizer>, stopping: Stopping, prompt_tokens: u32, started: Instant) -> Self {
        let stop = StopMatcher::new(stopping.stop.iter().cloned());
        // Special tokens (chat markers) are not part of the completion text, as in HF's
        // `skip_special_tokens=True`.
        let decoder = IncrementalDecoder::new(tokenizer.clone(), true);
        let guard = stopping.loop_guard.map(LoopGuard::new);
        let sentences = stopping.remove_repeated_sentences.then(SentenceFilter::new);
        Self {
            tokenizer,
            decoder,
            stop,
            guard,
            sentences,
            remedies: 0,
            last_loop: None,
            remedy_left: 0,
            stopping,
            prompt_tokens,
            generated: 0,
            streamed: 0,
            started,
            first_token: None,
        }
    }

    /// When the request arrived.
    pub fn arrived(&self) -> Instant {
        self.started
    }

    pub fn generated(&self) -> u32 {
        self.generated
    }

    pub fn max_new_tokens(&self) -> u32 {
        self.stopping.max_new_tokens
    }

    /// Tokens that end a generation without being streamed: end-of-sequence and stop tokens.
    pub fn end_tokens(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.stopping.eos.iter().chain(&self.stopping.stop_token_ids).copied().collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Takes the next sampled token.
    pub fn accept(&mut self, token: u32, logprob: f32) -> Result<Emitted, DecodeError> {
        self.accept_with_top(token, logprob, Vec::new())
    }

    /// Takes the next sampled token with the alternatives the request asked to see.
    pub fn accept_with_top(&mut self, token: u32, logprob: f32, top: Vec<pb::TopLogprob>) -> Result<Emitted, DecodeError> {
        self.generated += 1;
        self.first_token.get_or_insert_with(Instant::now);
        if self.stopping.stop_token_ids.contains(&token) {
            let matched = self.tokenizer.decode(&[token], false).unwrap_or_default();
            return self.finish_without(pb::FinishReason::Stop, matched);
        }
        if self.stopping.eos.contains(&token) {
            return self.finish_without(pb::FinishReason::Eos, String::new());
        }
        let piece = self.decoder.push(token)?;
        let tokens = vec![pb::Token { id: token, logprob: Some(logprob), top }];
        let mut looped = self.guard.as_mut().and_then(|g| g.push(token, &piece));
        let mut resample = None;
        if self.remedy_left > 0 {
            self.remedy_left -= 1;
            if self.remedy_left == 0 {
                resample = Some(Resample::Restore);
            }
        }
        let remedy = self.stopping.loop_guard.and_then(|c| c.remedy);
        if let (Some(found), Some(remedy)) = (&looped, remedy) {
            if self.remedies < MAX_REMEDIES {
                self.remedies += 1;
                self.remedy_left = remedy.tokens;
                self.last_loop = looped.take();
                if let Some(g) = self.guard.as_mut() {
                    g.reset();
                }
                resample = Some(Resample::Raise { temperature: remedy.temperature });
            } else {
                tracing::debug!(?found, "loop found again after every remedy; stopping");
            }
        }
        let mut emitted = self.emit(piece, tokens, looped)?;
        emitted.resample = resample;
        Ok(emitted)
    }

    /// Ends a beam search: its best hypothesis goes through the same rules as sampled tokens
    /// (end and stop tokens, `max_new_tokens`) into one chunk, and `Finished` lists all of
    /// `best` (best first).
    pub fn accept_hypotheses(&mut self, best: &[Hypothesis]) -> Result<Emitted, DecodeError> {
        let mut text = String::new();
        let mut tokens = Vec::new();
        let mut finished = None;
        if let Some(first) = best.first() {
            for (&token, &logprob) in first.tokens.iter().zip(&first.logprobs) {
                let emitted = self.accept(token, logprob)?;
                if let Some(chunk) = emitted.chunk {
                    text.push_str(&chunk.text);
                    tokens.extend(chunk.tokens);
                }
                if emitted.finished.is_some() {
                    finished = emitted.finished;
                    break;
                }
            }
        }
        let mut finished = match finished {
            Some(f) => f,
            // A hypothesis always ends with an end token or at the length limit; an empty
            // search (no hypothesis at all) is reported as having run out of length.
            None => {
                let (rest, _) = self.drain()?;
                text.push_str(&rest);
                self.finished(pb::FinishReason::Length, String::new())
            }
        };
        finished.hypotheses = best.iter().map(|h| self.hypothesis(h)).collect();
        let chunk = (!text.is_empty() || !tokens.is_empty()).then_some(pb::TokenChunk { index: 0, text, tokens });
        Ok(Emitted { chunk, finished: Some(finished), resample: None })
    }

    fn hypothesis(&self, h: &Hypothesis) -> pb::Hypothesis {
        let last = h.tokens.last().copied();
        let ends = |ids: &[u32]| last.is_some_and(|t| ids.contains(&t));
        let (reason, ids) = if h.ended && ends(&self.stopping.stop_token_ids) {
            (pb::FinishReason::Stop, &h.tokens[..h.tokens.len() - 1])
        } else if h.ended {
            (pb::FinishReason::Eos, &h.tokens[..h.tokens.len() - 1])
        } else {
            (pb::FinishReason::Length, &h.tokens[..])
        };
        let mut text = self.tokenizer.decode(ids, true).unwrap_or_default();
        // Bytes of a character the hypothesis ended inside are withheld, as the stream's final
        // flush withholds them.
        while text.ends_with('\u{FFFD}') {
            text.pop();
        }
        pb::Hypothesis { text, ids: ids.to_vec(), score: h.score, reason: reason as i32 }
    }

    /// The chunk and, when the sequence ends, the `Finished` for one streamed token.
    fn emit(&mut self, piece: String, tokens: Vec<pb::Token>, looped: Option<Loop>) -> Result<Emitted, DecodeError> {
        match self.stop.push(&piece) {
            // A stop string ends the sequence first: it is what the client asked for.
            StopOutcome::Continue(text) if looped.is_some() => {
                let (rest, _) = self.drain()?;
                let chunk = self.final_chunk(text + &rest, tokens);
                let mut finished = self.finished(pb::FinishReason::Repetition, String::new());
                finished.r#loop = looped.map(|l| self.report(l));
                Ok(Emitted { chunk: Some(chunk), finished: Some(finished), resample: None })
            }
            StopOutcome::Stopped { text, matched } => {
                let chunk = self.final_chunk(text, tokens);
                let finished = self.finished(pb::FinishReason::Stop, matched);
                Ok(Emitted { chunk: Some(chunk), finished: Some(finished), resample: None })
            }
            StopOutcome::Continue(text) if self.generated >= self.stopping.max_new_tokens => {
                let (rest, matched) = self.drain()?;
                let reason = if matched.is_some() { pb::FinishReason::Stop } else { pb::FinishReason::Length };
                let chunk = self.final_chunk(text + &rest, tokens);
                Ok(Emitted { chunk: Some(chunk), finished: Some(self.finished(reason, matched.unwrap_or_default())), resample: None })
            }
            StopOutcome::Continue(text) => Ok(Emitted { chunk: Some(self.chunk(text, tokens)), finished: None, resample: None }),
        }
    }

    /// Ends on a token that is not streamed (EOS, a stop token), flushing held-back text.
    fn finish_without(&mut self, reason: pb::FinishReason, matched: String) -> Result<Emitted, DecodeError> {
        let (rest, found) = self.drain()?;
        let (reason, matched) = match found {
            Some(stop) => (pb::FinishReason::Stop, stop),
            None => (reason, matched),
        };
        let chunk = self.final_chunk(rest, Vec::new());
        let chunk = (!chunk.text.is_empty()).then_some(chunk);
        Ok(Emitted { chunk, finished: Some(self.finished(reason, matched)), resample: None })
    }

    /// Everything the decoder and the stop matcher still hold, and the stop string it
    /// completes, if any.
    fn drain(&mut self) -> Result<(String, Option<String>), DecodeError> {
        let piece = self.decoder.flush()?;
        Ok(match self.stop.push(&piece) {
            StopOutcome::Stopped { text, matched } => (text, Some(matched)),
            StopOutcome::Continue(text) => (text + &self.stop.finish(), None),
        })
    }

    /// What the guard saw (`found`) and did: stopped (`stopped`), after `self.remedies` remedies.
    fn report_of(&self, found: &Loop, stopped: bool) -> pb::LoopReport {
        let action = if stopped { pb::LoopAction::Stop } else { pb::LoopAction::RaiseTemperature } as i32;
        let remedies = self.remedies;
        match found {
            Loop::Tokens { period, repeats, unit } => pb::LoopReport {
                period: *period as u32,
                repeats: *repeats as u32,
                text: self.tokenizer.decode(unit, true).unwrap_or_default(),
                action,
                remedies,
            },
            Loop::Sentence { text, repeats } => {
                pb::LoopReport { period: 0, repeats: *repeats as u32, text: text.clone(), action, remedies }
            }
        }
    }

    fn report(&self, found: Loop) -> pb::LoopReport {
        self.report_of(&found, true)
    }

    /// The last chunk of a sequence: also releases what the sentence filter still holds.
    fn final_chunk(&mut self, text: String, tokens: Vec<pb::Token>) -> pb::TokenChunk {
        let mut chunk = self.chunk(text, tokens);
        if let Some(f) = self.sentences.as_mut() {
            chunk.text.push_str(&f.finish());
        }
        chunk
    }

    fn chunk(&mut self, text: String, tokens: Vec<pb::Token>) -> pb::TokenChunk {
        let text = match self.sentences.as_mut() {
            Some(f) => f.push(&text),
            None => text,
        };
        let index = self.streamed;
        self.streamed += tokens.len() as u64;
        pb::TokenChunk { index, text, tokens }
    }

    fn finished(&self, reason: pb::FinishReason, matched_stop: String) -> pb::Finished {
        let ms = |t: Instant| t.duration_since(self.started).as_secs_f64() * 1e3;
        pb::Finished {
            reason: reason as i32,
            usage: Some(pb::Usage { prompt_tokens: self.prompt_tokens, completion_tokens: self.generated }),
            timing: Some(pb::Timing { time_to_first_token_ms: self.first_token.map(ms).unwrap_or_default(), total_ms: ms(Instant::now()) }),
            matched_stop,
            // A generation the guard steered out of a loop says so however it ended.
            r#loop: self.last_loop.as_ref().map(|l| self.report_of(l, false)),
            hypotheses: Vec::new(),
            removed_sentences: self.sentences.as_ref().map_or(0, SentenceFilter::removed),
            // Counted where the request's output lives (`output::SequenceOutput`).
            migrations: 0,
            stages: Vec::new(),
        }
    }
}
