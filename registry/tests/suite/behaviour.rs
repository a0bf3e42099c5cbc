//! The registry contract, run unchanged against `MemoryRegistry` and `EtcdRegistry`.
//!
//! Each case is one generic body taking a [`Backend`]; the macro at the bottom instantiates it
//! once per backend. Waiting is always on an event with a timeout, never a sleep.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use tessera_etcd_harness::EtcdServer;
use tessera_registry::{
    EtcdConfig, EtcdRegistry, LeaseId, LeaseLoss, LeaseState, MembershipEvent, MemoryConfig, MemoryRegistry, Registry, RegistryError, Retry,
};
use tokio::time::Instant;

use crate::support::{next_event, next_snapshot, no_event_for, record};

/// Generous bound for events that should be immediate; only a stuck test ever waits it out.
const PROMPT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
enum Backend {
    Memory,
    Etcd,
}

/// A registry under test, plus a second handle that plays another process.
struct Fixture {
    registry: Arc<dyn Registry>,
    other: Arc<dyn Registry>,
    admin: Admin,
    ttl: Duration,
    _etcd: Option<EtcdServer>,
}

/// Operator access, to act behind a registration's back.
enum Admin {
    Memory(MemoryRegistry),
    Etcd(EtcdRegistry),
}

impl Admin {
    async fn revoke_lease(&self, lease: LeaseId) -> anyhow::Result<bool> {
        match self {
            Admin::Memory(registry) => Ok(registry.revoke_lease(lease)),
            Admin::Etcd(registry) => Ok(registry.revoke_lease(lease).await?),
        }
    }
}

impl Fixture {
    async fn new(backend: Backend, ttl: Duration) -> anyhow::Result<Self> {
        match backend {
            Backend::Memory => {
                let config = MemoryConfig { lease_ttl: ttl, ..MemoryConfig::default() };
                let registry = MemoryRegistry::new(config)?;
                Ok(Self {
                    registry: Arc::new(registry.clone()),
                    other: Arc::new(registry.clone()),
                    admin: Admin::Memory(registry),
                    ttl,
                    _etcd: None,
                })
            }
            Backend::Etcd => {
                let etcd = EtcdServer::start().await;
                let config = EtcdConfig { lease_ttl: ttl, ..EtcdConfig::new(vec![etcd.url()]) };
                let registry = EtcdRegistry::connect(config.clone()).await?;
                // A separate connection, as a second process would have.
                let other = EtcdRegistry::connect(config).await?;
                Ok(Self { registry: Arc::new(registry), other: Arc::new(other.clone()), admin: Admin::Etcd(other), ttl, _etcd: Some(etcd) })
            }
        }
    }
}

async fn registered_worker_is_in_the_snapshot(backend: Backend) -> anyhow::Result<()> {
    let f = Fixture::new(backend, Duration::from_secs(5)).await?;
    let _w1 = f.registry.register(record("w1")).await?;
    let _w2 = f.other.register(record("w2")).await?;
    let mut watch = f.registry.snapshot_and_watch().await?;
    ensure!(next_snapshot(&mut watch, PROMPT).await? == vec![record("w1"), record("w2")]);
    Ok(())
}

async fn second_registration_of_a_live_id_is_refused(backend: Backend) -> anyhow::Result<()> {
    let f = Fixture::new(backend, Duration::from_secs(5)).await?;
    let first = f.registry.register(record("w1")).await?;
    let mut impostor = record("w1");
    impostor.address = "10.9.9.9:1".into();
    match f.other.register(impostor.clone()).await {
        Err(RegistryError::AlreadyRegistered { worker_id }) => ensure!(worker_id == "w1"),
        other => bail!("expected AlreadyRegistered, got {other:?}"),
    }
    // The first registration is untouched...
    let mut watch = f.registry.snapshot_and_watch().await?;
    ensure!(next_snapshot(&mut watch, PROMPT).await? == vec![record("w1")]);
    ensure!(first.state() == LeaseState::Alive);
    // ...and once it leaves, the id is free again.
    first.revoke().await?;
    ensure!(next_event(&mut watch, PROMPT).await? == MembershipEvent::Down("w1".into()));
    let _second = f.other.register(impostor.clone()).await?;
    ensure!(next_event(&mut watch, PROMPT).await? == MembershipEvent::Up(impostor));
    Ok(())
}

async fn already_registered_advises_retry_after_ttl(backend: Backend) -> anyhow::Result<()> {
    let f = Fixture::new(backend, Duration::from_secs(5)).await?;
    let _first = f.registry.register(record("w1")).await?;
    let error = f.registry.register(record("w1")).await.err().context("second register")?;
    ensure!(error.retry() == Retry::AfterLeaseTtl, "{error:?}");
    Ok(())
}

