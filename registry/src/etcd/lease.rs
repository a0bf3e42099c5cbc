//! Registration in etcd and the lease keep-alive loop, on a thread of its own.
//!
//! Why a dedicated OS thread with its own current-thread runtime and its own etcd client: a
//! worker's tokio runtime also runs request handling, and a stretch of blocking work there
//! (a long tokenization, a slow lock, a busy engine hand-off) would delay a keep-alive task
//! spawned beside it; a lease that misses its renewals expires and the coordinator drops a
//! healthy worker. A separate task on the same runtime would not be enough, and neither would
//! a separate thread borrowing the application's client: tonic does a channel's I/O in a
//! background task on the runtime that created the channel. So the thread creates its own
//! client and owns everything the renewals need. One thread per registration is cheap, since a
//! process registers once.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::{connect_client, revoke, with_timeout, EtcdConfig};
use crate::error::{is_lease_not_found, RegistryError, Result};
use crate::keys::worker_key;
use crate::lease::{LeaseCommand, LeaseId, LeaseLoss, LeaseState, Registration};
use crate::record::WorkerRecord;

/// Starts the keep-alive thread, which creates the lease and, given a `value`, the worker's key,
/// and waits for its answer. Without a value the lease is held bare, for a caller that attaches
/// keys of its own (a coordinator's election campaign).
pub(super) async fn register(config: Arc<EtcdConfig>, worker_id: String, value: Option<Vec<u8>>) -> Result<Registration> {
    let (ready_tx, ready_rx) = oneshot::channel();
    let (commands_tx, commands_rx) = mpsc::channel(1);
    let (state_tx, state_rx) = watch::channel(LeaseState::Alive);
    let request = Request { config, worker_id: worker_id.clone(), value };
    std::thread::Builder::new()
        .name("tessera-lease".into())
        .spawn(move || {
            // Built on the thread itself: a runtime must not be dropped inside an async
            // context, which is where a failed spawn would otherwise drop it.
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            match runtime {
                Ok(runtime) => runtime.block_on(run(request, ready_tx, commands_rx, state_tx)),
                Err(error) => {
                    let _ = ready_tx.send(Err(RegistryError::KeepAliveThread(error)));
                }
            }
        })
        .map_err(RegistryError::KeepAliveThread)?;
    let lease = ready_rx.await.map_err(|_| RegistryError::KeepAliveStopped)??;
    Ok(Registration::new(worker_id, lease, state_rx, commands_tx))
}

/// What the thread needs to register.
struct Request {
    config: Arc<EtcdConfig>,
    worker_id: String,
    value: Option<Vec<u8>>,
}

/// The thread's body: register, answer, then keep the lease alive.
async fn run(
    request: Request,
    ready: oneshot::Sender<Result<LeaseId>>,
    commands: mpsc::Receiver<LeaseCommand>,
    state: watch::Sender<LeaseState>,
) {
    let Request { config, worker_id, value } = request;
    let (mut client, lease, ttl) = match establish(&config, &worker_id, value).await {
        Ok(established) => established,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let renewed_at = Instant::now();
    // Open the stream before answering, so the first renewal does not have to.
    let keeper = match open_keeper(&mut client, lease, config.request_timeout).await {
        Ok(keeper) => Some(keeper),
        Err(error) => {
            tracing::warn!(%error, %lease, "could not open the lease keep-alive stream; retrying");
            None
        }
    };
    if ready.send(Ok(lease)).is_err() {
        // The caller gave up on `register`: nobody holds this registration, so remove it now
        // rather than leave a phantom worker for a TTL.
        let _ = revoke(&mut client, lease, config.request_timeout).await;
        return;
    }
    let holder = Holder { config, worker_id, lease, ttl, client, keeper, state };
    holder.keep_alive(renewed_at, commands).await;
}

/// Connects, grants a lease and, given a value, creates the worker's key if absent.
async fn establish(config: &EtcdConfig, worker_id: &str, value: Option<Vec<u8>>) -> Result<(Client, LeaseId, Duration)> {
    let timeout = config.request_timeout;
    let mut client = connect_client(config).await?;
    let grant = with_timeout("lease grant", timeout, client.lease_grant(config.lease_ttl_secs(), None)).await?;
    let lease = LeaseId(grant.id());
    // Follow what etcd granted: it raises TTLs below its minimum.
    let ttl = secs(grant.ttl()).max(Duration::from_secs(1));
    let Some(value) = value else {
        return Ok((client, lease, ttl));
    };

    let key = worker_key(worker_id);
    let create = Txn::new().when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)]).and_then([TxnOp::put(
        key,
        value,
        Some(PutOptions::new().with_lease(lease.0)),
    )]);
    let created = with_timeout("register", timeout, client.txn(create)).await;
    match created {
        Ok(response) if response.succeeded() => Ok((client, lease, ttl)),
        outcome => {
            // Revoking also undoes a put that landed although its answer was lost.
            if let Err(error) = revoke(&mut client, lease, timeout).await {
                tracing::warn!(%error, %lease, "could not revoke an unused lease; it will expire");
            }
            match outcome {
                Ok(_) => Err(RegistryError::AlreadyRegistered { worker_id: worker_id.to_string() }),
                Err(error) => Err(error),
            }
        }
    }
}

