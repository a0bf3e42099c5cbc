//! Where a request goes, as pure functions over a snapshot of the groups: one group, a
//! sequence-parallel ring of groups, or a refusal that names the true limit. The cluster takes
//! the snapshot under its lock ([`crate::cluster`]) and carries the decision out.

use crate::error::CoordinatorError;

/// What placement sees of one group.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GroupView {
    pub id: u64,
    pub model: usize,
    /// KV tokens the group's smallest rank holds.
    pub kv_capacity: u64,
    /// Loaded and taking requests (not still forming).
    pub serving: bool,
    /// Held by a ring: no new request until the ring ends.
    pub held: bool,
    /// A rank is draining: the group finishes what it runs and takes nothing new.
    pub draining: bool,
    /// Requests it runs or queues now.
    pub active: usize,
    /// When it was last chosen (a placement counter), so ties go round-robin.
    pub last_placed: u64,
    /// Tokens of the request's prompt this group was sent lately as the prefix of another
    /// prompt, so its workers likely hold their keys and values (`prefix_affinity.rs`).
    pub cached_prefix: usize,
}

impl GroupView {
    /// Serving `model` and free to take new work (possibly held by a ring for now).
    fn open_for(&self, model: usize) -> bool {
        self.model == model && self.serving && !self.draining
    }
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PlacementRequest {
    pub model: usize,
    /// KV tokens it may grow to on its group: prompt plus `max_new_tokens`, and for a beam
    /// search that many per beam in whole blocks.
    pub kv_tokens: u64,
    pub prompt_len: usize,
    /// May run on a ring. Beam searches may not: their beams fork caches within one group.
    pub may_ring: bool,
}

impl PlacementRequest {
    /// The needs of a request of `prompt_len` tokens that may generate `max_new_tokens`, with
    /// `num_beams` beams (1 for sampling).
    pub(crate) fn new(model: usize, prompt_len: usize, max_new_tokens: u32, num_beams: usize) -> Self {
        let total = prompt_len as u64 + u64::from(max_new_tokens);
        // Each beam holds a whole sequence of KV cache, its own copy of the prompt included, in
        // whole blocks (a single sequence's last block is the group's to round).
        let kv_tokens =
            if num_beams > 1 { num_beams as u64 * tessera_proto::kv_blocks(total) * tessera_proto::KV_BLOCK_TOKENS } else { total };
        Self { model, kv_tokens, prompt_len, may_ring: num_beams <= 1 }
    }
}

/// A ring of `size` groups, each holding at most `share` tokens of the sequence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RingPlan {
    pub model: usize,
    pub size: usize,
    pub share: u64,
    /// The request's KV tokens (prompt plus `max_new_tokens`).
    pub tokens: u64,
}

impl RingPlan {
    fn new(model: usize, size: usize, tokens: u64) -> Self {
        Self { model, size, share: ring_share(tokens, size), tokens }
    }
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    /// This group.
    Group(u64),
    Ring(RingPlan),
}

/// Why no group or ring takes a request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Refusal {
    /// No ring of the serving groups could hold it: `most` is what one request may have now.
    TooLarge { tokens: u64, most: u64, groups: usize, largest: u64 },
    /// A beam search larger than any one group.
    BeamTooLarge { tokens: u64, largest: u64 },
    /// Every group that could hold it is held by a ring now.
    AllHeld { held: usize },
    /// No group of the model serves yet; `forming` are loading.
    NotServing { forming: usize },
    /// Fewer than a ring's size of groups can hold its share now.
    RingUnavailable { size: usize, share: u64 },
}

impl Refusal {
    /// The client's error; `model` and `tp` fill in the messages, `registered` counts workers.
    pub(crate) fn into_error(self, model: &str, tp: usize, registered: usize) -> CoordinatorError {
        match self {
            Refusal::TooLarge { tokens, most, groups, largest } => CoordinatorError::InvalidArgument(format!(
                "prompt plus max_new_tokens is {tokens} tokens; the most this cluster can hold for one request now is {most} \
                 ({groups} serving groups of at most {largest} KV tokens each)"
            )),
            Refusal::BeamTooLarge { tokens, largest } => CoordinatorError::InvalidArgument(format!(
                "beam search runs on one group, and {tokens} KV tokens (prompt plus max_new_tokens, times num_beams) fit no \
                 group (the largest holds {largest}); lower num_beams or max_new_tokens"
            )),
            Refusal::AllHeld { held } => CoordinatorError::Unavailable(format!(
                "every serving group of model {model:?} that can hold this request ({held}) is running a long request on a \
                 sequence-parallel ring; retry shortly"
            )),
            Refusal::NotServing { forming } => CoordinatorError::Unavailable(format!(
                "model {model:?} has no serving group yet ({forming} loading; {registered} workers registered, {tp} needed per group)"
            )),
            Refusal::RingUnavailable { size, share } => CoordinatorError::Unavailable(format!(
                "fewer than {size} groups can hold this request's share of {share} tokens now; retry"
            )),
        }
    }
}

/// Most tokens one ring member holds of a sequence of `total` tokens over `size` members: the
/// zigzag prefill splits the prompt within two tokens per member, and each decoded token goes to
/// the member holding the fewest.
pub(crate) fn ring_share(total: u64, size: usize) -> u64 {
    total.div_ceil(size as u64) + 2
}

