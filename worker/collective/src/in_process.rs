//! Ranks as threads of one process: collectives through shared slots and a barrier,
//! point-to-point through one channel per ordered pair of ranks.
//!
//! Reductions are deterministic: every rank publishes its buffer, waits for the others, and
//! then sums all slots in rank order `0..n` itself, so every rank computes the same additions
//! in the same order and ends with the same bits.
//!
//! A rank that panics or drops its handle must not leave the others waiting forever: dropping a
//! handle marks the barrier broken (and unwinding through a lock poisons it), and its channel
//! ends disconnect, so peers get [`CollectiveError::PeerLost`] instead of hanging.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use crate::{Collective, CollectiveError, Result};

/// One rank of a group whose ranks are threads of this process. Create all ranks at once with
/// [`InProcessGroup::new`] and move each into its own thread.
pub struct InProcessGroup {
    rank: usize,
    shared: Arc<Shared>,
    /// `to_peer[p]` carries messages from this rank to rank `p` (`None` for this rank).
    to_peer: Vec<Option<Sender<Vec<f32>>>>,
    /// `from_peer[p]` carries messages from rank `p` to this rank (`None` for this rank).
    from_peer: Vec<Option<Receiver<Vec<f32>>>>,
}

/// State every rank of the group sees.
struct Shared {
    world: usize,
    /// `slots[r]` holds rank `r`'s contribution to the collective in progress. Ranks write only
    /// their own slot, and only between barriers, so readers never race a writer.
    slots: Vec<RwLock<Vec<f32>>>,
    barrier: Mutex<BarrierState>,
    turn: Condvar,
}

struct BarrierState {
    arrived: usize,
    /// Counts completed barriers, so a woken rank can tell "everyone arrived" from a spurious
    /// wake-up, even if a fast rank has already entered the next barrier.
    generation: u64,
    /// Set when a rank drops its handle: it will never arrive again.
    broken: bool,
}

impl InProcessGroup {
    /// Creates a group of `world_size` ranks; element `r` of the result is rank `r`.
    /// A `world_size` of 0 gives an empty vector.
    pub fn new(world_size: usize) -> Vec<InProcessGroup> {
        let shared = Arc::new(Shared {
            world: world_size,
            slots: (0..world_size).map(|_| RwLock::new(Vec::new())).collect(),
            barrier: Mutex::new(BarrierState { arrived: 0, generation: 0, broken: false }),
            turn: Condvar::new(),
        });
        let mut to_peer: Vec<Vec<Option<Sender<Vec<f32>>>>> = (0..world_size).map(|_| (0..world_size).map(|_| None).collect()).collect();
        let mut from_peer: Vec<Vec<Option<Receiver<Vec<f32>>>>> =
            (0..world_size).map(|_| (0..world_size).map(|_| None).collect()).collect();
        for src in 0..world_size {
            for dst in 0..world_size {
                if src != dst {
                    let (tx, rx) = mpsc::channel();
                    to_peer[src][dst] = Some(tx);
                    from_peer[dst][src] = Some(rx);
                }
            }
        }
        to_peer
            .into_iter()
            .zip(from_peer)
            .enumerate()
            .map(|(rank, (to_peer, from_peer))| InProcessGroup { rank, shared: Arc::clone(&shared), to_peer, from_peer })
            .collect()
    }

    /// Waits until every rank of the group has called `barrier` as many times as this one.
    fn barrier(&self) -> Result<()> {
        let shared = &*self.shared;
        let mut state = shared.barrier.lock().map_err(|_| CollectiveError::PeerLost)?;
        if state.broken {
            return Err(CollectiveError::PeerLost);
        }
        let generation = state.generation;
        state.arrived += 1;
        if state.arrived == shared.world {
            state.arrived = 0;
            state.generation = state.generation.wrapping_add(1);
            shared.turn.notify_all();
            return Ok(());
        }
        // Completion is checked before `broken`: a rank that passed the last barrier and then
        // dropped its handle has not abandoned this barrier.
        while state.generation == generation {
            if state.broken {
                return Err(CollectiveError::PeerLost);
            }
            state = shared.turn.wait(state).map_err(|_| CollectiveError::PeerLost)?;
        }
        Ok(())
    }

    /// Copies `data` into this rank's slot, reusing the slot's allocation.
    fn publish(&self, data: &[f32]) -> Result<()> {
        let mut slot = self.shared.slots[self.rank].write().map_err(|_| CollectiveError::PeerLost)?;
        slot.clear();
        slot.extend_from_slice(data);
        Ok(())
    }

