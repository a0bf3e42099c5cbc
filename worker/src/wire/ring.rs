//! Conversions of the sequence-parallel ring messages of `tessera.worker.v1`.

use tessera_proto::worker as pb;

use crate::engine::{RingMembership, RingSampled, RingSampling, RingSeqStep, RingWork};
use crate::error::WorkerError;

/// Largest ring a worker joins: every rank of the ring keeps a connection to every other.
const MAX_RING_MEMBERS: u32 = 64;

/// The group named, and where it sits in the ring.
pub fn membership(req: pb::PrepareRingRequest) -> Result<(String, RingMembership), WorkerError> {
    ring_id(&req.ring_id)?;
    if req.members < 2 || req.members > MAX_RING_MEMBERS || req.member >= req.members {
        return Err(WorkerError::InvalidArgument(format!(
            "member {} of a ring of {}: a ring has 2 to {MAX_RING_MEMBERS} members, indexed from 0",
            req.member, req.members
        )));
    }
    let membership = RingMembership { ring_id: req.ring_id, member: req.member as usize, members: req.members as usize };
    Ok((req.group_id, membership))
}

/// The group named, and the step.
pub fn ring_step(req: pb::RingStepRequest) -> Result<(String, RingSeqStep), WorkerError> {
    use pb::ring_step_request::Step;
    ring_id(&req.ring_id)?;
    let work = match req.step {
        None => return Err(WorkerError::InvalidArgument("a ring step needs a prefill or a decode".into())),
        Some(Step::Prefill(p)) => {
            let sampling = p
                .sampling
                .ok_or_else(|| WorkerError::InvalidArgument("a ring prefill creates the sequence's sampler: set sampling".into()))?;
            RingWork::Prefill {
                prompt_len: p.prompt_len as usize,
                tokens: p.tokens,
                prompt: (!p.prompt.is_empty()).then_some(p.prompt),
                sampling: sampling_of(sampling)?,
            }
        }
        Some(Step::Decode(d)) => RingWork::Decode {
            token: d.token,
            position: d.position as usize,
            append_member: d.append_member.map(|m| m as usize),
            sampling: d.sampling.map(sampling_of).transpose()?,
        },
    };
    Ok((req.group_id, RingSeqStep { ring_id: req.ring_id, seq: req.seq_id, work }))
}

pub fn ring_sampled(s: RingSampled) -> pb::RingStepResponse {
    let top = s.top.into_iter().map(|(token, logprob)| pb::TopToken { token, logprob }).collect();
    pb::RingStepResponse { token: s.token, logprob: s.logprob, top, rng_draws: s.rng_draws }
}

fn ring_id(id: &str) -> Result<(), WorkerError> {
    if id.is_empty() {
        return Err(WorkerError::InvalidArgument("a ring needs a non-empty ring_id".into()));
    }
    Ok(())
}

fn sampling_of(p: pb::Sampling) -> Result<RingSampling, WorkerError> {
    if p.beam_candidates > 0 {
        return Err(WorkerError::InvalidArgument("beam search is not supported on ring sequences".into()));
    }
    // `Sampling` is read in one place, a step's sequence; a ring step reads it through there.
    let work = super::seq_work(pb::SeqStep { sampling: Some(p), ..Default::default() })?;
    let params = work.sampling.ok_or_else(|| WorkerError::InvalidArgument("missing sampling parameters".into()))?;
    Ok(RingSampling { params, top_logprobs: work.top_logprobs, resume: work.resume })
}
