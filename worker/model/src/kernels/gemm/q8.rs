//! Matrix–matrix products against q8_0 weights for prefill (more than `MAX_ROWS` activation
//! rows), on CPUs with AVX-512 VNNI.
//!
//! Before this, prefill dequantized the whole weight matrix to f32 on every call and ran f32
//! GEMM: four bytes of weight per element written and read again, and 16 multiply-adds per
//! instruction. Here, as in decode (`qmatvec.rs`) and llama.cpp, each activation row is
//! quantized to 8 bits per 32-block, and a block's dot products are integer: `vpdpbusd`
//! multiplies 64 byte pairs and sums them into 16 i32 lanes in one instruction, four times the
//! f32 FMA's work. The result is the decode kernel's arithmetic — per block, weight scale ×
//! activation scale × exact integer dot product — so prefill and decode agree.
//!
//! `vpdpbusd` multiplies *unsigned* by signed bytes. The weights are packed as `w + 128` (all in
//! 1..=255) against the signed activations, and the surplus `128 · Σ q` of each activation block
//! is taken back out by starting the block's accumulator at its negation (exact: at most
//! 32 · 255 · 127 in magnitude).

use candle_core::{CpuStorage, DType, Storage, Tensor};
use half::f16;
use rayon::prelude::*;

use super::{mask16, sweep, PanelKernel, TileOut};
use crate::kernels::qmatvec::{quantize_block, BLOCK, BLOCK_BYTES};

/// Groups of four consecutive `k` per block: the four byte pairs one `vpdpbusd` lane sums.
const GROUPS: usize = BLOCK / 4;
/// Output columns per panel, the unit of parallel work: the i32 / f32 lanes of one zmm register.
const PANEL: usize = 16;
/// 64-byte lines per packed block of a panel: one per group of four `k`, then one of the
/// sixteen columns' f32 scales.
const LINES_PER_BLOCK: usize = GROUPS + 1;

/// One cache line of a packed panel, one 32-bit word per column: four weight bytes or an f32
/// scale. The alignment lets every vector load be aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; PANEL]);

/// Whether this CPU runs the kernels here.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x Wᵀ` for `x` `[rows > row_kernel_rows, in]` on the CPU and q8_0 `blocks` holding `W`
/// `[out, in]` row by row; returns f32 `[rows, out]`. `None` when the CPU lacks AVX-512 VNNI or the operands
/// do not fit (the caller then takes the f32 GEMM path).
pub fn q8_0_gemm_t(x: &Tensor, blocks: &[u8], out: usize, inner: usize, row_kernel_rows: usize) -> candle_core::Result<Option<Tensor>> {
    let rows = match x.dims() {
        [r, i] if *i == inner => *r,
        _ => return Ok(None),
    };
    if rows == 0
        || rows <= row_kernel_rows
        || out == 0
        || inner == 0
        || !inner.is_multiple_of(BLOCK)
        || !x.device().is_cpu()
        || !available()
    {
        return Ok(None);
    }
    if blocks.len() != out * (inner / BLOCK * BLOCK_BYTES) {
        return Ok(None);
    }
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let (x_store, x_layout) = x32.storage_and_layout();
    let (Storage::Cpu(CpuStorage::F32(x_all)), Some((x0, x1))) = (&*x_store, x_layout.contiguous_offsets()) else {
        return Ok(None);
    };
    let xq = quantize_rows(&x_all[x0..x1], inner);
    drop(x_store);
    // SAFETY: `available()` was checked above; `xq` holds `rows` quantized rows of `inner` and
    // `blocks` the `out` rows of `W` (length checked above).
    let y = unsafe { sweep(&Q8Panels { xq: &xq, w: blocks, k: inner }, rows, out) };
    Ok(Some(Tensor::from_vec(y, (rows, out), x.device())?))
}

/// Activation rows quantized per 32-block: `q` the signed bytes (`[rows, in]`), and per block
/// (`[rows, in / 32]`) the f32 scale `d` and the offset `off = -128 · Σ q` that cancels the
/// weights' unsigned bias (see `Q8Panels::pack`).
struct Activations {
    q: Vec<i8>,
    d: Vec<f32>,
    off: Vec<i32>,
}

