//! A request too long for any one group, served by a sequence-parallel ring of groups.
//!
//! The ring is made for the request: it holds `R` serving groups (no new request is placed on
//! them), waits for what they were running to finish, then joins the equal-`tp_rank` workers of
//! the groups into a ring by RPC (`PrepareRing` on every rank, then `JoinRing` on all at once).
//! The prompt goes to every rank of every member in one `RingStep` (each member cuts its zigzag
//! share); each decode step sends the same `RingStep` to all of them. Every rank samples the same
//! token, which is checked. At the end `LeaveRing` frees the sequence everywhere and the groups
//! take requests again. A client that goes away, or whose deadline (`grpc-timeout`) passes, is
//! noticed before each step, as a group's loop notices it: the ring is left on every rank
//! first, and only then does the stream end (`DEADLINE_EXCEEDED` for a deadline).
//!
//! When a member is lost mid-request (a worker dies, a ring step times out) the request moves,
//! as a group's requests do: it is placed again (on one group if one can now hold it, else on
//! a new ring), prefills its prompt and what it generated, with its sampler resumed where it
//! stood, and its stream goes on as if never interrupted, up to the migration limit.
//!
//! Why holding whole groups keeps this deadlock-free: a worker's ring steps and its group's own
//! steps both block until all of their peers arrive, so two loops that issued them in different
//! orders could wait on each other for ever. A held group issues no steps of its own, each group
//! is in at most one ring, and one task issues a ring's steps in order, so every rank sees the
//! same sequence of collective calls.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tessera_proto::v1 as pb;
use tessera_proto::worker as wpb;
use tonic::Status;

use crate::cluster::{Ask, Cluster, RingLease, RingMember, Route};
use crate::error::CoordinatorError;
use crate::fanout::{agree, Disagreement, Rank};
use crate::model::ServedModel;
use crate::output::SequenceOutput;
use crate::placement::RingPlan;
use crate::scheduler::{NewSequence, Resumed};

/// A request routed to a ring.
pub(crate) struct RingRequest {
    pub seq: u64,
    pub prompt: Vec<u32>,
    pub output: SequenceOutput,
    /// When the client's deadline passes: the request then ends with `DEADLINE_EXCEEDED`.
    pub deadline: Option<Instant>,
    pub request_id: String,
    /// For placing it again after a lost member.
    pub model: Arc<ServedModel>,
    pub max_new_tokens: u32,
    /// The request opted out of prefix caching (kept for a move onto a group).
    pub no_prefix_cache: bool,
    /// How far it got on earlier rings (nothing generated on its first): enough to prefill it
    /// again elsewhere and go on exactly, as a group's moved request does.
    pub progress: Resumed,
}

impl RingRequest {
    /// Why the request must stop before its next step, if it must: its client went away, or
    /// its deadline passed after `generated` tokens.
    fn interrupted(&self, generated: usize) -> Result<(), Stop> {
        if self.output.is_closed() {
            return Err(Stop::Cancelled);
        }
        if crate::deadline::passed(self.deadline, Instant::now()) {
            return Err(Stop::DeadlineExceeded { generated });
        }
        Ok(())
    }
}

/// Why a ring request ended early.
enum Stop {
    /// The client went away.
    Cancelled,
    /// The client's deadline passed after `generated` tokens.
    DeadlineExceeded { generated: usize },
    /// A worker refused or failed; `lost` names the groups that must be re-formed.
    Failed { status: Status, lost: Vec<(u64, String)> },
}

/// Serves `req` on a ring of `plan.size` groups, queueing until that many can be held; moves
/// it when a member is lost.
pub(crate) async fn serve(cluster: Arc<Cluster>, mut plan: RingPlan, mut req: RingRequest) {
    loop {
        match serve_once(&cluster, plan, req).await {
            None => return,
            Some((next_plan, moved)) => (plan, req) = (next_plan, moved),
        }
    }
}

