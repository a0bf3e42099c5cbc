//! Dense projections with optional bias, stored in Hugging Face's `[out, in]` layout, either as
//! float tensors or as ggml block-quantized matrices (quantized along `in`, one row at a time).

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Module, Tensor};

use crate::kernels::elem::{is_slice, with_dest_mut, with_slice, with_slice_mut, Dest, Elem};

/// Which arithmetic the products use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Numerics {
    /// The fastest kernel for each shape: the row kernel for a decode batch, GEMM for more rows.
    /// A token's result can then differ in the last bits with the batch it runs in.
    #[default]
    Fast,
    /// One arithmetic per output element whatever the batch: a token's float projections and
    /// attention are bit for bit the same alone, in any batch, or inside a prefill chunk (see
    /// `kernels::matvec::matmul_t_invariant`). Seeded sampling then gives the same tokens under
    /// any load, and a sequence re-prefilled elsewhere continues exactly. Prefill is slower.
    /// Block-quantized weights go through their row kernels at any row count
    /// (`kernels/qrows.rs`), q8_0 prefill included, which is then slower than its int8 GEMM.
    BatchInvariant,
}

/// What rows a step's products carry, which picks their kernel under [`Numerics::Fast`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StepRows {
    /// Decode rows only: the row kernels up to `MAX_ROWS` rows, GEMM past that.
    #[default]
    Decode,
    /// At least one prefill chunk: GEMM at any row count for float and q8_0 weights, the row
    /// kernels at any row count for the other block formats (`kernels/qrows.rs`). A prompt's
    /// rows then get one arithmetic whether it is prefilled whole, in chunks, or after a cached
    /// prefix (a short float suffix would otherwise take the row kernels, whose rounding
    /// differs from GEMM's, and a greedy answer could change with the cache's state).
    Prefill,
}

impl StepRows {
    /// Most rows the row kernels take.
    fn row_kernel_rows(self) -> usize {
        match self {
            Self::Decode => crate::kernels::matvec::MAX_ROWS,
            Self::Prefill => 0,
        }
    }
}

/// `x Wᵀ` for `W` in `[out, in]` layout. bf16 activations and weights use AVX-512 BF16 where
/// the CPU has it (`kernels/gemm/bf16.rs`). Otherwise half-precision weights are widened to f32 for
/// the product: candle's CPU half-precision GEMM is several times slower than its f32 GEMM,
/// which more than pays for the conversion (measured in BENCHMARKS.md). Decode products write
/// into `dest` when it is a fitting workspace tensor (`workspace.rs`).
pub fn matmul_t(x: &Tensor, w: &Tensor, dest: Option<&Dest>, rows: StepRows) -> candle_core::Result<Tensor> {
    let row_kernel_rows = rows.row_kernel_rows();
    if let Some(y) = crate::kernels::gemm::bf16::matmul_t(x, w, dest, row_kernel_rows)? {
        return Ok(y);
    }
    if x.dims().first().is_some_and(|&r| r <= row_kernel_rows) {
        if let Some(y) = crate::kernels::matvec::matvec_t(x, w, dest)? {
            return Ok(y);
        }
    }
    match w.dtype() {
        DType::BF16 | DType::F16 if w.device().is_cpu() => {
            x.to_dtype(DType::F32)?.matmul(&w.to_dtype(DType::F32)?.t()?)?.to_dtype(x.dtype())
        }
        _ => x.matmul(&w.t()?),
    }
}

