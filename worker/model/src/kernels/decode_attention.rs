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

use std::cell::RefCell;

use candle_core::{DType, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::kernels::elem::{output, Buffers, Dest, Elem};
use crate::kernels::exp::exp_in_place;
use crate::kernels::pool::with_reused;
use crate::model::kv_cache::KV_BLOCK_TOKENS;
use crate::model::kv_pool::place;

/// One decoding sequence of a step: which row of the step's queries is its own, its cached
/// keys and values, and which of their positions, `visible`, are attended to: all of them up to
/// the sequence's length, or the last `window` under a sliding window.
pub(crate) struct DecodeRow<'a> {
    pub q_row: usize,
    pub kv: Cached<'a>,
    pub visible: std::ops::Range<usize>,
}

/// Where a decoding sequence's keys and values are.
#[derive(Clone, Copy)]
pub(crate) enum Cached<'a> {
    /// `[kv_heads, capacity, head_dim]` tensors, or views of them: what the paged path is
    /// checked against.
    #[cfg(test)]
    Dense { keys: &'a Tensor, values: &'a Tensor },
    /// Blocks of a KV pool (`kv_pool.rs`), through the sequence's block table.
    Paged(Paged<'a>),
}

/// One layer of a KV pool and one sequence's block table: position `t` is row `t % 16` of
/// block `table[t / 16]`, whose KV head `h` holds 16 rows of `head_dim` elements from element
/// `h * 16 * head_dim`.
#[derive(Clone, Copy)]
pub(crate) struct Paged<'a> {
    pub keys: &'a Buffers,
    pub values: &'a Buffers,
    pub table: &'a [u32],
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Cached<'_> {
    /// KV heads, positions there is room for, head size.
    fn dims(&self) -> Result<(usize, usize, usize)> {
        match self {
            #[cfg(test)]
            Cached::Dense { keys, values } => {
                if keys.dims() != values.dims() {
                    return Err(ModelError::InvalidBatch("keys and values of different shapes".into()));
                }
                Ok(keys.dims3()?)
            }
            Cached::Paged(p) => Ok((p.kv_heads, p.table.len() * KV_BLOCK_TOKENS, p.head_dim)),
        }
    }

    /// Whether keys and values are of type `T`.
    fn is<T: Elem>(&self) -> bool {
        match self {
            #[cfg(test)]
            Cached::Dense { keys, values } => keys.dtype() == T::DTYPE && values.dtype() == T::DTYPE,
            Cached::Paged(p) => T::of_buffers(p.keys).is_some() && T::of_buffers(p.values).is_some(),
        }
    }
}

/// The decoding rows of a step, by index (`0..rows`): looked up rather than collected, so that
/// a step builds no list of them.
pub(crate) type Rows<'r, 'a> = &'r (dyn Fn(usize) -> Result<DecodeRow<'a>> + Sync);

