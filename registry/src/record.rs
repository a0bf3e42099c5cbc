//! What a worker announces about itself.
//!
//! A record is the worker's full state, not a delta: writing it twice is harmless and a reader
//! never needs an earlier value to understand a later one.

use serde::{Deserialize, Serialize};

/// One worker as the coordinator sees it. Stored as JSON under
/// [`worker_key`](crate::keys::worker_key)`(id)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Unique id of the worker; the last segment of its key.
    pub id: String,
    /// Address of the worker's gRPC service, `host:port`.
    pub address: String,
    /// Device the worker computes on, e.g. `cpu` or `cuda:0`.
    pub device: String,
    /// Device memory available to the worker, in bytes.
    pub memory_bytes: u64,
    /// How many tokens of KV cache the worker can hold.
    pub kv_capacity_tokens: u64,
    /// Version of the worker binary, so a coordinator can refuse mismatched workers.
    pub version: String,
    /// The worker is shutting down: it finishes what it runs but takes no new requests.
    #[serde(default)]
    pub draining: bool,
    /// The deployment unit this worker belongs to (e.g. the pod that runs one tensor-parallel
    /// group's ranks): coordinators form groups only from workers that share it, so a group
    /// never spans two units and leaves with its unit. `None`: any free workers may group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_keeps_every_field() {
        let record = WorkerRecord {
            id: "w1".into(),
            address: "127.0.0.1:50051".into(),
            device: "cuda:0".into(),
            memory_bytes: 80 << 30,
            kv_capacity_tokens: 131_072,
            version: "0.1.0".into(),
            draining: true,
            group: Some("pod-0".into()),
        };
        let json = serde_json::to_string(&record).expect("encode");
        let back: WorkerRecord = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, record);
    }

    #[test]
    fn records_of_earlier_versions_have_no_group() {
        let json = r#"{"id":"w","address":"a:1","device":"cpu","memory_bytes":0,"kv_capacity_tokens":1,"version":"0"}"#;
        let record: WorkerRecord = serde_json::from_str(json).expect("decode");
        assert_eq!((record.group.as_deref(), record.draining), (None, false));
        let json = serde_json::to_string(&record).expect("encode");
        assert!(!json.contains("group"), "an ungrouped record is written as before: {json}");
    }
}
