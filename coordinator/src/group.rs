//! A tensor-parallel group of workers and its iteration loop.
//!
//! The loop owns the group's running sequences. Each iteration it admits waiting sequences (up
//! to `max_batch`, and only while the KV blocks they need fit the group's budget), drops the
//! ones whose client went away or whose deadline passed (releasing them on every rank), makes
//! room for every running sequence's next token, sends one `Step` to all ranks at once, and
//! hands the sampled tokens to each sequence's [`Generation`].
//!
//! KV memory is counted in blocks of [`KV_BLOCK_TOKENS`] tokens, the unit the workers allocate
//! in, so the loop knows what the workers hold without asking. A sequence is admitted when the
//! blocks of its prompt fit, not its worst case, so memory is shared by what sequences actually
//! use. When decoding sequences grow past the budget, the most recently admitted one is
//! preempted (vLLM's recompute policy): its blocks are released on every rank, and it waits at
//! the head of the queue to be prefilled again — prompt plus the tokens it had generated —
//! with a sampler resumed where it stopped ([`wpb::Resume`]), so its output is what it would
//! have been. Beam searches hold their worst case from admission and are never preempted. A step carries one token for
//! every decoding sequence plus prompt chunks from the rest of a token budget (chunked prefill:
//! see [`GroupLoop::schedule`]), so prefills and decodes of different sequences share steps —
//! continuous batching.
//!
//! Every rank samples the same token (identical logits, identical seeded samplers), so rank 0's
//! answer is used and the others are checked against it: a mismatch means the group's replicated
//! state has diverged and it is torn down rather than trusted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::future::join_all;
use tessera_proto::v1 as pb;
use tessera_proto::worker as wpb;
use tessera_proto::worker::worker_client::WorkerClient;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;
use tonic::Status;

use std::collections::VecDeque;
use std::time::Instant;

use tessera_proto::{kv_blocks, KV_BLOCK_TOKENS};

use crate::beam::{Advance, BeamConfig, BeamSearch, Candidates, Fork};
use crate::generation::{Generation, Resample};
use crate::metrics::Metrics;

/// Stream of events for one client.
pub(crate) type Events = mpsc::UnboundedSender<Result<pb::GenerateResponse, Status>>;

/// One rank of a group.
#[derive(Clone)]
pub(crate) struct Member {
    pub id: String,
    pub client: WorkerClient<Channel>,
}

/// A request handed to a group.
pub(crate) struct NewSequence {
    pub seq: u64,
    pub prompt: Vec<u32>,
    /// KV tokens the sequence may grow to (prompt + `max_new_tokens`, times the beams): what
    /// placement checked fits the group, and what a beam search holds from admission.
    pub reserve: u64,
    /// When the client's deadline passes: the request then ends with `DEADLINE_EXCEEDED`.
    pub deadline: Option<Instant>,
    pub sampling: wpb::Sampling,
    pub generation: Generation,
    /// Beam search: the request holds worker sequences `seq .. seq + num_beams`.
    pub beam: Option<BeamConfig>,
    /// Unbounded because the loop must never wait on a slow client; what it can hold is bounded
    /// by `max_new_tokens`, which is capped.
    pub events: Events,
}

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
    pub step_timeout: std::time::Duration,
    /// Static batching, a baseline for benchmarks: new sequences are admitted only while the
    /// group runs none, so each batch runs to completion before the next one forms.
    pub static_batching: bool,
}

/// Prompt tokens a step carries even when decodes fill its budget, so prefills always move.
const MIN_PREFILL_CHUNK: usize = 16;

