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

use crate::cluster::{Cluster, RingLease, RingMember};
use crate::error::CoordinatorError;
use crate::fanout::{agree, Disagreement, Rank};
use crate::output::SequenceOutput;
use crate::placement::RingPlan;

/// A request routed to a ring.
pub(crate) struct RingRequest {
    pub seq: u64,
    pub prompt: Vec<u32>,
    pub output: SequenceOutput,
    /// When the client's deadline passes: the request then ends with `DEADLINE_EXCEEDED`.
    pub deadline: Option<Instant>,
    pub request_id: String,
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

/// Serves `req` on a ring of `plan.size` groups, queueing until that many can be held.
pub(crate) async fn serve(cluster: Arc<Cluster>, plan: RingPlan, mut req: RingRequest) {
    let lease = match hold(&cluster, plan, &req).await {
        Ok(Held::Lease(lease)) => lease,
        Ok(Held::Cancelled) => {
            cluster.metrics.cancelled(1);
            return;
        }
        // Nothing was sent to any worker yet, so there is nothing to free.
        Ok(Held::Expired) => {
            cluster.metrics.deadlines_exceeded(1);
            req.output.end(Err(crate::deadline::exceeded(0)), &cluster.metrics);
            return;
        }
        Err(e) => {
            req.output.end(Err(e.into()), &cluster.metrics);
            return;
        }
    };
    let ring_id = format!("ring-{}", lease.ring);
    let workers: Vec<String> = lease.members.iter().flat_map(|m| m.ranks.iter().map(|w| w.id.clone())).collect();
    let tp = lease.members.first().map_or(0, |m| m.ranks.len()) as u32;
    let placement = pb::Placement { tp, sp: lease.members.len() as u32, workers };
    req.output.started(req.request_id.clone(), req.prompt.len() as u32, placement);
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
        Err(Stop::Failed { status, .. }) => {
            cluster.metrics.lost(1);
            req.output.end(Err(status), &cluster.metrics);
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
async fn until(deadline: Option<Instant>) {
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
        req.interrupted(0)?;
        self.join().await?;
        req.interrupted(0)?;
        let prefill = wpb::RingPrefill {
            prompt_len: req.prompt.len() as u32,
            tokens: Vec::new(),
            sampling: Some(req.output.base_sampling().clone()),
            prompt: req.prompt.clone(),
        };
        let mut answer = self.step(req.seq, wpb::ring_step_request::Step::Prefill(prefill)).await?;
        let mut position = req.prompt.len() as u32;
        let mut generated = 0;
        loop {
            let accepted = req
                .output
                .accept(answer.token, answer.logprob, &answer.top, self.metrics, Instant::now())
                .map_err(|status| Stop::Failed { status, lost: Vec::new() })?;
            if let Some(finished) = accepted.finished {
                return Ok(finished);
            }
            generated += 1;
            req.interrupted(generated)?;
            let sampling = accepted.sampling;
            let decode = wpb::RingDecode { token: answer.token, position, append_member: None, sampling };
            answer = self.step(req.seq, wpb::ring_step_request::Step::Decode(decode)).await?;
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
