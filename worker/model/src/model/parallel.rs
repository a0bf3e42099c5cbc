//! How a model's heads and features are split over a tensor-parallel group.
//!
//! Megatron split: q/k/v, gate and up are column-parallel (rows of the HF weight), o and down are
//! row-parallel (columns) followed by an all-reduce. With grouped-query attention a rank either
//! holds `n_kv / tp` KV heads, or — when `tp > n_kv` — one KV head replicated on `tp / n_kv`
//! ranks, so that its query heads always find their KV head locally.

use crate::error::{ModelError, Result};
use crate::model::config::ModelConfig;
use crate::model::weights::Shard;

/// One rank's share of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpLayout {
    pub rank: usize,
    pub size: usize,
    /// Query heads on this rank.
    pub heads: usize,
    /// KV heads on this rank.
    pub kv_heads: usize,
    /// Intermediate (MLP) features on this rank.
    pub intermediate: usize,
    /// Which block of the KV projections this rank reads.
    pub kv_shard: Shard,
}

impl TpLayout {
    /// Validates that `cfg` splits evenly over `size` ranks and returns rank `rank`'s share.
    pub fn new(cfg: &ModelConfig, rank: usize, size: usize) -> Result<Self> {
        if size == 0 || rank >= size {
            return Err(ModelError::InvalidConfig(format!("tensor-parallel rank {rank} of size {size}")));
        }
        let heads = cfg.num_attention_heads;
        let kv = cfg.num_key_value_heads;
        if !heads.is_multiple_of(size) {
            return Err(ModelError::UnevenSplit { what: "num_attention_heads", size: heads, tp: size });
        }
        if !cfg.intermediate_size.is_multiple_of(size) {
            return Err(ModelError::UnevenSplit { what: "intermediate_size", size: cfg.intermediate_size, tp: size });
        }
        let (kv_heads, kv_shard) = if kv.is_multiple_of(size) {
            (kv / size, Shard::rows(rank, size))
        } else if size.is_multiple_of(kv) {
            let replicas = size / kv;
            (1, Shard::rows(rank / replicas, kv))
        } else {
            return Err(ModelError::UnevenSplit { what: "num_key_value_heads", size: kv, tp: size });
        };
        Ok(Self { rank, size, heads: heads / size, kv_heads, intermediate: cfg.intermediate_size / size, kv_shard })
    }

    /// The column-parallel block this rank reads (query heads, MLP features).
    pub fn column(&self) -> Shard {
        Shard::rows(self.rank, self.size)
    }

    /// The row-parallel block this rank reads (inputs of o_proj and down_proj).
    pub fn row(&self) -> Shard {
        Shard::cols(self.rank, self.size)
    }
}
