//! Carrying out placement: a snapshot of the groups goes to [`crate::placement`], and its
//! decision becomes a queue to submit to, a lease on a ring's groups, or an `Embed` target.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tonic::Status;

use super::{group_name, Cluster, State};
use crate::error::CoordinatorError;
use crate::fanout::Rank;
use crate::model::ServedModel;
use crate::placement::{self, Decision, PlacementRequest, Policy, RingPlan};
use crate::prefix_affinity::prompt_blocks;
use crate::scheduler::NewSequence;

/// Where a request goes.
pub(crate) enum Route {
    Group(Placement),
    Ring(RingPlan),
}

/// What placement is asked to place: a request of `prompt` for `model` (and `adapter`) that may
/// generate `max_new_tokens`, with `num_beams` beams (1 for sampling).
#[derive(Clone, Copy)]
pub(crate) struct Ask<'a> {
    pub model: &'a ServedModel,
    pub adapter: Option<&'a str>,
    pub prompt: &'a [u32],
    pub max_new_tokens: u32,
    pub num_beams: usize,
}

/// Why [`Cluster::try_place`] placed nothing: the client's error, and when the reason is that
/// rings hold every group that could take the request, how many they hold.
pub(crate) struct Refused {
    error: CoordinatorError,
    held: Option<usize>,
}

impl Refused {
    /// How many groups rings hold, when that is why.
    pub(crate) fn held(&self) -> Option<usize> {
        self.held
    }

    pub(crate) fn into_error(self) -> CoordinatorError {
        self.error
    }
}

impl From<CoordinatorError> for Refused {
    fn from(error: CoordinatorError) -> Self {
        Refused { error, held: None }
    }
}

/// A group chosen for a request.
pub(crate) struct Placement {
    pub group: String,
    pub tp: u32,
    pub workers: Vec<String>,
    submit: mpsc::Sender<NewSequence>,
    active: Arc<AtomicUsize>,
}

impl Placement {
    /// Queues the sequence on the group; fails at once when the queue is full.
    pub(crate) fn submit(&self, seq: NewSequence) -> Result<(), CoordinatorError> {
        submit_to(&self.group, &self.submit, &self.active, seq)
    }

    /// [`Placement::submit`], handing a refused sequence back with the reason.
    pub(crate) fn offer(&self, seq: NewSequence) -> Result<(), Box<(NewSequence, CoordinatorError)>> {
        offer_to(&self.group, &self.submit, &self.active, seq)
    }
}

/// Queues `seq` on a group's loop, counted active until the loop ends it; refuses at once when
/// the queue is full (`RESOURCE_EXHAUSTED`) or the loop has stopped (`UNAVAILABLE`).
fn submit_to(group: &str, queue: &mpsc::Sender<NewSequence>, active: &AtomicUsize, seq: NewSequence) -> Result<(), CoordinatorError> {
    offer_to(group, queue, active, seq).map_err(|refused| refused.1)
}

/// [`submit_to`], handing a refused sequence back with the reason.
fn offer_to(
    group: &str,
    queue: &mpsc::Sender<NewSequence>,
    active: &AtomicUsize,
    seq: NewSequence,
) -> Result<(), Box<(NewSequence, CoordinatorError)>> {
    active.fetch_add(1, Ordering::Relaxed);
    queue.try_send(seq).map_err(|e| {
        active.fetch_sub(1, Ordering::Relaxed);
        let error = match &e {
            mpsc::error::TrySendError::Full(_) => CoordinatorError::ResourceExhausted(format!(
                "group {group} has {} requests waiting, its limit; retry later",
                queue.max_capacity()
            )),
            mpsc::error::TrySendError::Closed(_) => CoordinatorError::Unavailable(format!("group {group} stopped serving; retry")),
        };
        Box::new((e.into_inner(), error))
    })
}

/// One ring member: a serving group and its ranks.
pub(crate) struct RingMember {
    pub group: u64,
    pub name: String,
    pub ranks: Vec<Rank>,
    pub active: Arc<AtomicUsize>,
}

