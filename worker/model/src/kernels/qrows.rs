//! Block-quantized products for any number of activation rows through the decode row kernels,
//! [`MAX_ROWS`] rows per call: prefill of the 4- and 5-bit and K-quant formats, and of every
//! block format under `Numerics::BatchInvariant`.
//!
//! Each row kernel gives a row the same bits however many rows share its call (the lane sums
//! of one row and of eight are added in one order, `qmatvec::horizontal_sum`), so through here
//! a prompt's rows come out the same whether it is prefilled whole, in chunks of any length, or
//! after a cached prefix, and the same as the tokens decoded one by one. The activations are
//! quantized per block as in decode (as llama.cpp prefills). The alternative, widening every
//! weight matrix to f32 for a GEMM on each prefill step, cost about 0.9 s per step on
//! SmolLM2-135M Q4_1 however short the chunk, and its sums depend on the chunk's shape.

use candle_core::quantized::GgmlDType;
use candle_core::Tensor;

use crate::kernels::elem::Dest;
use crate::kernels::matvec::MAX_ROWS;

/// Whether [`quantized_rows_t`] multiplies `dtype`'s blocks.
pub fn supports(dtype: GgmlDType) -> bool {
    dtype == GgmlDType::Q8_0 || crate::kernels::q4matvec::supports(dtype) || crate::kernels::kquant::supports(dtype)
}

/// `x Wᵀ` for `x` `[rows, inner]` (any row count) and block-quantized `W` (`[out, inner]`, its
/// `blocks` row by row in `dtype`), in `x`'s dtype. `None` where the row kernels decline.
pub fn quantized_rows_t(x: &Tensor, blocks: &[u8], dtype: GgmlDType, out: usize, inner: usize) -> candle_core::Result<Option<Tensor>> {
    let rows = match x.dims() {
        [r, i] if *i == inner => *r,
        _ => return Ok(None),
    };
    if rows == 0 || !supports(dtype) {
        return Ok(None);
    }
    let mut pieces = Vec::with_capacity(rows.div_ceil(MAX_ROWS));
    for start in (0..rows).step_by(MAX_ROWS) {
        let piece = x.narrow(0, start, MAX_ROWS.min(rows - start))?;
        match row_kernel_into(&piece, blocks, dtype, out, inner, None)? {
            Some(y) => pieces.push(y),
            None => return Ok(None),
        }
    }
    if pieces.len() == 1 {
        return Ok(pieces.pop());
    }
    Tensor::cat(&pieces, 0).map(Some)
}

/// `x Wᵀ` for at most [`MAX_ROWS`] rows through `dtype`'s row kernel (`qmatvec.rs`,
/// `q4matvec.rs` or `kquant.rs`), into `dest` where it fits: a decode step's product, or one
/// piece of [`quantized_rows_t`]. `None` where the kernel declines or the format has none.
pub(crate) fn row_kernel_into(
    x: &Tensor,
    blocks: &[u8],
    dtype: GgmlDType,
    out: usize,
    inner: usize,
    dest: Option<&Dest>,
) -> candle_core::Result<Option<Tensor>> {
    if dtype == GgmlDType::Q8_0 {
        crate::kernels::qmatvec::q8_0_matvec_into(x, blocks, out, inner, dest)
    } else if crate::kernels::q4matvec::supports(dtype) {
        crate::kernels::q4matvec::q4_matvec_into(x, blocks, dtype, out, inner, dest)
    } else if crate::kernels::kquant::supports(dtype) {
        crate::kernels::kquant::kquant_matvec_into(x, blocks, dtype, out, inner, dest)
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    use super::*;

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        let mut rng = crate::sampling::sampler::SeededRng::new(seed);
        let v: Vec<f32> = (0..rows * cols).map(|_| (rng.next_f64() as f32 - 0.5) * 4.0).collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("tensor")
    }

    fn rows_of(t: &Tensor) -> Vec<Vec<u32>> {
        t.to_vec2::<f32>().expect("to host").iter().map(|r| r.iter().map(|v| v.to_bits()).collect()).collect()
    }

    /// The property prefill relies on: a row's result is the same bits alone, in a call of any
    /// row count, or cut anywhere, for every block format this CPU runs (40 rows: two full
    /// 16-row calls and a call of 8; alone, each row takes the kernels' one-row path).
    #[test]
    fn a_rows_bits_do_not_depend_on_the_rows_beside_it() {
        let (out, inner, rows) = (37, 512, 40);
        let w = random(out, inner, 1);
        let x = random(rows, inner, 2);
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&w, dtype).expect("quantize");
            let blocks = q.data().expect("blocks");
            let product = |x: &Tensor| rows_of(&quantized_rows_t(x, &blocks, dtype, out, inner).expect("product").expect("supported"));
            let whole = product(&x);
            assert_eq!(whole.len(), rows);
            for (r, want) in whole.iter().enumerate() {
                assert_eq!(&product(&x.narrow(0, r, 1).expect("row"))[0], want, "{dtype:?}: row {r} alone");
            }
            for cut in [5, 17, 33] {
                let mut split = product(&x.narrow(0, 0, cut).expect("head"));
                split.extend(product(&x.narrow(0, cut, rows - cut).expect("tail")));
                assert_eq!(split, whole, "{dtype:?}: cut at {cut}");
            }
            // Not vacuous: the rows differ, and the product is not all zeros.
            assert!(whole[0] != whole[1] && whole[0].iter().any(|&b| b != 0), "{dtype:?}");
        }
    }
}
