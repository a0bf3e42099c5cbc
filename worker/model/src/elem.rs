//! Float element types the CPU passes in `fused.rs` and `decode_attention.rs` read and write:
//! each computes in f32 and converts once on the way in and once on the way out.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use half::{bf16, f16};

pub(crate) trait Elem: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// The fastest dot product of a row of this type with an f32 row on this CPU.
    fn dot_kernel() -> fn(&[Self], &[f32]) -> f32;
    /// The storage's elements, if it holds this type.
    fn of(storage: &CpuStorage) -> Option<&[Self]>;
    /// Wraps computed elements in a tensor (on the CPU, where this module's passes run).
    fn tensor(data: Vec<Self>, shape: &[usize]) -> candle_core::Result<Tensor>;
}

macro_rules! elem {
    ($t:ty, $dtype:ident, $to:expr, $from:expr, $dot:path) => {
        impl Elem for $t {
            const DTYPE: DType = DType::$dtype;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                $to(self)
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                $from(v)
            }
            fn dot_kernel() -> fn(&[Self], &[f32]) -> f32 {
                $dot()
            }
            fn of(storage: &CpuStorage) -> Option<&[Self]> {
                match storage {
                    CpuStorage::$dtype(data) => Some(data),
                    _ => None,
                }
            }
            fn tensor(data: Vec<Self>, shape: &[usize]) -> candle_core::Result<Tensor> {
                Tensor::from_vec(data, shape, &candle_core::Device::Cpu)
            }
        }
    };
}

elem!(f32, F32, |v| v, |v| v, crate::matvec::f32_kernel);
elem!(bf16, BF16, bf16::to_f32, bf16::from_f32, crate::matvec::bf16_kernel);
elem!(f16, F16, f16::to_f32, f16::from_f32, crate::matvec::f16_kernel);

/// Runs `f` on the elements of `t` when it is a contiguous CPU tensor of type `T`; `None`
/// otherwise (the caller then takes the tensor-op path).
pub(crate) fn with_slice<T: Elem, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Option<R> {
    if t.dtype() != T::DTYPE {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let (start, end) = layout.contiguous_offsets()?;
    Some(f(&T::of(cpu)?[start..end]))
}
