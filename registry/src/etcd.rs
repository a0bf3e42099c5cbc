//! The etcd backend: the production registry.
//!
//! A worker's record is created with a transaction that succeeds only if the key has never
//! been written since it was last deleted (`create_revision == 0`), attached to a lease the
//! worker renews from a dedicated thread ([`lease`]). Watchers list the prefix and watch it from
//! the listed revision + 1, resuming or re-listing after failures ([`watch`]).

mod lease;
mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};

use crate::election::Leadership;
use crate::error::{RegistryError, Result};
use crate::keys::{validate_worker_id, worker_id_from_key, LEADER_ELECTION, WORKERS_PREFIX};
use crate::lease::{LeaseId, Registration};
use crate::record::WorkerRecord;
use crate::watch::WorkerWatch;
use crate::Registry;

/// Settings of an [`EtcdRegistry`].
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members, e.g. `http://10.0.0.2:2379`.
    pub endpoints: Vec<String>,
    /// Lease time-to-live: a worker that stops renewing disappears this long after its last
    /// renewal. Whole seconds (etcd's unit), at least 1 s; etcd raises very short TTLs to its
    /// own minimum (2 s with default election settings) and the registry follows what it grants.
    pub lease_ttl: Duration,
    /// Longest wait for one unary etcd request.
    pub request_timeout: Duration,
    /// Longest wait for a TCP connection to an endpoint.
    pub connect_timeout: Duration,
    /// HTTP/2 ping interval, so a watch over a silently dead connection fails instead of
    /// hanging; the ping must be answered within `request_timeout`.
    pub http2_keep_alive: Duration,
    /// Upper bound of the backoff between attempts to re-establish a broken watch.
    pub watch_retry_max: Duration,
    /// Events buffered for a watcher that is slower than etcd.
    pub watch_buffer: usize,
    /// TLS and user authentication towards etcd; the default is neither (plain `http://`).
    pub security: EtcdSecurity,
}

/// How to reach an etcd that requires TLS (`https://` endpoints), client certificates, or
/// etcd's own user authentication. PEM bytes, read by the caller.
#[derive(Clone, Default)]
pub struct EtcdSecurity {
    /// CA certificate(s) that etcd's server certificate must chain to; required with
    /// `https://` endpoints (no system roots are consulted).
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key, for an etcd started with `--client-cert-auth`.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// User name and password, for an etcd with authentication enabled.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdSecurity {
    // Never the password, nor key bytes: configs are logged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSecurity")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity_pem.is_some())
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .finish()
    }
}

impl EtcdSecurity {
    /// Whether TLS options apply (the endpoints must then be `https://`).
    pub fn tls(&self) -> bool {
        self.ca_pem.is_some() || self.identity_pem.is_some()
    }
}

impl EtcdConfig {
    /// Settings with the defaults: 5 s lease TTL, 5 s requests, 3 s connects.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            lease_ttl: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            http2_keep_alive: Duration::from_secs(10),
            watch_retry_max: Duration::from_secs(2),
            watch_buffer: 256,
            security: EtcdSecurity::default(),
        }
    }

    /// Checks the ranges the registry relies on.
    pub fn validate(&self) -> Result<()> {
        let problem = if self.endpoints.is_empty() {
            Some("endpoints must name at least one etcd member")
        } else if self.lease_ttl < Duration::from_secs(1) || self.lease_ttl.subsec_nanos() != 0 {
            Some("lease_ttl must be a whole number of seconds, at least 1 s")
        } else if self.request_timeout.is_zero()
            || self.connect_timeout.is_zero()
            || self.http2_keep_alive.is_zero()
            || self.watch_retry_max.is_zero()
        {
            Some("timeouts and intervals must be positive")
        } else if self.watch_buffer == 0 {
            Some("watch_buffer must be at least 1")
        } else if self.security.tls() && self.endpoints.iter().any(|e| e.starts_with("http://")) {
            Some("a CA or client certificate for etcd needs https:// endpoints")
        } else if self.security.ca_pem.is_none() && self.endpoints.iter().any(|e| e.starts_with("https://")) {
            Some("https:// etcd endpoints need the CA that signed etcd's certificate")
        } else {
            None
        };
        problem.map_or(Ok(()), |p| Err(RegistryError::InvalidConfig(p)))
    }

    fn lease_ttl_secs(&self) -> i64 {
        i64::try_from(self.lease_ttl.as_secs()).unwrap_or(i64::MAX)
    }

    fn connect_options(&self) -> ConnectOptions {
        // No per-request timeout here: tonic would apply it to the long-lived watch and
        // keep-alive streams too. Unary calls are bounded by `with_timeout` instead.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.connect_timeout)
            .with_keep_alive(self.http2_keep_alive, self.request_timeout)
            .with_keep_alive_while_idle(true);
        if self.security.tls() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.security.ca_pem {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &self.security.identity_pem {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        }
        if let Some((name, password)) = &self.security.user {
            // Tokens expire (etcd's --auth-token-ttl); a refused one is renewed and retried.
            options = options.with_user(name.clone(), password.clone()).with_auto_token_refresh(true);
        }
        options
    }
}

