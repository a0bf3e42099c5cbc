//! Matrix–vector products for decode (one token per sequence, a few sequences per step).
//!
//! Decode multiplies one activation row by every weight matrix: it is bound by how fast the
//! weights stream from memory. candle's general GEMM spends much of that time packing and
//! scheduling (measured in BENCHMARKS.md); a plain row-parallel dot product reads each weight
//! once, in order, on every core. Each output element is one dot product computed by one thread
//! in a fixed order, so results do not depend on the thread count.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;

use crate::kernels::elem::{is_slice, output, with_slice, Dest, Elem, ElemPtr};
use crate::kernels::pool::with_reused;

/// Output columns (weight rows) per parallel task: large enough to amortise scheduling, small
/// enough to balance.
pub(crate) const ROWS_PER_TASK: usize = 64;

/// Most activation rows handled by the matrix-vector path (a decode batch); larger inputs are
/// matrix-matrix products, where GEMM wins.
pub const MAX_ROWS: usize = 16;

/// `x Wᵀ` for a few rows `x` (`[rows ≤ MAX_ROWS, in]`) and contiguous f32 or bf16 `W`
/// (`[out, in]`) on the CPU, accumulating in f32 and returning `x`'s dtype. Each weight row is
/// read from memory once and used for every activation row while it sits in L1. `None` when the
/// fast path does not apply, so the caller falls back to GEMM. Half-precision weights are widened
/// inside the dot product, so they stream from memory at half the bytes of f32. The result goes
/// into `dest` when it is a fitting workspace tensor (`workspace.rs`).
pub fn matvec_t(x: &Tensor, w: &Tensor, dest: Option<&Dest>) -> candle_core::Result<Option<Tensor>> {
    float_product(x, w, dest, Arithmetic::Fastest)
}

/// `x Wᵀ` as [`matvec_t`], for any number of rows, with every output element computed by the
/// same arithmetic whatever the row count, the row's place in the batch, or the thread count:
/// the register-blocked kernel's per-pair accumulation (or, on a CPU without one, the plain dot
/// product) for every element, the single-row case and an odd last weight row included. So a
/// token's projections are bit for bit the same in a decode step of one, in a batch of thirty,
/// or inside a prefill chunk; [`matvec_t`] alone differs between one row and several, and
/// larger products go to GEMM. Weight rows of a task stay in cache while blocks of up to
/// [`MAX_ROWS`] activation rows pass over them. `None` where [`matvec_t`]'s conditions other
/// than the row count fail.
pub fn matmul_t_invariant(x: &Tensor, w: &Tensor, dest: Option<&Dest>) -> candle_core::Result<Option<Tensor>> {
    float_product(x, w, dest, Arithmetic::Invariant)
}

/// Which row kernels a float product runs.
#[derive(Clone, Copy, PartialEq)]
enum Arithmetic {
    /// [`rows_parallel`], for at most [`MAX_ROWS`] rows.
    Fastest,
    /// [`rows_invariant`], for any number of rows.
    Invariant,
}

/// The shared body of [`matvec_t`] and [`matmul_t_invariant`]: checks the operands, then runs
/// the product for the weights' float type.
fn float_product(x: &Tensor, w: &Tensor, dest: Option<&Dest>, arithmetic: Arithmetic) -> candle_core::Result<Option<Tensor>> {
    let (rows, inner) = match x.dims() {
        [r, i] => (*r, *i),
        _ => return Ok(None),
    };
    let (out, w_inner) = match w.dims() {
        [o, i] => (*o, *i),
        _ => return Ok(None),
    };
    if rows == 0
        || (arithmetic == Arithmetic::Fastest && rows > MAX_ROWS)
        || inner != w_inner
        || !x.device().is_cpu()
        || !matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16)
    {
        return Ok(None);
    }
    let (w_store, w_layout) = w.storage_and_layout();
    let Some((w0, w1)) = w_layout.contiguous_offsets() else { return Ok(None) };
    let shape = Product { rows, out, inner };
    with_f32_rows(x, |x_data| {
        Ok(match &*w_store {
            Storage::Cpu(CpuStorage::F32(all)) => rows_output(dest, shape, x.dtype(), |y| {
                by_arithmetic(arithmetic, shape, &all[w0..w1], x_data, f32_kernel(), block_kernel::<f32>(), y)
            })?,
            Storage::Cpu(CpuStorage::BF16(all)) => rows_output(dest, shape, x.dtype(), |y| {
                by_arithmetic(arithmetic, shape, &all[w0..w1], x_data, bf16_kernel(), block_kernel::<half::bf16>(), y)
            })?,
            Storage::Cpu(CpuStorage::F16(all)) => rows_output(dest, shape, x.dtype(), |y| {
                by_arithmetic(arithmetic, shape, &all[w0..w1], x_data, f16_kernel(), block_kernel::<half::f16>(), y)
            })?,
            _ => None,
        })
    })
}

