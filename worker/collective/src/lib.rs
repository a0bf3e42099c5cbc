//! Collective operations for tensor and sequence parallelism.
//!
//! One narrow trait, [`Collective`], is owned by the engine thread and passed down the forward
//! call as `&mut dyn Collective`; communicators are never shared between threads. Backends:
//!
//! - [`SingleRank`]: world size 1, every operation is the identity;
//! - [`InProcessGroup`]: ranks are threads of one process (tests, one-machine TP);
//! - [`TcpCollective`]: ranks are processes or hosts connected by TCP (CPU clusters);
//! - `NcclCollective` (feature `nccl`): GPUs, through NCCL from candle's re-exported cudarc.
//!
//! Every rank gets bit-identical results from `all_reduce_sum`, whatever the backend, so
//! replicated state (norms, sampled tokens) never drifts between ranks.

#![deny(unsafe_op_in_unsafe_fn)]

mod error;
mod in_process;
#[cfg(feature = "nccl")]
mod nccl;
mod single;
mod tcp;
mod tensor;

pub use error::CollectiveError;
pub use in_process::InProcessGroup;
#[cfg(feature = "nccl")]
pub use nccl::{NcclCollective, NcclId};
pub use single::SingleRank;
pub use tcp::{CollectiveTls, TcpCollective, TcpConfig};
pub use tensor::{all_gather_tensor, all_reduce_tensor};

/// Result of a collective operation.
pub type Result<T> = std::result::Result<T, CollectiveError>;

/// The operations a rank needs from its group. Buffers live in host memory; a device backend
/// (NCCL) would add tensor-level entry points next to these rather than change them.
///
/// All ranks of a group must call the same operations in the same order with the same lengths;
/// a mismatch is reported as [`CollectiveError::Protocol`] where it can be detected.
///
/// There is no `Send` bound: an NCCL communicator must stay on the thread that created it, so
/// the NCCL backend is not `Send`. The host backends are, and can be moved into rank threads;
/// [`Collective::as_send`] says which a given communicator is.
pub trait Collective {
    /// This rank's index in `0..world_size()`.
    fn rank(&self) -> usize;

    /// Number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Element-wise sum over all ranks, in place. Every rank ends with the same bits.
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()>;

    /// Concatenates every rank's `local` in rank order into `out`
    /// (`out.len() == local.len() * world_size()`).
    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()>;

    /// Sends `data` to rank `peer`. Must be matched by a `recv` on `peer`.
    fn send(&mut self, peer: usize, data: &[f32]) -> Result<()>;

    /// Receives exactly `out.len()` values sent by rank `peer`.
    fn recv(&mut self, peer: usize, out: &mut [f32]) -> Result<()>;

    /// All-reduce (sum) of a tensor. The default goes through host memory in f32; a device
    /// backend overrides it to reduce in place on the device.
    fn all_reduce_tensor(&mut self, x: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        tensor::host_all_reduce(self, x)
    }

    /// This communicator as one that another thread may use while its owner waits (the model
    /// runs a CPU forward pass on a thread of its own pool): `Some(self)` from a backend that is
    /// `Send`, as the host backends are. The default, `None`, keeps a communicator tied to its
    /// thread (NCCL's) on it: the caller then does the work on its own thread.
    fn as_send(&mut self) -> Option<&mut (dyn Collective + Send)> {
        None
    }

    /// A way to end this communicator's blocking calls from another thread, for a backend
    /// whose calls can block on a peer (the default: none to end).
    fn interrupt(&self) -> Option<Interrupt> {
        None
    }
}

/// Ends a communicator's blocking calls from another thread: its connections are shut down, so
/// a rank blocked on a peer that will never answer (hung, or cut off by the network) fails at
/// once with [`CollectiveError::PeerLost`] instead of waiting for TCP to give up, minutes
/// later. The communicator is useless afterwards; this is for leaving a group.
pub struct Interrupt(Box<dyn Fn() + Send + Sync>);

impl Interrupt {
    pub fn new(interrupt: impl Fn() + Send + Sync + 'static) -> Self {
        Self(Box::new(interrupt))
    }

    pub fn fire(&self) {
        (self.0)()
    }
}
