//! The LoRA adapters a serving rank holds, and which sequence runs with which.
//!
//! At most `max` adapters are held, the least recently used going first when another is
//! loaded. A sequence keeps its adapter (an `Arc`) until it is released, so unloading or
//! evicting an adapter never disturbs a sequence that is running with it: only new sequences
//! stop finding it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tessera_model::{Adapter, Model, SeqId};

use crate::error::WorkerError;

pub(crate) struct Adapters {
    /// Least recently used first.
    held: Vec<Arc<Adapter>>,
    max: usize,
    by_seq: HashMap<SeqId, Arc<Adapter>>,
}

impl Adapters {
    pub fn new(max: usize) -> Self {
        Self { held: Vec::new(), max: max.max(1), by_seq: HashMap::new() }
    }

    /// Loads `name` from `dir`, replacing an adapter of that name, and makes it the most
    /// recently used.
    pub fn load(&mut self, model: &Model, name: &str, dir: &Path) -> Result<Arc<Adapter>, WorkerError> {
        let adapter = Arc::new(model.load_adapter(name, dir).map_err(WorkerError::adapter)?);
        self.held.retain(|a| a.name() != name);
        if self.held.len() >= self.max {
            let gone = self.held.remove(0);
            tracing::info!(adapter = gone.name(), max = self.max, "least recently used adapter evicted");
        }
        self.held.push(Arc::clone(&adapter));
        tracing::info!(adapter = name, dir = %dir.display(), mb = adapter.bytes() as f64 / 1e6, "adapter loaded");
        Ok(adapter)
    }

    /// The adapter `name` as loaded from `dir`, loading it if it is not held (evicted, or never
    /// asked for here); marks it most recently used.
    pub fn get_or_load(&mut self, model: &Model, name: &str, dir: &Path) -> Result<Arc<Adapter>, WorkerError> {
        match self.held.iter().position(|a| a.name() == name && a.dir() == dir) {
            Some(i) => {
                let adapter = self.held.remove(i);
                self.held.push(Arc::clone(&adapter));
                Ok(adapter)
            }
            None => self.load(model, name, dir),
        }
    }

    /// Forgets `name`; sequences running with it keep it. Whether it was held.
    pub fn unload(&mut self, name: &str) -> bool {
        let before = self.held.len();
        self.held.retain(|a| a.name() != name);
        before != self.held.len()
    }

    /// Names held, least recently used first.
    pub fn names(&self) -> Vec<String> {
        self.held.iter().map(|a| a.name().to_string()).collect()
    }

    pub fn attach(&mut self, seq: SeqId, adapter: Arc<Adapter>) {
        self.by_seq.insert(seq, adapter);
    }

    pub fn detach(&mut self, seq: SeqId) {
        self.by_seq.remove(&seq);
    }

    /// A fork runs with its source's adapter.
    pub fn fork(&mut self, from: SeqId, to: SeqId) {
        match self.by_seq.get(&from).cloned() {
            Some(a) => self.attach(to, a),
            None => self.detach(to),
        }
    }

    pub fn of(&self, seq: SeqId) -> Option<&Adapter> {
        self.by_seq.get(&seq).map(|a| &**a)
    }

    /// Whether any sequence runs with an adapter (a step without needs no per-row lookup).
    pub fn any_attached(&self) -> bool {
        !self.by_seq.is_empty()
    }
}