/// Everything the loop needs; built by the cluster once the group is loaded.
pub(crate) struct GroupLoop {
    pub name: String,
    pub members: Vec<Member>,
    pub requests: mpsc::Receiver<NewSequence>,
    /// Set to `Some(reason)` by the cluster when a member leaves.
    pub lost: watch::Receiver<Option<String>>,
    pub active: Arc<AtomicUsize>,
    pub config: LoopConfig,
    /// KV tokens the smallest member can hold: the group's budget (a whole number of blocks).
    pub kv_capacity: u64,
    pub metrics: Arc<Metrics>,
    /// Woken whenever this group finishes a request, for rings waiting for groups to drain.
    pub idle: Arc<tokio::sync::Notify>,
}

/// The sequences a group's loop holds.
#[derive(Default)]
struct Sequences {
    /// In admission order: the last is the first to be preempted.
    running: Vec<Running>,
    /// Preempted sequences waiting to be recomputed, first in line.
    preempted: VecDeque<Running>,
    /// The oldest queued request when it did not fit the KV budget yet; next in line after
    /// the preempted ones.
    waiting: Option<NewSequence>,
}

struct Running {
    seq: u64,
    /// Blocks a beam search holds from admission to the end (0 for other sequences).
    beam_blocks: u64,
    /// The request's prompt, kept to recompute the sequence after a preemption.
    prompt: Vec<u32>,
    /// Tokens generated so far, fed again (after the prompt) when recomputing.
    outputs: Vec<u32>,
    /// Tokens to prefill before the first sample: the prompt, or after a preemption the prompt
    /// and the outputs.
    prefill_len: u32,
    /// Tokens not yet sent: what is left of the prompt, then the last sampled token.
    pending: Vec<u32>,
    /// The last step sent this sequence's final pending token, so a sampled token is due.
    awaiting: bool,
    /// Tokens already in the workers' KV cache.
    cached: u32,
    /// Sent with the next step: the request's sampling on the first, a change after that.
    sampling: Option<wpb::Sampling>,
    /// The request's own sampling, to return to after a loop-guard remedy.
    base: wpb::Sampling,
    /// The sampling the workers last received, to resume with after a preemption.
    in_force: wpb::Sampling,
    /// Random numbers the workers' sampler had drawn after the last token.
    rng_draws: u64,
    deadline: Option<Instant>,
    generation: Generation,
    events: Events,
    /// Set for a beam search, which runs one worker sequence per beam once its prompt is in.
    beam: Option<BeamRun>,
    /// When the last sampled token arrived, for the inter-token-latency metric.
    last_token: Option<std::time::Instant>,
}

/// A beam search's worker sequences: slot `i` is sequence `first + i`; slot 0 takes the prompt.
struct BeamRun {
    search: BeamSearch,
    first: u64,
    /// Slots that hold a sequence on the workers, to release at the end.
    used: Vec<bool>,
    /// What the next step does: copies between slots, then one token per live slot.
    forks: Vec<Fork>,
    feed: Vec<(usize, u32)>,
    /// Slots the last step asked for candidates, and what came back.
    asked: usize,
    candidates: Vec<Candidates>,
}

impl Running {
    fn new(s: NewSequence) -> Self {
        let max_new = s.generation.max_new_tokens() as usize;
        let mut sampling = s.sampling;
        let beam = s.beam.map(|config| {
            let search = BeamSearch::new(config, max_new, s.generation.end_tokens());
            sampling.beam_candidates = search.candidates_per_slot() as u32;
            let mut used = vec![false; config.num_beams];
            used[0] = true;
            BeamRun { search, first: s.seq, used, forks: Vec::new(), feed: Vec::new(), asked: 1, candidates: Vec::new() }
        });
        let beam_blocks = match &beam {
            Some(b) => b.used.len() as u64 * kv_blocks(s.reserve / b.used.len() as u64),
            None => 0,
        };
        Self {
            seq: s.seq,
            beam_blocks,
            prompt: s.prompt.clone(),
            outputs: Vec::new(),
            prefill_len: s.prompt.len() as u32,
            pending: s.prompt,
            awaiting: false,
            cached: 0,
            base: sampling.clone(),
            in_force: sampling.clone(),
            rng_draws: 0,
            deadline: s.deadline,
            sampling: Some(sampling),
            generation: s.generation,
            events: s.events,
            beam,
            last_token: None,
        }
    }

