//! Sequence-parallel rings on the engine thread: membership (prepare, join, leave) and ring steps.
//!
//! A ring joins R serving groups (members) of one model; this rank's ring collective links it
//! with the rank of equal `tp_rank` in every member, and a ring step runs
//! [`Model::forward_ring`] with `RingComm { tp: the group's collective, sp: the ring's }`. Every
//! rank of every member gets the same last-token logits, so equal samplers pick the same token
//! without talking. One ring at a time per worker; the ring lives in `Serving`, so a reset,
//! re-assignment or failure of the group drops it. A ring sequence's KV cache and sampler live
//! with the group's own, so `Release` frees it and `kv_capacity_tokens` counts it (only the
//! tokens this member holds).
//!
//! A ring step blocks every rank of every member in collectives until all of them make it, so a
//! rank that refused on its own would leave the others waiting forever. Each step therefore
//! starts with an agreement: every rank checks the request against its own state, then the
//! verdicts and a digest of the step (sequence, prompt length or position, token, append
//! member) are gathered over the group and then over the ring. The step runs only if every rank
//! of every member accepted the same step; otherwise every rank refuses it and nothing changes
//! (the refusing rank with its own error, the others with `RingRefused`, all of them with
//! `InvalidArgument` if they were sent different steps). A collective that breaks fails the
//! engine as `Step` does; any other error once the step is under way drops the ring (closing its
//! links, so the other ranks fail instead of waiting) and its sequences, and the group serves on.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};

use tessera_collective::{Collective, TcpCollective, TcpConfig};
use tessera_model::sampler::{Sampler, SamplingParams};
use tessera_model::{AppendOn, DecodeStep, KvCache, Model, ModelError, PrefillStep, RingComm, RingLogits, RingStep, SeqId, ZigzagLayout};
use tokio::sync::oneshot;

use super::{Command, Engine, EngineHandle, Result, SeqSampling, Serving, State};
use crate::error::WorkerError;

mod agreement;
use agreement::{agree, Agreement, Digest};

/// Where a worker's group sits in a ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingMembership {
    pub ring_id: String,
    /// This group's index in the ring.
    pub member: usize,
    /// Groups in the ring (at least 2).
    pub members: usize,
}

/// How a ring sequence's tokens are drawn.
#[derive(Debug, Clone)]
pub struct RingSampling {
    pub params: SamplingParams,
    /// Alternatives to report with each sampled token.
    pub top_logprobs: usize,
    /// A sequence moved off a lost ring: its original prompt length and the random numbers its
    /// sampler had drawn.
    pub resume: Option<(usize, u64)>,
}

/// One ring call of one sequence.
#[derive(Debug, Clone)]
pub enum RingWork {
    /// A new sequence's whole prompt, cut by the zigzag layout of `(prompt_len, members)`.
    Prefill {
        prompt_len: usize,
        /// This member's share, in its row order ([`ZigzagLayout::local_tokens`]).
        tokens: Vec<u32>,
        /// The whole prompt, for samplers whose penalties read it.
        prompt: Option<Vec<u32>>,
        sampling: RingSampling,
    },
    /// One more token after the prefill.
    Decode {
        token: u32,
        /// The tokens the whole ring holds for the sequence.
        position: usize,
        /// Which member keeps the token's keys and values (`None`: the least loaded).
        append_member: Option<usize>,
        /// A change of how the next tokens are drawn.
        sampling: Option<RingSampling>,
    },
}

/// A ring step of one sequence.
#[derive(Debug, Clone)]
pub struct RingSeqStep {
    pub ring_id: String,
    pub seq: SeqId,
    pub work: RingWork,
}

/// The token every rank of the ring sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct RingSampled {
    pub token: u32,
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first (empty unless asked).
    pub top: Vec<(u32, f32)>,
    /// Random numbers the sequence's sampler has drawn so far.
    pub rng_draws: u64,
}

pub(super) enum RingCommand {
    Prepare(RingMembership, oneshot::Sender<Result<SocketAddr>>),
    Join(String, Vec<SocketAddr>, oneshot::Sender<Result<()>>),
    Leave(String, oneshot::Sender<Result<Vec<SeqId>>>),
    // Boxed: a step carries a whole prompt's sampling state, far larger than the other commands.
    Step(Box<RingSeqStep>, oneshot::Sender<Result<RingSampled>>),
}

