//! A tensor-parallel group's loop: the thin async shell around its [`Scheduler`].
//!
//! Each iteration asks the scheduler for a [`Plan`], releases what it frees on every rank,
//! sends its step to all ranks at once ([`step_all`]), and hands rank 0's tokens back
//! ([`Scheduler::on_step_result`]). Every rank samples the same token, so the others are
//! checked against rank 0 ([`crate::fanout::agree`]): a mismatch means the group's replicated
//! state has diverged and it is torn down rather than trusted. When the group is lost, every
//! request it holds gets `UNAVAILABLE`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tessera_proto::worker as wpb;
use tokio::sync::{mpsc, watch};

use crate::fanout::{agree, on_every_rank, release_all, same_tokens, Disagreement, Rank};
use crate::metrics::Metrics;
use crate::scheduler::{Effects, LoopConfig, NewSequence, Scheduler};

/// Everything the loop needs; built by the cluster once the group is loaded.
pub(crate) struct GroupLoop {
    pub name: String,
    pub ranks: Vec<Rank>,
    pub requests: mpsc::Receiver<NewSequence>,
    /// Set to `Some(reason)` by the cluster when a rank leaves.
    pub lost: watch::Receiver<Option<String>>,
    pub active: Arc<AtomicUsize>,
    pub config: LoopConfig,
    /// KV tokens the smallest rank can hold: the group's budget (a whole number of blocks).
    pub kv_capacity: u64,
    pub metrics: Arc<Metrics>,
    /// Woken whenever this group finishes a request, for rings waiting for groups to drain.
    pub idle: Arc<tokio::sync::Notify>,
}

impl GroupLoop {
    /// Runs until the group is lost or the cluster drops it; returns why it stopped, and every
    /// request it still held — running, preempted, waiting or queued — in the form to place it
    /// again (the cluster moves them to other groups or ends them with `UNAVAILABLE`).
    pub(crate) async fn run(mut self) -> (String, Vec<NewSequence>) {
        let mut scheduler = Scheduler::new(self.name.clone(), self.config, self.kv_capacity, self.metrics.clone());
        let reason = self.iterate(&mut scheduler).await;
        self.requests.close();
        let mut held = scheduler.evacuate();
        held.extend(std::iter::from_fn(|| self.requests.try_recv().ok()));
        self.active.fetch_sub(held.len(), Ordering::Relaxed);
        self.idle.notify_waiters();
        (reason, held)
    }

    async fn iterate(&mut self, scheduler: &mut Scheduler) -> String {
        loop {
            if scheduler.is_idle() {
                tokio::select! {
                    biased;
                    reason = lost_reason(&mut self.lost) => return reason,
                    next = self.requests.recv() => match next {
                        Some(s) => scheduler.offer(s),
                        None => return "the coordinator is shutting down".into(),
                    },
                }
            }
            let requests = &mut self.requests;
            let plan = scheduler.plan(Instant::now(), &mut || requests.try_recv().ok());
            self.apply(plan.effects).await;
            let Some(step) = plan.step else { continue };
            let request = wpb::StepRequest { group_id: self.name.clone(), step: step.id, seqs: step.seqs, forks: step.forks };
            let sampled = tokio::select! {
                biased;
                reason = lost_reason(&mut self.lost) => Err(reason),
                r = tokio::time::timeout(self.config.step_timeout, step_all(&self.ranks, request)) => {
                    r.unwrap_or_else(|_| Err(format!("a step did not finish within {:?}", self.config.step_timeout)))
                }
            };
            match sampled.and_then(|tokens| scheduler.on_step_result(tokens, Instant::now())) {
                Ok(effects) => self.apply(effects).await,
                Err(reason) => return reason,
            }
        }
    }

    /// Frees what ended on every rank, then tells the requests.
    async fn apply(&self, effects: Effects) {
        if effects.is_empty() {
            return;
        }
        if !effects.ended.is_empty() {
            self.active.fetch_sub(effects.ended.len(), Ordering::Relaxed);
            self.idle.notify_waiters();
        }
        if !effects.release.is_empty() {
            release_all(&self.ranks, &self.name, effects.release).await;
        }
        for ending in effects.ended {
            ending.send(&self.metrics);
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
async fn step_all(ranks: &[Rank], request: wpb::StepRequest) -> Result<Vec<wpb::SampledToken>, String> {
    let results = on_every_rank(ranks, |rank| {
        let mut client = rank.client.clone();
        let request = request.clone();
        async move { client.step(request).await.map(|r| r.into_inner().tokens) }
    })
    .await;
    let errors: Vec<String> =
        ranks.iter().zip(&results).filter_map(|(r, a)| a.as_ref().err().map(|s| format!("worker {}: {}", r.id, s.message()))).collect();
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    agree(results.into_iter().flatten().collect(), |a, b| same_tokens(a, b)).map_err(|d| match d {
        Disagreement::Empty => "the group has no ranks".to_string(),
        Disagreement::Diverged { rank } => format!("rank {rank} sampled different tokens than rank 0; replicated state diverged"),
    })
}