/// Groups held for a ring; they take new requests again when this is dropped.
pub(crate) struct RingLease {
    pub ring: u64,
    pub members: Vec<RingMember>,
    cluster: Arc<Cluster>,
}

impl Drop for RingLease {
    fn drop(&mut self) {
        let mut state = self.cluster.lock();
        for m in &self.members {
            if let Some(g) = state.groups.get_mut(&m.group) {
                if g.held_by == Some(self.ring) {
                    g.held_by = None;
                }
            }
        }
        drop(state);
        self.cluster.idle.notify_waiters();
    }
}

impl Cluster {
    /// `model`'s index in the cluster's list, unless it failed to load.
    fn servable_index(&self, state: &State, model: &ServedModel) -> Result<usize, CoordinatorError> {
        if !self.standing.is_leading() {
            return Err(self.standing.refusal());
        }
        let index = self
            .models
            .iter()
            .position(|m| m.name() == model.name())
            .ok_or_else(|| CoordinatorError::Internal(format!("model {:?} is not in the cluster's list", model.name())))?;
        match state.failed.get(&index) {
            Some(reason) => {
                Err(CoordinatorError::ModelFailed(format!("model {:?} failed to load and is not served: {reason}", model.name())))
            }
            None => Ok(index),
        }
    }

    /// Where a request of `prompt` that may generate `max_new_tokens` with `num_beams` beams
    /// goes ([`placement::place`]); the request's KV reservation comes back with the route. A
    /// request placed on a group is remembered there by its prompt's blocks, for prefix
    /// affinity. Every group that could hold it being held by a ring is `UNAVAILABLE` here;
    /// [`Cluster::place_or_wait`] waits instead.
    pub(crate) fn place(&self, ask: &Ask<'_>) -> Result<(Route, PlacementRequest), CoordinatorError> {
        self.try_place(ask).map_err(|refused| refused.error)
    }

    /// [`Cluster::place`], but while rings hold every group that could take the request it
    /// waits, like a request queued on a busy group, for a ring to end (at most `queue_depth`
    /// requests per held group wait; past that `RESOURCE_EXHAUSTED`). The client's deadline
    /// ends the wait with `DEADLINE_EXCEEDED`; a client that goes away drops the wait.
    pub(crate) async fn place_or_wait(
        &self,
        ask: &Ask<'_>,
        deadline: Option<std::time::Instant>,
    ) -> Result<(Route, PlacementRequest), CoordinatorError> {
        let model = ask.model;
        let mut waiting = None;
        loop {
            // Registered before the check, so a ring ending between the check and the wait
            // still wakes this one.
            let woken = self.idle.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            match self.try_place(ask) {
                Ok(placed) => return Ok(placed),
                Err(Refused { held: Some(held), error }) => {
                    if waiting.is_none() {
                        let limit = (self.config.queue_depth * held) as u64;
                        waiting = Some(self.metrics.wait_for_groups(limit).ok_or_else(|| {
                            CoordinatorError::ResourceExhausted(format!(
                                "{limit} requests already wait for the {held} groups of model {:?} that rings hold, its limit; \
                                 retry later ({error})",
                                model.name()
                            ))
                        })?);
                    }
                }
                Err(refused) => return Err(refused.error),
            }
            tokio::select! {
                _ = &mut woken => {}
                () = crate::ring::until(deadline) => {
                    self.metrics.deadlines_exceeded(1);
                    return Err(CoordinatorError::DeadlineExceeded(format!(
                        "the deadline passed while every group of model {:?} that can hold this request ran a long request on a \
                         sequence-parallel ring",
                        model.name()
                    )));
                }
            }
        }
    }

