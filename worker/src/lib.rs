//! The worker: one tensor-parallel rank of a model, driven step by step by the coordinator.
//!
//! An [`engine`] thread owns the model shard, the KV cache, the samplers and the collective;
//! the gRPC [`service`] turns each `tessera.worker.v1` call into a command for that thread.
//! The worker makes no scheduling decisions: it runs exactly the steps it is sent.

pub mod engine;
mod error;
pub mod service;
pub mod tls;
mod wire;

pub use engine::{EngineConfig, EngineHandle};
pub use error::WorkerError;
pub use service::{status_report, Admission, WorkerService};
pub use tls::CollectiveTlsFiles;

// The coordinator counts KV blocks with the protocol's block size; the cache allocates with the
// model crate's. They must be the same number.
const _: () = assert!(tessera_model::KV_BLOCK_TOKENS as u64 == tessera_proto::KV_BLOCK_TOKENS);
