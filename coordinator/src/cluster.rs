//! The coordinator's view of the cluster: which workers are alive, which groups they form, and
//! which group serves a request.
//!
//! Membership events from the registry drive everything. Free workers are formed into groups
//! of the model's tensor-parallel size (`Assign` on every rank, then `Rendezvous`, which returns
//! once each rank has connected its collective and loaded its shard). A loaded group gets an
//! iteration loop ([`GroupLoop`]). When a member leaves (its key disappears) or a step fails,
//! the group is torn down: its requests get `UNAVAILABLE`, surviving members are `Reset` and
//! become free again, and free workers — old survivors plus newcomers — are formed into new
//! groups without restarting anything.
//!
//! Locking: one mutex over the maps, never held across an `.await`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tessera_proto::v1 as pb;
use tessera_proto::worker as wpb;
use tessera_proto::worker::worker_client::WorkerClient;
use tessera_registry::{MembershipEvent, WorkerRecord, WorkerWatch};
use tokio::sync::{mpsc, watch, Notify};
use tonic::transport::{Channel, Endpoint};

use crate::error::CoordinatorError;
use crate::group::{GroupLoop, LoopConfig, Member, NewSequence};
use crate::metrics::Metrics;
use crate::model::ServedModel;

/// Timeouts and sizes of group management.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Longest wait for a quick worker RPC (assign, reset, status, release).
    pub rpc_timeout: Duration,
    /// Longest wait for a group to connect and load its shards.
    pub load_timeout: Duration,
    /// Requests waiting per group before new ones are refused with `RESOURCE_EXHAUSTED`.
    pub queue_depth: usize,
    pub group_loop: LoopConfig,
    /// Longest pause before retrying after a group failed to form.
    pub max_retry_backoff: Duration,
    /// Prompts of at least this many tokens go to a ring of `ceil(prompt / this)` groups even
    /// when one group could hold them: each member then prefills about this many tokens, which
    /// bounds the prefill time (attention cost grows with the square of the tokens). 0: rings
    /// only for requests no group can hold.
    pub ring_prefill_tokens: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            rpc_timeout: Duration::from_secs(3),
            load_timeout: Duration::from_secs(600),
            queue_depth: 256,
            group_loop: LoopConfig { max_batch: 32, step_tokens: 256, step_timeout: Duration::from_secs(300), static_batching: false },
            max_retry_backoff: Duration::from_secs(30),
            ring_prefill_tokens: 0,
        }
    }
}

enum Role {
    Free,
    /// Member of this group (forming or serving).
    Busy(u64),
    /// Did not answer after its group failed; unused until it registers again.
    Quarantined,
}

struct Slot {
    record: WorkerRecord,
    client: WorkerClient<Channel>,
    role: Role,
}

struct Serving {
    submit: mpsc::Sender<NewSequence>,
    active: Arc<AtomicUsize>,
    /// Encoder groups: the queue that batches `Embed` requests for the group's worker.
    embed: Option<crate::embed::EmbedBatcher>,
    /// When the group was last chosen (a placement counter), so ties go round-robin.
    last_placed: AtomicU64,
}

struct GroupEntry {
    model: usize,
    /// Worker ids by rank.
    members: Vec<String>,
    /// KV tokens of the member with the least: what one group can hold.
    kv_capacity: u64,
    serving: Option<Serving>,
    lost: watch::Sender<Option<String>>,
    /// The ring that holds this group: no new request is placed on it until the ring ends.
    held_by: Option<u64>,
    /// A member announced it is draining: the group finishes what it runs and takes nothing new.
    draining: bool,
}