/// Whether [`decode_attention`] handles queries `q` over a cache of `cache` type: f32, bf16 or
/// f16 on the CPU, queries and cache of one type.
pub(crate) fn applies(q: &Tensor, cache: DType) -> bool {
    matches!(q.dtype(), DType::F32 | DType::BF16 | DType::F16) && cache == q.dtype() && q.device().is_cpu()
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
    /// The rows of index `i` along the first dimension (one KV head; for queries, one token).
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

/// Attention outputs `[rows, heads * head_dim]`, in the queries' dtype, for `rows` decoding
/// sequences whose query rows are in `q` (`[tokens, heads, head_dim]`), over their caches
/// (grouped-query: `heads / kv_heads` query heads per KV head). Written into `dest` where given.
pub(crate) fn decode_attention(q: &Tensor, rows: usize, row: Rows, dest: Option<&Dest>) -> Result<Tensor> {
    if rows == 0 {
        return Err(ModelError::InvalidBatch("decode attention over no rows".into()));
    }
    match q.dtype() {
        DType::F32 => decode_attention_as::<f32>(q, rows, row, dest),
        DType::BF16 => decode_attention_as::<bf16>(q, rows, row, dest),
        DType::F16 => decode_attention_as::<f16>(q, rows, row, dest),
        other => Err(ModelError::InvalidBatch(format!("decode attention does not take {other:?}"))),
    }
}

/// A step's bookkeeping, kept by the calling thread between steps (see `workspace.rs`).
#[derive(Default)]
struct StepBuffers {
    tasks: Vec<Task>,
    /// Per sequence: its first task and how many parts its keys are split into.
    spans: Vec<(usize, usize)>,
    partials: Vec<f32>,
    merged: Vec<f32>,
}

thread_local! {
    static STEP: RefCell<StepBuffers> = RefCell::new(StepBuffers::default());
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

fn decode_attention_as<T: Elem>(q: &Tensor, rows: usize, row: Rows, dest: Option<&Dest>) -> Result<Tensor> {
    let (tokens, heads, head_dim) = q.dims3()?;
    let kv_heads = row(0)?.kv.dims()?.0;
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(ModelError::InvalidBatch(format!("{heads} query heads cannot share {kv_heads} KV heads")));
    }
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    for i in 0..rows {
        let r = row(i)?;
        let (k_heads, capacity, k_dim) = r.kv.dims()?;
        if r.q_row >= tokens || (k_heads, k_dim) != (kv_heads, head_dim) || r.visible.end > capacity {
            return Err(ModelError::InvalidBatch("decode rows of different shapes in one step".into()));
        }
        if !r.kv.is::<T>() {
            return Err(ModelError::InvalidBatch(format!("decode attention needs {:?} caches", T::DTYPE)));
        }
    }
    let q_store = q.storage_and_layout().0;
    let q_view = view::<T>(q, &q_store)?;
    let dot = T::dot_kernel();
    with_reused(&STEP, |step| {
        let StepBuffers { tasks, spans, partials, merged } = step;
        // One task per (sequence, KV head, part of the keys): the query heads of a group read
        // each key and value row once between them, and a long cache is split in two so that a
        // batch of one still gives both threads of a small machine equal work.
        tasks.clear();
        spans.clear();
        for r in 0..rows {
            let visible = row(r)?.visible;
            let (first, len) = (visible.start, visible.len());
            let parts = if len >= 2 * MIN_KEYS_PER_PART { 2 } else { 1 };
            spans.push((tasks.len(), parts));
            for kv_head in 0..kv_heads {
                for p in 0..parts {
                    tasks.push(Task { row: r, kv_head, keys: first + p * len / parts..first + (p + 1) * len / parts });
                }
            }
        }
        let stride = group * (head_dim + 2);
        partials.clear();
        partials.resize(tasks.len() * stride, 0.0);
        partials.par_chunks_mut(stride).zip(&*tasks).try_for_each(|(part, task)| -> Result<()> {
            let r = row(task.row)?;
            let q = q_view.head(r.q_row);
            let first_head = task.kv_head * group;
            with_reused(&SCRATCH, |scratch| -> Result<()> {
                scratch.q.resize(group * head_dim, 0.0);
                for (j, qs) in scratch.q.chunks_exact_mut(head_dim).enumerate() {
                    for (s, x) in qs.iter_mut().zip(q.row(first_head + j, head_dim)) {
                        *s = x.to_f32() * scale;
                    }
                }
                match r.kv {
                    #[cfg(test)]
                    Cached::Dense { keys, values } => {
                        let (k_store, v_store) = (keys.storage_and_layout().0, values.storage_and_layout().0);
                        let (k, v) = (view::<T>(keys, &k_store)?, view::<T>(values, &v_store)?);
                        let (k, v) =
                            (DenseRows { view: k.head(task.kv_head), d: head_dim }, DenseRows { view: v.head(task.kv_head), d: head_dim });
                        scratch.attend(Work { k, v, keys: task.keys.clone(), dot, part });
                    }
                    Cached::Paged(p) => {
                        let (Some(k), Some(v)) = (T::of_buffers(p.keys), T::of_buffers(p.values)) else {
                            return Err(ModelError::InvalidBatch(format!("decode attention needs {:?} caches", T::DTYPE)));
                        };
                        let rows = |buffers| PagedRows { buffers, table: p.table, head: task.kv_head, kv_heads: p.kv_heads, d: head_dim };
                        scratch.attend(Work { k: rows(k), v: rows(v), keys: task.keys.clone(), dot, part });
                    }
                }
                Ok(())
            })
        })?;

        // Merge each head's parts (at most two) by their maxima: the exact softmax over all keys.
        merged.resize(head_dim, 0.0);
        Ok(output::<T>(dest, &[rows, heads * head_dim], |out| {
            for (r, o_row) in out.chunks_exact_mut(heads * head_dim).enumerate() {
                let (first, parts) = spans[r];
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
                    for (o, m) in o.iter_mut().zip(merged.iter()) {
                        *o = T::from_f32(m * inv);
                    }
                }
            }
        })?)
    })
}

