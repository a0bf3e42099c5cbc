//! bf16 × bf16 products on CPUs with AVX-512 BF16, whose `vdpbf16ps` does 32 multiply-adds of
//! bf16 pairs into 16 f32 lanes in one instruction.
//!
//! In a bf16 model the activations are bf16 already, so every product is exact in f32 and only
//! the order of the f32 sums differs from widening both sides first. Widening a weight costs a
//! zero-extend, a shift and an FMA per 16 weights; `vdpbf16ps` is one instruction per 32, which
//! is what lets two cores keep up with the memory in decode. Prefill gets a GEMM at twice the f32
//! multiply-add rate that reads the bf16 weights as they are, instead of widening the whole
//! matrix to f32 on every call.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use half::bf16;

use super::{mask16, sweep, PanelKernel, TileOut};
use crate::kernels::elem::Dest;
use crate::kernels::matvec::{product_output, Product, RowsOut, MAX_ROWS};

/// Whether this CPU runs the kernels here.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x Wᵀ` for bf16 `x` (`[rows, in]`) and bf16 `W` (`[out, in]`), both contiguous on the CPU,
/// accumulated in f32 and rounded to bf16. `None` when the CPU lacks AVX-512 BF16 or the
/// operands do not fit (the caller then widens to f32). Up to `row_kernel_rows` rows take the
/// row kernel, more the GEMM.
pub fn matmul_t(x: &Tensor, w: &Tensor, dest: Option<&Dest>, row_kernel_rows: usize) -> candle_core::Result<Option<Tensor>> {
    if !available() || x.dtype() != DType::BF16 || w.dtype() != DType::BF16 || !x.device().is_cpu() {
        return Ok(None);
    }
    let (&[rows, inner], &[out, w_inner]) = (x.dims(), w.dims()) else { return Ok(None) };
    if rows == 0 || inner == 0 || inner != w_inner {
        return Ok(None);
    }
    let (x_store, x_layout) = x.storage_and_layout();
    let (w_store, w_layout) = w.storage_and_layout();
    let (Storage::Cpu(CpuStorage::BF16(x_all)), Storage::Cpu(CpuStorage::BF16(w_all))) = (&*x_store, &*w_store) else {
        return Ok(None);
    };
    let (Some((x0, x1)), Some((w0, w1))) = (x_layout.contiguous_offsets(), w_layout.contiguous_offsets()) else {
        return Ok(None);
    };
    let (xs, ws) = (&x_all[x0..x1], &w_all[w0..w1]);
    if rows <= row_kernel_rows.min(MAX_ROWS) {
        let p = Product { rows, out, inner };
        return product_output(dest, p, DType::BF16, |y| few_rows(xs, ws, p, y));
    }
    if inner % 2 != 0 {
        return Ok(None);
    }
    // SAFETY: `available()` was checked above; `xs` holds `rows` rows and `ws` `out` rows of
    // `inner` (even) elements.
    let y = unsafe { sweep(&Bf16Panels { x: xs, w: ws, k: inner }, rows, out) };
    let y = Tensor::from_vec(y, (rows, out), x.device())?;
    drop((x_store, w_store));
    Ok(Some(y.to_dtype(DType::BF16)?))
}