impl EngineHandle {
    /// Binds this rank's endpoint for ring `ring.ring_id`, of which its group is a member, and
    /// returns it. Asked again with the same membership before joining, returns the same address.
    pub async fn prepare_ring(&self, group: String, ring: RingMembership) -> Result<SocketAddr> {
        self.call(|r| Command::Ring(group, RingCommand::Prepare(ring, r))).await?
    }

    /// Connects the prepared ring to `peers` (the ring endpoint of the rank with this rank's
    /// `tp_rank` in every member, in member order); returns once all are connected.
    pub async fn join_ring(&self, group: String, ring_id: String, peers: Vec<SocketAddr>) -> Result<()> {
        self.call(|r| Command::Ring(group, RingCommand::Join(ring_id, peers, r))).await?
    }

    /// Leaves the ring and releases the ring sequences held here; returns their ids.
    pub async fn leave_ring(&self, group: String, ring_id: String) -> Result<Vec<SeqId>> {
        self.call(|r| Command::Ring(group, RingCommand::Leave(ring_id, r))).await?
    }

    /// Runs one ring step, in lockstep with every rank of every member of the ring.
    pub async fn ring_step(&self, group: String, step: RingSeqStep) -> Result<RingSampled> {
        self.call(|r| Command::Ring(group, RingCommand::Step(Box::new(step), r))).await?
    }
}

/// A worker's place in a ring, kept in `Serving`.
pub(super) struct Ring {
    membership: RingMembership,
    link: Link,
}

enum Link {
    /// Prepared: the endpoint is bound, waiting for the peer list.
    Bound { listener: TcpListener, addr: SocketAddr },
    /// Joined: the ring's collective, and the ring sequences started here.
    Joined { comm: Box<dyn Collective>, seqs: BTreeSet<SeqId> },
}

impl Ring {
    /// Connected to its peers: it has a collective to interrupt.
    pub(super) fn is_joined(&self) -> bool {
        matches!(self.link, Link::Joined { .. })
    }

    fn phase(&self) -> &'static str {
        match self.link {
            Link::Bound { .. } => "prepared but not joined",
            Link::Joined { .. } => "joined",
        }
    }
}

/// How a ring step went wrong, which decides what becomes of the engine.
enum Failure {
    /// Refused before any collective, or by every rank together: nothing changed.
    Refused(WorkerError),
    /// A collective broke: the group (and the ring) must be re-formed.
    Broken(WorkerError),
    /// Failed with the step under way: the ring is out of step and is dropped.
    Aborted(WorkerError),
}

impl Engine {
    pub(super) fn ring_command(&mut self, group: &str, cmd: RingCommand) {
        // As in `run`: a caller that gave up does not undo the work.
        match cmd {
            RingCommand::Prepare(membership, reply) => {
                let _ = reply.send(self.prepare_ring(group, membership));
            }
            RingCommand::Join(ring_id, peers, reply) => {
                let _ = reply.send(self.join_ring(group, &ring_id, peers));
            }
            RingCommand::Leave(ring_id, reply) => {
                let _ = reply.send(self.leave_ring(group, &ring_id));
            }
            RingCommand::Step(step, reply) => {
                let _ = reply.send(self.ring_step(group, *step));
            }
        }
    }

    fn prepare_ring(&mut self, group: &str, membership: RingMembership) -> Result<SocketAddr> {
        let host = self.config.collective_host.clone();
        let s = self.serving(group, "prepare a ring")?;
        let RingMembership { member, members, .. } = membership;
        if members < 2 || member >= members {
            return Err(WorkerError::InvalidArgument(format!(
                "member {member} of a ring of {members}: a ring has at least 2 members, indexed from 0"
            )));
        }
        if let Some(ring) = &s.ring {
            return match &ring.link {
                // A retried prepare gets the endpoint it already has.
                Link::Bound { addr, .. } if ring.membership == membership => Ok(*addr),
                _ => Err(WorkerError::RingState {
                    ring: ring.membership.ring_id.clone(),
                    state: ring.phase(),
                    action: "prepare another ring before leaving it",
                }),
            };
        }
        let listener = TcpListener::bind((host.as_str(), 0)).map_err(WorkerError::Bind)?;
        let addr = listener.local_addr().map_err(WorkerError::Bind)?;
        tracing::info!(group, ring = %membership.ring_id, member, members, %addr, "ring prepared");
        s.ring = Some(Ring { membership, link: Link::Bound { listener, addr } });
        Ok(addr)
    }

