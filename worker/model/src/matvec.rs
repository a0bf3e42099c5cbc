//! Matrix–vector products for decode (one token per sequence, a few sequences per step).
//!
//! Decode multiplies one activation row by every weight matrix: it is bound by how fast the
//! weights stream from memory. candle's general GEMM spends much of that time packing and
//! scheduling (measured in BENCHMARKS.md); a plain row-parallel dot product reads each weight
//! once, in order, on every core. Each output element is one dot product computed by one thread
//! in a fixed order, so results do not depend on the thread count.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use rayon::prelude::*;

/// Output rows per parallel task: large enough to amortise scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 64;

/// Most activation rows handled by the matrix-vector path (a decode batch); larger inputs are
/// matrix-matrix products, where GEMM wins.
pub const MAX_ROWS: usize = 16;

/// `x Wᵀ` for a few rows `x` (`[rows ≤ MAX_ROWS, in]`) and contiguous f32 or bf16 `W`
/// (`[out, in]`) on the CPU, accumulating in f32 and returning `x`'s dtype. Each weight row is
/// read from memory once and used for every activation row while it sits in L1. `None` when the
/// fast path does not apply, so the caller falls back to GEMM. bf16 weights are widened inside the dot product, so they
/// stream from memory at half the bytes of f32.
pub fn matvec_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (rows, inner) = match x.dims() {
        [r, i] => (*r, *i),
        _ => return Ok(None),
    };
    let (out, w_inner) = match w.dims() {
        [o, i] => (*o, *i),
        _ => return Ok(None),
    };
    if rows == 0 || rows > MAX_ROWS || inner != w_inner || !x.device().is_cpu() || !matches!(w.dtype(), DType::F32 | DType::BF16) {
        return Ok(None);
    }
    // f32 activations are read in place; only other dtypes are widened into a new tensor.
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let (x_store, x_layout) = x32.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(x_all)), Some((x0, x1))) = (&*x_store, x_layout.contiguous_offsets()) else {
        return Ok(None);
    };
    let x_data = &x_all[x0..x1];
    let (w_store, w_layout) = w.storage_and_layout();
    let Some((w0, w1)) = w_layout.contiguous_offsets() else { return Ok(None) };
    let y = match &*w_store {
        Storage::Cpu(CpuStorage::F32(all)) => rows_parallel(rows, out, inner, &all[w0..w1], x_data, f32_kernel()),
        Storage::Cpu(CpuStorage::BF16(all)) => rows_parallel(rows, out, inner, &all[w0..w1], x_data, bf16_kernel()),
        _ => return Ok(None),
    };
    drop((w_store, x_store));
    // The kernel writes [out, rows] so each task owns a contiguous block; transpose at the end
    // (a single row needs no transpose).
    let y = if rows == 1 {
        Tensor::from_vec(y, (1, out), x.device())?
    } else {
        Tensor::from_vec(y, (out, rows), x.device())?.t()?.contiguous()?
    };
    Ok(Some(y.to_dtype(x.dtype())?))
}

/// `y[r, i] = dot(W[r, :], x[i, :])` with weight rows split over the thread pool.
fn rows_parallel<W: Sync>(
    rows: usize,
    out: usize,
    inner: usize,
    w: &[W],
    x: &[f32],
    dot: fn(&[W], &[f32]) -> f32,
) -> Vec<f32> {
    let mut y = vec![0f32; out * rows];
    y.par_chunks_mut(ROWS_PER_TASK * rows).enumerate().for_each(|(task, ys)| {
        let first = task * ROWS_PER_TASK;
        for (j, yr) in ys.chunks_mut(rows).enumerate() {
            let w_row = &w[(first + j) * inner..(first + j + 1) * inner];
            for (i, yi) in yr.iter_mut().enumerate() {
                *yi = dot(w_row, &x[i * inner..(i + 1) * inner]);
            }
        }
    });
    y
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Picks the best f32 dot product this CPU supports, once per call rather than once per row.
fn f32_kernel() -> fn(&[f32], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        return dot_avx2_entry;
    }
    dot_portable
}

fn bf16_kernel() -> fn(&[half::bf16], &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        return dot_bf16_avx2_entry;
    }
    dot_bf16_portable
}

fn dot_bf16_portable(a: &[half::bf16], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (pa, pb) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += pa[k].to_f32() * pb[k];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (p, q) in ta.iter().zip(tb) {
        sum += p.to_f32() * q;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
fn dot_bf16_avx2_entry(a: &[half::bf16], b: &[f32]) -> f32 {
    // SAFETY: only selected by `bf16_kernel` after checking that the CPU has AVX2 and FMA.
    unsafe { dot_bf16_avx2(a, b) }
}

/// bf16 is the top half of an f32: widening is a zero-extend and a 16-bit shift.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_avx2(a: &[half::bf16], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr() as *const u16, b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, a_k) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8k + 8 <= n, within both slices; bf16 is a plain u16.
            let raw = unsafe { _mm_loadu_si128(pa.add(i + 8 * k) as *const __m128i) };
            let va = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
            let vb = unsafe { _mm256_loadu_ps(pb.add(i + 8 * k)) };
            *a_k = _mm256_fmadd_ps(va, vb, *a_k);
        }
        i += 32;
    }
    let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut sum = horizontal_sum(s);
    while i < n {
        // SAFETY: i < n.
        sum += unsafe { (*a.as_ptr().add(i)).to_f32() * *pb.add(i) };
        i += 1;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
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
            let vb = unsafe { _mm256_loadu_ps(pb.add(i + 8 * k)) };
            *a_k = _mm256_fmadd_ps(va, vb, *a_k);
        }
        i += 32;
    }
    while i + 8 <= n {
        // SAFETY: i + 8 <= n.
        let va = unsafe { _mm256_loadu_ps(pa.add(i)) };
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
            let fast = matvec_t(&x, &w).unwrap().expect("fast path applies").to_vec2::<f32>().unwrap();
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
            let fast = matvec_t(&x, &w).unwrap().expect("fast path").to_vec2::<f32>().unwrap();
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
    fn bf16_weights_match_widened_gemm() {
        for inner in [5usize, 32, 40, 576] {
            let out = 70;
            let w: Vec<f32> = (0..out * inner).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let x: Vec<f32> = (0..inner).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect();
            let dev = candle_core::Device::Cpu;
            let w = Tensor::from_vec(w, (out, inner), &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let x = Tensor::from_vec(x, (1, inner), &dev).unwrap();
            let fast = matvec_t(&x, &w).unwrap().expect("bf16 fast path").to_vec2::<f32>().unwrap();
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
        assert!(matvec_t(&Tensor::zeros((MAX_ROWS + 1, 8), DType::F32, &dev).unwrap(), &w).unwrap().is_none(), "too many rows");
        assert!(matvec_t(&Tensor::zeros((1, 8), DType::F32, &dev).unwrap(), &w.t().unwrap()).unwrap().is_none(), "shape");
        let half = w.to_dtype(DType::F16).unwrap();
        assert!(matvec_t(&Tensor::zeros((1, 8), DType::F16, &dev).unwrap(), &half).unwrap().is_none(), "f16 weights");
    }
}
