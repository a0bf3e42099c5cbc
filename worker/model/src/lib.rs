//! Tessera's model core: a tensor-parallel Llama-family decoder in candle.
//!
//! No networking and no async code lives here. A worker's engine thread owns a [`Model`], a
//! [`KvCache`] and a [`tessera_collective::Collective`], and calls [`Model::forward`] once per
//! step; every rank of a tensor-parallel group makes the same call in lockstep.

mod attention;
mod batch;
pub mod config;
mod error;
pub mod fixture;
mod kv_cache;
mod layer;
mod linear;
mod matvec;
mod model;
mod parallel;
mod rope;
pub mod sampler;
mod weights;

pub use batch::{Batch, LogitsMode, SeqChunk};
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use kv_cache::{KvCache, SeqId};
pub use model::{LoadConfig, Model};
pub use parallel::TpLayout;
pub use weights::{Checkpoint, Shard};