/// Runs the row kernels `arithmetic` names.
fn by_arithmetic<W: Sync>(
    arithmetic: Arithmetic,
    p: Product,
    w: &[W],
    x: &[f32],
    dot: fn(&[W], &[f32]) -> f32,
    block: Option<BlockKernel<W>>,
    y: RowsOut,
) {
    match arithmetic {
        Arithmetic::Fastest => rows_parallel(p, w, x, dot, block, y),
        Arithmetic::Invariant => rows_invariant(p, w, x, dot, block, y),
    }
}

/// [`rows_parallel`] with one arithmetic for every element (see [`matmul_t_invariant`]).
fn rows_invariant<W: Sync>(p: Product, w: &[W], x: &[f32], dot: fn(&[W], &[f32]) -> f32, block: Option<BlockKernel<W>>, y: RowsOut) {
    let Product { rows, inner, .. } = p;
    y.par_tiles(|first, ys| {
        let w_row = |j: usize| &w[(first + j) * inner..(first + j + 1) * inner];
        let x_row = |i: usize| &x[i * inner..(i + 1) * inner];
        let task_rows = ys.len() / rows;
        for block_start in (0..rows).step_by(MAX_ROWS) {
            let block_end = (block_start + MAX_ROWS).min(rows);
            let Some(block) = block else {
                for j in 0..task_rows {
                    for i in block_start..block_end {
                        ys[j * rows + i] = dot(w_row(j), x_row(i));
                    }
                }
                continue;
            };
            for j in (0..task_rows).step_by(2) {
                // An odd last weight row goes through the kernel paired with itself, so it gets
                // the same arithmetic as every other.
                let j1 = (j + 1).min(task_rows - 1);
                let mut i = block_start;
                while i < block_end {
                    let take = (block_end - i).min(4);
                    let mut xs = [x_row(i); 4];
                    for (k, xk) in xs.iter_mut().enumerate().take(take) {
                        *xk = x_row(i + k);
                    }
                    let sums = block(w_row(j), w_row(j1), xs, take);
                    for k in 0..take {
                        ys[j * rows + i + k] = sums[0][k];
                        ys[j1 * rows + i + k] = sums[1][k];
                    }
                    i += take;
                }
            }
        }
    });
}

thread_local! {
    /// The calling thread's activations widened to f32, kept between products.
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `x`'s elements as f32: read in place when `x` is a contiguous f32 CPU tensor,
/// else widened, half types into this thread's reused buffer.
pub(crate) fn with_f32_rows<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> candle_core::Result<Option<R>>) -> candle_core::Result<Option<R>> {
    fn widen<T: Elem, R>(x: &[T], f: impl FnOnce(&[f32]) -> R) -> R {
        with_reused(&WIDE, |wide| {
            wide.clear();
            wide.extend(x.iter().map(|v| v.to_f32()));
            f(wide)
        })
    }
    let done = if is_slice::<f32>(x) {
        with_slice::<f32, _>(x, f)
    } else if is_slice::<half::bf16>(x) {
        with_slice::<half::bf16, _>(x, |x| widen(x, f))
    } else if is_slice::<half::f16>(x) {
        with_slice::<half::f16, _>(x, |x| widen(x, f))
    } else {
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        with_slice::<f32, _>(&x32, f)
    };
    done.unwrap_or(Ok(None))
}

/// The sizes of a decode product `[rows, inner] × [out, inner]ᵀ`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Product {
    pub rows: usize,
    pub out: usize,
    pub inner: usize,
}