/// Registry backed by an etcd cluster. Cheap to clone; clones share one connection.
#[derive(Clone)]
pub struct EtcdRegistry {
    // etcd-client's `Client` is several kilobytes and its methods take `&mut self`: keep one
    // behind an `Arc` and clone it (its inner channels are shared) per operation.
    client: Arc<Client>,
    config: Arc<EtcdConfig>,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistry").field("config", &self.config).finish_non_exhaustive()
    }
}

impl EtcdRegistry {
    /// Connects and checks that etcd answers, so a wrong address fails here rather than at
    /// the first registration.
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        config.validate()?;
        let client = connect_client(&config).await?;
        Ok(Self { client: Arc::new(client), config: Arc::new(config) })
    }

    /// Revokes a lease by id, as `etcdctl lease revoke` would: every key attached to it is
    /// deleted and its holder learns at its next renewal that the lease is gone. Returns
    /// whether the lease existed.
    pub async fn revoke_lease(&self, lease: LeaseId) -> Result<bool> {
        revoke(&mut Client::clone(&self.client), lease, self.config.request_timeout).await
    }
}

#[async_trait]
impl Registry for EtcdRegistry {
    async fn register(&self, record: WorkerRecord) -> Result<Registration> {
        validate_worker_id(&record.id)?;
        let value = serde_json::to_vec(&record).map_err(|source| RegistryError::EncodeRecord { worker_id: record.id.clone(), source })?;
        lease::register(Arc::clone(&self.config), record.id, Some(value)).await
    }

    async fn snapshot_and_watch(&self) -> Result<WorkerWatch> {
        watch::start(Client::clone(&self.client), Arc::clone(&self.config)).await
    }

    async fn campaign(&self, candidate: &str) -> Result<Leadership> {
        validate_worker_id(candidate)?;
        // The candidacy's key lives under a lease of its own, renewed by the same keep-alive
        // thread a worker's record has: a stalled runtime must not cost the leader its lease.
        let lease = lease::register(Arc::clone(&self.config), candidate.to_string(), None).await?;
        let mut client = Client::clone(&self.client);
        let lost = lease.lost();
        let outcome = tokio::select! {
            elected = client.campaign(LEADER_ELECTION, candidate, lease.lease_id().0) => Ok(elected),
            loss = lost => Err(loss),
        };
        match outcome {
            Ok(Ok(_)) => Ok(Leadership::under_lease(candidate.to_string(), lease)),
            Ok(Err(source)) => {
                // Revoking withdraws the candidacy now instead of after a TTL.
                if let Err(error) = lease.revoke().await {
                    tracing::warn!(%error, "could not revoke a failed candidacy's lease; it will expire");
                }
                Err(RegistryError::Etcd { operation: "campaign", source })
            }
            Err(loss) => Err(RegistryError::CandidacyLost(loss)),
        }
    }

