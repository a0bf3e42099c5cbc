//! Causal attention of one chunk of a sequence against that sequence's cached keys and values,
//! and attention over part of the keys as an (output, log-sum-exp) pair with its exact merge.
//!
//! Grouped-query attention without copying KV heads: the query heads that share a KV head are
//! stacked into one matrix, so each KV head is read once per chunk.
//!
//! Sequence parallelism sees a sequence's keys in pieces (a ring member's block, one member's
//! share of the cache). [`attend_partial`] normalises over one piece and also returns the log of
//! that piece's softmax denominator; [`Partial::merge`] and [`merge_stacked`] combine pieces into
//! exactly the attention over all of them. A piece with no visible key has lse = −∞ and weight
//! 0; the arithmetic is arranged so that case gives 0, never NaN.

use candle_core::{DType, Device, Tensor, D};

use crate::error::{ModelError, Result};
use crate::kernels::blocked_attention::blocked_attention;
pub(crate) use crate::kernels::blocked_attention::Causal;
use crate::kernels::decode_attention::{self, Cached, DecodeRow};
use crate::kernels::elem::Dest;
use crate::model::kv_cache::KvCache;
use crate::model::layer::{AttentionStep, LayerSlot};
use crate::model::linear::{Numerics, StepRows};
use crate::Batch;

/// Which keys the queries of one chunk see: causally, the queries at positions
/// `start..start + len` see keys `0..=` their own position, the last `window` of them when set;
/// [`ChunkMask::default`] lets every query see every key. Nothing is stored per key: the CPU
/// path masks from positions (`kernels/blocked_attention.rs`), other devices build the additive
/// mask when they need it.
#[derive(Default, Clone, Copy)]
pub struct ChunkMask {
    causal: Option<CausalChunk>,
}

#[derive(Clone, Copy)]
struct CausalChunk {
    start: usize,
    len: usize,
    window: Option<usize>,
}

impl ChunkMask {
    /// Mask for `len` queries at positions `start..start + len` attending to keys `0..start + len`,
    /// limited to the last `window` positions (inclusive of the query's own) when set.
    pub fn new(start: usize, len: usize, window: Option<usize>) -> Self {
        Self { causal: Some(CausalChunk { start, len, window }) }
    }

    /// The first key of `kv_len` a single query sees (0 for a chunk of several, whose mask
    /// covers the rest).
    fn first_key(&self, kv_len: usize) -> usize {
        match self.causal {
            Some(c) if c.len == 1 => {
                let total = c.start + 1;
                total.saturating_sub(c.window.unwrap_or(total)).min(kv_len)
            }
            _ => 0,
        }
    }

    /// The sliding window, if any.
    fn window(&self) -> Option<usize> {
        self.causal.and_then(|c| c.window)
    }

    /// The additive mask `[len, kv_len]` (0 or −∞) for `len` queries that are the last of
    /// `kv_len` positions; `None` when every query sees every key.
    pub(crate) fn tensor(&self, len: usize, kv_len: usize, device: &Device) -> Result<Option<Tensor>> {
        let Some(c) = self.causal else { return Ok(None) };
        let start = kv_len - len;
        let mut mask = Vec::with_capacity(len * kv_len);
        for i in 0..len {
            let q_pos = start + i;
            for k_pos in 0..kv_len {
                let visible = k_pos <= q_pos && c.window.is_none_or(|w| q_pos - k_pos < w);
                mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
            }
        }
        Ok(Some(Tensor::from_vec(mask, (len, kv_len), device)?))
    }
}

/// Query rows per block of a long chunk on devices other than the CPU. Each block attends only
/// to the keys up to its own last position, so a long prompt skips most of the masked half of
/// the score matrix.
const QUERY_BLOCK: usize = 128;

