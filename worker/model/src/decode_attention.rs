//! Attention for decode rows — one query per sequence, every cached key visible — in one
//! parallel pass over all the step's decoding sequences and heads.
//!
//! Going through tensor ops costs about fifteen small operations per sequence and layer
//! (transposes, copies, two matmuls, a softmax), each with its own allocation and dispatch; at
//! a batch of 16 short sequences that overhead rivals the weight reads. Here each (sequence,
//! head) pair is one task that reads its keys and values straight from the cache's storage
//! once, with an online softmax (a running maximum and rescaled sums), and writes its output
//! row in place. Queries that share a KV head read the same rows, which stay in cache.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};

/// One decoding sequence of a step: its query row (`[1, heads, head_dim]`) and views of its
/// cached keys and values (`[kv_heads, len, head_dim]`, as `KvCache::write` returns them).
pub(crate) struct DecodeRow {
    pub q: Tensor,
    pub keys: Tensor,
    pub values: Tensor,
}

/// Whether [`decode_attention`] handles these tensors: f32 on the CPU.
pub(crate) fn applies(q: &Tensor, keys: &Tensor) -> bool {
    q.dtype() == DType::F32 && keys.dtype() == DType::F32 && q.device().is_cpu()
}

/// Where one tensor's f32 elements live: its storage and the element offset and strides of
/// a `[a, b, c]` view whose last dimension is contiguous.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    start: usize,
    stride0: usize,
    stride1: usize,
}

impl View<'_> {
    /// The rows of index `i` along the first dimension (one KV head).
    fn head(self, i: usize) -> Self {
        Self { start: self.start + i * self.stride0, ..self }
    }
}

fn view<'a>(t: &Tensor, storage: &'a Storage) -> Result<View<'a>> {
    let Storage::Cpu(CpuStorage::F32(data)) = storage else {
        return Err(ModelError::InvalidBatch("decode attention needs f32 CPU tensors".into()));
    };
    let layout = t.layout();
    match layout.stride() {
        [s0, s1, 1] => Ok(View { data, start: layout.start_offset(), stride0: *s0, stride1: *s1 }),
        other => Err(ModelError::InvalidBatch(format!("decode attention needs a contiguous last dimension, got strides {other:?}"))),
    }
}

/// Attention outputs `[rows.len(), heads * head_dim]` for decode rows of `heads` query heads
/// over their caches (grouped-query: `heads / kv_heads` query heads per KV head).
pub(crate) fn decode_attention(rows: &[DecodeRow]) -> Result<Tensor> {
    let Some(first) = rows.first() else {
        return Err(ModelError::InvalidBatch("decode attention over no rows".into()));
    };
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
        if r.q.dims3()? != (1, heads, head_dim) || r.keys.dims3()?.0 != kv_heads || r.keys.dims() != r.values.dims() {
            return Err(ModelError::InvalidBatch("decode rows of different shapes in one step".into()));
        }
        views.push((view(&r.q, q)?, view(&r.keys, k)?, view(&r.values, v)?, r.keys.dim(1)?));
    }
    let dot = crate::matvec::f32_kernel();
    let mut out = vec![0f32; rows.len() * heads * head_dim];
    out.par_chunks_mut(head_dim).enumerate().for_each(|(task, o)| {
        let (row, h) = (task / heads, task % heads);
        let (q, k, v, len) = &views[row];
        let kvh = h / group;
        let q_start = q.start + h * q.stride1;
        let qh = &q.data[q_start..q_start + head_dim];
        attend_one(qh, k.head(kvh), v.head(kvh), *len, scale, dot, o);
    });
    Ok(Tensor::from_vec(out, (rows.len(), heads * head_dim), first.q.device())?)
}

/// `o = softmax(scale · K qᵀ) V` for one query head over the first `len` keys of one KV head
/// (`k`, `v` already at that head), with an online softmax: when a larger score arrives, what
/// was summed so far is rescaled.
fn attend_one(q: &[f32], k: View, v: View, len: usize, scale: f32, dot: fn(&[f32], &[f32]) -> f32, o: &mut [f32]) {
    let d = q.len();
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    o.fill(0.0);
    for t in 0..len {
        let ks = k.start + t * k.stride1;
        let s = dot(q, &k.data[ks..ks + d]) * scale;
        let vs = v.start + t * v.stride1;
        let vt = &v.data[vs..vs + d];
        if s > max {
            let shrink = (max - s).exp();
            sum *= shrink;
            for x in o.iter_mut() {
                *x *= shrink;
            }
            max = s;
        }
        let w = (s - max).exp();
        sum += w;
        for (x, &y) in o.iter_mut().zip(vt) {
            *x += w * y;
        }
    }
    if sum > 0.0 {
        let inv = 1.0 / sum;
        for x in o.iter_mut() {
            *x *= inv;
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
        let rows: Vec<DecodeRow> = lens
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let capacity = len.next_multiple_of(16) + 16;
                let keys = random((kv_heads, capacity, d), 10 + i as u64).narrow(1, 0, len).unwrap();
                let values = random((kv_heads, capacity, d), 20 + i as u64).narrow(1, 0, len).unwrap();
                DecodeRow { q: random((1, heads, d), i as u64), keys, values }
            })
            .collect();
        assert!(applies(&rows[0].q, &rows[0].keys));
        let fused = decode_attention(&rows).unwrap().to_vec2::<f32>().unwrap();
        for (i, r) in rows.iter().enumerate() {
            let reference = attend(&r.q, &r.keys.contiguous().unwrap(), &r.values.contiguous().unwrap(), &ChunkMask::new(lens[i] - 1, 1, None, &Device::Cpu).unwrap())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (a, b) in fused[i].iter().zip(&reference[0]) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "row {i} (len {}): {a} vs {b}", lens[i]);
            }
        }
    }
}
