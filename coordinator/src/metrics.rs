//! Counters of what generations did, for `ClusterStatus`: finish reasons and the loop guard's
//! actions. Updated by the group loops, read on demand; relaxed atomics suffice because each
//! counter stands alone.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use tessera_proto::v1 as pb;

/// Coordinator-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    length: AtomicU64,
    stop: AtomicU64,
    eos: AtomicU64,
    repetition: AtomicU64,
    cancelled: AtomicU64,
    lost: AtomicU64,
    loop_guard_stops: AtomicU64,
    loop_guard_remedies: AtomicU64,
}

impl Metrics {
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
        }
    }
}
