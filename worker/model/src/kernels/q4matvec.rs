//! Matrix–vector products against ggml's 4- and 5-bit block formats (q4_0, q4_1, q5_0, q5_1)
//! for decode (≤ 16 activation rows).
//!
//! `qmatvec.rs`'s design for these blocks: weights stay as stored, rows split over the rayon
//! pool, each weight row read once for every activation row, and the activations quantized to
//! 8 bits per 32-block once per call (as llama.cpp does, scales rounded to f16 as it stores
//! them), so a block's dot product is integer multiply-adds. The weights are unsigned (0..15,
//! or 0..31 with their fifth bit), which is what `vpdpbusd` and `maddubs` take, so no sign
//! trick is needed; the format's offset (q4_0: −8, q5_0: −16) or min (q4_1, q5_1) is a
//! per-block sum of the activation values, known per call. The x86 kernels take eight blocks
//! at a time, their 32-bit words transposed so that each lane holds one block (`load_group`).
//!
//! A block of 32 values: an f16 scale `d`, an f16 min `m` (`_1` formats), four bytes of fifth
//! bits (q5), then 16 bytes of nibbles: byte `j`'s low nibble is value `j`, its high nibble value
//! `16 + j`. Value = (q − offset) · d, or q · d + m.

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use half::f16;

use crate::kernels::elem::Dest;
use crate::kernels::matvec::{product_output, with_f32_rows, Product, MAX_ROWS};
use crate::kernels::pool::with_reused;
use crate::kernels::qmatvec::{quantize_blocks, BLOCK};

/// One of the block formats, as its bytes are read.
trait Format: 'static {
    /// Bytes per block of 32 values.
    const BYTES: usize;
    /// Whether a min follows the scale (value = q · d + m), else value = (q − OFFSET) · d.
    const MIN: bool;
    /// Whether four bytes of fifth bits (bit `e` for value `e`) come before the nibbles.
    const HIGH: bool;
    /// Subtracted from each q (formats without a min).
    const OFFSET: i32 = if Self::MIN {
        0
    } else if Self::HIGH {
        16
    } else {
        8
    };
    /// Where the fifth bits start.
    const QH: usize = if Self::MIN { 4 } else { 2 };
    /// Where the nibbles start.
    const QS: usize = Self::QH + if Self::HIGH { 4 } else { 0 };
}

#[allow(non_camel_case_types)]
struct Q4_0;
#[allow(non_camel_case_types)]
struct Q4_1;
#[allow(non_camel_case_types)]
struct Q5_0;
#[allow(non_camel_case_types)]
struct Q5_1;

impl Format for Q4_0 {
    const BYTES: usize = 18;
    const MIN: bool = false;
    const HIGH: bool = false;
}

impl Format for Q4_1 {
    const BYTES: usize = 20;
    const MIN: bool = true;
    const HIGH: bool = false;
}

impl Format for Q5_0 {
    const BYTES: usize = 22;
    const MIN: bool = false;
    const HIGH: bool = true;
}

impl Format for Q5_1 {
    const BYTES: usize = 24;
    const MIN: bool = true;
    const HIGH: bool = true;
}

/// Whether [`q4_matvec_t`] multiplies weights of this type.
pub fn supports(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1)
}

/// `x Wᵀ` for `x` `[rows ≤ MAX_ROWS, in]` on the CPU and `blocks` of type `dtype` (q4_0, q4_1,
/// q5_0 or q5_1) holding `W` `[out, in]` row by row; returns `[rows, out]` in `x`'s dtype.
/// `None` when the fast path does not apply.
pub fn q4_matvec_t(x: &Tensor, blocks: &[u8], dtype: GgmlDType, out: usize, inner: usize) -> candle_core::Result<Option<Tensor>> {
    q4_matvec_into(x, blocks, dtype, out, inner, None)
}