async fn invalid_worker_id_is_refused(backend: Backend) -> anyhow::Result<()> {
    let f = Fixture::new(backend, Duration::from_secs(5)).await?;
    match f.registry.register(record("rack-1/w1")).await {
        Err(error @ RegistryError::InvalidWorkerId { .. }) => {
            ensure!(error.retry() == Retry::Never)
        }
        other => bail!("expected InvalidWorkerId, got {other:?}"),
    }
    Ok(())
}

async fn later_registration_arrives_as_up(backend: Backend) -> anyhow::Result<()> {
    let f = Fixture::new(backend, Duration::from_secs(5)).await?;
    let mut watch = f.registry.snapshot_and_watch().await?;
    ensure!(next_snapshot(&mut watch, PROMPT).await?.is_empty());
    let _w1 = f.other.register(record("w1")).await?;
    ensure!(next_event(&mut watch, PROMPT).await? == MembershipEvent::Up(record("w1")));
    Ok(())
}

/// Registrations racing with the listing land in the snapshot or arrive as `Up` — none is
/// lost in the gap between the list and the watch.
async fn registrations_racing_the_listing_are_not_lost(backend: Backend) -> anyhow::Result<()> {
    const WORKERS: usize = 20;
    let f = Fixture::new(backend, Duration::from_secs(10)).await?;
    let other = Arc::clone(&f.other);
    let registering = tokio::spawn(async move {
        let mut held = Vec::new();
        for i in 0..WORKERS {
            held.push(other.register(record(&format!("w{i:02}"))).await?);
            tokio::task::yield_now().await;
        }
        anyhow::Ok(held)
    });
    // Let the first registrations land so the listing usually sees some of them.
    tokio::task::yield_now().await;
    let mut watch = f.registry.snapshot_and_watch().await?;
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < WORKERS {
        match next_event(&mut watch, deadline.saturating_duration_since(Instant::now())).await? {
            MembershipEvent::Snapshot(records) => {
                seen = records.into_iter().map(|r| (r.id.clone(), r)).collect();
            }
            MembershipEvent::Up(r) => {
                seen.insert(r.id.clone(), r);
            }
            MembershipEvent::Down(id) => bail!("unexpected Down({id})"),
        }
    }
    let held = registering.await??;
    ensure!(held.len() == WORKERS);
    ensure!(seen.values().cloned().collect::<Vec<_>>() == (0..WORKERS).map(|i| record(&format!("w{i:02}"))).collect::<Vec<_>>());
    Ok(())
}

async fn revoke_is_seen_as_down_promptly(backend: Backend) -> anyhow::Result<()> {
    // A TTL far longer than the wait for Down (PROMPT), so expiry cannot pass for revocation,
    // however slowly a loaded machine runs.
    let f = Fixture::new(backend, Duration::from_secs(60)).await?;
    let mut watch = f.registry.snapshot_and_watch().await?;
    next_snapshot(&mut watch, PROMPT).await?;
    let registration = f.other.register(record("w1")).await?;
    ensure!(next_event(&mut watch, PROMPT).await? == MembershipEvent::Up(record("w1")));
    let lost = registration.lost();
    registration.revoke().await?;
    ensure!(next_event(&mut watch, PROMPT).await? == MembershipEvent::Down("w1".into()));
    ensure!(tokio::time::timeout(PROMPT, lost).await? == LeaseLoss::Released);
    Ok(())
}

async fn dropped_registration_expires(backend: Backend) -> anyhow::Result<()> {
    let f = Fixture::new(backend, Duration::from_secs(2)).await?;
    let mut watch = f.registry.snapshot_and_watch().await?;
    next_snapshot(&mut watch, PROMPT).await?;
    let registration = f.other.register(record("w1")).await?;
    ensure!(next_event(&mut watch, PROMPT).await? == MembershipEvent::Up(record("w1")));
    let lost = registration.lost();
    drop(registration);
    // Nothing renews the lease now; anyone still waiting on it hears so at once.
    ensure!(tokio::time::timeout(PROMPT, lost).await? == LeaseLoss::KeepAliveStopped);
    // The key goes when the lease expires: after the TTL, give or take etcd's expiry sweep and
    // a loaded machine's delays, which is what the generous bound is for.
    ensure!(next_event(&mut watch, f.ttl + PROMPT).await? == MembershipEvent::Down("w1".into()));
    Ok(())
}

