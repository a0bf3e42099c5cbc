//! Matrix–vector products against q8_0 weights for decode (≤ 16 activation rows).
//!
//! candle's quantized kernels run on their own spinning thread pool; on a small, shared CPU the
//! spinning workers and ours take turns with the scheduler and a 0.5 MB product takes
//! milliseconds (measured in BENCHMARKS.md). This is `matvec.rs` for q8_0 blocks: weight rows
//! split over the rayon pool, each row read once and used for every activation row while it is
//! in L1. As in llama.cpp, each activation row is first quantized to 8 bits per 32-block (f32
//! scale), so a block's dot product is integer multiply-adds (AVX2 `maddubs`, or AVX-512 VNNI
//! `vpdpbusd` where the CPU has it), three times fewer instructions than widening the weights to
//! f32 — widening made the kernel compute-bound at a third of the memory bandwidth.

use candle_core::Tensor;
use half::f16;

use crate::kernels::elem::Dest;
use crate::kernels::matvec::{product_output, with_f32_rows, Product, MAX_ROWS};
use crate::kernels::pool::with_reused;

/// Weights per q8_0 block, and the block's bytes: an f16 scale, then 32 signed bytes.
pub(crate) const BLOCK: usize = 32;
pub(crate) const BLOCK_BYTES: usize = 34;

/// Activation rows quantized per 32-block: `q` the 8-bit values, `d` one scale per block.
#[derive(Default)]
struct QuantizedRows {
    q: Vec<i8>,
    d: Vec<f32>,
    /// The same rows as the AVX-512 VNNI kernel reads them, when it is the one that runs.
    #[cfg(target_arch = "x86_64")]
    lanes: Option<LaneRows>,
}

/// Symmetric 8-bit quantization of each 32-block of `x` (scale = max |x| / 127), as llama.cpp's
/// `quantize_row_q8_0`, but with an f32 scale.
fn quantize_rows(x: &[f32], xq: &mut QuantizedRows) {
    quantize_blocks_scalar(x, &mut xq.q, &mut xq.d);
    #[cfg(target_arch = "x86_64")]
    {
        xq.lanes = None;
    }
}

/// `quantize_rows`'s values and scales into `q` and `d` (cleared first), vectorized where the
/// CPU has AVX-512 (the same values, bit for bit): also the activation quantization of the 4-
/// and 5-bit kernels (`q4matvec.rs`).
pub(crate) fn quantize_blocks(x: &[f32], q: &mut Vec<i8>, d: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if has_vnni() {
        // SAFETY: the CPU has AVX-512 F/BW/VL/VNNI and AVX2 (checked just above).
        return unsafe { quantize_blocks_avx512(x, q, d) };
    }
    quantize_blocks_scalar(x, q, d)
}

fn quantize_blocks_scalar(x: &[f32], q: &mut Vec<i8>, d: &mut Vec<f32>) {
    q.clear();
    q.resize(x.len(), 0);
    d.clear();
    for (xb, qb) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)) {
        d.push(quantize_block(xb, qb));
    }
}

thread_local! {
    /// The calling thread's quantized activations, kept between products so that a decode step
    /// does not allocate them again for every projection.
    static QUANTIZED: std::cell::RefCell<QuantizedRows> = std::cell::RefCell::new(QuantizedRows::default());
}

/// One 32-block of `quantize_rows` (also prefill's scalar path, `gemm/q8.rs`): writes the
/// 8-bit values and returns the block's scale.
pub(crate) fn quantize_block(xb: &[f32], qb: &mut [i8]) -> f32 {
    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (v, o) in xb.iter().zip(qb.iter_mut()) {
        *o = round_to_i8(v * inv);
    }
    scale
}

/// `v.round() as i8` (halfway cases away from zero, saturating, NaN to 0) without `round`'s
/// libm call: x86-64's baseline has no rounding instruction, and a call per activation was a
/// large part of a call's fixed cost. Clamping first keeps the truncation in range; truncation
/// is exact, and so is the fraction it leaves.
fn round_to_i8(v: f32) -> i8 {
    let v = v.clamp(-128.0, 127.0);
    let t = v as i32;
    let frac = v - t as f32;
    (t + i32::from(frac >= 0.5) - i32::from(frac <= -0.5)) as i8
}

/// `x Wᵀ` for `x` `[rows ≤ MAX_ROWS, in]` on the CPU and q8_0 `blocks` holding `W` `[out, in]`
/// row by row; returns `[rows, out]` in `x`'s dtype. `None` when the fast path does not apply.
pub fn q8_0_matvec_t(x: &Tensor, blocks: &[u8], out: usize, inner: usize) -> candle_core::Result<Option<Tensor>> {
    q8_0_matvec_into(x, blocks, out, inner, None)
}