/// [`q4_matvec_t`] into `dest`, where it fits.
pub(crate) fn q4_matvec_into(
    x: &Tensor,
    blocks: &[u8],
    dtype: GgmlDType,
    out: usize,
    inner: usize,
    dest: Option<&Dest>,
) -> candle_core::Result<Option<Tensor>> {
    let p = Matrix { blocks, out, inner };
    match dtype {
        GgmlDType::Q4_0 => matvec_with(kernel::<Q4_0>(), x, p, dest),
        GgmlDType::Q4_1 => matvec_with(kernel::<Q4_1>(), x, p, dest),
        GgmlDType::Q5_0 => matvec_with(kernel::<Q5_0>(), x, p, dest),
        GgmlDType::Q5_1 => matvec_with(kernel::<Q5_1>(), x, p, dest),
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

/// Activation rows quantized per 32-block, as every kernel reads them. The values are
/// `qmatvec.rs`'s; the scales, and the scale × sum that the min term takes, are rounded to f16
/// as llama.cpp's `block_q8_0` and `block_q8_1` store them, so that a product is llama.cpp's
/// up to the order of the float sums (with f32 scales it was nearer the exact product, and
/// further from llama.cpp's tokens: `tests/smollm2.rs`).
#[derive(Default)]
struct QuantizedRows {
    /// `[rows, in]` 8-bit values.
    q: Vec<i8>,
    /// `[rows, blocks]` scales.
    d: Vec<f32>,
    /// `[rows, blocks]` sums of each block's values (for the offset).
    sums: Vec<i32>,
    /// `[rows, blocks]` scale × sum of each block (for the min).
    ds: Vec<f32>,
    /// Blocks per row.
    blocks: usize,
    /// The same rows as the x86 kernels read them (`lay_out`), `[rows, groups]`; empty for
    /// the portable kernel.
    #[cfg(target_arch = "x86_64")]
    lanes: Vec<LaneGroup>,
}

thread_local! {
    /// The calling thread's quantized activations, kept between products.
    static QUANTIZED: std::cell::RefCell<QuantizedRows> = std::cell::RefCell::new(QuantizedRows::default());
}

/// One weight row against every quantized activation row: `y[i] = dot(row, x[i])`.
type Dot = fn(&[u8], &QuantizedRows, &mut [f32]);

/// A dot product for one format, and how it wants the activations.
#[derive(Clone, Copy)]
struct Kernel {
    #[cfg_attr(not(test), allow(dead_code))]
    name: &'static str,
    /// Bytes per block of the format.
    bytes: usize,
    /// The format's offset (0 for formats with a min): the lane layout's starting sums.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    offset: i32,
    /// Whether `dot` reads `QuantizedRows::lanes`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    lanes: bool,
    dot: Dot,
}

impl Kernel {
    fn new<F: Format>(name: &'static str, lanes: bool, dot: Dot) -> Self {
        Self { name, bytes: F::BYTES, offset: F::OFFSET, lanes, dot }
    }
}

/// Picks the best dot product this CPU supports for format `F`, once per call.
fn kernel<F: Format>() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::kernels::qmatvec::has_vnni() {
            return Kernel::new::<F>("avx512vnni", true, dot_vnni_entry::<F>);
        }
        if crate::kernels::qmatvec::has_avx2() {
            return Kernel::new::<F>("avx2", true, dot_avx2_entry::<F>);
        }
    }
    Kernel::new::<F>("portable", false, dot_rows_portable::<F>)
}

