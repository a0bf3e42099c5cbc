//! Matrix–vector products against ggml's K-quant formats (q4_k, q5_k, q6_k) for decode
//! (≤ 16 activation rows).
//!
//! `q4matvec.rs`'s design for 256-value super-blocks: weights stay as stored, rows split over
//! the rayon pool, each weight row read once for every activation row. The activations are
//! quantized once per call to llama.cpp's `block_q8_K` (256 values, one f32 scale, sums of
//! each 16 values), exactly as `quantize_row_q8_K` does, so that a super-block's dot product is
//! integer multiply-adds and the result is llama.cpp's `ggml_vec_dot_q*_K_q8_K` up to the order
//! of the float sums.
//!
//! The formats, 256 values per super-block, each value unsigned as stored:
//! - q4_k (144 bytes): f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales and mins for eight
//!   32-value sub-blocks, 128 bytes of nibbles. Value = d · scale · q − dmin · min.
//! - q5_k (176 bytes): q4_k's head, then 32 bytes of fifth bits, then the nibbles.
//! - q6_k (210 bytes): 128 bytes of low nibbles, 64 bytes of two high bits, sixteen i8 scales
//!   (one per 16 values), f16 `d` last. Value = d · scale · (q − 32).
//!
//! The nibbles of q4_k and q5_k come in four runs of 32 bytes: run `j` holds values
//! `64j + l` in its low nibbles and `64j + 32 + l` in its high nibbles (sub-blocks `2j` and
//! `2j + 1`). The fifth bit of value `64j + l` is bit `2j` of byte `l` of the fifth bits, that
//! of `64j + 32 + l` bit `2j + 1`. q6_k's values come in two halves of 128: half `h`'s 64
//! nibble bytes `ql` and 32 high-bit bytes `qh` hold value `128h + 32k + l` (quarter `k`) in
//! `ql[l]` low (k = 0), `ql[32 + l]` low (1), `ql[l]` high (2), `ql[32 + l]` high (3), with
//! bits `2k, 2k + 1` of `qh[l]` on top.

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use half::f16;

use crate::kernels::elem::Dest;
use crate::kernels::matvec::{product_output, with_f32_rows, Product, MAX_ROWS};
use crate::kernels::pool::with_reused;

/// Values per super-block of every K-quant format, and per activation block.
const QK_K: usize = 256;

/// Activation rows per pass of the x86 kernels over a weight row (each pass unpacks the
/// weights once): a run of unpacked weights, their scales and four rows' running sums are
/// about what AVX2's sixteen registers hold.
#[cfg(target_arch = "x86_64")]
const CHUNK: usize = 4;

/// Whether [`kquant_matvec_t`] multiplies weights of this type.
pub fn supports(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4K | GgmlDType::Q5K | GgmlDType::Q6K)
}

/// `x Wᵀ` for `x` `[rows ≤ MAX_ROWS, in]` on the CPU and `blocks` of type `dtype` (q4_k, q5_k
/// or q6_k) holding `W` `[out, in]` row by row (`in` a multiple of 256); returns `[rows, out]`
/// in `x`'s dtype. `None` when the fast path does not apply.
pub fn kquant_matvec_t(x: &Tensor, blocks: &[u8], dtype: GgmlDType, out: usize, inner: usize) -> candle_core::Result<Option<Tensor>> {
    kquant_matvec_into(x, blocks, dtype, out, inner, None)
}

/// [`kquant_matvec_t`] into `dest`, where it fits.
pub(crate) fn kquant_matvec_into(
    x: &Tensor,
    blocks: &[u8],
    dtype: GgmlDType,
    out: usize,
    inner: usize,
    dest: Option<&Dest>,
) -> candle_core::Result<Option<Tensor>> {
    let w = Matrix { blocks, out, inner };
    match dtype {
        GgmlDType::Q4K => matvec_with(kernel::<Q4K>(), x, w, dest),
        GgmlDType::Q5K => matvec_with(kernel::<Q5K>(), x, w, dest),
        GgmlDType::Q6K => matvec_with(kernel::<Q6K>(), x, w, dest),
        _ => Ok(None),
    }
}

/// The weights of a product: `out` rows of `inner` values in `blocks`.
#[derive(Clone, Copy)]
struct Matrix<'a> {
    blocks: &'a [u8],
    out: usize,
    inner: usize,
}

/// One of the K-quant formats, as its bytes are read.
trait Format: 'static {
    /// Bytes per super-block.
    const BYTES: usize;
    /// The super-block's 256 values as stored (unsigned: 0..16, 0..32 or 0..64), in order.
    fn unpack(block: &[u8]) -> [u8; QK_K];
    /// One super-block against one activation block: the portable kernel.
    fn block_dot(block: &[u8], x: &Q8K) -> f32;
    /// The AVX2 kernel for 1 to `CHUNK` activation rows (entry `n - 1` for `n` rows).
    #[cfg(target_arch = "x86_64")]
    const AVX2: [RowsDot; CHUNK];
}

struct Q4K;
struct Q5K;
struct Q6K;

impl Format for Q4K {
    const BYTES: usize = 144;
    fn unpack(block: &[u8]) -> [u8; QK_K] {
        nibbles(&block[16..144], None)
    }
    fn block_dot(block: &[u8], x: &Q8K) -> f32 {
        q45_block_dot(block, &Self::unpack(block), x)
    }
    #[cfg(target_arch = "x86_64")]
    const AVX2: [RowsDot; CHUNK] = [q45_avx2::<false, 1>, q45_avx2::<false, 2>, q45_avx2::<false, 3>, q45_avx2::<false, 4>];
}