    /// Worker sequences this request holds (once it has been stepped).
    fn worker_seqs(&self) -> Vec<u64> {
        match &self.beam {
            None => vec![self.seq],
            Some(b) => (0..b.used.len()).filter(|&i| b.used[i]).map(|i| b.first + i as u64).collect(),
        }
    }

    /// Whether a token the workers sampled for sequence `id` belongs to this request's last step.
    fn expects(&self, id: u64) -> bool {
        match &self.beam {
            _ if !self.awaiting => false,
            None => id == self.seq,
            Some(b) => id >= b.first && id < b.first + b.used.len() as u64,
        }
    }

    /// One decode step of every live beam, after its forks.
    fn take_beam_step(&mut self, forks: &mut Vec<wpb::Fork>) -> Vec<wpb::SeqStep> {
        let start = self.cached;
        let Some(b) = self.beam.as_mut() else { return Vec::new() };
        for f in b.forks.drain(..) {
            b.used[f.to] = true;
            forks.push(wpb::Fork { from: b.first + f.from as u64, to: b.first + f.to as u64 });
        }
        let steps = b
            .feed
            .drain(..)
            .map(|(slot, token)| wpb::SeqStep { seq_id: b.first + slot as u64, start, tokens: vec![token], sampling: None, sample: true })
            .collect::<Vec<_>>();
        b.asked = steps.len();
        self.cached += 1;
        self.awaiting = true;
        steps
    }

    fn prefilling(&self) -> bool {
        self.cached < self.prefill_len
    }

    /// KV blocks this sequence needs on every rank for its next step to run: all it has cached
    /// plus all it still has to feed (a whole prompt, however it is chunked).
    fn claim(&self) -> u64 {
        if self.beam.is_some() {
            return self.beam_blocks;
        }
        kv_blocks(u64::from(self.cached) + self.pending.len() as u64)
    }

    /// Forgets what the workers held for this sequence so that it can be prefilled again: the
    /// prompt and every token generated so far, with a sampler that resumes where it was.
    fn preempt(&mut self) {
        let mut sampling = self.sampling.take().unwrap_or_else(|| self.in_force.clone());
        sampling.resume = Some(wpb::Resume { prompt_len: self.prompt.len() as u32, rng_draws: self.rng_draws });
        self.pending.clear();
        self.pending.extend_from_slice(&self.prompt);
        self.pending.extend_from_slice(&self.outputs);
        self.prefill_len = self.pending.len() as u32;
        self.cached = 0;
        self.awaiting = false;
        self.sampling = Some(sampling);
    }

    /// Up to `budget` pending tokens as this sequence's part of the next step. A token is
    /// sampled only after the last of them: inner chunks of a prompt just fill the cache.
    fn take_step(&mut self, budget: usize) -> wpb::SeqStep {
        let n = self.pending.len().min(budget);
        let tokens: Vec<u32> = self.pending.drain(..n).collect();
        let start = self.cached;
        self.cached += n as u32;
        self.awaiting = self.pending.is_empty();
        let sampling = self.sampling.take();
        if let Some(s) = &sampling {
            self.in_force = wpb::Sampling { resume: None, ..s.clone() };
        }
        wpb::SeqStep { seq_id: self.seq, start, tokens, sampling, sample: self.awaiting }
    }

    fn send(&self, event: pb::generate_response::Event) {
        // A closed stream is noticed before the next step; nothing to do here.
        let _ = self.events.send(Ok(pb::GenerateResponse { event: Some(event) }));
    }
}