/// `x Wᵀ` through `kernel` (one for `W`'s format): the activations quantized once, on the
/// calling thread, then the weight rows split over the pool as in `qmatvec.rs`.
fn matvec_with(kernel: Kernel, x: &Tensor, w: Matrix<'_>, dest: Option<&Dest>) -> candle_core::Result<Option<Tensor>> {
    let Matrix { blocks, out, inner } = w;
    let rows = match x.dims() {
        [r, i] if *i == inner => *r,
        _ => return Ok(None),
    };
    if rows == 0 || rows > MAX_ROWS || !x.device().is_cpu() || !inner.is_multiple_of(BLOCK) {
        return Ok(None);
    }
    let row_bytes = inner / BLOCK * kernel.bytes;
    if blocks.len() != out * row_bytes {
        return Ok(None);
    }
    let p = Product { rows, out, inner };
    let product = |x_rows: &[f32], xq: &mut QuantizedRows| {
        quantize(x_rows, rows, kernel, xq);
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

/// Quantizes `[rows, in]` activations into `xq` (reusing its buffers) as `kernel` reads them.
fn quantize(x: &[f32], rows: usize, kernel: Kernel, xq: &mut QuantizedRows) {
    quantize_blocks(x, &mut xq.q, &mut xq.d);
    xq.blocks = xq.d.len() / rows.max(1);
    xq.sums.clear();
    xq.sums.extend(xq.q.chunks_exact(BLOCK).map(|b| b.iter().map(|&v| i32::from(v)).sum::<i32>()));
    xq.ds.clear();
    xq.ds.extend(xq.d.iter().zip(&xq.sums).map(|(&d, &s)| round_to_f16(d * s as f32)));
    xq.d.iter_mut().for_each(|d| *d = round_to_f16(*d));
    #[cfg(target_arch = "x86_64")]
    {
        xq.lanes.clear();
        if kernel.lanes {
            lay_out(xq, rows, kernel.offset);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = kernel;
}

fn round_to_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// One activation row of [`QuantizedRows`].
#[derive(Clone, Copy)]
struct RowRef<'a> {
    q: &'a [i8],
    d: &'a [f32],
    sums: &'a [i32],
    ds: &'a [f32],
}

impl QuantizedRows {
    fn row(&self, i: usize) -> RowRef<'_> {
        let (b, inner) = (self.blocks, self.blocks * BLOCK);
        let blocks = i * b..(i + 1) * b;
        RowRef {
            q: &self.q[i * inner..(i + 1) * inner],
            d: &self.d[blocks.clone()],
            sums: &self.sums[blocks.clone()],
            ds: &self.ds[blocks],
        }
    }
}

fn dot_rows_portable<F: Format>(row: &[u8], xq: &QuantizedRows, y: &mut [f32]) {
    for (i, yi) in y.iter_mut().enumerate() {
        *yi = dot_portable::<F>(row, xq.row(i));
    }
}

fn f16_at(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// A block's 32 values `q` as stored (unsigned, before the offset or min applies).
fn unpack<F: Format>(block: &[u8]) -> [u8; BLOCK] {
    let qs = &block[F::QS..F::QS + BLOCK / 2];
    let qh = if F::HIGH { u32::from_le_bytes([block[F::QH], block[F::QH + 1], block[F::QH + 2], block[F::QH + 3]]) } else { 0 };
    core::array::from_fn(|e| {
        let nibble = if e < BLOCK / 2 { qs[e] & 0x0F } else { qs[e - BLOCK / 2] >> 4 };
        nibble | (((qh >> e) & 1) as u8 * 0x10)
    })
}

/// One weight row against a quantized activation row: per block, the scales times the exact
/// integer dot product, `Σ q·x − offset · Σ x`, plus, for formats with a min, `m · (d · Σ x)`.
/// The x86 kernels compute the same integers.
fn dot_portable<F: Format>(row: &[u8], x: RowRef<'_>) -> f32 {
    let mut sum = 0f32;
    let blocks = row.chunks_exact(F::BYTES).zip(x.q.chunks_exact(BLOCK)).zip(x.d.iter().zip(x.sums).zip(x.ds));
    for ((block, xb), ((&dx, &s), &ds)) in blocks {
        let q = unpack::<F>(block);
        let int = q.iter().zip(xb).map(|(&w, &v)| i32::from(w) * i32::from(v)).sum::<i32>() - F::OFFSET * s;
        sum += f16_at(block, 0) * dx * int as f32;
        if F::MIN {
            sum += f16_at(block, 2) * ds;
        }
    }
    sum
}

/// Blocks per group of the x86 kernels: the 32-bit lanes of eight blocks fill a 256-bit
/// register.
#[cfg(target_arch = "x86_64")]
const GROUP: usize = 8;

/// One activation row's group of up to eight blocks as the x86 kernels read it: `x[k]`'s lane
/// `j` (bytes `4j..4j + 4`) holds values `4k..4k + 4` of block `j`, the eight-by-eight transpose
/// of the blocks' 32-bit words, which is where `load_group` puts the weights. A register of
/// lane sums then has one block per lane, scaled by one register of scales. Lanes of padding
/// blocks (past the row's last) are zero throughout.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct LaneGroup {
    x: [[i8; 32]; GROUP],
    /// −offset × block `j`'s sum of values: the integer dot product's starting value.
    corr: [i32; GROUP],
    /// Block `j`'s scale.
    d: [f32; GROUP],
    /// Block `j`'s scale × its sum of values (`QuantizedRows::ds`), for the min term.
    s: [f32; GROUP],
}

#[cfg(target_arch = "x86_64")]
const ZERO_GROUP: LaneGroup = LaneGroup { x: [[0; 32]; GROUP], corr: [0; GROUP], d: [0.0; GROUP], s: [0.0; GROUP] };

/// Fills `xq.lanes` from its quantized rows (a plain copy: a small part of a call).
#[cfg(target_arch = "x86_64")]
fn lay_out(xq: &mut QuantizedRows, rows: usize, offset: i32) {
    let QuantizedRows { q, d, sums, ds, blocks, lanes } = xq;
    let blocks = *blocks;
    let per_row = blocks.div_ceil(GROUP);
    lanes.resize(rows * per_row, ZERO_GROUP);
    for (r, row_groups) in lanes.chunks_exact_mut(per_row.max(1)).enumerate() {
        for (g, group) in row_groups.iter_mut().enumerate() {
            for j in 0..(blocks - g * GROUP).min(GROUP) {
                let b = r * blocks + g * GROUP + j;
                for (k, xk) in group.x.iter_mut().enumerate() {
                    xk[4 * j..4 * j + 4].copy_from_slice(&q[b * BLOCK + 4 * k..b * BLOCK + 4 * k + 4]);
                }
                group.corr[j] = -offset * sums[b];
                group.d[j] = d[b];
                group.s[j] = ds[b];
            }
        }
    }
}

/// Eight blocks of a weight row as the x86 kernels read them: `w[k]`'s lane `j` holds values
/// `4k..4k + 4` of block `j` (as `LaneGroup::x`), unsigned; lane `j` of `d` and `m` block `j`'s
/// scale and min (zero without a min, and for blocks past the row's last).
#[cfg(target_arch = "x86_64")]
struct Weights {
    w: [std::arch::x86_64::__m256i; GROUP],
    d: std::arch::x86_64::__m256,
    m: std::arch::x86_64::__m256,
}

/// The `t ≤ 8` blocks of format `F` at `p` as [`Weights`] (zero after them). Block `j`'s 16
/// bytes of nibbles are four 32-bit words `c`, holding values `4c..4c + 4` (low nibbles) and
/// `16 + 4c..` (high nibbles): a four-by-eight transpose of those words (blocks `j` and `j + 4`
/// share a register, then two unpack stages within 128-bit halves) gives each word `c` of all
/// eight blocks in one register, lane `j`, so masking and shifting it gives `w[c]` and
/// `w[c + 4]`. The weights are never rearranged in memory.
///
/// # Safety
/// `p` must point at `t` blocks of `F` (`t * F::BYTES` readable bytes), `t ≤ 8`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load_group<F: Format>(p: *const u8, t: usize) -> Weights {
    use std::arch::x86_64::*;
    // Every read below is of a block j < t, at j * BYTES within the `t` blocks the caller
    // guarantees: its nibbles at QS (16 bytes), its fifth bits at QH (4 bytes), its scale and
    // min (or first nibbles) at 0 (4 bytes); nothing is read for the blocks past `t`.
    let nibbles = |j: usize| {
        if j < t {
            // SAFETY: block j < t's 16 nibble bytes, at QS (above).
            unsafe { _mm_loadu_si128(p.add(j * F::BYTES + F::QS) as *const __m128i) }
        } else {
            _mm_setzero_si128()
        }
    };
    let v: [__m256i; 4] = core::array::from_fn(|j| _mm256_set_m128i(nibbles(j + 4), nibbles(j)));
    let a = [
        _mm256_unpacklo_epi32(v[0], v[1]),
        _mm256_unpackhi_epi32(v[0], v[1]),
        _mm256_unpacklo_epi32(v[2], v[3]),
        _mm256_unpackhi_epi32(v[2], v[3]),
    ];
    let words = [
        _mm256_unpacklo_epi64(a[0], a[2]),
        _mm256_unpackhi_epi64(a[0], a[2]),
        _mm256_unpacklo_epi64(a[1], a[3]),
        _mm256_unpackhi_epi64(a[1], a[3]),
    ];
    let low = _mm256_set1_epi8(0x0F);
    let mut w: [__m256i; GROUP] = core::array::from_fn(|k| match k {
        0..4 => _mm256_and_si256(words[k], low),
        _ => _mm256_and_si256(_mm256_srli_epi16::<4>(words[k - 4]), low),
    });
    if F::HIGH {
        // SAFETY: block j < t's four bytes of fifth bits, at QH (above).
        let qh = |j: usize| if j < t { unsafe { (p.add(j * F::BYTES + F::QH) as *const i32).read_unaligned() } } else { 0 };
        let h = _mm256_setr_epi32(qh(0), qh(1), qh(2), qh(3), qh(4), qh(5), qh(6), qh(7));
        // Value 4k + b's bit is bit 4 (k % 2) + b of byte k / 2: that byte copied to each byte
        // of its lane, then each byte's own bit tested.
        let lane_bytes =
            _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12, 0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
        for (k, wk) in w.iter_mut().enumerate() {
            let bytes = _mm256_shuffle_epi8(h, _mm256_add_epi8(lane_bytes, _mm256_set1_epi8((k / 2) as i8)));
            let bits = _mm256_set1_epi32(if k % 2 == 0 { 0x0804_0201 } else { 0x8040_2010_u32 as i32 });
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bits), bits);
            *wk = _mm256_or_si256(*wk, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
        }
    }
    // Each block's first four bytes (its scale, then its min or two other bytes) in lane j;
    // the scales gathered into the low 128 bits, the mins into the high, widened with F16C.
    // Packing 16-bit scalars into 64-bit registers took three times the instructions.
    // SAFETY: block j < t's first four bytes (above).
    let head = |j: usize| if j < t { unsafe { (p.add(j * F::BYTES) as *const i32).read_unaligned() } } else { 0 };
    let heads = _mm256_setr_epi32(head(0), head(1), head(2), head(3), head(4), head(5), head(6), head(7));
    let split =
        _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    let halves = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(heads, split));
    let d = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
    let m = if F::MIN { _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(halves)) } else { _mm256_setzero_ps() };
    Weights { w, d, m }
}