impl Format for Q5K {
    const BYTES: usize = 176;
    fn unpack(block: &[u8]) -> [u8; QK_K] {
        nibbles(&block[48..176], Some(&block[16..48]))
    }
    fn block_dot(block: &[u8], x: &Q8K) -> f32 {
        q45_block_dot(block, &Self::unpack(block), x)
    }
    #[cfg(target_arch = "x86_64")]
    const AVX2: [RowsDot; CHUNK] = [q45_avx2::<true, 1>, q45_avx2::<true, 2>, q45_avx2::<true, 3>, q45_avx2::<true, 4>];
}

impl Format for Q6K {
    const BYTES: usize = 210;
    fn unpack(block: &[u8]) -> [u8; QK_K] {
        let (ql, qh) = (&block[..128], &block[128..192]);
        core::array::from_fn(|v| {
            let (h, k, l) = (v / 128, v % 128 / 32, v % 32);
            let low = ql[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2)) & 0x0F;
            let high = qh[32 * h + l] >> (2 * k) & 3;
            low | high << 4
        })
    }
    fn block_dot(block: &[u8], x: &Q8K) -> f32 {
        let q = Self::unpack(block);
        let scales = &block[192..208];
        // Per 16 values: scale × (Σ q·x − 32 Σ x), the offset taken from the activations' sums.
        let int: i32 = (q.chunks_exact(16).zip(x.qs.chunks_exact(16)))
            .zip(scales.iter().zip(&x.bsums))
            .map(|((qg, xg), (&s, &bsum))| {
                let dot: i32 = qg.iter().zip(xg).map(|(&q, &v)| i32::from(q) * i32::from(v)).sum();
                i32::from(s as i8) * (dot - 32 * i32::from(bsum))
            })
            .sum();
        f16_at(block, 208) * x.d * int as f32
    }
    #[cfg(target_arch = "x86_64")]
    const AVX2: [RowsDot; CHUNK] = [q6_avx2::<1>, q6_avx2::<2>, q6_avx2::<3>, q6_avx2::<4>];
}

fn f16_at(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// q4_k's or q5_k's 256 values from their 128 bytes of nibbles and, for q5_k, 32 bytes of
/// fifth bits (see the module comment for where each value lives).
fn nibbles(qs: &[u8], high: Option<&[u8]>) -> [u8; QK_K] {
    core::array::from_fn(|v| {
        let (j, half, l) = (v / 64, v % 64 / 32, v % 32);
        let nibble = qs[32 * j + l] >> (4 * half) & 0x0F;
        let fifth = high.map_or(0, |h| h[l] >> (2 * j + half) & 1);
        nibble | fifth << 4
    })
}

/// q4_k's and q5_k's twelve bytes of 6-bit scales and mins as sixteen bytes: the eight
/// sub-blocks' scales, then their mins (llama.cpp's `get_scale_min_k4` for all eight at once).
/// Sub-blocks 0..4 keep their scale and min in the low six bits of bytes 0..4 and 4..8;
/// sub-blocks 4..8 keep their low four bits in the nibbles of bytes 8..12 and their top two
/// bits in the top two bits of bytes 0..8.
fn scales_and_mins(packed: &[u8]) -> [u8; 16] {
    let word = |i: usize| u32::from_le_bytes([packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]]);
    let (a, b, c) = (word(0), word(1), word(2));
    let (low6, low4, low2) = (0x3F3F_3F3F_u32, 0x0F0F_0F0F_u32, 0x0303_0303_u32);
    let words = [a & low6, (c & low4) | ((a >> 6) & low2) << 4, b & low6, ((c >> 4) & low4) | ((b >> 6) & low2) << 4];
    let mut out = [0u8; 16];
    for (o, w) in out.chunks_exact_mut(4).zip(words) {
        o.copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// One q4_k or q5_k super-block (values `q`) against an activation block: the integer sum
/// `Σ_s scale_s · Σ q·x` scaled by `d`, less `dmin · Σ_s min_s · Σ x`.
fn q45_block_dot(block: &[u8], q: &[u8; QK_K], x: &Q8K) -> f32 {
    let sm = scales_and_mins(&block[4..16]);
    let (scales, mins) = sm.split_at(8);
    let int: i32 = (q.chunks_exact(32).zip(x.qs.chunks_exact(32)))
        .zip(scales)
        .map(|((qs, xs), &s)| i32::from(s) * qs.iter().zip(xs).map(|(&q, &v)| i32::from(q) * i32::from(v)).sum::<i32>())
        .sum();
    let min: i32 = mins.iter().zip(&x.sums).map(|(&m, &s)| i32::from(m) * i32::from(s)).sum();
    f16_at(block, 0) * x.d * int as f32 - f16_at(block, 2) * x.d * min as f32
}

/// One activation block as llama.cpp's `block_q8_K` holds it, with the sums per 32 values
/// that the mins of q4_k and q5_k multiply. 320 bytes: whole cache lines.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Q8K {
    /// The values, `round(x / d)`.
    qs: [i8; QK_K],
    /// Sums of each 16 values (q6_k's offset).
    bsums: [i16; QK_K / 16],
    /// Sums of each 32 values (q4_k's and q5_k's mins).
    sums: [i16; QK_K / 32],
    /// The scale: the value of largest magnitude over −127 (0 for an all-zero block).
    d: f32,
}

const ZERO_BLOCK: Q8K = Q8K { qs: [0; QK_K], bsums: [0; QK_K / 16], sums: [0; QK_K / 32], d: 0.0 };

/// Activation rows quantized per 256 values.
#[derive(Default)]
struct QuantizedRows {
    /// `[rows, per_row]` blocks.
    blocks: Vec<Q8K>,
    /// Blocks per row.
    per_row: usize,
}

impl QuantizedRows {
    fn row(&self, i: usize) -> &[Q8K] {
        &self.blocks[i * self.per_row..(i + 1) * self.per_row]
    }
}

thread_local! {
    /// The calling thread's quantized activations, kept between products so that a decode step
    /// does not allocate them.
    static QUANTIZED: std::cell::RefCell<QuantizedRows> = std::cell::RefCell::new(QuantizedRows::default());
}

/// Quantizes `[rows, in]` activations (`in` a multiple of 256) into `xq`, reusing its buffer.
fn quantize(x: &[f32], inner: usize, xq: &mut QuantizedRows) {
    xq.per_row = inner / QK_K;
    xq.blocks.clear();
    xq.blocks.resize(x.len() / QK_K, ZERO_BLOCK);
    for (xb, block) in x.chunks_exact(QK_K).zip(xq.blocks.iter_mut()) {
        quantize_block(xb, block);
    }
}

/// llama.cpp's `quantize_row_q8_K` for one block, bit for bit: the scale comes from the first
/// value of largest magnitude, sign included (`d = 1 / (−127 / max)`), and values round to
/// nearest, ties to even (its `nearest_int`), capped at 127. Written as lane-wise loops that
/// the compiler can vectorize, where a value-by-value scan for the maximum is one chain of
/// dependent compares.
fn quantize_block(x: &[f32], out: &mut Q8K) {
    let mut lanes = [0f32; 8];
    for c in x.chunks_exact(8) {
        for (m, v) in lanes.iter_mut().zip(c) {
            // Comparisons false for NaN, as llama.cpp's, which then skips it.
            if v.abs() > *m {
                *m = v.abs();
            }
        }
    }
    let amax = lanes.iter().fold(0f32, |m, &v| if v > m { v } else { m });
    let Some(&max) = x.iter().find(|v| v.abs() == amax).filter(|_| amax > 0.0) else {
        *out = ZERO_BLOCK;
        return;
    };
    let iscale = -127.0 / max;
    for (q, &v) in out.qs.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    for (s, g) in out.bsums.iter_mut().zip(out.qs.chunks_exact(16)) {
        *s = g.iter().map(|&v| i16::from(v)).sum();
    }
    for (s, pair) in out.sums.iter_mut().zip(out.bsums.chunks_exact(2)) {
        *s = pair[0] + pair[1];
    }
    out.d = 1.0 / iscale;
}

/// Round to nearest, ties to even, for `|v| < 2²²` (llama.cpp's `nearest_int`): adding
/// 1.5 · 2²³ leaves the rounded integer in the low mantissa bits, with no libm call (x86-64's
/// baseline has no rounding instruction).
fn nearest_int(v: f32) -> i32 {
    ((v + 12_582_912.0).to_bits() & 0x007F_FFFF) as i32 - 0x0040_0000
}

/// One weight row against every quantized activation row: `y[i] = dot(row, x[i])`.
type Dot = fn(&[u8], &QuantizedRows, &mut [f32]);

/// A dot product for one format.
#[derive(Clone, Copy)]
struct Kernel {
    #[cfg_attr(not(test), allow(dead_code))]
    name: &'static str,
    /// Bytes per super-block of the format.
    bytes: usize,
    dot: Dot,
}

/// Picks the best dot product this CPU supports for format `F`, once per call.
fn kernel<F: Format>() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::qmatvec::has_avx2() {
        return Kernel { name: "avx2", bytes: F::BYTES, dot: rows_avx2::<F> };
    }
    portable::<F>()
}

