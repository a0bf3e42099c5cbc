//! The scheduling policy of one group, as a synchronous state machine: no RPCs, no channels
//! to wait on, no clock of its own. [`crate::group`] performs what it plans.
//!
//! Each iteration [`Scheduler::plan`] admits waiting sequences (up to `max_batch`, and only
//! while the KV blocks they need fit the group's budget), drops the ones whose client went
//! away or whose deadline passed, makes room for every running sequence's next token, and
//! builds one step for all ranks. The shell releases what the plan frees, sends the step, and
//! hands the sampled tokens to [`Scheduler::on_step_result`], which streams them to each
//! sequence's output and says which sequences ended.
//!
//! KV memory is counted in blocks of [`KV_BLOCK_TOKENS`] tokens, the unit the workers allocate
//! in, so the scheduler knows what the workers hold without asking. A sequence is admitted
//! when the blocks of its prompt fit, not its worst case, so memory is shared by what sequences
//! actually use. When decoding sequences grow past the budget, the most recently admitted one
//! is preempted (vLLM's recompute policy): its blocks are released on every rank, and it waits
//! at the head of the queue to be prefilled again — prompt plus the tokens it had generated —
//! with a sampler resumed where it stopped ([`wpb::Resume`]), so its output is what it would
//! have been. Beam searches hold their worst case from admission and are never preempted.
//!
//! A step carries one token for every decoding sequence plus prompt chunks from the rest of a
//! token budget (chunked prefill, see [`Scheduler::schedule`]), so prefills and decodes of
//! different sequences share steps: continuous batching.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;
use tessera_proto::worker as wpb;
use tessera_proto::{kv_blocks, KV_BLOCK_TOKENS};
use tonic::Status;

use crate::beam::{Advance, BeamConfig, BeamSearch, Candidates, Fork};
use crate::metrics::Metrics;
use crate::output::{Accepted, SequenceOutput};

#[cfg(test)]
mod tests;

/// Settings of a group's loop.
#[derive(Debug, Clone, Copy)]
pub struct LoopConfig {
    /// Sequences running at once in one group.
    pub max_batch: usize,
    /// Tokens one step may carry. Decode tokens come first; prompts are prefilled in chunks
    /// from what is left, so a long prompt never stalls running streams for its whole prefill.
    pub step_tokens: usize,
    /// Longest a step may take before the group is declared lost. A worker that hangs without
    /// dying keeps its registration alive (and under `tessera up` its lease is renewed for
    /// it), so this is what frees its clients.
    pub step_timeout: Duration,
    /// Static batching, a baseline for benchmarks: new sequences are admitted only while the
    /// group runs none, so each batch runs to completion before the next one forms.
    pub static_batching: bool,
}

/// Prompt tokens a step carries even when decodes fill its budget, so prefills always move.
const MIN_PREFILL_CHUNK: usize = 16;

/// A request handed to a group.
pub(crate) struct NewSequence {
    pub seq: u64,
    pub prompt: Vec<u32>,
    /// KV tokens the sequence may grow to (prompt + `max_new_tokens`, times the beams): what
    /// placement checked fits the group, and what a beam search holds from admission.
    pub reserve: u64,
    /// When the client's deadline passes: the request then ends with `DEADLINE_EXCEEDED`.
    pub deadline: Option<Instant>,
    pub output: SequenceOutput,
    /// Beam search: the request holds worker sequences `seq .. seq + num_beams`.
    pub beam: Option<BeamConfig>,
    /// Set for a sampled sequence that ran on a group now lost: what it had generated, to be
    /// prefilled again with the prompt and continued exactly.
    pub resume: Option<Resumed>,
    /// The request opted out of the workers' prefix cache.
    pub no_prefix_cache: bool,
    /// The LoRA adapter the sequence runs with, named on its first step on each group.
    pub adapter: Option<wpb::AdapterRef>,
}

/// A sampled sequence's progress, carried to another group when its own is lost.
pub(crate) struct Resumed {
    /// Tokens generated (and streamed) so far.
    pub outputs: Vec<u32>,
    /// The sampling the workers last used, without `resume`.
    pub in_force: wpb::Sampling,
    /// The next step's sampling when it differs from `in_force` (a loop-guard change not yet
    /// sent).
    pub next: Option<wpb::Sampling>,
    /// Random numbers the workers' sampler had drawn.
    pub rng_draws: u64,
}

