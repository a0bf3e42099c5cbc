//! A live registration: the worker's lease, kept alive in the background.
//!
//! [`Registration`] is the handle a worker holds for as long as it serves. Behind it, a
//! backend-specific keep-alive loop renews the lease about every TTL/3 and publishes the
//! lease's state on a watch channel. The handle talks to that loop through a small command
//! channel, so both backends share this one type:
//!
//! * dropping the handle closes the channel; the loop stops renewing and the lease expires
//!   within one TTL (a crashed process behaves the same way);
//! * [`Registration::revoke`] asks the loop to revoke the lease now (graceful leave);
//! * when the loop learns that the lease is gone it publishes [`LeaseState::Lost`] and stops.

use std::fmt;
use std::future::Future;

use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{RegistryError, Result};
use crate::record::WorkerRecord;

/// Id of a lease, as the backend numbers it (etcd's 64-bit lease id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    // etcd prints lease ids in hex (`etcdctl lease list`); matching it makes logs greppable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// Whether a registration's lease still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// The lease was renewed within its TTL.
    Alive,
    /// The lease is gone; the worker's key is (or will shortly be) deleted.
    Lost(LeaseLoss),
}

/// Why a lease was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseLoss {
    /// The registry says the lease no longer exists: it expired, or someone revoked it.
    Expired,
    /// No renewal succeeded for a whole TTL, so the registry has expired the lease by now.
    Unreachable,
    /// This process revoked it through [`Registration::revoke`].
    Released,
    /// The keep-alive loop ended without saying why (its handle was dropped, or it panicked);
    /// nothing renews the lease any more.
    KeepAliveStopped,
}

/// Requests from the handle to its keep-alive loop.
#[derive(Debug)]
pub(crate) enum LeaseCommand {
    /// Revoke the lease now and answer when done.
    Revoke(oneshot::Sender<Result<()>>),
    /// Replace the stored record (same key, same lease) and answer when done.
    Update(Box<WorkerRecord>, oneshot::Sender<Result<()>>),
}

/// A worker's live registration. See the module documentation for its life cycle.
#[derive(Debug)]
pub struct Registration {
    worker_id: String,
    lease: LeaseId,
    state: watch::Receiver<LeaseState>,
    commands: mpsc::Sender<LeaseCommand>,
}

impl Registration {
    pub(crate) fn new(worker_id: String, lease: LeaseId, state: watch::Receiver<LeaseState>, commands: mpsc::Sender<LeaseCommand>) -> Self {
        Self { worker_id, lease, state, commands }
    }

    /// The registered worker id.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The lease the worker's key is attached to.
    pub fn lease_id(&self) -> LeaseId {
        self.lease
    }

    /// The lease's state now.
    pub fn state(&self) -> LeaseState {
        *self.state.borrow()
    }

    /// A receiver that sees every change of the lease's state, for `select!` loops.
    pub fn state_watch(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Resolves once the lease is lost, with the reason. It owns what it needs, so it can be
    /// moved into another task; a worker selects on it to stop taking work and re-register.
    pub fn lost(&self) -> impl Future<Output = LeaseLoss> + Send + 'static {
        let mut state = self.state.clone();
        async move {
            match state.wait_for(|s| matches!(s, LeaseState::Lost(_))).await {
                Ok(s) => match *s {
                    LeaseState::Lost(loss) => loss,
                    LeaseState::Alive => LeaseLoss::KeepAliveStopped,
                },
                // The loop is gone without publishing a loss: nothing renews the lease.
                Err(_) => LeaseLoss::KeepAliveStopped,
            }
        }
    }

    /// Replaces the worker's record under the same lease: watchers see an `Up` with the new
    /// record (a draining worker announces itself this way). The id cannot change.
    pub async fn update(&self, record: WorkerRecord) -> Result<()> {
        if record.id != self.worker_id {
            return Err(RegistryError::InvalidWorkerId { worker_id: record.id, reason: "a registration cannot change its worker id" });
        }
        let (reply, answer) = oneshot::channel();
        self.commands.send(LeaseCommand::Update(Box::new(record), reply)).await.map_err(|_| RegistryError::KeepAliveStopped)?;
        answer.await.map_err(|_| RegistryError::KeepAliveStopped)?
    }

    /// Revokes the lease: the worker's key is deleted at once and watchers see it leave.
    /// Succeeds too when the lease was already lost, since the key is then gone (or expiring)
    /// either way.
    pub async fn revoke(self) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        let answered = match self.commands.send(LeaseCommand::Revoke(reply)).await {
            Ok(()) => answer.await.ok(),
            Err(_) => None,
        };
        match answered {
            Some(result) => result,
            // The loop ended before answering. It ends on its own only after publishing a
            // loss; anything else means it died while the lease may still be alive.
            None if matches!(self.state(), LeaseState::Lost(_)) => Ok(()),
            None => Err(RegistryError::KeepAliveStopped),
        }
    }
}