/// `x Wᵀ` for block-quantized `W`, returning `x`'s dtype:
/// - q8_0 and at most `MAX_ROWS` rows (decode): our row-parallel kernel (`qmatvec.rs`), which
///   quantizes the activations to 8 bits per block as llama.cpp does;
/// - q4_0, q4_1, q5_0, q5_1 and at most `MAX_ROWS` rows: the same design for those blocks
///   (`q4matvec.rs`);
/// - q4_k, q5_k, q6_k and at most `MAX_ROWS` rows: the same design for ggml's 256-value
///   super-blocks, activations quantized to llama.cpp's `block_q8_K` (`kquant.rs`);
/// - q4_0 ... q5_1 and q4_k ... q6_k with more rows (prefill): the same row kernels,
///   `MAX_ROWS` rows per call (`kernels/qrows.rs`), so every row gets the bits it gets in
///   decode, whatever the chunking;
/// - q8_0 and more rows (prefill) on a CPU with AVX-512 VNNI: our int8 GEMM (`kernels/gemm/q8.rs`),
///   activations quantized as in decode; under [`Numerics::BatchInvariant`] the row kernel
///   instead, as for the other formats;
/// - other prefill: f32 GEMM on the dequantized weights;
/// - otherwise (decode of another format: q2_k, q3_k, ...): candle's ggml kernel, which also
///   quantizes the activations.
fn quantized_matmul_t(
    x: &Tensor,
    q: &Arc<QTensor>,
    dest: Option<&Dest>,
    step: StepRows,
    numerics: Numerics,
) -> candle_core::Result<Tensor> {
    let (out, inner) = q.shape().dims2()?;
    let rows = x.dims().first().copied().unwrap_or(0);
    let row_kernel_rows = step.row_kernel_rows();
    let gemm_q8 = q.dtype() == GgmlDType::Q8_0 && numerics == Numerics::Fast && crate::kernels::gemm::q8::available();
    let decode = rows <= row_kernel_rows;
    if (decode || !gemm_q8) && crate::kernels::qrows::supports(q.dtype()) && q.device().is_cpu() {
        let data = q.data()?;
        let y = if decode {
            crate::kernels::qrows::row_kernel_into(x, &data, q.dtype(), out, inner, dest)?
        } else {
            crate::kernels::qrows::quantized_rows_t(x, &data, q.dtype(), out, inner)?
        };
        if let Some(y) = y {
            return Ok(y);
        }
    }
    if q.dtype() == GgmlDType::Q8_0 && q.device().is_cpu() {
        if let Some(y) = crate::kernels::gemm::q8::q8_0_gemm_t(x, &q.data()?, out, inner, row_kernel_rows)? {
            return y.to_dtype(x.dtype());
        }
    }
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    let y = if !decode { x32.matmul(&q.dequantize(&q.device())?.t()?)? } else { QMatMul::QTensor(q.clone()).forward(&x32)? };
    y.to_dtype(x.dtype())
}

/// A ggml block format the linear projections can be quantized to on load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// 32 weights per block: one f16 scale and 32 signed bytes (8.5 bits per weight).
    Q8_0,
    /// 256 weights per super-block of eight 32-weight sub-blocks with 6-bit scales and mins,
    /// 4-bit weights (4.5 bits per weight).
    Q4K,
}