impl GroupLoop {
    /// Runs until the group is lost or the cluster drops it; returns why it stopped. Every
    /// sequence it still holds — running, waiting or queued — then gets `UNAVAILABLE`, so no
    /// client is left with a stream that ends without a reason.
    pub(crate) async fn run(mut self) -> String {
        let mut seqs = Sequences::default();
        let reason = self.iterate(&mut seqs).await;
        let status = Status::unavailable(format!("worker group {} was lost mid-request: {reason}; retry", self.name));
        self.requests.close();
        let queued = std::iter::from_fn(|| self.requests.try_recv().ok());
        let held: Vec<Events> = seqs
            .running
            .drain(..)
            .chain(seqs.preempted.drain(..))
            .map(|r| r.events)
            .chain(seqs.waiting.take().into_iter().chain(queued).map(|s| s.events))
            .collect();
        self.metrics.lost(held.len());
        for events in held {
            let _ = events.send(Err(status.clone()));
            self.active.fetch_sub(1, Ordering::Relaxed);
        }
        self.idle.notify_waiters();
        reason
    }

    async fn iterate(&mut self, seqs: &mut Sequences) -> String {
        let mut step = 0u64;
        loop {
            if seqs.running.is_empty() && seqs.preempted.is_empty() && seqs.waiting.is_none() {
                tokio::select! {
                    biased;
                    reason = lost_reason(&mut self.lost) => return reason,
                    next = self.requests.recv() => match next {
                        Some(s) => seqs.waiting = Some(s),
                        None => return "the coordinator is shutting down".into(),
                    },
                }
            }
            self.admit(seqs);
            self.drop_cancelled(seqs).await;
            self.drop_expired(seqs).await;
            self.make_room(seqs).await;
            let running = &mut seqs.running;
            if running.is_empty() {
                continue;
            }
            step += 1;
            let (seqs, forks) = self.schedule(running);
            let request = wpb::StepRequest { group_id: self.name.clone(), step, seqs, forks };
            let sampled = tokio::select! {
                biased;
                reason = lost_reason(&mut self.lost) => Err(reason),
                r = tokio::time::timeout(self.config.step_timeout, step_all(&self.members, request)) => {
                    r.unwrap_or_else(|_| Err(format!("a step did not finish within {:?}", self.config.step_timeout)))
                }
            };
            let sampled = match sampled {
                Ok(s) => s,
                Err(reason) => return reason,
            };
            if let Err(reason) = self.deliver(running, sampled).await {
                return reason;
            }
        }
    }

    /// Admits queued sequences in order — preempted ones first, as they were admitted before —
    /// while the blocks they need fit next to what the running ones need. Placement refuses
    /// sequences larger than the budget, so an idle group always admits its first one.
    fn admit(&mut self, seqs: &mut Sequences) {
        if self.config.static_batching && !seqs.running.is_empty() {
            return;
        }
        let budget = self.kv_capacity / KV_BLOCK_TOKENS;
        let mut claimed: u64 = seqs.running.iter().map(Running::claim).sum();
        while seqs.running.len() < self.config.max_batch {
            let next = match seqs.preempted.pop_front() {
                Some(r) => r,
                None => match seqs.waiting.take().or_else(|| self.requests.try_recv().ok()) {
                    Some(s) => Running::new(s),
                    None => break,
                },
            };
            let claim = next.claim();
            if claimed + claim > budget && !seqs.running.is_empty() {
                seqs.preempted.push_front(next);
                break;
            }
            claimed += claim;
            seqs.running.push(next);
        }
    }

