//! In-process registry with etcd's semantics, for one-machine clusters and tests.
//!
//! Same contract as the etcd backend: create-if-absent registration, one lease per
//! registration that expires on tokio time unless renewed, list + subscribe with no gap, and a
//! fresh snapshot when a watcher falls so far behind that events were dropped. Clones share one
//! registry, so a coordinator and in-process workers of `tessera up` see the same members.
//!
//! Keep-alive and expiry both run on the caller's runtime. Unlike the etcd backend no thread
//! of its own is needed: if that runtime is starved, the expiry timer is starved with it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::runtime::Handle;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, mpsc, watch, Semaphore};
use tokio::time::{Instant, MissedTickBehavior};

use crate::election::Leadership;
use crate::error::{RegistryError, Result};
use crate::keys::validate_worker_id;
use crate::lease::{LeaseCommand, LeaseId, LeaseLoss, LeaseState, Registration};
use crate::record::WorkerRecord;
use crate::watch::{MembershipEvent, WorkerWatch};
use crate::Registry;

/// Settings of a [`MemoryRegistry`].
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// Lease time-to-live; a registration that is not renewed for this long disappears.
    pub lease_ttl: Duration,
    /// Events a watcher may lag behind before it is re-synchronised with a fresh snapshot.
    pub watch_buffer: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self { lease_ttl: Duration::from_secs(5), watch_buffer: 1024 }
    }
}

impl MemoryConfig {
    /// Checks the ranges the registry relies on.
    pub fn validate(&self) -> Result<()> {
        if self.lease_ttl < Duration::from_millis(30) {
            // Renewal runs every TTL/3, and timers have millisecond resolution.
            return Err(RegistryError::InvalidConfig("lease_ttl must be at least 30 ms"));
        }
        if self.watch_buffer == 0 {
            return Err(RegistryError::InvalidConfig("watch_buffer must be at least 1"));
        }
        Ok(())
    }
}

/// The in-process registry. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct MemoryRegistry {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: MemoryConfig,
    state: Mutex<State>,
    /// Every change, sent while `state` is locked so that order matches the state's history.
    changes: broadcast::Sender<MembershipEvent>,
    /// The coordinators' election: one permit, handed out in the order candidates asked.
    election: Arc<Semaphore>,
    /// Who holds the permit.
    leader: Mutex<Option<String>>,
}

#[derive(Debug, Default)]
struct State {
    next_lease: i64,
    workers: BTreeMap<String, WorkerRecord>,
    leases: HashMap<LeaseId, Lease>,
}

#[derive(Debug)]
struct Lease {
    deadline: Instant,
    worker_id: String,
    /// The registration's state; the lease owns it so that whoever ends the lease (expiry,
    /// revocation from anywhere) tells the registration at once.
    state: watch::Sender<LeaseState>,
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new(config: MemoryConfig) -> Result<Self> {
        config.validate()?;
        let (changes, _) = broadcast::channel(config.watch_buffer);
        let shared = Shared {
            config,
            state: Mutex::new(State::default()),
            changes,
            election: Arc::new(Semaphore::new(1)),
            leader: Mutex::new(None),
        };
        Ok(Self { shared: Arc::new(shared) })
    }

    /// Revokes a lease by id, as an operator would with `etcdctl lease revoke`: the worker's
    /// record is deleted and its registration learns that the lease expired. Returns whether
    /// the lease existed.
    pub fn revoke_lease(&self, lease: LeaseId) -> bool {
        self.shared.end_lease(lease, LeaseLoss::Expired)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the maps consistent before anything can panic, so a
        // poisoned lock still guards valid state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish(&self, event: MembershipEvent) {
        // An error only means nobody is watching right now; a later watcher starts from a
        // snapshot, so there is nothing to keep.
        let _ = self.changes.send(event);
    }

    fn snapshot_and_subscribe(&self) -> (Vec<WorkerRecord>, broadcast::Receiver<MembershipEvent>) {
        let state = self.lock();
        // Subscribing under the lock: every change after this listing reaches the receiver.
        let changes = self.changes.subscribe();
        let snapshot = state.workers.values().cloned().collect();
        (snapshot, changes)
    }

    /// Extends the lease by one TTL; false if the lease no longer exists.
    fn renew(&self, lease: LeaseId) -> bool {
        let mut state = self.lock();
        match state.leases.get_mut(&lease) {
            Some(l) => {
                l.deadline = Instant::now() + self.config.lease_ttl;
                true
            }
            None => false,
        }
    }

    /// Tells anyone still waiting on the registration that nothing renews its lease now, as
    /// the etcd backend does when its keep-alive thread ends.
    fn keep_alive_stopped(&self, lease: LeaseId) {
        if let Some(l) = self.lock().leases.get(&lease) {
            l.state.send_replace(LeaseState::Lost(LeaseLoss::KeepAliveStopped));
        }
    }