    /// [`Cluster::place`], saying apart the refusal that [`Cluster::place_or_wait`] waits out.
    pub(crate) fn try_place(&self, ask: &Ask<'_>) -> Result<(Route, PlacementRequest), Refused> {
        let Ask { model, adapter, prompt, max_new_tokens, num_beams } = *ask;
        let mut state = self.lock();
        let index = self.servable_index(&state, model)?;
        let request = PlacementRequest::new(index, prompt.len(), max_new_tokens, num_beams);
        let blocks = match self.config.prefix_affinity_margin {
            Some(_) => prompt_blocks(index, adapter, prompt),
            None => Vec::new(),
        };
        let policy =
            Policy { ring_prefill_tokens: self.config.ring_prefill_tokens, prefix_affinity_margin: self.config.prefix_affinity_margin };
        let decision = placement::place(&self.views_for(&state, &blocks), &request, policy).map_err(|refusal| {
            if matches!(refusal, placement::Refusal::TooLarge { .. } | placement::Refusal::BeamTooLarge { .. }) {
                self.metrics.capacity_refused(request.kv_tokens);
            }
            let held = match refusal {
                placement::Refusal::AllHeld { held } => Some(held),
                _ => None,
            };
            Refused { error: refusal.into_error(model.name(), model.spec.tp, state.workers.len()), held }
        })?;
        let route = match decision {
            Decision::Ring(plan) => Route::Ring(plan),
            Decision::Group(id) => {
                state.prefixes.record(id, &blocks);
                Route::Group(self.placement_on(&state, id)?)
            }
        };
        Ok((route, request))
    }

