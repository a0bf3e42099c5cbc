//! Keeps a serving worker registered in etcd, and wires its registration to its admission.
//!
//! The life cycle: register once the gRPC server is bound; hold the [`Registration`] while
//! serving; when its lease is lost the coordinator has already written the worker off, so pause
//! admission (refuse `Assign`, drop the group), register again with capped backoff and resume;
//! on shutdown revoke, so the coordinator sees the worker leave at once rather than one TTL later.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use anyhow::Context;
use tessera_registry::{EtcdConfig, EtcdRegistry, Registration, Registry, RegistryError, Retry, WorkerRecord};
use tessera_worker::Admission;
use tokio::time::Instant;

use super::readiness::Readiness;

/// First pause between registration attempts; it doubles up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Longest pause between registration attempts, so a worker is back soon after etcd is.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);

/// How long a registration attempt loop may go on.
#[derive(Debug, Clone, Copy)]
enum Patience {
    /// At start-up: a dead predecessor's lease expires within one TTL, so an id still taken
    /// well after that belongs to a live worker, and starting would be an error.
    Until(Instant),
    /// After losing the lease: the worker is useless unregistered, so it keeps trying.
    Forever,
}

/// Registers `record` and keeps it registered until `shutdown` resolves, then drains (for up
/// to `drain`) and revokes it. Fails if etcd cannot be reached at start, if the record is
/// refused outright, or if the engine is gone when admission must be paused.
pub async fn stay_registered(
    etcd: EtcdConfig,
    record: WorkerRecord,
    admission: Admission,
    readiness: &Readiness,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> anyhow::Result<()> {
    let start_patience = Patience::Until(Instant::now() + 2 * etcd.lease_ttl);
    let endpoints = etcd.endpoints.join(",");
    let registry = EtcdRegistry::connect(etcd).await.with_context(|| format!("connect to etcd at {endpoints}"))?;
    let mut shutdown = std::pin::pin!(shutdown);
    let Some(mut registration) = register(&registry, &record, start_patience, shutdown.as_mut()).await? else {
        return Ok(());
    };
    tracing::info!(id = %record.id, address = %record.address, lease = %registration.lease_id(), "worker registered");
    loop {
        tokio::select! {
            () = shutdown.as_mut() => {
                drain_then_leave(registration, &record, &admission, readiness, drain).await;
                return Ok(());
            }
            loss = registration.lost() => {
                tracing::warn!(id = %record.id, ?loss, "worker registration lost; taking no new work until registered again");
                readiness.close();
                admission.pause().await.context("reset the engine after losing the registration")?;
                registration = match register(&registry, &record, Patience::Forever, shutdown.as_mut()).await? {
                    Some(registration) => registration,
                    None => return Ok(()),
                };
                admission.resume();
                // Ready again once a coordinator has put the worker in a group.
                readiness.open();
                tracing::info!(id = %record.id, lease = %registration.lease_id(), "worker registered again; taking new work");
            }
        }
    }
}

/// How often a draining worker looks at what its engine still holds.
const DRAIN_CHECK: Duration = Duration::from_millis(50);

/// The graceful way out: announce `draining` (coordinators stop placing work here at once),
/// let the sequences the engine holds finish for up to `drain`, then revoke.
async fn drain_then_leave(
    registration: Registration,
    record: &WorkerRecord,
    admission: &Admission,
    readiness: &Readiness,
    drain: Duration,
) {
    let id = &record.id;
    if !drain.is_zero() {
        readiness.close();
        let draining = WorkerRecord { draining: true, ..record.clone() };
        match registration.update(draining).await {
            Ok(()) => {
                tracing::info!(%id, limit = ?drain, "draining: finishing running sequences before leaving");
                let deadline = Instant::now() + drain;
                let mut check = tokio::time::interval(DRAIN_CHECK);
                loop {
                    check.tick().await;
                    match admission.sequences().await {
                        Ok(0) | Err(_) => break,
                        Ok(n) if Instant::now() >= deadline => {
                            tracing::warn!(%id, sequences = n, "drain time is up; leaving with sequences still running");
                            break;
                        }
                        Ok(_) => {}
                    }
                }
            }
            Err(error) => tracing::warn!(%id, %error, "could not announce draining; leaving now"),
        }
    }
    leave(registration).await;
}

/// Revokes the registration so watchers see the worker leave now. A failure is only logged:
/// the worker is exiting either way, and then its lease expires within one TTL.
async fn leave(registration: Registration) {
    let id = registration.worker_id().to_string();
    match registration.revoke().await {
        Ok(()) => tracing::info!(%id, "worker registration revoked"),
        Err(error) => tracing::warn!(%id, %error, "could not revoke the worker registration; it expires within one lease TTL"),
    }
}

/// Registers `record`, retrying with capped backoff while retrying can help and `patience`
/// lasts. `None` when `shutdown` resolved first.
async fn register(
    registry: &EtcdRegistry,
    record: &WorkerRecord,
    patience: Patience,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<Option<Registration>> {
    let mut delay = FIRST_RETRY_DELAY;
    loop {
        // An attempt in flight is not abandoned for a shutdown: it may already hold a lease,
        // and only a finished attempt returns the handle that can revoke it.
        let error = match registry.register(record.clone()).await {
            Ok(registration) => return Ok(Some(registration)),
            Err(error) => error,
        };
        let gave_up = match patience {
            Patience::Until(deadline) => Instant::now() + delay > deadline,
            Patience::Forever => false,
        };
        if error.retry() == Retry::Never || gave_up {
            return Err(refusal(error));
        }
        tracing::warn!(id = %record.id, %error, retry_in = ?delay, "worker registration failed; retrying");
        tokio::select! {
            () = shutdown.as_mut() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_RETRY_DELAY);
    }
}

/// The error a worker exits with when it cannot register.
fn refusal(error: RegistryError) -> anyhow::Error {
    let hint = match &error {
        RegistryError::AlreadyRegistered { .. } => "another live worker holds this id; give this one a different --id",
        _ => "the worker cannot register",
    };
    anyhow::Error::new(error).context(hint)
}