impl Resumed {
    /// A request that has generated nothing yet, with its first sampling.
    pub(crate) fn start(base: &wpb::Sampling) -> Self {
        Self { outputs: Vec::new(), in_force: base.clone(), next: None, rng_draws: 0 }
    }
}

/// How a request left the group.
#[derive(Debug)]
pub(crate) enum End {
    Finished(pb::Finished),
    Failed(Status),
    /// The client went away: nobody to tell.
    Cancelled,
}

/// A request that left the group, to be told once its sequences are released.
pub(crate) struct Ending {
    pub output: SequenceOutput,
    pub end: End,
}

impl Ending {
    /// Sends the request's last event.
    pub(crate) fn send(self, metrics: &Metrics) {
        match self.end {
            End::Finished(finished) => self.output.end(Ok(finished), metrics),
            End::Failed(status) => self.output.end(Err(status), metrics),
            End::Cancelled => {}
        }
    }
}

/// What the shell must do besides stepping: free worker sequences on every rank, then tell
/// the requests that ended (a client that sees its end sees a cluster that no longer holds it).
#[derive(Default)]
pub(crate) struct Effects {
    pub release: Vec<u64>,
    pub ended: Vec<Ending>,
}

impl Effects {
    pub(crate) fn is_empty(&self) -> bool {
        self.release.is_empty() && self.ended.is_empty()
    }
}

/// One step for every rank.
#[derive(Debug)]
pub(crate) struct Step {
    pub id: u64,
    pub seqs: Vec<wpb::SeqStep>,
    pub forks: Vec<wpb::Fork>,
}

/// What one iteration does: its effects first, then the step, if any sequence runs.
pub(crate) struct Plan {
    pub effects: Effects,
    pub step: Option<Step>,
}

/// Tokens fed to the workers for one sequence.
struct Feed {
    /// Tokens not yet sent: what is left of the prompt, then the last sampled token.
    pending: Vec<u32>,
    /// Tokens to prefill before the first sample: the prompt, or after a preemption the prompt
    /// and the outputs.
    prefill_len: u32,
    /// Tokens already in the workers' KV cache.
    cached: u32,
    /// The last step sent this sequence's final pending token, so a sampled token is due.
    awaiting: bool,
}

/// How a sequence decodes.
enum Mode {
    Sampled(Sampled),
    Beam(BeamRun),
}

/// A sampled sequence: one worker sequence, preemptable.
struct Sampled {
    /// The request's prompt, kept to recompute the sequence after a preemption.
    prompt: Vec<u32>,
    /// Tokens generated so far, fed again (after the prompt) when recomputing.
    outputs: Vec<u32>,
    /// The sampling the workers last received, to resume with after a preemption.
    in_force: wpb::Sampling,
    /// Random numbers the workers' sampler had drawn after the last token.
    rng_draws: u64,
}

/// A beam search's worker sequences: lane `i` is sequence `first + i`; lane 0 takes the prompt.
struct BeamRun {
    /// The request's settings and prompt, to start the search again on another group.
    config: BeamConfig,
    prompt: Vec<u32>,
    search: BeamSearch,
    first: u64,
    /// Lanes that hold a sequence on the workers, to release at the end.
    used: Vec<bool>,
    /// KV blocks held from admission to the end.
    blocks: u64,
    /// What the next step does: copies between lanes, then one token per live lane.
    forks: Vec<Fork>,
    feed: Vec<(usize, u32)>,
    /// Lanes the last step asked for candidates, and what came back.
    asked: usize,
    candidates: Vec<Candidates>,
}

struct Running {
    seq: u64,
    /// KV tokens placement reserved for the request, for placing it again.
    reserve: u64,
    feed: Feed,
    /// Sent with the next step: the request's sampling on the first, a change after that.
    next_sampling: Option<wpb::Sampling>,
    deadline: Option<Instant>,
    output: SequenceOutput,
    mode: Mode,
    no_prefix_cache: bool,
    adapter: Option<wpb::AdapterRef>,
}

