//! Attention for decode rows — one query per sequence, every cached key visible — in one
//! parallel pass over all the step's decoding sequences and heads.
//!
//! Going through tensor ops costs about fifteen small operations per sequence and layer
//! (transposes, copies, two matmuls, a softmax), each with its own allocation and dispatch; at
//! a batch of 16 short sequences that overhead rivals the weight reads. Here each (sequence,
//! head) pair is one task that reads its keys and values straight from the cache's storage
//! once (scores, one vectorised exponential, the weighted sum of values), and writes its output
//! row in place. Queries that share a KV head read the same rows, which stay in cache.

use candle_core::{DType, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::elem::Elem;
use crate::error::{ModelError, Result};
use crate::exp::exp_in_place;

/// One decoding sequence of a step: its query row (`[1, heads, head_dim]`) and views of its
/// cached keys and values (`[kv_heads, len, head_dim]`, as `KvCache::write` returns them).
pub(crate) struct DecodeRow {
    pub q: Tensor,
    pub keys: Tensor,
    pub values: Tensor,
}

/// Whether [`decode_attention`] handles these tensors: f32, bf16 or f16 on the CPU, queries
/// and cache of one type.
pub(crate) fn applies(q: &Tensor, keys: &Tensor) -> bool {
    matches!(q.dtype(), DType::F32 | DType::BF16 | DType::F16) && keys.dtype() == q.dtype() && q.device().is_cpu()
}

/// Where one tensor's elements live: its storage and the element offset and strides of a
/// `[a, b, c]` view whose last dimension is contiguous.
#[derive(Clone, Copy)]
struct View<'a, T> {
    data: &'a [T],
    start: usize,
    stride0: usize,
    stride1: usize,
}

impl<T> View<'_, T> {
    /// The rows of index `i` along the first dimension (one KV head).
    fn head(self, i: usize) -> Self {
        Self { start: self.start + i * self.stride0, ..self }
    }

    /// Row `j` along the second dimension (a key or value position; for a query, a head),
    /// `len` elements.
    fn row(&self, j: usize, len: usize) -> &[T] {
        let s = self.start + j * self.stride1;
        &self.data[s..s + len]
    }
}

fn view<'a, T: Elem>(t: &Tensor, storage: &'a Storage) -> Result<View<'a, T>> {
    let data = match storage {
        Storage::Cpu(cpu) => T::of(cpu),
        _ => None,
    };
    let Some(data) = data else {
        return Err(ModelError::InvalidBatch(format!("decode attention needs {:?} CPU tensors", T::DTYPE)));
    };
    let layout = t.layout();
    match layout.stride() {
        [s0, s1, 1] => Ok(View { data, start: layout.start_offset(), stride0: *s0, stride1: *s1 }),
        other => Err(ModelError::InvalidBatch(format!("decode attention needs a contiguous last dimension, got strides {other:?}"))),
    }
}

/// Attention outputs `[rows.len(), heads * head_dim]`, in the queries' dtype, for decode rows
/// of `heads` query heads over their caches (grouped-query: `heads / kv_heads` query heads per
/// KV head).
pub(crate) fn decode_attention(rows: &[DecodeRow]) -> Result<Tensor> {
    let Some(first) = rows.first() else {
        return Err(ModelError::InvalidBatch("decode attention over no rows".into()));
    };
    match first.q.dtype() {
        DType::F32 => decode_attention_as::<f32>(rows),
        DType::BF16 => decode_attention_as::<bf16>(rows),
        DType::F16 => decode_attention_as::<f16>(rows),
        other => Err(ModelError::InvalidBatch(format!("decode attention does not take {other:?}"))),
    }
}

