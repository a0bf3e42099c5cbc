//! List, then watch from the listed revision + 1, and never lose an event.
//!
//! The listing's header revision R is the store revision it reflects; a watch that starts at
//! R + 1 replays from etcd's history every change made after the listing, including those
//! made before the watch existed. The driver then tracks the last revision it delivered
//! (event revisions, and the header revision of progress notifications, which etcd sends only
//! to watchers that are fully caught up). After a broken stream it resumes from the revision
//! after that one, so a short outage costs no re-list. Only when etcd answers that the history
//! it needs was compacted does it list again and send a fresh snapshot.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, KeyValue, WatchOptions, WatchStream};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::{decode_record, list, with_timeout, EtcdConfig};
use crate::error::{RegistryError, Result};
use crate::keys::{worker_id_from_key, WORKERS_PREFIX};
use crate::watch::{MembershipEvent, WorkerWatch};

/// First pause before re-establishing a broken watch; doubles up to `watch_retry_max`.
const FIRST_RETRY: Duration = Duration::from_millis(50);

/// Lists, opens the watch and hands both to a driver task. Errors here (etcd unreachable)
/// reach the caller; later failures are retried by the driver.
pub(super) async fn start(mut client: Client, config: Arc<EtcdConfig>) -> Result<WorkerWatch> {
    let runtime = Handle::try_current().map_err(RegistryError::NoRuntime)?;
    let (records, revision) = list(&mut client, config.request_timeout).await?;
    let opened = open(&mut client, revision + 1, config.request_timeout).await?;
    let (events_tx, events_rx) = mpsc::channel(config.watch_buffer);
    // A fresh channel has room for one event, so this cannot wait.
    let _ = events_tx.send(MembershipEvent::Snapshot(records)).await;
    let driver = Driver { client, config, events: events_tx, last_revision: revision };
    let stream = match opened {
        Opened::Watching(stream) => Some(stream),
        // Compacted between our listing and the watch: the driver lists again at once.
        Opened::Compacted => None,
    };
    let task = runtime.spawn(driver.run(stream));
    Ok(WorkerWatch::new(events_rx, task.abort_handle()))
}

/// Outcome of creating a watch.
enum Opened {
    // Boxed: the stream is large and `Compacted` carries nothing.
    Watching(Box<WatchStream>),
    /// The start revision is older than etcd's compacted history.
    Compacted,
}

/// Creates a prefix watch starting at `start_revision` and waits for etcd to confirm it.
async fn open(client: &mut Client, start_revision: i64, timeout: Duration) -> Result<Opened> {
    let options = WatchOptions::new().with_prefix().with_start_revision(start_revision).with_progress_notify();
    let mut stream = with_timeout("watch", timeout, client.watch(WORKERS_PREFIX, Some(options))).await?;
    // etcd confirms the creation first. A compacted start revision usually arrives right after
    // it as a cancellation, which `Driver::follow` handles like any later one; should the
    // confirmation itself carry the compact revision, it is handled here.
    match with_timeout("watch", timeout, stream.message()).await? {
        Some(response) if response.compact_revision() > 0 => Ok(Opened::Compacted),
        Some(response) if response.created() && !response.canceled() => Ok(Opened::Watching(Box::new(stream))),
        Some(response) => Err(RegistryError::Etcd {
            operation: "watch",
            source: etcd_client::Error::WatchError(format!("etcd refused the watch: {}", response.cancel_reason())),
        }),
        None => Err(RegistryError::Etcd {
            operation: "watch",
            source: etcd_client::Error::WatchError("stream ended before it was created".into()),
        }),
    }
}

/// Why following a watch stream stopped.
enum Interruption {
    /// The stream failed or ended; resume from the last revision.
    Broken,
    /// etcd no longer has the history the watch needs; list again.
    Compacted,
    /// The consumer dropped its `WorkerWatch`.
    ConsumerGone,
}

struct Driver {
    client: Client,
    config: Arc<EtcdConfig>,
    events: mpsc::Sender<MembershipEvent>,
    /// Every change up to this revision has been delivered (or covered by a snapshot).
    last_revision: i64,
}

