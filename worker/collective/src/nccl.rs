//! Collectives on NVIDIA GPUs through NCCL (feature `nccl`), via the cudarc that candle
//! re-exports, so there is exactly one cudarc in the build and its linking mode is candle's.
//!
//! Rendezvous: the rank-0 worker calls [`NcclId::new`] (`ncclGetUniqueId`, which also starts
//! NCCL's bootstrap root in that process), the coordinator ships [`NcclId::as_bytes`] to every
//! rank by RPC, and each rank rebuilds it with [`NcclId::from_bytes`] and calls
//! [`NcclCollective::new`], which blocks until all `world_size` ranks have joined.
//!
//! The communicator runs on candle's own CUDA stream for the device, so collectives are ordered
//! after the kernels that produced their inputs and before the ones that consume the results,
//! with no extra synchronisation.
//!
//! [`NcclCollective`] is neither `Send` nor `Sync`: cudarc's `Comm` holds a raw `ncclComm_t`,
//! and NCCL does not allow a communicator to be used from several threads at once. Build it on
//! the engine thread that runs the forward passes (send that thread the [`NcclId`], which is
//! plain bytes); this is why [`Collective`] has no `Send` bound.
//!
//! Every rank gets the same bits from an all-reduce: NCCL's algorithms (ring, tree, NVLS)
//! compute each element's sum once and then broadcast it. This is a property of NCCL's
//! implementation, not a documented guarantee; a multi-GPU test should assert it.
//!
//! Differences from the host backends that callers must respect:
//!
//! - `send` does not buffer: NCCL completes a send only when the peer's matching `recv` runs,
//!   and operations on one rank run in call order on one stream. Two ranks that each `send` to
//!   the other before calling `recv` deadlock; order exchanges so that one side receives first.
//! - NCCL cannot check that ranks agree on lengths; a mismatch is undefined (usually a hang).
//! - There is no timeout: a rank whose peer died waits until its process is torn down.
//! - Failure is fail-stop: after the first error every call fails with
//!   [`CollectiveError::Nccl`], and the group must be rebuilt with a fresh [`NcclId`].

use std::ffi::c_char;
use std::fmt;
use std::sync::Arc;

use candle_core::cuda::cudarc::driver::{CudaStream, DevicePtr, DeviceRepr, DriverError};
use candle_core::cuda::cudarc::nccl::result::NcclError;
use candle_core::cuda::cudarc::nccl::{Comm, Id, NcclType, ReduceOp};
use candle_core::cuda::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaStorage, DType, Device, Storage, Tensor};

use crate::{Collective, CollectiveError, Result};

/// Length in bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
const ID_LEN: usize = 128;

/// The rendezvous token of one NCCL group: 128 opaque bytes naming the bootstrap root.
///
/// A fresh id is needed for every group, including a group rebuilt after a failure.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId([u8; ID_LEN]);

impl NcclId {
    /// Creates the id of a new group. Call it in the process that will be rank 0: NCCL starts
    /// the group's bootstrap root in the calling process, which must live until every rank has
    /// joined.
    pub fn new() -> Result<Self> {
        let id = Id::new().map_err(nccl_error("ncclGetUniqueId"))?;
        // `c_char` is `i8` or `u8` depending on the target; a byte-wise reinterpretation is
        // what NCCL means by the id, and `from_ne_bytes` compiles cast-free on both.
        Ok(Self(id.internal().map(|c| u8::from_ne_bytes(c.to_ne_bytes()))))
    }

    /// The bytes to ship to the other ranks.
    pub fn as_bytes(&self) -> &[u8; ID_LEN] {
        &self.0
    }

    /// Rebuilds an id received from rank 0; fails unless `bytes` has exactly 128 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let id = <[u8; ID_LEN]>::try_from(bytes)
            .map_err(|_| CollectiveError::InvalidArgument(format!("an NCCL id has {ID_LEN} bytes, got {}", bytes.len())))?;
        Ok(Self(id))
    }

    fn to_nccl(self) -> Id {
        Id::uninit(self.0.map(|b| c_char::from_ne_bytes([b])))
    }
}

impl fmt::Debug for NcclId {
    /// The bytes mean nothing to a reader of logs; leave them out.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclId").finish_non_exhaustive()
    }
}