fn portable<F: Format>() -> Kernel {
    Kernel { name: "portable", bytes: F::BYTES, dot: rows_portable::<F> }
}

/// `x Wᵀ` through `kernel` (one for `W`'s format): the activations quantized once, on the
/// calling thread, then the weight rows split over the pool as in `qmatvec.rs`.
fn matvec_with(kernel: Kernel, x: &Tensor, w: Matrix<'_>, dest: Option<&Dest>) -> candle_core::Result<Option<Tensor>> {
    let Matrix { blocks, out, inner } = w;
    let rows = match x.dims() {
        [r, i] if *i == inner => *r,
        _ => return Ok(None),
    };
    if rows == 0 || rows > MAX_ROWS || !x.device().is_cpu() || !inner.is_multiple_of(QK_K) {
        return Ok(None);
    }
    let row_bytes = inner / QK_K * kernel.bytes;
    if out.checked_mul(row_bytes) != Some(blocks.len()) {
        return Ok(None);
    }
    let p = Product { rows, out, inner };
    let product = |x_rows: &[f32], xq: &mut QuantizedRows| {
        quantize(x_rows, inner, xq);
        let xq = &*xq;
        product_output(dest, p, x.dtype(), |y| {
            y.par_tiles(|first, ys| {
                for (j, yr) in ys.chunks_exact_mut(rows).enumerate() {
                    (kernel.dot)(&blocks[(first + j) * row_bytes..(first + j + 1) * row_bytes], xq, yr);
                }
            })
        })
    };
    with_f32_rows(x, |x_rows| with_reused(&QUANTIZED, |xq| product(x_rows, xq)))
}

fn rows_portable<F: Format>(row: &[u8], xq: &QuantizedRows, y: &mut [f32]) {
    for (i, yi) in y.iter_mut().enumerate() {
        *yi = row.chunks_exact(F::BYTES).zip(xq.row(i)).map(|(block, x)| F::block_dot(block, x)).sum();
    }
}

/// An x86 kernel: one weight row against `x.len()` activation rows (a fixed number per
/// instance), their dot products into `y`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `x` holds the kernel's number of rows.
#[cfg(target_arch = "x86_64")]
type RowsDot = unsafe fn(&[u8], &[&[Q8K]], &mut [f32]);

