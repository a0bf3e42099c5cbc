//! Following the registry: workers joining, leaving, restarting and draining, and tearing
//! down the groups they leave behind.

use std::sync::Arc;

use futures_util::future::join_all;
use tessera_proto::worker as wpb;
use tessera_proto::worker::worker_client::WorkerClient;
use tessera_registry::{MembershipEvent, WorkerRecord, WorkerWatch};
use tonic::transport::Channel;

use super::{connect, group_name, Cluster, Role, State, WorkerEntry};

impl Cluster {
    /// Applies membership events until the watch ends.
    pub(crate) async fn follow(self: Arc<Self>, mut watch: WorkerWatch) {
        while let Some(event) = watch.next().await {
            self.apply(event);
            self.reconcile();
        }
        tracing::warn!("membership watch ended; no further workers will be seen");
    }

    fn apply(self: &Arc<Self>, event: MembershipEvent) {
        let mut state = self.lock();
        match event {
            MembershipEvent::Snapshot(records) => {
                let gone: Vec<String> = state.workers.keys().filter(|id| !records.iter().any(|r| &r.id == *id)).cloned().collect();
                for id in gone {
                    self.worker_down(&mut state, &id);
                }
                for record in records {
                    self.worker_up(&mut state, record);
                }
            }
            MembershipEvent::Up(record) => self.worker_up(&mut state, record),
            MembershipEvent::Down(id) => self.worker_down(&mut state, &id),
        }
    }

    fn worker_up(self: &Arc<Self>, state: &mut State, record: WorkerRecord) {
        if let Some(worker) = state.workers.get_mut(&record.id) {
            if worker.record == record {
                return;
            }
            if let Role::Busy(group) = worker.role {
                if worker.record.address != record.address {
                    // Same id, new process: whatever it held for the group is gone.
                    let reason = format!("worker {} restarted at {}", record.id, record.address);
                    worker.role = Role::Free;
                    self.fail_group(state, group, reason);
                }
            }
        }
        let client = match connect(&record.address, &self.config) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(worker = %record.id, address = %record.address, error = %e, "ignoring worker with an unusable address");
                return;
            }
        };
        let role = match state.workers.remove(&record.id) {
            Some(WorkerEntry { role: Role::Busy(g), .. }) if state.groups.contains_key(&g) => Role::Busy(g),
            _ => Role::Free,
        };
        if record.draining {
            tracing::info!(worker = %record.id, "worker draining: no new requests for its group");
            if let Role::Busy(g) = role {
                if let Some(entry) = state.groups.get_mut(&g) {
                    entry.draining = true;
                }
            }
        } else {
            tracing::info!(worker = %record.id, address = %record.address, device = %record.device, "worker joined");
        }
        state.workers.insert(record.id.clone(), WorkerEntry { record, client, role });
    }

    fn worker_down(self: &Arc<Self>, state: &mut State, id: &str) {
        let Some(worker) = state.workers.remove(id) else { return };
        tracing::info!(worker = %id, "worker left");
        if let Role::Busy(group) = worker.role {
            self.fail_group(state, group, format!("worker {id} left the cluster (its lease expired or was revoked)"));
        }
    }

    /// Tears a group down: stops its loop (its requests get `UNAVAILABLE`), then resets the
    /// members still registered and frees those that answer.
    pub(super) fn fail_group(self: &Arc<Self>, state: &mut State, group: u64, reason: String) {
        let Some(entry) = state.groups.remove(&group) else { return };
        state.prefixes.forget(group);
        tracing::warn!(group = %group_name(group), %reason, "group lost");
        let _ = entry.lost.send(Some(reason));
        if entry.serving.is_some() {
            self.serving.send_modify(|n| *n = n.saturating_sub(1));
        }
        let survivors: Vec<(String, WorkerClient<Channel>)> =
            entry.workers.iter().filter_map(|id| state.workers.get(id).map(|s| (id.clone(), s.client.clone()))).collect();
        let cluster = self.clone();
        tokio::spawn(async move {
            let timeout = cluster.config.rpc_timeout;
            let resets = survivors.into_iter().map(|(id, mut client)| async move {
                let ok = matches!(tokio::time::timeout(timeout, client.reset(wpb::ResetRequest {})).await, Ok(Ok(_)));
                (id, ok)
            });
            let results = join_all(resets).await;
            {
                let mut state = cluster.lock();
                for (id, ok) in results {
                    if let Some(worker) = state.workers.get_mut(&id) {
                        if matches!(worker.role, Role::Busy(g) if g == group) {
                            worker.role = if ok { Role::Free } else { Role::Quarantined };
                            if !ok {
                                tracing::warn!(worker = %id, "worker did not answer a reset; unused until it does");
                                tokio::spawn(cluster.clone().recover(id, worker.client.clone()));
                            }
                        }
                    }
                }
            }
            cluster.reconcile();
        });
    }

    /// Asks a quarantined worker to reset again, backing off, until it answers (it is then
    /// free for a new group) or stops being this quarantined worker (it left, or registered
    /// anew). A worker can miss a reset while blocked on a lost peer, or across a network cut
    /// shorter than its lease: it never re-registers then, so without this it would stay
    /// unused for good.
    async fn recover(self: Arc<Self>, id: String, mut client: WorkerClient<Channel>) {
        let timeout = self.config.rpc_timeout;
        let mut pause = timeout;
        loop {
            tokio::time::sleep(pause).await;
            let quarantined = |cluster: &Self| cluster.lock().workers.get(&id).is_some_and(|w| matches!(w.role, Role::Quarantined));
            if !quarantined(&self) {
                return;
            }
            if matches!(tokio::time::timeout(timeout, client.reset(wpb::ResetRequest {})).await, Ok(Ok(_))) {
                if let Some(worker) = self.lock().workers.get_mut(&id).filter(|w| matches!(w.role, Role::Quarantined)) {
                    tracing::info!(worker = %id, "quarantined worker answered a reset; free again");
                    worker.role = Role::Free;
                }
                self.reconcile();
                return;
            }
            pause = (pause * 2).min(self.config.max_retry_backoff);
        }
    }

    /// Tears a group down from outside its loop (a ring step failed on it).
    pub(crate) fn fail_group_by_id(self: &Arc<Self>, group: u64, reason: String) {
        let mut state = self.lock();
        self.fail_group(&mut state, group, reason);
    }
}