    fn join_ring(&mut self, group: &str, ring_id: &str, peers: Vec<SocketAddr>) -> Result<()> {
        let tls = self.config.collective_tls.as_ref().map(|t| t.current());
        let slot = std::sync::Arc::clone(&self.interrupt);
        let s = self.serving(group, "join a ring")?;
        let ring = take_ring(s, ring_id)?;
        let (membership, listener, addr) = match ring {
            Ring { membership, link: Link::Bound { listener, addr } } => (membership, listener, addr),
            joined => {
                let err = WorkerError::RingState { ring: ring_id.into(), state: joined.phase(), action: "join it again" };
                s.ring = Some(joined);
                return Err(err);
            }
        };
        let (member, members) = (membership.member, membership.members);
        let mismatch = if peers.len() != members {
            Some(format!("{} peers for a ring of {members} members", peers.len()))
        } else if peers[member] != addr {
            Some(format!("the peer list names {} as member {member}, but this rank's ring endpoint is {addr}", peers[member]))
        } else {
            None
        };
        if let Some(message) = mismatch {
            // Still prepared: a corrected peer list can follow.
            s.ring = Some(Ring { membership, link: Link::Bound { listener, addr } });
            return Err(WorkerError::InvalidArgument(message));
        }
        // The listener is spent either way; a ring that failed to connect is prepared afresh.
        let comm = TcpCollective::connect(TcpConfig { tls, ..TcpConfig::new(member, peers) }, listener)?;
        // A reset fires it, so a ring step blocked on a silent member does not hold the reset.
        super::interrupts(&slot).ring = comm.interrupt();
        tracing::info!(group, ring = ring_id, member, members, "ring joined");
        s.ring = Some(Ring { membership, link: Link::Joined { comm: Box::new(comm), seqs: BTreeSet::new() } });
        Ok(())
    }

    fn leave_ring(&mut self, group: &str, ring_id: &str) -> Result<Vec<SeqId>> {
        let s = self.serving(group, "leave a ring")?;
        let ring = take_ring(s, ring_id)?;
        let released = release_ring_seqs(s, ring);
        tracing::info!(group, ring = ring_id, released = released.len(), "ring left");
        Ok(released)
    }

    fn ring_step(&mut self, group: &str, step: RingSeqStep) -> Result<RingSampled> {
        let capacity = self.config.kv_capacity_tokens;
        let s = self.serving(group, "run a ring step")?;
        match run_step(s, capacity, step) {
            Ok(sampled) => Ok(sampled),
            Err(Failure::Refused(e)) => Err(e),
            Err(Failure::Aborted(e)) => {
                tracing::warn!(group, error = %e, "ring step failed under way; leaving the ring");
                if let Some(ring) = s.ring.take() {
                    release_ring_seqs(s, ring);
                }
                Err(e)
            }
            Err(Failure::Broken(e)) => {
                let group_id = s.group_id.clone();
                self.state = State::Failed { group_id, error: e.to_string() };
                Err(e)
            }
        }
    }
}

/// Takes the worker's ring out of `s` if it is `ring_id`; leaves it in place otherwise.
fn take_ring(s: &mut Serving, ring_id: &str) -> Result<Ring> {
    match s.ring.take() {
        Some(ring) if ring.membership.ring_id == ring_id => Ok(ring),
        other => {
            s.ring = other;
            Err(WorkerError::WrongRing(ring_id.into()))
        }
    }
}

/// Releases the sequences `ring` started that this rank still holds; returns their ids.
fn release_ring_seqs(s: &mut Serving, ring: Ring) -> Vec<SeqId> {
    let Link::Joined { seqs, .. } = ring.link else {
        return Vec::new();
    };
    let mut released = Vec::new();
    for seq in seqs {
        // An id released and reused for a plain sequence since is not the ring's any more.
        if s.kv.ring(seq).is_some() {
            s.kv.release(seq);
            s.samplers.remove(&seq);
            released.push(seq);
        }
    }
    released
}

