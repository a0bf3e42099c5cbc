//! Sharded reads from a llama.cpp GGUF file, under Hugging Face tensor names.
//!
//! GGUF keeps the `[out, in]` row-major layout of Hugging Face (its dimension list is reversed,
//! which candle's reader undoes), so sharding is the same row/column block selection as for
//! safetensors. Two things differ:
//! - names: `blk.N.attn_q.weight` for `model.layers.N.self_attn.q_proj.weight`, and so on;
//! - llama.cpp's converter (`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the rows of
//!   the q and k projections (weights and biases) of `llama` models from Hugging Face's rotary
//!   layout (first half / second half of each head) to interleaved pairs. We undo it row by row,
//!   so the model keeps one rotary implementation. Quantized rows are independent, so a row is
//!   moved as its bytes and nothing is requantized.
//!
//! Quantized matrices are returned in their stored format; a column block (row-parallel
//! projections) must then start and end on a quantization block.

use std::borrow::Cow;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use super::Shard;
use crate::error::{ModelError, Result};

/// A tensor's stored element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stored {
    Float(DType),
    Quantized(GgmlDType),
}

impl Stored {
    fn of(t: GgmlDType) -> Self {
        match t {
            GgmlDType::F32 => Self::Float(DType::F32),
            GgmlDType::F16 => Self::Float(DType::F16),
            GgmlDType::BF16 => Self::Float(DType::BF16),
            q => Self::Quantized(q),
        }
    }

    /// Elements and bytes of one storage unit (an element, or a quantization block).
    fn unit(self) -> (usize, usize) {
        match self {
            Self::Float(d) => (1, d.size_in_bytes()),
            Self::Quantized(q) => (q.block_size(), q.type_size()),
        }
    }
}

/// One shard of a tensor as read from the file: its stored type, shape and bytes.
pub(crate) struct RawShard {
    pub stored: Stored,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl RawShard {
    /// As a float tensor (quantized blocks dequantized).
    pub fn into_tensor(self, device: &Device) -> Result<Tensor> {
        Ok(match self.stored {
            Stored::Float(d) => Tensor::from_raw_buffer(&self.bytes, d, &self.shape, device)?,
            Stored::Quantized(_) => self.into_qtensor(device)?.dequantize(device)?,
        })
    }

    pub fn into_qtensor(self, device: &Device) -> Result<QTensor> {
        let dtype = match self.stored {
            Stored::Float(DType::F16) => GgmlDType::F16,
            Stored::Float(DType::BF16) => GgmlDType::BF16,
            Stored::Float(_) => GgmlDType::F32,
            Stored::Quantized(q) => q,
        };
        Ok(QTensor::new(QStorage::from_data(Cow::Owned(self.bytes), device, dtype)?, self.shape.as_slice())?)
    }
}

/// The llama.cpp name of a Hugging Face tensor name, if the model uses it.
pub(crate) fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let short = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{kind}"))
}

/// A memory-mapped GGUF file.
pub(crate) struct GgufFile {
    path: PathBuf,
    content: Content,
    map: memmap2::Mmap,
    /// Query and KV heads whose q/k rows llama.cpp interleaved (`llama` files only).
    permuted_heads: Option<(usize, usize)>,
}

