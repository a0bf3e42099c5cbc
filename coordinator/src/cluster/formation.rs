//! Forming groups: free workers become a group of the model's tensor-parallel size (`Assign`
//! on every rank, then `Rendezvous`, which returns once each rank has connected its collective
//! and loaded its shard); a loaded group gets its loop. Permanent load errors mark the model
//! failed; others are retried with backoff.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tessera_proto::worker as wpb;
use tessera_registry::WorkerRecord;
use tokio::sync::{mpsc, watch};

use super::{group_name, Cluster, GroupEntry, Role, Serving};
use crate::fanout::Rank;
use crate::group::GroupLoop;

/// Why a group did not form, and whether trying again could help.
struct LoadFailure {
    reason: String,
    /// The worker marked the error permanent (`tessera_proto::PERMANENT_ERROR_KEY`).
    permanent: bool,
}

impl LoadFailure {
    fn transient(reason: String) -> Self {
        Self { reason, permanent: false }
    }

    fn from_status(status: &tonic::Status, what: String) -> Self {
        let permanent = status.metadata().contains_key(tessera_proto::PERMANENT_ERROR_KEY);
        Self { reason: format!("{what}: {}", status.message()), permanent }
    }
}

/// The ids of `tp` free workers that may form one group, in rank order (by id): workers that
/// name a deployment group only with the others of theirs (a pod's ranks stay one group and
/// never mix with another pod's), the rest with any other unnamed ones. `None` when no set is
/// complete yet.
fn members<'a>(free: impl Iterator<Item = &'a WorkerRecord>, tp: usize) -> Option<Vec<String>> {
    let mut by_group: BTreeMap<Option<&str>, Vec<&str>> = BTreeMap::new();
    for record in free {
        by_group.entry(record.group.as_deref()).or_default().push(&record.id);
    }
    by_group.into_values().find(|ids| ids.len() >= tp).map(|mut ids| {
        ids.sort_unstable();
        ids.into_iter().take(tp).map(str::to_string).collect()
    })
}

impl Cluster {
    /// Forms groups from free workers: each new group goes to the model with the fewest.
    pub(super) fn reconcile(self: &Arc<Self>) {
        let mut state = self.lock();
        if state.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        loop {
            let mut counts = vec![0usize; self.models.len()];
            for g in state.groups.values() {
                counts[g.model] += 1;
            }
            let candidates = (0..self.models.len()).filter(|m| !state.failed.contains_key(m));
            let Some(model) = candidates.min_by_key(|&m| counts[m]) else { return };
            let tp = self.models[model].spec.tp;
            let free = state.workers.values().filter(|w| matches!(w.role, Role::Free) && !w.record.draining).map(|w| &w.record);
            let Some(free) = members(free, tp) else { return };
            let group = self.next_group.fetch_add(1, Ordering::Relaxed);
            let mut ranks = Vec::with_capacity(tp);
            let mut kv_capacity = u64::MAX;
            for id in &free {
                if let Some(worker) = state.workers.get_mut(id) {
                    worker.role = Role::Busy(group);
                    kv_capacity = kv_capacity.min(worker.record.kv_capacity_tokens);
                    ranks.push(Rank { id: id.clone(), client: worker.client.clone() });
                }
            }
            // Workers count KV memory in whole blocks; a partial block holds nothing.
            let kv_capacity = kv_capacity / tessera_proto::KV_BLOCK_TOKENS * tessera_proto::KV_BLOCK_TOKENS;
            let (lost, lost_rx) = watch::channel(None);
            state
                .groups
                .insert(group, GroupEntry { model, workers: free, kv_capacity, serving: None, lost, held_by: None, draining: false });
            tokio::spawn(self.clone().form(group, model, ranks, kv_capacity, lost_rx));
        }
    }

