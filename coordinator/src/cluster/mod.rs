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
//!
//! The parts: [`membership`] follows the registry and tears lost groups down, [`formation`]
//! turns free workers into loaded groups, [`routing`] places requests (the decision itself is
//! [`crate::placement`]'s, over a snapshot taken here), and [`status`] reports.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tessera_proto::worker::worker_client::WorkerClient;
use tessera_registry::WorkerRecord;
use tokio::sync::{mpsc, watch, Notify};
use tonic::transport::{Channel, Endpoint};

use crate::metrics::Metrics;
use crate::model::ServedModel;
use crate::placement::GroupView;
use crate::prefix_affinity::PrefixIndex;
use crate::scheduler::{LoopConfig, NewSequence};

mod adapters;
mod formation;
mod membership;
mod routing;
mod status;

pub(crate) use routing::{Ask, RingLease, RingMember, Route};
pub use status::reported;

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
    /// Send a request to the group that was lately sent the longest prefix of its prompt (its
    /// workers likely hold that prefix's KV blocks) unless it runs more than this many requests
    /// beyond the least busy group; `None`: always the least busy group.
    pub prefix_affinity_margin: Option<usize>,
    /// Times one request may move to another group when its group is lost mid-request; past
    /// that it ends with `UNAVAILABLE`. 0 turns migration off.
    pub migration_limit: u32,
    /// Mutual TLS to the workers (the cluster CA and this coordinator's certificate); `None`
    /// dials them in plaintext.
    pub worker_tls: Option<Arc<tessera_tls::ClientTls>>,
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
            prefix_affinity_margin: Some(2),
            migration_limit: 3,
            worker_tls: None,
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

struct WorkerEntry {
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
    workers: Vec<String>,
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
    workers: BTreeMap<String, WorkerEntry>,
    groups: BTreeMap<u64, GroupEntry>,
    /// Models whose workers refused them for good, with the reason: no group forms for them.
    failed: BTreeMap<usize, String>,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Prompt blocks placed on each group lately, for prefix affinity.
    prefixes: PrefixIndex,
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
    /// Whether this coordinator leads: a standby forms no group and places nothing.
    pub(crate) standing: crate::leadership::Standing,
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
            standing: crate::leadership::Standing::default(),
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

    pub(crate) fn step_timeout(&self) -> Duration {
        self.config.group_loop.step_timeout
    }

    /// Times one request may move after losing its group or ring.
    pub(crate) fn migration_limit(&self) -> u32 {
        self.config.migration_limit
    }

    /// What placement sees of every group, taken under the lock.
    fn views(&self, state: &State) -> Vec<GroupView> {
        self.views_for(state, &[])
    }

    /// [`Cluster::views`], with how much of a prompt of `blocks`
    /// ([`crate::prefix_affinity::prompt_blocks`]) each group was sent lately.
    fn views_for(&self, state: &State, blocks: &[u64]) -> Vec<GroupView> {
        state
            .groups
            .iter()
            .map(|(&id, g)| GroupView {
                id,
                model: g.model,
                kv_capacity: g.kv_capacity,
                serving: g.serving.is_some(),
                held: g.held_by.is_some(),
                draining: g.draining,
                active: g.serving.as_ref().map_or(0, |s| s.active.load(Ordering::Relaxed)),
                last_placed: g.serving.as_ref().map_or(0, |s| s.last_placed.load(Ordering::Relaxed)),
                cached_prefix: state.prefixes.cached_tokens(id, blocks),
            })
            .collect()
    }
}

pub(crate) fn group_name(id: u64) -> String {
    format!("g{id}")
}

fn connect(address: &str, config: &ClusterConfig) -> Result<WorkerClient<Channel>, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(format!("http://{address}"))?.connect_timeout(config.rpc_timeout).tcp_nodelay(true);
    let channel = match &config.worker_tls {
        None => endpoint.connect_lazy(),
        Some(tls) => {
            endpoint.connect_with_connector_lazy(crate::tls::WorkerConnector { tls: tls.clone(), handshake_timeout: config.rpc_timeout })
        }
    };
    Ok(WorkerClient::new(channel))
}
