//! The registry's key schema, in one place.
//!
//! ```text
//! /tessera/v1/workers/{worker_id}  ->  WorkerRecord as JSON, attached to the worker's lease
//! /tessera/v1/leader/{lease}        ->  a coordinator's candidate name, under its lease
//! ```
//!
//! (etcd's election API names the keys under [`LEADER_ELECTION`] itself; the oldest leads.)
//!
//! The `v1` segment versions the layout of keys and values: a change that old coordinators
//! could misread gets a new segment, so two versions can share one etcd during an upgrade.

use crate::error::{RegistryError, Result};

/// Prefix of every worker key; listing and watching this prefix sees every worker.
pub const WORKERS_PREFIX: &str = "/tessera/v1/workers/";

/// The election coordinators campaign in; must not share a prefix with [`WORKERS_PREFIX`].
pub const LEADER_ELECTION: &str = "/tessera/v1/leader";

/// Longest worker id accepted: ids appear in keys, logs and placements, so keep them short.
pub const MAX_WORKER_ID_LEN: usize = 128;

/// The key that holds one worker's record.
pub fn worker_key(worker_id: &str) -> String {
    format!("{WORKERS_PREFIX}{worker_id}")
}

/// The worker id of a key under [`WORKERS_PREFIX`], or `None` for any other key.
pub fn worker_id_from_key(key: &str) -> Option<&str> {
    key.strip_prefix(WORKERS_PREFIX).filter(|id| !id.is_empty())
}

/// Checks that `worker_id` can be the last segment of a key: not empty, at most
/// [`MAX_WORKER_ID_LEN`] bytes, and only ASCII letters, digits and `-_.:`. A `/` would
/// silently nest keys and break the prefix listing, so it is refused here rather than later.
pub fn validate_worker_id(worker_id: &str) -> Result<()> {
    let reason = if worker_id.is_empty() {
        Some("it is empty")
    } else if worker_id.len() > MAX_WORKER_ID_LEN {
        Some("it is longer than 128 bytes")
    } else if !worker_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)) {
        Some("only ASCII letters, digits and '-', '_', '.', ':' are allowed")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(RegistryError::InvalidWorkerId { worker_id: worker_id.to_string(), reason }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_and_id_round_trip() {
        let key = worker_key("gpu-node-3:0");
        assert_eq!(key, "/tessera/v1/workers/gpu-node-3:0");
        assert_eq!(worker_id_from_key(&key), Some("gpu-node-3:0"));
        assert_eq!(worker_id_from_key("/tessera/v1/workers/"), None);
        assert_eq!(worker_id_from_key("/tessera/v1/models/m"), None);
    }

    #[test]
    fn ids_that_would_break_the_schema_are_refused() {
        assert!(validate_worker_id("w1").is_ok());
        assert!(validate_worker_id("host-1.example:50051").is_ok());
        for bad in ["", "a/b", "white space", "é"] {
            assert!(matches!(validate_worker_id(bad), Err(RegistryError::InvalidWorkerId { .. })), "{bad:?} should be refused");
        }
        assert!(validate_worker_id(&"x".repeat(MAX_WORKER_ID_LEN)).is_ok());
        assert!(validate_worker_id(&"x".repeat(MAX_WORKER_ID_LEN + 1)).is_err());
    }
}