impl Quantization {
    /// Parses the names llama.cpp uses: `q8_0`, `q4_k` (any case).
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "q8_0" => Some(Self::Q8_0),
            "q4_k" => Some(Self::Q4K),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4K => "q4_k",
        }
    }

    pub fn ggml(self) -> GgmlDType {
        match self {
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
        }
    }

    /// Weights per block along a row's `in` dimension.
    pub fn block(self) -> usize {
        self.ggml().block_size()
    }

    /// Stored bytes of `elems` weights (a multiple of the block).
    pub fn bytes(self, elems: u64) -> u64 {
        elems / self.block() as u64 * self.ggml().type_size() as u64
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The model dtype and on-load quantization a weight format name asks for: `f32`, `bf16` or
/// `f16`, or a [`Quantization`] name (projections quantized, everything else f32).
pub fn weight_format(name: &str) -> Option<(DType, Option<Quantization>)> {
    match name {
        "f32" => Some((DType::F32, None)),
        "bf16" => Some((DType::BF16, None)),
        "f16" => Some((DType::F16, None)),
        other => Quantization::from_name(other).map(|q| (DType::F32, Some(q))),
    }
}

/// The weight matrix of a projection, `[out, in]`.
#[derive(Debug, Clone)]
pub enum Weight {
    Float(Tensor),
    /// Block-quantized rows; `quantized_matmul_t` says which kernel multiplies them.
    /// Activations stay f32 outside the product.
    Quantized(Arc<QTensor>),
    /// Block-quantized projections with the same `in` but different formats, stacked along
    /// `out` (a Q4_K_M file stores some layers' `v` in q6_k beside `q` and `k` in q4_k): each
    /// is multiplied in its own format and the products are put side by side, so the weights
    /// stay as small as the file's.
    Stacked {
        parts: Vec<Arc<QTensor>>,
        dims: [usize; 2],
    },
}

impl Weight {
    /// `[out, in]`.
    pub fn dims(&self) -> &[usize] {
        match self {
            Self::Float(t) => t.dims(),
            Self::Quantized(q) => q.shape().dims(),
            Self::Stacked { dims, .. } => dims,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Float(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Quantized(q) => q.storage_size_in_bytes(),
            Self::Stacked { parts, .. } => parts.iter().map(|q| q.storage_size_in_bytes()).sum(),
        }
    }

    /// `x Wᵀ`, into `dest` where the kernel can.
    fn matmul_t(&self, x: &Tensor, dest: Option<&Dest>, numerics: Numerics, rows: StepRows) -> candle_core::Result<Tensor> {
        match self {
            Self::Float(w) if numerics == Numerics::BatchInvariant => match crate::kernels::matvec::matmul_t_invariant(x, w, dest)? {
                Some(y) => Ok(y),
                None => matmul_t(x, w, dest, rows),
            },
            Self::Float(w) => matmul_t(x, w, dest, rows),
            Self::Quantized(q) => quantized_matmul_t(x, q, dest, rows, numerics),
            Self::Stacked { parts, .. } => {
                let ys = parts.iter().map(|q| quantized_matmul_t(x, q, None, rows, numerics)).collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&ys, ys[0].rank() - 1)
            }
        }
    }

    /// Stacks projections with the same `in` along `out` (the fused `[q|k|v]` and `[gate|up]`).
    /// Quantized rows are independent, so stacking one format is concatenating its bytes; a mix
    /// of formats stays a mix ([`Weight::Stacked`]); a mix of float and quantized is widened to
    /// f32.
    pub fn cat_rows(parts: Vec<Weight>) -> candle_core::Result<Weight> {
        let quantized: Option<Vec<&Arc<QTensor>>> = parts
            .iter()
            .map(|p| match p {
                Self::Quantized(q) => Some(q),
                Self::Float(_) | Self::Stacked { .. } => None,
            })
            .collect();
        if let Some(qs) = quantized {
            let dtype = qs[0].dtype();
            if qs.iter().all(|q| q.dtype() == dtype) {
                let cols = qs[0].shape().dims()[1];
                let mut rows = 0;
                let mut bytes = Vec::with_capacity(qs.iter().map(|q| q.storage_size_in_bytes()).sum());
                for q in &qs {
                    rows += q.shape().dims()[0];
                    bytes.extend_from_slice(&q.data()?);
                }
                let storage = QStorage::from_data(Cow::Owned(bytes), &qs[0].device(), dtype)?;
                return Ok(Self::Quantized(Arc::new(QTensor::new(storage, (rows, cols))?)));
            }
            let cols = qs[0].shape().dims()[1];
            let rows = qs.iter().map(|q| q.shape().dims()[0]).sum();
            return Ok(Self::Stacked { parts: qs.into_iter().cloned().collect(), dims: [rows, cols] });
        }
        let floats = parts.iter().map(Self::to_f32_if_quantized).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self::Float(Tensor::cat(&floats, 0)?))
    }

    fn to_f32_if_quantized(&self) -> candle_core::Result<Tensor> {
        match self {
            Self::Float(t) => Ok(t.clone()),
            Self::Quantized(q) => q.dequantize(&q.device()),
            Self::Stacked { parts, .. } => {
                let floats = parts.iter().map(|q| q.dequantize(&q.device())).collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&floats, 0)
            }
        }
    }
}

impl From<Tensor> for Weight {
    fn from(t: Tensor) -> Self {
        Self::Float(t)
    }
}