    /// Preempts the most recently admitted sequences until every running sequence's next step
    /// fits the group's KV blocks. Beam searches, which hold their worst case from admission,
    /// are never preempted; the oldest other sequence only when beams alone are left beside it
    /// (it then waits for them to finish). So the group always makes progress.
    async fn make_room(&mut self, seqs: &mut Sequences) {
        let budget = self.kv_capacity / KV_BLOCK_TOKENS;
        let mut claimed: u64 = seqs.running.iter().map(Running::claim).sum();
        let mut released = Vec::new();
        while claimed > budget {
            let Some(victim) = seqs.running.iter().rposition(|r| r.beam.is_none()).filter(|_| seqs.running.len() > 1) else {
                break;
            };
            let mut r = seqs.running.remove(victim);
            claimed -= r.claim();
            if r.cached > 0 {
                released.push(r.seq);
            }
            tracing::debug!(group = %self.name, seq = r.seq, cached = r.cached, generated = r.outputs.len(), "preempted");
            r.preempt();
            seqs.preempted.push_front(r);
            self.metrics.preempted();
        }
        if !released.is_empty() {
            release_all(&self.members, &self.name, released).await;
        }
    }

    /// Ends every sequence whose deadline has passed with `DEADLINE_EXCEEDED`, wherever it is,
    /// and frees what it held on every rank.
    async fn drop_expired(&mut self, seqs: &mut Sequences) {
        let now = Instant::now();
        let expired = |d: Option<Instant>| crate::deadline::passed(d, now);
        let mut ended = Vec::new();
        let mut release = Vec::new();
        for r in seqs.running.extract_if(.., |r| expired(r.deadline)) {
            if r.cached > 0 {
                release.extend(r.worker_seqs());
            }
            ended.push((r.events, r.outputs.len()));
        }
        for r in seqs.preempted.iter().filter(|r| expired(r.deadline)) {
            ended.push((r.events.clone(), r.outputs.len()));
        }
        seqs.preempted.retain(|r| !expired(r.deadline));
        if let Some(s) = seqs.waiting.take_if(|s| expired(s.deadline)) {
            ended.push((s.events, 0));
        }
        if ended.is_empty() {
            return;
        }
        if !release.is_empty() {
            release_all(&self.members, &self.name, release).await;
        }
        self.active.fetch_sub(ended.len(), Ordering::Relaxed);
        self.idle.notify_waiters();
        self.metrics.deadlines_exceeded(ended.len());
        for (events, generated) in ended {
            let _ = events.send(Err(crate::deadline::exceeded(generated)));
        }
    }

    /// What the next step carries: one token for every decoding sequence, then prompt chunks
    /// from the budget that is left. The oldest prompt is guaranteed a quarter of that budget
    /// (so it finishes however many others arrive); the rest goes to the prompts closest to
    /// done first, so a short request is not queued behind a long prefill.
    fn schedule(&self, running: &mut [Running]) -> (Vec<wpb::SeqStep>, Vec<wpb::Fork>) {
        let mut seqs = Vec::with_capacity(running.len());
        let mut forks = Vec::new();
        for r in running.iter_mut().filter(|r| !r.prefilling()) {
            if r.beam.is_some() {
                seqs.extend(r.take_beam_step(&mut forks));
            } else {
                seqs.push(r.take_step(1));
            }
        }
        let mut budget = self.config.step_tokens.saturating_sub(seqs.len()).max(MIN_PREFILL_CHUNK);
        let prefills: Vec<usize> = (0..running.len()).filter(|&i| running[i].prefilling()).collect();
        let mut grant = vec![0usize; running.len()];
        if let Some(&oldest) = prefills.first() {
            grant[oldest] = running[oldest].pending.len().min((budget / 4).max(MIN_PREFILL_CHUNK)).min(budget);
            budget -= grant[oldest];
        }
        let mut by_need = prefills.clone();
        by_need.sort_by_key(|&i| running[i].pending.len());
        for i in by_need {
            let extra = (running[i].pending.len() - grant[i]).min(budget);
            grant[i] += extra;
            budget -= extra;
        }
        for i in prefills {
            if grant[i] > 0 {
                seqs.push(running[i].take_step(grant[i]));
            }
        }
        (seqs, forks)
    }

