//! The decode step's reused buffers.
//!
//! A decode step on the CPU is thirty-odd layers of small products and element-wise passes,
//! each of which used to allocate its output: about 95 allocations a layer, 2 MB a step at
//! batch 1 and 21 MB at batch 8 on SmolLM-135M, all zero-filled and freed again
//! (BENCHMARKS.md). The model keeps one [`Workspace`] instead: a tensor per intermediate of a
//! layer ([`Scratch`]), sized for [`MAX_ROWS`] rows and reused by every layer of every step. The
//! CPU passes write into it in place (`elem::output`); whatever cannot (a GPU, a prefill chunk
//! of more rows) allocates as before.
//!
//! A buffer's tensor is overwritten by the next layer that writes that buffer, so a layer never
//! reads a buffer it writes in the same pass: the residual stream and its norm alternate between
//! two buffers each (`X0`/`X1`, `H0`/`H1`).

use candle_core::{DType, Device, Tensor};

use crate::kernels::elem::Dest;
use crate::kernels::matvec::MAX_ROWS;
use crate::model::attention::ChunkMask;

/// The intermediates of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scratch {
    Qkv,
    Q,
    K,
    V,
    Attn,
    AttnOut,
    /// The residual stream and its norm after attention.
    X1,
    H1,
    GateUp,
    Mlp,
    MlpOut,
    /// The residual stream and its norm at the end of a layer: the next layer's input (the
    /// embedded tokens and their norm before the first).
    X0,
    H0,
    /// The step's rotary tables.
    Cos,
    Sin,
}

const SCRATCH_BUFFERS: usize = Scratch::Sin as usize + 1;

/// Per-buffer tensors of a model's decode steps (see the module notes).
#[derive(Default)]
pub(crate) struct Workspace {
    /// Off on GPUs, whose kernels do not write into given tensors.
    enabled: bool,
    buffers: [ScratchBuffer; SCRATCH_BUFFERS],
    /// The step's rotary tables in f32, before they are converted into their buffers.
    pub rope: (Vec<f32>, Vec<f32>),
    /// Per distinct sliding window, each chunk's attention mask (`Model::forward`).
    pub masks: Vec<(Option<usize>, Vec<ChunkMask>)>,
}

#[derive(Default)]
struct ScratchBuffer {
    /// `MAX_ROWS` rows of `row` elements.
    full: Option<Tensor>,
    /// Dimensions after the first (rows) and the dtype `full` was made for.
    inner: Vec<usize>,
    dtype: Option<DType>,
    /// Views of `full`'s first `r` rows, shaped `[r, inner..]`, made once per row count.
    views: Vec<Option<Dest>>,
    /// `full`'s first element alone, which writes go through (`elem::Dest`).
    unit: Option<Tensor>,
}

impl Workspace {
    pub fn new(device: &Device) -> Self {
        Self { enabled: device.is_cpu(), ..Self::default() }
    }

    /// A tensor of shape `dims` (`[rows, ..]`) and `dtype` for `scratch`'s output, or `None` when
    /// this step does not use the workspace (more than `MAX_ROWS` rows, or not on the CPU).
    /// Until the buffer's layout changes (another model shape or dtype) this allocates nothing.
    pub fn get(&mut self, scratch: Scratch, dims: &[usize], dtype: DType) -> candle_core::Result<Option<Dest>> {
        let Some((&rows, inner)) = dims.split_first() else { return Ok(None) };
        if !self.enabled || rows == 0 || rows > MAX_ROWS {
            return Ok(None);
        }
        let buf = &mut self.buffers[scratch as usize];
        let row: usize = inner.iter().product();
        if buf.full.is_none() || buf.inner != inner || buf.dtype != Some(dtype) {
            let full = Tensor::zeros(MAX_ROWS * row, dtype, &Device::Cpu)?;
            buf.unit = Some(full.narrow(0, 0, 1)?);
            buf.full = Some(full);
            buf.inner = inner.to_vec();
            buf.dtype = Some(dtype);
            buf.views = vec![None; MAX_ROWS + 1];
        }
        if let (Some(full), Some(unit), None) = (&buf.full, &buf.unit, &buf.views[rows]) {
            buf.views[rows] = Some(Dest::new(full.narrow(0, 0, rows * row)?.reshape(dims)?, unit.clone())?);
        }
        Ok(buf.views[rows].clone())
    }
}

impl Workspace {
    /// [`Workspace::get`] for two buffers of one shape.
    pub fn get_pair(&mut self, scratch: [Scratch; 2], dims: &[usize], dtype: DType) -> candle_core::Result<[Option<Dest>; 2]> {
        Ok([self.get(scratch[0], dims, dtype)?, self.get(scratch[1], dims, dtype)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_share_one_buffer_and_are_reused() {
        let mut ws = Workspace::new(&Device::Cpu);
        let a = ws.get(Scratch::Q, &[2, 3, 4], DType::F32).unwrap().unwrap();
        let b = ws.get(Scratch::Q, &[2, 3, 4], DType::F32).unwrap().unwrap();
        assert_eq!(a.tensor().id(), b.tensor().id(), "the same rows give the same view");
        assert_eq!(a.tensor().dims(), &[2, 3, 4]);
        let one = ws.get(Scratch::Q, &[1, 3, 4], DType::F32).unwrap().unwrap();
        crate::kernels::elem::with_dest_mut::<f32, _>(&one, |s| {
            assert_eq!(s.len(), 12, "a write reaches its own rows only");
            s.fill(7.0)
        })
        .unwrap()
        .unwrap();
        let first_row: Vec<f32> = a.tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert!(first_row[..12].iter().all(|&v| v == 7.0) && first_row[12..].iter().all(|&v| v == 0.0), "{first_row:?}");
        let bf = ws.get(Scratch::Q, &[2, 3, 4], DType::BF16).unwrap().unwrap();
        assert_eq!(bf.tensor().dtype(), DType::BF16, "a new dtype remakes the buffer");
        assert!(ws.get(Scratch::Q, &[MAX_ROWS + 1, 3, 4], DType::F32).unwrap().is_none(), "prefill chunks allocate");
        assert!(ws.get(Scratch::Q, &[0, 3], DType::F32).unwrap().is_none());
        let elsewhere = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
        assert!(Dest::new(a.tensor().clone(), elsewhere).is_err(), "writes must reach the tensor's own storage");
    }
}