fn decode_attention_as<T: Elem>(rows: &[DecodeRow]) -> Result<Tensor> {
    let first = &rows[0];
    let (_, heads, head_dim) = first.q.dims3()?;
    let kv_heads = first.keys.dim(0)?;
    let group = heads / kv_heads.max(1);
    let scale = 1.0 / (head_dim as f32).sqrt();
    // Read guards live here, on the calling thread, while the tasks read the slices.
    let guards: Vec<_> = rows
        .iter()
        .map(|r| (r.q.storage_and_layout().0, r.keys.storage_and_layout().0, r.values.storage_and_layout().0))
        .collect();
    let mut views = Vec::with_capacity(rows.len());
    for (r, (q, k, v)) in rows.iter().zip(&guards) {
        if r.q.dims3()? != (1, heads, head_dim) || r.keys.dim(0)? != kv_heads || r.keys.dims() != r.values.dims() {
            return Err(ModelError::InvalidBatch("decode rows of different shapes in one step".into()));
        }
        views.push((view::<T>(&r.q, q)?, view::<T>(&r.keys, k)?, view::<T>(&r.values, v)?, r.keys.dim(1)?));
    }
    let dot = T::dot_kernel();
    let mut out = vec![T::from_f32(0.0); rows.len() * heads * head_dim];
    // One (sequence, head) pair per task; `init` gives each worker its f32 scratch once.
    let init = || Scratch { q: vec![0.0; head_dim], scores: Vec::new(), out: vec![0.0; head_dim] };
    out.par_chunks_mut(head_dim).enumerate().for_each_init(init, |scratch, (task, o)| {
        let (row, h) = (task / heads, task % heads);
        let (q, k, v, len) = &views[row];
        let kvh = h / group;
        for (s, x) in scratch.q.iter_mut().zip(q.row(h, head_dim)) {
            *s = x.to_f32() * scale;
        }
        scratch.attend(k.head(kvh), v.head(kvh), *len, dot);
        for (o, x) in o.iter_mut().zip(&scratch.out) {
            *o = T::from_f32(*x);
        }
    });
    Ok(T::tensor(out, &[rows.len(), heads * head_dim])?)
}

/// A task's f32 working rows: the scaled query head, the scores, the output.
struct Scratch {
    q: Vec<f32>,
    scores: Vec<f32>,
    out: Vec<f32>,
}

impl Scratch {
    /// `out = softmax(K q) V` for the query head in `q` (already scaled by 1/√d) over the first
    /// `len` keys of one KV head (`k`, `v` already at that head). All scores first, then one
    /// vectorised exponential over them, then the weighted sum of value rows: every key and
    /// value row is read once, straight from the cache in its own type.
    fn attend<T: Elem>(&mut self, k: View<T>, v: View<T>, len: usize, dot: fn(&[T], &[f32]) -> f32) {
        let Scratch { q, scores, out } = self;
        let d = q.len();
        scores.clear();
        scores.extend((0..len).map(|t| dot(k.row(t, d), q)));
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        for s in scores.iter_mut() {
            *s -= max;
        }
        exp_in_place(scores);
        let sum: f32 = scores.iter().sum();
        out.fill(0.0);
        for (t, &w) in scores.iter().enumerate() {
            for (o, x) in out.iter_mut().zip(v.row(t, d)) {
                *o += w * x.to_f32();
            }
        }
        if sum > 0.0 {
            let inv = 1.0 / sum;
            for o in out.iter_mut() {
                *o *= inv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::attention::{attend, ChunkMask};

    fn random(shape: (usize, usize, usize), seed: u64) -> Tensor {
        let mut rng = crate::sampler::SeededRng::new(seed);
        let n = shape.0 * shape.1 * shape.2;
        let values: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32 * 4.0 - 2.0).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn equals_tensor_attention_for_every_row_of_a_batch() {
        // 6 query heads over 2 KV heads, head_dim 20 (a tail after the 8-wide chunks); caches
        // with room past their length, viewed the way KvCache hands them out.
        let (heads, kv_heads, d) = (6, 2, 20);
        let lens = [1usize, 2, 17, 64, 129];
        // bf16 and f16 inputs are compared with the f32 tensor path on the same (rounded)
        // values: the pass computes in f32 and rounds its output once.
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 8e-3), (DType::F16, 1e-3)] {
            let rounded = |t: Tensor| t.to_dtype(dtype).unwrap();
            let rows: Vec<DecodeRow> = lens
                .iter()
                .enumerate()
                .map(|(i, &len)| {
                    let capacity = len.next_multiple_of(16) + 16;
                    let keys = rounded(random((kv_heads, capacity, d), 10 + i as u64)).narrow(1, 0, len).unwrap();
                    let values = rounded(random((kv_heads, capacity, d), 20 + i as u64)).narrow(1, 0, len).unwrap();
                    DecodeRow { q: rounded(random((1, heads, d), i as u64)), keys, values }
                })
                .collect();
            assert!(applies(&rows[0].q, &rows[0].keys));
            let fused = decode_attention(&rows).unwrap();
            assert_eq!(fused.dtype(), dtype);
            let fused = fused.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            for (i, r) in rows.iter().enumerate() {
                let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap().contiguous().unwrap();
                let mask = ChunkMask::new(lens[i] - 1, 1, None, &Device::Cpu).unwrap();
                let reference = attend(&f32s(&r.q), &f32s(&r.keys), &f32s(&r.values), &mask).unwrap().to_vec2::<f32>().unwrap();
                for (a, b) in fused[i].iter().zip(&reference[0]) {
                    assert!((a - b).abs() <= tolerance * b.abs().max(1.0), "{dtype:?} row {i} (len {}): {a} vs {b}", lens[i]);
                }
            }
        }
    }
}