impl Running {
    fn new(s: NewSequence) -> Self {
        let mut output = s.output;
        let mut pending = s.prompt.clone();
        // The first step carries the request's sampling, or for a resumed sequence the one it
        // had, with its sampler's place in the random stream.
        let mut resumed_sampling = None;
        let mode = match (s.beam, s.resume) {
            (Some(config), _) => {
                let max_new = output.generation().max_new_tokens() as usize;
                let search = BeamSearch::new(config, max_new, output.generation().end_tokens());
                output.set_beam_candidates(search.candidates_per_lane() as u32);
                let lanes = config.num_beams;
                let mut used = vec![false; lanes];
                used[0] = true;
                let blocks = lanes as u64 * kv_blocks(s.reserve / lanes as u64);
                let (forks, feed, candidates) = (Vec::new(), Vec::new(), Vec::new());
                Mode::Beam(BeamRun { config, prompt: s.prompt, search, first: s.seq, used, blocks, forks, feed, asked: 1, candidates })
            }
            (None, None) => {
                Mode::Sampled(Sampled { prompt: s.prompt, outputs: Vec::new(), in_force: output.base_sampling().clone(), rng_draws: 0 })
            }
            // Prefilled again, prompt and outputs, with the sampler resumed where it stood: as
            // after a preemption.
            (None, Some(r)) => {
                pending.extend_from_slice(&r.outputs);
                let mut sampling = r.next.unwrap_or_else(|| r.in_force.clone());
                sampling.resume = Some(wpb::Resume { prompt_len: s.prompt.len() as u32, rng_draws: r.rng_draws });
                resumed_sampling = Some(sampling);
                Mode::Sampled(Sampled { prompt: s.prompt, outputs: r.outputs, in_force: r.in_force, rng_draws: r.rng_draws })
            }
        };
        let next_sampling = Some(resumed_sampling.unwrap_or_else(|| output.base_sampling().clone()));
        let feed = Feed { prefill_len: pending.len() as u32, pending, cached: 0, awaiting: false };
        let (no_prefix_cache, adapter) = (s.no_prefix_cache, s.adapter);
        Self { seq: s.seq, reserve: s.reserve, feed, next_sampling, deadline: s.deadline, output, mode, no_prefix_cache, adapter }
    }

    /// The request as it would arrive anew, to go on on another group: a sampled sequence with
    /// what it generated and where its sampler stood, a beam search from its start (it streams
    /// nothing until it ends, so nothing is lost).
    fn into_new_sequence(self) -> NewSequence {
        let (prompt, beam, resume) = match self.mode {
            Mode::Beam(b) => (b.prompt, Some(b.config), None),
            Mode::Sampled(s) => {
                let next = self.next_sampling.map(|n| wpb::Sampling { resume: None, ..n });
                let resume = Resumed { outputs: s.outputs, in_force: s.in_force, next, rng_draws: s.rng_draws };
                (s.prompt, None, Some(resume))
            }
        };
        let (no_prefix_cache, adapter) = (self.no_prefix_cache, self.adapter);
        NewSequence {
            seq: self.seq,
            prompt,
            reserve: self.reserve,
            deadline: self.deadline,
            output: self.output,
            beam,
            resume,
            no_prefix_cache,
            adapter,
        }
    }

    /// Worker sequences this request holds, once it has been stepped.
    fn worker_seqs(&self) -> Vec<u64> {
        if self.feed.cached == 0 {
            return Vec::new();
        }
        match &self.mode {
            Mode::Sampled(_) => vec![self.seq],
            Mode::Beam(b) => (0..b.used.len()).filter(|&i| b.used[i]).map(|i| b.first + i as u64).collect(),
        }
    }

    /// Whether a token the workers sampled for sequence `id` belongs to this request's last step.
    fn expects(&self, id: u64) -> bool {
        match &self.mode {
            _ if !self.feed.awaiting => false,
            Mode::Sampled(_) => id == self.seq,
            Mode::Beam(b) => id >= b.first && id < b.first + b.used.len() as u64,
        }
    }

