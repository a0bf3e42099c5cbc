//! Matrix–vector products against q8_0 weights for decode (≤ 16 activation rows).
//!
//! candle's quantized kernels run on their own spinning thread pool; on a small, shared CPU the
//! spinning workers and ours take turns with the scheduler and a 0.5 MB product takes
//! milliseconds (measured in BENCHMARKS.md). This is `matvec.rs` for q8_0 blocks: weight rows
//! split over the rayon pool, each row read once and used for every activation row while it is
//! in L1. As in llama.cpp, each activation row is first quantized to 8 bits per 32-block (f32
//! scale), so a block's dot product is integer multiply-adds (AVX2 `maddubs`), three times fewer
//! instructions than widening the weights to f32 — widening made the kernel compute-bound at a
//! third of the memory bandwidth.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::matvec::MAX_ROWS;

/// Weights per q8_0 block, and the block's bytes: an f16 scale, then 32 signed bytes.
const BLOCK: usize = 32;
const BLOCK_BYTES: usize = 34;

/// Output rows per parallel task (as `matvec.rs`).
const ROWS_PER_TASK: usize = 64;

/// Activation rows quantized per 32-block: `q` the 8-bit values, `d` one scale per block.
struct QuantizedRows {
    q: Vec<i8>,
    d: Vec<f32>,
}

/// Symmetric 8-bit quantization of each 32-block of `x` (scale = max |x| / 127), as llama.cpp's
/// `quantize_row_q8_0`, but with an f32 scale.
fn quantize_rows(x: &[f32]) -> QuantizedRows {
    let mut q = vec![0i8; x.len()];
    let mut d = Vec::with_capacity(x.len() / BLOCK);
    for (xb, qb) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (v, o) in xb.iter().zip(qb.iter_mut()) {
            *o = (v * inv).round() as i8;
        }
        d.push(scale);
    }
    QuantizedRows { q, d }
}

/// `x Wᵀ` for `x` `[rows ≤ MAX_ROWS, in]` on the CPU and q8_0 `blocks` holding `W` `[out, in]`
/// row by row; returns f32 `[rows, out]`. `None` when the fast path does not apply.
pub fn q8_0_matvec_t(x: &Tensor, blocks: &[u8], out: usize, inner: usize) -> candle_core::Result<Option<Tensor>> {
    let rows = match x.dims() {
        [r, i] if *i == inner => *r,
        _ => return Ok(None),
    };
    if rows == 0 || rows > MAX_ROWS || !x.device().is_cpu() || !inner.is_multiple_of(BLOCK) {
        return Ok(None);
    }
    let row_bytes = inner / BLOCK * BLOCK_BYTES;
    if blocks.len() != out * row_bytes {
        return Ok(None);
    }
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let (x_store, x_layout) = x32.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(x_all)), Some((x0, x1))) = (&*x_store, x_layout.contiguous_offsets()) else {
        return Ok(None);
    };
    let xq = quantize_rows(&x_all[x0..x1]);
    drop(x_store);
    let dot = kernel();
    let mut y = vec![0f32; out * rows];
    y.par_chunks_mut(ROWS_PER_TASK * rows).enumerate().for_each(|(task, ys)| {
        let first = task * ROWS_PER_TASK;
        for (j, yr) in ys.chunks_mut(rows).enumerate() {
            dot(&blocks[(first + j) * row_bytes..(first + j + 1) * row_bytes], &xq, yr);
        }
    });
    Ok(Some(crate::matvec::from_out_major(y, out, rows, x.device())?))
}

/// One weight row against every quantized activation row: `y[i] = dot(row, x[i])`.
type Dot = fn(&[u8], &QuantizedRows, &mut [f32]);

/// Picks the best dot product this CPU supports, once per call rather than once per row.
fn kernel() -> Dot {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        return dot_avx2_entry;
    }
    dot_rows_portable
}

fn dot_rows_portable(row: &[u8], xq: &QuantizedRows, y: &mut [f32]) {
    let (inner, per_row) = (xq.q.len() / y.len(), xq.d.len() / y.len());
    for (i, yi) in y.iter_mut().enumerate() {
        *yi = dot_portable(row, &xq.q[i * inner..(i + 1) * inner], &xq.d[i * per_row..(i + 1) * per_row]);
    }
}

fn scale(block: &[u8]) -> f32 {
    f16::from_le_bytes([block[0], block[1]]).to_f32()
}

