//! The [`WorkerRecord`] a worker announces: built in one place, so `tessera worker` (etcd) and
//! `tessera up` (its child workers, in memory) describe a worker the same way.

use std::fmt::Display;

use tessera_registry::WorkerRecord;

/// Where the kernel reports memory; absent off Linux.
const MEMINFO: &str = "/proc/meminfo";

/// The record of a CPU worker `id` serving gRPC at `address` (`host:port`) with room for
/// `kv_capacity_tokens` tokens of KV cache. Memory is what the machine has available now, or 0
/// when that cannot be read: the record is advisory and must not keep a worker from starting.
pub fn worker_record(id: &str, address: impl Display, kv_capacity_tokens: u64) -> WorkerRecord {
    let memory_bytes = std::fs::read_to_string(MEMINFO).ok().and_then(|text| mem_available_bytes(&text)).unwrap_or(0);
    WorkerRecord {
        id: id.to_string(),
        address: address.to_string(),
        device: "cpu".to_string(),
        memory_bytes,
        kv_capacity_tokens,
        version: env!("CARGO_PKG_VERSION").to_string(),
        draining: false,
        group: None,
    }
}

/// `MemAvailable` from the text of `/proc/meminfo` (a line `MemAvailable:  123456 kB`), in bytes.
fn mem_available_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let mut fields = line.split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    // The kernel has always written kB (KiB) here; any other unit is not one we can trust.
    match fields.next() {
        Some("kB") => value.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       16384000 kB\nMemFree:         1000 kB\nMemAvailable:    8192000 kB\n";
        assert_eq!(mem_available_bytes(text), Some(8_192_000 * 1024));
        assert_eq!(mem_available_bytes("MemTotal: 1 kB\n"), None);
        assert_eq!(mem_available_bytes("MemAvailable: lots kB\n"), None);
        assert_eq!(mem_available_bytes("MemAvailable: 12 MB\n"), None);
    }

    #[test]
    fn record_describes_a_cpu_worker() {
        let addr: std::net::SocketAddr = "127.0.0.1:5000".parse().expect("literal address");
        let record = worker_record("w1", addr, 4096);
        assert_eq!(record.id, "w1");
        assert_eq!(record.address, "127.0.0.1:5000");
        assert_eq!(record.device, "cpu");
        assert_eq!(record.kv_capacity_tokens, 4096);
        assert_eq!(record.version, env!("CARGO_PKG_VERSION"));
        assert_eq!(worker_record("w2", "node-3:7000", 1).address, "node-3:7000");
    }
}
