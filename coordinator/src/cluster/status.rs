//! What the cluster reports: models' states, groups per model, and every worker's view.

use std::sync::atomic::Ordering;

use futures_util::future::join_all;
use tessera_proto::v1 as pb;
use tessera_proto::worker as wpb;

use super::{Cluster, Role};

impl Cluster {
    /// Groups per model, for `ListModels`.
    pub(crate) fn serving_groups_of(&self, model: usize) -> u32 {
        self.lock().groups.values().filter(|g| g.model == model && g.serving.is_some()).count() as u32
    }

    /// Each served model's state: "failed" (with the reason), "serving" while a group of it
    /// is loaded, else "loading".
    fn model_states(&self) -> Vec<pb::ModelStatus> {
        let state = self.lock();
        self.models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let serving = state.groups.values().filter(|g| g.model == i && g.serving.is_some()).count() as u32;
                let (status, error) = match state.failed.get(&i) {
                    Some(reason) => ("failed", reason.clone()),
                    None if serving > 0 => ("serving", String::new()),
                    None => ("loading", String::new()),
                };
                pb::ModelStatus { name: m.name().to_string(), state: status.into(), error, serving_groups: serving }
            })
            .collect()
    }

    /// Every known worker with the coordinator's view and the worker's own report.
    pub(crate) async fn status(&self) -> pb::ClusterStatusResponse {
        let (views, queued, running) = {
            let state = self.lock();
            let mut queued = 0u32;
            let mut running = 0u32;
            for g in state.groups.values() {
                if let Some(s) = &g.serving {
                    queued += (s.submit.max_capacity() - s.submit.capacity()) as u32;
                    running += s.active.load(Ordering::Relaxed) as u32;
                }
            }
            // A ring request runs on the groups it holds, outside their loops: once per ring.
            let rings: std::collections::BTreeSet<u64> = state.groups.values().filter_map(|g| g.held_by).collect();
            running += rings.len() as u32;
            let views: Vec<_> = state
                .workers
                .values()
                .map(|worker| {
                    let (model, group, rank) = match worker.role {
                        Role::Busy(g) => state
                            .groups
                            .get(&g)
                            .map(|e| {
                                let rank = e.workers.iter().position(|m| *m == worker.record.id).unwrap_or(0);
                                (self.models[e.model].name().to_string(), g as u32, rank as u32)
                            })
                            .unwrap_or_default(),
                        _ => Default::default(),
                    };
                    let note = match worker.role {
                        Role::Quarantined => " (quarantined)",
                        _ if worker.record.draining => " (draining)",
                        _ => "",
                    };
                    (worker.record.clone(), worker.client.clone(), model, group, rank, note)
                })
                .collect();
            // Requests waiting for a group a ring holds are queued too, only not on a group yet.
            let waiting = self.metrics.waiting_for_groups() as u32;
            (views, queued + waiting, running.saturating_sub(queued))
        };
        let timeout = self.config.rpc_timeout;
        let reports = views.into_iter().map(|(record, mut client, model, group, tp_rank, note)| async move {
            let report = tokio::time::timeout(timeout, client.status(wpb::StatusRequest {})).await;
            let report = match report {
                Ok(Ok(r)) => r.into_inner(),
                _ => wpb::StatusResponse { state: "unreachable".to_string(), ..Default::default() },
            };
            let state = format!("{}{note}", report.state);
            pb::WorkerStatus {
                id: record.id,
                address: record.address,
                state,
                model,
                group,
                tp_rank,
                kv_capacity_tokens: record.kv_capacity_tokens,
                kv_capacity_blocks: record.kv_capacity_tokens / tessera_proto::KV_BLOCK_TOKENS,
                ..reported(&report)
            }
        });
        let models = self.model_states();
        pb::ClusterStatusResponse {
            models,
            workers: join_all(reports).await,
            queued_requests: queued,
            running_requests: running,
            counters: Some(self.metrics.snapshot()),
            ring_waiting_tokens: self.metrics.ring_waiting_tokens(),
            leading: self.standing.is_leading(),
            leader: self.standing.leader().unwrap_or_default(),
        }
    }
}

/// The fields of a worker's status that its own report gives: what it holds now (sequences,
/// KV, prefix cache) and its capacity as it states it. The coordinator adds its own view (id,
/// address, model, group, rank).
pub fn reported(report: &wpb::StatusResponse) -> pb::WorkerStatus {
    pb::WorkerStatus {
        id: report.worker_id.clone(),
        state: report.state.clone(),
        tp_rank: report.tp_rank,
        sequences: report.sequences,
        kv_tokens: report.kv_tokens,
        kv_capacity_tokens: report.kv_capacity_tokens,
        kv_blocks: report.kv_blocks,
        kv_capacity_blocks: report.kv_capacity_blocks,
        prefix_cached_blocks: report.prefix_cached_blocks,
        prefix_unused_blocks: report.prefix_unused_blocks,
        prefix_hits: report.prefix_hits,
        prefix_hit_tokens: report.prefix_hit_tokens,
        prefix_evictions: report.prefix_evictions,
        ..Default::default()
    }
}