/// The per-lane sums of each of `N` rows into `y`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn store_sums<const N: usize>(total: [std::arch::x86_64::__m256; N], y: &mut [f32]) {
    use std::arch::x86_64::*;
    if N > 4 {
        // Eight rows' lane sums at once, as `qmatvec.rs` does.
        let t: [__m256; 8] = core::array::from_fn(|r| total.get(r).copied().unwrap_or(_mm256_setzero_ps()));
        let sums = crate::kernels::qmatvec::sum_rows8(t);
        let mut out = [0f32; 8];
        // SAFETY: eight floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sums) };
        y.copy_from_slice(&out[..N]);
    } else {
        for (o, t) in y.iter_mut().zip(total) {
            *o = crate::kernels::qmatvec::horizontal_sum(t);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn dot_vnni_entry<F: Format>(row: &[u8], xq: &QuantizedRows, y: &mut [f32]) {
    let per_row = xq.blocks.div_ceil(GROUP);
    let laid_out = row.len() == xq.blocks * F::BYTES && xq.lanes.len() == y.len() * per_row;
    debug_assert!(laid_out, "activations not laid out for this kernel");
    if !laid_out {
        return dot_rows_portable::<F>(row, xq, y);
    }
    // Up to eight activation rows share each group's weight loads and unpacking.
    for (c, y) in y.chunks_mut(8).enumerate() {
        let x = &xq.lanes[c * 8 * per_row..];
        // SAFETY: only selected by `kernel` after checking the CPU for AVX-512 F/BW/VL/VNNI,
        // AVX2, FMA and F16C.
        unsafe {
            match y.len() {
                8 => dot_vnni::<F, 8>(row, x, per_row, y),
                7 => dot_vnni::<F, 7>(row, x, per_row, y),
                6 => dot_vnni::<F, 6>(row, x, per_row, y),
                5 => dot_vnni::<F, 5>(row, x, per_row, y),
                4 => dot_vnni::<F, 4>(row, x, per_row, y),
                3 => dot_vnni::<F, 3>(row, x, per_row, y),
                2 => dot_vnni::<F, 2>(row, x, per_row, y),
                _ => dot_vnni::<F, 1>(row, x, per_row, y),
            }
        }
    }
}

/// One weight row against `N` activation rows (`x`, `per_row` groups each) with AVX-512 VNNI's
/// `vpdpbusd`: unsigned weight bytes times signed activation bytes, four products summed into
/// each 32-bit lane, one instruction per register of a group and activation row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_vnni<F: Format, const N: usize>(row: &[u8], x: &[LaneGroup], per_row: usize, y: &mut [f32]) {
    use std::arch::x86_64::*;
    let blocks = row.len() / F::BYTES;
    let mut total = [_mm256_setzero_ps(); N];
    for g in 0..blocks.div_ceil(GROUP) {
        let t = (blocks - g * GROUP).min(GROUP);
        let p = row[g * GROUP * F::BYTES..].as_ptr();
        // SAFETY: the row holds blocks g * 8..g * 8 + t.
        let w = unsafe {
            if t == GROUP {
                load_group::<F>(p, GROUP)
            } else {
                load_group::<F>(p, t)
            }
        };
        accumulate_vnni::<F, N>(&w, core::array::from_fn(|r| &x[r * per_row + g]), &mut total);
    }
    store_sums(total, y);
}

/// One group of `dot_vnni` against `N` activation rows' `LaneGroup`s, into `total`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2,fma")]
fn accumulate_vnni<F: Format, const N: usize>(w: &Weights, x: [&LaneGroup; N], total: &mut [std::arch::x86_64::__m256; N]) {
    use std::arch::x86_64::*;
    // SAFETY: `load` reads one of a LaneGroup's 32-byte registers.
    let load = |v: &[i8; 32]| unsafe { _mm256_loadu_si256(v.as_ptr() as *const __m256i) };
    // SAFETY: a LaneGroup's starting sums are 32 bytes.
    let mut int = x.map(|x| if F::MIN { _mm256_setzero_si256() } else { unsafe { _mm256_loadu_si256(x.corr.as_ptr() as *const __m256i) } });
    if N == 1 {
        // One row: two dependency chains through vpdpbusd's latency instead of one.
        let mut odd = _mm256_setzero_si256();
        for k in (0..GROUP).step_by(2) {
            int[0] = _mm256_dpbusd_epi32(int[0], w.w[k], load(&x[0].x[k]));
            odd = _mm256_dpbusd_epi32(odd, w.w[k + 1], load(&x[0].x[k + 1]));
        }
        int[0] = _mm256_add_epi32(int[0], odd);
    } else {
        for (k, wk) in w.w.iter().enumerate() {
            for (acc, x) in int.iter_mut().zip(&x) {
                *acc = _mm256_dpbusd_epi32(*acc, *wk, load(&x.x[k]));
            }
        }
    }
    for ((t, acc), x) in total.iter_mut().zip(int).zip(&x) {
        scale_into::<F>(t, acc, w, x);
    }
}

/// `t += acc · d_w · d_x`, plus `m_w · d_x · Σx` for formats with a min, lane by lane.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn scale_into<F: Format>(t: &mut std::arch::x86_64::__m256, acc: std::arch::x86_64::__m256i, w: &Weights, x: &LaneGroup) {
    use std::arch::x86_64::*;
    // SAFETY: `d` and `s` are eight f32.
    let (d, s) = unsafe { (_mm256_loadu_ps(x.d.as_ptr()), _mm256_loadu_ps(x.s.as_ptr())) };
    *t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_mul_ps(w.d, d), *t);
    if F::MIN {
        *t = _mm256_fmadd_ps(w.m, s, *t);
    }
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2_entry<F: Format>(row: &[u8], xq: &QuantizedRows, y: &mut [f32]) {
    let per_row = xq.blocks.div_ceil(GROUP);
    let laid_out = row.len() == xq.blocks * F::BYTES && xq.lanes.len() == y.len() * per_row;
    debug_assert!(laid_out, "activations not laid out for this kernel");
    if !laid_out {
        return dot_rows_portable::<F>(row, xq, y);
    }
    // Four activation rows at a time: with the eight weight registers they fill AVX2's sixteen.
    for (c, y) in y.chunks_mut(4).enumerate() {
        let x = &xq.lanes[c * 4 * per_row..];
        // SAFETY: only selected by `kernel` after checking the CPU for AVX2, FMA and F16C.
        unsafe {
            match y.len() {
                4 => dot_avx2::<F, 4>(row, x, per_row, y),
                3 => dot_avx2::<F, 3>(row, x, per_row, y),
                2 => dot_avx2::<F, 2>(row, x, per_row, y),
                _ => dot_avx2::<F, 1>(row, x, per_row, y),
            }
        }
    }
}