/// Quantizes every row of `x` (`[_, inner]`) in parallel, with the same values as `qmatvec.rs`
/// (llama.cpp's `quantize_row_q8_0` with an f32 scale): per block, scale = max |x| / 127 and
/// q = round(x / scale), rounding halves away from zero. It runs over every activation of every
/// prefill projection, so it is vectorised ([`quantize_avx512`]; `f32::round` is a libm call
/// per element) and split over the thread pool.
fn quantize_rows(x: &[f32], inner: usize) -> Activations {
    let per_row = inner / BLOCK;
    let mut q = vec![0i8; x.len()];
    let mut d = vec![0f32; x.len() / BLOCK];
    let mut off = vec![0i32; x.len() / BLOCK];
    // Rows per task: enough elements to amortise the scheduling.
    let chunk_rows = (16384 / inner).max(1);
    q.par_chunks_mut(chunk_rows * inner)
        .zip(d.par_chunks_mut(chunk_rows * per_row))
        .zip(off.par_chunks_mut(chunk_rows * per_row))
        .zip(x.par_chunks(chunk_rows * inner))
        .for_each(|(((qs, ds), offs), xs)| {
            #[cfg(target_arch = "x86_64")]
            if available() {
                // SAFETY: `available()` says the CPU has AVX-512F and BW; the slices are whole
                // blocks (`inner` is a multiple of 32), `ds` and `offs` one entry per block.
                unsafe { quantize_avx512(xs, qs, ds, offs) };
                return;
            }
            quantize_portable(xs, qs, ds, offs);
        });
    Activations { q, d, off }
}

/// The scalar quantization of `qmatvec.rs`, plus each block's offset.
fn quantize_portable(x: &[f32], q: &mut [i8], d: &mut [f32], off: &mut [i32]) {
    for (((xb, qb), db), ob) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(d.iter_mut()).zip(off.iter_mut()) {
        *db = quantize_block(xb, qb);
        *ob = -128 * qb.iter().map(|&v| i32::from(v)).sum::<i32>();
    }
}

/// [`quantize_portable`] sixteen values at a time, bit for bit: the same scale and reciprocal,
/// the same product, and round-half-away-from-zero built from truncation (`roundscale` only
/// offers ties-to-even).
///
/// # Safety
/// The CPU must have AVX-512F and BW. (Only whole blocks are read and written, one scale and
/// offset each.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_avx512(x: &[f32], q: &mut [i8], d: &mut [f32], off: &mut [i32]) {
    use std::arch::x86_64::*;
    let half = _mm512_set1_ps(0.5);
    let one = _mm512_castps_si512(_mm512_set1_ps(1.0));
    let sign_bit = _mm512_set1_epi32(i32::MIN);
    for (((xb, qb), db), ob) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(d.iter_mut()).zip(off.iter_mut()) {
        // SAFETY: each block holds 32 floats; unaligned loads.
        let v = unsafe { [_mm512_loadu_ps(xb.as_ptr()), _mm512_loadu_ps(xb.as_ptr().add(16))] };
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
        let scale = amax / 127.0;
        let inv = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        let mut sum = _mm512_setzero_si512();
        for (h, &vh) in v.iter().enumerate() {
            let s = _mm512_mul_ps(vh, inv);
            let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(s);
            // |s - t| is exact; a fraction of at least one half rounds away from zero.
            let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(s, t)), half);
            // ±1 with s's sign (integer bit operations: AVX-512F has no float `and`).
            let unit = _mm512_castsi512_ps(_mm512_or_si512(one, _mm512_and_si512(_mm512_castps_si512(s), sign_bit)));
            let r = _mm512_cvttps_epi32(_mm512_mask_add_ps(t, away, t, unit));
            sum = _mm512_add_epi32(sum, r);
            // SAFETY: the block has 32 bytes; `vpmovdb` keeps the low byte of each lane, which
            // is the value for -127..=127.
            unsafe { _mm_storeu_si128(qb.as_mut_ptr().add(h * 16) as *mut __m128i, _mm512_cvtepi32_epi8(r)) };
        }
        *db = scale;
        *ob = -128 * _mm512_reduce_add_epi32(sum);
    }
}

