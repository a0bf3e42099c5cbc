//! The float element types (f32, bf16, f16) the CPU kernels read and write: one trait, [`Elem`],
//! for the passes in `fused.rs` and `decode_attention.rs` (each computes in f32 and converts
//! once on the way in and once on the way out) and for the weights `matvec.rs` widens to f32
//! lanes inside its SIMD kernels.

use std::cell::Cell;
use std::ops::Range;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor};
use half::{bf16, f16};

pub(crate) trait Elem: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// The fastest dot product of a row of this type with an f32 row on this CPU.
    fn dot_kernel() -> fn(&[Self], &[f32]) -> f32;
    /// Eight elements from `p` widened to f32.
    ///
    /// # Safety
    /// `p` must point at eight readable elements; the CPU must have AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Sixteen elements from `p` widened to f32.
    ///
    /// # Safety
    /// `p` must point at sixteen readable elements; the CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// The storage's elements, if it holds this type.
    fn of(storage: &CpuStorage) -> Option<&[Self]>;
    /// The storage's elements for writing, if it holds this type.
    fn of_mut(storage: &mut CpuStorage) -> Option<&mut [Self]>;
    /// The start of a buffer of this type, for pool tasks that write disjoint parts of it.
    fn ptr(data: &mut [Self]) -> ElemPtr;
    /// Wraps computed elements in a tensor (on the CPU, where this module's passes run).
    fn tensor(data: Vec<Self>, shape: &[usize]) -> candle_core::Result<Tensor>;
    /// The buffers, if they hold this type.
    fn of_buffers(buffers: &Buffers) -> Option<&[Vec<Self>]>;
    /// The buffers for writing, if they hold this type.
    fn of_buffers_mut(buffers: &mut Buffers) -> Option<&mut Vec<Vec<Self>>>;
}

/// Buffers of one of the [`Elem`] types: the chunks of a KV pool layer (`kv_pool.rs`), which
/// grows by adding a buffer and never moves the ones it has.
pub(crate) enum Buffers {
    F32(Vec<Vec<f32>>),
    BF16(Vec<Vec<bf16>>),
    F16(Vec<Vec<f16>>),
}

impl Buffers {
    /// No buffers yet, of the type of `dtype`; `None` for a type without kernels here.
    pub fn empty(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 => Some(Self::F32(Vec::new())),
            DType::BF16 => Some(Self::BF16(Vec::new())),
            DType::F16 => Some(Self::F16(Vec::new())),
            _ => None,
        }
    }

    /// Adds a zeroed buffer of `len` elements.
    pub fn push_zeroed(&mut self, len: usize) {
        match self {
            Self::F32(b) => b.push(vec![0.0; len]),
            Self::BF16(b) => b.push(vec![bf16::ZERO; len]),
            Self::F16(b) => b.push(vec![f16::ZERO; len]),
        }
    }
}

/// A buffer of one of the [`Elem`] types, for pool tasks that each write their own part of it.
#[derive(Clone, Copy)]
pub(crate) enum ElemPtr {
    F32(*mut f32),
    BF16(*mut bf16),
    F16(*mut f16),
}

macro_rules! elem {
    ($t:ty, $dtype:ident, $to:expr, $from:expr, $dot:path, $load8:path, $load16:path) => {
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
            #[cfg(target_arch = "x86_64")]
            #[inline(always)]
            unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
                // SAFETY: the caller's guarantee is the loader's.
                unsafe { $load8(p) }
            }
            #[cfg(target_arch = "x86_64")]
            #[inline(always)]
            unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
                // SAFETY: the caller's guarantee is the loader's.
                unsafe { $load16(p) }
            }
            fn of(storage: &CpuStorage) -> Option<&[Self]> {
                match storage {
                    CpuStorage::$dtype(data) => Some(data),
                    _ => None,
                }
            }
            fn of_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
                match storage {
                    CpuStorage::$dtype(data) => Some(data),
                    _ => None,
                }
            }
            fn ptr(data: &mut [Self]) -> ElemPtr {
                ElemPtr::$dtype(data.as_mut_ptr())
            }
            fn tensor(data: Vec<Self>, shape: &[usize]) -> candle_core::Result<Tensor> {
                Tensor::from_vec(data, shape, &candle_core::Device::Cpu)
            }
            fn of_buffers(buffers: &Buffers) -> Option<&[Vec<Self>]> {
                match buffers {
                    Buffers::$dtype(b) => Some(b),
                    _ => None,
                }
            }
            fn of_buffers_mut(buffers: &mut Buffers) -> Option<&mut Vec<Vec<Self>>> {
                match buffers {
                    Buffers::$dtype(b) => Some(b),
                    _ => None,
                }
            }
        }
    };
}