/// The keep-alive loop's state, owned by the thread.
struct Holder {
    config: Arc<EtcdConfig>,
    worker_id: String,
    lease: LeaseId,
    ttl: Duration,
    client: Client,
    /// The open keep-alive stream; `None` after it failed, re-opened at the next renewal.
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    state: watch::Sender<LeaseState>,
}

/// What one renewal attempt found.
enum Renewal {
    Renewed,
    /// etcd says the lease does not exist any more.
    Gone,
    /// No answer; the lease may still live.
    Failed(RegistryError),
}

impl Holder {
    /// Renews every TTL/3 until the handle is dropped, a revoke is asked for, or the lease is
    /// lost.
    async fn keep_alive(mut self, mut renewed_at: Instant, mut commands: mpsc::Receiver<LeaseCommand>) {
        let period = self.ttl / 3;
        // One attempt never outlasts a period, so the loop keeps its rhythm and notices the
        // deadline on time.
        let attempt_timeout = period.min(self.config.request_timeout);
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(LeaseCommand::Revoke(reply)) => {
                        let timeout = self.config.request_timeout;
                        let result = revoke(&mut self.client, self.lease, timeout).await;
                        self.state.send_replace(LeaseState::Lost(LeaseLoss::Released));
                        let _ = reply.send(result.map(|_existed| ()));
                        return;
                    }
                    Some(LeaseCommand::Update(record, reply)) => {
                        let _ = reply.send(self.put(&record).await);
                    }
                    // The handle was dropped. Stop renewing; etcd expires the lease.
                    None => return,
                },
                _ = tick.tick() => {
                    if let Some(loss) = self.renew_in_time(attempt_timeout, &mut renewed_at).await {
                        self.state.send_replace(LeaseState::Lost(loss));
                        return;
                    }
                }
            }
        }
    }

    /// Overwrites the worker's key under the same lease.
    async fn put(&mut self, record: &WorkerRecord) -> Result<()> {
        let value = serde_json::to_vec(record).map_err(|source| RegistryError::EncodeRecord { worker_id: record.id.clone(), source })?;
        let options = Some(PutOptions::new().with_lease(self.lease.0));
        let put = self.client.put(worker_key(&self.worker_id), value, options);
        with_timeout("update worker", self.config.request_timeout, put).await.map(|_| ())
    }

    /// One renewal; the loss if the lease is gone or has gone unrenewed for a whole TTL.
    async fn renew_in_time(&mut self, timeout: Duration, renewed_at: &mut Instant) -> Option<LeaseLoss> {
        let lease = self.lease;
        let sent_at = Instant::now();
        match self.renew(timeout).await {
            Renewal::Renewed => {
                // The server counts from when it got the request, later than `sent_at`:
                // measuring from `sent_at` errs on the early side.
                *renewed_at = sent_at;
                None
            }
            Renewal::Gone => {
                let worker_id = &self.worker_id;
                tracing::warn!(%lease, %worker_id, "lease lost: etcd no longer has it");
                Some(LeaseLoss::Expired)
            }
            Renewal::Failed(error) => {
                tracing::warn!(%error, %lease, "lease renewal failed");
                if renewed_at.elapsed() < self.ttl {
                    return None;
                }
                let worker_id = &self.worker_id;
                tracing::warn!(%lease, %worker_id, "lease lost: no renewal for a whole TTL");
                Some(LeaseLoss::Unreachable)
            }
        }
    }

    async fn renew(&mut self, timeout: Duration) -> Renewal {
        let lease = self.lease;
        if let Some((keeper, responses)) = self.keeper.as_mut() {
            let exchange = async {
                keeper.keep_alive().await?;
                responses.message().await
            };
            let failure = match tokio::time::timeout(timeout, exchange).await {
                // etcd answers TTL 0 for a lease it does not know.
                Ok(Ok(Some(response))) if response.ttl() <= 0 => return Renewal::Gone,
                Ok(Ok(Some(_))) => return Renewal::Renewed,
                Ok(Ok(None)) => RegistryError::Etcd {
                    operation: "lease keep-alive",
                    source: etcd_client::Error::LeaseKeepAliveError("stream ended".into()),
                },
                Ok(Err(source)) => RegistryError::Etcd { operation: "lease keep-alive", source },
                Err(_) => RegistryError::Timeout { operation: "lease keep-alive", timeout },
            };
            // A late answer would pair with the next request; start over with a fresh stream.
            self.keeper = None;
            return Renewal::Failed(failure);
        }

        // Re-opening. Ask for the remaining TTL first: etcd answers -1 for a missing lease,
        // where opening the stream would report it only inside an error message.
        let remaining = self.client.lease_time_to_live(lease.0, None);
        match with_timeout("lease time-to-live", timeout, remaining).await {
            Ok(response) if response.ttl() <= 0 => return Renewal::Gone,
            Ok(_) => {}
            Err(RegistryError::Etcd { source, .. }) if is_lease_not_found(&source) => return Renewal::Gone,
            Err(error) => return Renewal::Failed(error),
        }
        // Opening the stream renews once.
        match open_keeper(&mut self.client, lease, timeout).await {
            Ok(keeper) => {
                self.keeper = Some(keeper);
                Renewal::Renewed
            }
            Err(error) => Renewal::Failed(error),
        }
    }
}

async fn open_keeper(client: &mut Client, lease: LeaseId, timeout: Duration) -> Result<(LeaseKeeper, LeaseKeepAliveStream)> {
    with_timeout("lease keep-alive", timeout, client.lease_keep_alive(lease.0)).await
}

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}
