//! Helpers shared by the test modules: records, and waiting on watches with a timeout.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tessera_registry::{MembershipEvent, WorkerRecord, WorkerWatch};

/// A worker record whose fields all derive from `id`, so tests can rebuild it to compare.
pub fn record(id: &str) -> WorkerRecord {
    WorkerRecord {
        id: id.to_string(),
        address: format!("127.0.0.1:{}", 50_000 + id.len()),
        device: "cpu".to_string(),
        memory_bytes: 1 << 30,
        kv_capacity_tokens: 4096,
        version: "test".to_string(),
        draining: false,
        group: None,
    }
}

/// The next event, or an error after `within`.
pub async fn next_event(watch: &mut WorkerWatch, within: Duration) -> anyhow::Result<MembershipEvent> {
    tokio::time::timeout(within, watch.next())
        .await
        .map_err(|_| anyhow!("no membership event within {within:?}"))?
        .context("the watch ended")
}

/// The next event, which must be a snapshot; its records sorted by id.
pub async fn next_snapshot(watch: &mut WorkerWatch, within: Duration) -> anyhow::Result<Vec<WorkerRecord>> {
    match next_event(watch, within).await? {
        MembershipEvent::Snapshot(mut records) => {
            records.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(records)
        }
        other => bail!("expected a snapshot, got {other:?}"),
    }
}

/// Succeeds if no event arrives for `quiet`.
pub async fn no_event_for(watch: &mut WorkerWatch, quiet: Duration) -> anyhow::Result<()> {
    match tokio::time::timeout(quiet, watch.next()).await {
        Err(_) => Ok(()),
        Ok(event) => bail!("expected no membership event for {quiet:?}, got {event:?}"),
    }
}
