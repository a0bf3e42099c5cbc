//! `tessera worker --etcd` against a real etcd: the worker registers itself with the address it
//! printed, registers again after its lease is revoked behind its back, and revokes its own
//! registration on SIGTERM (after announcing that it drains), so a watcher sees it leave long
//! before the lease could expire.
//! Registered but in no group, it reports itself alive but not ready.
//!
//! Every wait is on a membership event with a timeout, never a sleep.

use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use tessera_etcd_harness::EtcdServer;
use tessera_registry::keys::worker_key;
use tessera_registry::{EtcdConfig, EtcdRegistry, LeaseId, MembershipEvent, Registry, WorkerRecord, WorkerWatch};
use tessera_tests::spawn_worker;
use tokio::time::Instant;

const ID: &str = "registration-test-worker";
const KV_CAPACITY_TOKENS: u64 = 4096;
/// The worker's lease TTL, in seconds: etcd's minimum, so it notices a revoked lease (and registers again) quickly.
const LEASE_TTL_SECS: &str = "2";
/// Generous bound for events that should come promptly; only a stuck test waits it out.
const PROMPT: Duration = Duration::from_secs(10);
/// The lease TTL of the worker told to stop, in seconds: far longer than `PROMPT`, so a leave
/// seen within `PROMPT` can only be a revoke, never an expiry, however loaded the machine.
const LONG_LEASE_TTL_SECS: &str = "120";

async fn next_event(watch: &mut WorkerWatch, within: Duration) -> anyhow::Result<MembershipEvent> {
    tokio::time::timeout(within, watch.next())
        .await
        .with_context(|| format!("no membership event within {within:?}"))?
        .context("the watch ended")
}

async fn expect_up(watch: &mut WorkerWatch, within: Duration) -> anyhow::Result<WorkerRecord> {
    match next_event(watch, within).await? {
        MembershipEvent::Up(record) if record.id == ID => Ok(record),
        other => bail!("expected {ID} to come up, got {other:?}"),
    }
}

async fn expect_down(watch: &mut WorkerWatch, within: Duration) -> anyhow::Result<()> {
    match next_event(watch, within).await? {
        MembershipEvent::Down(id) if id == ID => Ok(()),
        other => bail!("expected {ID} to go down, got {other:?}"),
    }
}

/// Waits for `child` to exit, polling: `Child::wait` would block the runtime with no timeout.
async fn exit_status(child: &mut Child, within: Duration) -> anyhow::Result<ExitStatus> {
    let deadline = Instant::now() + within;
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    while Instant::now() < deadline {
        poll.tick().await;
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
    }
    bail!("the worker did not exit within {within:?} of SIGTERM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_registers_and_comes_back_after_losing_its_lease() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await;
    let registry = EtcdRegistry::connect(EtcdConfig::new(vec![etcd.url()])).await?;
    let mut watch = registry.snapshot_and_watch().await?;
    match next_event(&mut watch, PROMPT).await? {
        MembershipEvent::Snapshot(records) => ensure!(records.is_empty(), "fresh etcd lists {records:?}"),
        other => bail!("a watch starts with a snapshot, got {other:?}"),
    }

    // The first spawn builds the binary and reading the printed address blocks: off the runtime.
    let url = etcd.url();
    let capacity = KV_CAPACITY_TOKENS.to_string();
    let (_worker, addr) = tokio::task::spawn_blocking(move || {
        spawn_worker(&["--etcd", &url, "--lease-ttl-secs", LEASE_TTL_SECS, "--id", ID, "--kv-capacity-tokens", &capacity])
    })
    .await??;

    let record = expect_up(&mut watch, PROMPT).await?;
    ensure!(record.address == addr.to_string(), "registered {:?}, printed {addr}", record.address);
    ensure!(record.device == "cpu", "device {:?}", record.device);
    ensure!(record.kv_capacity_tokens == KV_CAPACITY_TOKENS, "kv capacity {}", record.kv_capacity_tokens);
    ensure!(record.version == env!("CARGO_PKG_VERSION"), "version {:?}", record.version);

    // Probes see the process serving (""), but the worker not ready: no coordinator has put it
    // in a group.
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    use tonic_health::pb::health_check_response::ServingStatus;
    for (service, want) in [("", ServingStatus::Serving), ("tessera.worker.v1.Worker", ServingStatus::NotServing)] {
        let answer = health.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await?.into_inner();
        ensure!(answer.status == want as i32, "health of {service:?}: {answer:?}, expected {want:?}");
    }

    // Revoke the worker's lease behind its back, as an operator (or an expiry) would.
    let mut client = etcd.client().await;
    let stored = client.get(worker_key(ID), None).await?;
    let lease = stored.kvs().first().context("the worker's key is in etcd")?.lease();
    ensure!(registry.revoke_lease(LeaseId(lease)).await?, "lease {lease:x} did not exist");
    expect_down(&mut watch, PROMPT).await?;
    let again = expect_up(&mut watch, PROMPT).await.context("the worker did not register again")?;
    ensure!(again == record, "re-registered as {again:?}, first as {record:?}");
    let relisted = client.get(worker_key(ID), None).await?;
    let new_lease = relisted.kvs().first().context("the worker's key is back")?.lease();
    ensure!(new_lease != lease, "re-registered under the revoked lease {lease:x}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_announces_draining_then_revokes_before_the_lease_could_expire() -> anyhow::Result<()> {
    let etcd = EtcdServer::start().await;
    let registry = EtcdRegistry::connect(EtcdConfig::new(vec![etcd.url()])).await?;
    let mut watch = registry.snapshot_and_watch().await?;
    ensure!(matches!(next_event(&mut watch, PROMPT).await?, MembershipEvent::Snapshot(_)), "a watch starts with a snapshot");
    let url = etcd.url();
    let (mut worker, _) =
        tokio::task::spawn_blocking(move || spawn_worker(&["--etcd", &url, "--lease-ttl-secs", LONG_LEASE_TTL_SECS, "--id", ID])).await??;
    let record = expect_up(&mut watch, PROMPT).await?;
    let mut client = etcd.client().await;
    let lease = client.get(worker_key(ID), None).await?.kvs().first().context("the worker's key is in etcd")?.lease();

    let pid = worker.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().context("run kill")?;
    ensure!(killed.success(), "kill -TERM {pid} failed: {killed}");
    // A graceful leave first announces draining under the same lease, then (holding no
    // sequences) revokes it: the key goes long before the 120 s lease could expire.
    let draining = expect_up(&mut watch, PROMPT).await.context("SIGTERM did not announce draining")?;
    ensure!(draining == WorkerRecord { draining: true, ..record.clone() }, "announced {draining:?}");
    expect_down(&mut watch, PROMPT).await.context("SIGTERM did not revoke the registration")?;
    let status = exit_status(&mut worker.0, PROMPT).await?;
    ensure!(status.success(), "the worker exited with {status} after SIGTERM");
    // Revoked, not merely dropped: the lease itself is gone (an abandoned one would live on
    // until its TTL ran out).
    let left = client.lease_time_to_live(lease, None).await?.ttl();
    ensure!(left <= 0, "lease {lease:x} still has {left} s to live: the worker did not revoke it");
    Ok(())
}