/// `q`: `[len, heads, head_dim]` (already rotated); `keys`, `values`: `[kv_heads, kv_len, head_dim]`
/// where the chunk's own keys are the last `len`. Returns `[len, heads * head_dim]`.
pub fn attend(q: &Tensor, keys: &Tensor, values: &Tensor, mask: &ChunkMask) -> Result<Tensor> {
    let (len, heads, head_dim) = q.dims3()?;
    let kv_len = keys.dim(1)?;
    if len == 1 {
        // One query sees a run of keys: the product needs no mask.
        let first = mask.first_key(kv_len);
        let seen = |t: &Tensor| t.narrow(1, first, kv_len - first);
        return attend_block(q, &seen(keys)?, &seen(values)?, None);
    }
    let dtype = q.dtype();
    if q.device().is_cpu() {
        // Half-precision operands are widened once (candle's CPU half GEMM is several times
        // slower than f32, and these are small next to the weights), then attended in blocks.
        let positions: Vec<usize> = (0..kv_len).collect();
        // Without a causal mask the queries sit after every key, so they see them all.
        let first_query = if mask.causal.is_some() { kv_len - len } else { kv_len };
        let causal = Causal { first_query, key_positions: &positions, window: mask.window() };
        if let Some(done) = blocked_attention(&wide(q)?, &wide(keys)?, &wide(values)?, &causal)? {
            return Ok(Tensor::from_vec(done.out, (len, heads * head_dim), q.device())?.to_dtype(dtype)?);
        }
    }
    attend_blocks(q, keys, values, mask.tensor(len, kv_len, q.device())?.as_ref())
}

/// `t` as a contiguous f32 tensor, what the blocked kernel reads (a no-op for one already).
fn wide(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.contiguous()?)
}

/// [`attend`] in query blocks, with the chunk's full additive mask.
fn attend_blocks(q: &Tensor, keys: &Tensor, values: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (len, kv_len) = (q.dim(0)?, keys.dim(1)?);
    let Some(m) = mask.filter(|_| len > QUERY_BLOCK) else {
        return attend_block(q, keys, values, mask);
    };
    let start = kv_len - len;
    let mut blocks = Vec::with_capacity(len.div_ceil(QUERY_BLOCK));
    for first in (0..len).step_by(QUERY_BLOCK) {
        let rows = (len - first).min(QUERY_BLOCK);
        // The mask is causal: no row of this block sees a key past its last row's position.
        let visible = start + first + rows;
        blocks.push(attend_block(
            &q.narrow(0, first, rows)?,
            &keys.narrow(1, 0, visible)?,
            &values.narrow(1, 0, visible)?,
            Some(&m.narrow(0, first, rows)?.narrow(1, 0, visible)?),
        )?);
    }
    Ok(Tensor::cat(&blocks, 0)?)
}

/// [`attend`] over every key given, in one product.
fn attend_block(q: &Tensor, keys: &Tensor, values: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (len, heads, head_dim) = q.dims3()?;
    let (kv_heads, kv_len, _) = keys.dims3()?;
    let group = heads / kv_heads;
    let dtype = q.dtype();

    // [len, heads, d] → [heads, len, d] → [kv_heads, group * len, d]: heads sharing a KV head
    // are adjacent, so this is a pure reshape.
    let q = (q.transpose(0, 1)?.contiguous()? * (1.0 / (head_dim as f64).sqrt()))?.reshape((kv_heads, group * len, head_dim))?;
    let scores = q.matmul(&keys.t()?)?.to_dtype(DType::F32)?;
    let probs = match crate::kernels::fused::masked_softmax(&scores, mask, dtype)? {
        Some(probs) => probs,
        None => {
            let scores = match mask {
                Some(m) => scores.reshape((kv_heads, group, len, kv_len))?.broadcast_add(m)?.reshape((kv_heads, group * len, kv_len))?,
                None => scores,
            };
            candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?
        }
    };
    let out = probs.matmul(values)?; // [kv_heads, group * len, d]
    Ok(out.reshape((heads, len, head_dim))?.transpose(0, 1)?.reshape((len, heads * head_dim))?)
}