/// Keys below which a sequence's cache is not split between two tasks.
const MIN_KEYS_PER_PART: usize = 64;

/// One task of a decode step: the query heads of one KV head of one sequence, over some keys.
struct Task {
    row: usize,
    kv_head: usize,
    keys: std::ops::Range<usize>,
}

/// The key (or value) rows of one KV head of one sequence, by position.
trait KeyRows<T> {
    /// Position `t`'s `head_dim` elements.
    fn row(&self, t: usize) -> &[T];
}

/// Rows of a `[kv_heads, capacity, head_dim]` tensor, at one head.
#[cfg(test)]
struct DenseRows<'a, T> {
    view: View<'a, T>,
    d: usize,
}

#[cfg(test)]
impl<T> KeyRows<T> for DenseRows<'_, T> {
    #[inline(always)]
    fn row(&self, t: usize) -> &[T] {
        self.view.row(t, self.d)
    }
}

/// Rows of one KV head in a pool's blocks, through a block table (see [`Paged`]).
struct PagedRows<'a, T> {
    buffers: &'a [Vec<T>],
    table: &'a [u32],
    head: usize,
    kv_heads: usize,
    d: usize,
}

impl<T> KeyRows<T> for PagedRows<'_, T> {
    #[inline(always)]
    fn row(&self, t: usize) -> &[T] {
        let block_elems = self.kv_heads * KV_BLOCK_TOKENS * self.d;
        let (chunk, at) = place(self.table[t / KV_BLOCK_TOKENS], block_elems);
        let at = at + (self.head * KV_BLOCK_TOKENS + t % KV_BLOCK_TOKENS) * self.d;
        &self.buffers[chunk][at..at + self.d]
    }
}

/// A task's f32 working rows: its query heads (scaled), and their scores.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    scores: Vec<f32>,
}

/// One task's operands for [`Scratch::attend`]: the keys and values of one KV head of one
/// sequence, which of their positions to read, the dot product for their type, and where the
/// task's partial results go.
struct Work<'p, T, K, V> {
    k: K,
    v: V,
    keys: std::ops::Range<usize>,
    dot: fn(&[T], &[f32]) -> f32,
    part: &'p mut [f32],
}

