//! What only the etcd backend faces: lost connections and compacted history.
//!
//! The registry under test reaches etcd through a [`Proxy`]; cutting the proxy is a network
//! partition between that one client and etcd, while a second, direct client keeps changing
//! membership behind it.

use std::time::Duration;

use anyhow::{bail, ensure};
use etcd_client::CompactionOptions;
use tessera_etcd_harness::{EtcdServer, Proxy};
use tessera_registry::{EtcdConfig, EtcdRegistry, LeaseLoss, MembershipEvent, Registry, RegistryError, Retry};

use crate::support::{next_event, next_snapshot, record};

const PROMPT: Duration = Duration::from_secs(5);
/// Room for the watch driver's backoff to notice the proxy is back.
const RECOVERY: Duration = Duration::from_secs(15);

fn config(endpoint: String) -> EtcdConfig {
    EtcdConfig {
        lease_ttl: Duration::from_secs(2),
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        watch_retry_max: Duration::from_millis(200),
        ..EtcdConfig::new(vec![endpoint])
    }
}

#[tokio::test]
async fn watch_resumes_after_a_lost_connection_without_relisting() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await;
    let proxy = Proxy::start(etcd.addr()).await;
    let watcher = EtcdRegistry::connect(config(proxy.url())).await?;
    let direct = EtcdRegistry::connect(config(etcd.url())).await?;

    let mut watch = watcher.snapshot_and_watch().await?;
    ensure!(next_snapshot(&mut watch, PROMPT).await?.is_empty());
    let w1 = direct.register(record("w1")).await?;
    ensure!(next_event(&mut watch, PROMPT).await? == MembershipEvent::Up(record("w1")));

    proxy.cut();
    let _w2 = direct.register(record("w2")).await?;
    w1.revoke().await?;
    proxy.restore();

    // Both changes made during the partition arrive, in order, as plain events: the watch
    // resumed from its last revision instead of re-listing.
    ensure!(next_event(&mut watch, RECOVERY).await? == MembershipEvent::Up(record("w2")));
    ensure!(next_event(&mut watch, PROMPT).await? == MembershipEvent::Down("w1".into()));
    let _w3 = direct.register(record("w3")).await?;
    ensure!(next_event(&mut watch, PROMPT).await? == MembershipEvent::Up(record("w3")));
    Ok(())
}

#[tokio::test]
async fn compaction_past_the_watch_sends_a_fresh_snapshot() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await;
    let proxy = Proxy::start(etcd.addr()).await;
    let watcher = EtcdRegistry::connect(config(proxy.url())).await?;
    let direct = EtcdRegistry::connect(config(etcd.url())).await?;

    let mut watch = watcher.snapshot_and_watch().await?;
    ensure!(next_snapshot(&mut watch, PROMPT).await?.is_empty());
    let w1 = direct.register(record("w1")).await?;
    ensure!(next_event(&mut watch, PROMPT).await? == MembershipEvent::Up(record("w1")));

    // While the watcher is cut off, change membership and compact the history it would need
    // to resume.
    proxy.cut();
    let _w2 = direct.register(record("w2")).await?;
    w1.revoke().await?;
    let mut admin = etcd.client().await;
    let revision = admin.get("any", None).await?.header().map_or(0, |h| h.revision());
    admin.compact(revision, Some(CompactionOptions::new().with_physical())).await?;
    proxy.restore();

    // The change events are gone from etcd's history, so the watcher must re-list.
    ensure!(next_snapshot(&mut watch, RECOVERY).await? == vec![record("w2")]);
    let _w3 = direct.register(record("w3")).await?;
    ensure!(next_event(&mut watch, PROMPT).await? == MembershipEvent::Up(record("w3")));
    Ok(())
}

#[tokio::test]
async fn lease_is_lost_when_etcd_is_unreachable_for_a_ttl() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await;
    let proxy = Proxy::start(etcd.addr()).await;
    let worker_side = EtcdRegistry::connect(config(proxy.url())).await?;
    let coordinator_side = EtcdRegistry::connect(config(etcd.url())).await?;

    let mut watch = coordinator_side.snapshot_and_watch().await?;
    ensure!(next_snapshot(&mut watch, PROMPT).await?.is_empty());
    let registration = worker_side.register(record("w1")).await?;
    ensure!(next_event(&mut watch, PROMPT).await? == MembershipEvent::Up(record("w1")));

    proxy.cut();
    // The worker gives up after a TTL without a renewal; etcd expires the lease on its side.
    let ttl = Duration::from_secs(2);
    let loss = tokio::time::timeout(ttl * 2, registration.lost()).await?;
    ensure!(loss == LeaseLoss::Unreachable, "{loss:?}");
    ensure!(next_event(&mut watch, ttl * 2).await? == MembershipEvent::Down("w1".into()));
    Ok(())
}

#[tokio::test]
async fn connecting_to_nothing_fails_with_retry_advice() -> anyhow::Result<()> {
    // A port that was free a moment ago; nothing listens there.
    let unused = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    match EtcdRegistry::connect(config(format!("http://{unused}"))).await {
        Err(error @ (RegistryError::Etcd { .. } | RegistryError::Timeout { .. })) => {
            ensure!(error.retry() == Retry::Backoff, "{error:?}");
        }
        other => bail!("expected a connection failure, got {other:?}"),
    }
    Ok(())
}

/// A leader cut off from etcd learns within about a TTL that it no longer leads, and a
/// candidate that still reaches etcd takes over: never two leaders acting at once for longer
/// than the cut-off one needs to notice.
#[tokio::test]
async fn a_partitioned_leader_learns_it_lost_and_another_takes_over() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await;
    let proxy = Proxy::start(etcd.addr()).await;
    let cut_off = EtcdRegistry::connect(config(proxy.url())).await?;
    let direct = EtcdRegistry::connect(config(etcd.url())).await?;
    let leader = cut_off.campaign("c1").await?;
    let lost = leader.lost();
    let successor = tokio::spawn(async move { direct.campaign("c2").await });
    proxy.cut();
    let loss = tokio::time::timeout(RECOVERY, lost).await?;
    ensure!(loss == LeaseLoss::Unreachable || loss == LeaseLoss::Expired, "{loss:?}");
    let successor = tokio::time::timeout(RECOVERY, successor).await???;
    ensure!(successor.candidate() == "c2");
    Ok(())
}