/// `y = x Wᵀ` for quantized activations `xq` (`[m, k]`) and q8_0 `w` (`[n, k]`) on the shared
/// panel sweep (`gemm/mod.rs`). Each task packs one panel of 16 weight rows
/// ([`PanelKernel::pack`]), then sweeps every tile of `TILE_ROWS` activation rows across it: the
/// panel (k bytes + scales, ≤ 32 KB for SmolLM's k = 1536) stays in L1, the activations stream
/// from L2.
struct Q8Panels<'a> {
    xq: &'a Activations,
    /// The weights' q8_0 blocks, row by row.
    w: &'a [u8],
    k: usize,
}

impl PanelKernel for Q8Panels<'_> {
    type Packed = Line;
    /// The i32 / f32 lanes of one zmm register.
    const PANEL: usize = PANEL;
    /// Each row keeps an i32 accumulator for the current block and an f32 one for the sum over
    /// blocks: 16 registers, with room to spare in the 32 for the weights, scales and
    /// temporaries. Measured on the 512-row SmolLM shapes (2 threads, Zen 4): 8 rows
    /// ≈ 300 Gmac/s, 10 or 12 rows ≈ 260 (the compiler starts keeping accumulators on the
    /// stack); 32-column panels with 4–6 rows were no faster than 16 × 8.
    const TILE_ROWS: usize = 8;

    /// Packs weight rows `c0..c0 + cols` of `w` into `panel`, block by block: for each group `g`
    /// of four `k`, one line holds column `c`'s bytes `4g..4g + 4` at `4c` — the 16 lanes of a
    /// `vpdpbusd` operand — then one line holds the columns' f32 scales.
    /// `vpdpbusd` takes unsigned bytes on this side, so the weights are stored as `w + 128`, and
    /// the activations' offset `-128 · Σ q` takes the surplus back out. (The other way round, the
    /// activations would have to be the register operand and could not be broadcast from memory
    /// inside the instruction.) Columns past `cols` are zero.
    fn pack(&self, c0: usize, cols: usize, panel: &mut Vec<Line>) {
        let (w, k) = (self.w, self.k);
        let blocks = k / BLOCK;
        let row_bytes = blocks * BLOCK_BYTES;
        // Every word of columns below `cols` is written below; only a short panel's other columns
        // need zeroing (the buffer is reused from the previous panel).
        if cols < PANEL {
            panel.clear();
        }
        panel.resize(blocks * LINES_PER_BLOCK, Line([0; PANEL]));
        for c in 0..cols {
            let row = &w[(c0 + c) * row_bytes..(c0 + c + 1) * row_bytes];
            for (b, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
                let lines = &mut panel[b * LINES_PER_BLOCK..(b + 1) * LINES_PER_BLOCK];
                for (g, quad) in block[2..].chunks_exact(4).enumerate() {
                    // Flipping each byte's top bit adds 128 to a two's-complement byte and reads it
                    // as unsigned. Whole words rather than bytes: byte by byte, packing took ≈ 8% of
                    // the 512-row GEMM's time in perf, words half that.
                    lines[g].0[c] = u32::from_le_bytes([quad[0], quad[1], quad[2], quad[3]]) ^ 0x8080_8080;
                }
                let scale = f16::from_le_bytes([block[0], block[1]]).to_f32();
                lines[GROUPS].0[c] = scale.to_bits();
            }
        }
    }

    #[inline(always)]
    unsafe fn tile<const R: usize>(&self, panel: &[Line], out: TileOut) {
        let (k, blocks) = (self.k, self.k / BLOCK);
        let tile = Tile {
            panel: panel.as_ptr(),
            blocks,
            x: self.xq.q[out.row0 * k..].as_ptr(),
            x_stride: k,
            dx: self.xq.d[out.row0 * blocks..].as_ptr(),
            off: self.xq.off[out.row0 * blocks..].as_ptr(),
            out,
        };
        // SAFETY: forwarded from the caller: the CPU has AVX-512 VNNI, the panel holds every
        // block of `k`, activation rows row0..row0 + R hold `k` bytes and `k / 32` scales and
        // offsets each, and the tile is the caller's to write.
        unsafe { tile.kernel::<R>() }
    }
}

