//! The KV memory of one rank: fixed blocks of [`KV_BLOCK_TOKENS`] tokens, shared by every
//! sequence through its block table (`kv_cache.rs`).
//!
//! Per layer, keys and values live in buffers of [`CHUNK_BLOCKS`] blocks each; the pool grows by
//! adding a buffer and never moves one, so no sequence's keys are ever copied to grow it. One
//! block holds `[kv_heads, KV_BLOCK_TOKENS, head_dim]` elements: the 16 rows of one KV head are
//! adjacent, which is what decode attention reads.
//!
//! Blocks are reference counted: beams forked from one sequence share its blocks, and a block
//! that is about to be written while shared is copied first (copy on write), which only ever
//! happens to a sequence's partly filled last block. A block whose count drops to zero goes back
//! to the free list, or, if the prefix cache (`prefix_cache.rs`) names it, waits there for a
//! later sequence with the same prefix until the pool needs it for new data.

use candle_core::DType;

use crate::error::{ModelError, Result};
use crate::kernels::elem::{Buffers, Elem};
use crate::model::kv_cache::KV_BLOCK_TOKENS;
use crate::model::prefix_cache::{BlockId, PrefixCache};

/// log2 of the blocks per buffer.
pub(crate) const CHUNK_SHIFT: u32 = 6;
/// Blocks per buffer: a power of two, so a block's buffer and place are a shift and a mask.
pub(crate) const CHUNK_BLOCKS: usize = 1 << CHUNK_SHIFT;

/// Which of a layer's two tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part {
    Keys = 0,
    Values = 1,
}

/// How the pool's blocks are used right now; every block is exactly one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolCounts {
    /// Blocks the pool has storage for.
    pub blocks: usize,
    /// Blocks some sequence uses.
    pub used: usize,
    /// Blocks no sequence uses that the prefix cache keeps (evictable).
    pub cached: usize,
    /// Blocks ready for new data.
    pub free: usize,
}

pub(crate) struct KvPool {
    kv_heads: usize,
    head_dim: usize,
    /// Elements of one block of one layer's keys (or values).
    block_elems: usize,
    max_blocks: Option<usize>,
    /// Per layer: keys and values.
    layers: Vec<[Buffers; 2]>,
    refs: Vec<u32>,
    /// Unused, unnamed blocks; the lowest id is taken first.
    free: Vec<BlockId>,
    used: usize,
    pub(crate) cache: PrefixCache,
}