/// [`q8_0_matvec_t`] into `dest`, where it fits.
pub(crate) fn q8_0_matvec_into(
    x: &Tensor,
    blocks: &[u8],
    out: usize,
    inner: usize,
    dest: Option<&Dest>,
) -> candle_core::Result<Option<Tensor>> {
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
    let Kernel { quantize, dot, .. } = kernel();
    let p = Product { rows, out, inner };
    let product = |x_rows: &[f32], xq: &mut QuantizedRows| {
        quantize(x_rows, rows, xq);
        let xq = &*xq;
        product_output(dest, p, x.dtype(), |y| {
            y.par_tiles(|first, ys| {
                for (j, yr) in ys.chunks_exact_mut(rows).enumerate() {
                    dot(&blocks[(first + j) * row_bytes..(first + j + 1) * row_bytes], xq, yr);
                }
            })
        })
    };
    with_f32_rows(x, |x_rows| with_reused(&QUANTIZED, |xq| product(x_rows, xq)))
}

/// One weight row against every quantized activation row: `y[i] = dot(row, x[i])`.
type Dot = fn(&[u8], &QuantizedRows, &mut [f32]);

/// A dot product, and the activation quantization (`[rows, in]` f32 in) it reads.
#[derive(Clone, Copy)]
struct Kernel {
    #[cfg_attr(not(test), allow(dead_code))]
    name: &'static str,
    /// `[rows, in]` f32 activations into the given rows, reusing their buffers.
    quantize: fn(&[f32], usize, &mut QuantizedRows),
    dot: Dot,
}

/// Picks the best dot product this CPU supports, once per call rather than once per row.
fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if has_vnni() {
            return Kernel { name: "avx512vnni", quantize: quantize_lanes, dot: dot_vnni_entry };
        }
        if has_avx2() {
            return Kernel { name: "avx2", quantize: |x, _, xq| quantize_rows(x, xq), dot: dot_avx2_entry };
        }
    }
    Kernel { name: "portable", quantize: |x, _, xq| quantize_rows(x, xq), dot: dot_rows_portable }
}

/// Whether the CPU has everything the AVX-512 VNNI kernel's functions enable.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_vnni() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") && has_avx2()
}

/// Whether the CPU has everything the AVX2 kernel's functions enable.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx2") && has!("fma") && has!("f16c")
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
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
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

/// Blocks per group of the VNNI kernel: the 32-bit lanes of eight blocks fill eight 256-bit
/// registers.
#[cfg(target_arch = "x86_64")]
const GROUP: usize = 8;

/// Activation rows laid out for `dot_vnni`: per row, one `LaneGroup` per group of `GROUP` blocks
/// (the last one holding the `blocks % GROUP` left over, if any).
#[cfg(target_arch = "x86_64")]
struct LaneRows {
    groups: Vec<LaneGroup>,
    /// Groups per row.
    per_row: usize,
}

/// One activation row's group of `t ≤ 8` blocks as `dot_vnni` reads it, one stream per row: the
/// blocks' bytes shuffled by `interleave::<T>` (`T = t.next_power_of_two()`) as the weights
/// will be, in `x[..T]`; per lane, `corr` is -128 × the sum of its bytes and `d` its block's
/// scale (0 for lanes of padding blocks). 320 bytes, whole cache lines.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct LaneGroup {
    x: [[i8; 32]; GROUP],
    corr: [i32; GROUP],
    d: [f32; GROUP],
}