/// One rank of an NCCL group, bound to one CUDA device and to the thread that created it.
pub struct NcclCollective {
    comm: Comm,
    /// candle's stream for `device`; `comm` enqueues on the same stream.
    stream: Arc<CudaStream>,
    device: Device,
    failed: bool,
}

impl NcclCollective {
    /// Joins the group named by `id` as `rank` of `world_size`, on `device` (a CUDA device).
    /// Blocks until every rank has joined.
    pub fn new(device: &Device, rank: usize, world_size: usize, id: &NcclId) -> Result<Self> {
        if rank >= world_size || i32::try_from(world_size).is_err() {
            return Err(CollectiveError::InvalidArgument(format!("rank {rank} in an NCCL group of {world_size}")));
        }
        let cuda = device.as_cuda_device().map_err(|e| CollectiveError::InvalidArgument(format!("NCCL needs a CUDA device: {e}")))?;
        let stream = cuda.cuda_stream();
        // ncclCommInitRank binds the communicator to the thread's current device, which need
        // not be this stream's (another Device may have been created since, on this thread).
        stream.context().bind_to_thread().map_err(driver_error("binding the CUDA context"))?;
        let comm = Comm::from_rank(Arc::clone(&stream), rank, world_size, id.to_nccl()).map_err(nccl_error("ncclCommInitRank"))?;
        Ok(Self { comm, stream, device: device.clone(), failed: false })
    }

    /// All-reduce (sum) of a CUDA tensor on the device, with no host copies: the result is a
    /// new tensor of `x`'s shape and dtype on `x`'s device. Supports f32, bf16 and f16.
    ///
    /// Unlike [`crate::all_reduce_tensor`], bf16 and f16 are summed in their own precision
    /// (half the traffic, slightly larger rounding error); convert to f32 first for f32 sums.
    pub fn all_reduce_on_device(&mut self, x: &Tensor) -> Result<Tensor> {
        if !x.device().same_device(&self.device) {
            return Err(CollectiveError::InvalidArgument(format!(
                "NCCL all-reduce of a tensor on {:?}; the communicator is on {:?}",
                x.device().location(),
                self.device.location()
            )));
        }
        if self.comm.world_size() == 1 || x.elem_count() == 0 {
            return Ok(x.clone());
        }
        // NCCL wants one dense buffer; `contiguous` is a cheap clone when `x` already is one.
        let x = x.contiguous()?;
        match x.dtype() {
            DType::F32 => self.guarded(|s| s.reduce_on_device::<f32>(&x)),
            DType::BF16 => self.guarded(|s| s.reduce_on_device::<half::bf16>(&x)),
            DType::F16 => self.guarded(|s| s.reduce_on_device::<half::f16>(&x)),
            other => Err(CollectiveError::InvalidArgument(format!("NCCL all-reduce of {other:?} tensors is not supported"))),
        }
    }

    /// Sums contiguous `x` across the group into a freshly allocated device buffer.
    fn reduce_on_device<T>(&self, x: &Tensor) -> Result<Tensor>
    where
        T: CudaDType + NcclType + DeviceRepr,
    {
        let (guard, layout) = x.storage_and_layout();
        let Storage::Cuda(storage) = &*guard else {
            return Err(CollectiveError::InvalidArgument("tensor is not on a CUDA device".into()));
        };
        let (start, end) =
            layout.contiguous_offsets().ok_or_else(|| CollectiveError::InvalidArgument("tensor is not contiguous".into()))?;
        let src = storage.as_cuda_slice::<T>()?.slice(start..end);
        // SAFETY: `dst` is left uninitialised, but every element is written by the all-reduce
        // before anything reads it (reads are ordered after it on this stream; on failure `dst`
        // is dropped unread), and any bit pattern is a valid f32/bf16/f16. Zeroing it first
        // would cost a memset kernel per all-reduce, twice per layer per token.
        let mut dst = unsafe { self.stream.alloc::<T>(end - start) }.map_err(driver_error("allocating the all-reduce output"))?;
        self.comm.all_reduce(&src, &mut dst, &ReduceOp::Sum).map_err(nccl_error("all-reduce"))?;
        let cuda = self.device.as_cuda_device()?.clone();
        let out = CudaStorage::wrap_cuda_slice(dst, cuda);
        Ok(Tensor::from_storage(Storage::Cuda(out), x.shape().clone(), BackpropOp::none(), false))
    }

