//! The LoRA adapters each served decoder offers, by name.
//!
//! Registering reads the adapter's `adapter_config.json` (the coordinator sees model files at
//! the workers' paths) and refuses what Tessera does not implement; the weights are checked
//! against the model by the workers, on each group before its first request with the adapter
//! ([`AdapterEntry::mark_loaded`]). Requests carry the adapter's name and directory to the
//! workers on their first step, so a worker that evicted it, or a group formed later, reads it
//! again by itself.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use tessera_model_files::adapter::{read_adapter_config, AdapterConfig};
use tessera_proto::v1 as pb;
use tessera_proto::worker as wpb;

use crate::error::{invalid, CoordinatorError};

/// Longest adapter name: it appears in logs, metrics and `model: "base:adapter"` names.
pub const MAX_ADAPTER_NAME: usize = 64;
/// Adapters registered per model at most.
pub const MAX_ADAPTERS_PER_MODEL: usize = 1024;
/// Longest adapter directory path accepted.
const MAX_ADAPTER_DIR: usize = 1024;

/// One registered adapter.
#[derive(Debug)]
pub struct AdapterEntry {
    pub name: String,
    pub dir: PathBuf,
    pub config: AdapterConfig,
    /// Groups whose workers loaded it (and so checked it against the model).
    loaded_on: Mutex<HashSet<String>>,
}

impl AdapterEntry {
    /// What a worker's first step of a sequence names.
    pub fn wire(&self) -> wpb::AdapterRef {
        wpb::AdapterRef { name: self.name.clone(), dir: self.dir.to_string_lossy().into_owned() }
    }

    pub fn info(&self, base: &str) -> pb::AdapterInfo {
        pb::AdapterInfo {
            name: self.name.clone(),
            base: base.to_string(),
            dir: self.dir.display().to_string(),
            rank: self.config.rank as u32,
            alpha: self.config.alpha as f32,
            use_rslora: self.config.use_rslora,
        }
    }

    pub fn is_loaded_on(&self, group: &str) -> bool {
        self.loaded_on.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(group)
    }

    pub fn mark_loaded(&self, group: &str) {
        self.loaded_on.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(group.to_string());
    }
}

/// A model's adapters.
#[derive(Debug, Default)]
pub struct AdapterRegistry {
    by_name: RwLock<BTreeMap<String, Arc<AdapterEntry>>>,
}

/// Letters, digits, `.`, `_` and `-`: safe in logs and label values, and never `:`, which
/// separates base and adapter in an OpenAI model name.
pub fn check_name(name: &str) -> Result<(), CoordinatorError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_ADAPTER_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!("adapter name {name:?} must be 1 to {MAX_ADAPTER_NAME} letters, digits, '.', '_' or '-'")))
    }
}

impl AdapterRegistry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<AdapterEntry>>> {
        self.by_name.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<AdapterEntry>>> {
        self.by_name.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads and checks the adapter in `dir` and registers it as `name`. A name already taken
    /// is refused unless it names the same directory (registering again is then a no-op).
    pub fn register(&self, name: &str, dir: PathBuf) -> Result<Arc<AdapterEntry>, CoordinatorError> {
        check_name(name)?;
        if dir.as_os_str().is_empty() || dir.as_os_str().len() > MAX_ADAPTER_DIR {
            return Err(invalid(format!("adapter dir must be 1 to {MAX_ADAPTER_DIR} bytes")));
        }
        if let Some(held) = self.get(name) {
            return if held.dir == dir {
                Ok(held)
            } else {
                Err(CoordinatorError::AlreadyExists(format!("adapter {name:?} is already loaded from {}", held.dir.display())))
            };
        }
        let config = read_adapter_config(&dir).map_err(|e| invalid(e.to_string()))?;
        let entry = Arc::new(AdapterEntry { name: name.to_string(), dir, config, loaded_on: Mutex::default() });
        let mut all = self.write();
        if all.len() >= MAX_ADAPTERS_PER_MODEL {
            return Err(CoordinatorError::ResourceExhausted(format!("{MAX_ADAPTERS_PER_MODEL} adapters are loaded; unload one first")));
        }
        Ok(all.entry(name.to_string()).or_insert(entry).clone())
    }

    pub fn get(&self, name: &str) -> Option<Arc<AdapterEntry>> {
        self.read().get(name).cloned()
    }

    /// Removes `name`; whether it was registered.
    pub fn remove(&self, name: &str) -> Option<Arc<AdapterEntry>> {
        self.write().remove(name)
    }

    pub fn list(&self) -> Vec<Arc<AdapterEntry>> {
        self.read().values().cloned().collect()
    }

    /// The adapter a request names, or NOT_FOUND listing those there are.
    pub fn find(&self, name: &str, model: &str) -> Result<Arc<AdapterEntry>, CoordinatorError> {
        self.get(name).ok_or_else(|| {
            let names: Vec<String> = self.read().keys().map(|k| format!("{k:?}")).collect();
            let loaded = if names.is_empty() { "none".to_string() } else { names.join(", ") };
            CoordinatorError::NotFound(format!("adapter {name:?} is not loaded for model {model:?}; loaded: {loaded}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["sql", "legal-v2", "a.b_c", &"x".repeat(MAX_ADAPTER_NAME)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "base:adapter", "a b", "../x", "é", &"x".repeat(MAX_ADAPTER_NAME + 1)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