/// Shuffles the 32-bit lanes of `T` (1, 2, 4 or 8) blocks, one per register of `r`, so that in
/// the first `T` outputs every lane holds four bytes of block `lane % T`, and each block's 32
/// bytes are all there: the transpose of eight blocks for `T = 8`, its first one or two unpack
/// stages for four or two blocks (cheaper, and fewer registers for `vpdpbusd` to go through).
/// Applied alike to weights and activations, corresponding bytes meet in `vpdpbusd`, and a
/// register of lane sums has one block per lane, to be scaled by a register of scales.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn interleave<const T: usize>(r: [std::arch::x86_64::__m256i; GROUP]) -> [std::arch::x86_64::__m256i; GROUP] {
    use std::arch::x86_64::*;
    if T == 1 {
        return r;
    }
    // Blocks 2i and 2i + 1 alternate: lanes of bytes 0..8 and 16..24, then 8..16 and 24..32.
    let s = [
        _mm256_unpacklo_epi32(r[0], r[1]),
        _mm256_unpackhi_epi32(r[0], r[1]),
        _mm256_unpacklo_epi32(r[2], r[3]),
        _mm256_unpackhi_epi32(r[2], r[3]),
        _mm256_unpacklo_epi32(r[4], r[5]),
        _mm256_unpackhi_epi32(r[4], r[5]),
        _mm256_unpacklo_epi32(r[6], r[7]),
        _mm256_unpackhi_epi32(r[6], r[7]),
    ];
    if T == 2 {
        return s;
    }
    // Blocks 4i..4i + 4 in turn, within each 128-bit half.
    let s = [
        _mm256_unpacklo_epi64(s[0], s[2]),
        _mm256_unpackhi_epi64(s[0], s[2]),
        _mm256_unpacklo_epi64(s[1], s[3]),
        _mm256_unpackhi_epi64(s[1], s[3]),
        _mm256_unpacklo_epi64(s[4], s[6]),
        _mm256_unpackhi_epi64(s[4], s[6]),
        _mm256_unpacklo_epi64(s[5], s[7]),
        _mm256_unpackhi_epi64(s[5], s[7]),
    ];
    if T == 4 {
        return s;
    }
    // Blocks 0..4 in the low half, 4..8 in the high half: lane j holds block j.
    [
        _mm256_permute2x128_si256(s[0], s[4], 0x20),
        _mm256_permute2x128_si256(s[1], s[5], 0x20),
        _mm256_permute2x128_si256(s[2], s[6], 0x20),
        _mm256_permute2x128_si256(s[3], s[7], 0x20),
        _mm256_permute2x128_si256(s[0], s[4], 0x31),
        _mm256_permute2x128_si256(s[1], s[5], 0x31),
        _mm256_permute2x128_si256(s[2], s[6], 0x31),
        _mm256_permute2x128_si256(s[3], s[7], 0x31),
    ]
}