fn run_step(s: &mut Serving, capacity: u64, mut step: RingSeqStep) -> std::result::Result<RingSampled, Failure> {
    // Without a joined ring this rank cannot take part at all, not even to refuse.
    let membership = match &s.ring {
        Some(Ring { membership, link: Link::Joined { .. } }) if membership.ring_id == step.ring_id => membership.clone(),
        Some(ring) if ring.membership.ring_id == step.ring_id => {
            let (ring, state) = (step.ring_id, ring.phase());
            return Err(Failure::Refused(WorkerError::RingState { ring, state, action: "run a ring step" }));
        }
        _ => return Err(Failure::Refused(WorkerError::WrongRing(step.ring_id))),
    };
    // A prefill sent as the whole prompt alone: this member cuts its own share.
    if let RingWork::Prefill { prompt_len, tokens, prompt: Some(prompt), .. } = &mut step.work {
        if tokens.is_empty() && prompt.len() == *prompt_len {
            if let Ok(share) = ZigzagLayout::new(*prompt_len, membership.members).and_then(|l| l.local_tokens(prompt, membership.member)) {
                *tokens = share;
            }
        }
    }
    let verdict = check(s, &membership, capacity, &step);
    let Serving { model, kv, comm, samplers, ring, .. } = s;
    let Some(Ring { link: Link::Joined { comm: sp, seqs }, .. }) = ring else {
        return Err(Failure::Refused(WorkerError::WrongRing(step.ring_id)));
    };
    let agreement = agree(comm.as_mut(), sp.as_mut(), &Digest::of(&step), verdict.is_ok());
    let agreement = agreement.map_err(|e| Failure::Broken(e.into()))?;
    // A rank that refused reports its own reason; the others say who refused.
    let append_on = verdict.map_err(Failure::Refused)?;
    match agreement {
        Agreement::Run => {}
        Agreement::Refused(members) => return Err(Failure::Refused(WorkerError::RingRefused { members })),
        Agreement::Differ(digests) => {
            return Err(Failure::Refused(WorkerError::InvalidArgument(format!(
                "the ring's ranks were sent different steps, by member: {digests:?}"
            ))))
        }
    }
    let mut rc = RingComm { tp: comm.as_mut(), sp: sp.as_mut() };
    let seq = step.seq;
    match step.work {
        RingWork::Prefill { prompt_len, tokens, prompt, sampling } => {
            let mut sampler = match sampling.resume {
                Some((prompt_len, draws)) => Sampler::resumed(sampling.params, prompt_len, draws),
                None => Sampler::new(sampling.params),
            };
            if let Some(prompt) = &prompt {
                // A resumed sequence's tokens past its original prompt count as generated.
                sampler.observe_context(0, prompt);
            }
            let step = RingStep::Prefill(PrefillStep { seq, prompt_len, tokens: &tokens });
            let row = forward(model, kv, &mut rc, &step)?;
            let mut state = SeqSampling { sampler, top_logprobs: sampling.top_logprobs, beam_candidates: 0 };
            let sampled = sample(&mut state, &row);
            samplers.insert(seq, state);
            seqs.retain(|&started| kv.ring(started).is_some());
            seqs.insert(seq);
            Ok(sampled)
        }
        RingWork::Decode { token, position, sampling, .. } => {
            let append = append_on.map_or(AppendOn::LeastLoaded, AppendOn::Member);
            let step = RingStep::Decode(DecodeStep { seq, token, position, append });
            let row = forward(model, kv, &mut rc, &step)?;
            let missing = || Failure::Aborted(WorkerError::InvalidArgument(format!("sequence {seq} has no sampler")));
            let state = samplers.get_mut(&seq).ok_or_else(missing)?;
            // A change mid-sequence keeps the history and the random stream, as in `Step`.
            if let Some(change) = sampling {
                state.sampler.set_params(change.params);
                state.top_logprobs = change.top_logprobs;
            }
            Ok(sample(state, &row))
        }
    }
}

