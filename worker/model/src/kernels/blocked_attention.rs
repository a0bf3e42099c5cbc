//! Causal attention of many query rows on the CPU, in blocks, with an online softmax: prefill
//! chunks and ring blocks.
//!
//! The score matrix of a long prompt is quadratic in its length (an 8k-token chunk's is 2.4 GB
//! per layer at nine heads), so it is never built. Each task takes the query heads that share
//! one KV head and [`QUERY_ROWS`] positions, and walks the keys in blocks of [`KEY_ROWS`]: a
//! block's scores come from one small GEMM, its probabilities are folded into running maxima
//! and sums (rescaling what came before when the maximum grows), and one more GEMM adds their
//! weighted values. Memory per task is a few blocks (O(block²)), whatever the length. Key blocks
//! wholly in the future of a task's rows, or wholly before its sliding window, are skipped;
//! blocks every row sees in full need no mask; the rest are masked element by element from the
//! positions, never from a stored mask.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::kernels::elem::with_slice;
use crate::kernels::exp::exp_in_place;

/// Query positions per task. With three query heads per KV head a task's queries, running sums
/// and accumulators stay in L2 beside one key block.
const QUERY_ROWS: usize = 64;
/// Keys per block: enough for the GEMMs to run near peak, small enough for one block's scores
/// (`heads per KV head · QUERY_ROWS · KEY_ROWS` f32) to stay in L2.
const KEY_ROWS: usize = 256;

/// Which keys each query sees: query row `i` sits at position `first_query + i`; key `j` at
/// `key_positions[j]` (ascending). A query sees the keys at or before its position, and under a
/// sliding `window` only the last `window` of them, its own included.
pub(crate) struct Causal<'a> {
    pub first_query: usize,
    pub key_positions: &'a [usize],
    pub window: Option<usize>,
}

impl Causal<'_> {
    pub fn visible(&self, q: usize, k: usize) -> bool {
        k <= q && self.window.is_none_or(|w| q - k < w)
    }
}

/// The result: `out` `[len, heads · head_dim]`, each row normalised over the keys it sees, and
/// `lse` `[heads, len]`, the log of each row's softmax denominator (−∞ for a row that sees no
/// key, whose output is 0).
pub(crate) struct Attended {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
}

/// `q` `[len, heads, head_dim]` (rotated), `keys` and `values` `[kv_heads, kv_len, head_dim]`,
/// all contiguous f32 on the CPU; `None` otherwise (the caller takes the tensor-op path).
pub(crate) fn blocked_attention(q: &Tensor, keys: &Tensor, values: &Tensor, causal: &Causal) -> Result<Option<Attended>> {
    if !matches!(q.device(), Device::Cpu) || [q, keys, values].iter().any(|t| t.dtype() != DType::F32) {
        return Ok(None);
    }
    let (len, heads, head_dim) = q.dims3()?;
    let (kv_heads, kv_len, kv_dim) = keys.dims3()?;
    if kv_dim != head_dim || values.dims3()? != (kv_heads, kv_len, head_dim) || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(ModelError::InvalidConfig(format!(
            "blocked attention over queries {:?}, keys {:?}, values {:?}",
            q.dims(),
            keys.dims(),
            values.dims()
        )));
    }
    if causal.key_positions.len() != kv_len {
        return Err(ModelError::InvalidConfig(format!("{} key positions for {kv_len} keys", causal.key_positions.len())));
    }
    let shape = Shape { len, heads, kv_heads, head_dim };
    let run = with_slice::<f32, _>(q, |q| {
        with_slice::<f32, _>(keys, |k| with_slice::<f32, _>(values, |v| attend(&shape, Operands { q, k, v }, causal)))
    });
    Ok(run.flatten().flatten())
}

#[derive(Clone, Copy)]
struct Shape {
    len: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

#[derive(Clone, Copy)]
struct Operands<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
}

/// One task's result: rows `rows` of the query heads of KV head `kv_head`, `o` laid out
/// `[group, rows, head_dim]` and `lse` `[group, rows]`.
struct TaskOut {
    kv_head: usize,
    first_row: usize,
    rows: usize,
    o: Vec<f32>,
    lse: Vec<f32>,
}

fn attend(s: &Shape, ops: Operands, causal: &Causal) -> Attended {
    let blocks = s.len.div_ceil(QUERY_ROWS);
    let parts: Vec<TaskOut> = (0..s.kv_heads * blocks)
        .into_par_iter()
        .map(|t| {
            let (kv_head, block) = (t / blocks, t % blocks);
            let first_row = block * QUERY_ROWS;
            task(s, ops, causal, kv_head, first_row, (s.len - first_row).min(QUERY_ROWS))
        })
        .collect();
    let group = s.heads / s.kv_heads;
    let d = s.head_dim;
    let mut out = vec![0f32; s.len * s.heads * d];
    let mut lse = vec![f32::NEG_INFINITY; s.heads * s.len];
    for p in parts {
        for g in 0..group {
            let head = p.kv_head * group + g;
            for i in 0..p.rows {
                let row = p.first_row + i;
                let src = (g * p.rows + i) * d;
                out[(row * s.heads + head) * d..][..d].copy_from_slice(&p.o[src..src + d]);
                lse[head * s.len + row] = p.lse[g * p.rows + i];
            }
        }
    }
    Attended { out, lse }
}