/// Decode: `y[i, j] = dot(W[j], x[i])`, weight rows split over the thread pool. Up to four
/// activation rows share each weight load, so every weight byte is read from memory once.
/// (Several weight rows per pass as well measured slower: 60 against 86 tok/s
/// at batch 1, 173 against 196 at batch 8; the one sequential stream suits the prefetcher.)
fn few_rows(x: &[bf16], w: &[bf16], p: Product, y: RowsOut) {
    let Product { rows, inner, .. } = p;
    y.par_tiles(|first, ys| {
        for (j, yj) in ys.chunks_exact_mut(rows).enumerate() {
            let w_row = w[(first + j) * inner..].as_ptr();
            let mut i = 0;
            while i < rows {
                let xr = (rows - i).min(4);
                // Rows past `xr` repeat the last one; their sums are ignored.
                let xs = std::array::from_fn(|b| x[(i + b.min(xr - 1)) * inner..].as_ptr());
                let mut sums = [0f32; 4];
                // SAFETY: `available()` was checked by the caller; every row pointed at holds
                // `inner` elements.
                unsafe { dot_rows_dispatch(xr, w_row, xs, inner, &mut sums) };
                // Element by element: a slice copy of a run-time length is a `memmove` call,
                // once per weight row (1% of a decode step).
                for (y, s) in yj[i..i + xr].iter_mut().zip(sums) {
                    *y = s;
                }
                i += xr;
            }
        }
    });
}

/// Runs [`dot_rows`] for `xr` (1..=4) activation rows.
///
/// # Safety
/// The CPU must have AVX-512F, BW and BF16; every pointer must address `n` readable elements.
#[cfg(target_arch = "x86_64")]
unsafe fn dot_rows_dispatch(xr: usize, w: *const bf16, x: [*const bf16; 4], n: usize, sums: &mut [f32; 4]) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match xr {
            4 => dot_rows::<4>(w, x, n, sums),
            3 => dot_rows::<3>(w, x, n, sums),
            2 => dot_rows::<2>(w, x, n, sums),
            _ => dot_rows::<1>(w, x, n, sums),
        }
    }
}

/// Off x86_64, where `available()` is false and nothing calls it.
///
/// # Safety
/// Never to be called.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_rows_dispatch(_: usize, _: *const bf16, _: [*const bf16; 4], _: usize, _: &mut [f32; 4]) {
    unreachable!("available() is false off x86_64")
}

/// `sums[b] = dot(w, x[b])` over `n` elements, 32 at a time, the tail through masked loads
/// (zeros add nothing).
///
/// # Safety
/// The CPU must have AVX-512F, BW and BF16; `w` and every `x[..XR]` must address `n` readable
/// elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn dot_rows<const XR: usize>(w: *const bf16, x: [*const bf16; 4], n: usize, sums: &mut [f32; 4]) {
    use std::arch::x86_64::{
        __m512, __m512bh, _mm512_castsi512_ps, _mm512_dpbf16_ps, _mm512_maskz_loadu_epi16, _mm512_reduce_add_ps, _mm512_setzero_ps,
    };
    let mut acc = [_mm512_setzero_ps(); XR];
    let mut i = 0;
    // No closures or `array::from_fn` here: they would not inherit the target features, and a
    // call per load costs more than the load.
    while i < n {
        let mask = if n - i >= 32 { u32::MAX } else { (1u32 << (n - i)) - 1 };
        // SAFETY: the mask keeps the loads within the rows' `n` elements; the transmutes are
        // same-size bit casts between vector types.
        unsafe {
            let wv = std::mem::transmute::<__m512, __m512bh>(_mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mask, w.add(i) as *const i16)));
            for b in 0..XR {
                let v = _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mask, x[b].add(i) as *const i16));
                acc[b] = _mm512_dpbf16_ps(acc[b], wv, std::mem::transmute::<__m512, __m512bh>(v));
            }
        }
        i += 32;
    }
    for b in 0..XR {
        sums[b] = _mm512_reduce_add_ps(acc[b]);
    }
}

/// Prefill: `y = x Wᵀ` for even `k` (`inner`) on the shared panel sweep (`gemm/mod.rs`). Each
/// task packs 32 weight rows as bf16 pairs (`panel[p][c]` = row `c`'s elements `2p, 2p + 1`),
/// then sweeps every 12-row tile of `x` across the panel, broadcasting one pair of each
/// activation row per step.
struct Bf16Panels<'a> {
    /// The activations, `[m, k]`.
    x: &'a [bf16],
    /// The weights, `[n, k]`.
    w: &'a [bf16],
    k: usize,
}