impl KvPool {
    /// An empty pool for `layers` layers of `kv_heads` × `head_dim` keys and values of `dtype`,
    /// growing to at most `max_blocks` blocks.
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, dtype: DType, max_blocks: Option<usize>) -> Self {
        // A model loads only in types with kernels; the cache refuses every read and write in
        // any other type before it reaches these buffers, so their type then does not matter.
        let empty = || Buffers::empty(dtype).unwrap_or(Buffers::F32(Vec::new()));
        let layers = (0..layers).map(|_| [empty(), empty()]).collect();
        Self {
            kv_heads,
            head_dim,
            block_elems: kv_heads * KV_BLOCK_TOKENS * head_dim,
            max_blocks,
            layers,
            refs: Vec::new(),
            free: Vec::new(),
            used: 0,
            cache: PrefixCache::default(),
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Blocks some sequence uses.
    pub fn used(&self) -> usize {
        self.used
    }

    /// The buffers of `layer`'s keys or values.
    pub fn buffers(&self, layer: usize, part: Part) -> &Buffers {
        &self.layers[layer][part as usize]
    }

    /// Users of `block`.
    pub fn refs(&self, block: BlockId) -> u32 {
        self.refs.get(block as usize).copied().unwrap_or(0)
    }

    /// A block for new data, with one user: a free one, else new storage while the pool may grow,
    /// else the least recently used cached block no sequence uses.
    pub fn allocate(&mut self) -> Result<BlockId> {
        if self.free.is_empty() && self.max_blocks.is_none_or(|m| self.refs.len() < m) {
            self.grow();
        }
        let block = match self.free.pop() {
            Some(b) => b,
            None => self.cache.evict().ok_or(ModelError::KvFull { blocks: self.refs.len() })?,
        };
        self.refs[block as usize] = 1;
        self.used += 1;
        Ok(block)
    }

    /// One more user of `block`.
    pub fn retain(&mut self, block: BlockId) {
        let r = &mut self.refs[block as usize];
        if *r == 0 {
            self.used += 1;
            self.cache.unpark(block);
        }
        *r += 1;
    }

    /// One user fewer of `block`; at none it is freed, or kept by the prefix cache if named.
    pub fn release(&mut self, block: BlockId) {
        let r = &mut self.refs[block as usize];
        if *r == 0 {
            return;
        }
        *r -= 1;
        if *r == 0 {
            self.used -= 1;
            if self.cache.holds(block) {
                self.cache.park(block);
            } else {
                self.free.push(block);
            }
        }
    }

    /// A new block (one user) holding a copy of `src`'s keys and values in every layer.
    pub fn copy_of(&mut self, src: BlockId) -> Result<BlockId> {
        let dst = self.allocate()?;
        let n = self.block_elems;
        for layer in &mut self.layers {
            for buffers in layer.iter_mut() {
                match buffers {
                    Buffers::F32(b) => copy_block(b, src, dst, n),
                    Buffers::BF16(b) => copy_block(b, src, dst, n),
                    Buffers::F16(b) => copy_block(b, src, dst, n),
                }
            }
        }
        Ok(dst)
    }

    /// `block`'s elements of `layer`'s keys or values, for writing.
    pub fn block_mut<T: Elem>(&mut self, layer: usize, part: Part, block: BlockId) -> Option<&mut [T]> {
        let n = self.block_elems;
        let buffers = T::of_buffers_mut(&mut self.layers[layer][part as usize])?;
        let (chunk, at) = place(block, n);
        buffers.get_mut(chunk)?.get_mut(at..at + n)
    }

    /// `block`'s elements of `layer`'s keys or values.
    pub fn block<T: Elem>(&self, layer: usize, part: Part, block: BlockId) -> Option<&[T]> {
        let n = self.block_elems;
        let buffers = T::of_buffers(&self.layers[layer][part as usize])?;
        let (chunk, at) = place(block, n);
        buffers.get(chunk)?.get(at..at + n)
    }

    /// How the blocks are used.
    pub fn counts(&self) -> PoolCounts {
        let cached = self.cache.stats().unused_blocks;
        PoolCounts { blocks: self.refs.len(), used: self.used, cached, free: self.free.len() }
    }

    /// Checks the pool's books against `users`, each block's users as the sequences' tables
    /// count them: every block is used (with exactly that count), cached or free, never two of
    /// them, and the counts add up. Returns what it found wrong.
    pub fn check(&self, users: &[u32]) -> std::result::Result<PoolCounts, String> {
        let c = self.counts();
        if users.len() > self.refs.len() {
            return Err(format!("tables name block {} of {}", users.len() - 1, self.refs.len()));
        }
        let mut free = vec![false; self.refs.len()];
        for &b in &self.free {
            if std::mem::replace(&mut free[b as usize], true) {
                return Err(format!("block {b} is free twice"));
            }
        }
        let mut used = 0;
        for (b, &r) in self.refs.iter().enumerate() {
            let block = b as BlockId;
            let expected = users.get(b).copied().unwrap_or(0);
            if r != expected {
                return Err(format!("block {b} counts {r} users, the tables {expected}"));
            }
            let parked = self.cache.is_parked(block);
            match (r > 0, parked, free[b]) {
                (true, false, false) => used += 1,
                (false, true, false) => {}
                (false, false, true) if !self.cache.holds(block) => {}
                state => return Err(format!("block {b} with {r} users is (used, cached, free) = {state:?}")),
            }
        }
        if used != c.used || c.used + c.cached + c.free != c.blocks {
            return Err(format!("counts do not add up: {c:?}, {used} used by the tables"));
        }
        Ok(c)
    }

    /// Adds one buffer of blocks to every layer (fewer than [`CHUNK_BLOCKS`] at the cap).
    fn grow(&mut self) {
        let have = self.refs.len();
        let room = self.max_blocks.map_or(CHUNK_BLOCKS, |m| m.saturating_sub(have)).min(CHUNK_BLOCKS);
        if room == 0 {
            return;
        }
        for layer in &mut self.layers {
            for buffers in layer.iter_mut() {
                buffers.push_zeroed(room * self.block_elems);
            }
        }
        self.refs.resize(have + room, 0);
        // Popped from the end: the lowest new block first.
        self.free.extend((have..have + room).rev().map(|b| b as BlockId));
    }
}

/// A block's buffer and its first element there.
pub(crate) fn place(block: BlockId, block_elems: usize) -> (usize, usize) {
    let b = block as usize;
    (b >> CHUNK_SHIFT, (b & (CHUNK_BLOCKS - 1)) * block_elems)
}

fn copy_block<T: Copy>(buffers: &mut [Vec<T>], src: BlockId, dst: BlockId, n: usize) {
    let ((sc, sa), (dc, da)) = (place(src, n), place(dst, n));
    if sc == dc {
        if let Some(chunk) = buffers.get_mut(sc) {
            chunk.copy_within(sa..sa + n, da);
        }
        return;
    }
    // Two buffers: borrow both through one split.
    let (lo, hi) = (sc.min(dc), sc.max(dc));
    let (first, rest) = buffers.split_at_mut(hi);
    let (Some(a), Some(b)) = (first.get_mut(lo), rest.first_mut()) else { return };
    let (from, to) = if sc < dc { (&*a, b) } else { (&*b, a) };
    to[da..da + n].copy_from_slice(&from[sa..sa + n]);
}