/// Query rows `first_row..first_row + rows` of the heads of `kv_head` over every key they see.
fn task(s: &Shape, ops: Operands, causal: &Causal, kv_head: usize, first_row: usize, rows: usize) -> TaskOut {
    let group = s.heads / s.kv_heads;
    let d = s.head_dim;
    let m = group * rows;
    let scale = 1.0 / (d as f32).sqrt();
    // The queries as one [group · rows, d] matrix, head-major, scaled once.
    let mut qt = vec![0f32; m * d];
    for g in 0..group {
        let head = kv_head * group + g;
        for i in 0..rows {
            let src = &ops.q[((first_row + i) * s.heads + head) * d..][..d];
            for (dst, x) in qt[(g * rows + i) * d..][..d].iter_mut().zip(src) {
                *dst = x * scale;
            }
        }
    }
    let (first_q, last_q) = (causal.first_query + first_row, causal.first_query + first_row + rows - 1);
    // Keys after the last row's position are hidden from every row, and so are keys the window
    // has dropped for the first row: both ends of the ascending positions.
    let hi = causal.key_positions.partition_point(|&k| k <= last_q);
    let lo = causal.window.map_or(0, |w| causal.key_positions.partition_point(|&k| k + w <= first_q));
    let kv_len = causal.key_positions.len();
    let keys = &ops.k[kv_head * kv_len * d..][..kv_len * d];
    let values = &ops.v[kv_head * kv_len * d..][..kv_len * d];

    let mut max = vec![f32::NEG_INFINITY; m];
    let mut sum = vec![0f32; m];
    let mut acc = vec![0f32; m * d];
    let mut scores = vec![0f32; m * KEY_ROWS.min(hi.saturating_sub(lo)).max(1)];
    let mut k0 = lo;
    while k0 < hi {
        let n = (hi - k0).min(KEY_ROWS);
        let positions = &causal.key_positions[k0..k0 + n];
        let scores = &mut scores[..m * n];
        // scores = qt · keysᵀ: [m, d] × [d, n].
        // SAFETY: every pointer addresses a live buffer of at least the extent its strides
        // reach (`qt` m·d, `keys` from row k0 n·d, `scores` m·n), and `scores` is written by
        // this call alone.
        unsafe {
            gemm::gemm(
                m,
                n,
                d,
                scores.as_mut_ptr(),
                1,
                n as isize,
                false,
                qt.as_ptr(),
                1,
                d as isize,
                keys[k0 * d..].as_ptr(),
                d as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        let all_visible = causal.visible(first_q, positions[n - 1]) && causal.visible(last_q, positions[0]);
        for r in 0..m {
            let q_pos = first_q + r % rows;
            let row = &mut scores[r * n..(r + 1) * n];
            if !all_visible {
                for (x, &k) in row.iter_mut().zip(positions) {
                    if !causal.visible(q_pos, k) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            let block_max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let new_max = max[r].max(block_max);
            if new_max == f32::NEG_INFINITY {
                // Nothing visible to this row yet: its probabilities here are all 0.
                row.fill(0.0);
                continue;
            }
            for x in row.iter_mut() {
                *x -= new_max;
            }
            exp_in_place(row);
            // e^(old max − new max) rescales what the earlier blocks added (0 before any).
            let rescale = if max[r] == f32::NEG_INFINITY { 0.0 } else { (max[r] - new_max).exp() };
            sum[r] = sum[r] * rescale + row.iter().sum::<f32>();
            if rescale != 1.0 {
                for a in &mut acc[r * d..(r + 1) * d] {
                    *a *= rescale;
                }
            }
            max[r] = new_max;
        }
        // acc += probabilities · values: [m, n] × [n, d].
        // SAFETY: as above; `acc` (m·d) is read and written by this call alone.
        unsafe {
            gemm::gemm(
                m,
                d,
                n,
                acc.as_mut_ptr(),
                1,
                d as isize,
                true,
                scores.as_ptr(),
                1,
                n as isize,
                values[k0 * d..].as_ptr(),
                1,
                d as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        k0 += n;
    }
    let mut lse = vec![f32::NEG_INFINITY; m];
    for r in 0..m {
        if sum[r] > 0.0 {
            let inv = 1.0 / sum[r];
            for a in &mut acc[r * d..(r + 1) * d] {
                *a *= inv;
            }
            lse[r] = max[r] + sum[r].ln();
        }
    }
    TaskOut { kv_head, first_row, rows, o: acc, lse }
}