#[cfg(target_arch = "x86_64")]
fn rows_avx2<F: Format>(row: &[u8], xq: &QuantizedRows, y: &mut [f32]) {
    let fits = row.len() == xq.per_row * F::BYTES && xq.blocks.len() == y.len() * xq.per_row;
    debug_assert!(fits, "activations do not match the weight row");
    if !fits {
        return rows_portable::<F>(row, xq, y);
    }
    for (c, y) in y.chunks_mut(CHUNK).enumerate() {
        let x: [&[Q8K]; CHUNK] = core::array::from_fn(|r| if r < y.len() { xq.row(c * CHUNK + r) } else { &[] });
        // SAFETY: only selected by `kernel` after checking the CPU for AVX2, FMA and F16C; the
        // kernel for `y.len()` rows gets that many.
        unsafe { F::AVX2[y.len() - 1](row, &x[..y.len()], y) }
    }
}

/// `bytes[at..at + 32]` as a vector (bounds-checked, so the load stays within the slice).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn load<T: Copy>(bytes: &[T], at: usize) -> std::arch::x86_64::__m256i {
    let s = &bytes[at..at + 32 / std::mem::size_of::<T>()];
    // SAFETY: `s` is 32 readable bytes; the load is unaligned.
    unsafe { std::arch::x86_64::_mm256_loadu_si256(s.as_ptr().cast()) }
}

/// A `pshufb` control that copies 16-bit lane `low` of each 128-bit half into every lane of
/// the low half, and lane `high` into every lane of the high half.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
fn pick_lanes(low: usize, high: usize) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let word = |lane: usize| (((2 * lane + 1) << 8) | (2 * lane)) as i16;
    _mm256_set_m128i(_mm_set1_epi16(word(high)), _mm_set1_epi16(word(low)))
}

/// q4_k (`HIGH` false) or q5_k against `N` activation rows, as llama.cpp's AVX2
/// `ggml_vec_dot_q4_K_q8_K` per row: per 32-value sub-block, `maddubs` multiplies the unsigned
/// weights by the signed activations into i16 pairs (at most 2 · 31 · 128), and `madd` by the
/// sub-block's scale sums those into i32. The weights are unpacked once for all `N` rows.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `x.len() == N`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q45_avx2<const HIGH: bool, const N: usize>(row: &[u8], x: &[&[Q8K]], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let (bytes, qs) = if HIGH { (Q5K::BYTES, 48) } else { (Q4K::BYTES, 16) };
    let x: [&[Q8K]; N] = core::array::from_fn(|r| x[r]);
    let blocks = x.iter().fold(row.len() / bytes, |n, r| n.min(r.len()));
    let low4 = _mm256_set1_epi8(0x0F);
    let bit4 = _mm256_set1_epi8(0x10);
    let mut acc = [_mm256_setzero_ps(); N];
    for (b, block) in row.chunks_exact(bytes).take(blocks).enumerate() {
        let xb: [&Q8K; N] = core::array::from_fn(|r| &x[r][b]);
        // The eight scales as i16 in both 128-bit halves (for `pick_lanes`), the mins as i16.
        let sm = scales_and_mins(&block[4..16]);
        // SAFETY: `sm` is 16 bytes; unaligned load.
        let sm = unsafe { _mm_loadu_si128(sm.as_ptr().cast()) };
        let scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
        let mins = _mm_cvtepu8_epi16(_mm_unpackhi_epi64(sm, sm));
        // Bits 2j and 2j + 1 of each byte are the fifth bits of run j's low and high nibbles:
        // shifted to bit 4 there, then the next pair down for the next run.
        let mut fifth = if HIGH { load(block, 16) } else { _mm256_setzero_si256() };
        let mut sums = [_mm256_setzero_si256(); N];
        for j in 0..4 {
            let nibbles = load(block, qs + 32 * j);
            let mut low = _mm256_and_si256(nibbles, low4);
            let mut high = _mm256_and_si256(_mm256_srli_epi16::<4>(nibbles), low4);
            if HIGH {
                low = _mm256_or_si256(low, _mm256_and_si256(_mm256_slli_epi16::<4>(fifth), bit4));
                high = _mm256_or_si256(high, _mm256_and_si256(_mm256_slli_epi16::<3>(fifth), bit4));
                fifth = _mm256_srli_epi16::<2>(fifth);
            }
            let scale_low = _mm256_shuffle_epi8(scales, pick_lanes(2 * j, 2 * j));
            let scale_high = _mm256_shuffle_epi8(scales, pick_lanes(2 * j + 1, 2 * j + 1));
            for (s, xb) in sums.iter_mut().zip(xb) {
                let p_low = _mm256_madd_epi16(scale_low, _mm256_maddubs_epi16(low, load(&xb.qs, 64 * j)));
                let p_high = _mm256_madd_epi16(scale_high, _mm256_maddubs_epi16(high, load(&xb.qs, 64 * j + 32)));
                *s = _mm256_add_epi32(*s, _mm256_add_epi32(p_low, p_high));
            }
        }
        // d and dmin, widened together.
        let head = i32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(head));
        let (d, dmin) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)));
        for ((a, s), xb) in acc.iter_mut().zip(sums).zip(xb) {
            // SAFETY: `sums` is eight i16; unaligned load.
            let x_sums = unsafe { _mm_loadu_si128(xb.sums.as_ptr().cast()) };
            let min = _mm256_zextsi128_si256(_mm_madd_epi16(mins, x_sums));
            *a = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(s), *a);
            *a = _mm256_fmadd_ps(_mm256_set1_ps(-dmin * xb.d), _mm256_cvtepi32_ps(min), *a);
        }
    }
    for (o, a) in y.iter_mut().zip(acc) {
        *o = crate::kernels::qmatvec::horizontal_sum(a);
    }
}