impl PanelKernel for Bf16Panels<'_> {
    /// A bf16 pair of one weight row.
    type Packed = u32;
    /// Two vectors of sixteen f32 lanes.
    const PANEL: usize = 32;
    /// 12 rows × 2 vectors = 24 accumulators, plus the two panel vectors and a broadcast, fit
    /// the 32 vector registers.
    const TILE_ROWS: usize = 12;

    /// Packs rows `c0..c0 + cols` of `w` (`[_, k]`) into `panel` as `[k / 2][32]` words, each the
    /// bf16 pair `(w[c][2p], w[c][2p + 1])`; columns past `cols` are zero.
    fn pack(&self, c0: usize, cols: usize, panel: &mut Vec<u32>) {
        let (w, k) = (self.w, self.k);
        let pairs = k / 2;
        panel.clear();
        panel.resize(pairs * Self::PANEL, 0);
        for c in 0..cols {
            let row = &w[(c0 + c) * k..(c0 + c + 1) * k];
            for (p, pair) in row.chunks_exact(2).enumerate() {
                panel[p * Self::PANEL + c] = u32::from(pair[0].to_bits()) | (u32::from(pair[1].to_bits()) << 16);
            }
        }
    }

    #[inline(always)]
    unsafe fn tile<const R: usize>(&self, panel: &[u32], out: TileOut) {
        let tile = Tile { panel: panel.as_ptr(), x: self.x[out.row0 * self.k..].as_ptr() as *const u32, pairs: self.k / 2, out };
        // SAFETY: forwarded from the caller: the CPU has AVX-512 BF16, the panel holds
        // `k / 2 * 32` words, x rows row0..row0 + R hold `k` elements, and the tile is the
        // caller's to write.
        unsafe { tile.kernel::<R>() }
    }
}

/// One tile's operands: up to 12 activation rows against a packed 32-column panel.
struct Tile {
    panel: *const u32,
    /// First activation row, read as bf16 pairs.
    x: *const u32,
    pairs: usize,
    out: TileOut,
}

impl Tile {
    /// Off x86_64, where `available()` is false and nothing calls it.
    ///
    /// # Safety
    /// Never to be called.
    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn kernel<const R: usize>(&self) {
        unreachable!("available() is false off x86_64")
    }

