//! `Reloading<T>`: a value built from files, built again when one of them changes.
//!
//! Checking costs one `stat` per file per use; that is cheap next to a TLS handshake, which is
//! when it runs. A file that changed but no longer builds (a half-written key, a mismatched
//! pair) keeps the last good value in service and is logged, so a botched renewal does not take
//! the server down.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use crate::TlsError;

/// What identifies one version of the files: modification time and length of each.
type Stamp = Vec<Option<(SystemTime, u64)>>;

pub(crate) struct Reloading<T> {
    paths: Vec<PathBuf>,
    build: Box<dyn Fn() -> Result<T, TlsError> + Send + Sync>,
    current: Mutex<(Stamp, Arc<T>)>,
}

impl<T> Reloading<T> {
    /// Builds the first value now, so a bad file fails at start-up.
    pub fn new(paths: Vec<PathBuf>, build: impl Fn() -> Result<T, TlsError> + Send + Sync + 'static) -> Result<Self, TlsError> {
        let stamp = stamp(&paths);
        let value = Arc::new(build()?);
        Ok(Self { paths, build: Box::new(build), current: Mutex::new((stamp, value)) })
    }

    /// The value for the files as they are now.
    pub fn get(&self) -> Arc<T> {
        let now = stamp(&self.paths);
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.0 != now {
            match (self.build)() {
                Ok(value) => {
                    tracing::info!(files = ?self.paths, "TLS files changed; reloaded");
                    *current = (now, Arc::new(value));
                }
                Err(e) => {
                    tracing::warn!(files = ?self.paths, error = %e, "TLS files changed but do not load; keeping the previous ones");
                    // Not retried until the files change again.
                    current.0 = now;
                }
            }
        }
        current.1.clone()
    }
}

fn stamp(paths: &[PathBuf]) -> Stamp {
    paths.iter().map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len())))).collect()
}