    /// The serving group `id` as a place to submit to, marked as chosen now (so ties go
    /// round-robin).
    fn placement_on(&self, state: &State, id: u64) -> Result<Placement, CoordinatorError> {
        let entry = state.groups.get(&id).ok_or_else(|| CoordinatorError::Internal(format!("group {id} vanished")))?;
        let serving = entry.serving.as_ref().ok_or_else(|| CoordinatorError::Internal(format!("group {id} is not serving")))?;
        serving.last_placed.store(self.placements.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        Ok(Placement {
            group: group_name(id),
            tp: entry.workers.len() as u32,
            workers: entry.workers.clone(),
            submit: serving.submit.clone(),
            active: serving.active.clone(),
        })
    }

    /// Moves the requests a lost group of `model` held to its other groups, each to continue
    /// where it stopped (a sampled sequence re-prefills its prompt and outputs with its sampler
    /// resumed; a beam search starts again, having streamed nothing). A request past the
    /// migration limit, or that no group can take now, ends with `UNAVAILABLE` saying why; one
    /// whose client has gone is dropped.
    pub(crate) fn migrate(&self, model: usize, lost: &str, reason: &str, held: Vec<NewSequence>) {
        let (mut moved, mut ended, mut cancelled) = (0, 0, 0);
        for s in held {
            if s.output.is_closed() {
                cancelled += 1;
                continue;
            }
            match self.move_to_another_group(model, lost, s) {
                Ok(()) => moved += 1,
                Err(refused) => {
                    let (s, why) = *refused;
                    ended += 1;
                    let status = Status::unavailable(format!("worker group {lost} was lost mid-request: {reason}; {why}; retry"));
                    s.output.end(Err(status), &self.metrics);
                }
            }
        }
        self.metrics.migrated(moved);
        self.metrics.lost(ended);
        self.metrics.cancelled(cancelled);
    }

    /// Queues `s` on the least busy group of `model` that can hold it; gives it back with the
    /// reason when it may not move again or no group can take it now.
    fn move_to_another_group(&self, model: usize, lost: &str, mut s: NewSequence) -> Result<(), Box<(NewSequence, String)>> {
        if s.output.migrations() >= self.config.migration_limit {
            let why = format!("it moved {} times, the limit", s.output.migrations());
            return Err(Box::new((s, why)));
        }
        let state = self.lock();
        let request = PlacementRequest { model, kv_tokens: s.reserve, prompt_len: 0, may_ring: false };
        let id = match placement::place(&self.views(&state), &request, Policy::default()) {
            Ok(Decision::Group(id)) => id,
            Ok(Decision::Ring(_)) => return Err(Box::new((s, "no other group can hold it now".into()))),
            Err(refusal) => {
                let m = &self.models[model];
                let why = format!("it could not move: {}", refusal.into_error(m.name(), m.spec.tp, state.workers.len()));
                return Err(Box::new((s, why)));
            }
        };
        let placement = match self.placement_on(&state, id) {
            Ok(p) => p,
            Err(e) => return Err(Box::new((s, e.to_string()))),
        };
        s.output.migrated();
        let (seq, migrations) = (s.seq, s.output.migrations());
        offer_to(&placement.group, &placement.submit, &placement.active, s).map_err(|refused| {
            let (s, error) = *refused;
            Box::new((s, format!("it could not move: {error}")))
        })?;
        tracing::info!(seq, from = lost, to = %placement.group, migrations, "request moved to another group");
        Ok(())
    }

    /// Holds the groups [`placement::choose_ring`] picks for a new ring, or returns `Ok(None)`
    /// when too many are held by other rings now. Held groups take no new requests; the ring
    /// waits for what they run to finish.
    pub(crate) fn hold_ring(self: &Arc<Self>, plan: RingPlan) -> Result<Option<RingLease>, CoordinatorError> {
        let mut state = self.lock();
        let chosen = placement::choose_ring(&self.views(&state), &plan).map_err(|refusal| {
            let model = &self.models[plan.model];
            refusal.into_error(model.name(), model.spec.tp, state.workers.len())
        })?;
        let Some(chosen) = chosen else { return Ok(None) };
        let ring = self.next_ring.fetch_add(1, Ordering::Relaxed);
        let mut members = Vec::with_capacity(chosen.len());
        for id in chosen {
            let Some(entry) = state.groups.get(&id) else { continue };
            let ranks = entry
                .workers
                .iter()
                .filter_map(|w| state.workers.get(w).map(|s| Rank { id: w.clone(), client: s.client.clone() }))
                .collect();
            let active = entry.serving.as_ref().map(|s| s.active.clone()).unwrap_or_default();
            members.push(RingMember { group: id, name: group_name(id), ranks, active });
            if let Some(entry) = state.groups.get_mut(&id) {
                entry.held_by = Some(ring);
            }
        }
        Ok(Some(RingLease { ring, members, cluster: self.clone() }))
    }

    /// The serving group of encoder `model` for one `Embed` call: the least busy (ties: the one
    /// chosen least recently), counted busy until the returned target is dropped.
    pub(crate) fn embed_target(&self, model: &ServedModel) -> Result<crate::embed::EmbedTarget, CoordinatorError> {
        let state = self.lock();
        let index = self.servable_index(&state, model)?;
        let has_batcher =
            |g: &placement::GroupView| state.groups.get(&g.id).and_then(|e| e.serving.as_ref()).is_some_and(|s| s.embed.is_some());
        let target = placement::least_busy(&self.views(&state), index, has_batcher).and_then(|id| {
            let serving = state.groups.get(&id)?.serving.as_ref()?;
            let batcher = serving.embed.clone()?;
            serving.last_placed.store(self.placements.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
            Some(crate::embed::EmbedTarget::new(batcher, serving.active.clone()))
        });
        target.ok_or_else(|| CoordinatorError::Unavailable(format!("model {:?} has no serving group yet; retry shortly", model.name())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Req;

    #[test]
    fn a_full_queue_refuses_at_once_and_does_not_count_the_request() {
        let (queue, _loop_side) = mpsc::channel(1);
        let active = AtomicUsize::new(0);
        let (first, _c1) = Req::new(1, 4, 4).build();
        let (second, _c2) = Req::new(2, 4, 4).build();
        assert!(submit_to("g1", &queue, &active, first).is_ok());
        let refused = submit_to("g1", &queue, &active, second).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("group g1 has 1 requests waiting, its limit"), "{refused}");
        assert_eq!(active.load(Ordering::Relaxed), 1, "only the queued request is counted");
    }

    #[test]
    fn a_stopped_group_refuses_as_unavailable() {
        let (queue, loop_side) = mpsc::channel(4);
        drop(loop_side);
        let active = AtomicUsize::new(0);
        let (seq, _client) = Req::new(1, 4, 4).build();
        let refused = submit_to("g2", &queue, &active, seq).err();
        assert!(matches!(refused, Some(CoordinatorError::Unavailable(_))), "{refused:?}");
        assert_eq!(active.load(Ordering::Relaxed), 0);
    }
}
