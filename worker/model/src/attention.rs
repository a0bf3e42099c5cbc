//! Causal attention of one chunk of a sequence against that sequence's cached keys and values.
//!
//! Grouped-query attention without copying KV heads: the query heads that share a KV head are
//! stacked into one matrix, so each KV head is read once per chunk.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// Additive mask `[chunk_len, kv_len]` (0 or −∞) for one chunk; `None` when every cached
/// position is visible, as in plain decode.
pub struct ChunkMask(Option<Tensor>);

impl ChunkMask {
    /// Mask for `len` queries at positions `start..start + len` attending to keys `0..start + len`,
    /// limited to the last `window` positions (inclusive of the query's own) when set.
    pub fn new(start: usize, len: usize, window: Option<usize>, device: &Device) -> Result<Self> {
        let total = start + len;
        let window_bites = window.is_some_and(|w| total > w);
        if len == 1 && !window_bites {
            return Ok(Self(None));
        }
        let mut mask = Vec::with_capacity(len * total);
        for i in 0..len {
            let q_pos = start + i;
            for k_pos in 0..total {
                let visible = k_pos <= q_pos && window.is_none_or(|w| q_pos - k_pos < w);
                mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
            }
        }
        Ok(Self(Some(Tensor::from_vec(mask, (len, total), device)?)))
    }
}

/// `q`: `[len, heads, head_dim]` (already rotated); `keys`, `values`: `[kv_heads, kv_len, head_dim]`.
/// Returns `[len, heads * head_dim]`.
pub fn attend(q: &Tensor, keys: &Tensor, values: &Tensor, mask: &ChunkMask) -> Result<Tensor> {
    let (len, heads, head_dim) = q.dims3()?;
    let (kv_heads, kv_len, _) = keys.dims3()?;
    let group = heads / kv_heads;
    let dtype = q.dtype();

    // [len, heads, d] → [heads, len, d] → [kv_heads, group * len, d]: heads sharing a KV head
    // are adjacent, so this is a pure reshape.
    let q = (q.transpose(0, 1)?.contiguous()? * (1.0 / (head_dim as f64).sqrt()))?
        .reshape((kv_heads, group * len, head_dim))?;
    let scores = q.matmul(&keys.t()?)?.to_dtype(DType::F32)?;
    let scores = match &mask.0 {
        Some(m) => scores.reshape((kv_heads, group, len, kv_len))?.broadcast_add(m)?.reshape((kv_heads, group * len, kv_len))?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    let out = probs.matmul(values)?; // [kv_heads, group * len, d]
    Ok(out.reshape((heads, len, head_dim))?.transpose(0, 1)?.reshape((len, heads * head_dim))?)
}