    /// Tokens the last step owes this sequence.
    fn due(&self) -> usize {
        match &self.mode {
            _ if !self.feed.awaiting => 0,
            Mode::Sampled(_) => 1,
            Mode::Beam(b) => b.asked,
        }
    }

    fn prefilling(&self) -> bool {
        self.feed.cached < self.feed.prefill_len
    }

    fn preemptable(&self) -> bool {
        matches!(self.mode, Mode::Sampled(_))
    }

    /// KV blocks this sequence needs on every rank for its next step to run: all it has cached
    /// plus all it still has to feed (a whole prompt, however it is chunked).
    fn claim(&self) -> u64 {
        match &self.mode {
            Mode::Beam(b) => b.blocks,
            Mode::Sampled(_) => kv_blocks(u64::from(self.feed.cached) + self.feed.pending.len() as u64),
        }
    }

    /// Forgets what the workers held for this sequence so that it can be prefilled again: the
    /// prompt and every token generated so far, with a sampler that resumes where it was.
    fn preempt(&mut self) {
        let Mode::Sampled(s) = &mut self.mode else { return };
        let mut sampling = self.next_sampling.take().unwrap_or_else(|| s.in_force.clone());
        sampling.resume = Some(wpb::Resume { prompt_len: s.prompt.len() as u32, rng_draws: s.rng_draws });
        let feed = &mut self.feed;
        feed.pending.clear();
        feed.pending.extend_from_slice(&s.prompt);
        feed.pending.extend_from_slice(&s.outputs);
        feed.prefill_len = feed.pending.len() as u32;
        feed.cached = 0;
        feed.awaiting = false;
        self.next_sampling = Some(sampling);
    }

    /// Up to `budget` pending tokens as this sequence's part of the next step. A token is
    /// sampled only after the last of them: inner chunks of a prompt just fill the cache.
    fn take_step(&mut self, budget: usize) -> wpb::SeqStep {
        let feed = &mut self.feed;
        let n = feed.pending.len().min(budget);
        let tokens: Vec<u32> = feed.pending.drain(..n).collect();
        let start = feed.cached;
        feed.cached += n as u32;
        feed.awaiting = feed.pending.is_empty();
        let sampling = self.next_sampling.take();
        if let (Some(s), Mode::Sampled(m)) = (&sampling, &mut self.mode) {
            m.in_force = wpb::Sampling { resume: None, ..s.clone() };
        }
        // The workers read the adapter when a sequence starts (again, after a preemption).
        let adapter = if start == 0 { self.adapter.clone() } else { None };
        wpb::SeqStep { seq_id: self.seq, start, tokens, sampling, sample: feed.awaiting, no_prefix_cache: self.no_prefix_cache, adapter }
    }

    /// One decode step of every live beam, after its forks.
    fn take_beam_step(&mut self, forks: &mut Vec<wpb::Fork>) -> Vec<wpb::SeqStep> {
        let start = self.feed.cached;
        let Mode::Beam(b) = &mut self.mode else { return Vec::new() };
        for f in b.forks.drain(..) {
            b.used[f.to] = true;
            forks.push(wpb::Fork { from: b.first + f.from as u64, to: b.first + f.to as u64 });
        }
        let steps = b
            .feed
            .drain(..)
            .map(|(lane, token)| wpb::SeqStep {
                seq_id: b.first + lane as u64,
                start,
                tokens: vec![token],
                sampling: None,
                sample: true,
                no_prefix_cache: false,
                adapter: None,
            })
            .collect::<Vec<_>>();
        b.asked = steps.len();
        self.feed.cached += 1;
        self.feed.awaiting = true;
        steps
    }

