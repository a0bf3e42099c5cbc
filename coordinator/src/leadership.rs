//! Leading the cluster: several coordinators may follow one registry, and only the elected
//! leader forms groups and serves requests.
//!
//! A coordinator campaigns at start ([`lead`]). While it stands by it forms no group, so its
//! health check for `tessera.v1.Inference` says `NOT_SERVING` (a Kubernetes Service with that
//! readiness check routes only to the leader) and it refuses requests with `UNAVAILABLE`
//! naming the leader. Once elected it follows the registry like a lone coordinator would: every
//! registered worker is free to it, and assigning a worker to a new group replaces whatever the
//! previous leader had left on it. A leader that loses its lease (it was cut off from etcd for a
//! whole TTL) must assume a successor already drives its workers, so it stops at once: its
//! streams end with `UNAVAILABLE` and the process exits for its supervisor to restart it as a
//! standby. On shutdown it resigns, so a standby takes over without waiting out the lease.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tessera_registry::{Leadership, Registry, Retry};
use tokio::sync::oneshot;

use crate::cluster::Cluster;
use crate::error::CoordinatorError;

/// First pause between campaign attempts after an error; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);
/// How often a standby looks up who leads, for its refusals and its status.
const LEADER_REFRESH: Duration = Duration::from_secs(2);

/// Whether this coordinator leads, and who does.
#[derive(Debug, Default)]
pub(crate) struct Standing {
    leading: AtomicBool,
    leader: Mutex<Option<String>>,
}

impl Standing {
    pub(crate) fn is_leading(&self) -> bool {
        self.leading.load(Ordering::Acquire)
    }

    /// The leader's name as last seen (this coordinator's own while it leads).
    pub(crate) fn leader(&self) -> Option<String> {
        self.leader.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set_leader(&self, leader: Option<String>) {
        *self.leader.lock().unwrap_or_else(PoisonError::into_inner) = leader;
    }

    fn lead(&self, me: &str) {
        self.set_leader(Some(me.to_string()));
        self.leading.store(true, Ordering::Release);
    }

    /// The refusal a standby gives a request.
    pub(crate) fn refusal(&self) -> CoordinatorError {
        let leader = self.leader().map_or_else(|| "being elected".to_string(), |l| format!("{l:?}"));
        CoordinatorError::Unavailable(format!(
            "this coordinator is a standby and serves no requests; the leader is {leader}: send requests to the coordinator whose \
             health check for tessera.v1.Inference says SERVING"
        ))
    }
}

/// Campaigns as `candidate`, then leads `cluster` until `resign` fires (returns `Ok`) or the
/// leadership is lost (returns the error the process should exit with).
pub(crate) async fn lead(
    cluster: Arc<Cluster>,
    registry: Arc<dyn Registry>,
    candidate: String,
    mut resign: oneshot::Receiver<()>,
) -> Result<(), CoordinatorError> {
    let Some(leadership) = campaign(&cluster, registry.as_ref(), &candidate, &mut resign).await? else {
        return Ok(());
    };
    let lost = leadership.lost();
    tokio::pin!(lost);
    // Listing the workers only now: a standby must not act on them.
    let watch = tokio::select! {
        watch = registry.snapshot_and_watch() => watch?,
        loss = &mut lost => return Err(CoordinatorError::LeadershipLost(format!("{loss:?}"))),
        _ = &mut resign => return step_down(leadership).await,
    };
    cluster.standing.lead(&candidate);
    tracing::info!(%candidate, "elected: leading the cluster");
    tokio::select! {
        () = cluster.clone().follow(watch) => Err(CoordinatorError::Internal("the registry watch ended".into())),
        loss = &mut lost => {
            tracing::error!(%candidate, ?loss, "leadership lost: another coordinator may drive the workers now; stopping");
            Err(CoordinatorError::LeadershipLost(format!("{loss:?}")))
        }
        _ = &mut resign => step_down(leadership).await,
    }
}

/// Campaigns until elected; `None` if `resign` fired first. Meanwhile keeps the standby's idea
/// of who leads fresh.
async fn campaign(
    cluster: &Cluster,
    registry: &dyn Registry,
    candidate: &str,
    resign: &mut oneshot::Receiver<()>,
) -> Result<Option<Leadership>, CoordinatorError> {
    let mut delay = FIRST_RETRY;
    loop {
        let watch_leader = async {
            loop {
                match registry.leader().await {
                    Ok(leader) => {
                        if leader != cluster.standing.leader() {
                            tracing::info!(%candidate, leader = leader.as_deref().unwrap_or("none"), "standing by");
                        }
                        cluster.standing.set_leader(leader);
                    }
                    Err(error) => tracing::warn!(%error, "could not look up the leader"),
                }
                tokio::time::sleep(LEADER_REFRESH).await;
            }
        };
        let error = tokio::select! {
            won = registry.campaign(candidate) => match won {
                Ok(leadership) => return Ok(Some(leadership)),
                Err(error) => error,
            },
            // Never ends: it only refreshes the standby's view while the campaign waits.
            () = watch_leader => continue,
            _ = &mut *resign => return Ok(None),
        };
        if error.retry() == Retry::Never {
            return Err(error.into());
        }
        tracing::warn!(%error, retry_in = ?delay, "campaign failed; retrying");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = &mut *resign => return Ok(None),
        }
        delay = (delay * 2).min(MAX_RETRY);
    }
}

async fn step_down(leadership: Leadership) -> Result<(), CoordinatorError> {
    let candidate = leadership.candidate().to_string();
    match leadership.resign().await {
        Ok(()) => tracing::info!(%candidate, "resigned the leadership"),
        Err(error) => tracing::warn!(%candidate, %error, "could not resign; a standby takes over within one lease TTL"),
    }
    Ok(())
}