/// `y = x Wᵀ + b` for `x` of shape `[tokens, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    numerics: Numerics,
}

impl Linear {
    pub fn new(weight: impl Into<Weight>, bias: Option<Tensor>) -> Self {
        Self { weight: weight.into(), bias, numerics: Numerics::Fast }
    }

    /// The same projection computed with `numerics`.
    pub fn with_numerics(self, numerics: Numerics) -> Self {
        Self { numerics, ..self }
    }

    /// Bytes held by the weight and bias.
    pub fn bytes(&self) -> usize {
        self.weight.bytes() + self.bias.as_ref().map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes())
    }

    /// The projection without its bias; row-parallel layers add the bias after the all-reduce.
    pub fn forward_no_bias(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_no_bias_into(x, None)
    }

    /// [`Linear::forward_no_bias`], writing into `dest` where the kernel can (a decode step's
    /// workspace tensor).
    pub fn forward_no_bias_into(&self, x: &Tensor, dest: Option<&Dest>) -> candle_core::Result<Tensor> {
        self.forward_no_bias_step(x, dest, StepRows::Decode)
    }

    /// [`Linear::forward_no_bias_into`] for one of a model step's products (`rows` picks the
    /// kernel).
    pub fn forward_no_bias_step(&self, x: &Tensor, dest: Option<&Dest>, rows: StepRows) -> candle_core::Result<Tensor> {
        self.weight.matmul_t(x, dest, self.numerics, rows)
    }

    /// `x Wᵀ + b` into `dest` where the kernel can; see [`Linear::add_bias_in_place`].
    pub fn forward_into(&self, x: &Tensor, dest: Option<&Dest>) -> candle_core::Result<Tensor> {
        self.forward_step(x, dest, StepRows::Decode)
    }

    /// [`Linear::forward_into`] for one of a model step's products (`rows` picks the kernel).
    pub fn forward_step(&self, x: &Tensor, dest: Option<&Dest>, rows: StepRows) -> candle_core::Result<Tensor> {
        self.add_bias_in_place(self.forward_no_bias_step(x, dest, rows)?, dest)
    }

    /// Adds the bias (if any) to `y` in `y`'s own storage when both are contiguous CPU tensors of
    /// one float type, else as a new tensor. For outputs nothing else reads: a product's fresh
    /// result, or `dest`'s tensor when `y` is it (a decode step's workspace output).
    pub fn add_bias_in_place(&self, y: Tensor, dest: Option<&Dest>) -> candle_core::Result<Tensor> {
        let Some(b) = &self.bias else { return Ok(y) };
        let dest = dest.filter(|d| d.holds(&y));
        let done = match y.dtype() {
            DType::F32 => add_rows_in_place::<f32>(&y, dest, b)?,
            DType::BF16 => add_rows_in_place::<half::bf16>(&y, dest, b)?,
            DType::F16 => add_rows_in_place::<half::f16>(&y, dest, b)?,
            _ => false,
        };
        if done {
            Ok(y)
        } else {
            y.broadcast_add(b)
        }
    }
}

/// `y[i, :] += b` in place (through `dest` when it holds `y`), rounding as the tensor add does;
/// `false` where it does not apply.
fn add_rows_in_place<T: Elem>(y: &Tensor, dest: Option<&Dest>, b: &Tensor) -> candle_core::Result<bool> {
    let width = b.elem_count();
    if !is_slice::<T>(b) || b.dims().len() != 1 || y.dims().last() != Some(&width) || width == 0 {
        return Ok(false);
    }
    let add = |y: &mut [T], b: &[T]| {
        for row in y.chunks_exact_mut(width) {
            for (v, b) in row.iter_mut().zip(b) {
                *v = T::from_f32(v.to_f32() + b.to_f32());
            }
        }
    };
    let added = with_slice::<T, _>(b, |b| match dest {
        Some(dest) => with_dest_mut::<T, _>(dest, |y| add(y, b)),
        None => with_slice_mut::<T, _>(y, |y| add(y, b)),
    });
    Ok(added.transpose()?.flatten().is_some())
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_into(x, None)
    }
}