/// Attention of some query rows over part of the keys, in f32.
#[derive(Debug, Clone)]
pub struct Partial {
    /// `[heads, rows, head_dim]`: the output normalised over this part's keys only.
    pub o: Tensor,
    /// `[heads, rows, 1]`: log of this part's softmax denominator; −∞ where no key was visible.
    pub lse: Tensor,
}

impl Partial {
    /// The attention over no keys: weight 0 in any merge.
    pub fn empty(heads: usize, rows: usize, head_dim: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            o: Tensor::zeros((heads, rows, head_dim), DType::F32, device)?,
            lse: Tensor::full(f32::NEG_INFINITY, (heads, rows, 1), device)?,
        })
    }

    /// The attention over the keys of both parts (which must be disjoint):
    /// `lse = M + ln(e^(a − M) + e^(b − M))`, `o = e^(a − lse)·o_a + e^(b − lse)·o_b`.
    pub fn merge(&self, other: &Partial) -> Result<Partial> {
        let m = finite_max(&self.lse.maximum(&other.lse)?)?;
        let wa = self.lse.broadcast_sub(&m)?.exp()?;
        let wb = other.lse.broadcast_sub(&m)?.exp()?;
        let sum = (&wa + &wb)?;
        let o = (self.o.broadcast_mul(&wa)? + other.o.broadcast_mul(&wb)?)?;
        Ok(Partial { o: o.broadcast_div(&nonzero(&sum)?)?, lse: (m + sum.log()?)? })
    }

    /// `[rows, heads * head_dim]` in `dtype`, the layout a layer's output projection takes.
    pub fn into_output(self, dtype: DType) -> Result<Tensor> {
        let (heads, rows, head_dim) = self.o.dims3()?;
        Ok(self.o.to_dtype(dtype)?.transpose(0, 1)?.reshape((rows, heads * head_dim))?)
    }
}

/// Merges parts stacked along dimension 0 (`o`: `[parts, heads, rows, d]`, `lse`:
/// `[parts, heads, rows, 1]`) into one, summing in part order: every caller holding the same
/// stacked parts gets the same bits.
pub fn merge_stacked(o: &Tensor, lse: &Tensor) -> Result<Partial> {
    let m = finite_max(&lse.max_keepdim(0)?)?;
    let w = lse.broadcast_sub(&m)?.exp()?;
    let sum = w.sum_keepdim(0)?;
    let o = o.broadcast_mul(&w)?.sum_keepdim(0)?.broadcast_div(&nonzero(&sum)?)?;
    Ok(Partial { o: o.squeeze(0)?, lse: (m + sum.log()?)?.squeeze(0)? })
}

/// The running maximum with −∞ (nothing visible anywhere) replaced by a finite number, so that
/// `lse − max` is −∞ rather than NaN and its exponential is a clean 0.
fn finite_max(max: &Tensor) -> Result<Tensor> {
    Ok(max.maximum(f32::MIN)?)
}

/// A softmax denominator safe to divide by. Whenever any key is visible the largest term is
/// `e^0 = 1`, so the sum is at least 1 and this changes nothing; when none is, every numerator
/// is 0 and dividing by 1 keeps the output at 0.
fn nonzero(sum: &Tensor) -> Result<Tensor> {
    Ok(sum.maximum(1f32)?)
}