/// One q8_0 weight row against a quantized activation row: per block, the two scales times the
/// block's integer dot product (exact in i32: 32 × 127 × 127 < 2³¹).
fn dot_portable(row: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
    let mut sum = 0f32;
    for ((block, xb), dx) in row.chunks_exact(BLOCK_BYTES).zip(xq.chunks_exact(BLOCK)).zip(xd) {
        let int: i32 = block[2..].iter().zip(xb).map(|(&w, &v)| i32::from(w as i8) * i32::from(v)).sum();
        sum += scale(block) * dx * int as f32;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2_entry(row: &[u8], xq: &QuantizedRows, y: &mut [f32]) {
    let (inner, per_row) = (xq.q.len() / y.len(), xq.d.len() / y.len());
    let x = |i: usize| (&xq.q[i * inner..(i + 1) * inner], &xq.d[i * per_row..(i + 1) * per_row]);
    // Four activation rows at a time share each weight block's load and sign work.
    let mut i = 0;
    while i < y.len() {
        let n = (y.len() - i).min(4);
        // SAFETY: only selected by `kernel` after checking that the CPU has AVX2, FMA and F16C.
        unsafe {
            match n {
                4 => y[i..i + 4].copy_from_slice(&dot_avx2::<4>(row, [x(i), x(i + 1), x(i + 2), x(i + 3)])),
                3 => y[i..i + 3].copy_from_slice(&dot_avx2::<3>(row, [x(i), x(i + 1), x(i + 2)])),
                2 => y[i..i + 2].copy_from_slice(&dot_avx2::<2>(row, [x(i), x(i + 1)])),
                _ => y[i] = dot_avx2::<1>(row, [x(i)])[0],
            }
        }
        i += n;
    }
}

/// llama.cpp's `mul_sum_i8_pairs_float` for `N` activation rows at once: `maddubs` multiplies
/// unsigned by signed bytes, so the weights' signs are moved onto the activations first; pairs
/// of products (at most 2 × 128 × 127) fit the i16 it sums them into. The f16 block scale is
/// widened with F16C: a software conversion per 32 weights cost more than the block's integer
/// dot product.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2<const N: usize>(row: &[u8], x: [(&[i8], &[f32]); N]) -> [f32; N] {
    use std::arch::x86_64::*;
    let blocks = x.iter().fold(row.len() / BLOCK_BYTES, |m, (q, d)| m.min(q.len() / BLOCK).min(d.len()));
    let ones = _mm256_set1_epi16(1);
    // Two running sums per row over alternate blocks hide the FMA latency between blocks.
    let mut total = [[_mm256_setzero_ps(); 2]; N];
    for b in 0..blocks {
        let block = &row[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES];
        // SAFETY: the block holds 32 weight bytes after its 2-byte scale; unaligned load.
        let w = unsafe { _mm256_loadu_si256(block.as_ptr().add(2) as *const __m256i) };
        let w_abs = _mm256_sign_epi8(w, w);
        let bits = i32::from(u16::from_le_bytes([block[0], block[1]]));
        let w_scale = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
        for (r, (xq, xd)) in x.iter().enumerate() {
            // SAFETY: xq holds 32 bytes at b * 32 (b < blocks); unaligned load.
            let xv = unsafe { _mm256_loadu_si256(xq.as_ptr().add(b * BLOCK) as *const __m256i) };
            let products = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(xv, w));
            let int = _mm256_cvtepi32_ps(_mm256_madd_epi16(products, ones));
            let d = _mm256_set1_ps(w_scale * xd[b]);
            total[r][b % 2] = _mm256_fmadd_ps(d, int, total[r][b % 2]);
        }
    }
    let mut out = [0f32; N];
    for (o, t) in out.iter_mut().zip(&total) {
        *o = horizontal_sum(_mm256_add_ps(t[0], t[1]));
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn horizontal_sum(s: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let q = _mm_add_ps(_mm256_extractf128_ps(s, 1), _mm256_castps256_ps128(s));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Device;

    /// The fast path stays within activation-quantization error (8 bits per 32-block) of f32
    /// GEMM on the dequantized weights, for 1 to 16 rows (groups of four and every remainder), and the portable kernel equals
    /// the selected one up to float summation order.
    #[test]
    fn matches_gemm_on_dequantized_weights() {
        let dev = Device::Cpu;
        let (out, inner) = (130, 96);
        let w: Vec<f32> = (0..out * inner).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
        let w = Tensor::from_vec(w, (out, inner), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let deq = q.dequantize(&dev).unwrap();
        let data = q.data().unwrap();
        for rows in [1usize, 2, 3, 5, 8, MAX_ROWS] {
            let x: Vec<f32> = (0..rows * inner).map(|i| ((i * 13 % 17) as f32 - 8.0) / 8.0).collect();
            let x = Tensor::from_vec(x, (rows, inner), &dev).unwrap();
            let fast = q8_0_matvec_t(&x, &data, out, inner).unwrap().expect("fast path").to_vec2::<f32>().unwrap();
            let gemm = x.matmul(&deq.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
            for (r, (fr, gr)) in fast.iter().zip(&gemm).enumerate() {
                let xr = quantize_rows(&x.get(r).unwrap().to_vec1::<f32>().unwrap());
                let scale = gr.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (o, (a, b)) in fr.iter().zip(gr).enumerate() {
                    assert!((a - b).abs() <= 0.01 * scale, "rows {rows}: {a} vs {b}");
                    let portable = dot_portable(&data[o * 102..(o + 1) * 102], &xr.q, &xr.d);
                    assert!((a - portable).abs() <= 1e-5 * portable.abs().max(1.0), "portable: {a} vs {portable}");
                }
            }
        }
    }

    #[test]
    fn declines_what_it_cannot_do() {
        let dev = Device::Cpu;
        let data = vec![0u8; 4 * 34];
        let x = |r: usize, i: usize| Tensor::zeros((r, i), DType::F32, &dev).unwrap();
        assert!(q8_0_matvec_t(&x(MAX_ROWS + 1, 32), &data, 4, 32).unwrap().is_none(), "too many rows");
        assert!(q8_0_matvec_t(&x(1, 64), &data, 4, 32).unwrap().is_none(), "inner mismatch");
        assert!(q8_0_matvec_t(&x(1, 32), &data[..34], 4, 32).unwrap().is_none(), "short data");
    }
}
