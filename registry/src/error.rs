//! Errors of the registry, each saying whether a retry can help.
//!
//! Callers branch on the variant (a worker that meets `AlreadyRegistered` behaves differently
//! from one that cannot reach etcd), and on [`RegistryError::retry`] when all they need to know
//! is whether to try again.

use std::time::Duration;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Another live lease holds this worker id. Either a second process claims the same id, or
    /// this process restarted before its previous lease expired.
    #[error("worker {worker_id:?} is already registered under a live lease")]
    AlreadyRegistered { worker_id: String },

    /// The worker id cannot be used as the last segment of a registry key.
    #[error("invalid worker id {worker_id:?}: {reason}")]
    InvalidWorkerId { worker_id: String, reason: &'static str },

    /// A configuration value is out of range.
    #[error("invalid registry configuration: {0}")]
    InvalidConfig(&'static str),

    /// An etcd request failed.
    #[error("etcd {operation} failed: {source}")]
    Etcd {
        operation: &'static str,
        #[source]
        source: etcd_client::Error,
    },

    /// etcd did not answer in time.
    #[error("etcd {operation} did not answer within {timeout:?}")]
    Timeout { operation: &'static str, timeout: Duration },

    /// A worker record could not be encoded (it is always JSON).
    #[error("worker record for {worker_id:?} could not be encoded: {source}")]
    EncodeRecord {
        worker_id: String,
        #[source]
        source: serde_json::Error,
    },

    /// The operation spawns a task and was called outside a tokio runtime.
    #[error("the registry needs a tokio runtime: {0}")]
    NoRuntime(#[source] tokio::runtime::TryCurrentError),

    /// The lease keep-alive thread or its runtime could not be started.
    #[error("could not start the lease keep-alive thread: {0}")]
    KeepAliveThread(#[source] std::io::Error),

    /// A candidate's lease ended before its campaign was decided.
    #[error("the candidacy's lease ended before the election was decided: {0:?}")]
    CandidacyLost(crate::lease::LeaseLoss),

    /// The lease keep-alive thread stopped before it answered.
    #[error("the lease keep-alive thread stopped unexpectedly")]
    KeepAliveStopped,
}

/// Whether, and when, repeating a failed operation can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A transient condition (etcd unreachable, leader election, timeout): retry with backoff.
    Backoff,
    /// Another lease holds the id; if it belongs to a dead incarnation of this worker it
    /// expires within one lease TTL, after which registering again succeeds.
    AfterLeaseTtl,
    /// The request itself is wrong; repeating it gives the same answer.
    Never,
}

impl RegistryError {
    /// Whether a retry can help.
    pub fn retry(&self) -> Retry {
        match self {
            Self::AlreadyRegistered { .. } => Retry::AfterLeaseTtl,
            Self::Etcd { source, .. } => etcd_retry(source),
            Self::Timeout { .. } | Self::KeepAliveThread(_) | Self::KeepAliveStopped | Self::CandidacyLost(_) => Retry::Backoff,
            Self::InvalidWorkerId { .. } | Self::InvalidConfig(_) | Self::EncodeRecord { .. } | Self::NoRuntime(_) => Retry::Never,
        }
    }

    pub(crate) fn etcd(operation: &'static str) -> impl FnOnce(etcd_client::Error) -> Self {
        move |source| Self::Etcd { operation, source }
    }
}

/// gRPC status codes (numbers fixed by the gRPC specification) that mean "try again later".
/// They are compared as numbers so that this crate does not depend on tonic for one enum.
mod grpc_code {
    pub const UNKNOWN: i32 = 2;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const ABORTED: i32 = 10;
    pub const UNAVAILABLE: i32 = 14;
    pub const NOT_FOUND: i32 = 5;
}

fn etcd_retry(error: &etcd_client::Error) -> Retry {
    use etcd_client::Error as E;
    match error {
        E::GRpcStatus(status) => match i32::from(status.code()) {
            grpc_code::UNKNOWN
            | grpc_code::DEADLINE_EXCEEDED
            | grpc_code::RESOURCE_EXHAUSTED
            | grpc_code::ABORTED
            | grpc_code::UNAVAILABLE => Retry::Backoff,
            _ => Retry::Never,
        },
        // Connection-level failures and closed client-side streams: the channel reconnects.
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::LeaseKeepAliveError(_) | E::Internal(_) => Retry::Backoff,
        _ => Retry::Never,
    }
}

/// Whether etcd answered "no such lease" (revoking or renewing a lease that already expired).
pub(crate) fn is_lease_not_found(error: &etcd_client::Error) -> bool {
    matches!(error, etcd_client::Error::GRpcStatus(status)
        if i32::from(status.code()) == grpc_code::NOT_FOUND)
}

/// The crate's result type.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_advice_follows_the_cause() {
        let taken = RegistryError::AlreadyRegistered { worker_id: "w1".into() };
        assert_eq!(taken.retry(), Retry::AfterLeaseTtl);
        let timeout = RegistryError::Timeout { operation: "get", timeout: Duration::from_secs(1) };
        assert_eq!(timeout.retry(), Retry::Backoff);
        let bad_args = RegistryError::Etcd { operation: "connect", source: etcd_client::Error::InvalidArgs("empty endpoints".into()) };
        assert_eq!(bad_args.retry(), Retry::Never);
        let closed = RegistryError::Etcd { operation: "watch", source: etcd_client::Error::WatchError("stream closed".into()) };
        assert_eq!(closed.retry(), Retry::Backoff);
        assert_eq!(RegistryError::InvalidConfig("x").retry(), Retry::Never);
    }
}
