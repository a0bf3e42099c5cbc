//! Which full KV blocks hold which token prefix, so that a new sequence starting with the same
//! tokens reuses them instead of computing them again.
//!
//! A full block is named by a hash of its 16 token ids, the hash of the block before it (a fixed
//! root for the first) and the model's identity: equal hashes mean equal tokens at equal
//! positions after equal prefixes, hence equal keys and values. Each entry also keeps its parent
//! hash and tokens, checked on every hit, so a hash collision is a miss, never wrong keys.
//!
//! Pure bookkeeping: the pool (`kv_pool.rs`) owns the blocks and their reference counts and tells
//! this cache when a cached block stops or starts being used. Unused cached blocks wait here in
//! least-recently-used order until the pool needs their memory. Every decision depends only on
//! the order of calls, so ranks that see the same steps make the same ones.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use crate::model::kv_cache::KV_BLOCK_TOKENS;

/// A block of the pool.
pub type BlockId = u32;

/// The hash chain's value before the first block.
pub(crate) const ROOT: u64 = 0x7465_7373_6572_6131;

/// The name of a full block holding `tokens` after the block named `parent`, for the model
/// `identity`. `DefaultHasher::new()` has fixed keys, so every process computes the same value.
pub(crate) fn block_hash(parent: u64, tokens: &[u32; KV_BLOCK_TOKENS], identity: u64) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (parent, tokens, identity).hash(&mut h);
    h.finish()
}

/// Hits, misses and evictions since the cache was made, and what it holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Blocks the cache names (in use by sequences or not).
    pub cached_blocks: usize,
    /// Of those, blocks no sequence uses: evictable.
    pub unused_blocks: usize,
    /// Lookups (one per new sequence or chunk that could reuse blocks) that reused at least one
    /// block.
    pub hits: u64,
    /// Lookups that reused nothing.
    pub misses: u64,
    /// Tokens whose keys and values were reused instead of computed.
    pub hit_tokens: u64,
    /// Unused cached blocks given back to the pool for new data.
    pub evictions: u64,
}

struct Entry {
    hash: u64,
    parent: u64,
    tokens: [u32; KV_BLOCK_TOKENS],
    /// Set while no sequence uses the block: its place in `unused`.
    parked: Option<u64>,
}

/// Full blocks by content, and the unused ones in LRU order.
#[derive(Default)]
pub(crate) struct PrefixCache {
    by_hash: HashMap<u64, BlockId>,
    entries: HashMap<BlockId, Entry>,
    /// (tick, block) of cached blocks no sequence uses; the first is the least recently used.
    unused: BTreeSet<(u64, BlockId)>,
    tick: u64,
    stats: PrefixStats,
}

impl PrefixCache {
    /// The block holding `tokens` after `parent`, if cached.
    pub fn lookup(&self, parent: u64, tokens: &[u32; KV_BLOCK_TOKENS], identity: u64) -> Option<(BlockId, u64)> {
        let hash = block_hash(parent, tokens, identity);
        let block = *self.by_hash.get(&hash)?;
        let e = self.entries.get(&block)?;
        (e.parent == parent && e.tokens == *tokens).then_some((block, hash))
    }

    /// Records that in-use `block` now holds `tokens` after `parent` under `hash`. A block whose
    /// content is already cached elsewhere stays unnamed (and is freed when its users end).
    pub fn insert(&mut self, block: BlockId, hash: u64, parent: u64, tokens: [u32; KV_BLOCK_TOKENS]) {
        if self.by_hash.contains_key(&hash) || self.entries.contains_key(&block) {
            return;
        }
        self.by_hash.insert(hash, block);
        self.entries.insert(block, Entry { hash, parent, tokens, parked: None });
    }

    /// Whether `block` is named here.
    pub fn holds(&self, block: BlockId) -> bool {
        self.entries.contains_key(&block)
    }

    /// `block` (cached) lost its last user: it waits to be reused or evicted, the most recently
    /// used of the unused blocks.
    pub fn park(&mut self, block: BlockId) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.entries.get_mut(&block) {
            if let Some(old) = e.parked.replace(tick) {
                self.unused.remove(&(old, block));
            }
            self.unused.insert((tick, block));
        }
    }

    /// `block` (cached) has a user again.
    pub fn unpark(&mut self, block: BlockId) {
        if let Some(old) = self.entries.get_mut(&block).and_then(|e| e.parked.take()) {
            self.unused.remove(&(old, block));
        }
    }

    /// Forgets the least recently used unused block and returns it for new data.
    pub fn evict(&mut self) -> Option<BlockId> {
        let (_, block) = self.unused.pop_first()?;
        if let Some(e) = self.entries.remove(&block) {
            self.by_hash.remove(&e.hash);
        }
        self.stats.evictions += 1;
        Some(block)
    }

    /// Counts a lookup that reused `tokens` tokens (0: a miss).
    pub fn record_lookup(&mut self, tokens: usize) {
        if tokens > 0 {
            self.stats.hits += 1;
            self.stats.hit_tokens += tokens as u64;
        } else {
            self.stats.misses += 1;
        }
    }

    pub fn stats(&self) -> PrefixStats {
        PrefixStats { cached_blocks: self.entries.len(), unused_blocks: self.unused.len(), ..self.stats }
    }

    /// Whether `block` is cached and waiting unused.
    pub fn is_parked(&self, block: BlockId) -> bool {
        self.entries.get(&block).is_some_and(|e| e.parked.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(first: u32) -> [u32; KV_BLOCK_TOKENS] {
        std::array::from_fn(|i| first + i as u32)
    }

    #[test]
    fn hashes_chain_parents_tokens_and_model() {
        let t = tokens(5);
        let a = block_hash(ROOT, &t, 1);
        assert_eq!(a, block_hash(ROOT, &t, 1), "deterministic");
        assert_ne!(a, block_hash(ROOT, &t, 2), "another model");
        assert_ne!(a, block_hash(a, &t, 1), "another position in the chain");
        assert_ne!(a, block_hash(ROOT, &tokens(6), 1), "other tokens");
    }

    #[test]
    fn evicts_unused_blocks_least_recently_used_first_never_used_ones() {
        let mut c = PrefixCache::default();
        for b in 0..3 {
            let t = tokens(b * 100);
            c.insert(b, block_hash(ROOT, &t, 0), ROOT, t);
        }
        assert_eq!(c.lookup(ROOT, &tokens(100), 0).map(|(b, _)| b), Some(1));
        assert_eq!(c.evict(), None, "every block is in use");
        c.park(2);
        c.park(0);
        c.park(1);
        c.unpark(0);
        assert_eq!(c.stats().unused_blocks, 2);
        assert_eq!(c.evict(), Some(2));
        assert_eq!(c.lookup(ROOT, &tokens(200), 0), None, "an evicted block is no longer found");
        assert_eq!(c.evict(), Some(1));
        assert_eq!(c.evict(), None, "block 0 is in use again");
        assert_eq!(c.stats().evictions, 2);
        assert_eq!(c.stats().cached_blocks, 1);
    }
}
