//! The trivial group of one rank.

use crate::{Collective, CollectiveError, Result};

/// World size 1: reductions and gathers are the identity; point-to-point has no peer.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, _data: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        if out.len() != local.len() {
            return Err(CollectiveError::InvalidArgument(format!("all_gather output has {} values, expected {}", out.len(), local.len())));
        }
        out.copy_from_slice(local);
        Ok(())
    }

    fn send(&mut self, peer: usize, _data: &[f32]) -> Result<()> {
        Err(CollectiveError::InvalidArgument(format!("send to rank {peer} in a group of one")))
    }

    fn recv(&mut self, peer: usize, _out: &mut [f32]) -> Result<()> {
        Err(CollectiveError::InvalidArgument(format!("recv from rank {peer} in a group of one")))
    }

    fn as_send(&mut self) -> Option<&mut (dyn Collective + Send)> {
        Some(self)
    }
}