/// Attention of `q` (`[rows, heads, head_dim]`, rotated) over `keys`, `values`
/// (`[kv_heads, kv_len, head_dim]`), with an optional additive `mask` `[rows, kv_len]`, as a
/// [`Partial`]. Rows that see no key, and empty inputs, come out as [`Partial::empty`].
pub fn attend_partial(q: &Tensor, keys: &Tensor, values: &Tensor, mask: Option<&Tensor>) -> Result<Partial> {
    let (len, heads, head_dim) = q.dims3()?;
    let (kv_heads, kv_len, _) = keys.dims3()?;
    if len == 0 || kv_len == 0 {
        return Partial::empty(heads, len, head_dim, q.device());
    }
    let group = heads / kv_heads;
    let dtype = q.dtype();
    let q = (q.transpose(0, 1)?.contiguous()? * (1.0 / (head_dim as f64).sqrt()))?.reshape((kv_heads, group * len, head_dim))?;
    let scores = q.matmul(&keys.t()?)?.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(m) => scores.reshape((kv_heads, group, len, kv_len))?.broadcast_add(m)?.reshape((kv_heads, group * len, kv_len))?,
        None => scores,
    };
    // The softmax of `attend`, with its denominator kept: lse = max + ln Σ e^(s − max).
    let max = finite_max(&scores.max_keepdim(D::Minus1)?)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let probs = e.broadcast_div(&nonzero(&sum)?)?.to_dtype(dtype)?;
    let o = probs.matmul(values)?.to_dtype(DType::F32)?; // [kv_heads, group * len, d]
    let lse = (max + sum.log()?)?;
    Ok(Partial { o: o.reshape((heads, len, head_dim))?, lse: lse.reshape((heads, len, 1))? })
}

/// [`attend_partial`] with visibility given by positions (a ring block's run), through the
/// blocked kernel on the CPU; `None` on other devices, which take [`attend_partial`] with the
/// run's mask.
pub(crate) fn attend_partial_blocked(q: &Tensor, keys: &Tensor, values: &Tensor, causal: &Causal) -> Result<Option<Partial>> {
    let (len, heads, head_dim) = q.dims3()?;
    if !q.device().is_cpu() {
        return Ok(None);
    }
    if len == 0 || keys.dim(1)? == 0 {
        return Ok(Some(Partial::empty(heads, len, head_dim, q.device())?));
    }
    let Some(done) = blocked_attention(&wide(q)?, &wide(keys)?, &wide(values)?, causal)? else { return Ok(None) };
    let o = Tensor::from_vec(done.out, (len, heads, head_dim), q.device())?.transpose(0, 1)?.contiguous()?;
    Ok(Some(Partial { o, lse: Tensor::from_vec(done.lse, (heads, len, 1), q.device())? }))
}

/// Attention of a batch's chunks against their sequences' caches on one rank: what
/// `Model::forward` runs at every tensor-parallel size.
pub struct CacheAttention<'a> {
    pub batch: &'a Batch<'a>,
    pub kv: &'a mut KvCache,
    /// Per distinct sliding window, the mask of every chunk.
    pub masks: &'a [(Option<usize>, Vec<ChunkMask>)],
    /// With [`Numerics::BatchInvariant`] every query row, in a prefill chunk too, goes through
    /// the decode kernel, so it is computed exactly as it would be decoded alone.
    pub numerics: Numerics,
}

