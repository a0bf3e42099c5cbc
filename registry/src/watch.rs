//! Membership events and the stream that delivers them.
//!
//! Every [`WorkerWatch`] starts with a [`MembershipEvent::Snapshot`]; after it come `Up` and
//! `Down` events in registry order. Whenever the backend cannot prove that no event was missed
//! (etcd compacted the history the watch needed, an in-memory watcher fell too far behind) it
//! sends a fresh `Snapshot` instead, so a consumer that replaces its view on every snapshot and
//! applies `Up`/`Down` in between always converges on the registry's state.

use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::record::WorkerRecord;

/// A change of cluster membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipEvent {
    /// The complete set of live workers. Replaces everything the consumer knew.
    Snapshot(Vec<WorkerRecord>),
    /// A worker registered, or re-wrote its record; upsert it.
    Up(WorkerRecord),
    /// A worker left: its lease was revoked or expired. Mark it dead at once.
    Down(String),
}

/// Stream of membership events, fed by a background task that stops when this is dropped.
#[derive(Debug)]
pub struct WorkerWatch {
    events: mpsc::Receiver<MembershipEvent>,
    driver: AbortHandle,
}

impl WorkerWatch {
    pub(crate) fn new(events: mpsc::Receiver<MembershipEvent>, driver: AbortHandle) -> Self {
        Self { events, driver }
    }

    /// The next event. `None` means the watch ended for good (its registry was dropped);
    /// start a new one.
    pub async fn next(&mut self) -> Option<MembershipEvent> {
        self.events.recv().await
    }
}

impl Drop for WorkerWatch {
    fn drop(&mut self) {
        // Without this the driver would notice only at its next send, holding an etcd watch
        // (or a broadcast subscription) open until the next membership change.
        self.driver.abort();
    }
}