/// One ring's life for `req`; the next ring when it had to move to one.
async fn serve_once(cluster: &Arc<Cluster>, plan: RingPlan, mut req: RingRequest) -> Option<(RingPlan, RingRequest)> {
    let lease = match hold(cluster, plan, &req).await {
        Ok(Held::Lease(lease)) => lease,
        Ok(Held::Cancelled) => {
            cluster.metrics.cancelled(1);
            return None;
        }
        // Nothing was sent to any worker yet, so there is nothing to free.
        Ok(Held::Expired) => {
            cluster.metrics.deadlines_exceeded(1);
            req.output.end(Err(crate::deadline::exceeded(req.progress.outputs.len())), &cluster.metrics);
            return None;
        }
        Err(e) => {
            req.output.end(Err(e.into()), &cluster.metrics);
            return None;
        }
    };
    let ring_id = format!("ring-{}", lease.ring);
    let workers: Vec<String> = lease.members.iter().flat_map(|m| m.ranks.iter().map(|w| w.id.clone())).collect();
    let tp = lease.members.first().map_or(0, |m| m.ranks.len()) as u32;
    let placement = pb::Placement { tp, sp: lease.members.len() as u32, workers };
    // A moved request told its client where it started, once.
    if req.output.migrations() == 0 {
        req.output.started(req.request_id.clone(), req.prompt.len() as u32, placement);
    }
    tracing::info!(request_id = %req.request_id, ring = %ring_id, members = lease.members.len(), prompt_tokens = req.prompt.len(), "ring formed for a long request");
    let ring = Ring { lease: &lease, id: ring_id, timeout: cluster.step_timeout(), metrics: &cluster.metrics };
    let result = ring.run(&mut req).await;
    ring.leave().await;
    // The groups take requests again before the client hears the end, as a group releases a
    // sequence before sending its end: a client that sees its end can send its next request at
    // once. Groups a failure lost are torn down first, so nothing new is placed on them.
    if let Err(Stop::Failed { lost, .. }) = &result {
        for (group, reason) in lost {
            cluster.fail_group_by_id(*group, reason.clone());
        }
    }
    drop(lease);
    match result {
        Ok(finished) => req.output.end(Ok(finished), &cluster.metrics),
        Err(Stop::Cancelled) => cluster.metrics.cancelled(1),
        Err(Stop::DeadlineExceeded { generated }) => {
            cluster.metrics.deadlines_exceeded(1);
            req.output.end(Err(crate::deadline::exceeded(generated)), &cluster.metrics);
        }
        Err(Stop::Failed { status, lost }) if !lost.is_empty() && !req.output.is_closed() => return move_on(cluster, req, status).await,
        Err(Stop::Failed { status, .. }) => {
            cluster.metrics.lost(1);
            req.output.end(Err(status), &cluster.metrics);
        }
    }
    None
}

/// How long a request whose ring was lost waits for the cluster to hold it again: the lost
/// ring's surviving groups are reset and formed anew, which takes a moment.
const MOVE_PATIENCE: Duration = Duration::from_secs(60);

/// Places a request whose ring was lost again: on one group when one can now hold it, else on
/// a new ring (returned, to be served next), waiting up to [`MOVE_PATIENCE`] for the groups
/// to form. Past the migration limit, or with no room, it ends `UNAVAILABLE` saying why.
async fn move_on(cluster: &Arc<Cluster>, mut req: RingRequest, status: Status) -> Option<(RingPlan, RingRequest)> {
    let limit = cluster.migration_limit();
    let unavailable = |why: String| Status::unavailable(format!("{}; {why}", status.message()));
    if req.output.migrations() >= limit {
        cluster.metrics.lost(1);
        let why = format!("it moved {} times, the limit", req.output.migrations());
        req.output.end(Err(unavailable(why)), &cluster.metrics);
        return None;
    }
    let done = req.progress.outputs.len();
    let remaining = req.max_new_tokens.saturating_sub(done as u32);
    let context: Vec<u32> = req.prompt.iter().chain(&req.progress.outputs).copied().collect();
    let give_up = tokio::time::Instant::now() + MOVE_PATIENCE;
    let mut serving = cluster.serving_groups();
    let route = loop {
        serving.borrow_and_update();
        match cluster.place(&Ask { model: &req.model, adapter: None, prompt: &context, max_new_tokens: remaining, num_beams: 1 }) {
            Ok((route, _)) => break route,
            Err(e) => {
                let changed = tokio::select! {
                    changed = serving.changed() => changed.is_ok(),
                    () = tokio::time::sleep_until(give_up) => false,
                    () = req.output.closed() => false,
                };
                if req.output.is_closed() {
                    cluster.metrics.cancelled(1);
                    return None;
                }
                if !changed {
                    cluster.metrics.lost(1);
                    req.output.end(Err(unavailable(format!("it could not move: {e}"))), &cluster.metrics);
                    return None;
                }
            }
        }
    };
    req.output.migrated();
    cluster.metrics.migrated(1);
    match route {
        Route::Ring(plan) => {
            tracing::info!(request_id = %req.request_id, ring = plan.size, generated = done, "ring request moves to a new ring");
            Some((plan, req))
        }
        Route::Group(placement) => {
            tracing::info!(request_id = %req.request_id, group = %placement.group, generated = done, "ring request moves to a group");
            let resume = req.progress;
            let reserve = (req.prompt.len() as u64) + u64::from(req.max_new_tokens);
            let seq = NewSequence {
                seq: req.seq,
                prompt: req.prompt,
                reserve,
                deadline: req.deadline,
                output: req.output,
                beam: None,
                resume: Some(resume),
                no_prefix_cache: req.no_prefix_cache,
                adapter: None,
            };
            if let Err(refused) = placement.offer(seq) {
                let (seq, error) = *refused;
                cluster.metrics.lost(1);
                seq.output.end(Err(unavailable(format!("it could not move: {error}"))), &cluster.metrics);
            }
            None
        }
    }
}

