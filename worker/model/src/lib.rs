//! Tessera's model core: a tensor- and sequence-parallel Llama-family decoder in candle.
//!
//! No networking and no async code lives here. A worker's engine thread owns a [`Model`], a
//! [`KvCache`] and a [`tessera_collective::Collective`], and calls [`Model::forward`] once per
//! step; every rank of a tensor-parallel group makes the same call in lockstep. A sequence
//! spread over a sequence-parallel ring of such groups goes through [`Model::forward_ring`]
//! instead, with a second collective joining the ring ([`RingComm`]).
//!
//! Beside the decoders, [`BertModel`] is a BERT-family encoder that turns token ids into
//! sentence embeddings (sentence-transformers pooling and normalisation; TP=1).
//!
//! The crate's parts, one folder each: `model/` (the decoder: config, weights, layers,
//! attention, KV cache), `kernels/` (the CPU arithmetic, its threads and heap), `sampling/`
//! (the sampler and logits processors), `bert/` (the encoder) and `fixture/` (deterministic
//! checkpoints for tests and benches).

#![deny(unsafe_op_in_unsafe_fn)]

pub mod bert;
mod error;
pub mod fixture;
pub mod kernels;
mod model;
mod sampling;

pub use bert::BertModel;
pub use error::{ModelError, Result};
pub use kernels::pool::limit_candle_spinning;
pub use model::batch::{Batch, LogitsMode, SeqChunk};
pub use model::config;
pub use model::config::{Architecture, ModelConfig, RopeScaling};
pub use model::kv_cache::{blocks_for, KvCache, KvCacheConfig, PrefixCaching, RingPlacement, SeqId, KV_BLOCK_TOKENS};
pub use model::kv_pool::PoolCounts;
pub use model::linear::{weight_format, Numerics, Quantization};
pub use model::lora::{read_adapter_config, Adapter, AdapterConfig, LORA_TARGETS, MAX_LORA_RANK};
pub use model::parallel::TpLayout;
pub use model::prefix_cache::PrefixStats;
pub use model::ring::{AppendOn, DecodeStep, LocalLogits, PrefillStep, RingComm, RingLogits, RingOutput, RingStep};
pub use model::sequence::ZigzagLayout;
pub use model::weights::{Checkpoint, Shard};
pub use model::{LoadConfig, Model};
pub use sampling::{logits, sampler};
pub use tessera_model_files::{ChatTemplateText, ModelFiles};