fn metadata_usize(content: &Content, key: &str) -> Option<usize> {
    match content.metadata.get(key)? {
        Value::U32(v) => Some(*v as usize),
        Value::I32(v) => usize::try_from(*v).ok(),
        Value::U64(v) => usize::try_from(*v).ok(),
        Value::I64(v) => usize::try_from(*v).ok(),
        _ => None,
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| ModelError::Io { path: path.to_path_buf(), source };
        // The bounds-checked reader first: candle's trusts the counts and lengths it reads
        // (allocating what a hostile header asks for) and checks no tensor against the file.
        tessera_model_files::GgufHeader::read(path)?;
        let file = File::open(path).map_err(io)?;
        // SAFETY: mapped read-only; like every mmap-based loader we assume nobody truncates the
        // file while the model is loading.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let content =
            Content::read(&mut std::io::Cursor::new(&map[..])).map_err(|source| ModelError::Gguf { path: path.to_path_buf(), source })?;
        let arch = match content.metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(ModelError::InvalidConfig(format!("{}: no general.architecture", path.display()))),
        };
        // Only the llama converter permutes q/k (Mistral checkpoints go through it too); qwen2
        // files keep Hugging Face's row order.
        let permuted_heads = if arch == "llama" {
            let heads = metadata_usize(&content, "llama.attention.head_count");
            let kv = metadata_usize(&content, "llama.attention.head_count_kv").or(heads);
            match (heads, kv) {
                (Some(h), Some(kv)) if h > 0 && kv > 0 => Some((h, kv)),
                _ => {
                    return Err(ModelError::InvalidConfig(format!(
                        "{}: llama.attention.head_count is missing, so q/k rows cannot be put back in order",
                        path.display()
                    )))
                }
            }
        } else {
            None
        };
        Ok(Self { path: path.to_path_buf(), content, map, permuted_heads })
    }

    /// Query and KV head counts the file's q/k rows were interleaved with, if any.
    pub fn permuted_heads(&self) -> Option<(usize, usize)> {
        self.permuted_heads
    }

    pub fn contains(&self, hf_name: &str) -> bool {
        gguf_name(hf_name).is_some_and(|n| self.content.tensor_infos.contains_key(&n))
    }

    /// Whether `hf_name` is stored block-quantized.
    pub fn is_quantized(&self, hf_name: &str) -> bool {
        gguf_name(hf_name)
            .and_then(|n| self.content.tensor_infos.get(&n))
            .is_some_and(|info| matches!(Stored::of(info.ggml_dtype), Stored::Quantized(_)))
    }

    /// Reads `shard` of the 1-D or 2-D tensor `hf_name`, whose full shape must be `full_shape`,
    /// with q/k rows back in Hugging Face order.
    pub fn get(&self, hf_name: &str, full_shape: &[usize], shard: Shard) -> Result<RawShard> {
        let missing = || ModelError::MissingTensor { name: hf_name.to_string() };
        let name = gguf_name(hf_name).ok_or_else(missing)?;
        let info = self.content.tensor_infos.get(&name).ok_or_else(missing)?;
        let shape = info.shape.dims().to_vec();
        if shape != full_shape {
            return Err(ModelError::TensorShape { name: hf_name.into(), expected: full_shape.to_vec(), actual: shape });
        }
        let stored = Stored::of(info.ggml_dtype);
        let (rows, cols) = match shape[..] {
            [n] => (n, 1),
            [r, c] => (r, c),
            _ => return Err(ModelError::InvalidConfig(format!("{hf_name}: {}-D tensors are not read from GGUF", shape.len()))),
        };
        // A 1-D tensor is a column of `rows` one-element rows, so only row shards apply.
        let (unit_elems, unit_bytes) = match (shape.len(), stored) {
            (1, Stored::Float(d)) => (1, d.size_in_bytes()),
            (1, Stored::Quantized(q)) => return Err(self.bad(format!("{name}: a 1-D tensor stored as {q:?} is not supported"))),
            _ => stored.unit(),
        };
        if !cols.is_multiple_of(unit_elems) {
            return Err(self.bad(format!("{name}: {cols} columns do not fill {unit_elems}-element blocks")));
        }
        let row_bytes = cols / unit_elems * unit_bytes;
        let past_end = || self.bad(format!("{name}: data runs past the end of the file"));
        let start = self.content.tensor_data_offset.checked_add(info.offset).and_then(|s| usize::try_from(s).ok()).ok_or_else(past_end)?;
        let end = rows.checked_mul(row_bytes).and_then(|n| n.checked_add(start)).ok_or_else(past_end)?;
        let data = self.map.get(start..end).ok_or_else(past_end)?;

        let (row_range, col_range) = shard_ranges(hf_name, rows, cols, shard)?;
        let (u0, u1) = if shape.len() == 1 { (0, 1) } else { (col_range.start, col_range.end) };
        if !u0.is_multiple_of(unit_elems) || !u1.is_multiple_of(unit_elems) {
            return Err(ModelError::QuantBlock {
                name: hf_name.into(),
                len: u1 - u0,
                block: unit_elems,
                format: format!("{:?}", info.ggml_dtype).to_lowercase(),
            });
        }
        let (b0, b1) = (u0 / unit_elems * unit_bytes, u1 / unit_elems * unit_bytes);
        let heads = self.row_heads(hf_name);
        if let Some(h) = heads {
            if !rows.is_multiple_of(2 * h) {
                return Err(self.bad(format!("{name}: {rows} rows cannot hold {h} heads of even size")));
            }
        }
        let mut bytes = Vec::with_capacity(row_range.len() * (b1 - b0));
        for r in row_range.clone() {
            let src = match heads {
                Some(h) => interleaved_row(r, rows / h),
                None => r,
            };
            bytes.extend_from_slice(&data[src * row_bytes + b0..src * row_bytes + b1]);
        }
        let out_shape = if shape.len() == 1 { vec![row_range.len()] } else { vec![row_range.len(), col_range.len()] };
        Ok(RawShard { stored, shape: out_shape, bytes })
    }

    /// Heads whose rows llama.cpp interleaved in `hf_name`, if it is a permuted q/k tensor.
    fn row_heads(&self, hf_name: &str) -> Option<usize> {
        let (heads, kv) = self.permuted_heads?;
        if hf_name.contains(".self_attn.q_proj.") {
            Some(heads)
        } else if hf_name.contains(".self_attn.k_proj.") {
            Some(kv)
        } else {
            None
        }
    }

    fn bad(&self, what: String) -> ModelError {
        ModelError::InvalidConfig(format!("{}: {what}", self.path.display()))
    }
}