    /// Checks that every rank published `len` values.
    fn check_slot_lengths(&self, op: &str, len: usize) -> Result<()> {
        for (rank, slot) in self.shared.slots.iter().enumerate() {
            let slot_len = slot.read().map_err(|_| CollectiveError::PeerLost)?.len();
            if slot_len != len {
                return Err(CollectiveError::Protocol(format!(
                    "{op}: rank {rank} passed {slot_len} values, rank {} passed {len}",
                    self.rank
                )));
            }
        }
        Ok(())
    }

    /// Overwrites `data` with the sum of all slots, added in rank order.
    fn sum_slots(&self, data: &mut [f32]) -> Result<()> {
        self.check_slot_lengths("all_reduce_sum", data.len())?;
        for (rank, slot) in self.shared.slots.iter().enumerate() {
            let slot = slot.read().map_err(|_| CollectiveError::PeerLost)?;
            if rank == 0 {
                data.copy_from_slice(&slot);
            } else {
                data.iter_mut().zip(slot.iter()).for_each(|(d, s)| *d += *s);
            }
        }
        Ok(())
    }

    /// Concatenates all slots in rank order into `out`.
    fn gather_slots(&self, local_len: usize, out: &mut [f32]) -> Result<()> {
        self.check_slot_lengths("all_gather", local_len)?;
        if out.len() != local_len * self.shared.world {
            return Err(CollectiveError::InvalidArgument(format!(
                "all_gather output has {} values, expected {} ({} per rank x {} ranks)",
                out.len(),
                local_len * self.shared.world,
                local_len,
                self.shared.world
            )));
        }
        for (slot, block) in self.shared.slots.iter().zip(out.chunks_exact_mut(local_len.max(1))) {
            let slot = slot.read().map_err(|_| CollectiveError::PeerLost)?;
            block.copy_from_slice(&slot);
        }
        Ok(())
    }

    fn check_peer(&self, peer: usize, what: &str) -> Result<()> {
        if peer >= self.shared.world || peer == self.rank {
            return Err(CollectiveError::InvalidArgument(format!(
                "{what} rank {peer} from rank {} in a group of {}",
                self.rank, self.shared.world
            )));
        }
        Ok(())
    }
}

impl Collective for InProcessGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<()> {
        if self.shared.world == 1 {
            return Ok(());
        }
        self.publish(data)?;
        self.barrier()?;
        let summed = self.sum_slots(data);
        // Nobody may overwrite a slot before every rank has read it; the second barrier runs
        // even after a length mismatch so all ranks report it and stay in step.
        self.barrier()?;
        summed
    }

    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> Result<()> {
        self.publish(local)?;
        self.barrier()?;
        let gathered = self.gather_slots(local.len(), out);
        self.barrier()?;
        gathered
    }

    fn send(&mut self, peer: usize, data: &[f32]) -> Result<()> {
        self.check_peer(peer, "send to")?;
        let channel = self.to_peer[peer].as_ref().ok_or(CollectiveError::PeerLost)?;
        // A disconnected channel means the peer dropped its handle: it will never receive.
        channel.send(data.to_vec()).map_err(|_| CollectiveError::PeerLost)
    }

    fn recv(&mut self, peer: usize, out: &mut [f32]) -> Result<()> {
        self.check_peer(peer, "recv from")?;
        let channel = self.from_peer[peer].as_ref().ok_or(CollectiveError::PeerLost)?;
        // Messages a peer sent before leaving are still delivered; only an empty, disconnected
        // channel is an error.
        let message = channel.recv().map_err(|_| CollectiveError::PeerLost)?;
        if message.len() != out.len() {
            return Err(CollectiveError::Protocol(format!(
                "rank {peer} sent {} values to rank {}, which expected {}",
                message.len(),
                self.rank,
                out.len()
            )));
        }
        out.copy_from_slice(&message);
        Ok(())
    }

    fn as_send(&mut self) -> Option<&mut (dyn Collective + Send)> {
        Some(self)
    }
}

impl Drop for InProcessGroup {
    fn drop(&mut self) {
        // Mark the group broken even if another rank poisoned the lock: waiters must wake up.
        let mut state = match self.shared.barrier.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        state.broken = true;
        self.shared.turn.notify_all();
        drop(state);
        // Receivers go before senders: a peer learns of the departure when its `recv` sees our
        // senders disconnect, and by then its next `send` to us must fail too, not land in a
        // channel nobody reads.
        self.from_peer.clear();
        self.to_peer.clear();
    }
}

impl std::fmt::Debug for InProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessGroup").field("rank", &self.rank).field("world_size", &self.shared.world).finish()
    }
}
