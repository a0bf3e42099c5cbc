//! The token embedding: float rows, or a GGUF file's block-quantized rows kept as stored.
//!
//! llama.cpp's files quantize `token_embd` like the projections (a Q4_1 file's is Q4_1).
//! Widening it to f32 on load would make it the largest tensor in memory (SmolLM2-135M: 113 MB
//! against an 85 MB file), so the quantized rows stay as they are and only the rows a step
//! looks up are dequantized — one per token, the way llama.cpp's `get_rows` does.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{QStorage, QTensor};
use candle_core::{DType, Tensor};

use crate::kernels::elem::Dest;
use crate::model::linear::Weight;

#[derive(Debug, Clone)]
pub enum Embedding {
    Float(Tensor),
    Quantized(Arc<QTensor>),
}

impl Embedding {
    /// The embedding as the checkpoint gave it; `None` for a stacked weight, which an embedding
    /// never is.
    pub fn from_weight(w: Weight) -> Option<Self> {
        match w {
            Weight::Float(t) => Some(Self::Float(t)),
            Weight::Quantized(q) => Some(Self::Quantized(q)),
            Weight::Stacked { .. } => None,
        }
    }

    /// Rows `tokens` as `[tokens, hidden]` in `dtype` (into `dest` where it fits, for float
    /// rows). Token ids are checked against the vocabulary before this is called.
    pub fn lookup(&self, tokens: &[u32], dtype: DType, dest: Option<&Dest>) -> candle_core::Result<Tensor> {
        match self {
            Self::Float(t) => match crate::kernels::fused::gather_rows(t, tokens, dest)? {
                Some(x) => Ok(x),
                None => t.index_select(&Tensor::new(tokens, t.device())?, 0),
            },
            Self::Quantized(q) => {
                let (vocab, hidden) = q.shape().dims2()?;
                let row_bytes = hidden / q.dtype().block_size() * q.dtype().type_size();
                let data = q.data()?;
                let mut rows = Vec::with_capacity(tokens.len() * row_bytes);
                for &t in tokens {
                    let t = t as usize;
                    if t >= vocab {
                        candle_core::bail!("token {t} is outside the {vocab}-row embedding");
                    }
                    rows.extend_from_slice(&data[t * row_bytes..(t + 1) * row_bytes]);
                }
                let storage = QStorage::from_data(Cow::Owned(rows), &q.device(), q.dtype())?;
                QTensor::new(storage, (tokens.len(), hidden))?.dequantize(&q.device())?.to_dtype(dtype)
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Float(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Quantized(q) => q.storage_size_in_bytes(),
        }
    }
}
