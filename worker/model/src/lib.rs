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

mod attention;
mod batch;
pub mod bert;
mod bf16_matmul;
pub mod config;
mod decode_attention;
mod elem;
mod embedding;
mod error;
mod exp;
pub mod fixture;
mod fused;
mod heap;
#[cfg(test)]
mod kernel_paths;
pub mod kquant;
mod kv_cache;
mod layer;
mod linear;
pub mod logits;
mod matvec;
mod model;
mod parallel;
mod pool;
pub mod q4matvec;
pub mod q8_gemm;
pub mod qmatvec;
mod ring;
mod rope;
pub mod sampler;
mod sequence;
mod weights;
mod workspace;

pub use batch::{Batch, LogitsMode, SeqChunk};
pub use bert::BertModel;
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use kv_cache::{blocks_for, KvCache, RingPlacement, SeqId, KV_BLOCK_TOKENS};
pub use linear::Quantization;
pub use model::{LoadConfig, Model};
pub use parallel::TpLayout;
pub use pool::limit_candle_spinning;
pub use ring::{AppendOn, DecodeStep, LocalLogits, PrefillStep, RingComm, RingLogits, RingOutput, RingStep};
pub use sequence::ZigzagLayout;
pub use tessera_model_files::{ChatTemplateText, ModelFiles};
pub use weights::{Checkpoint, Shard};