async fn keep_alive_outlives_several_ttls(backend: Backend) -> anyhow::Result<()> {
    let f = Fixture::new(backend, Duration::from_secs(2)).await?;
    let mut watch = f.registry.snapshot_and_watch().await?;
    next_snapshot(&mut watch, PROMPT).await?;
    let registration = f.other.register(record("w1")).await?;
    ensure!(next_event(&mut watch, PROMPT).await? == MembershipEvent::Up(record("w1")));
    no_event_for(&mut watch, f.ttl * 3 + Duration::from_secs(1)).await?;
    ensure!(registration.state() == LeaseState::Alive);
    let mut fresh = f.registry.snapshot_and_watch().await?;
    ensure!(next_snapshot(&mut fresh, PROMPT).await? == vec![record("w1")]);
    Ok(())
}

async fn lost_fires_when_the_lease_is_revoked_elsewhere(backend: Backend) -> anyhow::Result<()> {
    let f = Fixture::new(backend, Duration::from_secs(2)).await?;
    let mut watch = f.registry.snapshot_and_watch().await?;
    next_snapshot(&mut watch, PROMPT).await?;
    let registration = f.registry.register(record("w1")).await?;
    ensure!(next_event(&mut watch, PROMPT).await? == MembershipEvent::Up(record("w1")));
    ensure!(f.admin.revoke_lease(registration.lease_id()).await?, "lease should exist");
    ensure!(next_event(&mut watch, PROMPT).await? == MembershipEvent::Down("w1".into()));
    // The holder finds out at its next renewal, within a third of the TTL.
    let loss = tokio::time::timeout(f.ttl, registration.lost()).await?;
    ensure!(loss == LeaseLoss::Expired, "{loss:?}");
    ensure!(registration.state() == LeaseState::Lost(LeaseLoss::Expired));
    // What a worker does next: give up the old registration and register again.
    registration.revoke().await?;
    let _again = f.registry.register(record("w1")).await?;
    ensure!(next_event(&mut watch, PROMPT).await? == MembershipEvent::Up(record("w1")));
    ensure!(!f.admin.revoke_lease(LeaseId(0x7ead)).await?, "unknown lease reported as revoked");
    Ok(())
}

/// Candidates lead one at a time, in the order they campaigned; a resignation hands over at
/// once.
async fn candidates_lead_in_turn_and_a_resignation_hands_over(backend: Backend) -> anyhow::Result<()> {
    let f = Fixture::new(backend, Duration::from_secs(5)).await?;
    let first = tokio::time::timeout(PROMPT, f.registry.campaign("c1")).await.context("an uncontested campaign wins")??;
    ensure!(first.candidate() == "c1");
    ensure!(f.other.leader().await? == Some("c1".into()));
    let other = Arc::clone(&f.other);
    let mut second = tokio::spawn(async move { other.campaign("c2").await });
    // Bounded check that the second candidate waits: it must not lead beside the first.
    ensure!(tokio::time::timeout(Duration::from_millis(500), &mut second).await.is_err(), "two leaders at once");
    first.resign().await?;
    let second = tokio::time::timeout(PROMPT, second).await.context("the next candidate leads after a resignation")???;
    ensure!(second.candidate() == "c2");
    ensure!(f.registry.leader().await? == Some("c2".into()));
    Ok(())
}

/// A leader that stops without resigning (a crashed process) is succeeded once its lease
/// ends, within one TTL.
async fn a_vanished_leader_is_succeeded_within_a_ttl(backend: Backend) -> anyhow::Result<()> {
    let f = Fixture::new(backend, Duration::from_secs(2)).await?;
    let first = f.registry.campaign("c1").await?;
    let other = Arc::clone(&f.other);
    let second = tokio::spawn(async move { other.campaign("c2").await });
    let dropped = Instant::now();
    drop(first);
    let second = tokio::time::timeout(f.ttl + PROMPT, second).await.context("a successor within a TTL")???;
    ensure!(second.candidate() == "c2");
    ensure!(dropped.elapsed() <= f.ttl + PROMPT);
    Ok(())
}

macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $case() -> anyhow::Result<()> {
                    super::$case(super::Backend::Memory).await
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test]
                async fn $case() -> anyhow::Result<()> {
                    super::$case(super::Backend::Etcd).await
                }
            )*
        }
    };
}

on_both_backends!(
    registered_worker_is_in_the_snapshot,
    second_registration_of_a_live_id_is_refused,
    already_registered_advises_retry_after_ttl,
    invalid_worker_id_is_refused,
    later_registration_arrives_as_up,
    registrations_racing_the_listing_are_not_lost,
    revoke_is_seen_as_down_promptly,
    dropped_registration_expires,
    keep_alive_outlives_several_ttls,
    lost_fires_when_the_lease_is_revoked_elsewhere,
    candidates_lead_in_turn_and_a_resignation_hands_over,
    a_vanished_leader_is_succeeded_within_a_ttl,
);