/// How waiting for a ring's groups ended.
enum Held {
    Lease(RingLease),
    /// The client went away while waiting.
    Cancelled,
    /// The client's deadline passed while waiting.
    Expired,
}

/// Resolves when `deadline` passes; never without one.
pub(crate) async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Holds the ring's groups and waits for them to finish what they run, unless the client goes
/// away or its deadline passes first.
async fn hold(cluster: &Arc<Cluster>, plan: RingPlan, req: &RingRequest) -> Result<Held, CoordinatorError> {
    let _waiting = cluster.metrics.ring_waiting(plan.tokens);
    let output = &req.output;
    // Wake-ups are registered before each check, so none between the check and the wait is lost.
    let lease = loop {
        let woken = cluster.idle.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if let Some(lease) = cluster.hold_ring(plan)? {
            break lease;
        }
        tokio::select! {
            _ = &mut woken => {}
            _ = output.closed() => return Ok(Held::Cancelled),
            _ = until(req.deadline) => return Ok(Held::Expired),
        }
    };
    loop {
        let woken = cluster.idle.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        if lease.members.iter().all(|m| m.active.load(Ordering::Relaxed) == 0) {
            return Ok(Held::Lease(lease));
        }
        tokio::select! {
            _ = &mut woken => {}
            _ = output.closed() => return Ok(Held::Cancelled),
            _ = until(req.deadline) => return Ok(Held::Expired),
        }
    }
}

struct Ring<'a> {
    lease: &'a RingLease,
    id: String,
    timeout: Duration,
    metrics: &'a crate::metrics::Metrics,
}