    async fn leader(&self) -> Result<Option<String>> {
        let mut client = Client::clone(&self.client);
        match with_timeout("leader", self.config.request_timeout, client.leader(LEADER_ELECTION)).await {
            Ok(response) => Ok(response.kv().and_then(|kv| kv.value_str().ok()).map(str::to_string)),
            // etcd answers "election: no leader" as an error rather than an empty response.
            Err(RegistryError::Etcd { source: etcd_client::Error::GRpcStatus(status), .. }) if status.message().contains("no leader") => {
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }
}

/// A client whose connection has answered one request.
async fn connect_client(config: &EtcdConfig) -> Result<Client> {
    let connect = Client::connect(&config.endpoints, Some(config.connect_options()));
    let client = with_timeout("connect", config.connect_timeout, connect).await?;
    // The channel connects lazily; a cheap count-only read proves the endpoints are right.
    let mut probe = client.clone();
    let count_only = Some(GetOptions::new().with_count_only());
    with_timeout("connect", config.request_timeout, probe.get(WORKERS_PREFIX, count_only)).await?;
    Ok(client)
}

/// Bounds one etcd request by `timeout`.
async fn with_timeout<T>(
    operation: &'static str,
    timeout: Duration,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, request).await {
        Ok(result) => result.map_err(RegistryError::etcd(operation)),
        Err(_) => Err(RegistryError::Timeout { operation, timeout }),
    }
}

/// Revokes `lease`; returns whether it existed.
async fn revoke(client: &mut Client, lease: LeaseId, timeout: Duration) -> Result<bool> {
    match with_timeout("lease revoke", timeout, client.lease_revoke(lease.0)).await {
        Ok(_) => Ok(true),
        Err(RegistryError::Etcd { source, .. }) if crate::error::is_lease_not_found(&source) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Every readable worker record and the store revision the listing reflects.
async fn list(client: &mut Client, timeout: Duration) -> Result<(Vec<WorkerRecord>, i64)> {
    let options = GetOptions::new().with_prefix();
    let response = with_timeout("list workers", timeout, client.get(WORKERS_PREFIX, Some(options))).await?;
    // etcd always sends a header; without one, watching from revision 1 replays all history,
    // which is redundant but loses nothing.
    let revision = response.header().map_or(0, |h| h.revision());
    let records = response
        .kvs()
        .iter()
        .filter_map(|kv| {
            let id = worker_id_from_key(kv.key_str().ok()?)?;
            decode_record(id, kv.value())
        })
        .collect();
    Ok((records, revision))
}

/// Decodes the record stored for worker `id`. Anything else under the prefix (foreign JSON, a
/// record whose id disagrees with its key) is logged and treated as no worker: a coordinator
/// must not route to a worker it cannot describe.
fn decode_record(id: &str, value: &[u8]) -> Option<WorkerRecord> {
    match serde_json::from_slice::<WorkerRecord>(value) {
        Ok(record) if record.id == id => Some(record),
        Ok(record) => {
            let record_id = &record.id;
            tracing::warn!(key_id = id, %record_id, "worker record under the wrong key; ignored");
            None
        }
        Err(error) => {
            tracing::warn!(worker_id = id, %error, "unreadable worker record; ignored");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_ranges_are_checked() {
        let ok = EtcdConfig::new(vec!["http://127.0.0.1:2379".into()]);
        assert!(ok.validate().is_ok());
        let cases = [
            EtcdConfig { endpoints: vec![], ..ok.clone() },
            EtcdConfig { lease_ttl: Duration::from_millis(1500), ..ok.clone() },
            EtcdConfig { lease_ttl: Duration::ZERO, ..ok.clone() },
            EtcdConfig { request_timeout: Duration::ZERO, ..ok.clone() },
            EtcdConfig { watch_buffer: 0, ..ok.clone() },
            EtcdConfig { security: EtcdSecurity { ca_pem: Some(b"pem".to_vec()), ..EtcdSecurity::default() }, ..ok.clone() },
            EtcdConfig { endpoints: vec!["https://127.0.0.1:2379".into()], ..ok.clone() },
        ];
        for bad in cases {
            assert!(matches!(bad.validate(), Err(RegistryError::InvalidConfig(_))), "{bad:?}");
        }
    }

    #[test]
    fn records_must_match_their_key() {
        let record = WorkerRecord {
            id: "w1".into(),
            address: "a:1".into(),
            device: "cpu".into(),
            memory_bytes: 0,
            kv_capacity_tokens: 0,
            version: "v".into(),
            draining: false,
            group: None,
        };
        let json = serde_json::to_vec(&record).expect("encode");
        assert_eq!(decode_record("w1", &json), Some(record));
        assert_eq!(decode_record("w2", &json), None);
        assert_eq!(decode_record("w1", b"not json"), None);
    }
}
