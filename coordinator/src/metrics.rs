//! Counters of what generations did, for `ClusterStatus` and `/metrics`: finish reasons, the
//! loop guard's actions, output tokens, and time-to-first-token and inter-token-latency
//! histograms. Updated by the group loops and rings, read on demand; relaxed atomics suffice
//! because each counter stands alone.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tessera_proto::v1 as pb;

use crate::histogram::{Histogram, HistogramSnapshot};

/// Time-to-first-token buckets (seconds): vLLM's, from 1 ms to 40 min.
const TTFT_BOUNDS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0];
/// Inter-token-latency buckets (seconds): vLLM's, with finer ones below 10 ms for small models.
const ITL_BOUNDS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];

/// Coordinator-wide counters.
#[derive(Debug)]
pub struct Metrics {
    length: AtomicU64,
    stop: AtomicU64,
    eos: AtomicU64,
    repetition: AtomicU64,
    cancelled: AtomicU64,
    lost: AtomicU64,
    loop_guard_stops: AtomicU64,
    loop_guard_remedies: AtomicU64,
    output_tokens: AtomicU64,
    capacity_refused_tokens: AtomicU64,
    preemptions: AtomicU64,
    deadlines_exceeded: AtomicU64,
    migrations: AtomicU64,
    /// A gauge: tokens of ring requests waiting for their groups now.
    ring_waiting_tokens: AtomicU64,
    /// A gauge: requests waiting for a group that a ring holds now.
    waiting_for_groups: AtomicU64,
    time_to_first_token: Histogram,
    inter_token_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let zero = || AtomicU64::new(0);
        Self {
            length: zero(),
            stop: zero(),
            eos: zero(),
            repetition: zero(),
            cancelled: zero(),
            lost: zero(),
            loop_guard_stops: zero(),
            loop_guard_remedies: zero(),
            output_tokens: zero(),
            capacity_refused_tokens: zero(),
            preemptions: zero(),
            deadlines_exceeded: zero(),
            migrations: zero(),
            ring_waiting_tokens: zero(),
            waiting_for_groups: zero(),
            time_to_first_token: Histogram::new(TTFT_BOUNDS),
            inter_token_latency: Histogram::new(ITL_BOUNDS),
        }
    }
}

/// Tokens counted as waiting for a ring while this lives.
pub struct RingWaiting<'a> {
    metrics: &'a Metrics,
    tokens: u64,
}

impl Drop for RingWaiting<'_> {
    fn drop(&mut self) {
        self.metrics.ring_waiting_tokens.fetch_sub(self.tokens, Ordering::Relaxed);
    }
}

/// A request counted as waiting for a held group while this lives.
pub struct WaitingForGroups<'a> {
    metrics: &'a Metrics,
}

