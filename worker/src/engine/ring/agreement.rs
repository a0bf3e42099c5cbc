//! The agreement that opens every ring step: no rank of the ring enters the step's collectives
//! unless every rank of every member accepted the same step (see the parent module).
//!
//! Each rank votes (refuse or accept) with a digest of the step; the votes are gathered over
//! the group, folded into the member's vote, and the members' votes gathered over the ring.
//! Every rank of every member then holds the same members' votes and reaches the same
//! conclusion without another message.

use tessera_collective::{Collective, CollectiveError};
use tessera_model::SeqId;

use super::{RingSeqStep, RingWork};

/// The fields of a ring step that every rank of every member must be sent identically (a
/// prefill's tokens differ by member and are checked against the layout instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Digest {
    decode_step: bool,
    seq: SeqId,
    /// Prompt length of a prefill, position of a decode.
    len: u64,
    token: u32,
    append_member: Option<u64>,
}

/// Each field travels as 4 floats of 16 bits each, which f32 holds exactly.
const FIELDS: usize = 5;
const DIGEST_LEN: usize = 4 * FIELDS;

impl Digest {
    pub(super) fn of(step: &RingSeqStep) -> Self {
        let seq = step.seq;
        match &step.work {
            RingWork::Prefill { prompt_len, .. } => {
                Self { decode_step: false, seq, len: *prompt_len as u64, token: 0, append_member: None }
            }
            RingWork::Decode { token, position, append_member, .. } => {
                Self { decode_step: true, seq, len: *position as u64, token: *token, append_member: append_member.map(|m| m as u64) }
            }
        }
    }

    fn encode(&self, out: &mut Vec<f32>) {
        let fields =
            [u64::from(self.decode_step), self.seq, self.len, u64::from(self.token), self.append_member.map_or(0, |m| m.saturating_add(1))];
        for field in fields {
            out.extend((0..4).map(|i| ((field >> (16 * i)) & 0xffff) as f32));
        }
    }

    fn decode(values: &[f32]) -> Self {
        let field = |f: usize| (0..4).fold(0u64, |acc, i| acc | ((values[4 * f + i] as u64) << (16 * i)));
        Self { decode_step: field(0) != 0, seq: field(1), len: field(2), token: field(3) as u32, append_member: field(4).checked_sub(1) }
    }
}

/// One rank's (or, after the group's gather, one member's) say in the agreement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Vote {
    refused: bool,
    /// The ranks of this member were sent different steps.
    differ: bool,
    digest: Digest,
}

const VOTE_LEN: usize = 2 + DIGEST_LEN;

impl Vote {
    fn encode(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(VOTE_LEN);
        out.push(f32::from(u8::from(self.refused)));
        out.push(f32::from(u8::from(self.differ)));
        self.digest.encode(&mut out);
        out
    }

    fn decode(values: &[f32]) -> Self {
        Self { refused: values[0] != 0.0, differ: values[1] != 0.0, digest: Digest::decode(&values[2..]) }
    }
}

/// What every rank of every member concluded together.
#[derive(Debug, PartialEq)]
pub(super) enum Agreement {
    Run,
    /// These members had a rank that refused.
    Refused(Vec<usize>),
    /// Ranks were sent different steps; the digests by member.
    Differ(Vec<Digest>),
}

/// Gathers the votes over the group, then the members' votes over the ring. Every rank of
/// every member gathers the same members' votes, so all reach the same conclusion.
pub(super) fn agree(
    tp: &mut dyn Collective,
    sp: &mut dyn Collective,
    digest: &Digest,
    accept: bool,
) -> std::result::Result<Agreement, CollectiveError> {
    let mine = Vote { refused: !accept, differ: false, digest: *digest };
    let group = gather(tp, &mine)?;
    let member = Vote { refused: group.iter().any(|v| v.refused), differ: group.iter().any(|v| v.digest != *digest), digest: *digest };
    let ring = gather(sp, &member)?;
    Ok(conclude(&ring))
}

fn conclude(members: &[Vote]) -> Agreement {
    let first = members.first().map(|v| v.digest);
    if members.iter().any(|v| v.differ || Some(v.digest) != first) {
        return Agreement::Differ(members.iter().map(|v| v.digest).collect());
    }
    let refused: Vec<usize> = members.iter().enumerate().filter(|(_, v)| v.refused).map(|(m, _)| m).collect();
    if refused.is_empty() {
        Agreement::Run
    } else {
        Agreement::Refused(refused)
    }
}

fn gather(comm: &mut dyn Collective, vote: &Vote) -> std::result::Result<Vec<Vote>, CollectiveError> {
    let mut all = vec![0f32; VOTE_LEN * comm.world_size()];
    comm.all_gather(&vote.encode(), &mut all)?;
    Ok(all.chunks(VOTE_LEN).map(Vote::decode).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(seq: SeqId, append_member: Option<u64>) -> Digest {
        Digest { decode_step: true, seq, len: 4_000_000_123, token: 151_643, append_member }
    }

    #[test]
    fn digests_survive_the_float_encoding() {
        for d in [
            digest(u64::MAX, None),
            digest(0, Some(0)),
            digest(1 << 40, Some(63)),
            Digest { decode_step: false, seq: 7, len: 37, token: 0, append_member: None },
        ] {
            let mut wire = Vec::new();
            d.encode(&mut wire);
            assert_eq!(wire.len(), DIGEST_LEN);
            assert_eq!(Digest::decode(&wire), d);
            let vote = Vote { refused: true, differ: false, digest: d };
            assert_eq!(Vote::decode(&vote.encode()), vote);
        }
    }

    #[test]
    fn agreement_runs_only_when_every_member_accepts_the_same_step() {
        let vote = |refused, differ, seq| Vote { refused, differ, digest: digest(seq, None) };
        assert_eq!(conclude(&[vote(false, false, 1), vote(false, false, 1)]), Agreement::Run);
        assert_eq!(conclude(&[vote(false, false, 1), vote(true, false, 1), vote(true, false, 1)]), Agreement::Refused(vec![1, 2]));
        let differ = conclude(&[vote(false, false, 1), vote(true, false, 2)]);
        assert_eq!(differ, Agreement::Differ(vec![digest(1, None), digest(2, None)]));
        assert!(matches!(conclude(&[vote(false, true, 1), vote(false, false, 1)]), Agreement::Differ(_)));
    }

    /// Over a real group and ring (threads), a refusal anywhere reaches every rank.
    #[test]
    fn a_refusal_on_one_tensor_parallel_rank_reaches_every_rank_of_every_member() {
        use tessera_collective::InProcessGroup;
        let (members, tp) = (2, 2);
        // Rank (m, t) is rank t of group m and rank m of ring t.
        let groups: Vec<Vec<InProcessGroup>> = (0..members).map(|_| InProcessGroup::new(tp)).collect();
        let mut rings: Vec<_> = (0..tp).map(|_| InProcessGroup::new(members).into_iter()).collect();
        let results: Vec<Agreement> = std::thread::scope(|s| {
            let mut handles = Vec::new();
            for (m, group) in groups.into_iter().enumerate() {
                for ((t, mut tp_comm), ring) in group.into_iter().enumerate().zip(rings.iter_mut()) {
                    let mut sp_comm = ring.next().expect("a ring rank per member");
                    handles.push(s.spawn(move || {
                        let accept = !(m == 1 && t == 1);
                        agree(&mut tp_comm, &mut sp_comm, &digest(9, Some(1)), accept).expect("agree")
                    }));
                }
            }
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        });
        assert!(results.iter().all(|r| *r == Agreement::Refused(vec![1])), "{results:?}");
    }
}
