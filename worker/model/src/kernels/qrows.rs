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
        let y = if dtype == GgmlDType::Q8_0 {
            crate::kernels::qmatvec::q8_0_matvec_t(&piece, blocks, out, inner)?
        } else if crate::kernels::q4matvec::supports(dtype) {
            crate::kernels::q4matvec::q4_matvec_t(&piece, blocks, dtype, out, inner)?
        } else {
            crate::kernels::kquant::kquant_matvec_t(&piece, blocks, dtype, out, inner)?
        };
        match y {
            Some(y) => pieces.push(y),
            None => return Ok(None),
        }
    }
    if pieces.len() == 1 {
        return Ok(pieces.pop());
    }
    Tensor::cat(&pieces, 0).map(Some)
}