/// The VNNI kernel's quantization: `quantize_rows` (the same values, bit for bit) vectorized,
/// as its scalar loop cost as much as the products on small matrices (eight rows against
/// 128 × 1536 weights), plus the rows laid out as `LaneRows`.
#[cfg(target_arch = "x86_64")]
fn quantize_lanes(x: &[f32], rows: usize, xq: &mut QuantizedRows) {
    // SAFETY: only selected by `kernel` after checking the CPU for AVX-512 F/BW/VL/VNNI and AVX2.
    unsafe { quantize_lanes_avx512(x, rows, xq) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2")]
fn quantize_lanes_avx512(x: &[f32], rows: usize, xq: &mut QuantizedRows) {
    use std::arch::x86_64::*;
    let QuantizedRows { q, d, lanes } = xq;
    quantize_blocks_avx512(x, q, d);
    let blocks = d.len() / rows.max(1);
    let per_row = blocks.div_ceil(GROUP);
    let LaneRows { groups, per_row: lanes_per_row } = lanes.get_or_insert_with(|| LaneRows { groups: Vec::new(), per_row });
    *lanes_per_row = per_row;
    groups.clear();
    groups.resize(rows * per_row, LaneGroup { x: [[0; 32]; GROUP], corr: [0; GROUP], d: [0.0; GROUP] });
    for (r, row_groups) in groups.chunks_exact_mut(per_row.max(1)).enumerate() {
        for (g, group) in row_groups.iter_mut().enumerate() {
            let first = r * blocks + g * GROUP;
            let t = (blocks - g * GROUP).min(GROUP);
            let regs = core::array::from_fn(|j| match q.get((first + j) * BLOCK..(first + j + 1) * BLOCK) {
                // SAFETY: a block's 32 bytes.
                Some(qb) if j < t => unsafe { _mm256_loadu_si256(qb.as_ptr() as *const __m256i) },
                _ => _mm256_setzero_si256(),
            });
            let d = &d[first..first + t];
            match t.next_power_of_two() {
                1 => lay_out::<1>(group, regs, d),
                2 => lay_out::<2>(group, regs, d),
                4 => lay_out::<4>(group, regs, d),
                _ => lay_out::<8>(group, regs, d),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2")]
fn quantize_blocks_avx512(x: &[f32], q: &mut Vec<i8>, d: &mut Vec<f32>) {
    use std::arch::x86_64::*;
    q.clear();
    q.resize(x.len(), 0);
    d.clear();
    d.resize(x.len() / BLOCK, 0.0);
    for ((xb, qb), db) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(d.iter_mut()) {
        // SAFETY: xb holds 32 floats.
        let v = unsafe { [_mm512_loadu_ps(xb.as_ptr()), _mm512_loadu_ps(xb.as_ptr().add(16))] };
        // `maxps` returns its second operand when either is NaN: NaN never replaces the maximum
        // (as with `f32::max`).
        let m = _mm512_max_ps(_mm512_abs_ps(v[1]), _mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_setzero_ps()));
        let scale = _mm512_reduce_max_ps(m) / 127.0;
        let inv = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        for (h, half) in v.into_iter().enumerate() {
            // `round_to_i8`, sixteen at a time.
            let s = _mm512_mul_ps(half, inv);
            let number = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(s, s);
            let s = _mm512_min_ps(_mm512_max_ps(s, _mm512_set1_ps(-128.0)), _mm512_set1_ps(127.0));
            let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(s);
            let frac = _mm512_sub_ps(s, t);
            let one = _mm512_set1_ps(1.0);
            let t = _mm512_mask_add_ps(t, _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, _mm512_set1_ps(0.5)), t, one);
            let t = _mm512_mask_sub_ps(t, _mm512_cmp_ps_mask::<_CMP_LE_OQ>(frac, _mm512_set1_ps(-0.5)), t, one);
            let bytes = _mm512_cvtepi32_epi8(_mm512_maskz_cvttps_epi32(number, t));
            // SAFETY: qb holds 32 bytes; this half's 16 start at 16 h.
            unsafe { _mm_storeu_si128(qb.as_mut_ptr().add(16 * h) as *mut __m128i, bytes) };
        }
        *db = scale;
    }
}

/// Fills `group` from the quantized blocks in `regs` (zero past `d.len()` blocks).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2")]
fn lay_out<const T: usize>(group: &mut LaneGroup, regs: [std::arch::x86_64::__m256i; GROUP], d: &[f32]) {
    use std::arch::x86_64::*;
    let x = interleave::<T>(regs);
    let mut sum = _mm256_setzero_si256();
    for (xk, gk) in x.iter().zip(group.x.iter_mut()).take(T) {
        // SAFETY: `gk` is 32 bytes.
        unsafe { _mm256_storeu_si256(gk.as_mut_ptr() as *mut __m256i, *xk) };
        sum = _mm256_dpbusd_epi32(sum, _mm256_set1_epi8(1), *xk);
    }
    // SAFETY: `corr` is eight i32.
    unsafe { _mm256_storeu_si256(group.corr.as_mut_ptr() as *mut __m256i, _mm256_mullo_epi32(sum, _mm256_set1_epi32(-128))) };
    group.d = core::array::from_fn(|j| d.get(j % T).copied().unwrap_or(0.0));
}

#[cfg(target_arch = "x86_64")]
fn dot_vnni_entry(row: &[u8], xq: &QuantizedRows, y: &mut [f32]) {
    let blocks = row.len() / BLOCK_BYTES;
    let Some(lanes) = xq.lanes.as_ref().filter(|l| l.per_row == blocks.div_ceil(GROUP) && l.groups.len() == y.len() * l.per_row) else {
        return dot_rows_portable(row, xq, y);
    };
    // Up to eight activation rows share each group's weight loads and shuffles.
    let mut i = 0;
    while i < y.len() {
        let n = (y.len() - i).min(8);
        let y = &mut y[i..i + n];
        // SAFETY: only selected by `kernel` after checking the CPU for AVX-512 F/BW/VL/VNNI, AVX2,
        // FMA and F16C; `lanes` holds `y.len()` rows of `row`'s groups (checked above).
        unsafe {
            match n {
                8 => dot_vnni::<8>(row, lanes, i, y),
                7 => dot_vnni::<7>(row, lanes, i, y),
                6 => dot_vnni::<6>(row, lanes, i, y),
                5 => dot_vnni::<5>(row, lanes, i, y),
                4 => dot_vnni::<4>(row, lanes, i, y),
                3 => dot_vnni::<3>(row, lanes, i, y),
                2 => dot_vnni::<2>(row, lanes, i, y),
                _ => dot_vnni::<1>(row, lanes, i, y),
            }
        }
        i += n;
    }
}

/// One weight row against `N` activation rows (from `first`) with AVX-512 VNNI's `vpdpbusd`
/// (unsigned × signed bytes, four products summed into each 32-bit lane): llama.cpp's AVX2
/// kernel needs a sign move, `maddubs` and `madd` per block and activation row, and was
/// compute-bound below the memory bandwidth.
///
/// Weights are made unsigned by flipping their top bit (w + 128), which adds 128 × the sum of
/// the activation bytes to each lane; that is known per call (`LaneGroup::corr`, the
/// accumulators' starting value), so it costs nothing per weight row. The other cost is lanes:
/// a block's dot product ends up spread over lanes that must not mix with other blocks' before
/// its scales apply. `interleave` (once per group, shared by all activation rows; the
/// activations went through the same shuffle once per call) puts each lane in a single block,
/// so one accumulator per row takes a whole group, and one conversion and one FMA scale eight
/// blocks at once; lanes are summed once, at the end.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C, and `lanes` must hold rows
/// `first..first + N` laid out for `row`'s block count.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn dot_vnni<const N: usize>(row: &[u8], lanes: &LaneRows, first: usize, y: &mut [f32]) {
    use std::arch::x86_64::*;
    let blocks = row.len() / BLOCK_BYTES;
    let stride = lanes.per_row;
    // SAFETY: rows first..first + N of `per_row` groups each are in `lanes` (caller).
    let groups = unsafe { lanes.groups.as_ptr().add(first * stride) };
    // SAFETY: `x` is called with groups g < per_row, of rows first..first + N, all in `lanes`.
    let x = |g: usize| core::array::from_fn::<&LaneGroup, N, _>(|r| unsafe { &*groups.add(r * stride + g) });
    let mut total = [_mm256_setzero_ps(); N];
    // Each `accumulate` instance is called from one place only, so that it is inlined: with two
    // call sites, large instances became calls that pass every register through memory, a
    // quarter slower for eight rows.
    for g in 0..blocks.div_ceil(GROUP) {
        let (w, w_scale) = if (g + 1) * GROUP <= blocks {
            // SAFETY: the row holds this group's eight blocks.
            unsafe { load_group(row.as_ptr().add(g * GROUP * BLOCK_BYTES)) }
        } else if blocks % GROUP > 4 {
            load_tail::<8>(&row[g * GROUP * BLOCK_BYTES..])
        } else {
            break;
        };
        accumulate::<N, 8>(w, w_scale, x(g), &mut total);
    }
    // A last group of at most four blocks goes through fewer registers.
    let rest = &row[blocks / GROUP * GROUP * BLOCK_BYTES..];
    match blocks % GROUP {
        1 => {
            let (w, w_scale) = load_tail::<1>(rest);
            accumulate::<N, 1>(w, w_scale, x(blocks / GROUP), &mut total);
        }
        2 => {
            let (w, w_scale) = load_tail::<2>(rest);
            accumulate::<N, 2>(w, w_scale, x(blocks / GROUP), &mut total);
        }
        3 | 4 => {
            let (w, w_scale) = load_tail::<4>(rest);
            accumulate::<N, 4>(w, w_scale, x(blocks / GROUP), &mut total);
        }
        _ => {}
    }
    if N >= 4 {
        // Eight rows' lane sums at once: 21 instructions instead of 8 × 6.
        let t: [__m256; 8] = core::array::from_fn(|r| total.get(r).copied().unwrap_or(_mm256_setzero_ps()));
        let sums = sum_rows8(t);
        let mut out = [0f32; 8];
        // SAFETY: eight floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sums) };
        y.copy_from_slice(&out[..N]);
    } else {
        for (o, t) in y.iter_mut().zip(&total) {
            *o = horizontal_sum(*t);
        }
    }
}

/// One group of `dot_vnni`: weights `w` (raw, as loaded) and their per-lane scales against `N`
/// activation rows' `LaneGroup`s, into `total`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2,fma")]
fn accumulate<const N: usize, const T: usize>(
    w: [std::arch::x86_64::__m256i; GROUP],
    w_scale: std::arch::x86_64::__m256,
    x: [&LaneGroup; N],
    total: &mut [std::arch::x86_64::__m256; N],
) {
    use std::arch::x86_64::*;
    let w = interleave::<T>(w.map(|v| _mm256_xor_si256(v, _mm256_set1_epi8(-128))));
    // SAFETY: a LaneGroup's registers, corrections and scales are 32 bytes each; k < GROUP.
    let load = |x: &LaneGroup, k: usize| unsafe { _mm256_loadu_si256(x.x[k].as_ptr() as *const __m256i) };
    // SAFETY: as for `load`: the 32 bytes of each row's corrections.
    let mut int = x.map(|x| unsafe { _mm256_loadu_si256(x.corr.as_ptr() as *const __m256i) });
    if N == 1 && T == GROUP {
        // One row: two dependency chains through vpdpbusd's latency instead of one.
        let mut odd = _mm256_setzero_si256();
        for k in (0..GROUP).step_by(2) {
            int[0] = _mm256_dpbusd_epi32(int[0], w[k], load(x[0], k));
            odd = _mm256_dpbusd_epi32(odd, w[k + 1], load(x[0], k + 1));
        }
        int[0] = _mm256_add_epi32(int[0], odd);
    } else {
        for (k, wk) in w.iter().enumerate().take(T) {
            for (acc, x) in int.iter_mut().zip(&x) {
                *acc = _mm256_dpbusd_epi32(*acc, *wk, load(x, k));
            }
        }
    }
    for ((t, acc), x) in total.iter_mut().zip(int).zip(&x) {
        // SAFETY: as for `load`: the eight f32 scales of the row's group.
        let d = unsafe { _mm256_loadu_ps(x.d.as_ptr()) };
        *t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(w_scale, d), *t);
    }
}

/// Eight q8_0 blocks from `p`: their weights, a register each, and their scales as f32.
/// The scales are read as scalars and packed four to a 64-bit register: `vpgatherdd` measured
/// slower.
///
/// # Safety
/// `p` must point at eight blocks (`8 * 34` readable bytes).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load_group(p: *const u8) -> ([std::arch::x86_64::__m256i; GROUP], std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    // SAFETY: block j < 8's 32 weights follow its scale at j * 34, within the eight blocks the
    // caller guarantees.
    let w = core::array::from_fn(|j| unsafe { _mm256_loadu_si256(p.add(j * BLOCK_BYTES + 2) as *const __m256i) });
    // SAFETY: block j < 8's two-byte scale, at j * 34, as above.
    let scale = |j: usize| u64::from(unsafe { (p.add(j * BLOCK_BYTES) as *const u16).read_unaligned() });
    let lo = scale(0) | scale(1) << 16 | scale(2) << 32 | scale(3) << 48;
    let hi = scale(4) | scale(5) << 16 | scale(6) << 32 | scale(7) << 48;
    (w, _mm256_cvtph_ps(_mm_set_epi64x(hi as i64, lo as i64)))
}

/// `load_group` for the last, partial group of a row, the `t` (< 8) blocks of `rest`, with
/// zero weights after them, and the scales of the lanes `interleave::<T>` gives each block
/// (zero for padding). Masked loads do not touch the masked bytes, so nothing goes through
/// memory: copying the blocks into a zeroed group, or building the registers in an array,
/// measured up to 30% slower on 18-block rows, as wide loads waited on narrower stores.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
fn load_tail<const T: usize>(rest: &[u8]) -> ([std::arch::x86_64::__m256i; GROUP], std::arch::x86_64::__m256) {
    use std::arch::x86_64::*;
    let t = (rest.len() / BLOCK_BYTES).min(T);
    let p = rest.as_ptr();
    let w = core::array::from_fn(|j| {
        let live = if j < t { u32::MAX } else { 0 };
        // SAFETY: block j < t is in `rest`; for the others no byte is read (the address, never
        // dereferenced, is formed with wrapping arithmetic).
        unsafe { _mm256_maskz_loadu_epi8(live, p.wrapping_add(j * BLOCK_BYTES + 2) as *const i8) }
    });
    let at: [i32; GROUP] = core::array::from_fn(|j| (j % T * BLOCK_BYTES) as i32);
    let live = (0..GROUP).filter(|j| j % T < t).fold(0u8, |m, j| m | 1 << j);
    // SAFETY: `at` is eight i32; each live lane reads its block's scale and first two weights,
    // in `rest`; the other lanes are masked off and read nothing.
    let scales = unsafe {
        let at = _mm256_loadu_si256(at.as_ptr() as *const __m256i);
        _mm256_mmask_i32gather_epi32::<1>(_mm256_setzero_si256(), live, at, p as *const i32)
    };
    (w, _mm256_cvtph_ps(_mm256_cvtepi32_epi16(scales)))
}

/// The sum of `s`'s eight lanes as llama.cpp's `hsum_float_8` adds them:
/// `((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7))`, also the order of [`sum_rows8`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn horizontal_sum(s: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let q = _mm_add_ps(_mm256_extractf128_ps(s, 1), _mm256_castps256_ps128(s));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)))
}