/// `dot_vnni` with AVX2's `maddubs` (unsigned × signed byte pairs summed into i16) and `madd`
/// (i16 pairs into i32) in place of `vpdpbusd`. A pair is at most 2 × 15 × 128 in magnitude
/// (2 × 31 × 128 with fifth bits), so the pairs of eight registers (of four) are summed in i16
/// before one `madd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_avx2<F: Format, const N: usize>(row: &[u8], x: &[LaneGroup], per_row: usize, y: &mut [f32]) {
    use std::arch::x86_64::*;
    let blocks = row.len() / F::BYTES;
    let mut total = [_mm256_setzero_ps(); N];
    for g in 0..blocks.div_ceil(GROUP) {
        let t = (blocks - g * GROUP).min(GROUP);
        let p = row[g * GROUP * F::BYTES..].as_ptr();
        // SAFETY: the row holds blocks g * 8..g * 8 + t.
        let w = unsafe {
            if t == GROUP {
                load_group::<F>(p, GROUP)
            } else {
                load_group::<F>(p, t)
            }
        };
        accumulate_avx2::<F, N>(&w, core::array::from_fn(|r| &x[r * per_row + g]), &mut total);
    }
    store_sums(total, y);
}

/// One group of `dot_avx2` against `N` activation rows' `LaneGroup`s, into `total`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn accumulate_avx2<F: Format, const N: usize>(w: &Weights, x: [&LaneGroup; N], total: &mut [std::arch::x86_64::__m256; N]) {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    for (t, x) in total.iter_mut().zip(x) {
        // SAFETY: a LaneGroup's registers are 32 bytes each.
        let pair = |k: usize| _mm256_maddubs_epi16(w.w[k], unsafe { _mm256_loadu_si256(x.x[k].as_ptr() as *const __m256i) });
        let four = |k: usize| _mm256_add_epi16(_mm256_add_epi16(pair(k), pair(k + 1)), _mm256_add_epi16(pair(k + 2), pair(k + 3)));
        let int = if F::HIGH {
            _mm256_add_epi32(_mm256_madd_epi16(four(0), ones), _mm256_madd_epi16(four(4), ones))
        } else {
            _mm256_madd_epi16(_mm256_add_epi16(four(0), four(4)), ones)
        };
        let int = if F::MIN {
            int
        } else {
            // SAFETY: `corr` is eight i32.
            _mm256_add_epi32(int, unsafe { _mm256_loadu_si256(x.corr.as_ptr() as *const __m256i) })
        };
        scale_into::<F>(t, int, w, x);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{DType, Device};

    /// The formats' ggml types and test names, to run each test for every format.
    trait Named: Format {
        const DTYPE: GgmlDType;
    }
    impl Named for Q4_0 {
        const DTYPE: GgmlDType = GgmlDType::Q4_0;
    }
    impl Named for Q4_1 {
        const DTYPE: GgmlDType = GgmlDType::Q4_1;
    }
    impl Named for Q5_0 {
        const DTYPE: GgmlDType = GgmlDType::Q5_0;
    }
    impl Named for Q5_1 {
        const DTYPE: GgmlDType = GgmlDType::Q5_1;
    }

    /// Every kernel this CPU can run for `F` (the one `kernel()` picks first). The first call
    /// records the kernels this CPU cannot run (`kernel_paths`), which the tests then do not check.
    fn kernels<F: Format>() -> Vec<Kernel> {
        let mut all = vec![kernel::<F>()];
        let mut cannot: Vec<&str> = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            match crate::kernels::qmatvec::has_vnni() {
                true => all.push(Kernel::new::<F>("avx512vnni", true, dot_vnni_entry::<F>)),
                false => cannot.push("avx512vnni"),
            }
            match crate::kernels::qmatvec::has_avx2() {
                true => all.push(Kernel::new::<F>("avx2", true, dot_avx2_entry::<F>)),
                false => cannot.push("avx2"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        cannot.extend(["avx512vnni", "avx2"]);
        static REPORTED: std::sync::Once = std::sync::Once::new();
        REPORTED.call_once(|| {
            for path in &cannot {
                crate::kernels::kernel_paths::not_exercised(&format!("q4matvec {path}"));
            }
        });
        all.push(Kernel::new::<F>("portable", false, dot_rows_portable::<F>));
        all.dedup_by_key(|k| k.name);
        all
    }

    /// `rows` activation rows of `inner` values, irregular, of varied scales per block, with an
    /// all-zero block (scale 0) where there is room.
    fn activations(rows: usize, inner: usize) -> Vec<f32> {
        let mut x: Vec<f32> =
            (0..rows * inner).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / (50.0 + (i / BLOCK % 5) as f32 * 40.0)).collect();
        if inner >= 2 * BLOCK {
            x[inner - BLOCK..inner].fill(0.0);
        }
        x
    }

    /// `out` rows of `inner` values of format `F` whose bytes run through every nibble and
    /// fifth-bit pattern, with varied scales and mins of both signs.
    fn weight_rows<F: Format>(out: usize, inner: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(out * inner / BLOCK * F::BYTES);
        for b in 0..out * inner / BLOCK {
            bytes.extend_from_slice(&f16::from_f32(0.001 + (b % 7) as f32 * 0.013).to_le_bytes());
            if F::MIN {
                bytes.extend_from_slice(&f16::from_f32((b % 5) as f32 * 0.02 - 0.05).to_le_bytes());
            }
            if F::HIGH {
                bytes.extend_from_slice(&((b as u32).wrapping_mul(2_654_435_761)).to_le_bytes());
            }
            bytes.extend((0..BLOCK / 2).map(|i| ((b * 31 + i * 89) % 256) as u8));
        }
        bytes
    }

    /// `x` (`rows` rows) quantized by the scalar quantizer, as `dot_portable` reads it:
    /// llama.cpp's `quantize_row_q8_1`.
    fn scalar_quantized(x: &[f32], rows: usize) -> QuantizedRows {
        let mut q = vec![0i8; x.len()];
        let d: Vec<f32> =
            x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).map(|(xb, qb)| crate::kernels::qmatvec::quantize_block(xb, qb)).collect();
        let sums: Vec<i32> = q.chunks_exact(BLOCK).map(|b| b.iter().map(|&v| i32::from(v)).sum()).collect();
        let ds = d.iter().zip(&sums).map(|(&d, &s)| f16::from_f32(d * s as f32).to_f32()).collect();
        let d = d.iter().map(|&d| f16::from_f32(d).to_f32()).collect();
        QuantizedRows { blocks: x.len() / BLOCK / rows, q, d, sums, ds, ..QuantizedRows::default() }
    }

    fn product(kernel: Kernel, x: &[f32], rows: usize, w: Matrix<'_>) -> Vec<Vec<f32>> {
        let x = Tensor::from_vec(x.to_vec(), (rows, w.inner), &Device::Cpu).unwrap();
        let y = matvec_with(kernel, &x, w, None).unwrap().expect("fast path");
        y.to_vec2::<f32>().unwrap()
    }

    /// Each kernel this CPU runs, through the whole product (quantization, lane layout, the
    /// pool's tiles), against `dot_portable` on the scalar quantizer's rows: the integers are
    /// exact, so only the float summation order differs (tolerance relative to the sum of the
    /// blocks' magnitudes). Widths below, at and past the eight-block groups; 1 to 16 rows.
    fn every_kernel_matches_the_scalar_reference<F: Format>() {
        for inner in [32usize, 64, 96, 128, 160, 224, 256, 288, 576, 1536] {
            let out = 9;
            let weights = weight_rows::<F>(out, inner);
            let w = Matrix { blocks: &weights, out, inner };
            let row_bytes = inner / BLOCK * F::BYTES;
            for rows in 1..=MAX_ROWS {
                let x = activations(rows, inner);
                let xq = scalar_quantized(&x, rows);
                for kernel in kernels::<F>() {
                    let y = product(kernel, &x, rows, w);
                    for (r, yr) in y.iter().enumerate() {
                        let xr = xq.row(r);
                        for (o, (&got, row)) in yr.iter().zip(weights.chunks_exact(row_bytes)).enumerate() {
                            let want = dot_portable::<F>(row, xr);
                            let magnitude: f32 = row
                                .chunks_exact(F::BYTES)
                                .zip(xr.q.chunks_exact(BLOCK).zip(xr.d.iter().zip(xr.sums.iter().zip(xr.ds))))
                                .map(|(b, (qb, (&db, (&sb, &dsb))))| {
                                    let int: i32 = unpack::<F>(b).iter().zip(qb).map(|(&u, &v)| i32::from(u) * i32::from(v)).sum();
                                    let min = if F::MIN { (f16_at(b, 2) * dsb).abs() } else { 0.0 };
                                    (f16_at(b, 0) * db).abs() * (int.abs() + F::OFFSET * sb.abs()) as f32 + min
                                })
                                .sum();
                            assert!(
                                (got - want).abs() <= 1e-5 * magnitude.max(f32::MIN_POSITIVE),
                                "{}: inner {inner}, rows {rows}, out row {o}, activation row {r}: {got} vs {want}",
                                kernel.name
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn q4_0_kernels_match_the_scalar_reference() {
        every_kernel_matches_the_scalar_reference::<Q4_0>();
    }

    #[test]
    fn q4_1_kernels_match_the_scalar_reference() {
        every_kernel_matches_the_scalar_reference::<Q4_1>();
    }

    #[test]
    fn q5_0_kernels_match_the_scalar_reference() {
        every_kernel_matches_the_scalar_reference::<Q5_0>();
    }

    #[test]
    fn q5_1_kernels_match_the_scalar_reference() {
        every_kernel_matches_the_scalar_reference::<Q5_1>();
    }

    /// Each kernel within activation-quantization error of candle's f32 product on the weights
    /// dequantized: per block, rounding moves each activation by at most half its scale, so
    /// the product moves by at most that times the block's Σ |w|; rounding the scales (and
    /// scale × sum) to f16 moves each block's terms by at most 2⁻¹¹ of their size, which
    /// `(|w| + |m|) (|x| + d)` summed bounds twice over.
    fn every_kernel_matches_candle_on_dequantized_weights<F: Named>() {
        let dev = Device::Cpu;
        for inner in [32usize, 64, 96, 576, 1536] {
            let out = 67;
            let w: Vec<f32> = (0..out * inner).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0 + (i % 3) as f32 * 0.1).collect();
            let w = Tensor::from_vec(w, (out, inner), &dev).unwrap();
            let qw = QTensor::quantize(&w, F::DTYPE).unwrap();
            let deq = qw.dequantize(&dev).unwrap();
            let data = qw.data().unwrap();
            let m = Matrix { blocks: &data, out, inner };
            let deq_rows = deq.to_vec2::<f32>().unwrap();
            for rows in 1..=MAX_ROWS {
                let x = activations(rows, inner);
                let xd: Vec<f32> = x.chunks_exact(BLOCK).map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0).collect();
                let xt = Tensor::from_vec(x.clone(), (rows, inner), &dev).unwrap();
                let want = xt.matmul(&deq.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
                for kernel in kernels::<F>() {
                    let got = product(kernel, &x, rows, m);
                    for r in 0..rows {
                        let (xr, xdr) = (&x[r * inner..(r + 1) * inner], &xd[r * inner / BLOCK..(r + 1) * inner / BLOCK]);
                        for (o, wr) in deq_rows.iter().enumerate() {
                            let rounding: f32 =
                                wr.chunks_exact(BLOCK).zip(xdr).map(|(wb, &d)| d / 2.0 * wb.iter().map(|v| v.abs()).sum::<f32>()).sum();
                            let magnitude: f32 = wr.iter().zip(xr).map(|(a, b)| (a * b).abs()).sum();
                            let row = &data[o * inner / BLOCK * F::BYTES..(o + 1) * inner / BLOCK * F::BYTES];
                            let scales: f32 = (wr.chunks_exact(BLOCK).zip(xr.chunks_exact(BLOCK)).zip(xdr).zip(row.chunks_exact(F::BYTES)))
                                .map(|(((wb, xb), &d), block)| {
                                    let m = if F::MIN { f16_at(block, 2).abs() } else { 0.0 };
                                    wb.iter().zip(xb).map(|(w, x)| (w.abs() + m) * (x.abs() + d)).sum::<f32>()
                                })
                                .sum();
                            let (a, b) = (got[r][o], want[r][o]);
                            assert!(
                                (a - b).abs() <= rounding * 1.001 + 1e-3 * scales + 1e-5 * magnitude,
                                "{}: inner {inner}, rows {rows}, [{r}, {o}]: {a} vs {b} (bound {rounding})",
                                kernel.name
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn q4_0_kernels_match_candle_on_dequantized_weights() {
        every_kernel_matches_candle_on_dequantized_weights::<Q4_0>();
    }

    #[test]
    fn q4_1_kernels_match_candle_on_dequantized_weights() {
        every_kernel_matches_candle_on_dequantized_weights::<Q4_1>();
    }

    #[test]
    fn q5_0_kernels_match_candle_on_dequantized_weights() {
        every_kernel_matches_candle_on_dequantized_weights::<Q5_0>();
    }

    #[test]
    fn q5_1_kernels_match_candle_on_dequantized_weights() {
        every_kernel_matches_candle_on_dequantized_weights::<Q5_1>();
    }

    /// `unpack` reads the values where ggml stores them: (q − offset) · d, or q · d + m, is
    /// candle's dequantization, bit for bit.
    fn unpacks_as_candle_dequantizes<F: Named>() {
        let dev = Device::Cpu;
        let (out, inner) = (5, 96);
        let w: Vec<f32> = (0..out * inner).map(|i| ((i * 7919 % 1013) as f32 - 400.0) / 300.0).collect();
        let qw = QTensor::quantize(&Tensor::from_vec(w, (out, inner), &dev).unwrap(), F::DTYPE).unwrap();
        let want = qw.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got: Vec<f32> = qw
            .data()
            .unwrap()
            .chunks_exact(F::BYTES)
            .flat_map(|b| {
                let (d, m) = (f16_at(b, 0), if F::MIN { f16_at(b, 2) } else { 0.0 });
                unpack::<F>(b).map(|q| if F::MIN { f32::from(q) * d + m } else { (i32::from(q) - F::OFFSET) as f32 * d })
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn every_format_unpacks_as_candle_dequantizes() {
        unpacks_as_candle_dequantizes::<Q4_0>();
        unpacks_as_candle_dequantizes::<Q4_1>();
        unpacks_as_candle_dequantizes::<Q5_0>();
        unpacks_as_candle_dequantizes::<Q5_1>();
    }

    /// With a workspace destination, the product is written there and returned as that tensor;
    /// bf16 activations give a bf16 product.
    #[test]
    fn writes_into_the_destination() {
        let dev = Device::Cpu;
        let (rows, out, inner) = (3, 70, 576);
        let weights = weight_rows::<Q4_1>(out, inner);
        let x = Tensor::from_vec(activations(rows, inner), (rows, inner), &dev).unwrap();
        let fresh = q4_matvec_t(&x, &weights, GgmlDType::Q4_1, out, inner).unwrap().expect("fast path");
        let y = Tensor::zeros((rows, out), DType::F32, &dev).unwrap();
        let dest = Dest::new(y.clone(), y.flatten_all().unwrap().narrow(0, 0, 1).unwrap()).unwrap();
        let got = q4_matvec_into(&x, &weights, GgmlDType::Q4_1, out, inner, Some(&dest)).unwrap().expect("fast path");
        assert!(dest.holds(&got), "the product must be the destination's tensor");
        assert_eq!(y.to_vec2::<f32>().unwrap(), fresh.to_vec2::<f32>().unwrap());
        let half = q4_matvec_t(&x.to_dtype(DType::BF16).unwrap(), &weights, GgmlDType::Q4_1, out, inner).unwrap().expect("fast path");
        assert_eq!(half.dtype(), DType::BF16);
    }

    /// Rows of no blocks (`in` = 0) are empty sums.
    #[test]
    fn empty_rows() {
        let x = Tensor::zeros((3, 0), DType::F32, &Device::Cpu).unwrap();
        let y = q4_matvec_t(&x, &[], GgmlDType::Q4_0, 5, 0).unwrap().expect("fast path").to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![0f32; 5]; 3]);
    }

    #[test]
    fn declines_what_it_cannot_do() {
        let dev = Device::Cpu;
        let data = vec![0u8; 4 * 20];
        let x = |r: usize, i: usize| Tensor::zeros((r, i), DType::F32, &dev).unwrap();
        let run = |x: &Tensor, data: &[u8], dtype| q4_matvec_t(x, data, dtype, 4, 32).unwrap();
        assert!(run(&x(1, 32), &data, GgmlDType::Q4_1).is_some(), "fits");
        assert!(run(&x(MAX_ROWS + 1, 32), &data, GgmlDType::Q4_1).is_none(), "too many rows");
        assert!(run(&x(1, 64), &data, GgmlDType::Q4_1).is_none(), "inner mismatch");
        assert!(run(&x(1, 32), &data[..60], GgmlDType::Q4_1).is_none(), "short data");
        assert!(run(&x(1, 32), &data, GgmlDType::Q4_0).is_none(), "another format's size");
        assert!(run(&x(1, 32), &data, GgmlDType::Q8_0).is_none(), "not a 4- or 5-bit format");
        assert!(!supports(GgmlDType::Q8_0) && supports(GgmlDType::Q5_1));
    }
}