/// One tile's operands: a few activation rows against a packed panel. The kernel reads them
/// from memory, as separate values: computed in one place from `k`, the compiler would relate
/// the strides and keep more row pointers live than there are registers.
struct Tile {
    panel: *const Line,
    blocks: usize,
    /// First activation row's quantized bytes, and its block scales and offsets.
    x: *const i8,
    x_stride: usize,
    dx: *const f32,
    off: *const i32,
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

    /// Per block: each row's i32 accumulators start at its offset `-128 · Σ q`; for each group
    /// of four `k`, the group's line (unsigned weights) is `vpdpbusd`-ed with four bytes of
    /// each row, broadcast by the instruction itself; then each row's block sums are widened to
    /// f32 and added times (weight scales × the row's block scale).
    ///
    /// # Safety
    /// As for [`PanelKernel::tile`], for the `R` rows the tile's pointers address.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn kernel<const R: usize>(&self) {
        use std::arch::x86_64::*;
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..self.blocks {
            // SAFETY: b < blocks; the panel has LINES_PER_BLOCK aligned lines per block, and
            // each of the R activation rows has `blocks` scales and offsets and 32 bytes per
            // block (read as unaligned 4-byte groups).
            unsafe {
                let lines = self.panel.add(b * LINES_PER_BLOCK);
                let mut int = [_mm512_setzero_si512(); R];
                for (r, int_r) in int.iter_mut().enumerate() {
                    *int_r = _mm512_set1_epi32(*self.off.add(r * self.blocks + b));
                }
                let xb = self.x.add(b * BLOCK);
                for g in 0..GROUPS {
                    let wv = _mm512_load_si512(lines.add(g) as *const __m512i);
                    for (r, int_r) in int.iter_mut().enumerate() {
                        let quad = (xb.add(r * self.x_stride + g * 4) as *const i32).read_unaligned();
                        *int_r = _mm512_dpbusd_epi32(*int_r, wv, _mm512_set1_epi32(quad));
                    }
                }
                let dw = _mm512_load_ps(lines.add(GROUPS) as *const f32);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let d = _mm512_mul_ps(dw, _mm512_set1_ps(*self.dx.add(r * self.blocks + b)));
                    *acc_r = _mm512_fmadd_ps(_mm512_cvtepi32_ps(int[r]), d, *acc_r);
                }
            }
        }
        let mask = mask16(self.out.cols);
        for (r, acc_r) in acc.iter().enumerate() {
            // SAFETY: row row0 + r < m, and the mask keeps the columns below col0 + cols ≤ n.
            unsafe { _mm512_mask_storeu_ps(self.out.row(r), mask, *acc_r) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matvec::MAX_ROWS;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::Device;

    fn values(len: usize, salt: usize) -> Vec<f32> {
        (0..len).map(|i| (((i + salt) * 37 % 101) as f32 - 50.0) / 32.0 * (1.0 + (i % 7) as f32 / 3.0)).collect()
    }

    /// The quantized arithmetic spelled out: per block, weight scale × activation scale × the
    /// integer dot product of the signed bytes, summed over blocks in order.
    fn reference(xq: &Activations, rows: usize, w: &[u8], out: usize, inner: usize) -> Vec<Vec<f32>> {
        let blocks = inner / BLOCK;
        (0..rows)
            .map(|r| {
                (0..out)
                    .map(|o| {
                        let mut sum = 0f32;
                        for b in 0..blocks {
                            let block = &w[(o * blocks + b) * BLOCK_BYTES..(o * blocks + b + 1) * BLOCK_BYTES];
                            let xs = &xq.q[r * inner + b * BLOCK..r * inner + (b + 1) * BLOCK];
                            let int: i32 = block[2..].iter().zip(xs).map(|(&wi, &xi)| i32::from(wi as i8) * i32::from(xi)).sum();
                            sum += f16::from_le_bytes([block[0], block[1]]).to_f32() * xq.d[r * blocks + b] * int as f32;
                        }
                        sum
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn this_cpu_runs_the_vnni_kernel() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512vnni") {
            assert!(available(), "the CPU has AVX-512 VNNI but the kernel is not selected");
            return;
        }
        crate::kernels::kernel_paths::not_exercised("gemm/q8 avx512vnni");
    }

    /// Every tail: rows not a multiple of the tile, columns not a multiple of the panel, one to
    /// eighteen blocks. Equal to the scalar reference up to f32 summation order, and to f32 GEMM
    /// on the dequantized weights up to the activations' 8-bit rounding.
    #[test]
    fn matches_the_quantized_reference_and_the_dequantized_gemm() {
        if !available() {
            crate::kernels::kernel_paths::not_exercised("gemm/q8 avx512vnni");
            return;
        }
        let dev = Device::Cpu;
        for inner in [32usize, 96, 576] {
            for out in [16usize, 17, 40, 130] {
                let w = Tensor::from_vec(values(out * inner, 11), (out, inner), &dev).unwrap();
                let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
                let deq = q.dequantize(&dev).unwrap();
                let data = q.data().unwrap();
                for rows in [17usize, 33, 100] {
                    let xs = values(rows * inner, 3);
                    let x = Tensor::from_vec(xs.clone(), (rows, inner), &dev).unwrap();
                    let got = q8_0_gemm_t(&x, &data, out, inner, MAX_ROWS).unwrap().expect("the VNNI path runs");
                    assert_eq!(got.dims(), &[rows, out]);
                    let got = got.to_vec2::<f32>().unwrap();
                    let want = reference(&quantize_rows(&xs, inner), rows, &data, out, inner);
                    let gemm = x.matmul(&deq.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
                    for (r, ((gr, wr), fr)) in got.iter().zip(&want).zip(&gemm).enumerate() {
                        let scale = wr.iter().fold(0f32, |m, v| m.max(v.abs()));
                        let f_scale = fr.iter().fold(0f32, |m, v| m.max(v.abs()));
                        for (c, ((g, e), f)) in gr.iter().zip(wr).zip(fr).enumerate() {
                            let at = format!("{rows}x{inner}·{out} at [{r}, {c}]");
                            assert!((g - e).abs() <= 1e-5 * scale, "{at}: {g} vs reference {e}");
                            assert!((g - f).abs() <= 0.01 * f_scale, "{at}: {g} vs f32 GEMM {f}");
                        }
                    }
                }
            }
        }
    }

    /// The vector quantization equals the scalar one bit for bit, halves and zero blocks included.
    #[test]
    fn vector_quantization_equals_the_scalar_one() {
        if !available() {
            crate::kernels::kernel_paths::not_exercised("gemm/q8 avx512vnni");
            return;
        }
        // Block 0: exact halves after scaling (max 127 → scale 1); block 1: zeros; then varied.
        let mut x: Vec<f32> = (0..32).map(|i| if i == 0 { 127.0 } else { (i as f32 - 16.0) + 0.5 }).collect();
        x.extend([0f32; 32]);
        x.extend(values(32 * 30, 5));
        let (mut q0, mut d0, mut off0) = (vec![0i8; x.len()], vec![0f32; x.len() / BLOCK], vec![0i32; x.len() / BLOCK]);
        quantize_portable(&x, &mut q0, &mut d0, &mut off0);
        let got = quantize_rows(&x, 64);
        assert_eq!(got.d, d0);
        assert_eq!(got.q, q0);
        assert_eq!(got.off, off0);
        assert_eq!(q0[1], -15, "-14.5 rounds away from zero");
        assert_eq!(q0[17], 2, "1.5 rounds away from zero");
        assert_eq!(off0[1], 0, "a zero block");
    }

    #[test]
    fn declines_what_it_cannot_do() {
        let dev = Device::Cpu;
        let data = vec![0u8; 4 * 34];
        let x = |r: usize, i: usize| Tensor::zeros((r, i), DType::F32, &dev).unwrap();
        assert!(q8_0_gemm_t(&x(MAX_ROWS, 32), &data, 4, 32, MAX_ROWS).unwrap().is_none(), "decode-sized");
        assert!(q8_0_gemm_t(&x(MAX_ROWS + 1, 64), &data, 4, 32, MAX_ROWS).unwrap().is_none(), "inner mismatch");
        assert!(q8_0_gemm_t(&x(MAX_ROWS + 1, 32), &data[..34], 4, 32, MAX_ROWS).unwrap().is_none(), "short data");
    }
}