    /// Replaces the record of the lease's worker and tells watchers.
    fn update(&self, lease: LeaseId, record: WorkerRecord) -> Result<()> {
        let mut state = self.lock();
        if state.leases.get(&lease).is_none_or(|l| l.worker_id != record.id) {
            return Err(RegistryError::KeepAliveStopped);
        }
        state.workers.insert(record.id.clone(), record.clone());
        self.publish(MembershipEvent::Up(record));
        Ok(())
    }

    /// Removes the lease and its worker; returns whether the lease existed.
    fn end_lease(&self, lease: LeaseId, loss: LeaseLoss) -> bool {
        self.end_lease_locked(&mut self.lock(), lease, loss)
    }

    fn end_lease_locked(&self, state: &mut State, lease: LeaseId, loss: LeaseLoss) -> bool {
        let Some(ended) = state.leases.remove(&lease) else {
            return false;
        };
        state.workers.remove(&ended.worker_id);
        self.publish(MembershipEvent::Down(ended.worker_id));
        ended.state.send_replace(LeaseState::Lost(loss));
        true
    }

    /// Ends the lease if its deadline has passed. Returns the deadline to check again at, or
    /// `None` once the lease is gone.
    fn expire_if_due(&self, lease: LeaseId) -> Option<Instant> {
        // One critical section, so a renewal cannot slip in between the check and the removal.
        let mut state = self.lock();
        let deadline = state.leases.get(&lease)?.deadline;
        if deadline > Instant::now() {
            return Some(deadline);
        }
        self.end_lease_locked(&mut state, lease, LeaseLoss::Expired);
        None
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn register(&self, record: WorkerRecord) -> Result<Registration> {
        validate_worker_id(&record.id)?;
        let runtime = Handle::try_current().map_err(RegistryError::NoRuntime)?;
        let ttl = self.shared.config.lease_ttl;
        let (state_tx, state_rx) = watch::channel(LeaseState::Alive);
        let lease = {
            let mut state = self.shared.lock();
            if state.workers.contains_key(&record.id) {
                return Err(RegistryError::AlreadyRegistered { worker_id: record.id });
            }
            state.next_lease += 1;
            let lease = LeaseId(state.next_lease);
            let deadline = Instant::now() + ttl;
            let worker_id = record.id.clone();
            state.leases.insert(lease, Lease { deadline, worker_id, state: state_tx });
            state.workers.insert(record.id.clone(), record.clone());
            self.shared.publish(MembershipEvent::Up(record.clone()));
            lease
        };
        runtime.spawn(expire_when_due(Arc::clone(&self.shared), lease));
        let (commands_tx, commands_rx) = mpsc::channel(1);
        runtime.spawn(keep_alive(Arc::clone(&self.shared), lease, ttl / 3, commands_rx));
        Ok(Registration::new(record.id, lease, state_rx, commands_tx))
    }

    async fn snapshot_and_watch(&self) -> Result<WorkerWatch> {
        let runtime = Handle::try_current().map_err(RegistryError::NoRuntime)?;
        let (events_tx, events_rx) = mpsc::channel(self.shared.config.watch_buffer);
        let (snapshot, changes) = self.shared.snapshot_and_subscribe();
        // A fresh channel has room for one event, so this cannot wait.
        let _ = events_tx.send(MembershipEvent::Snapshot(snapshot)).await;
        let driver = runtime.spawn(forward(Arc::downgrade(&self.shared), changes, events_tx));
        Ok(WorkerWatch::new(events_rx, driver.abort_handle()))
    }

    async fn campaign(&self, candidate: &str) -> Result<Leadership> {
        validate_worker_id(candidate)?;
        // The semaphore is never closed, so acquiring fails only if it were.
        let permit = Arc::clone(&self.shared.election).acquire_owned().await.map_err(|_| RegistryError::KeepAliveStopped)?;
        *self.shared.leader.lock().unwrap_or_else(PoisonError::into_inner) = Some(candidate.to_string());
        Ok(Leadership::with_permit(candidate.to_string(), permit))
    }

    async fn leader(&self) -> Result<Option<String>> {
        // The permit's holder, unless it was given back since.
        let leader = self.shared.leader.lock().unwrap_or_else(PoisonError::into_inner).clone();
        Ok(leader.filter(|_| self.shared.election.available_permits() == 0))
    }
}

/// Deletes the lease's worker once the lease's deadline passes without a renewal.
async fn expire_when_due(shared: Arc<Shared>, lease: LeaseId) {
    while let Some(deadline) = shared.expire_if_due(lease) {
        tokio::time::sleep_until(deadline).await;
    }
}

/// Renews the lease every `period` until the handle is dropped, revokes on request.
async fn keep_alive(shared: Arc<Shared>, lease: LeaseId, period: Duration, mut commands: mpsc::Receiver<LeaseCommand>) {
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(LeaseCommand::Revoke(reply)) => {
                    shared.end_lease(lease, LeaseLoss::Released);
                    let _ = reply.send(Ok(()));
                    return;
                }
                Some(LeaseCommand::Update(record, reply)) => {
                    let _ = reply.send(shared.update(lease, *record));
                }
                // The handle was dropped: stop renewing and let the lease expire.
                None => {
                    shared.keep_alive_stopped(lease);
                    return;
                }
            },
            _ = tick.tick() => {
                if !shared.renew(lease) {
                    // Whoever ended the lease already published the loss.
                    return;
                }
            }
        }
    }
}