#[derive(Default)]
struct State {
    workers: BTreeMap<String, Slot>,
    groups: BTreeMap<u64, GroupEntry>,
    /// Models whose workers refused them for good, with the reason: no group forms for them.
    failed: BTreeMap<usize, String>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

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

/// Where a request was placed.
pub(crate) struct Placement {
    pub group: String,
    pub tp: u32,
    pub workers: Vec<String>,
    submit: mpsc::Sender<NewSequence>,
    active: Arc<AtomicUsize>,
}

impl Placement {
    /// Queues the sequence on the group; fails at once when the queue is full.
    pub(crate) fn submit(&self, seq: NewSequence) -> Result<(), CoordinatorError> {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.submit.try_send(seq).map_err(|e| {
            self.active.fetch_sub(1, Ordering::Relaxed);
            match e {
                mpsc::error::TrySendError::Full(_) => CoordinatorError::ResourceExhausted(format!(
                    "group {} has {} requests waiting, its limit; retry later",
                    self.group,
                    self.submit.max_capacity()
                )),
                mpsc::error::TrySendError::Closed(_) => {
                    CoordinatorError::Unavailable(format!("group {} stopped serving; retry", self.group))
                }
            }
        })
    }
}

/// Shared state of one coordinator.
pub(crate) struct Cluster {
    pub models: Vec<Arc<ServedModel>>,
    config: ClusterConfig,
    state: Mutex<State>,
    /// Number of groups loaded and serving, for health and for callers waiting to serve.
    serving: watch::Sender<usize>,
    /// Models failed for good (`State::failed`), by name with the reason, for callers waiting
    /// to serve.
    failures: watch::Sender<Vec<(String, String)>>,
    next_group: AtomicU64,
    next_seq: AtomicU64,
    placements: AtomicU64,
    pub(crate) metrics: Arc<Metrics>,
    /// Woken when a group finishes a request or a ring lets its groups go.
    pub(crate) idle: Arc<Notify>,
    next_ring: AtomicU64,
}

/// Where a request goes.
pub(crate) enum Route {
    Group(Placement),
    /// A ring of `size` groups, each holding at most `share` tokens of the sequence.
    Ring(RingPlan),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct RingPlan {
    pub model: usize,
    pub size: usize,
    pub share: u64,
    /// The request's KV tokens (prompt plus `max_new_tokens`).
    pub tokens: u64,
}

/// One ring member: a serving group and its ranks.
pub(crate) struct RingMember {
    pub group: u64,
    pub name: String,
    pub members: Vec<Member>,
    pub active: Arc<AtomicUsize>,
}

/// Groups held for a ring; they take new requests again when this is dropped.
pub(crate) struct RingLease {
    pub ring: u64,
    pub members: Vec<RingMember>,
    cluster: Arc<Cluster>,
}

impl Drop for RingLease {
    fn drop(&mut self) {
        let mut state = self.cluster.lock();
        for m in &self.members {
            if let Some(g) = state.groups.get_mut(&m.group) {
                if g.held_by == Some(self.ring) {
                    g.held_by = None;
                }
            }
        }
        drop(state);
        self.cluster.idle.notify_waiters();
    }
}

/// Most tokens one ring member holds of a sequence of `total` tokens over `size` members: the
/// zigzag prefill splits the prompt within two tokens per member, and each decoded token goes to
/// the member holding the fewest.
pub(crate) fn ring_share(total: u64, size: usize) -> u64 {
    total.div_ceil(size as u64) + 2
}

impl Cluster {
    pub(crate) fn new(models: Vec<Arc<ServedModel>>, config: ClusterConfig) -> Arc<Self> {
        Arc::new(Self {
            models,
            config,
            state: Mutex::new(State::default()),
            serving: watch::channel(0).0,
            failures: watch::channel(Vec::new()).0,
            next_group: AtomicU64::new(1),
            next_seq: AtomicU64::new(1),
            placements: AtomicU64::new(1),
            metrics: Arc::new(Metrics::default()),
            idle: Arc::new(Notify::new()),
            next_ring: AtomicU64::new(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The maps stay consistent between statements, so a panic elsewhere cannot leave them
        // half-updated; keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn serving_groups(&self) -> watch::Receiver<usize> {
        self.serving.subscribe()
    }

    pub(crate) fn failed_models(&self) -> watch::Receiver<Vec<(String, String)>> {
        self.failures.subscribe()
    }

    /// The first of `n` fresh, consecutive sequence ids.
    pub(crate) fn next_seqs(&self, n: u64) -> u64 {
        self.next_seq.fetch_add(n, Ordering::Relaxed)
    }

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
        if let Some(slot) = state.workers.get_mut(&record.id) {
            if slot.record == record {
                return;
            }
            if let Role::Busy(group) = slot.role {
                if slot.record.address != record.address {
                    // Same id, new process: whatever it held for the group is gone.
                    let reason = format!("worker {} restarted at {}", record.id, record.address);
                    slot.role = Role::Free;
                    self.fail_group(state, group, reason);
                }
            }
        }
        let client = match connect(&record.address, self.config.rpc_timeout) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(worker = %record.id, address = %record.address, error = %e, "ignoring worker with an unusable address");
                return;
            }
        };
        let role = match state.workers.remove(&record.id) {
            Some(Slot { role: Role::Busy(g), .. }) if state.groups.contains_key(&g) => Role::Busy(g),
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
        state.workers.insert(record.id.clone(), Slot { record, client, role });
    }

    fn worker_down(self: &Arc<Self>, state: &mut State, id: &str) {
        let Some(slot) = state.workers.remove(id) else { return };
        tracing::info!(worker = %id, "worker left");
        if let Role::Busy(group) = slot.role {
            self.fail_group(state, group, format!("worker {id} left the cluster (its lease expired or was revoked)"));
        }
    }

    /// Tears a group down: stops its loop (its requests get `UNAVAILABLE`), then resets the
    /// members still registered and frees those that answer.
    fn fail_group(self: &Arc<Self>, state: &mut State, group: u64, reason: String) {
        let Some(entry) = state.groups.remove(&group) else { return };
        tracing::warn!(group = %group_name(group), %reason, "group lost");
        let _ = entry.lost.send(Some(reason));
        if entry.serving.is_some() {
            self.serving.send_modify(|n| *n = n.saturating_sub(1));
        }
        let survivors: Vec<(String, WorkerClient<Channel>)> =
            entry.members.iter().filter_map(|id| state.workers.get(id).map(|s| (id.clone(), s.client.clone()))).collect();
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
                    if let Some(slot) = state.workers.get_mut(&id) {
                        if matches!(slot.role, Role::Busy(g) if g == group) {
                            slot.role = if ok { Role::Free } else { Role::Quarantined };
                            if !ok {
                                tracing::warn!(worker = %id, "worker did not answer a reset; unused until it registers again");
                            }
                        }
                    }
                }
            }
            cluster.reconcile();
        });
    }

    /// Forms groups from free workers: each new group goes to the model with the fewest.
    fn reconcile(self: &Arc<Self>) {
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
            let free: Vec<String> = state
                .workers
                .iter()
                .filter(|(_, s)| matches!(s.role, Role::Free) && !s.record.draining)
                .map(|(id, _)| id.clone())
                .take(tp)
                .collect();
            if free.len() < tp {
                return;
            }
            let group = self.next_group.fetch_add(1, Ordering::Relaxed);
            let mut members = Vec::with_capacity(tp);
            let mut kv_capacity = u64::MAX;
            for id in &free {
                if let Some(slot) = state.workers.get_mut(id) {
                    slot.role = Role::Busy(group);
                    kv_capacity = kv_capacity.min(slot.record.kv_capacity_tokens);
                    members.push(Member { id: id.clone(), client: slot.client.clone() });
                }
            }
            // Workers count KV memory in whole blocks; a partial block holds nothing.
            let kv_capacity = kv_capacity / tessera_proto::KV_BLOCK_TOKENS * tessera_proto::KV_BLOCK_TOKENS;
            let (lost, lost_rx) = watch::channel(None);
            state
                .groups
                .insert(group, GroupEntry { model, members: free, kv_capacity, serving: None, lost, held_by: None, draining: false });
            tokio::spawn(self.clone().form(group, model, members, kv_capacity, lost_rx));
        }
    }

    async fn form(
        self: Arc<Self>,
        group: u64,
        model: usize,
        members: Vec<Member>,
        kv_capacity: u64,
        mut lost: watch::Receiver<Option<String>>,
    ) {
        let name = group_name(group);
        let spec = &self.models[model].spec;
        let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
        tracing::info!(group = %name, model = %spec.name, tp = spec.tp, workers = ?ids, "forming group: loading shards");
        let start = Instant::now();
        let loaded = tokio::select! {
            r = self.load(&name, model, &members) => r,
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
                members
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
        let group_loop = GroupLoop { name, members, requests, lost, active, config: self.config.group_loop, kv_capacity, metrics, idle };
        let cluster = self.clone();
        tokio::spawn(async move {
            let reason = group_loop.run().await;
            let mut state = cluster.lock();
            cluster.fail_group(&mut state, group, reason);
        });
    }

    /// Assigns every rank, then rendezvouses them; returns once all shards are loaded.
    async fn load(&self, name: &str, model: usize, members: &[Member]) -> Result<(), LoadFailure> {
        let spec = &self.models[model].spec;
        let assigns = members.iter().enumerate().map(|(rank, m)| {
            let mut client = m.client.clone();
            let request = wpb::AssignRequest {
                group_id: name.to_string(),
                model_dir: spec.dir.display().to_string(),
                dtype: spec.dtype.clone(),
                tp_rank: rank as u32,
                tp_size: members.len() as u32,
            };
            async move { tokio::time::timeout(self.config.rpc_timeout, client.assign(request)).await }
        });
        let mut peers = Vec::with_capacity(members.len());
        for (m, r) in members.iter().zip(join_all(assigns).await) {
            match r {
                Ok(Ok(answer)) => peers.push(answer.into_inner().collective_address),
                Ok(Err(status)) => return Err(LoadFailure::from_status(&status, format!("worker {} refused its assignment", m.id))),
                Err(_) => return Err(LoadFailure::transient(format!("worker {} did not answer its assignment", m.id))),
            }
        }
        // A single rank has no collective endpoint and needs no peers.
        if members.len() == 1 {
            peers.clear();
        }
        let rendezvous = members.iter().map(|m| {
            let mut client = m.client.clone();
            let request = wpb::RendezvousRequest { group_id: name.to_string(), peers: peers.clone() };
            async move { tokio::time::timeout(self.config.load_timeout, client.rendezvous(request)).await }
        });
        for (m, r) in members.iter().zip(join_all(rendezvous).await) {
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

    /// `model`'s index in the cluster's list, unless it failed to load.
    fn servable_index(&self, state: &State, model: &ServedModel) -> Result<usize, CoordinatorError> {
        let index = self
            .models
            .iter()
            .position(|m| m.name() == model.name())
            .ok_or_else(|| CoordinatorError::Internal(format!("model {:?} is not in the cluster's list", model.name())))?;
        match state.failed.get(&index) {
            Some(reason) => {
                Err(CoordinatorError::ModelFailed(format!("model {:?} failed to load and is not served: {reason}", model.name())))
            }
            None => Ok(index),
        }
    }

    /// Where a request of `reserve` KV tokens goes: the least busy serving group of `model` that
    /// can hold it (among equally busy ones, the one chosen least recently); when no group can,
    /// the smallest ring of serving groups whose members can each hold their share.
    ///
    /// With `ring_prefill_tokens` set, a prompt of at least that many tokens goes to a ring of
    /// `ceil(prompt / ring_prefill_tokens)` groups (as many as serve, at most) when that is more
    /// than the capacity alone needs: the prefill-cost rule.
    pub(crate) fn place(&self, model: &ServedModel, prompt_len: usize, reserve: u64) -> Result<Route, CoordinatorError> {
        let state = self.lock();
        let index = self.servable_index(&state, model)?;
        let mut capacities: Vec<u64> =
            state.groups.values().filter(|g| g.model == index && g.serving.is_some() && !g.draining).map(|g| g.kv_capacity).collect();
        capacities.sort_unstable_by(|a, b| b.cmp(a));
        let threshold = self.config.ring_prefill_tokens;
        if threshold > 0 && prompt_len >= threshold && capacities.len() >= 2 {
            let size = prompt_len.div_ceil(threshold).clamp(2, capacities.len());
            if capacities[size - 1] >= ring_share(reserve, size) {
                return Ok(Route::Ring(RingPlan { model: index, size, share: ring_share(reserve, size), tokens: reserve }));
            }
        }
        if capacities.first().is_some_and(|&largest| reserve > largest) {
            // The smallest ring whose smallest member holds its share.
            let size = (2..=capacities.len()).find(|&r| capacities[r - 1] >= ring_share(reserve, r));
            let Some(size) = size else {
                self.metrics.capacity_refused(reserve);
                let most = (1..=capacities.len())
                    .map(|r| if r == 1 { capacities[0] } else { (capacities[r - 1].saturating_sub(2)) * r as u64 })
                    .max()
                    .unwrap_or(0);
                return Err(CoordinatorError::InvalidArgument(format!(
                    "prompt plus max_new_tokens is {reserve} tokens; the most this cluster can hold for one request now \
                     is {most} ({} serving groups of at most {} KV tokens each)",
                    capacities.len(),
                    capacities[0]
                )));
            };
            return Ok(Route::Ring(RingPlan { model: index, size, share: ring_share(reserve, size), tokens: reserve }));
        }
        let best = state
            .groups
            .iter()
            .filter(|(_, g)| g.model == index && g.kv_capacity >= reserve && g.held_by.is_none() && !g.draining)
            .filter_map(|(id, g)| g.serving.as_ref().map(|s| (*id, g, s)))
            .min_by_key(|(_, _, s)| (s.active.load(Ordering::Relaxed), s.last_placed.load(Ordering::Relaxed)));
        let Some((id, entry, serving)) = best else {
            let held = state.groups.values().filter(|g| g.model == index && g.serving.is_some() && g.held_by.is_some()).count();
            if held > 0 {
                return Err(CoordinatorError::Unavailable(format!(
                    "every serving group of model {:?} that can hold this request ({held}) is running a long request on a \
                     sequence-parallel ring; retry shortly",
                    model.name()
                )));
            }
            let registered = state.workers.len();
            let forming = state.groups.values().filter(|g| g.model == index && g.serving.is_none()).count();
            return Err(CoordinatorError::Unavailable(format!(
                "model {:?} has no serving group yet ({forming} loading; {registered} workers registered, {} needed per group)",
                model.name(),
                model.spec.tp
            )));
        };
        serving.last_placed.store(self.placements.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        Ok(Route::Group(Placement {
            group: group_name(id),
            tp: entry.members.len() as u32,
            workers: entry.members.clone(),
            submit: serving.submit.clone(),
            active: serving.active.clone(),
        }))
    }

    /// Holds `plan.size` serving groups that can each hold `plan.share` tokens for a new ring,
    /// the least busy first, or returns `Ok(None)` when too many are held by other rings now.
    /// Held groups take no new requests; the ring waits for what they run to finish.
    pub(crate) fn hold_ring(self: &Arc<Self>, plan: RingPlan) -> Result<Option<RingLease>, CoordinatorError> {
        let mut state = self.lock();
        let eligible = |g: &GroupEntry| g.model == plan.model && g.kv_capacity >= plan.share && g.serving.is_some() && !g.draining;
        if state.groups.values().filter(|g| eligible(g)).count() < plan.size {
            return Err(CoordinatorError::Unavailable(format!(
                "fewer than {} groups can hold this request's share of {} tokens now; retry",
                plan.size, plan.share
            )));
        }
        let mut free: Vec<(u64, usize)> = state
            .groups
            .iter()
            .filter(|(_, g)| eligible(g) && g.held_by.is_none())
            .filter_map(|(id, g)| g.serving.as_ref().map(|s| (*id, s.active.load(Ordering::Relaxed))))
            .collect();
        if free.len() < plan.size {
            return Ok(None);
        }
        free.sort_by_key(|&(id, active)| (active, id));
        let ring = self.next_ring.fetch_add(1, Ordering::Relaxed);
        let mut members = Vec::with_capacity(plan.size);
        for &(id, _) in &free[..plan.size] {
            let Some(entry) = state.groups.get(&id) else { continue };
            let ranks = entry
                .members
                .iter()
                .filter_map(|w| state.workers.get(w).map(|s| Member { id: w.clone(), client: s.client.clone() }))
                .collect();
            let active = entry.serving.as_ref().map(|s| s.active.clone()).unwrap_or_default();
            members.push(RingMember { group: id, name: group_name(id), members: ranks, active });
            if let Some(entry) = state.groups.get_mut(&id) {
                entry.held_by = Some(ring);
            }
        }
        Ok(Some(RingLease { ring, members, cluster: self.clone() }))
    }

    /// The serving group of encoder `model` for one `Embed` call: the least busy (ties: the one
    /// chosen least recently), counted busy until the returned target is dropped.
    pub(crate) fn embed_target(&self, model: &ServedModel) -> Result<crate::embed::EmbedTarget, CoordinatorError> {
        let state = self.lock();
        let index = self.servable_index(&state, model)?;
        let best = state
            .groups
            .iter()
            .filter(|(_, g)| g.model == index && !g.draining)
            .filter_map(|(id, g)| g.serving.as_ref().map(|s| (*id, g, s)))
            .min_by_key(|(_, _, s)| (s.active.load(Ordering::Relaxed), s.last_placed.load(Ordering::Relaxed)));
        let target = best.and_then(|(_, _, s)| {
            let batcher = s.embed.clone()?;
            s.last_placed.store(self.placements.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
            Some(crate::embed::EmbedTarget::new(batcher, s.active.clone()))
        });
        target.ok_or_else(|| CoordinatorError::Unavailable(format!("model {:?} has no serving group yet; retry shortly", model.name())))
    }

    /// Tears a group down from outside its loop (a ring step failed on it).
    pub(crate) fn fail_group_by_id(self: &Arc<Self>, group: u64, reason: String) {
        let mut state = self.lock();
        self.fail_group(&mut state, group, reason);
    }

    pub(crate) fn step_timeout(&self) -> Duration {
        self.config.group_loop.step_timeout
    }

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
            let views: Vec<_> = state
                .workers
                .values()
                .map(|slot| {
                    let (model, group, rank) = match slot.role {
                        Role::Busy(g) => state
                            .groups
                            .get(&g)
                            .map(|e| {
                                let rank = e.members.iter().position(|m| *m == slot.record.id).unwrap_or(0);
                                (self.models[e.model].name().to_string(), g as u32, rank as u32)
                            })
                            .unwrap_or_default(),
                        _ => Default::default(),
                    };
                    let note = match slot.role {
                        Role::Quarantined => " (quarantined)",
                        _ if slot.record.draining => " (draining)",
                        _ => "",
                    };
                    (slot.record.clone(), slot.client.clone(), model, group, rank, note)
                })
                .collect();
            (views, queued, running.saturating_sub(queued))
        };
        let timeout = self.config.rpc_timeout;
        let reports = views.into_iter().map(|(record, mut client, model, group, tp_rank, note)| async move {
            let report = tokio::time::timeout(timeout, client.status(wpb::StatusRequest {})).await;
            let (state, sequences, kv_tokens, kv_blocks) = match report {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    (r.state, r.sequences, r.kv_tokens, r.kv_blocks)
                }
                _ => ("unreachable".to_string(), 0, 0, 0),
            };
            let state = format!("{state}{note}");
            pb::WorkerStatus {
                id: record.id,
                address: record.address,
                state,
                model,
                group,
                tp_rank,
                sequences,
                kv_tokens,
                kv_capacity_tokens: record.kv_capacity_tokens,
                kv_blocks,
                kv_capacity_blocks: record.kv_capacity_tokens / tessera_proto::KV_BLOCK_TOKENS,
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
        }
    }
}

pub(crate) fn group_name(id: u64) -> String {
    format!("g{id}")
}

fn connect(address: &str, timeout: Duration) -> Result<WorkerClient<Channel>, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))?.connect_timeout(timeout).tcp_nodelay(true);
    Ok(WorkerClient::new(endpoint.connect_lazy()))
}
