//! The worker: one tensor-parallel rank of a model, driven step by step by the coordinator.
//!
//! An [`engine`] thread owns the model shard, the KV cache, the samplers and the collective;
//! the gRPC [`service`] turns each `tessera.worker.v1` call into a command for that thread.
//! The worker makes no scheduling decisions: it runs exactly the steps it is sent.

pub mod engine;
mod error;
pub mod service;
mod wire;

pub use engine::{EngineConfig, EngineHandle};
pub use error::WorkerError;
pub use service::{Admission, WorkerService};