/// How [`place`] chooses beyond fitting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Prompts of at least this many tokens go to a ring even when one group holds them (0:
    /// never).
    pub ring_prefill_tokens: usize,
    /// Prefer the group holding the longest prefix of the prompt unless it runs more than this
    /// many requests beyond the least busy group (`None`: the least busy group always).
    pub prefix_affinity_margin: Option<usize>,
}

/// Where `req` goes: the least busy open group of its model that can hold it (among equally
/// busy ones, the one chosen least recently), or, with a prefix affinity margin, the one that
/// holds the longest prefix of its prompt if it is not busier than that by more than the
/// margin; when no group can hold it, the smallest ring of serving groups whose members can
/// each hold their share.
///
/// With `ring_prefill_tokens` set, a prompt of at least that many tokens goes to a ring of
/// `ceil(prompt / ring_prefill_tokens)` groups (as many as serve, at most) when that is more
/// than the capacity alone needs: the prefill-cost rule.
pub(crate) fn place(groups: &[GroupView], req: &PlacementRequest, policy: Policy) -> Result<Decision, Refusal> {
    let ring_prefill_tokens = policy.ring_prefill_tokens;
    let mut capacities: Vec<u64> = groups.iter().filter(|g| g.open_for(req.model)).map(|g| g.kv_capacity).collect();
    capacities.sort_unstable_by(|a, b| b.cmp(a));
    let tokens = req.kv_tokens;
    if req.may_ring && ring_prefill_tokens > 0 && req.prompt_len >= ring_prefill_tokens && capacities.len() >= 2 {
        let size = req.prompt_len.div_ceil(ring_prefill_tokens).clamp(2, capacities.len());
        if capacities[size - 1] >= ring_share(tokens, size) {
            return Ok(Decision::Ring(RingPlan::new(req.model, size, tokens)));
        }
    }
    if let Some(&largest) = capacities.first().filter(|&&largest| tokens > largest) {
        if !req.may_ring {
            return Err(Refusal::BeamTooLarge { tokens, largest });
        }
        // The smallest ring whose smallest member holds its share.
        return match (2..=capacities.len()).find(|&r| capacities[r - 1] >= ring_share(tokens, r)) {
            Some(size) => Ok(Decision::Ring(RingPlan::new(req.model, size, tokens))),
            None => {
                let most = (1..=capacities.len())
                    .map(|r| if r == 1 { largest } else { capacities[r - 1].saturating_sub(2) * r as u64 })
                    .max()
                    .unwrap_or(0);
                Err(Refusal::TooLarge { tokens, most, groups: capacities.len(), largest })
            }
        };
    }
    let fits = |g: &&GroupView| g.open_for(req.model) && g.kv_capacity >= tokens && !g.held;
    let least = groups.iter().filter(fits).min_by_key(|g| (g.active, g.last_placed));
    let preferred = least.zip(policy.prefix_affinity_margin).and_then(|(least, margin)| {
        groups
            .iter()
            .filter(fits)
            .filter(|g| g.cached_prefix > 0 && g.active <= least.active.saturating_add(margin))
            .max_by_key(|g| (g.cached_prefix, std::cmp::Reverse((g.active, g.last_placed))))
    });
    match preferred.or(least) {
        Some(g) => Ok(Decision::Group(g.id)),
        None => {
            let held = groups.iter().filter(|g| g.model == req.model && g.serving && g.held).count();
            if held > 0 {
                return Err(Refusal::AllHeld { held });
            }
            Err(Refusal::NotServing { forming: groups.iter().filter(|g| g.model == req.model && !g.serving).count() })
        }
    }
}

/// The groups a new ring of `plan` takes: `plan.size` open groups that can each hold the
/// share and no other ring holds, the least busy first (ties: the lowest id). `Ok(None)` when
/// too many are held by other rings now; the caller waits for one to end.
pub(crate) fn choose_ring(groups: &[GroupView], plan: &RingPlan) -> Result<Option<Vec<u64>>, Refusal> {
    let eligible: Vec<&GroupView> = groups.iter().filter(|g| g.open_for(plan.model) && g.kv_capacity >= plan.share).collect();
    if eligible.len() < plan.size {
        return Err(Refusal::RingUnavailable { size: plan.size, share: plan.share });
    }
    let mut free: Vec<&GroupView> = eligible.into_iter().filter(|g| !g.held).collect();
    if free.len() < plan.size {
        return Ok(None);
    }
    free.sort_by_key(|g| (g.active, g.id));
    Ok(Some(free[..plan.size].iter().map(|g| g.id).collect()))
}

/// The open group of `model` with the fewest requests (ties: chosen least recently), among
/// those `usable` allows; for `Embed`, which batches on one group.
pub(crate) fn least_busy(groups: &[GroupView], model: usize, usable: impl Fn(&GroupView) -> bool) -> Option<u64> {
    groups.iter().filter(|g| g.open_for(model) && usable(g)).min_by_key(|g| (g.active, g.last_placed)).map(|g| g.id)
}

#[cfg(test)]
mod tests;