impl AttentionStep for CacheAttention<'_> {
    fn rows(&self) -> StepRows {
        if self.batch.chunks.iter().any(|c| c.len > 1) {
            StepRows::Prefill
        } else {
            StepRows::Decode
        }
    }

    fn attend(&mut self, layer: LayerSlot, q: &Tensor, k: &Tensor, v: &Tensor, dest: Option<&Dest>) -> Result<Tensor> {
        // The model builds masks for every window its layers use.
        let Some((_, masks)) = self.masks.iter().find(|(w, _)| *w == layer.window) else {
            return Err(ModelError::InvalidConfig(format!("no attention masks for window {:?}", layer.window)));
        };
        let chunks = self.batch.chunks;
        if chunks.iter().all(|c| c.len == 1) {
            if let Some(out) = self.decode_step(layer, q, k, v, dest)? {
                return Ok(out);
            }
        }
        let mut outputs: Vec<Option<Tensor>> = Vec::with_capacity(chunks.len());
        // Decode rows (one query seeing every cached key) go through one fused pass below,
        // reading their blocks in place.
        let mut decode = Vec::new();
        let mut offset = 0;
        for (chunk, mask) in chunks.iter().zip(masks) {
            let q_c = q.narrow(0, offset, chunk.len)?;
            let k_c = k.narrow(0, offset, chunk.len)?.transpose(0, 1)?.contiguous()?;
            let v_c = v.narrow(0, offset, chunk.len)?.transpose(0, 1)?.contiguous()?;
            if chunk.len > 1 && self.numerics == Numerics::BatchInvariant && decode_attention::applies(&q_c, self.kv.dtype()) {
                // Each row as the decode step of its own position: it sees the keys up to its
                // own (the last `window` of them), read from the blocks in place.
                self.kv.write_rows(chunk.seq, layer.index, chunk.start, &k_c, &v_c)?;
                for r in 0..chunk.len {
                    let end = chunk.start + r + 1;
                    let first = end.saturating_sub(layer.window.unwrap_or(end));
                    decode.push((outputs.len(), offset + r, chunk.seq, first..end));
                    outputs.push(None);
                }
            } else if chunk.len == 1 && decode_attention::applies(&q_c, self.kv.dtype()) {
                self.kv.write_rows(chunk.seq, layer.index, chunk.start, &k_c, &v_c)?;
                decode.push((outputs.len(), offset, chunk.seq, mask.first_key(chunk.start + 1)..chunk.start + 1));
                outputs.push(None);
            } else {
                let (keys, values) = self.kv.write(chunk.seq, layer.index, chunk.start, &k_c, &v_c)?;
                outputs.push(Some(attend(&q_c, &keys, &values, mask)?));
            }
            offset += chunk.len;
        }
        if !decode.is_empty() {
            let kv = &*self.kv;
            let row = |i: usize| {
                let (_, q_row, seq, visible) = &decode[i];
                Ok(DecodeRow { q_row: *q_row, kv: Cached::Paged(kv.paged(*seq, layer.index)?), visible: visible.clone() })
            };
            let fused = decode_attention::decode_attention(q, decode.len(), &row, None)?;
            for (j, (slot, ..)) in decode.iter().enumerate() {
                outputs[*slot] = Some(fused.narrow(0, j, 1)?);
            }
        }
        let mut outputs: Vec<Tensor> = outputs.into_iter().flatten().collect();
        Ok(if outputs.len() == 1 { outputs.remove(0) } else { Tensor::cat(&outputs, 0)? })
    }
}