thread_local! {
    /// A pool thread's products of one task, before they are stored as rows.
    static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Where a decode product's pool tasks put `y[i, o]` (`[rows, out]`, row-major, in the
/// activations' type): see [`RowsOut::par_tiles`].
#[derive(Clone, Copy)]
pub(crate) struct RowsOut {
    ptr: ElemPtr,
    rows: usize,
    out: usize,
}

// SAFETY: the tasks sharing a `RowsOut` write disjoint elements (their own columns, in
// `par_tiles`), and the buffer outlives them (`product_output` holds it until they return).
unsafe impl Send for RowsOut {}
// SAFETY: as for `Send`: shared between tasks, it is only written through, at disjoint elements.
unsafe impl Sync for RowsOut {}

impl RowsOut {
    /// Splits the output columns (weight rows) over the thread pool, [`ROWS_PER_TASK`] to a task:
    /// `f(first, tile)` computes columns `first..first + n` into `tile` (`[n, rows]`, the order
    /// the kernels produce them in), which is then stored into the rows, rounded to their type.
    pub fn par_tiles(self, f: impl Fn(usize, &mut [f32]) + Sync) {
        let (rows, out) = (self.rows, self.out);
        (0..out.div_ceil(ROWS_PER_TASK)).into_par_iter().for_each(|task| {
            let first = task * ROWS_PER_TASK;
            let n = (out - first).min(ROWS_PER_TASK);
            // The thread's tile from its last task: zeroing a fresh one per task cost more than
            // the stores (kernels overwrite every element they are given).
            with_reused(&TILE, |tile| {
                if tile.len() < ROWS_PER_TASK * rows {
                    tile.resize(ROWS_PER_TASK * rows, 0.0);
                }
                let tile = &mut tile[..n * rows];
                f(first, tile);
                for i in 0..rows {
                    self.store_run(i, first, tile.iter().skip(i).step_by(rows));
                }
            });
        });
    }

    /// Stores `values` at row `i`, columns `first..`: a run of one task's columns.
    fn store_run<'a>(self, i: usize, first: usize, values: impl ExactSizeIterator<Item = &'a f32>) {
        let at = i * self.out + first;
        assert!(i < self.rows && first + values.len() <= self.out, "product output index out of range");
        // SAFETY: the run lies within the `rows × out` buffer (checked), and the calling task
        // alone writes these columns (`par_tiles`).
        unsafe {
            match self.ptr {
                ElemPtr::F32(p) => values.enumerate().for_each(|(c, v)| *p.add(at + c) = *v),
                ElemPtr::BF16(p) => values.enumerate().for_each(|(c, v)| *p.add(at + c) = half::bf16::from_f32(*v)),
                ElemPtr::F16(p) => values.enumerate().for_each(|(c, v)| *p.add(at + c) = half::f16::from_f32(*v)),
            }
        }
    }
}

/// Runs a decode product that writes through a [`RowsOut`] into `dest` (a workspace tensor) when
/// it is given and fits, else into a new tensor of `dtype`. `None` for a dtype the kernels do not
/// write.
pub(crate) fn product_output(
    dest: Option<&Dest>,
    p: Product,
    dtype: DType,
    f: impl FnOnce(RowsOut),
) -> candle_core::Result<Option<Tensor>> {
    if p.rows > MAX_ROWS {
        return Ok(None);
    }
    rows_output(dest, p, dtype, f)
}

/// [`product_output`] for any number of rows.
fn rows_output(dest: Option<&Dest>, p: Product, dtype: DType, f: impl FnOnce(RowsOut)) -> candle_core::Result<Option<Tensor>> {
    let shape = [p.rows, p.out];
    let run = |ptr: ElemPtr| f(RowsOut { ptr, rows: p.rows, out: p.out });
    Ok(Some(match dtype {
        DType::F32 => output::<f32>(dest, &shape, |y| run(f32::ptr(y)))?,
        DType::BF16 => output::<half::bf16>(dest, &shape, |y| run(half::bf16::ptr(y)))?,
        DType::F16 => output::<half::f16>(dest, &shape, |y| run(half::f16::ptr(y)))?,
        _ => return Ok(None),
    }))
}

