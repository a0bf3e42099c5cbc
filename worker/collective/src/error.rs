//! Errors of collective operations.

use std::io;

/// Why a collective operation failed. A failed collective leaves the group unusable: every
/// rank must tear it down and rendezvous again.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A peer's socket failed or closed.
    #[error("collective I/O with rank {peer} failed: {source}")]
    Io {
        peer: usize,
        #[source]
        source: io::Error,
    },
    /// Ranks disagree on the operation or its size.
    #[error("collective protocol error: {0}")]
    Protocol(String),
    /// The caller asked for something the group cannot do (bad rank, bad length).
    #[error("invalid collective call: {0}")]
    InvalidArgument(String),
    /// Another rank of an in-process group panicked or left.
    #[error("collective group is broken: a peer rank left")]
    PeerLost,
    /// NCCL or the CUDA driver under it failed (backend `NcclCollective`, feature `nccl`).
    #[error("NCCL collective failed: {0}")]
    Nccl(String),
    /// Converting between tensors and host buffers failed.
    #[error("tensor conversion for a collective failed: {0}")]
    Tensor(#[from] candle_core::Error),
}
