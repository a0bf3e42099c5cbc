//! Dense projections with optional bias, stored in Hugging Face's `[out, in]` layout.

use candle_core::{Module, Tensor};

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
        x.matmul(&self.weight.t()?)
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