impl CacheAttention<'_> {
    /// A step of decode rows only (one token per sequence, seeing every cached key or the last
    /// `window` of them): each row's key and value go straight into its block, and one fused
    /// pass attends them all, reading the blocks in place. `None` where the CPU pass does not
    /// apply.
    fn decode_step(&mut self, layer: LayerSlot, q: &Tensor, k: &Tensor, v: &Tensor, dest: Option<&Dest>) -> Result<Option<Tensor>> {
        let chunks = self.batch.chunks;
        if chunks.is_empty() || !decode_attention::applies(q, self.kv.dtype()) {
            return Ok(None);
        }
        for (i, c) in chunks.iter().enumerate() {
            // Every row has the same shapes, so a refusal comes at the first row; were it later,
            // the general path would write the same values again.
            if !self.kv.write_row(c.seq, layer.index, c.start, k, v, i)? {
                return Ok(None);
            }
        }
        let kv = &*self.kv;
        let row = |i: usize| {
            let c = &chunks[i];
            // As `ChunkMask`: a query at position p sees keys p - window + 1 ..= p.
            let end = c.start + 1;
            let visible = end.saturating_sub(layer.window.unwrap_or(end))..end;
            Ok(DecodeRow { q_row: i, kv: Cached::Paged(kv.paged(c.seq, layer.index)?), visible })
        };
        Ok(Some(decode_attention::decode_attention(q, chunks.len(), &row, dest)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(shape: (usize, usize, usize), seed: u64) -> Tensor {
        let mut rng = crate::sampling::sampler::SeededRng::new(seed);
        let n = shape.0 * shape.1 * shape.2;
        let values: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    fn all_finite(t: &Tensor) -> bool {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite())
    }

    /// GQA shapes: 4 query heads over 2 KV heads, 5 queries, 12 keys.
    fn inputs() -> (Tensor, Tensor, Tensor) {
        (random((5, 4, 8), 1), random((2, 12, 8), 2), random((2, 12, 8), 3))
    }

    /// `max |a − b| / max |b|` over all elements.
    fn relative_diff(a: &Tensor, b: &Tensor) -> f32 {
        let scale: f32 = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        max_diff(a, b) / scale
    }

    /// The blocked CPU path against one product over the full score matrix with the full mask,
    /// at lengths around the kernel's block sizes and well past them, from the first position
    /// and after cached ones, with and without a sliding window; three query heads per KV head.
    #[test]
    fn blocked_attention_equals_the_full_score_matrix() {
        for len in [1, 127, 128, 129, 4000] {
            for start in [0, 300] {
                let total = start + len;
                let q = random((len, 6, 16), len as u64);
                let (k, v) = (random((2, total, 16), 2 * len as u64 + 1), random((2, total, 16), 3 * len as u64 + 7));
                for window in [None, Some(100), Some(1000)] {
                    let mask = ChunkMask::new(start, len, window);
                    let blocked = attend(&q, &k, &v, &mask).unwrap();
                    // The reference: one product, every row against every key, the mask added.
                    let whole = match mask.tensor(len, total, &Device::Cpu).unwrap() {
                        Some(m) if len > 1 => attend_block(&q, &k, &v, Some(&m)).unwrap(),
                        _ => {
                            let first = mask.first_key(total);
                            attend_block(&q, &k.narrow(1, first, total - first).unwrap(), &v.narrow(1, first, total - first).unwrap(), None)
                                .unwrap()
                        }
                    };
                    assert_eq!(blocked.dims(), &[len, 6 * 16]);
                    let diff = relative_diff(&blocked, &whole);
                    assert!(diff <= 1e-5, "len {len} after {start} window {window:?}: relative difference {diff}");
                }
            }
        }
    }

    /// A ring run's part through the blocked kernel, with key positions that jump (a zigzag
    /// block), equals the masked product's part: output and log-sum-exp, rows that see nothing
    /// included.
    #[test]
    fn blocked_parts_equal_masked_parts() {
        let key_positions: Vec<usize> = (0..300).chain(900..1200).collect();
        let (q, k, v) = (random((400, 4, 8), 21), random((2, 600, 8), 22), random((2, 600, 8), 23));
        for (first_query, window) in [(0, None), (850, None), (1000, Some(200)), (250, Some(64))] {
            let causal = Causal { first_query, key_positions: &key_positions, window };
            let blocked = attend_partial_blocked(&q, &k, &v, &causal).unwrap().expect("the CPU has the blocked kernel");
            let mask: Vec<f32> = (0..400)
                .flat_map(|i| {
                    let causal = &causal;
                    key_positions.iter().map(move |&kp| if causal.visible(first_query + i, kp) { 0f32 } else { f32::NEG_INFINITY })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (400, 600), &Device::Cpu).unwrap();
            let want = attend_partial(&q, &k, &v, Some(&mask)).unwrap();
            assert!(relative_diff(&blocked.o, &want.o) <= 1e-5, "queries from {first_query}, window {window:?}");
            let (a, b) =
                (blocked.lse.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.lse.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            for (a, b) in a.iter().zip(&b) {
                assert!(a == b || (a - b).abs() <= 1e-5 * b.abs().max(1.0), "lse {a} vs {b}");
            }
            assert!(all_finite(&blocked.o));
        }
    }

    /// Prefill reads a sequence's keys gathered from its blocks into one tensor; the same keys
    /// as a view into a longer tensor (how a contiguous per-sequence cache handed them out)
    /// give the same bits, in every type, with and without a sliding window.
    #[test]
    fn gathered_keys_give_the_bits_of_a_view_into_a_longer_cache() {
        let (start, len) = (40, QUERY_BLOCK + 22);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let q = random((len, 4, 8), 7).to_dtype(dtype).unwrap();
            let (k, v) = (random((2, 256, 8), 8).to_dtype(dtype).unwrap(), random((2, 256, 8), 9).to_dtype(dtype).unwrap());
            let view = |t: &Tensor| t.narrow(1, 0, start + len).unwrap();
            for window in [None, Some(60)] {
                let mask = ChunkMask::new(start, len, window);
                let a = attend(&q, &view(&k), &view(&v), &mask).unwrap().to_dtype(DType::F32).unwrap();
                let b = attend(&q, &view(&k).contiguous().unwrap(), &view(&v).contiguous().unwrap(), &mask).unwrap();
                assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(), "{dtype:?} {window:?}");
            }
        }
    }

    #[test]
    fn merged_parts_equal_attention_over_all_keys() {
        let (q, k, v) = inputs();
        let whole = attend(&q, &k, &v, &ChunkMask::default()).unwrap();
        let part = |r: std::ops::Range<usize>| {
            let (k, v) = (k.narrow(1, r.start, r.len()).unwrap(), v.narrow(1, r.start, r.len()).unwrap());
            attend_partial(&q, &k, &v, None).unwrap()
        };
        let (a, empty, b) = (part(0..3), part(3..3), part(3..12));
        assert!(max_diff(&a.clone().into_output(DType::F32).unwrap(), &whole) > 1e-3, "a part alone differs");
        for merged in [a.merge(&empty).unwrap().merge(&b).unwrap(), b.merge(&a).unwrap().merge(&empty).unwrap()] {
            assert!(max_diff(&merged.into_output(DType::F32).unwrap(), &whole) < 1e-6);
        }
        let o = Tensor::stack(&[&a.o, &empty.o, &b.o], 0).unwrap();
        let lse = Tensor::stack(&[&a.lse, &empty.lse, &b.lse], 0).unwrap();
        let stacked = merge_stacked(&o, &lse).unwrap();
        assert!(max_diff(&stacked.clone().into_output(DType::F32).unwrap(), &whole) < 1e-6);
        assert!(max_diff(&stacked.lse, &part(0..12).lse) < 1e-6);
    }

    #[test]
    fn rows_that_see_nothing_give_zero_and_minus_infinity_never_nan() {
        let (q, k, v) = inputs();
        // Row 0 sees nothing, the others see everything.
        let mut mask = vec![0f32; 5 * 12];
        mask[..12].fill(f32::NEG_INFINITY);
        let mask = Tensor::from_vec(mask, (5, 12), &Device::Cpu).unwrap();
        let p = attend_partial(&q, &k, &v, Some(&mask)).unwrap();
        assert!(all_finite(&p.o));
        let lse = p.lse.to_vec3::<f32>().unwrap();
        for head in &lse {
            assert_eq!(head[0][0], f32::NEG_INFINITY);
            assert!(head[1..].iter().all(|r| r[0].is_finite()));
        }
        let row0 = p.o.narrow(1, 0, 1).unwrap();
        assert_eq!(max_diff(&row0, &row0.zeros_like().unwrap()), 0.0);

        let empty = Partial::empty(4, 5, 8, &Device::Cpu).unwrap();
        let both_empty = empty.merge(&empty).unwrap();
        assert!(all_finite(&both_empty.o));
        assert_eq!(max_diff(&both_empty.o, &empty.o), 0.0);
        let same = p.merge(&empty).unwrap();
        assert!(all_finite(&same.o));
        assert_eq!(max_diff(&same.o, &p.o), 0.0);
        let o = Tensor::stack(&[&empty.o, &empty.o], 0).unwrap();
        let lse = Tensor::stack(&[&empty.lse, &empty.lse], 0).unwrap();
        let stacked = merge_stacked(&o, &lse).unwrap();
        assert!(all_finite(&stacked.o));
    }
}