/// `y[i, o] = dot(W[o, :], x[i, :])` with weight rows split over the thread pool. With several
/// activation rows, a register-blocked kernel (when the CPU has one) computes two weight rows
/// against four activation rows at once: each load then feeds more than one multiply-add, which
/// is what a batch of decodes is bound by once the weights are in cache.
fn rows_parallel<W: Sync>(p: Product, w: &[W], x: &[f32], dot: fn(&[W], &[f32]) -> f32, block: Option<BlockKernel<W>>, y: RowsOut) {
    let Product { rows, inner, .. } = p;
    y.par_tiles(|first, ys| {
        let w_row = |j: usize| &w[(first + j) * inner..(first + j + 1) * inner];
        let x_row = |i: usize| &x[i * inner..(i + 1) * inner];
        let task_rows = ys.len() / rows;
        let mut j = 0;
        if let Some(block) = block.filter(|_| rows > 1) {
            while j + 2 <= task_rows {
                let mut i = 0;
                while i < rows {
                    let take = (rows - i).min(4);
                    let mut xs = [x_row(i); 4];
                    for (k, xk) in xs.iter_mut().enumerate().take(take) {
                        *xk = x_row(i + k);
                    }
                    let sums = block(w_row(j), w_row(j + 1), xs, take);
                    for k in 0..take {
                        ys[j * rows + i + k] = sums[0][k];
                        ys[(j + 1) * rows + i + k] = sums[1][k];
                    }
                    i += take;
                }
                j += 2;
            }
        }
        for j in j..task_rows {
            for i in 0..rows {
                ys[j * rows + i] = dot(w_row(j), x_row(i));
            }
        }
    });
}

/// Two weight rows against up to four activation rows (the first `take` of `xs`):
/// `[[dot(w0, x_k)], [dot(w1, x_k)]]`.
type BlockKernel<W> = fn(&[W], &[W], [&[f32]; 4], usize) -> [[f32; 4]; 2];

/// The register-blocked kernel for weights of type `W`, if this CPU has one: sixteen lanes with
/// AVX-512, else eight with AVX2.
fn block_kernel<W: Elem>() -> Option<BlockKernel<W>> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Some(block_avx512_entry::<W>);
        }
        if has_avx2_fma() {
            return Some(block_avx2_entry::<W>);
        }
    }
    None
}

#[cfg(target_arch = "x86_64")]
fn block_avx2_entry<W: Elem>(w0: &[W], w1: &[W], xs: [&[f32]; 4], take: usize) -> [[f32; 4]; 2] {
    // SAFETY: only selected by `block_kernel` after checking that the CPU has AVX2 and FMA.
    unsafe {
        match take {
            4 => block_avx2::<W, 4>(w0, w1, xs),
            3 => block_avx2::<W, 3>(w0, w1, xs),
            2 => block_avx2::<W, 2>(w0, w1, xs),
            _ => block_avx2::<W, 1>(w0, w1, xs),
        }
    }
}

/// Eight accumulators (2 weight rows × 4 activation rows) stay in registers; per eight columns
/// it loads 2 + R vectors for 2R multiply-adds.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_avx2<W: Elem, const R: usize>(w0: &[W], w1: &[W], xs: [&[f32]; 4]) -> [[f32; 4]; 2] {
    use std::arch::x86_64::*;
    let n = w0.len().min(w1.len()).min(xs.iter().take(R).map(|x| x.len()).min().unwrap_or(0));
    let mut acc0 = [_mm256_setzero_ps(); R];
    let mut acc1 = [_mm256_setzero_ps(); R];
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, within every row.
        let (a, b) = unsafe { (W::load8(w0.as_ptr().add(i)), W::load8(w1.as_ptr().add(i))) };
        for k in 0..R {
            // SAFETY: i + 8 <= n, within every row.
            let v = unsafe { _mm256_loadu_ps(xs[k].as_ptr().add(i)) };
            acc0[k] = _mm256_fmadd_ps(a, v, acc0[k]);
            acc1[k] = _mm256_fmadd_ps(b, v, acc1[k]);
        }
        i += 8;
    }
    let mut out = [[0f32; 4]; 2];
    for k in 0..R {
        out[0][k] = horizontal_sum(acc0[k]);
        out[1][k] = horizontal_sum(acc1[k]);
        for t in i..n {
            out[0][k] += w0[t].to_f32() * xs[k][t];
            out[1][k] += w1[t].to_f32() * xs[k][t];
        }
    }
    out
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Picks the best f32 dot product this CPU supports, once per call rather than once per row.
pub(crate) fn f32_kernel() -> fn(&[f32], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        return dot_avx2_entry;
    }
    dot_portable
}