    /// # Safety
    /// As for [`PanelKernel::tile`], for the `R` rows the tile's pointers address.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn kernel<const R: usize>(&self) {
        use std::arch::x86_64::{
            __m512bh, __m512i, _mm512_dpbf16_ps, _mm512_loadu_si512, _mm512_mask_storeu_ps, _mm512_set1_epi32, _mm512_setzero_ps,
        };
        const PANEL: usize = Bf16Panels::PANEL;
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let row_words = self.pairs;
        for p in 0..self.pairs {
            // SAFETY: p < pairs; the panel has 32 words per pair and each x row `pairs` words.
            unsafe {
                let b0 = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(self.panel.add(p * PANEL) as *const __m512i));
                let b1 = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(self.panel.add(p * PANEL + 16) as *const __m512i));
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    // A view's bf16 data need not be 4-byte aligned: read the pair unaligned.
                    let pair = self.x.add(r * row_words + p).read_unaligned();
                    let a = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair as i32));
                    acc_r[0] = _mm512_dpbf16_ps(acc_r[0], a, b0);
                    acc_r[1] = _mm512_dpbf16_ps(acc_r[1], a, b1);
                }
            }
        }
        let (lo, hi) = (mask16(self.out.cols), mask16(self.out.cols.saturating_sub(16)));
        for (r, acc_r) in acc.iter().enumerate() {
            // SAFETY: row row0 + r < m and columns col0.. below the masks are within row length n.
            unsafe {
                let dst = self.out.row(r);
                _mm512_mask_storeu_ps(dst, lo, acc_r[0]);
                _mm512_mask_storeu_ps(dst.add(16), hi, acc_r[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(len: usize, salt: usize) -> Vec<f32> {
        (0..len).map(|i| (((i + salt) * 37 % 101) as f32 - 50.0) / 32.0).collect()
    }

    /// Inputs exactly representable in bf16, so the reference products are the kernel's.
    fn bf16_tensor(len: usize, shape: (usize, usize), salt: usize) -> Tensor {
        Tensor::from_vec(values(len, salt), shape, &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap()
    }

    fn check(rows: usize, out: usize, inner: usize) {
        let x = bf16_tensor(rows * inner, (rows, inner), 3);
        let w = bf16_tensor(out * inner, (out, inner), 11);
        let Some(got) = matmul_t(&x, &w, None, MAX_ROWS).unwrap() else {
            assert!(!available() || (rows > MAX_ROWS && inner % 2 == 1), "declined {rows}x{inner} · {out}");
            if !available() {
                crate::kernels::kernel_paths::not_exercised("gemm/bf16 avx512bf16");
            }
            return;
        };
        assert_eq!(got.dims(), &[rows, out]);
        let got = got.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        let (x32, w32) = (x.to_dtype(DType::F32).unwrap(), w.to_dtype(DType::F32).unwrap());
        let want = x32.matmul(&w32.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        for (r, (gr, wr)) in got.iter().zip(&want).enumerate() {
            for (c, (g, e)) in gr.iter().zip(wr).enumerate() {
                // The result is rounded to bf16 (8 significant bits).
                assert!((g - e).abs() <= e.abs() / 128.0 + 1e-3, "{rows}x{inner}·{out} at [{r}, {c}]: {g} vs {e}");
            }
        }
    }

    #[test]
    fn few_rows_match_the_widened_product_for_every_tail() {
        for rows in [1usize, 2, 3, 4, 5, 8, MAX_ROWS] {
            for (out, inner) in [(1usize, 1usize), (3, 31), (7, 32), (65, 33), (130, 576), (5, 100)] {
                check(rows, out, inner);
            }
        }
    }

    #[test]
    fn gemm_matches_the_widened_product_for_every_tail() {
        for rows in [MAX_ROWS + 1, 24, 37] {
            for (out, inner) in [(1usize, 2usize), (31, 64), (32, 576), (33, 30), (100, 1536), (9, 7)] {
                check(rows, out, inner);
            }
        }
    }

    /// A view that starts one element into its storage: its bf16 pairs are not 4-byte aligned.
    #[test]
    fn gemm_reads_views_at_odd_offsets() {
        let (rows, out, inner) = (MAX_ROWS + 3, 20, 64);
        let flat = bf16_tensor(1 + rows * inner, (1, 1 + rows * inner), 3).flatten_all().unwrap();
        let x = flat.narrow(0, 1, rows * inner).unwrap().reshape((rows, inner)).unwrap();
        let w = bf16_tensor(out * inner, (out, inner), 11);
        let Some(got) = matmul_t(&x, &w, None, MAX_ROWS).unwrap() else {
            assert!(!available());
            crate::kernels::kernel_paths::not_exercised("gemm/bf16 avx512bf16");
            return;
        };
        let want = x.to_dtype(DType::F32).unwrap().matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
        let diff = (got.to_dtype(DType::F32).unwrap() - &want).unwrap().abs().unwrap();
        let bound = (want.abs().unwrap() / 128.0).unwrap().affine(1.0, 1e-3).unwrap();
        let beyond = diff.ge(&bound).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(beyond, 0.0, "elements beyond bf16 rounding of the widened product");
    }

    #[test]
    fn declines_other_dtypes() {
        let x = Tensor::zeros((2, 8), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((4, 8), DType::BF16, &Device::Cpu).unwrap();
        assert!(matmul_t(&x, &w, None, MAX_ROWS).unwrap().is_none());
        assert!(matmul_t(&w, &w.to_dtype(DType::F32).unwrap(), None, MAX_ROWS).unwrap().is_none());
    }
}