/// The lane sums of eight rows' accumulators at once (21 instructions instead of 8 × 6), lane
/// `r` of the result for `t[r]`, each added in [`horizontal_sum`]'s order: a row's result is
/// then the same bits whether its kernel call summed it alone or with seven others, so a
/// token's projections do not depend on how many rows share its call (a decode batch, a
/// prefill piece, a prompt cut after a cached prefix).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn sum_rows8(t: [std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // Rows r and r + 4 side by side, each row's two halves added: [h_r | h_(r+4)], h = lo + hi.
    let halves = |r: usize| _mm256_add_ps(_mm256_permute2f128_ps(t[r], t[r + 4], 0x20), _mm256_permute2f128_ps(t[r], t[r + 4], 0x31));
    let (h0, h1, h2, h3) = (halves(0), halves(1), halves(2), halves(3));
    // Per row: (h0 + h2, h1 + h3), two rows per half.
    let pairs = |a: __m256, b: __m256| {
        let (a, b) = (_mm256_castps_pd(a), _mm256_castps_pd(b));
        _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)))
    };
    let (p01, p23) = (pairs(h0, h1), pairs(h2, h3));
    // Rows 0..4 in the low half, 4..8 in the high half: first partial plus second.
    _mm256_add_ps(_mm256_shuffle_ps::<0b10_00_10_00>(p01, p23), _mm256_shuffle_ps::<0b11_01_11_01>(p01, p23))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::DType;
    use candle_core::Device;

    /// A row summed with seven others gives the bits it gives alone, for values whose sums
    /// round differently in other orders.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn eight_row_sums_add_each_row_as_one_row_does() {
        use std::arch::x86_64::*;
        if !has_avx2() {
            return;
        }
        let mut rng = crate::sampling::sampler::SeededRng::new(7);
        for _ in 0..1000 {
            let rows: [[f32; 8]; 8] = core::array::from_fn(|_| core::array::from_fn(|_| ((rng.next_f64() - 0.5) * 1e4) as f32 * 1.000_123));
            // SAFETY: the CPU has AVX2 and FMA (checked above); each row is eight floats.
            let (together, alone) = unsafe {
                let t = rows.map(|r| _mm256_loadu_ps(r.as_ptr()));
                let mut out = [0f32; 8];
                _mm256_storeu_ps(out.as_mut_ptr(), sum_rows8(t));
                (out, t.map(|r| horizontal_sum(r)))
            };
            for r in 0..8 {
                assert_eq!(together[r].to_bits(), alone[r].to_bits(), "row {r}: {} vs {}", together[r], alone[r]);
            }
        }
    }

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
                let xr = quantized(&x.get(r).unwrap().to_vec1::<f32>().unwrap());
                let scale = gr.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (o, (a, b)) in fr.iter().zip(gr).enumerate() {
                    assert!((a - b).abs() <= 0.01 * scale, "rows {rows}: {a} vs {b}");
                    let portable = dot_portable(&data[o * 102..(o + 1) * 102], &xr.q, &xr.d);
                    assert!((a - portable).abs() <= 1e-5 * portable.abs().max(1.0), "portable: {a} vs {portable}");
                }
            }
        }
    }

    fn quantized(x: &[f32]) -> QuantizedRows {
        let mut xq = QuantizedRows::default();
        quantize_rows(x, &mut xq);
        xq
    }

    /// Every kernel this CPU can run, the one `kernel()` picks first.
    fn kernels() -> Vec<Kernel> {
        let mut all = vec![kernel()];
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            all.push(Kernel { name: "avx2", quantize: |x, _, xq| quantize_rows(x, xq), dot: dot_avx2_entry });
        }
        static REPORTED: std::sync::Once = std::sync::Once::new();
        REPORTED.call_once(|| {
            #[cfg(target_arch = "x86_64")]
            let missing = [("avx512vnni", has_vnni()), ("avx2", has_avx2())];
            #[cfg(not(target_arch = "x86_64"))]
            let missing = [("avx512vnni", false), ("avx2", false)];
            for (name, _) in missing.iter().filter(|(_, has)| !has) {
                crate::kernels::kernel_paths::not_exercised(&format!("qmatvec {name}"));
            }
        });
        all.push(Kernel { name: "portable", quantize: |x, _, xq| quantize_rows(x, xq), dot: dot_rows_portable });
        all.dedup_by_key(|k| k.name);
        all
    }

    /// Each activation row of `x` `[rows, inner]` through each kernel, as the fast path runs it,
    /// against `dot_portable`: the integer parts are exact, so only the float summation order
    /// differs (tolerance relative to the sum of the blocks' magnitudes).
    fn kernels_match_portable(weights: &[u8], x: &[f32], rows: usize) {
        for kernel in kernels() {
            kernel_matches_portable(kernel, weights, x, rows);
        }
    }

    fn kernel_matches_portable(kernel: Kernel, weights: &[u8], x: &[f32], rows: usize) {
        let inner = x.len() / rows;
        let row_bytes = inner / BLOCK * BLOCK_BYTES;
        // Rows that held other, longer activations first: reused buffers keep nothing of them.
        let mut xq = QuantizedRows::default();
        let longer: Vec<f32> = (0..(rows + 2) * (inner + BLOCK)).map(|i| (i % 29) as f32 - 14.0).collect();
        (kernel.quantize)(&longer, rows + 2, &mut xq);
        (kernel.quantize)(x, rows, &mut xq);
        let reference = quantized(x);
        assert_eq!((&xq.q, &xq.d), (&reference.q, &reference.d), "{}: quantization", kernel.name);
        for (o, row) in weights.chunks_exact(row_bytes).enumerate() {
            let mut y = vec![f32::NAN; rows];
            (kernel.dot)(row, &xq, &mut y);
            for (r, &got) in y.iter().enumerate() {
                let (q, d) = (&xq.q[r * inner..(r + 1) * inner], &xq.d[r * inner / BLOCK..(r + 1) * inner / BLOCK]);
                let want = dot_portable(row, q, d);
                let magnitude: f32 = row
                    .chunks_exact(BLOCK_BYTES)
                    .zip(q.chunks_exact(BLOCK).zip(d))
                    .map(|(b, (qb, db))| (scale(b) * db).abs() * qb.iter().map(|&v| f32::from(v).abs() * 128.0).sum::<f32>())
                    .sum();
                assert!(
                    (got - want).abs() <= 1e-5 * magnitude.max(f32::MIN_POSITIVE),
                    "{}: inner {inner}, rows {rows}, out row {o}, activation row {r}: {got} vs {want}",
                    kernel.name
                );
            }
        }
    }

    /// q8_0 bytes of `out` rows of `inner` weights spanning all of i8 (−127..=127 and −128) with
    /// varied scales.
    fn weight_rows(out: usize, inner: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(out * inner / BLOCK * BLOCK_BYTES);
        for b in 0..out * inner / BLOCK {
            bytes.extend_from_slice(&f16::from_f32(0.001 + (b % 7) as f32 * 0.013).to_le_bytes());
            bytes.extend((0..BLOCK).map(|i| ((b * 31 + i * 89) % 256) as u8));
        }
        bytes
    }

    /// Each kernel (AVX-512 VNNI picked first when the CPU has it) against the portable one
    /// for block counts below, at and past the VNNI kernel's groups of eight, and every row
    /// count (its groups of eight rows and every remainder).
    #[test]
    fn kernels_match_portable_on_every_shape() {
        #[cfg(target_arch = "x86_64")]
        if has_vnni() {
            assert_eq!(kernel().name, "avx512vnni");
        }
        // 1, 2, 3, 4, 5, 7, 8, 15, 18 and 48 blocks: every shape of last group.
        for inner in [32usize, 64, 96, 128, 160, 224, 256, 480, 576, 1536] {
            let out = 9;
            let weights = weight_rows(out, inner);
            for rows in 1..=MAX_ROWS {
                let x: Vec<f32> =
                    (0..rows * inner).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / (50.0 + (i / BLOCK % 5) as f32 * 40.0)).collect();
                kernels_match_portable(&weights, &x, rows);
            }
        }
    }

    /// Zero activations (block scale 0) give exactly zero, alone and next to live rows.
    #[test]
    fn zero_activations() {
        let (out, inner) = (5, 576);
        let weights = weight_rows(out, inner);
        for rows in [1usize, 3, 9] {
            let mut x = vec![0f32; rows * inner];
            x[inner..].iter_mut().enumerate().for_each(|(i, v)| *v = (i % 13) as f32 - 6.0);
            x[rows * inner - BLOCK..].fill(0.0);
            kernels_match_portable(&weights, &x, rows);
            let x = Tensor::from_vec(x, (rows, inner), &Device::Cpu).unwrap();
            let y = q8_0_matvec_t(&x, &weights, out, inner).unwrap().expect("fast path").to_vec2::<f32>().unwrap();
            assert!(y[0].iter().all(|&v| v == 0.0), "{:?}", y[0]);
        }
    }

    /// Every kernel's activation quantization is `f32::round` of `x / scale`, saturated to i8,
    /// as llama.cpp's: halfway cases away from zero, NaN to 0, infinities and tiny blocks alike.
    #[test]
    fn quantization_rounds_as_f32_round() {
        let mut x: Vec<f32> = Vec::new();
        // amax 127 (scale 1): halfway cases both ways, and values just beside them.
        x.extend([127.0, -126.5, -0.5, 0.5, 1.5, 2.5, -2.5, 126.5, 0.49999997, -0.49999997, 0.50000006, -1.5000001]);
        x.extend((0..20).map(|i| i as f32 * 6.25 - 60.0));
        // Irregular values and scales.
        for b in 0..6 {
            x.extend((0..BLOCK).map(|i| ((i * 7919 + b * 104729) % 2003) as f32 / (1.0 + b as f32 * 37.0) - 3.0));
        }
        x.extend([0.0; BLOCK]);
        x.extend((0..BLOCK).map(|i| if i == 3 || i == 20 { f32::NAN } else { i as f32 - 16.0 }));
        x.extend((0..BLOCK).map(|i| if i == 5 { f32::INFINITY } else { -(i as f32) }));
        x.extend((0..BLOCK).map(|i| (i as f32 - 15.0) * 1e-41));
        x.extend((0..BLOCK).map(|i| (i as f32 - 15.0) * -0.0));
        let rows = x.len() / BLOCK;
        for kernel in kernels() {
            let mut xq = QuantizedRows::default();
            (kernel.quantize)(&x, rows, &mut xq);
            for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = amax / 127.0;
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                let want: Vec<i8> = xb.iter().map(|v| (v * inv).round() as i8).collect();
                assert_eq!(&xq.q[b * BLOCK..(b + 1) * BLOCK], &want[..], "{}: block {b}", kernel.name);
                assert_eq!(xq.d[b].to_bits(), scale.to_bits(), "{}: block {b}", kernel.name);
            }
        }
    }

    /// Rows of no blocks (`in` = 0) are empty sums.
    #[test]
    fn empty_rows() {
        let x = Tensor::zeros((3, 0), DType::F32, &Device::Cpu).unwrap();
        let y = q8_0_matvec_t(&x, &[], 5, 0).unwrap().expect("fast path").to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![0f32; 5]; 3]);
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