pub(crate) fn bf16_kernel() -> fn(&[half::bf16], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        return dot_lanes_avx2_entry::<half::bf16>;
    }
    dot_lanes_portable::<half::bf16>
}

pub(crate) fn f16_kernel() -> fn(&[half::f16], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        return dot_lanes_avx2_entry::<half::f16>;
    }
    dot_lanes_portable::<half::f16>
}

/// Any weight type widened element by element; the compiler vectorises the f32 part.
fn dot_lanes_portable<W: Elem>(a: &[W], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (pa, pb) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += pa[k].to_f32() * pb[k];
        }
    }
    acc.iter().sum::<f32>() + ta.iter().zip(tb).map(|(p, q)| p.to_f32() * q).sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
fn dot_lanes_avx2_entry<W: Elem>(a: &[W], b: &[f32]) -> f32 {
    // SAFETY: only selected after checking that the CPU has AVX2, FMA and F16C.
    unsafe { dot_lanes_avx2(a, b) }
}

/// One weight row against one activation row, eight lanes at a time with four accumulators.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_lanes_avx2<W: Elem>(a: &[W], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, a_k) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8k + 8 <= n, within both slices.
            let (va, vb) = unsafe { (W::load8(a.as_ptr().add(i + 8 * k)), _mm256_loadu_ps(b.as_ptr().add(i + 8 * k))) };
            *a_k = _mm256_fmadd_ps(va, vb, *a_k);
        }
        i += 32;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = horizontal_sum(s);
    for t in i..n {
        sum += a[t].to_f32() * b[t];
    }
    sum
}

#[cfg(target_arch = "x86_64")]
fn block_avx512_entry<W: Elem>(w0: &[W], w1: &[W], xs: [&[f32]; 4], take: usize) -> [[f32; 4]; 2] {
    // SAFETY: only selected by `block_kernel` after checking that the CPU has AVX-512F.
    unsafe {
        match take {
            4 => block_avx512::<W, 4>(w0, w1, xs),
            3 => block_avx512::<W, 3>(w0, w1, xs),
            2 => block_avx512::<W, 2>(w0, w1, xs),
            _ => block_avx512::<W, 1>(w0, w1, xs),
        }
    }
}

/// As [`block_avx2`] with sixteen lanes per vector.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block_avx512<W: Elem, const R: usize>(w0: &[W], w1: &[W], xs: [&[f32]; 4]) -> [[f32; 4]; 2] {
    use std::arch::x86_64::*;
    let n = w0.len().min(w1.len()).min(xs.iter().take(R).map(|x| x.len()).min().unwrap_or(0));
    let mut acc0 = [_mm512_setzero_ps(); R];
    let mut acc1 = [_mm512_setzero_ps(); R];
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n, within every row.
        let (a, b) = unsafe { (W::load16(w0.as_ptr().add(i)), W::load16(w1.as_ptr().add(i))) };
        for k in 0..R {
            // SAFETY: i + 16 <= n, within every row.
            let v = unsafe { _mm512_loadu_ps(xs[k].as_ptr().add(i)) };
            acc0[k] = _mm512_fmadd_ps(a, v, acc0[k]);
            acc1[k] = _mm512_fmadd_ps(b, v, acc1[k]);
        }
        i += 16;
    }
    let mut out = [[0f32; 4]; 2];
    for k in 0..R {
        out[0][k] = _mm512_reduce_add_ps(acc0[k]);
        out[1][k] = _mm512_reduce_add_ps(acc1[k]);
        for t in i..n {
            out[0][k] += w0[t].to_f32() * xs[k][t];
            out[1][k] += w1[t].to_f32() * xs[k][t];
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn horizontal_sum(s: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let q = _mm_add_ps(_mm256_extractf128_ps(s, 1), _mm256_castps256_ps128(s));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)))
}

