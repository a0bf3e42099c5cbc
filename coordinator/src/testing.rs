//! Requests and clients for unit tests of the scheduling core, without sockets or threads: a
//! request's events go to a channel the test reads.

use std::sync::Arc;
use std::time::Instant;

use tessera_model::fixture::scripted::{fixture_tokenizer, EOS};
use tessera_proto::v1 as pb;
use tessera_proto::worker as wpb;
use tokio::sync::mpsc;
use tonic::Status;

use crate::beam::BeamConfig;
use crate::generation::Generation;
use crate::loop_guard::LoopGuardConfig;
use crate::output::SequenceOutput;
use crate::request::Stopping;
use crate::scheduler::NewSequence;

/// The fixture tokenizer's end-of-sequence id.
pub(crate) const END: u32 = EOS;

/// A request to build.
pub(crate) struct Req {
    pub seq: u64,
    pub prompt_len: usize,
    pub max_new: u32,
    pub deadline: Option<Instant>,
    pub beams: Option<usize>,
    pub loop_guard: Option<LoopGuardConfig>,
}

impl Req {
    pub(crate) fn new(seq: u64, prompt_len: usize, max_new: u32) -> Self {
        Self { seq, prompt_len, max_new, deadline: None, beams: None, loop_guard: None }
    }

    pub(crate) fn deadline(mut self, at: Instant) -> Self {
        self.deadline = Some(at);
        self
    }

    pub(crate) fn beams(mut self, n: usize) -> Self {
        self.beams = Some(n);
        self
    }

    pub(crate) fn loop_guard(mut self, config: LoopGuardConfig) -> Self {
        self.loop_guard = Some(config);
        self
    }

    /// The prompt: distinct ordinary tokens.
    pub(crate) fn prompt(&self) -> Vec<u32> {
        (0..self.prompt_len as u32).map(|i| 100 + i % 100).collect()
    }

    /// The request and the client that reads its events.
    pub(crate) fn build(self) -> (NewSequence, Client) {
        let tokenizer = Arc::new(fixture_tokenizer().expect("the fixture tokenizer builds"));
        let stopping = Stopping {
            max_new_tokens: self.max_new,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            eos: vec![END],
            loop_guard: self.loop_guard,
            remove_repeated_sentences: false,
        };
        let prompt = self.prompt();
        let generation = Generation::new(tokenizer, stopping, prompt.len() as u32, Instant::now());
        let (events, rx) = mpsc::unbounded_channel();
        let sampling = wpb::Sampling { temperature: 0.7, seed: 7, ..Default::default() };
        let output = SequenceOutput::new(generation, events, sampling);
        let beam = self.beams.map(|num_beams| BeamConfig {
            num_beams,
            length_penalty: 1.0,
            early_stopping: crate::beam::EarlyStopping::Heuristic,
            num_return: 1,
        });
        let reserve = prompt.len() as u64 + u64::from(self.max_new);
        let reserve = match self.beams {
            Some(n) => n as u64 * tessera_proto::kv_blocks(reserve) * tessera_proto::KV_BLOCK_TOKENS,
            None => reserve,
        };
        (
            NewSequence {
                seq: self.seq,
                prompt,
                reserve,
                deadline: self.deadline,
                output,
                beam,
                resume: None,
                no_prefix_cache: false,
                adapter: None,
            },
            Client { rx },
        )
    }
}

/// What a request's client received.
pub(crate) struct Client {
    rx: mpsc::UnboundedReceiver<Result<pb::GenerateResponse, Status>>,
}

impl Client {
    /// Every event received since the last call.
    pub(crate) fn events(&mut self) -> Vec<Result<pb::generate_response::Event, Status>> {
        std::iter::from_fn(|| self.rx.try_recv().ok()).map(|r| r.map(|e| e.event.expect("every response has an event"))).collect()
    }

    /// Token ids of the chunks received since the last call, and the finish if one came.
    pub(crate) fn tokens_and_end(&mut self) -> (Vec<u32>, Option<Result<pb::Finished, Status>>) {
        let mut tokens = Vec::new();
        let mut end = None;
        for e in self.events() {
            match e {
                Ok(pb::generate_response::Event::Chunk(c)) => tokens.extend(c.tokens.iter().map(|t| t.id)),
                Ok(pb::generate_response::Event::Finished(f)) => end = Some(Ok(f)),
                Ok(pb::generate_response::Event::Started(_) | pb::generate_response::Event::Progress(_)) => {}
                Err(status) => end = Some(Err(status)),
            }
        }
        (tokens, end)
    }

    /// The client goes away.
    pub(crate) fn hang_up(self) {}
}

/// Rank 0's answer to `step`: `token` for every sequence that samples, with `draws` random
/// numbers drawn.
pub(crate) fn answer(step: &crate::scheduler::Step, token: u32, draws: u64) -> Vec<wpb::SampledToken> {
    step.seqs
        .iter()
        .filter(|s| s.sample)
        .map(|s| wpb::SampledToken { seq_id: s.seq_id, token, logprob: -0.5, top: Vec::new(), rng_draws: draws })
        .collect()
}

/// Rank 0's beam answer to `step`: for every lane that samples, `top` as its candidates.
pub(crate) fn beam_answer(step: &crate::scheduler::Step, top: &[(u32, f32)]) -> Vec<wpb::SampledToken> {
    let top: Vec<wpb::TopToken> = top.iter().map(|&(token, logprob)| wpb::TopToken { token, logprob }).collect();
    step.seqs
        .iter()
        .filter(|s| s.sample)
        .map(|s| wpb::SampledToken { seq_id: s.seq_id, token: top[0].token, logprob: top[0].logprob, top: top.clone(), rng_draws: 0 })
        .collect()
}