impl Ring<'_> {
    async fn run(&self, req: &mut RingRequest) -> Result<pb::Finished, Stop> {
        let mut generated = req.progress.outputs.len();
        req.interrupted(generated)?;
        self.join().await?;
        req.interrupted(generated)?;
        // The prompt, and on a later ring what was generated before, with the sampler resumed.
        let p = &mut req.progress;
        let mut tokens = req.prompt.clone();
        tokens.extend_from_slice(&p.outputs);
        let mut sampling = p.next.clone().unwrap_or_else(|| p.in_force.clone());
        if !p.outputs.is_empty() {
            sampling.resume = Some(wpb::Resume { prompt_len: req.prompt.len() as u32, rng_draws: p.rng_draws });
        }
        let prefill = wpb::RingPrefill { prompt_len: tokens.len() as u32, tokens: Vec::new(), sampling: Some(sampling), prompt: tokens };
        let mut position = prefill.prompt_len;
        let mut answer = self.step(req.seq, wpb::ring_step_request::Step::Prefill(prefill)).await?;
        if let Some(applied) = p.next.take() {
            p.in_force = applied;
        }
        loop {
            req.progress.rng_draws = answer.rng_draws;
            let accepted = req
                .output
                .accept(answer.token, answer.logprob, &answer.top, self.metrics, Instant::now())
                .map_err(|status| Stop::Failed { status, lost: Vec::new() })?;
            if let Some(finished) = accepted.finished {
                return Ok(finished);
            }
            req.progress.outputs.push(answer.token);
            generated += 1;
            req.interrupted(generated)?;
            req.progress.next = accepted.sampling.clone();
            let decode = wpb::RingDecode { token: answer.token, position, append_member: None, sampling: accepted.sampling };
            answer = self.step(req.seq, wpb::ring_step_request::Step::Decode(decode)).await?;
            if let Some(applied) = req.progress.next.take() {
                req.progress.in_force = applied;
            }
            position += 1;
        }
    }

    /// `PrepareRing` on every rank, then `JoinRing` on all of them at once.
    async fn join(&self) -> Result<(), Stop> {
        let members = self.lease.members.len() as u32;
        let prepares = self.ranks().map(|(m, g, w)| {
            let mut client = w.client.clone();
            let request = wpb::PrepareRingRequest { group_id: g.name.clone(), ring_id: self.id.clone(), member: m as u32, members };
            async move { client.prepare_ring(request).await.map(|r| r.into_inner().ring_address) }
        });
        let addresses = self.gather(join_all(prepares).await, "prepare the ring")?;
        // Rank t of member m is at index m * tp + t.
        let tp = self.lease.members.first().map_or(0, |m| m.ranks.len());
        let joins = self.ranks().map(|(_, g, w)| {
            let t = g.ranks.iter().position(|x| x.id == w.id).unwrap_or(0);
            let peers = (0..self.lease.members.len()).map(|m| addresses[m * tp + t].clone()).collect();
            let mut client = w.client.clone();
            let request = wpb::JoinRingRequest { group_id: g.name.clone(), ring_id: self.id.clone(), peers };
            async move { client.join_ring(request).await.map(|_| ()) }
        });
        self.gather(join_all(joins).await, "join the ring")?;
        Ok(())
    }

    /// One ring step on every rank of every member; all must sample the same token.
    async fn step(&self, seq: u64, step: wpb::ring_step_request::Step) -> Result<wpb::RingStepResponse, Stop> {
        let calls = self.ranks().map(|(_, g, w)| {
            let mut client = w.client.clone();
            let request =
                wpb::RingStepRequest { group_id: g.name.clone(), ring_id: self.id.clone(), seq_id: seq, step: Some(step.clone()) };
            async move { client.ring_step(request).await.map(|r| r.into_inner()) }
        });
        let answers = match tokio::time::timeout(self.timeout, join_all(calls)).await {
            Ok(answers) => self.gather(answers, "run a ring step")?,
            Err(_) => {
                let reason = format!("a ring step did not finish within {:?}", self.timeout);
                return Err(Stop::Failed { status: Status::unavailable(format!("{reason}; retry")), lost: self.all_lost(&reason) });
            }
        };
        agree(answers, |a, b| a.token == b.token).map_err(|d| {
            let reason = match d {
                Disagreement::Empty => return Stop::Failed { status: Status::internal("the ring has no ranks"), lost: Vec::new() },
                Disagreement::Diverged { rank } => {
                    format!("rank {rank} of the ring sampled a different token than rank 0; replicated state diverged")
                }
            };
            Stop::Failed { status: Status::internal(reason.clone()), lost: self.all_lost(&reason) }
        })
    }

    /// Frees the ring on every rank; failures only matter to groups being torn down anyway.
    async fn leave(&self) {
        let leaves = self.ranks().map(|(_, g, w)| {
            let mut client = w.client.clone();
            let request = wpb::LeaveRingRequest { group_id: g.name.clone(), ring_id: self.id.clone() };
            async move { (w.id.clone(), client.leave_ring(request).await) }
        });
        for (id, result) in join_all(leaves).await {
            if let Err(status) = result {
                tracing::debug!(ring = %self.id, worker = %id, error = %status.message(), "leave ring failed");
            }
        }
    }

    /// Every rank as (member index, member, worker), member by member, rank by rank.
    fn ranks(&self) -> impl Iterator<Item = (usize, &RingMember, &Rank)> {
        self.lease.members.iter().enumerate().flat_map(|(m, g)| g.ranks.iter().map(move |w| (m, g, w)))
    }

    /// The answers of every rank, or the first failure. A refusal (bad input, no room, a peer
    /// that refused) leaves the groups serving; anything else means a worker may have lost its
    /// state, so the member groups are re-formed.
    fn gather<T>(&self, results: Vec<Result<T, Status>>, what: &str) -> Result<Vec<T>, Stop> {
        let mut out = Vec::with_capacity(results.len());
        let mut failure: Option<Stop> = None;
        for ((_, g, w), r) in self.ranks().zip(results) {
            match r {
                Ok(v) => out.push(v),
                Err(status) if failure.is_none() => {
                    let message = format!("worker {} of group {} could not {what}: {}", w.id, g.name, status.message());
                    use tonic::Code;
                    let refused =
                        matches!(status.code(), Code::InvalidArgument | Code::ResourceExhausted | Code::Aborted | Code::FailedPrecondition);
                    let lost = if refused { Vec::new() } else { self.all_lost(&message) };
                    let status =
                        if refused { Status::new(status.code(), message) } else { Status::unavailable(format!("{message}; retry")) };
                    failure = Some(Stop::Failed { status, lost });
                }
                Err(_) => {}
            }
        }
        match failure {
            Some(stop) => Err(stop),
            None => Ok(out),
        }
    }

    fn all_lost(&self, reason: &str) -> Vec<(u64, String)> {
        self.lease.members.iter().map(|m| (m.group, format!("ring {} failed: {reason}", self.id))).collect()
    }
}
