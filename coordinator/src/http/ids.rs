//! Request ids as OpenAI writes them (`cmpl-…`, `chatcmpl-…`), `created` times, and the
//! `system_fingerprint` of a served model.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::model::ServedModel;

/// 24 hex digits, different for every request of every coordinator start.
pub fn request_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    format!("{:016x}{:08x}", mix(nanos ^ mix(count)), count as u32)
}

/// Seconds since the Unix epoch.
pub fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// `fp_` and 10 hex digits that change only when what answers changes: this build of Tessera,
/// the model's files and how they are served (name, path, dtype, tensor-parallel size, context).
pub fn fingerprint(model: &ServedModel) -> String {
    let spec = &model.spec;
    let text = format!(
        "{}\0{}\0{}\0{}\0{}\0{}\0{}",
        env!("CARGO_PKG_VERSION"),
        spec.name,
        spec.dir.display(),
        spec.dtype,
        spec.tp,
        model.max_context,
        model.vocab_size
    );
    // FNV-1a: stable across Rust versions, unlike the standard library's hasher.
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    format!("fp_{:010x}", hash >> 24)
}

/// SplitMix64's finaliser: nearby inputs give unrelated outputs.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_differ_and_have_openais_length() {
        let (a, b) = (request_id(), request_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 24);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
    }
}