    /// Takes the token sampled for a sampled sequence, or a candidate list for a beam search;
    /// returns how the request ended, if it did.
    fn take_token(&mut self, t: wpb::SampledToken, metrics: &Metrics, now: Instant) -> Option<End> {
        let s = match &mut self.mode {
            Mode::Beam(b) => {
                let top = t.top.iter().map(|c| (c.token, c.logprob)).collect();
                b.candidates.push(Candidates { lane: (t.seq_id - b.first) as usize, top });
                return None;
            }
            Mode::Sampled(s) => s,
        };
        self.feed.awaiting = false;
        s.rng_draws = t.rng_draws;
        match self.output.accept(t.token, t.logprob, &t.top, metrics, now) {
            Ok(Accepted { finished: Some(finished), .. }) => Some(End::Finished(finished)),
            Ok(Accepted { finished: None, sampling }) => {
                if sampling.is_some() {
                    self.next_sampling = sampling;
                }
                self.feed.pending.push(t.token);
                s.outputs.push(t.token);
                None
            }
            Err(status) => Some(End::Failed(status)),
        }
    }

    /// Moves a beam search on with the candidates its step returned; returns how it ended, if
    /// it did.
    fn advance_beams(&mut self) -> Result<Option<End>, String> {
        let Mode::Beam(b) = &mut self.mode else { return Ok(None) };
        self.feed.awaiting = false;
        let candidates = std::mem::take(&mut b.candidates);
        if candidates.len() != b.asked {
            return Err(format!("rank 0 returned {} beam candidates where {} were due", candidates.len(), b.asked));
        }
        Ok(match b.search.advance(&candidates) {
            Advance::Continue { forks, feed } => {
                b.forks = forks;
                b.feed = feed;
                None
            }
            Advance::Done(best) => Some(match self.output.accept_hypotheses(&best) {
                Ok(finished) => End::Finished(finished),
                Err(status) => End::Failed(status),
            }),
        })
    }
}

/// One group's sequences and the policy that steps them.
pub(crate) struct Scheduler {
    /// The group's name, for logs.
    name: String,
    config: LoopConfig,
    /// KV blocks the smallest rank can hold: the group's budget.
    budget: u64,
    metrics: Arc<Metrics>,
    /// In admission order: the last is the first to be preempted.
    running: Vec<Running>,
    /// Preempted sequences waiting to be recomputed, first in line.
    preempted: VecDeque<Running>,
    /// The oldest queued request when it did not fit the KV budget yet; next in line after
    /// the preempted ones.
    waiting: Option<NewSequence>,
    steps: u64,
}

impl Scheduler {
    /// A scheduler for a group whose smallest rank holds `kv_capacity` tokens.
    pub(crate) fn new(name: String, config: LoopConfig, kv_capacity: u64, metrics: Arc<Metrics>) -> Self {
        Self {
            name,
            config,
            budget: kv_capacity / KV_BLOCK_TOKENS,
            metrics,
            running: Vec::new(),
            preempted: VecDeque::new(),
            waiting: None,
            steps: 0,
        }
    }

    /// Holds no sequence: the shell may wait for the next request.
    pub(crate) fn is_idle(&self) -> bool {
        self.running.is_empty() && self.preempted.is_empty() && self.waiting.is_none()
    }

    /// Takes a request that arrived while idle.
    pub(crate) fn offer(&mut self, s: NewSequence) {
        debug_assert!(self.waiting.is_none(), "offer is for an idle scheduler");
        self.waiting = Some(s);
    }

    /// The next iteration at `now`. `inbox` yields queued requests, taken only while they can
    /// be admitted, so the queue's bound stays where requests are submitted.
    pub(crate) fn plan(&mut self, now: Instant, inbox: &mut impl FnMut() -> Option<NewSequence>) -> Plan {
        self.admit(inbox);
        let mut effects = Effects::default();
        self.drop_cancelled(&mut effects);
        self.drop_expired(now, &mut effects);
        self.make_room(&mut effects);
        let step = (!self.running.is_empty()).then(|| self.schedule());
        Plan { effects, step }
    }