/// This rank's verdict on `step` before any collective: for a decode, the member that keeps
/// the new token's keys and values.
fn check(s: &Serving, ring: &RingMembership, capacity: u64, step: &RingSeqStep) -> Result<Option<usize>> {
    let (member, members, seq) = (ring.member, ring.members, step.seq);
    // KV memory is counted in blocks, as for group steps.
    let held = s.kv.blocks() as u64;
    let capacity = capacity / tessera_model::KV_BLOCK_TOKENS as u64;
    match &step.work {
        RingWork::Prefill { prompt_len, tokens, prompt, sampling } => {
            let prompt_len = *prompt_len;
            if prompt_len == 0 {
                return Err(WorkerError::InvalidArgument(format!("ring prefill of sequence {seq} has no tokens")));
            }
            let layout = ZigzagLayout::new(prompt_len, members)?;
            let share = layout.member_len(member);
            if tokens.len() != share {
                return Err(WorkerError::InvalidArgument(format!(
                    "member {member} of {members} holds {share} tokens of a {prompt_len}-token prompt (zigzag layout) but was sent {}",
                    tokens.len()
                )));
            }
            check_vocab(&s.model, tokens)?;
            match prompt {
                Some(prompt) => {
                    check_vocab(&s.model, prompt)?;
                    if layout.local_tokens(prompt, member)? != *tokens {
                        return Err(WorkerError::InvalidArgument(format!(
                            "the tokens sent to member {member} are not its zigzag share of the prompt"
                        )));
                    }
                }
                None if sampling.params.needs_history() => {
                    return Err(WorkerError::InvalidArgument(
                        "the sampling parameters use the token history (penalties, n-gram ban, DRY): send the whole prompt".into(),
                    ))
                }
                None => {}
            }
            if let Some(len) = s.kv.len(seq).filter(|&len| len > 0) {
                return Err(WorkerError::InvalidArgument(format!(
                    "sequence {seq} already holds {len} tokens; a ring prefill starts a new sequence"
                )));
            }
            let needed = held + tessera_model::blocks_for(share) as u64;
            if needed > capacity {
                return Err(WorkerError::KvExhausted { needed, capacity });
            }
            Ok(None)
        }
        RingWork::Decode { token, position, append_member, .. } => {
            let started_here = matches!(&s.ring, Some(Ring { link: Link::Joined { seqs, .. }, .. }) if seqs.contains(&seq));
            let placement =
                s.kv.ring(seq).filter(|_| started_here).ok_or_else(|| {
                    WorkerError::InvalidArgument(format!("sequence {seq} is not a sequence of ring {:?} here", ring.ring_id))
                })?;
            if *position != placement.len() {
                return Err(WorkerError::InvalidArgument(format!(
                    "sequence {seq} holds {} tokens over the ring but the step writes at position {position}",
                    placement.len()
                )));
            }
            check_vocab(&s.model, &[*token])?;
            let on = match *append_member {
                None => placement.least_loaded(),
                Some(m) if m < members => m,
                Some(m) => return Err(WorkerError::InvalidArgument(format!("append on member {m} of a ring of {members}"))),
            };
            if !s.samplers.contains_key(&seq) {
                return Err(WorkerError::InvalidArgument(format!("sequence {seq} has no sampler")));
            }
            let grows = on == member && tessera_model::blocks_for(s.kv.len(seq).unwrap_or(0) + 1) > s.kv.seq_blocks(seq);
            let needed = held + u64::from(grows);
            if needed > capacity {
                return Err(WorkerError::KvExhausted { needed, capacity });
            }
            Ok(Some(on))
        }
    }
}

fn check_vocab(model: &Model, tokens: &[u32]) -> Result<()> {
    let vocab = model.config().vocab_size;
    match tokens.iter().find(|&&t| t as usize >= vocab) {
        Some(bad) => Err(WorkerError::InvalidArgument(format!("token id {bad} is outside the vocabulary of {vocab}"))),
        None => Ok(()),
    }
}

/// The last-token logits of a ring call. Only a broken collective fails the engine.
fn forward(model: &Model, kv: &mut KvCache, comm: &mut RingComm, step: &RingStep) -> std::result::Result<Vec<f32>, Failure> {
    let classify = |e: ModelError| match e {
        e @ ModelError::Collective(_) => Failure::Broken(e.into()),
        e => Failure::Aborted(e.into()),
    };
    let out = model.forward_ring(step, kv, comm, RingLogits::Last).map_err(classify)?;
    let rows: Vec<Vec<f32>> = out.last.to_vec2().map_err(|e| classify(e.into()))?;
    rows.into_iter().next().ok_or_else(|| Failure::Aborted(ModelError::InvalidBatch("a ring call returned no logits".into()).into()))
}

/// Samples exactly as `Step` does.
fn sample(seq: &mut SeqSampling, row: &[f32]) -> RingSampled {
    let pick = seq.pick(row);
    RingSampled { token: pick.token, logprob: pick.logprob, top: pick.top, rng_draws: seq.sampler.rng_draws() }
}