    /// Hands each sequence that finished its step's tokens the token sampled for it; finished
    /// sequences are streamed their end and released.
    async fn deliver(&mut self, running: &mut Vec<Running>, sampled: Vec<wpb::SampledToken>) -> Result<(), String> {
        let due: usize = running.iter().filter(|r| r.awaiting).map(|r| r.beam.as_ref().map_or(1, |b| b.asked)).sum();
        if sampled.len() != due {
            return Err(format!("rank 0 returned {} tokens where {due} were due", sampled.len()));
        }
        let mut done = Vec::new();
        // Sent once the workers have freed the sequences: a client that sees `Finished` sees a
        // cluster that no longer holds its request.
        let mut finishes: Vec<(Events, pb::Finished)> = Vec::new();
        let now = std::time::Instant::now();
        for t in sampled {
            let Some(r) = running.iter_mut().find(|r| r.expects(t.seq_id)) else {
                return Err(format!("rank 0 answered for sequence {}, which expected no token", t.seq_id));
            };
            if let Some(b) = r.beam.as_mut() {
                let top = t.top.iter().map(|c| (c.token, c.logprob)).collect();
                b.candidates.push(Candidates { slot: (t.seq_id - b.first) as usize, top });
                continue;
            }
            r.awaiting = false;
            r.rng_draws = t.rng_draws;
            r.last_token = Some(self.metrics.token(r.generation.arrived(), r.last_token, now));
            let top = t.top.iter().map(|a| pb::TopLogprob { id: a.token, logprob: a.logprob }).collect();
            match r.generation.accept_with_top(t.token, t.logprob, top) {
                Ok(emitted) => {
                    match emitted.resample {
                        Some(Resample::Raise { temperature }) => {
                            r.sampling = Some(wpb::Sampling { temperature, ..r.base.clone() });
                        }
                        Some(Resample::Restore) => r.sampling = Some(r.base.clone()),
                        None => {}
                    }
                    if let Some(chunk) = emitted.chunk {
                        r.send(pb::generate_response::Event::Chunk(chunk));
                    }
                    match emitted.finished {
                        Some(finished) => {
                            self.metrics.finished(&finished);
                            finishes.push((r.events.clone(), finished));
                            done.push(r.seq);
                        }
                        None => {
                            r.pending.push(t.token);
                            r.outputs.push(t.token);
                        }
                    }
                }
                Err(e) => {
                    let _ = r.events.send(Err(Status::internal(e.to_string())));
                    done.push(r.seq);
                }
            }
        }
        for r in running.iter_mut().filter(|r| r.awaiting && r.beam.is_some()) {
            r.awaiting = false;
            if self.advance_beams(r, &mut finishes)? {
                done.push(r.seq);
            }
        }
        if !done.is_empty() {
            let release: Vec<u64> = running.iter().filter(|r| done.contains(&r.seq)).flat_map(Running::worker_seqs).collect();
            running.retain(|r| !done.contains(&r.seq));
            self.active.fetch_sub(done.len(), Ordering::Relaxed);
            self.idle.notify_waiters();
            release_all(&self.members, &self.name, release).await;
        }
        for (events, finished) in finishes {
            let _ = events.send(Ok(pb::GenerateResponse { event: Some(pb::generate_response::Event::Finished(finished)) }));
        }
        Ok(())
    }

    /// Moves a beam search on with the candidates its step returned; returns whether it ended.
    fn advance_beams(&self, r: &mut Running, finishes: &mut Vec<(Events, pb::Finished)>) -> Result<bool, String> {
        let Some(b) = r.beam.as_mut() else { return Ok(false) };
        let candidates = std::mem::take(&mut b.candidates);
        if candidates.len() != b.asked {
            return Err(format!("rank 0 returned {} beam candidates where {} were due", candidates.len(), b.asked));
        }
        match b.search.advance(&candidates) {
            Advance::Continue { forks, feed } => {
                b.forks = forks;
                b.feed = feed;
                Ok(false)
            }
            Advance::Done(best) => {
                match r.generation.accept_hypotheses(&best) {
                    Ok(emitted) => {
                        if let Some(chunk) = emitted.chunk {
                            r.send(pb::generate_response::Event::Chunk(chunk));
                        }
                        if let Some(finished) = emitted.finished {
                            self.metrics.finished(&finished);
                            finishes.push((r.events.clone(), finished));
                        }
                    }
                    Err(e) => {
                        let _ = r.events.send(Err(Status::internal(e.to_string())));
                    }
                }
                Ok(true)
            }
        }
    }

