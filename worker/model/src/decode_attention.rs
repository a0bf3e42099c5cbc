//! Attention for decode rows — one query per sequence, every cached key visible — in one
//! parallel pass over all the step's decoding sequences and KV heads.
//!
//! Going through tensor ops costs about fifteen small operations per sequence and layer
//! (transposes, copies, two matmuls, a softmax), each with its own allocation and dispatch; at
//! a batch of 16 short sequences that overhead rivals the weight reads. Here each task takes the
//! query heads that share one KV head of one sequence, reads those keys and values straight
//! from the cache's storage once for all of them (scores, one vectorised exponential, the
//! weighted sums), and a long cache is split between two tasks whose partial sums are merged
//! exactly by their maxima.

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
    // One task per (sequence, KV head, part of the keys): the query heads of a group read each
    // key and value row once between them, and a long cache is split in two so that a batch of
    // one still gives both threads of a small machine equal work.
    let mut tasks = Vec::with_capacity(rows.len() * kv_heads * 2);
    // Per sequence: its first task and how many parts its keys are split into.
    let mut spans = Vec::with_capacity(rows.len());
    for (row, (_, _, _, len)) in views.iter().enumerate() {
        let parts = if *len >= 2 * MIN_KEYS_PER_PART { 2 } else { 1 };
        spans.push((tasks.len(), parts));
        for kv_head in 0..kv_heads {
            for p in 0..parts {
                tasks.push(Task { row, kv_head, keys: p * len / parts..(p + 1) * len / parts });
            }
        }
    }
    let stride = group * (head_dim + 2);
    let mut partials = vec![0f32; tasks.len() * stride];
    let init = || Scratch { q: vec![0.0; group * head_dim], scores: Vec::new() };
    partials.par_chunks_mut(stride).zip(&tasks).for_each_init(init, |scratch, (part, task)| {
        let (q, k, v, _) = &views[task.row];
        let first_head = task.kv_head * group;
        for (j, qs) in scratch.q.chunks_exact_mut(head_dim).enumerate() {
            for (s, x) in qs.iter_mut().zip(q.row(first_head + j, head_dim)) {
                *s = x.to_f32() * scale;
            }
        }
        scratch.attend(k.head(task.kv_head), v.head(task.kv_head), task.keys.clone(), dot, part);
    });

    // Merge each head's parts (at most two) by their maxima: the exact softmax over all keys.
    let mut out = vec![T::from_f32(0.0); rows.len() * heads * head_dim];
    let mut merged = vec![0f32; head_dim];
    for (row, o_row) in out.chunks_exact_mut(heads * head_dim).enumerate() {
        let (first, parts) = spans[row];
        for (h, o) in o_row.chunks_exact_mut(head_dim).enumerate() {
            let (kv_head, j) = (h / group, h % group);
            let tasks_of_head = first + kv_head * parts..first + (kv_head + 1) * parts;
            let head_in = |i: usize| &partials[i * stride + j * (head_dim + 2)..i * stride + (j + 1) * (head_dim + 2)];
            let max = tasks_of_head.clone().map(|i| head_in(i)[head_dim]).fold(f32::NEG_INFINITY, f32::max);
            merged.fill(0.0);
            let mut sum = 0f32;
            for i in tasks_of_head {
                let p = head_in(i);
                let w = (p[head_dim] - max).exp();
                sum += w * p[head_dim + 1];
                for (m, x) in merged.iter_mut().zip(&p[..head_dim]) {
                    *m += w * x;
                }
            }
            let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
            for (o, m) in o.iter_mut().zip(&merged) {
                *o = T::from_f32(m * inv);
            }
        }
    }
    Ok(T::tensor(out, &[rows.len(), heads * head_dim])?)
}

/// Keys below which a sequence's cache is not split between two tasks.
const MIN_KEYS_PER_PART: usize = 64;

/// One task of a decode step: the query heads of one KV head of one sequence, over some keys.
struct Task {
    row: usize,
    kv_head: usize,
    keys: std::ops::Range<usize>,
}

/// A task's f32 working rows: its query heads (scaled), and their scores.
struct Scratch {
    q: Vec<f32>,
    scores: Vec<f32>,
}

impl Scratch {
    /// For each query head `j` of the group in `q` (already scaled by 1/√d), over `keys` of one
    /// KV head (`k`, `v` already at that head): writes `Σ e^(s − max) v`, then `max`, then
    /// `Σ e^(s − max)` into `part[j * (d + 2)..]`. All scores first, one vectorised exponential,
    /// then the weighted sums: every key and value row is read once for the whole group,
    /// straight from the cache in its own type.
    fn attend<T: Elem>(&mut self, k: View<T>, v: View<T>, keys: std::ops::Range<usize>, dot: fn(&[T], &[f32]) -> f32, part: &mut [f32]) {
        let Scratch { q, scores } = self;
        // `part` holds d + 2 values per head and `q` holds d.
        let group = (part.len() - q.len()) / 2;
        let (n, d) = (keys.len(), q.len() / group);
        scores.clear();
        scores.resize(group * n, 0.0);
        for (i, t) in keys.clone().enumerate() {
            let kr = k.row(t, d);
            for (j, qj) in q.chunks_exact(d).enumerate() {
                scores[j * n + i] = dot(kr, qj);
            }
        }
        part.fill(0.0);
        for (j, s) in scores.chunks_exact_mut(n).enumerate() {
            let max = s.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            for x in s.iter_mut() {
                *x -= max;
            }
            exp_in_place(s);
            let out = &mut part[j * (d + 2)..(j + 1) * (d + 2)];
            out[d] = max;
            out[d + 1] = s.iter().sum();
        }
        for (i, t) in keys.enumerate() {
            let vr = v.row(t, d);
            for j in 0..group {
                let w = scores[j * n + i];
                for (o, x) in part[j * (d + 2)..j * (d + 2) + d].iter_mut().zip(vr) {
                    *o += w * x.to_f32();
                }
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
