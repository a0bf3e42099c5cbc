//! Dense projections with optional bias, stored in Hugging Face's `[out, in]` layout.

use candle_core::{DType, Module, Tensor};

/// `x Wᵀ` for `W` in `[out, in]` layout. Half-precision weights are widened to f32 for the
/// product: candle's CPU half-precision GEMM is several times slower than its f32 GEMM, which
/// more than pays for the conversion (measured in BENCHMARKS.md).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(y) = crate::matvec::matvec_t(x, w)? {
        return Ok(y);
    }
    match w.dtype() {
        DType::BF16 | DType::F16 if w.device().is_cpu() => {
            x.to_dtype(DType::F32)?.matmul(&w.to_dtype(DType::F32)?.t()?)?.to_dtype(x.dtype())
        }
        _ => x.matmul(&w.t()?),
    }
}

/// `y = x Wᵀ + b` for `x` of shape `[tokens, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The projection without its bias; row-parallel layers add the bias after the all-reduce.
    pub fn forward_no_bias(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        matmul_t(x, &self.weight)
    }

    /// Adds the bias (if any) to an already projected `y`.
    pub fn add_bias(&self, y: Tensor) -> candle_core::Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.add_bias(self.forward_no_bias(x)?)
    }
}