    /// Removes sequences whose client has gone (cancelled or disconnected) and frees their KV
    /// cache on every rank.
    async fn drop_cancelled(&mut self, seqs: &mut Sequences) {
        let running = &mut seqs.running;
        let mut gone: Vec<u64> = running.iter().filter(|r| r.events.is_closed()).map(|r| r.seq).collect();
        // Preempted sequences hold nothing on the workers.
        gone.extend(seqs.preempted.iter().filter(|r| r.events.is_closed()).map(|r| r.seq));
        seqs.preempted.retain(|r| !r.events.is_closed());
        if gone.is_empty() {
            return;
        }
        // A sequence never stepped holds nothing on the workers.
        let cached: Vec<u64> = running.iter().filter(|r| gone.contains(&r.seq) && r.cached > 0).flat_map(Running::worker_seqs).collect();
        running.retain(|r| !gone.contains(&r.seq));
        self.active.fetch_sub(gone.len(), Ordering::Relaxed);
        self.idle.notify_waiters();
        self.metrics.cancelled(gone.len());
        tracing::info!(group = %self.name, sequences = ?gone, "client went away; releasing");
        if !cached.is_empty() {
            release_all(&self.members, &self.name, cached).await;
        }
    }
}

/// Resolves when the cluster marks the group lost (or drops it).
async fn lost_reason(lost: &mut watch::Receiver<Option<String>>) -> String {
    match lost.wait_for(Option::is_some).await {
        Ok(reason) => reason.clone().unwrap_or_default(),
        Err(_) => "the group was removed".into(),
    }
}

/// Sends `request` to every rank at once; returns rank 0's tokens once all ranks answered and
/// agree.
async fn step_all(members: &[Member], request: wpb::StepRequest) -> Result<Vec<wpb::SampledToken>, String> {
    let calls = members.iter().map(|m| {
        let mut client = m.client.clone();
        let request = request.clone();
        async move { client.step(request).await.map(|r| r.into_inner().tokens) }
    });
    let results = join_all(calls).await;
    let errors: Vec<String> =
        members.iter().zip(&results).filter_map(|(m, r)| r.as_ref().err().map(|s| format!("worker {}: {}", m.id, s.message()))).collect();
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    let mut answers = results.into_iter().flatten();
    let first = answers.next().ok_or("the group has no members")?;
    for (rank, other) in answers.enumerate() {
        let same = other.len() == first.len() && other.iter().zip(&first).all(|(a, b)| a.seq_id == b.seq_id && a.token == b.token);
        if !same {
            return Err(format!("rank {} sampled different tokens than rank 0; replicated state diverged", rank + 1));
        }
    }
    Ok(first)
}

/// Frees sequences on every rank. Failures are logged, not returned: a rank that cannot be
/// reached is being torn down with its group anyway.
pub(crate) async fn release_all(members: &[Member], group: &str, seqs: Vec<u64>) {
    let calls = members.iter().map(|m| {
        let mut client = m.client.clone();
        let request = wpb::ReleaseRequest { group_id: group.to_string(), seq_ids: seqs.clone() };
        async move { (m.id.clone(), client.release(request).await) }
    });
    for (id, result) in join_all(calls).await {
        if let Err(status) = result {
            tracing::warn!(group, worker = %id, error = %status.message(), "release failed");
        }
    }
}