    /// Runs one operation, turning its failure into a failure of the whole group: peers are
    /// already inside, or past, the NCCL call this rank failed to make.
    fn guarded<T>(&mut self, op: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        if self.failed {
            return Err(CollectiveError::Nccl("the group failed earlier; rebuild it with a fresh NcclId".into()));
        }
        let result = op(self);
        if let Err(e) = &result {
            let rank = self.comm.rank();
            tracing::warn!(rank, error = %e, "NCCL collective failed; the group is unusable");
            self.failed = true;
        }
        result
    }

    /// Copies `src` on the device into `dst` on the host, waiting for everything queued before.
    fn copy_to_host<S>(&self, src: &S, dst: &mut [f32]) -> Result<()>
    where
        S: DevicePtr<f32>,
    {
        self.stream.memcpy_dtoh(src, dst).map_err(driver_error("copying to the host"))?;
        // A copy into pageable memory already returns when done; synchronising explicitly keeps
        // that true for pinned memory too, and surfaces errors of the queued work here.
        self.stream.synchronize().map_err(driver_error("synchronising the stream"))
    }

    fn check_peer(&self, peer: usize, what: &str) -> Result<i32> {
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        match i32::try_from(peer) {
            Ok(p) if peer < world && peer != rank => Ok(p),
            _ => Err(CollectiveError::InvalidArgument(format!("{what} rank {peer} from rank {rank} in a group of {world}"))),
        }
    }
}

impl Collective for NcclCollective {
    fn all_reduce_tensor(&mut self, x: &Tensor) -> Result<Tensor> {
        self.all_reduce_on_device(x)
    }

    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        // Every rank passes the same length, so every rank skips together; CUDA refuses
        // zero-byte allocations.
        if data.is_empty() {
            return Ok(());
        }
        self.guarded(|s| {
            let mut buf = s.stream.clone_htod(data).map_err(driver_error("copying to the device"))?;
            s.comm.all_reduce_in_place(&mut buf, &ReduceOp::Sum).map_err(nccl_error("all-reduce"))?;
            s.copy_to_host(&buf, data)
        })
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        let world = self.comm.world_size();
        // NCCL writes `local.len() * world` values whatever `out` holds: check before calling.
        if local.len().checked_mul(world) != Some(out.len()) {
            return Err(CollectiveError::InvalidArgument(format!(
                "all_gather output has {} values, expected {} x {world}",
                out.len(),
                local.len()
            )));
        }
        if local.is_empty() {
            return Ok(());
        }
        self.guarded(|s| {
            let send = s.stream.clone_htod(local).map_err(driver_error("copying to the device"))?;
            let mut recv = s.stream.alloc_zeros::<f32>(out.len()).map_err(driver_error("allocating"))?;
            s.comm.all_gather(&send, &mut recv).map_err(nccl_error("all-gather"))?;
            s.copy_to_host(&recv, out)
        })
    }

    fn send(&mut self, peer: usize, data: &[f32]) -> Result<()> {
        let peer = self.check_peer(peer, "send to")?;
        if data.is_empty() {
            return Ok(());
        }
        self.guarded(|s| {
            let buf = s.stream.clone_htod(data).map_err(driver_error("copying to the device"))?;
            s.comm.send(&buf, peer).map_err(nccl_error("send"))?;
            // No synchronisation: the send completes when the peer receives, and `buf` is freed
            // in stream order after it, so returning now lets this rank queue more work.
            Ok(())
        })
    }

    fn recv(&mut self, peer: usize, out: &mut [f32]) -> Result<()> {
        let peer = self.check_peer(peer, "recv from")?;
        if out.is_empty() {
            return Ok(());
        }
        self.guarded(|s| {
            let mut buf = s.stream.alloc_zeros::<f32>(out.len()).map_err(driver_error("allocating"))?;
            s.comm.recv(&mut buf, peer).map_err(nccl_error("recv"))?;
            s.copy_to_host(&buf, out)
        })
    }
}

impl fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("device", &self.device.location())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// cudarc's `NcclError` prints only "NcclError"; the wrapped `ncclResult_t` names the cause.
fn nccl_error(what: &'static str) -> impl Fn(NcclError) -> CollectiveError {
    move |e| CollectiveError::Nccl(format!("{what}: {:?}", e.0))
}

fn driver_error(what: &'static str) -> impl Fn(DriverError) -> CollectiveError {
    move |e| CollectiveError::Nccl(format!("{what}: CUDA driver: {e}"))
}