    async fn form(
        self: Arc<Self>,
        group: u64,
        model: usize,
        ranks: Vec<Rank>,
        kv_capacity: u64,
        mut lost: watch::Receiver<Option<String>>,
    ) {
        let name = group_name(group);
        let spec = &self.models[model].spec;
        let ids: Vec<&str> = ranks.iter().map(|m| m.id.as_str()).collect();
        tracing::info!(group = %name, model = %spec.name, tp = spec.tp, workers = ?ids, "forming group: loading shards");
        let start = Instant::now();
        let loaded = tokio::select! {
            r = self.load(&name, model, &ranks) => r,
            _ = lost.wait_for(Option::is_some) => return,
        };
        let mut state = self.lock();
        if let Err(LoadFailure { reason, permanent: true }) = loaded {
            tracing::error!(group = %name, model = %spec.name, %reason, "the model cannot be loaded; not retrying");
            state.failed.insert(model, reason.clone());
            let failed = state.failed.iter().map(|(&m, r)| (self.models[m].name().to_string(), r.clone())).collect();
            self.failures.send_replace(failed);
            self.fail_group(&mut state, group, reason);
            return;
        }
        if let Err(LoadFailure { reason, .. }) = loaded {
            let backoff = (state.backoff * 2).clamp(Duration::from_millis(500), self.config.max_retry_backoff);
            state.backoff = backoff;
            state.retry_at = Some(Instant::now() + backoff);
            tracing::warn!(group = %name, %reason, retry_in = ?backoff, "group failed to form");
            self.fail_group(&mut state, group, reason);
            let cluster = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(backoff).await;
                cluster.lock().retry_at = None;
                cluster.reconcile();
            });
            return;
        }
        let Some(entry) = state.groups.get_mut(&group) else { return };
        let (submit, requests) = mpsc::channel(self.config.queue_depth);
        let active = Arc::new(AtomicUsize::new(0));
        let embed = (self.models[model].kind == crate::model::ModelKind::Encoder)
            .then(|| {
                ranks
                    .first()
                    .map(|m| crate::embed::EmbedBatcher::spawn(name.clone(), m.client.clone(), self.config.group_loop.step_timeout))
            })
            .flatten();
        entry.serving = Some(Serving { submit, active: active.clone(), last_placed: AtomicU64::new(0), embed });
        state.backoff = Duration::ZERO;
        drop(state);
        self.serving.send_modify(|n| *n += 1);
        tracing::info!(group = %name, model = %spec.name, secs = start.elapsed().as_secs_f64(), "group serving");
        let metrics = self.metrics.clone();
        let idle = self.idle.clone();
        let group_loop = GroupLoop { name, ranks, requests, lost, active, config: self.config.group_loop, kv_capacity, metrics, idle };
        let cluster = self.clone();
        tokio::spawn(async move {
            let (reason, held) = group_loop.run().await;
            cluster.fail_group_by_id(group, reason.clone());
            // Torn down first, so placement cannot choose the lost group again.
            cluster.migrate(model, &group_name(group), &reason, held);
        });
    }

    /// Assigns every rank, then rendezvouses them; returns once all shards are loaded.
    async fn load(&self, name: &str, model: usize, ranks: &[Rank]) -> Result<(), LoadFailure> {
        let spec = &self.models[model].spec;
        let assigns = ranks.iter().enumerate().map(|(rank, m)| {
            let mut client = m.client.clone();
            let request = wpb::AssignRequest {
                group_id: name.to_string(),
                model_dir: spec.dir.display().to_string(),
                dtype: spec.dtype.clone(),
                tp_rank: rank as u32,
                tp_size: ranks.len() as u32,
                batch_invariant: spec.batch_invariant,
            };
            async move { tokio::time::timeout(self.config.rpc_timeout, client.assign(request)).await }
        });
        let mut peers = Vec::with_capacity(ranks.len());
        for (m, r) in ranks.iter().zip(join_all(assigns).await) {
            match r {
                Ok(Ok(answer)) => peers.push(answer.into_inner().collective_address),
                Ok(Err(status)) => return Err(LoadFailure::from_status(&status, format!("worker {} refused its assignment", m.id))),
                Err(_) => return Err(LoadFailure::transient(format!("worker {} did not answer its assignment", m.id))),
            }
        }
        // A single rank has no collective endpoint and needs no peers.
        if ranks.len() == 1 {
            peers.clear();
        }
        let rendezvous = ranks.iter().map(|m| {
            let mut client = m.client.clone();
            let request = wpb::RendezvousRequest { group_id: name.to_string(), peers: peers.clone() };
            async move { tokio::time::timeout(self.config.load_timeout, client.rendezvous(request)).await }
        });
        for (m, r) in ranks.iter().zip(join_all(rendezvous).await) {
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => return Err(LoadFailure::from_status(&status, format!("worker {} could not join the group", m.id))),
                Err(_) => {
                    return Err(LoadFailure::transient(format!("worker {} did not load within {:?}", m.id, self.config.load_timeout)))
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, group: Option<&str>) -> WorkerRecord {
        WorkerRecord {
            id: id.into(),
            address: format!("{id}:1"),
            device: "cpu".into(),
            memory_bytes: 0,
            kv_capacity_tokens: 1024,
            version: "0".into(),
            draining: false,
            group: group.map(str::to_string),
        }
    }

    #[test]
    fn a_named_group_forms_only_from_its_own_workers() {
        // One rank of pod-a and one of pod-b are free: neither pod is complete, so no group
        // forms, although two free workers would make a TP=2 group.
        let half = [record("a-r0", Some("pod-a")), record("b-r0", Some("pod-b"))];
        assert_eq!(members(half.iter(), 2), None);
        let full = [record("a-r0", Some("pod-a")), record("b-r1", Some("pod-b")), record("b-r0", Some("pod-b"))];
        assert_eq!(members(full.iter(), 2), Some(vec!["b-r0".to_string(), "b-r1".to_string()]));
    }

    #[test]
    fn unnamed_workers_group_with_any_other_unnamed_ones() {
        let free = [record("w2", None), record("a-r0", Some("pod-a")), record("w1", None), record("w3", None)];
        assert_eq!(members(free.iter(), 2), Some(vec!["w1".to_string(), "w2".to_string()]));
        assert_eq!(members(free.iter(), 4), None);
        assert_eq!(members(free.iter(), 1), Some(vec!["w1".to_string()]));
    }
}