elem!(f32, F32, |v| v, |v| v, crate::kernels::matvec::f32_kernel, lanes::f32x8, lanes::f32x16);
elem!(bf16, BF16, bf16::to_f32, bf16::from_f32, crate::kernels::matvec::bf16_kernel, lanes::bf16x8, lanes::bf16x16);
elem!(f16, F16, f16::to_f32, f16::from_f32, crate::kernels::matvec::f16_kernel, lanes::f16x8, lanes::f16x16);

/// Each type's elements widened to f32 vector lanes: the bodies of [`Elem::load8`] and
/// [`Elem::load16`].
#[cfg(target_arch = "x86_64")]
mod lanes {
    use std::arch::x86_64::*;

    use half::{bf16, f16};

    /// # Safety
    /// As for [`super::Elem::load8`].
    #[inline(always)]
    pub(super) unsafe fn f32x8(p: *const f32) -> __m256 {
        // SAFETY: the caller guarantees eight readable f32 and AVX2.
        unsafe { _mm256_loadu_ps(p) }
    }

    /// # Safety
    /// As for [`super::Elem::load16`].
    #[inline(always)]
    pub(super) unsafe fn f32x16(p: *const f32) -> __m512 {
        // SAFETY: the caller guarantees sixteen readable f32 and AVX-512F.
        unsafe { _mm512_loadu_ps(p) }
    }

    /// # Safety
    /// As for [`super::Elem::load8`].
    #[inline(always)]
    pub(super) unsafe fn f16x8(p: *const f16) -> __m256 {
        // SAFETY: the caller guarantees eight readable f16 (plain u16) and AVX2 with F16C.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }

    /// # Safety
    /// As for [`super::Elem::load16`].
    #[inline(always)]
    pub(super) unsafe fn f16x16(p: *const f16) -> __m512 {
        // SAFETY: the caller guarantees sixteen readable f16 and AVX-512F.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }

    /// # Safety
    /// As for [`super::Elem::load8`].
    #[inline(always)]
    pub(super) unsafe fn bf16x8(p: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees eight readable bf16 (plain u16) and AVX2. bf16 is the
        // top half of an f32: widening is a zero-extend and a 16-bit shift.
        unsafe {
            let raw = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
        }
    }

    /// # Safety
    /// As for [`super::Elem::load16`].
    #[inline(always)]
    pub(super) unsafe fn bf16x16(p: *const bf16) -> __m512 {
        // SAFETY: the caller guarantees sixteen readable bf16 (plain u16) and AVX-512F.
        unsafe {
            let raw = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16))
        }
    }
}

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

/// Whether `t` is a contiguous CPU tensor of type `T`: what [`with_slice`] needs.
pub(crate) fn is_slice<T: Elem>(t: &Tensor) -> bool {
    t.dtype() == T::DTYPE && t.device().is_cpu() && t.is_contiguous()
}

/// Runs `f` on the elements of `t` for writing, when it is a contiguous CPU tensor of type `T`
/// (a product's fresh result). candle's in-place op holds `t`'s storage locked for writing
/// meanwhile, so `f` must not read `t` (or another view of its storage) as a tensor.
pub(crate) fn with_slice_mut<T: Elem, R>(t: &Tensor, f: impl FnOnce(&mut [T]) -> R) -> candle_core::Result<Option<R>> {
    let Some((start, end)) = t.layout().contiguous_offsets().filter(|_| is_slice::<T>(t)) else { return Ok(None) };
    write_range(t, start..end, f)
}