impl Drop for WaitingForGroups<'_> {
    fn drop(&mut self) {
        self.metrics.waiting_for_groups.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Output-side counters for `/metrics`, beyond what [`Metrics::snapshot`] reports.
#[derive(Debug, Clone)]
pub struct TokenMetrics {
    pub output_tokens: u64,
    pub time_to_first_token: HistogramSnapshot,
    pub inter_token_latency: HistogramSnapshot,
}

impl Metrics {
    /// Counts one sampled token of a sequence that arrived at `arrived`, received at `now`;
    /// `previous` is when the sequence's previous token was received (`None` for its first:
    /// then the time to first token is recorded, else the inter-token latency). Returns `now`,
    /// to keep as the next call's `previous`.
    pub fn token(&self, arrived: Instant, previous: Option<Instant>, now: Instant) -> Instant {
        self.output_tokens.fetch_add(1, Ordering::Relaxed);
        match previous {
            None => self.time_to_first_token.record(now.saturating_duration_since(arrived)),
            Some(previous) => self.inter_token_latency.record(now.saturating_duration_since(previous)),
        }
        now
    }

    pub fn token_snapshot(&self) -> TokenMetrics {
        TokenMetrics {
            output_tokens: self.output_tokens.load(Ordering::Relaxed),
            time_to_first_token: self.time_to_first_token.snapshot(),
            inter_token_latency: self.inter_token_latency.snapshot(),
        }
    }

    /// Counts a generation that ended with `finished`.
    pub fn finished(&self, finished: &pb::Finished) {
        let counter = match pb::FinishReason::try_from(finished.reason) {
            Ok(pb::FinishReason::Length) => &self.length,
            Ok(pb::FinishReason::Stop) => &self.stop,
            Ok(pb::FinishReason::Eos) => &self.eos,
            Ok(pb::FinishReason::Repetition) => &self.repetition,
            Ok(pb::FinishReason::Cancelled) => &self.cancelled,
            Ok(pb::FinishReason::Unspecified) | Err(_) => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(report) = &finished.r#loop {
            self.loop_guard_remedies.fetch_add(u64::from(report.remedies), Ordering::Relaxed);
            if report.action == pb::LoopAction::Stop as i32 {
                self.loop_guard_stops.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Counts generations whose client went away.
    pub fn cancelled(&self, n: usize) {
        self.cancelled.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts generations ended by the loss of their group.
    pub fn lost(&self, n: usize) {
        self.lost.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> pb::Counters {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let finished: BTreeMap<&str, u64> = [
            ("LENGTH", read(&self.length)),
            ("STOP", read(&self.stop)),
            ("EOS", read(&self.eos)),
            ("REPETITION", read(&self.repetition)),
            ("CANCELLED", read(&self.cancelled)),
            ("LOST", read(&self.lost)),
        ]
        .into_iter()
        .collect();
        pb::Counters {
            finished: finished.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            loop_guard_stops: read(&self.loop_guard_stops),
            loop_guard_remedies: read(&self.loop_guard_remedies),
            capacity_refused_tokens: read(&self.capacity_refused_tokens),
            preemptions: read(&self.preemptions),
            deadlines_exceeded: read(&self.deadlines_exceeded),
            migrations: read(&self.migrations),
        }
    }

    /// Counts a sequence preempted for want of KV blocks.
    pub fn preempted(&self) {
        self.preemptions.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts requests moved to another group because theirs was lost.
    pub fn migrated(&self, n: usize) {
        self.migrations.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts requests ended because their deadline passed.
    pub fn deadlines_exceeded(&self, n: usize) {
        self.deadlines_exceeded.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts a request of `tokens` KV tokens that no placement could hold.
    pub fn capacity_refused(&self, tokens: u64) {
        self.capacity_refused_tokens.fetch_add(tokens, Ordering::Relaxed);
    }

    /// Tokens of ring requests waiting for their groups now.
    pub fn ring_waiting_tokens(&self) -> u64 {
        self.ring_waiting_tokens.load(Ordering::Relaxed)
    }

    /// Requests waiting now for a group that a ring holds.
    pub fn waiting_for_groups(&self) -> u64 {
        self.waiting_for_groups.load(Ordering::Relaxed)
    }

    /// Counts one more request waiting for a held group until the returned guard is dropped,
    /// unless `limit` already wait: then `None`.
    pub fn wait_for_groups(&self, limit: u64) -> Option<WaitingForGroups<'_>> {
        self.waiting_for_groups.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < limit).then_some(n + 1)).ok()?;
        Some(WaitingForGroups { metrics: self })
    }

    /// Counts `tokens` as waiting for a ring until the returned guard is dropped.
    pub fn ring_waiting(&self, tokens: u64) -> RingWaiting<'_> {
        self.ring_waiting_tokens.fetch_add(tokens, Ordering::Relaxed);
        RingWaiting { metrics: self, tokens }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_waiting_for_held_groups_are_capped_and_counted_while_they_wait() {
        let metrics = Metrics::default();
        let first = metrics.wait_for_groups(2).expect("room for two");
        let second = metrics.wait_for_groups(2).expect("room for two");
        assert!(metrics.wait_for_groups(2).is_none(), "a third is refused");
        assert_eq!(metrics.waiting_for_groups(), 2);
        drop(first);
        let third = metrics.wait_for_groups(2).expect("a place came free");
        drop((second, third));
        assert_eq!(metrics.waiting_for_groups(), 0);
    }
}
