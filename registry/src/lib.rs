//! Cluster membership for Tessera: workers announce themselves, coordinators watch.
//!
//! The contract is the [`Registry`] trait. A worker calls [`Registry::register`] once and holds
//! the returned [`Registration`] for as long as it serves: its record lives under a lease that
//! a keep-alive loop renews, so a crashed worker disappears within one lease TTL. A coordinator
//! calls [`Registry::snapshot_and_watch`] and applies the [`MembershipEvent`]s it yields.
//!
//! Two implementations:
//! * [`EtcdRegistry`] — production: etcd leases, create-if-absent transactions, list then watch
//!   from the listed revision + 1;
//! * [`MemoryRegistry`] — the same semantics inside one process, for the one-machine
//!   `tessera up` default and for tests.
//!
//! Coordinators also elect a leader here ([`Registry::campaign`], [`Leadership`]): only the
//! leader forms groups and serves.
//!
//! Architecture invariant: this is the only crate that knows etcd. Keys are built only in
//! [`keys`].

mod election;
mod error;
mod etcd;
pub mod keys;
mod lease;
mod memory;
mod record;
mod watch;

use async_trait::async_trait;

pub use election::Leadership;
pub use error::{RegistryError, Result, Retry};
pub use etcd::{EtcdConfig, EtcdRegistry, EtcdSecurity};
pub use lease::{LeaseId, LeaseLoss, LeaseState, Registration};
pub use memory::{MemoryConfig, MemoryRegistry};
pub use record::WorkerRecord;
pub use watch::{MembershipEvent, WorkerWatch};

/// Where workers announce themselves and coordinators learn who is alive.
///
/// Object safe: the coordinator holds an `Arc<dyn Registry>` and does not care which backend
/// it has.
#[async_trait]
pub trait Registry: Send + Sync {
    /// Announces a worker. Creates its key only if absent, attached to a fresh lease, and
    /// starts renewing the lease. Fails with [`RegistryError::AlreadyRegistered`] while
    /// another live lease holds the same id.
    async fn register(&self, record: WorkerRecord) -> Result<Registration>;

    /// Lists the live workers and watches for changes from that point on, with no gap: the
    /// first event is a [`MembershipEvent::Snapshot`] of the listing.
    async fn snapshot_and_watch(&self) -> Result<WorkerWatch>;

    /// Campaigns for the leadership of the coordinators as `candidate` (checked like a worker
    /// id) and resolves once this candidate leads; candidates lead in the order they
    /// campaigned. Dropping the future withdraws the candidacy (with etcd, within one TTL).
    async fn campaign(&self, candidate: &str) -> Result<Leadership>;

    /// The candidate that leads now, if any.
    async fn leader(&self) -> Result<Option<String>>;
}