impl Driver {
    async fn run(mut self, mut stream: Option<Box<WatchStream>>) {
        let mut relist = stream.is_none();
        loop {
            if let Some(mut watching) = stream.take() {
                match self.follow(&mut watching).await {
                    Interruption::Broken => relist = false,
                    Interruption::Compacted => relist = true,
                    Interruption::ConsumerGone => return,
                }
            }
            match self.reestablish(relist).await {
                Some(watching) => stream = Some(watching),
                None => return,
            }
        }
    }

    /// Delivers events until the stream is interrupted.
    async fn follow(&mut self, stream: &mut WatchStream) -> Interruption {
        loop {
            let response = match stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => {
                    tracing::warn!(revision = self.last_revision, "etcd closed the membership watch; resuming");
                    return Interruption::Broken;
                }
                Err(error) => {
                    let revision = self.last_revision;
                    tracing::warn!(%error, revision, "membership watch failed; resuming");
                    return Interruption::Broken;
                }
            };
            if response.canceled() {
                if response.compact_revision() > 0 {
                    tracing::warn!(
                        compacted = response.compact_revision(),
                        revision = self.last_revision,
                        "membership history compacted past the watch; re-listing"
                    );
                    return Interruption::Compacted;
                }
                tracing::warn!(reason = response.cancel_reason(), "etcd cancelled the membership watch; resuming");
                return Interruption::Broken;
            }
            if response.events().is_empty() {
                // A progress notification: etcd sends these only when the watcher has seen
                // every event up to the header revision.
                if !response.created() {
                    if let Some(header) = response.header() {
                        self.last_revision = self.last_revision.max(header.revision());
                    }
                }
                continue;
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                if let Some(change) = translate(event.event_type(), kv) {
                    if self.events.send(change).await.is_err() {
                        return Interruption::ConsumerGone;
                    }
                }
                self.last_revision = self.last_revision.max(kv.mod_revision());
            }
        }
    }

    /// Re-opens the watch, listing first when `relist` (or when etcd says the history is gone),
    /// with backoff while etcd is unreachable. `None` once the consumer is gone.
    async fn reestablish(&mut self, mut relist: bool) -> Option<Box<WatchStream>> {
        let timeout = self.config.request_timeout;
        let mut pause = FIRST_RETRY;
        loop {
            if relist {
                match list(&mut self.client, timeout).await {
                    Ok((records, revision)) => {
                        self.events.send(MembershipEvent::Snapshot(records)).await.ok()?;
                        self.last_revision = revision;
                        relist = false;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "re-listing workers failed; retrying");
                        pause = self.back_off(pause).await?;
                        continue;
                    }
                }
            }
            match open(&mut self.client, self.last_revision + 1, timeout).await {
                Ok(Opened::Watching(stream)) => return Some(stream),
                Ok(Opened::Compacted) => {
                    tracing::warn!(revision = self.last_revision, "membership history compacted while disconnected; re-listing");
                    relist = true;
                }
                Err(error) => {
                    tracing::warn!(%error, "re-opening the membership watch failed; retrying");
                    pause = self.back_off(pause).await?;
                }
            }
        }
    }

    /// Waits `pause` (or until the consumer leaves) and returns the next, longer pause.
    async fn back_off(&self, pause: Duration) -> Option<Duration> {
        tokio::select! {
            _ = tokio::time::sleep(pause) => Some((pause * 2).min(self.config.watch_retry_max)),
            _ = self.events.closed() => None,
        }
    }
}

/// The membership change one etcd event means, if it concerns a worker key.
fn translate(kind: EventType, kv: &KeyValue) -> Option<MembershipEvent> {
    let id = worker_id_from_key(kv.key_str().ok()?)?;
    match kind {
        EventType::Delete => Some(MembershipEvent::Down(id.to_string())),
        // A record nobody can read replaced whatever was there: the worker is unusable now.
        EventType::Put => Some(match decode_record(id, kv.value()) {
            Some(record) => MembershipEvent::Up(record),
            None => MembershipEvent::Down(id.to_string()),
        }),
    }
}