    /// Takes rank 0's tokens for the last step: streams them, and returns the sequences that
    /// ended. An error means the ranks' answer does not fit the step: the group cannot be
    /// trusted.
    pub(crate) fn on_step_result(&mut self, sampled: Vec<wpb::SampledToken>, now: Instant) -> Result<Effects, String> {
        let due: usize = self.running.iter().map(Running::due).sum();
        if sampled.len() != due {
            return Err(format!("rank 0 returned {} tokens where {due} were due", sampled.len()));
        }
        let mut ended: Vec<(u64, End)> = Vec::new();
        for t in sampled {
            let id = t.seq_id;
            let Some(r) = self.running.iter_mut().find(|r| r.expects(id)) else {
                return Err(format!("rank 0 answered for sequence {id}, which expected no token"));
            };
            if let Some(end) = r.take_token(t, &self.metrics, now) {
                ended.push((r.seq, end));
            }
        }
        for r in self.running.iter_mut().filter(|r| r.feed.awaiting) {
            if let Some(end) = r.advance_beams()? {
                ended.push((r.seq, end));
            }
        }
        let mut effects = Effects::default();
        for (seq, end) in ended {
            if let Some(i) = self.running.iter().position(|r| r.seq == seq) {
                let r = self.running.remove(i);
                effects.release.extend(r.worker_seqs());
                effects.ended.push(Ending { output: r.output, end });
            }
        }
        Ok(effects)
    }

    /// Every request still held, for a group that stops, in the form to place it again:
    /// running and preempted sequences with what they generated, and the waiting one.
    pub(crate) fn evacuate(&mut self) -> Vec<NewSequence> {
        let held = self.running.drain(..).chain(self.preempted.drain(..)).map(Running::into_new_sequence);
        held.chain(self.waiting.take()).collect()
    }

    /// Admits queued sequences in order — preempted ones first, as they were admitted before —
    /// while the blocks they need fit next to what the running ones need. Placement refuses
    /// sequences larger than the budget, so an idle group always admits its first one.
    fn admit(&mut self, inbox: &mut impl FnMut() -> Option<NewSequence>) {
        if self.config.static_batching && !self.running.is_empty() {
            return;
        }
        let mut claimed: u64 = self.running.iter().map(Running::claim).sum();
        while self.running.len() < self.config.max_batch {
            let next = match self.preempted.pop_front() {
                Some(r) => r,
                None => match self.waiting.take().or_else(&mut *inbox) {
                    Some(s) => Running::new(s),
                    None => break,
                },
            };
            let claim = next.claim();
            if claimed + claim > self.budget && !self.running.is_empty() {
                self.preempted.push_front(next);
                break;
            }
            claimed += claim;
            self.running.push(next);
        }
    }

    /// Removes sequences whose client has gone (cancelled or disconnected); what they held is
    /// released on every rank.
    fn drop_cancelled(&mut self, effects: &mut Effects) {
        let before = effects.ended.len();
        for r in self.running.extract_if(.., |r| r.output.is_closed()) {
            effects.release.extend(r.worker_seqs());
            effects.ended.push(Ending { output: r.output, end: End::Cancelled });
        }
        // Preempted sequences hold nothing on the workers.
        for r in take_where(&mut self.preempted, |r| r.output.is_closed()) {
            effects.ended.push(Ending { output: r.output, end: End::Cancelled });
        }
        let gone = effects.ended.len() - before;
        if gone > 0 {
            self.metrics.cancelled(gone);
            tracing::info!(group = %self.name, sequences = gone, "client went away; releasing");
        }
    }

    /// Ends every sequence whose deadline has passed with `DEADLINE_EXCEEDED`, wherever it is,
    /// and frees what it held on every rank.
    fn drop_expired(&mut self, now: Instant, effects: &mut Effects) {
        let expired = |d: Option<Instant>| crate::deadline::passed(d, now);
        let before = effects.ended.len();
        let running = self.running.extract_if(.., |r| expired(r.deadline));
        let preempted = take_where(&mut self.preempted, |r| expired(r.deadline));
        for r in running.chain(preempted) {
            effects.release.extend(r.worker_seqs());
            let end = End::Failed(crate::deadline::exceeded(r.output.generated()));
            effects.ended.push(Ending { output: r.output, end });
        }
        if let Some(s) = self.waiting.take_if(|s| expired(s.deadline)) {
            effects.ended.push(Ending { output: s.output, end: End::Failed(crate::deadline::exceeded(0)) });
        }
        let n = effects.ended.len() - before;
        if n > 0 {
            self.metrics.deadlines_exceeded(n);
        }
    }