/// The rows and columns of a `rows × cols` tensor that `shard` selects.
fn shard_ranges(name: &str, rows: usize, cols: usize, shard: Shard) -> Result<(std::ops::Range<usize>, std::ops::Range<usize>)> {
    let block = |size: usize| -> Result<std::ops::Range<usize>> {
        if !size.is_multiple_of(shard.parts) {
            return Err(ModelError::UnevenSplit { what: "tensor dimension", size, tp: shard.parts });
        }
        let b = size / shard.parts;
        Ok(shard.index * b..(shard.index + 1) * b)
    };
    match shard.dim {
        0 => Ok((block(rows)?, 0..cols)),
        1 => Ok((0..rows, block(cols)?)),
        d => Err(ModelError::InvalidConfig(format!("tensor {name:?} has no dimension {d} to shard"))),
    }
}

/// The stored row holding Hugging Face row `row` of a q/k projection with `head_dim` rows per
/// head, after llama.cpp's `w.reshape(heads, 2, head_dim / 2, in).swapaxes(1, 2)`: element `i`
/// of the first half of a head goes to row `2i`, element `i` of the second half to `2i + 1`.
pub(crate) fn interleaved_row(row: usize, head_dim: usize) -> usize {
    let (head, within) = (row / head_dim, row % head_dim);
    let half = head_dim / 2;
    head * head_dim + 2 * (within % half) + within / half
}

/// The inverse of [`interleaved_row`]: the Hugging Face row stored at row `stored`. Used to
/// write GGUF files in llama.cpp's order.
pub(crate) fn hf_row_of_interleaved(stored: usize, head_dim: usize) -> usize {
    let (head, within) = (stored / head_dim, stored % head_dim);
    let half = head_dim / 2;
    head * head_dim + (within % 2) * half + within / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reader's row map is the inverse of the writer's, and both match llama.cpp's
    /// `reshape(heads, 2, d / 2, in).swapaxes(1, 2)` on a small worked case.
    #[test]
    fn interleaving_round_trips_and_matches_llama_cpp() {
        // One head of 8 rows: HF rows [0 1 2 3 | 4 5 6 7] are stored as [0 4 1 5 2 6 3 7].
        let stored: Vec<usize> = (0..8).map(|s| hf_row_of_interleaved(s, 8)).collect();
        assert_eq!(stored, [0, 4, 1, 5, 2, 6, 3, 7]);
        for head_dim in [2, 8, 24, 64] {
            for row in 0..3 * head_dim {
                assert_eq!(hf_row_of_interleaved(interleaved_row(row, head_dim), head_dim), row);
            }
        }
    }

    #[test]
    fn hugging_face_names_map_to_llama_cpp_names() {
        assert_eq!(gguf_name("model.layers.12.self_attn.k_proj.bias").as_deref(), Some("blk.12.attn_k.bias"));
        assert_eq!(gguf_name("model.layers.0.mlp.down_proj.weight").as_deref(), Some("blk.0.ffn_down.weight"));
        assert_eq!(gguf_name("model.layers.3.post_attention_layernorm.weight").as_deref(), Some("blk.3.ffn_norm.weight"));
        assert_eq!(gguf_name("lm_head.weight").as_deref(), Some("output.weight"));
        assert_eq!(gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq"), None);
    }
}