/// Forwards changes to one watcher; re-lists when the watcher lagged and events were dropped.
async fn forward(shared: Weak<Shared>, mut changes: broadcast::Receiver<MembershipEvent>, events: mpsc::Sender<MembershipEvent>) {
    loop {
        let event = match changes.recv().await {
            Ok(event) => event,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "membership watcher fell behind; sending a fresh snapshot");
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                let (snapshot, fresh) = shared.snapshot_and_subscribe();
                changes = fresh;
                MembershipEvent::Snapshot(snapshot)
            }
            Err(RecvError::Closed) => return,
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> WorkerRecord {
        WorkerRecord {
            id: id.into(),
            address: "127.0.0.1:1".into(),
            device: "cpu".into(),
            memory_bytes: 1,
            kv_capacity_tokens: 1,
            version: "test".into(),
            draining: false,
            group: None,
        }
    }

    // Paused time: expiry is exact and the test takes no wall-clock time.
    #[tokio::test(start_paused = true)]
    async fn lease_expires_exactly_one_ttl_after_the_last_renewal() {
        let ttl = Duration::from_secs(3);
        let config = MemoryConfig { lease_ttl: ttl, ..MemoryConfig::default() };
        let registry = MemoryRegistry::new(config).expect("config");
        let mut watch = registry.snapshot_and_watch().await.expect("watch");
        assert_eq!(watch.next().await, Some(MembershipEvent::Snapshot(vec![])));
        let registration = registry.register(record("w1")).await.expect("register");
        assert_eq!(watch.next().await, Some(MembershipEvent::Up(record("w1"))));
        let lost = registration.lost();
        // Dropped right after a renewal at t = 0: the lease ends at t = ttl.
        drop(registration);
        let start = Instant::now();
        assert_eq!(lost.await, LeaseLoss::KeepAliveStopped);
        assert_eq!(watch.next().await, Some(MembershipEvent::Down("w1".into())));
        assert_eq!(start.elapsed(), ttl);
    }

    #[tokio::test(start_paused = true)]
    async fn an_update_replaces_the_record_and_a_new_id_is_refused() {
        let registry = MemoryRegistry::new(MemoryConfig::default()).expect("config");
        let mut watch = registry.snapshot_and_watch().await.expect("watch");
        assert_eq!(watch.next().await, Some(MembershipEvent::Snapshot(vec![])));
        let registration = registry.register(record("w1")).await.expect("register");
        assert_eq!(watch.next().await, Some(MembershipEvent::Up(record("w1"))));
        let draining = WorkerRecord { draining: true, ..record("w1") };
        registration.update(draining.clone()).await.expect("update");
        assert_eq!(watch.next().await, Some(MembershipEvent::Up(draining)));
        assert!(registration.update(record("w2")).await.is_err(), "a registration keeps its id");
        registration.revoke().await.expect("revoke");
        assert_eq!(watch.next().await, Some(MembershipEvent::Down("w1".into())));
    }

    #[tokio::test(start_paused = true)]
    async fn a_watcher_that_lags_gets_a_fresh_snapshot() {
        let config = MemoryConfig { watch_buffer: 2, ..MemoryConfig::default() };
        let registry = MemoryRegistry::new(config).expect("config");
        let mut watch = registry.snapshot_and_watch().await.expect("watch");
        let mut held = Vec::new();
        for i in 0..8 {
            held.push(registry.register(record(&format!("w{i}"))).await.expect("register"));
        }
        // Nothing yielded while registering, so the broadcast buffer overflowed before the
        // driver ran: it must skip the lost events and send a snapshot of all eight.
        let mut events = Vec::new();
        while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(10), watch.next()).await {
            events.push(event);
        }
        let all: Vec<_> = (0..8).map(|i| record(&format!("w{i}"))).collect();
        assert_eq!(events, vec![MembershipEvent::Snapshot(vec![]), MembershipEvent::Snapshot(all)]);
        drop(held);
    }

    #[test]
    fn config_ranges_are_checked() {
        let zero = MemoryConfig { lease_ttl: Duration::ZERO, ..MemoryConfig::default() };
        assert!(matches!(MemoryRegistry::new(zero), Err(RegistryError::InvalidConfig(_))));
        let no_buffer = MemoryConfig { watch_buffer: 0, ..MemoryConfig::default() };
        assert!(matches!(MemoryRegistry::new(no_buffer), Err(RegistryError::InvalidConfig(_))));
    }
}