impl Scratch {
    /// For each query head `j` of the group in `q` (already scaled by 1/√d), over `keys` of one
    /// KV head (`k`, `v` already at that head): writes `Σ e^(s − max) v`, then `max`, then
    /// `Σ e^(s − max)` into `part[j * (d + 2)..]`. All scores first, one vectorised exponential,
    /// then the weighted sums: every key and value row is read once for the whole group,
    /// straight from the cache in its own type.
    ///
    /// The loops are compiled once per vector width and picked at run time: built for the
    /// baseline x86-64 target alone, the weighted sums ran four lanes at a time (SSE). The
    /// arithmetic is the same on every path (separate multiplies and adds, never fused), so
    /// the results are the same bits whatever the CPU.
    fn attend<T: Elem, K: KeyRows<T>, V: KeyRows<T>>(&mut self, work: Work<'_, T, K, V>) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked just above).
                return unsafe { self.attend_avx512(work) };
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked just above).
                return unsafe { self.attend_avx2(work) };
            }
        }
        self.attend_body(work)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn attend_avx512<T: Elem, K: KeyRows<T>, V: KeyRows<T>>(&mut self, work: Work<'_, T, K, V>) {
        self.attend_body(work)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn attend_avx2<T: Elem, K: KeyRows<T>, V: KeyRows<T>>(&mut self, work: Work<'_, T, K, V>) {
        self.attend_body(work)
    }

    #[inline(always)]
    fn attend_body<T: Elem, K: KeyRows<T>, V: KeyRows<T>>(&mut self, work: Work<'_, T, K, V>) {
        let Work { k, v, keys, dot, part } = work;
        let Scratch { q, scores } = self;
        // `part` holds d + 2 values per head and `q` holds d.
        let group = (part.len() - q.len()) / 2;
        let (n, d) = (keys.len(), q.len() / group);
        scores.clear();
        scores.resize(group * n, 0.0);
        for (i, t) in keys.clone().enumerate() {
            let kr = k.row(t);
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
            let vr = v.row(t);
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
    use crate::kernels::elem::with_slice;
    use crate::model::attention::{attend, ChunkMask};
    use crate::model::kv_pool::{KvPool, Part};
    use crate::model::workspace::{Scratch, Workspace};

    fn random(shape: (usize, usize, usize), seed: u64) -> Tensor {
        let mut rng = crate::sampling::sampler::SeededRng::new(seed);
        let n = shape.0 * shape.1 * shape.2;
        let values: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32 * 4.0 - 2.0).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn equals_tensor_attention_for_every_row_of_a_batch() {
        // 6 query heads over 2 KV heads, head_dim 20 (a tail after the 8-wide chunks); caches
        // with room past their length, whole (as the decode step reads them) or viewed the way
        // `KvCache::write` hands them out; the queries' rows in another order than the caches'.
        let (heads, kv_heads, d) = (6, 2, 20);
        let lens = [1usize, 2, 17, 64, 129];
        // Sliding windows over some rows: none, one shorter than the cache, one longer.
        let windows = [None, Some(1), Some(5), None, Some(100)];
        // bf16 and f16 inputs are compared with the f32 tensor path on the same (rounded)
        // values: the pass computes in f32 and rounds its output once.
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 8e-3), (DType::F16, 1e-3)] {
            let rounded = |t: Tensor| t.to_dtype(dtype).unwrap();
            let caches: Vec<(Tensor, Tensor)> = lens
                .iter()
                .enumerate()
                .map(|(i, &len)| {
                    let capacity = len.next_multiple_of(16) + 16;
                    let (k, v) =
                        (rounded(random((kv_heads, capacity, d), 10 + i as u64)), rounded(random((kv_heads, capacity, d), 20 + i as u64)));
                    if i % 2 == 0 {
                        (k, v)
                    } else {
                        (k.narrow(1, 0, len).unwrap(), v.narrow(1, 0, len).unwrap())
                    }
                })
                .collect();
            let q = rounded(random((lens.len(), heads, d), 99));
            let q_row = |i: usize| lens.len() - 1 - i;
            let visible = |i: usize| lens[i].saturating_sub(windows[i].unwrap_or(lens[i]))..lens[i];
            let row = |i: usize| {
                Ok(DecodeRow { q_row: q_row(i), kv: Cached::Dense { keys: &caches[i].0, values: &caches[i].1 }, visible: visible(i) })
            };
            assert!(applies(&q, dtype));
            let mut ws = Workspace::new(&Device::Cpu);
            for dest in [None, ws.get(Scratch::Attn, &[lens.len(), heads * d], dtype).unwrap()] {
                let fused = decode_attention(&q, lens.len(), &row, dest.as_ref()).unwrap();
                assert_eq!(fused.dtype(), dtype);
                if let Some(dest) = &dest {
                    assert_eq!(fused.id(), dest.tensor().id(), "written into the given tensor");
                }
                let fused = fused.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
                for (i, &len) in lens.iter().enumerate() {
                    let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap().contiguous().unwrap();
                    let mask = ChunkMask::new(len - 1, 1, windows[i]);
                    let (k, v) = (caches[i].0.narrow(1, 0, len).unwrap(), caches[i].1.narrow(1, 0, len).unwrap());
                    let qi = q.narrow(0, q_row(i), 1).unwrap();
                    let reference = attend(&f32s(&qi), &f32s(&k), &f32s(&v), &mask).unwrap().to_vec2::<f32>().unwrap();
                    for (a, b) in fused[i].iter().zip(&reference[0]) {
                        assert!((a - b).abs() <= tolerance * b.abs().max(1.0), "{dtype:?} row {i} (len {len}): {a} vs {b}");
                    }
                }
            }
        }
    }

    /// The caches of one layer in a pool's blocks: after 60 blocks of another sequence (so the
    /// tables cross from the pool's first buffer into its second), each sequence's blocks taken
    /// in turns with the others', so no table is a run of consecutive blocks.
    fn paged_pool(caches: &[(Tensor, Tensor)], lens: &[usize], dtype: DType) -> (KvPool, Vec<Vec<u32>>) {
        let (kv_heads, _, d) = caches[0].0.dims3().unwrap();
        let mut pool = KvPool::new(1, kv_heads, d, dtype, None);
        for _ in 0..60 {
            pool.allocate().unwrap();
        }
        let mut tables: Vec<Vec<u32>> = vec![Vec::new(); lens.len()];
        let most = lens.iter().map(|&l| l.div_ceil(KV_BLOCK_TOKENS)).max().unwrap();
        for b in 0..most {
            for (i, &len) in lens.iter().enumerate() {
                if b < len.div_ceil(KV_BLOCK_TOKENS) {
                    tables[i].push(pool.allocate().unwrap());
                }
            }
        }
        fn fill<T: Elem>(pool: &mut KvPool, part: Part, table: &[u32], cache: &Tensor, len: usize) {
            let (heads, _, d) = cache.dims3().unwrap();
            let cache = cache.narrow(1, 0, len).unwrap().contiguous().unwrap();
            with_slice::<T, _>(&cache, |src| {
                for t in 0..len {
                    let block = pool.block_mut::<T>(0, part, table[t / KV_BLOCK_TOKENS]).unwrap();
                    for h in 0..heads {
                        let at = (h * KV_BLOCK_TOKENS + t % KV_BLOCK_TOKENS) * d;
                        block[at..at + d].copy_from_slice(&src[(h * len + t) * d..(h * len + t + 1) * d]);
                    }
                }
            })
            .unwrap();
        }
        for (i, &len) in lens.iter().enumerate() {
            for (part, t) in [(Part::Keys, &caches[i].0), (Part::Values, &caches[i].1)] {
                match dtype {
                    DType::F32 => fill::<f32>(&mut pool, part, &tables[i], t, len),
                    DType::BF16 => fill::<bf16>(&mut pool, part, &tables[i], t, len),
                    _ => fill::<f16>(&mut pool, part, &tables[i], t, len),
                }
            }
        }
        (pool, tables)
    }

    /// Reading keys and values through block tables, scattered over two of the pool's buffers,
    /// gives the same bits as reading them from one tensor per sequence, in every type, with
    /// and without sliding windows.
    #[test]
    fn paged_rows_equal_dense_rows_bit_for_bit() {
        let (heads, kv_heads, d) = (6, 2, 20);
        let lens = [1usize, 2, 17, 64, 129, 16];
        let windows = [None, Some(1), Some(5), None, Some(100), Some(16)];
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let caches: Vec<(Tensor, Tensor)> = lens
                .iter()
                .enumerate()
                .map(|(i, &len)| {
                    let r = |seed| random((kv_heads, len, d), seed).to_dtype(dtype).unwrap();
                    (r(30 + i as u64), r(40 + i as u64))
                })
                .collect();
            let q = random((lens.len(), heads, d), 7).to_dtype(dtype).unwrap();
            let visible = |i: usize| lens[i].saturating_sub(windows[i].unwrap_or(lens[i]))..lens[i];
            let (pool, tables) = paged_pool(&caches, &lens, dtype);
            let dense =
                |i: usize| Ok(DecodeRow { q_row: i, kv: Cached::Dense { keys: &caches[i].0, values: &caches[i].1 }, visible: visible(i) });
            let paged = |i: usize| {
                let (keys, values) = (pool.buffers(0, Part::Keys), pool.buffers(0, Part::Values));
                let p = Paged { keys, values, table: &tables[i], kv_heads, head_dim: d };
                Ok(DecodeRow { q_row: i, kv: Cached::Paged(p), visible: visible(i) })
            };
            let a = decode_attention(&q, lens.len(), &dense, None).unwrap().to_dtype(DType::F32).unwrap();
            let b = decode_attention(&q, lens.len(), &paged, None).unwrap().to_dtype(DType::F32).unwrap();
            assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap(), "{dtype:?}");
        }
    }
}