/// q6_k against `N` activation rows, as llama.cpp's AVX2 `ggml_vec_dot_q6_K_q8_K` per row,
/// except for the −32 offset: `maddubs` takes the unsigned values (pairs at most 2 · 63 · 128),
/// and the offset is `32 · Σ scale · Σ x` per 16 values, one `madd` of the scales with the
/// activations' sums per super-block instead of one per 32 values.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `x.len() == N`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_avx2<const N: usize>(row: &[u8], x: &[&[Q8K]], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let x: [&[Q8K]; N] = core::array::from_fn(|r| x[r]);
    let blocks = x.iter().fold(row.len() / Q6K::BYTES, |n, r| n.min(r.len()));
    let low4 = _mm256_set1_epi8(0x0F);
    let bits45 = _mm256_set1_epi8(0x30);
    let mut acc = [_mm256_setzero_ps(); N];
    for (b, block) in row.chunks_exact(Q6K::BYTES).take(blocks).enumerate() {
        let xb: [&Q8K; N] = core::array::from_fn(|r| &x[r][b]);
        let scales = &block[192..208];
        // SAFETY: `scales` is 16 bytes; unaligned load.
        let scales = unsafe { _mm_loadu_si128(scales.as_ptr().cast()) };
        // Scales 0..8 (first half) and 8..16 (second half) as i16 in both 128-bit halves, for
        // `pick_lanes`; all sixteen in order for the offset.
        let halves = [
            _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(scales)),
            _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_unpackhi_epi64(scales, scales))),
        ];
        let all = _mm256_cvtepi8_epi16(scales);
        let mut sums = [_mm256_setzero_si256(); N];
        for (h, half) in halves.into_iter().enumerate() {
            let (ql0, ql1, qh) = (load(block, 64 * h), load(block, 64 * h + 32), load(block, 128 + 32 * h));
            // Quarter k: its nibbles, with bits 2k, 2k + 1 of `qh` moved to bits 4, 5.
            let quarters = [
                _mm256_or_si256(_mm256_and_si256(ql0, low4), _mm256_and_si256(_mm256_slli_epi16::<4>(qh), bits45)),
                _mm256_or_si256(_mm256_and_si256(ql1, low4), _mm256_and_si256(_mm256_slli_epi16::<2>(qh), bits45)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low4), _mm256_and_si256(qh, bits45)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low4), _mm256_and_si256(_mm256_srli_epi16::<2>(qh), bits45)),
            ];
            for (k, q) in quarters.into_iter().enumerate() {
                // Values 0..16 of the quarter take scale 2k of this half, 16..32 scale 2k + 1.
                let scale = _mm256_shuffle_epi8(half, pick_lanes(2 * k, 2 * k + 1));
                for (s, xb) in sums.iter_mut().zip(xb) {
                    let p = _mm256_madd_epi16(scale, _mm256_maddubs_epi16(q, load(&xb.qs, 128 * h + 32 * k)));
                    *s = _mm256_add_epi32(*s, p);
                }
            }
        }
        let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(u16::from_le_bytes([block[208], block[209]])))));
        for ((a, s), xb) in acc.iter_mut().zip(sums).zip(xb) {
            let offset = _mm256_madd_epi16(all, load(&xb.bsums, 0));
            let int = _mm256_sub_epi32(s, _mm256_slli_epi32::<5>(offset));
            *a = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(int), *a);
        }
    }
    for (o, a) in y.iter_mut().zip(acc) {
        *o = crate::kernels::qmatvec::horizontal_sum(a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{DType, Device};

    /// The formats' ggml types, to run each test for every format.
    trait Named: Format {
        const DTYPE: GgmlDType;
    }
    impl Named for Q4K {
        const DTYPE: GgmlDType = GgmlDType::Q4K;
    }
    impl Named for Q5K {
        const DTYPE: GgmlDType = GgmlDType::Q5K;
    }
    impl Named for Q6K {
        const DTYPE: GgmlDType = GgmlDType::Q6K;
    }

    /// Every kernel this CPU can run for `F`, the one `kernel()` picks first. Records the AVX2
    /// kernel as not exercised (`kernel_paths`) when this CPU cannot run it, since the tests
    /// then check the portable kernel only.
    fn kernels<F: Format>() -> Vec<Kernel> {
        let mut all = vec![kernel::<F>()];
        #[cfg(target_arch = "x86_64")]
        let avx2 = crate::kernels::qmatvec::has_avx2();
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        if !avx2 {
            static REPORTED: std::sync::Once = std::sync::Once::new();
            REPORTED.call_once(|| crate::kernels::kernel_paths::not_exercised("kquant avx2"));
        }
        all.push(portable::<F>());
        all.dedup_by_key(|k| k.name);
        all
    }

    /// `n` normal values (mean 0, deviation `sigma`) from a fixed seed, so that a failure
    /// reproduces (candle's CPU `randn` cannot be seeded): splitmix64 and Box–Muller.
    fn randn(n: usize, sigma: f32, seed: u64) -> Vec<f32> {
        let mut state = seed;
        let mut uniform = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (u, v) = (1.0 - uniform(), uniform());
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32 * sigma
            })
            .collect()
    }

    /// `rows` activation rows of `inner` values: normal, with a different deviation per
    /// super-block, an outlier (as real activations have), and an all-zero block (scale 0)
    /// where there is room.
    fn activations(rows: usize, inner: usize) -> Vec<f32> {
        let mut x = randn(rows * inner, 1.0, 7 + rows as u64);
        for (b, xb) in x.chunks_exact_mut(QK_K).enumerate() {
            let sigma = 0.2 + (b % 5) as f32 * 0.7;
            xb.iter_mut().for_each(|v| *v *= sigma);
            xb[b * 37 % QK_K] = 12.0 * if b % 2 == 0 { 1.0 } else { -1.0 };
        }
        if inner >= 2 * QK_K {
            x[inner - QK_K..inner].fill(0.0);
        }
        x
    }

    /// `[out, inner]` normal weights quantized by candle: its bytes, and its dequantized rows.
    fn weights<F: Named>(out: usize, inner: usize) -> (Vec<u8>, Vec<Vec<f32>>) {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(randn(out * inner, 0.05, 11), (out, inner), &dev).unwrap();
        let q = QTensor::quantize(&w, F::DTYPE).unwrap();
        let rows = q.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap();
        (q.data().unwrap().to_vec(), rows)
    }

    fn product(kernel: Kernel, x: &[f32], rows: usize, w: Matrix<'_>) -> Vec<Vec<f32>> {
        let x = Tensor::from_vec(x.to_vec(), (rows, w.inner), &Device::Cpu).unwrap();
        let y = matvec_with(kernel, &x, w, None).unwrap().expect("fast path");
        y.to_vec2::<f32>().unwrap()
    }

    /// A super-block's values as candle dequantizes them, computed the same way from our
    /// unpacking: `d · scale · q − dmin · min` (q4_k, q5_k), `d · scale · (q − 32)` (q6_k).
    fn dequantize_block<F: Format>(block: &[u8]) -> [f32; QK_K] {
        let q = F::unpack(block);
        if F::BYTES == Q6K::BYTES {
            let d = f16_at(block, 208);
            core::array::from_fn(|v| d * f32::from(block[192 + v / 16] as i8) * (i32::from(q[v]) - 32) as f32)
        } else {
            let (d, dmin, sm) = (f16_at(block, 0), f16_at(block, 2), scales_and_mins(&block[4..16]));
            core::array::from_fn(|v| d * f32::from(sm[v / 32]) * f32::from(q[v]) - dmin * f32::from(sm[8 + v / 32]))
        }
    }

    /// The two terms of each weight, `|d · scale · q|` and `|dmin · min|` (q6_k: the weight),
    /// whose magnitudes the float sums of the kernels round relative to.
    fn weight_terms<F: Format>(block: &[u8]) -> [f32; QK_K] {
        if F::BYTES == Q6K::BYTES {
            return dequantize_block::<F>(block).map(f32::abs);
        }
        let (q, d, dmin, sm) = (F::unpack(block), f16_at(block, 0), f16_at(block, 2), scales_and_mins(&block[4..16]));
        core::array::from_fn(|v| (d * f32::from(sm[v / 32]) * f32::from(q[v])).abs() + (dmin * f32::from(sm[8 + v / 32])).abs())
    }

    /// `unpack` and `scales_and_mins` read the values where ggml stores them: our
    /// dequantization is candle's, bit for bit.
    fn unpacks_as_candle_dequantizes<F: Named>() {
        let (bytes, rows) = weights::<F>(3, 512);
        let got: Vec<f32> = bytes.chunks_exact(F::BYTES).flat_map(dequantize_block::<F>).collect();
        assert_eq!(got, rows.concat());
    }

    #[test]
    fn every_format_unpacks_as_candle_dequantizes() {
        unpacks_as_candle_dequantizes::<Q4K>();
        unpacks_as_candle_dequantizes::<Q5K>();
        unpacks_as_candle_dequantizes::<Q6K>();
    }

    /// `scales_and_mins` is llama.cpp's `get_scale_min_k4`, sub-block by sub-block, for every
    /// bit of the twelve bytes.
    #[test]
    fn scales_and_mins_is_get_scale_min_k4() {
        fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
            if j < 4 {
                (q[j] & 63, q[j + 4] & 63)
            } else {
                ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
            }
        }
        for seed in 0..200u64 {
            let packed: Vec<u8> = (0..12u64).map(|i| ((seed * 12 + i).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8).collect();
            let got = scales_and_mins(&packed);
            for j in 0..8 {
                assert_eq!((got[j], got[8 + j]), get_scale_min_k4(j, &packed), "bytes {packed:?}, sub-block {j}");
            }
        }
    }

    /// `quantize_block` is llama.cpp's `quantize_row_q8_K`: the scale from the first value of
    /// largest magnitude with its sign, ties rounded to even, the sums of 16 and 32.
    #[test]
    fn quantizes_as_llama_cpp() {
        let mut x = vec![0f32; QK_K];
        // max = +127 makes iscale −1: each value is negated and rounded.
        x[..8].copy_from_slice(&[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 3.49, -126.6]);
        x[200] = -127.0; // the same magnitude later: the first one's sign wins
        let mut q = ZERO_BLOCK;
        quantize_block(&x, &mut q);
        assert_eq!(q.d, -1.0);
        assert_eq!(q.qs[..8], [-127, 0, -2, -2, 0, 2, -3, 127]);
        assert_eq!(q.qs[200], 127);
        assert!(q.qs[8..200].iter().chain(&q.qs[201..]).all(|&v| v == 0));
        let group = |from: usize, n: usize| q.qs[from..from + n].iter().map(|&v| i16::from(v)).sum::<i16>();
        assert!(q.bsums.iter().enumerate().all(|(g, &s)| s == group(16 * g, 16)));
        assert!(q.sums.iter().enumerate().all(|(g, &s)| s == group(32 * g, 32)));
        // A zero block has scale 0 and no values.
        quantize_block(&[0.0; QK_K], &mut q);
        assert!(q.d == 0.0 && q.qs.iter().all(|&v| v == 0) && q.bsums.iter().all(|&v| v == 0));
        // A general block: every value within half a step of its original.
        let x = randn(QK_K, 3.0, 5);
        quantize_block(&x, &mut q);
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!((q.d.abs() - amax / 127.0).abs() <= 1e-6 * amax);
        for (&v, &qv) in x.iter().zip(&q.qs) {
            assert!((f32::from(qv) * q.d - v).abs() <= q.d.abs() * 0.5001, "{v} as {qv} · {}", q.d);
        }
    }

    /// The shapes the product tests run: widths of one and two super-blocks, an output count
    /// that is not a multiple of the pool's task size, and 1, 3 and `MAX_ROWS` rows.
    const SHAPES: [(usize, usize); 2] = [(67, 256), (131, 512)];
    const ROWS: [usize; 3] = [1, 3, MAX_ROWS];

    /// (a) Each kernel within activation-quantization error of an f32 product on candle's
    /// dequantized weights. Per activation block of scale `d` (max |x| / 127), rounding moves
    /// each value by at most `d / 2`, so the product moves by at most `d / 2 · Σ |w|` over the
    /// block; the weights are used as stored, and the scales are f32, so what remains is float
    /// rounding: both sums are within 1e-5 of the magnitude of their terms, `Σ (|d · scale · q|
    /// + |dmin · min|) (|x| + d)`.
    fn every_kernel_matches_the_dequantized_product<F: Named>() {
        for (out, inner) in SHAPES {
            let (bytes, w_rows) = weights::<F>(out, inner);
            let w = Matrix { blocks: &bytes, out, inner };
            let deq = Tensor::from_vec(w_rows.concat(), (out, inner), &Device::Cpu).unwrap();
            let row_bytes = inner / QK_K * F::BYTES;
            for rows in ROWS {
                let x = activations(rows, inner);
                let xt = Tensor::from_vec(x.clone(), (rows, inner), &Device::Cpu).unwrap();
                let want = xt.matmul(&deq.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
                for kernel in kernels::<F>() {
                    let got = product(kernel, &x, rows, w);
                    for (r, (got, want)) in got.iter().zip(&want).enumerate() {
                        let xr = &x[r * inner..(r + 1) * inner];
                        let steps: Vec<f32> = xr.chunks_exact(QK_K).map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0).collect();
                        for (o, (wr, wb)) in w_rows.iter().zip(bytes.chunks_exact(row_bytes)).enumerate() {
                            let rounding: f32 =
                                (wr.chunks_exact(QK_K).zip(&steps)).map(|(wb, &d)| d / 2.0 * wb.iter().map(|v| v.abs()).sum::<f32>()).sum();
                            let terms: f32 = (wb.chunks_exact(F::BYTES).zip(xr.chunks_exact(QK_K)).zip(&steps))
                                .map(|((block, xb), &d)| {
                                    weight_terms::<F>(block).iter().zip(xb).map(|(t, v)| t * (v.abs() + d)).sum::<f32>()
                                })
                                .sum();
                            let (a, b) = (got[o], want[o]);
                            assert!(
                                (a - b).abs() <= rounding + 1e-5 * terms,
                                "{}: inner {inner}, rows {rows}, [{r}, {o}]: {a} vs {b} (rounding bound {rounding})",
                                kernel.name
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn q4_k_kernels_match_the_dequantized_product() {
        every_kernel_matches_the_dequantized_product::<Q4K>();
    }

    #[test]
    fn q5_k_kernels_match_the_dequantized_product() {
        every_kernel_matches_the_dequantized_product::<Q5K>();
    }

    #[test]
    fn q6_k_kernels_match_the_dequantized_product() {
        every_kernel_matches_the_dequantized_product::<Q6K>();
    }

    /// Each kernel against the exact product of the same integers: the dequantized weights
    /// times the quantized activations (`q · d`), summed in f64. With the activation rounding
    /// taken out, only the kernels' f32 sums differ, by 1e-5 of the terms' magnitude at most:
    /// a tighter check than (a), where a misplaced scale could hide inside the rounding bound.
    fn every_kernel_matches_the_exact_integer_product<F: Named>() {
        for (out, inner) in SHAPES {
            let (bytes, w_rows) = weights::<F>(out, inner);
            let w = Matrix { blocks: &bytes, out, inner };
            let row_bytes = inner / QK_K * F::BYTES;
            for rows in ROWS {
                let x = activations(rows, inner);
                let mut xq = QuantizedRows::default();
                quantize(&x, inner, &mut xq);
                for kernel in kernels::<F>() {
                    let got = product(kernel, &x, rows, w);
                    for (r, got) in got.iter().enumerate() {
                        let xhat: Vec<f64> = xq.row(r).iter().flat_map(|b| b.qs.map(|q| f64::from(q) * f64::from(b.d))).collect();
                        for (o, (wr, wb)) in w_rows.iter().zip(bytes.chunks_exact(row_bytes)).enumerate() {
                            let want: f64 = wr.iter().zip(&xhat).map(|(&w, &v)| f64::from(w) * v).sum();
                            let terms: f64 =
                                wb.chunks_exact(F::BYTES).flat_map(weight_terms::<F>).zip(&xhat).map(|(t, v)| f64::from(t) * v.abs()).sum();
                            assert!(
                                (f64::from(got[o]) - want).abs() <= 1e-5 * terms,
                                "{}: inner {inner}, rows {rows}, [{r}, {o}]: {} vs {want}",
                                kernel.name,
                                got[o]
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn q4_k_kernels_match_the_exact_integer_product() {
        every_kernel_matches_the_exact_integer_product::<Q4K>();
    }

    #[test]
    fn q5_k_kernels_match_the_exact_integer_product() {
        every_kernel_matches_the_exact_integer_product::<Q5K>();
    }

    #[test]
    fn q6_k_kernels_match_the_exact_integer_product() {
        every_kernel_matches_the_exact_integer_product::<Q6K>();
    }

    /// (b) The portable and AVX2 kernels agree to float summation order: within 1e-5 of the
    /// magnitude of the terms, every row count from 1 to `MAX_ROWS` (each remainder of the
    /// x86 kernels' groups of four).
    fn kernels_agree<F: Named>() {
        let all = kernels::<F>();
        if all.len() < 2 {
            return; // `kernels` said which path is missing
        }
        let (out, inner) = (70, 768);
        let (bytes, w_rows) = weights::<F>(out, inner);
        let w = Matrix { blocks: &bytes, out, inner };
        for rows in 1..=MAX_ROWS {
            let x = activations(rows, inner);
            let results: Vec<_> = all.iter().map(|&k| product(k, &x, rows, w)).collect();
            for (r, xr) in x.chunks_exact(inner).enumerate() {
                for (o, wr) in w_rows.iter().enumerate() {
                    let magnitude: f32 = wr.iter().zip(xr).map(|(a, b)| (a * b).abs()).sum();
                    let (a, b) = (results[0][r][o], results[1][r][o]);
                    assert!((a - b).abs() <= 1e-5 * magnitude, "{} vs {}: rows {rows}, [{r}, {o}]: {a} vs {b}", all[0].name, all[1].name);
                }
            }
        }
    }

    #[test]
    fn kernels_agree_for_every_format() {
        kernels_agree::<Q4K>();
        kernels_agree::<Q5K>();
        kernels_agree::<Q6K>();
    }

    /// (c) bf16 activations give a bf16 product: the f32 product of the same (widened) values,
    /// rounded once.
    #[test]
    fn bf16_activations() {
        let dev = Device::Cpu;
        let (rows, out, inner) = (3, 70, 512);
        let (bytes, _) = weights::<Q6K>(out, inner);
        let x = Tensor::from_vec(activations(rows, inner), (rows, inner), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let half = kquant_matvec_t(&x, &bytes, GgmlDType::Q6K, out, inner).unwrap().expect("fast path");
        assert_eq!(half.dtype(), DType::BF16);
        let wide = kquant_matvec_t(&x.to_dtype(DType::F32).unwrap(), &bytes, GgmlDType::Q6K, out, inner).unwrap().expect("fast path");
        assert_eq!(half.to_vec2::<half::bf16>().unwrap(), wide.to_dtype(DType::BF16).unwrap().to_vec2::<half::bf16>().unwrap());
    }

    /// (c) With a workspace destination, the product is written there, over what it held, and
    /// returned as that tensor; a second product of fewer rows into the same thread's reused
    /// buffers gives the fresh result.
    #[test]
    fn writes_into_the_destination() {
        let dev = Device::Cpu;
        let (rows, out, inner) = (MAX_ROWS, 70, 512);
        let (bytes, _) = weights::<Q4K>(out, inner);
        let x = Tensor::from_vec(activations(rows, inner), (rows, inner), &dev).unwrap();
        let fresh = kquant_matvec_t(&x, &bytes, GgmlDType::Q4K, out, inner).unwrap().expect("fast path");
        let y = Tensor::full(f32::NAN, (rows, out), &dev).unwrap();
        let dest = Dest::new(y.clone(), y.flatten_all().unwrap().narrow(0, 0, 1).unwrap()).unwrap();
        let got = kquant_matvec_into(&x, &bytes, GgmlDType::Q4K, out, inner, Some(&dest)).unwrap().expect("fast path");
        assert!(dest.holds(&got), "the product must be the destination's tensor");
        assert_eq!(y.to_vec2::<f32>().unwrap(), fresh.to_vec2::<f32>().unwrap());
        let one = x.narrow(0, 1, 1).unwrap();
        let again = kquant_matvec_t(&one, &bytes, GgmlDType::Q4K, out, inner).unwrap().expect("fast path");
        assert_eq!(again.to_vec2::<f32>().unwrap()[0], fresh.to_vec2::<f32>().unwrap()[1]);
    }

    /// Rows of no blocks (`in` = 0) are empty sums.
    #[test]
    fn empty_rows() {
        let x = Tensor::zeros((3, 0), DType::F32, &Device::Cpu).unwrap();
        let y = kquant_matvec_t(&x, &[], GgmlDType::Q5K, 5, 0).unwrap().expect("fast path").to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![0f32; 5]; 3]);
    }

    /// (c) `None` where the fast path does not apply.
    #[test]
    fn declines_what_it_cannot_do() {
        let dev = Device::Cpu;
        let data = vec![0u8; 4 * Q4K::BYTES];
        let x = |r: usize, i: usize| Tensor::zeros((r, i), DType::F32, &dev).unwrap();
        let run = |x: &Tensor, data: &[u8], dtype, inner| kquant_matvec_t(x, data, dtype, 4, inner).unwrap();
        assert!(run(&x(1, 256), &data, GgmlDType::Q4K, 256).is_some(), "fits");
        assert!(run(&x(MAX_ROWS + 1, 256), &data, GgmlDType::Q4K, 256).is_none(), "too many rows");
        assert!(run(&x(1, 512), &data, GgmlDType::Q4K, 256).is_none(), "inner mismatch");
        assert!(run(&x(1, 128), &data[..2 * Q4K::BYTES], GgmlDType::Q4K, 128).is_none(), "inner not whole super-blocks");
        assert!(run(&x(1, 256), &data[..3 * Q4K::BYTES], GgmlDType::Q4K, 256).is_none(), "short data");
        assert!(run(&x(1, 256), &data, GgmlDType::Q6K, 256).is_none(), "another format's size");
        assert!(run(&x(1, 256), &data, GgmlDType::Q4_0, 256).is_none(), "not a K-quant");
        assert!(run(&Tensor::zeros((1, 1, 256), DType::F32, &dev).unwrap(), &data, GgmlDType::Q4K, 256).is_none(), "not a matrix");
        assert!(supports(GgmlDType::Q5K) && !supports(GgmlDType::Q3K) && !supports(GgmlDType::Q8_0));
    }
}