/// A workspace tensor that a pass writes its output into (`workspace.rs`).
#[derive(Clone)]
pub(crate) struct Dest {
    /// The output, `[rows, ..]`: what the pass returns.
    tensor: Tensor,
    /// A one-element view of the same storage that writes go through. candle's in-place op
    /// first checks the written tensor's layout for overlapping elements, collecting its axes
    /// longer than 1 into a `Vec`: an allocation per write, fifteen a layer, and none for a
    /// layout that has no such axis.
    unit: Tensor,
}

impl Dest {
    /// `tensor` and a one-element view `unit` of the same storage; an error for any other pair,
    /// which would send the writes elsewhere.
    pub fn new(tensor: Tensor, unit: Tensor) -> candle_core::Result<Self> {
        let storage = |t: &Tensor| &*t.storage_and_layout().0 as *const Storage;
        if unit.elem_count() != 1 || storage(&tensor) != storage(&unit) {
            return Err(candle_core::Error::Msg("a workspace destination needs a one-element view of its own storage".into()));
        }
        Ok(Self { tensor, unit })
    }

    /// The output tensor (tests check that a pass returned it).
    #[cfg(test)]
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// Whether `t` is this destination's tensor (a pass's output that may be changed in place).
    pub fn holds(&self, t: &Tensor) -> bool {
        self.tensor.id() == t.id()
    }
}

/// Runs `f` on `dest`'s elements for writing, if they are of type `T`; as [`with_slice_mut`].
pub(crate) fn with_dest_mut<T: Elem, R>(dest: &Dest, f: impl FnOnce(&mut [T]) -> R) -> candle_core::Result<Option<R>> {
    let t = &dest.tensor;
    let Some((start, end)) = t.layout().contiguous_offsets().filter(|_| is_slice::<T>(t)) else { return Ok(None) };
    write_range(&dest.unit, start..end, f)
}

/// Runs `f` on elements `range` of `handle`'s storage, through candle's in-place op on `handle`.
fn write_range<T: Elem, R>(handle: &Tensor, range: Range<usize>, f: impl FnOnce(&mut [T]) -> R) -> candle_core::Result<Option<R>> {
    if handle.dtype() != T::DTYPE || !handle.device().is_cpu() {
        return Ok(None);
    }
    let op = WriteOp { range, f: Cell::new(Some(f)), out: Cell::new(None), _elem: std::marker::PhantomData::<T> };
    handle.inplace_op1(&op)?;
    Ok(op.out.into_inner())
}

/// Writes `shape`'s elements with `f`: into `dest` when it is given and has that shape and type
/// (a workspace tensor, reused from step to step), else into a new tensor. Returns the tensor
/// written.
pub(crate) fn output<T: Elem>(dest: Option<&Dest>, shape: &[usize], f: impl FnOnce(&mut [T])) -> candle_core::Result<Tensor> {
    if let Some(d) = dest.filter(|d| d.tensor.dims() == shape && is_slice::<T>(&d.tensor)) {
        with_dest_mut(d, f)?.ok_or_else(|| candle_core::Error::Msg("a workspace destination refused its write".into()))?;
        return Ok(d.tensor.clone());
    }
    let mut data = vec![T::from_f32(0.0); shape.iter().product()];
    f(&mut data);
    T::tensor(data, shape)
}

/// candle's way to reach a tensor's storage mutably: an in-place custom op.
struct WriteOp<T, R, F> {
    /// The storage's elements to hand to `f`.
    range: Range<usize>,
    f: Cell<Option<F>>,
    out: Cell<Option<R>>,
    _elem: std::marker::PhantomData<T>,
}

impl<T: Elem, R, F: FnOnce(&mut [T]) -> R> InplaceOp1 for WriteOp<T, R, F> {
    fn name(&self) -> &'static str {
        "tessera-write"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        let Some(data) = T::of_mut(storage).and_then(|d| d.get_mut(self.range.clone())) else {
            return Err(candle_core::Error::Msg(format!("tessera-write: no {:?} elements {:?} here", T::DTYPE, self.range)));
        };
        if let Some(f) = self.f.take() {
            self.out.set(Some(f(data)));
        }
        Ok(())
    }
}