    /// Preempts the most recently admitted sequences until every running sequence's next step
    /// fits the group's KV blocks. Beam searches, which hold their worst case from admission,
    /// are never preempted; the oldest other sequence only when beams alone are left beside it
    /// (it then waits for them to finish). So the group always makes progress.
    fn make_room(&mut self, effects: &mut Effects) {
        let mut claimed: u64 = self.running.iter().map(Running::claim).sum();
        while claimed > self.budget && self.running.len() > 1 {
            let Some(victim) = self.running.iter().rposition(Running::preemptable) else { break };
            let mut r = self.running.remove(victim);
            claimed -= r.claim();
            effects.release.extend(r.worker_seqs());
            tracing::debug!(group = %self.name, seq = r.seq, cached = r.feed.cached, generated = r.output.generated(), "preempted");
            r.preempt();
            self.preempted.push_front(r);
            self.metrics.preempted();
        }
    }

    /// What the next step carries: one token for every decoding sequence, then prompt chunks
    /// from the budget that is left. The oldest prompt is guaranteed a quarter of that budget
    /// (so it finishes however many others arrive); the rest goes to the prompts closest to
    /// done first, so a short request is not queued behind a long prefill. A chunk that does
    /// not finish its prompt ends on a KV block boundary ([`block_aligned`]).
    fn schedule(&mut self) -> Step {
        let running = &mut self.running;
        let mut seqs = Vec::with_capacity(running.len());
        let mut forks = Vec::new();
        for r in running.iter_mut().filter(|r| !r.prefilling()) {
            match r.mode {
                Mode::Beam(_) => seqs.extend(r.take_beam_step(&mut forks)),
                Mode::Sampled(_) => seqs.push(r.take_step(1)),
            }
        }
        let mut budget = self.config.step_tokens.saturating_sub(seqs.len()).max(MIN_PREFILL_CHUNK);
        let prefills: Vec<usize> = (0..running.len()).filter(|&i| running[i].prefilling()).collect();
        let mut grant = vec![0usize; running.len()];
        let aligned = |r: &Running, grant: usize| block_aligned(r.feed.cached as usize, r.feed.pending.len(), grant);
        if let Some(&oldest) = prefills.first() {
            let want = running[oldest].feed.pending.len().min((budget / 4).max(MIN_PREFILL_CHUNK)).min(budget);
            grant[oldest] = aligned(&running[oldest], want);
            budget -= grant[oldest];
        }
        let mut by_need = prefills.clone();
        by_need.sort_by_key(|&i| running[i].feed.pending.len());
        for i in by_need {
            let want = grant[i] + (running[i].feed.pending.len() - grant[i]).min(budget);
            let total = aligned(&running[i], want).max(grant[i]);
            budget -= total - grant[i];
            grant[i] = total;
        }
        for i in prefills {
            if grant[i] > 0 {
                seqs.push(running[i].take_step(grant[i]));
            }
        }
        self.steps += 1;
        Step { id: self.steps, seqs, forks }
    }
}

/// A prompt chunk of `grant` tokens from position `start`, `pending` tokens left: shortened to
/// end on a KV block boundary unless it finishes the prompt, or no boundary lies within it.
/// Chunks then cut a prompt where the prefix cache does (whole blocks), so a prompt prefilled
/// in chunks is split as one that found its first blocks cached, and float GEMMs, whose sums
/// depend on the rows they are given, see the same block-aligned pieces either way.
fn block_aligned(start: usize, pending: usize, grant: usize) -> usize {
    if grant >= pending {
        return grant;
    }
    let block = KV_BLOCK_TOKENS as usize;
    let end = (start + grant) / block * block;
    if end > start {
        end - start
    } else {
        grant
    }
}

/// Removes and returns the queued sequences that match, keeping the others in order.
fn take_where(queue: &mut VecDeque<Running>, matches: impl Fn(&Running) -> bool) -> Vec<Running> {
    // Checked every iteration: rebuild the queue only when something leaves it.
    if !queue.iter().any(&matches) {
        return Vec::new();
    }
    let (taken, kept): (Vec<Running>, Vec<Running>) = queue.drain(..).partition(|r| matches(r));
    *queue = kept.into();
    taken
}
