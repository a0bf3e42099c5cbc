//! API keys: who may call `tessera.v1.Inference`, and how much.
//!
//! The key file (`--api-keys`) has one key per line, `NAME SHA256HEX [max_concurrent=N]
//! [tokens_per_minute=N]`; it stores the SHA-256 of each key, never the key, and is read again
//! when it changes ([`ApiKeys`]). A call presents
//! `authorization: Bearer KEY` (gRPC metadata, or the HTTP header the HTTP API passes on). The
//! digest of what was presented is compared with every stored digest in constant time, so
//! neither timing nor the answer tells which part was wrong: a missing, malformed or unknown
//! key all get the same `UNAUTHENTICATED` message.
//!
//! A known key gets a [`Ticket`] that holds one of its concurrent slots until dropped (with the
//! response stream, so a stream counts until it ends or the client leaves) and charges the
//! tokens that pass through it to the key's per-minute budget. Logs and metrics name the key by
//! its NAME only.
//!
//! Health and reflection are separate services and stay open.

mod file;
mod limit;
mod metered;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

use crate::error::CoordinatorError;
pub use file::KeyFileError;
pub use limit::KeyLimits;
use limit::KeyState;
pub use metered::MeteredStream;

/// The one answer to every key that is not accepted.
pub const UNAUTHENTICATED: &str = "missing or invalid API key (send authorization: Bearer KEY)";

/// The SHA-256 of a key, as the key file stores it (lower-case hex).
pub fn digest_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// A per-key metric: name, Prometheus type, help, and how to read it.
type Metric = (&'static str, &'static str, &'static str, fn(&KeyState) -> u64);

/// One key of the file.
struct Key {
    name: String,
    digest: [u8; 32],
    state: Arc<KeyState>,
}

/// The keys a coordinator accepts. Loaded from a file, they are read again when the file
/// changes (checked by modification time and length at every call), so keys are added and
/// revoked without a restart; a key whose name and limits stay keeps its running count and
/// budget. A changed file that does not parse is logged and the previous keys stay.
pub struct ApiKeys {
    file: Option<PathBuf>,
    current: Mutex<(Option<Stamp>, Arc<Vec<Key>>)>,
}

/// One version of the key file: modification time and length.
type Stamp = (std::time::SystemTime, u64);

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl ApiKeys {
    /// Reads a key file, and reads it again whenever it changes.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let stamp = stamp(path);
        let keys = read(path)?;
        Ok(Self { file: Some(path.to_path_buf()), current: Mutex::new((stamp, Arc::new(build(keys, &[])))) })
    }

    /// Parses a key file's text (keys that never change).
    pub fn parse(text: &str) -> Result<Self, KeyFileError> {
        Ok(Self { file: None, current: Mutex::new((None, Arc::new(build(file::parse(text)?, &[])))) })
    }

    /// Names of the keys, in file order.
    pub fn names(&self) -> Vec<String> {
        self.keys().iter().map(|k| k.name.clone()).collect()
    }

    /// The keys as the file holds them now.
    fn keys(&self) -> Arc<Vec<Key>> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(path) = &self.file else { return current.1.clone() };
        let now = stamp(path);
        if now != current.0 {
            current.0 = now;
            match read(path) {
                Ok(lines) => {
                    current.1 = Arc::new(build(lines, &current.1));
                    tracing::info!(file = %path.display(), keys = current.1.len(), "API key file changed; reloaded");
                }
                // Not retried until the file changes again.
                Err(e) => tracing::warn!(error = %e, "API key file changed but does not load; keeping the previous keys"),
            }
        }
        current.1.clone()
    }

    /// Per-key counters in Prometheus text, labelled by key name.
    pub fn prometheus(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let metrics: [Metric; 4] = [
            ("tessera_api_key_requests_total", "counter", "Calls admitted, by API key name.", KeyState::admitted),
            ("tessera_api_key_limited_total", "counter", "Calls refused for a key's limits, by API key name.", KeyState::limited),
            ("tessera_api_key_tokens_total", "counter", "Prompt and generated tokens charged, by API key name.", KeyState::tokens),
            ("tessera_api_key_in_flight", "gauge", "Calls running now, by API key name.", KeyState::running),
        ];
        let keys = self.keys();
        for (name, kind, help, value) in metrics {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
            for key in keys.iter() {
                // Names are letters, digits and - _ . @: nothing to escape in a label.
                let _ = writeln!(out, "{name}{{key=\"{}\"}} {}", key.name, value(&key.state));
            }
        }
        out
    }

    /// Checks a call's credentials and takes one of its key's concurrent slots.
    pub fn admit(&self, metadata: &MetadataMap) -> Result<Ticket, CoordinatorError> {
        let unauthenticated = || CoordinatorError::Unauthenticated(UNAUTHENTICATED.into());
        let presented = metadata.get("authorization").and_then(|v| v.to_str().ok()).and_then(bearer).ok_or_else(unauthenticated)?;
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Every stored digest is compared, whatever matched first.
        let keys = self.keys();
        let mut found = None;
        for (i, key) in keys.iter().enumerate() {
            if constant_time_eq(&digest, &key.digest) {
                found = Some(i);
            }
        }
        let key = &keys[found.ok_or_else(unauthenticated)?];
        key.state.admit(&key.name)?;
        Ok(Ticket { name: key.name.clone(), state: key.state.clone() })
    }
}

fn stamp(path: &Path) -> Option<Stamp> {
    std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())))
}

fn read(path: &Path) -> Result<Vec<file::Line>, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read { path: path.to_path_buf(), source })?;
    file::parse(&text)
}

/// Keys from parsed lines; a key named in `previous` with the same limits keeps its state.
fn build(lines: Vec<file::Line>, previous: &[Key]) -> Vec<Key> {
    lines
        .into_iter()
        .map(|line| {
            let state = previous
                .iter()
                .find(|k| k.name == line.name && k.state.limits() == line.limits)
                .map(|k| k.state.clone())
                .unwrap_or_else(|| Arc::new(KeyState::new(line.limits)));
            Key { name: line.name, digest: line.digest, state }
        })
        .collect()
}

/// The key of `Bearer KEY` (the scheme is case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, key) = value.trim().split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One admitted call: holds a concurrent slot of its key until dropped.
pub struct Ticket {
    name: String,
    state: Arc<KeyState>,
}

impl Ticket {
    /// The key's name, for logs and metrics.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Counts `tokens` (prompt or generated) against the key's per-minute budget.
    pub fn charge(&self, tokens: u64) {
        self.state.charge(tokens);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.state.release();
    }
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("key", &self.name).finish()
    }
}

#[cfg(test)]
mod tests;
