//! One RPC to every rank at once, and agreement on the answer.
//!
//! Every rank of a group (or of a ring) samples the same token from identical logits with an
//! identical seeded sampler, so rank 0's answer is used and the others are checked against it:
//! a mismatch means replicated state diverged, and the caller tears the ranks down rather than
//! trust them. Groups and rings both step through here.

use futures_util::future::join_all;
use std::future::Future;
use tessera_proto::worker as wpb;
use tessera_proto::worker::worker_client::WorkerClient;
use tonic::transport::Channel;
use tonic::Status;

/// One worker process: a rank of a group.
#[derive(Clone)]
pub(crate) struct Rank {
    pub id: String,
    pub client: WorkerClient<Channel>,
}

/// Calls `call` on every rank at once; the answers come back in rank order.
pub(crate) async fn on_every_rank<'r, T, F, Fut>(ranks: impl IntoIterator<Item = &'r Rank>, call: F) -> Vec<Result<T, Status>>
where
    F: FnMut(&'r Rank) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    join_all(ranks.into_iter().map(call)).await
}

/// Why ranks did not give one answer.
#[derive(Debug, PartialEq)]
pub(crate) enum Disagreement {
    /// No rank answered at all.
    Empty,
    /// Rank `rank` (0-based, in call order) answered differently from rank 0.
    Diverged { rank: usize },
}

/// Rank 0's answer when every other rank gave the same (by `same`).
pub(crate) fn agree<T>(answers: Vec<T>, same: impl Fn(&T, &T) -> bool) -> Result<T, Disagreement> {
    let mut answers = answers.into_iter();
    let first = answers.next().ok_or(Disagreement::Empty)?;
    for (i, other) in answers.enumerate() {
        if !same(&first, &other) {
            return Err(Disagreement::Diverged { rank: i + 1 });
        }
    }
    Ok(first)
}

/// Whether two ranks sampled the same tokens for the same sequences.
pub(crate) fn same_tokens(a: &[wpb::SampledToken], b: &[wpb::SampledToken]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.seq_id == y.seq_id && x.token == y.token)
}

/// Frees sequences on every rank. Failures are logged, not returned: a rank that cannot be
/// reached is being torn down with its group anyway.
pub(crate) async fn release_all(ranks: &[Rank], group: &str, seqs: Vec<u64>) {
    let results = on_every_rank(ranks, |rank| {
        let mut client = rank.client.clone();
        let request = wpb::ReleaseRequest { group_id: group.to_string(), seq_ids: seqs.clone() };
        async move { client.release(request).await }
    })
    .await;
    for (rank, result) in ranks.iter().zip(results) {
        if let Err(status) = result {
            tracing::warn!(group, worker = %rank.id, error = %status.message(), "release failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_zero_wins_when_all_agree() {
        assert_eq!(agree(vec![3, 3, 3], |a, b| a == b), Ok(3));
    }

    #[test]
    fn the_first_rank_that_differs_is_named() {
        assert_eq!(agree(vec![3, 3, 4, 5], |a, b| a == b), Err(Disagreement::Diverged { rank: 2 }));
        assert_eq!(agree(Vec::<u32>::new(), |a, b| a == b), Err(Disagreement::Empty));
    }

    #[test]
    fn sampled_tokens_agree_only_on_the_same_sequences_and_tokens() {
        let t = |seq_id, token| wpb::SampledToken { seq_id, token, ..Default::default() };
        assert!(same_tokens(&[t(1, 5), t(2, 6)], &[t(1, 5), t(2, 6)]));
        assert!(!same_tokens(&[t(1, 5)], &[t(1, 6)]));
        assert!(!same_tokens(&[t(1, 5)], &[t(2, 5)]));
        assert!(!same_tokens(&[t(1, 5)], &[t(1, 5), t(2, 6)]));
    }
}
