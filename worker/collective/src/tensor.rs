//! Tensor-level wrappers over the host-buffer collectives.

use candle_core::{DType, Tensor};

use crate::{Collective, Result};

/// All-reduce (sum) of a tensor across the group, returning a tensor of the input's shape and
/// dtype, through the backend's [`Collective::all_reduce_tensor`].
pub fn all_reduce_tensor(comm: &mut dyn Collective, x: &Tensor) -> Result<Tensor> {
    comm.all_reduce_tensor(x)
}

/// The host-memory all-reduce behind [`Collective::all_reduce_tensor`]: the reduction runs in
/// f32 whatever the tensor's dtype, so TP sums lose no precision.
pub(crate) fn host_all_reduce<C: Collective + ?Sized>(comm: &mut C, x: &Tensor) -> Result<Tensor> {
    if comm.world_size() == 1 {
        return Ok(x.clone());
    }
    let dtype = x.dtype();
    let mut buf = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    comm.all_reduce_sum(&mut buf)?;
    Ok(Tensor::from_vec(buf, x.shape(), x.device())?.to_dtype(dtype)?)
}

/// All-gather of a tensor along its last dimension: every rank's `x` (same shape), concatenated
/// in rank order.
pub fn all_gather_tensor(comm: &mut dyn Collective, x: &Tensor) -> Result<Tensor> {
    let world = comm.world_size();
    if world == 1 {
        return Ok(x.clone());
    }
    let dtype = x.dtype();
    let dims = x.dims().to_vec();
    let last = *dims.last().unwrap_or(&1);
    let rows = x.elem_count() / last.max(1);
    let local = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut gathered = vec![0f32; local.len() * world];
    comm.all_gather(&local, &mut gathered)?;
    // `gathered` is [world, rows, last]; the result wants [rows, world * last].
    let t = Tensor::from_vec(gathered, (world, rows, last), x.device())?.transpose(0, 1)?.contiguous()?;
    let mut out_dims = dims;
    if let Some(l) = out_dims.last_mut() {
        *l = last * world;
    }
    Ok(t.reshape(out_dims)?.to_dtype(dtype)?)
}