/// Eight independent partial sums, a shape compilers vectorise on every target.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (pa, pb) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += pa[k] * pb[k];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (p, q) in ta.iter().zip(tb) {
        sum += p * q;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2_entry(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: only selected by `f32_kernel` after checking that the CPU has AVX2 and FMA.
    unsafe { dot_avx2(a, b) }
}

/// One f32 row against another, eight lanes at a time with four accumulators.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    // Four accumulators hide the FMA latency.
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, a_k) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8k + 8 <= n, within both slices.
            let va = unsafe { _mm256_loadu_ps(pa.add(i + 8 * k)) };
            // SAFETY: as for `va`.
            let vb = unsafe { _mm256_loadu_ps(pb.add(i + 8 * k)) };
            *a_k = _mm256_fmadd_ps(va, vb, *a_k);
        }
        i += 32;
    }
    while i + 8 <= n {
        // SAFETY: i + 8 <= n.
        let va = unsafe { _mm256_loadu_ps(pa.add(i)) };
        // SAFETY: as for `va`.
        let vb = unsafe { _mm256_loadu_ps(pb.add(i)) };
        acc[0] = _mm256_fmadd_ps(va, vb, acc[0]);
        i += 8;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = horizontal_sum(s);
    while i < n {
        // SAFETY: i < n.
        sum += unsafe { *pa.add(i) * *pb.add(i) };
        i += 1;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_gemm_for_every_tail_length() {
        for inner in [1usize, 7, 8, 31, 32, 33, 100, 576] {
            let out = 130;
            let w: Vec<f32> = (0..out * inner).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let x: Vec<f32> = (0..inner).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect();
            let w = Tensor::from_vec(w, (out, inner), &candle_core::Device::Cpu).unwrap();
            let x = Tensor::from_vec(x, (1, inner), &candle_core::Device::Cpu).unwrap();
            let fast = matvec_t(&x, &w, None).unwrap().expect("fast path applies").to_vec2::<f32>().unwrap();
            let gemm = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
            for (a, b) in fast[0].iter().zip(&gemm[0]) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "inner {inner}: {a} vs {b}");
            }
            let portable: Vec<f32> = (0..out)
                .map(|r| {
                    let wr = w.get(r).unwrap().to_vec1::<f32>().unwrap();
                    dot_portable(&wr, &x.get(0).unwrap().to_vec1::<f32>().unwrap())
                })
                .collect();
            for (a, b) in fast[0].iter().zip(&portable) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "portable, inner {inner}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn several_rows_match_gemm() {
        let dev = candle_core::Device::Cpu;
        let (out, inner) = (200, 96);
        let w: Vec<f32> = (0..out * inner).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let w = Tensor::from_vec(w, (out, inner), &dev).unwrap();
        for rows in [2usize, 8, MAX_ROWS] {
            let x: Vec<f32> = (0..rows * inner).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect();
            let x = Tensor::from_vec(x, (rows, inner), &dev).unwrap();
            let fast = matvec_t(&x, &w, None).unwrap().expect("fast path").to_vec2::<f32>().unwrap();
            let gemm = x.matmul(&w.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(fast.len(), rows);
            for (fr, gr) in fast.iter().zip(&gemm) {
                for (a, b) in fr.iter().zip(gr) {
                    assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "rows {rows}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn blocked_rows_match_gemm_with_odd_shapes_and_tails() {
        let dev = candle_core::Device::Cpu;
        for (out, inner) in [(131usize, 37usize), (64, 8), (7, 581)] {
            let w: Vec<f32> = (0..out * inner).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let w = Tensor::from_vec(w, (out, inner), &dev).unwrap();
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let w = w.to_dtype(dtype).unwrap();
                let wide = w.to_dtype(DType::F32).unwrap();
                for rows in [2usize, 3, 5, 7, 13] {
                    let x: Vec<f32> = (0..rows * inner).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect();
                    let x = Tensor::from_vec(x, (rows, inner), &dev).unwrap();
                    let fast = matvec_t(&x, &w, None).unwrap().expect("fast path").to_vec2::<f32>().unwrap();
                    let gemm = x.matmul(&wide.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
                    for (fr, gr) in fast.iter().zip(&gemm) {
                        for (a, b) in fr.iter().zip(gr) {
                            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{dtype:?} {out}x{inner}, rows {rows}: {a} vs {b}");
                        }
                    }
                }
            }
        }
    }

    /// Each blocked kernel this CPU can run, not only the one dispatch picks.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn every_block_kernel_this_cpu_runs_matches_the_portable_dot() {
        let mut kernels: Vec<(&str, BlockKernel<f32>)> = Vec::new();
        if has_avx2_fma() {
            kernels.push(("avx2", block_avx2_entry::<f32>));
        }
        match std::arch::is_x86_feature_detected!("avx512f") {
            true => kernels.push(("avx512", block_avx512_entry::<f32>)),
            false => crate::kernels::kernel_paths::not_exercised("matvec avx512"),
        }
        if !has_avx2_fma() {
            crate::kernels::kernel_paths::not_exercised("matvec avx2");
        }
        for inner in [1usize, 8, 15, 16, 17, 40, 577] {
            let row = |salt: usize| (0..inner).map(|i| (((i + salt) * 37 % 101) as f32 - 50.0) / 50.0).collect::<Vec<f32>>();
            let (w0, w1) = (row(1), row(2));
            let xs: Vec<Vec<f32>> = (0..4).map(|k| row(10 + k)).collect();
            for (name, kernel) in &kernels {
                for take in 1..=4 {
                    let sums = kernel(&w0, &w1, [&xs[0], &xs[1], &xs[2], &xs[3]], take);
                    for k in 0..take {
                        for (got, w) in [(sums[0][k], &w0), (sums[1][k], &w1)] {
                            let want = dot_portable(w, &xs[k]);
                            assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "{name} inner {inner} take {take}: {got} vs {want}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn f16_dot_products_match_the_widened_f32_dot() {
        for n in [1usize, 7, 31, 32, 33, 577] {
            let a: Vec<half::f16> = (0..n).map(|i| half::f16::from_f32(((i * 37 % 101) as f32 - 50.0) / 50.0)).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect();
            let wide: Vec<f32> = a.iter().map(|v| v.to_f32()).collect();
            let want = dot_portable(&wide, &b);
            let mut got = vec![("portable", dot_lanes_portable(&a, &b))];
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma() {
                got.push(("avx2", dot_lanes_avx2_entry(&a, &b)));
            }
            for (name, g) in got {
                assert!((g - want).abs() <= 1e-4 * want.abs().max(1.0), "{name}, n {n}: {g} vs {want}");
            }
        }
    }

    #[test]
    fn half_weights_match_widened_gemm() {
        for (dtype, inner) in [DType::BF16, DType::F16].into_iter().flat_map(|d| [5usize, 32, 40, 576].map(|i| (d, i))) {
            let out = 70;
            let w: Vec<f32> = (0..out * inner).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let x: Vec<f32> = (0..inner).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect();
            let dev = candle_core::Device::Cpu;
            let w = Tensor::from_vec(w, (out, inner), &dev).unwrap().to_dtype(dtype).unwrap();
            let x = Tensor::from_vec(x, (1, inner), &dev).unwrap();
            let fast = matvec_t(&x, &w, None).unwrap().expect("half fast path").to_vec2::<f32>().unwrap();
            let reference = x.matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
            for (a, b) in fast[0].iter().zip(&reference[0]) {
                assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "inner {inner}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn declines_what_it_cannot_do() {
        let dev = candle_core::Device::Cpu;
        let w = Tensor::zeros((4, 8), DType::F32, &dev).unwrap();
        assert!(matvec_t(&Tensor::zeros((MAX_ROWS + 1, 8), DType::F32, &dev).unwrap(), &w, None).unwrap().is_none(), "too many rows");
        assert!(matvec_t(&Tensor::zeros((1, 8), DType::F32, &dev).unwrap(), &w.t().unwrap(), None).unwrap().is_none(), "shape");
        let wide = w.to_dtype(DType::F64).unwrap();
        assert!(matvec_t(&Tensor::zeros((1, 8), DType::F64, &dev).unwrap(), &wide, None).unwrap().is_none(), "f64 weights");
    }
}
