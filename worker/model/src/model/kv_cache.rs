//! Per-sequence key/value cache of one rank: a block table per sequence over the rank's KV pool
//! (`kv_pool.rs`).
//!
//! A sequence's keys and values live in blocks of [`KV_BLOCK_TOKENS`] tokens; its table lists
//! them in position order. Growing takes another block and copies nothing. The memory a rank
//! uses is the blocks its sequences use ([`KvCache::blocks`]; blocks shared by beams count
//! once), so a scheduler that counts the same blocks per sequence never counts fewer.
//!
//! Beams fork by sharing their source's blocks; the shared, partly filled last block is copied
//! when one of them first writes to it. Full blocks are named by their tokens and prefix
//! (`prefix_cache.rs`): a new sequence whose first tokens match takes those blocks
//! ([`KvCache::reuse_prefix`]) and computes only the rest. Blocks nobody uses stay cached until
//! the pool needs their memory, least recently used first.
//!
//! Decode attention reads the blocks in place through the table; longer chunks (prefill) read
//! a sequence's keys gathered into one tensor ([`KvCache::write`]).
//!
//! A sequence spread over a sequence-parallel ring also keeps a [`RingPlacement`]: which global
//! positions this member's slots hold, and how many tokens every member holds. Slots stay dense
//! (slot `i` is the `i`-th position this member holds); ring sequences are not prefix-cached.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::kernels::decode_attention::Paged;
use crate::kernels::elem::{is_slice, with_slice, Elem};
use crate::model::kv_pool::{KvPool, Part, PoolCounts};
use crate::model::prefix_cache::{block_hash, BlockId, PrefixStats, ROOT};

/// Identifies a sequence across the ranks that hold its KV cache.
pub type SeqId = u64;

/// Shape of the cache entries of one rank.
#[derive(Debug, Clone)]
pub struct KvSpec {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    pub device: Device,
}

/// How a rank's KV cache is sized and shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Blocks the pool may hold (in use or cached); `None`: as many as the sequences need. Every
    /// rank of a group must use the same value, so that they evict the same blocks.
    pub max_blocks: Option<usize>,
    /// Whether full blocks are named by content for later sequences to reuse.
    pub prefix_cache: bool,
    /// The model's identity, part of every block's name.
    pub model_identity: u64,
}

impl Default for KvCacheConfig {
    fn default() -> Self {
        Self { max_blocks: None, prefix_cache: true, model_identity: 0 }
    }
}

/// Whether a new sequence takes part in prefix caching: reusing cached blocks and offering its
/// own full blocks to later sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixCaching {
    On,
    Off,
}

/// A sequence's place in the prefix cache's hash chain.
#[derive(Debug, Clone)]
struct Chain {
    /// The name of the sequence's last full block ([`ROOT`] before the first).
    hash: u64,
    /// Tokens of the partly filled block after it.
    pending: [u32; KV_BLOCK_TOKENS],
    filled: usize,
}

impl Chain {
    /// The chain's start for sequences of `namespace`: 0 for the base model, else a LoRA
    /// adapter's identity, so that blocks computed with one adapter are never found by a sequence
    /// of another or of the base (their keys and values differ).
    fn root(namespace: u64) -> Self {
        let hash = if namespace == 0 { ROOT } else { block_hash(ROOT, &[u32::MAX; KV_BLOCK_TOKENS], namespace) };
        Self { hash, pending: [0; KV_BLOCK_TOKENS], filled: 0 }
    }
}

struct SeqKv {
    len: usize,
    /// The blocks holding positions `16 i .. 16 (i + 1)` (ring slots for a ring sequence).
    table: Vec<BlockId>,
    /// Set for sequences spread over a ring: slot `i` then holds `ring.positions[i]`.
    ring: Option<RingPlacement>,
    /// Set while the sequence's blocks are named as they fill.
    chain: Option<Chain>,
}

/// Where the tokens of a sequence spread over a sequence-parallel ring live, as one member
/// records it. Every member applies the same prefill layout and the same append decisions, so
/// all of them hold the same `held` counts without exchanging them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingPlacement {
    member: usize,
    held: Vec<usize>,
    positions: Vec<usize>,
}

impl RingPlacement {
    /// `member`'s record of a sequence whose members hold `held` tokens each, its own slots
    /// holding `positions` (ascending).
    pub(crate) fn new(member: usize, held: Vec<usize>, positions: Vec<usize>) -> Self {
        Self { member, held, positions }
    }

    /// This member's index in the ring.
    pub fn member(&self) -> usize {
        self.member
    }

    /// Members of the ring.
    pub fn members(&self) -> usize {
        self.held.len()
    }

    /// Tokens cached on each member, in member order (the same record on every member).
    pub fn held(&self) -> &[usize] {
        &self.held
    }

    /// Global positions of this member's cached tokens, ascending, in slot order.
    pub fn positions(&self) -> &[usize] {
        &self.positions
    }

    /// Tokens of the sequence over the whole ring, which is also the next token's position.
    pub fn len(&self) -> usize {
        self.held.iter().sum()
    }

    /// Whether no member holds a token of the sequence.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The member holding the fewest tokens, the lowest index among equals: where a new token's
    /// keys and values go under [`crate::AppendOn::LeastLoaded`].
    pub fn least_loaded(&self) -> usize {
        let fewest = self.held.iter().min().copied().unwrap_or(0);
        self.held.iter().position(|&n| n == fewest).unwrap_or(0)
    }
}

/// All sequences cached on one rank, and the pool of blocks they use.
pub struct KvCache {
    spec: KvSpec,
    config: KvCacheConfig,
    pool: KvPool,
    seqs: HashMap<SeqId, SeqKv>,
}

/// Tokens per block of KV memory.
pub const KV_BLOCK_TOKENS: usize = 16;

/// Blocks needed to hold `tokens` entries.
pub fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(KV_BLOCK_TOKENS)
}

impl KvCache {
    /// An empty cache with an unbounded pool. `spec.dtype` must be f32, bf16 or f16 (the types
    /// a model loads in).
    pub fn new(spec: KvSpec) -> Self {
        Self::with_config(spec, KvCacheConfig::default())
    }

    /// An empty cache sized and shared as `config` says.
    pub fn with_config(spec: KvSpec, config: KvCacheConfig) -> Self {
        let pool = KvPool::new(spec.layers, spec.kv_heads, spec.head_dim, spec.dtype, config.max_blocks);
        Self { spec, config, pool, seqs: HashMap::new() }
    }

    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }

    /// Tokens cached for `seq`, or `None` if the sequence is unknown.
    pub fn len(&self, seq: SeqId) -> Option<usize> {
        self.seqs.get(&seq).map(|s| s.len)
    }

    /// Number of sequences held.
    pub fn num_sequences(&self) -> usize {
        self.seqs.len()
    }

    /// Total tokens held over all sequences.
    pub fn tokens(&self) -> usize {
        self.seqs.values().map(|s| s.len).sum()
    }

    /// Blocks of KV memory the sequences use, each shared block once. Cached blocks no sequence
    /// uses are not counted: the pool takes them back whenever it needs room.
    pub fn blocks(&self) -> usize {
        self.pool.used()
    }

    /// Blocks `seq`'s table holds now, shared or not (0 for an unknown sequence).
    pub fn seq_blocks(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.table.len())
    }

    /// How the pool's blocks are used: by sequences, cached, free.
    pub fn pool_counts(&self) -> PoolCounts {
        self.pool.counts()
    }

    /// The prefix cache's hits, evictions and holdings.
    pub fn prefix_stats(&self) -> PrefixStats {
        self.pool.cache.stats()
    }

    /// Checks the pool's books against the sequences' tables (every block used by exactly the
    /// tables naming it, cached or free, none lost) and returns the counts; an error says what
    /// is wrong.
    pub fn check(&self) -> std::result::Result<PoolCounts, String> {
        let mut users = Vec::new();
        for s in self.seqs.values() {
            for &b in &s.table {
                let b = b as usize;
                if users.len() <= b {
                    users.resize(b + 1, 0u32);
                }
                users[b] += 1;
            }
        }
        self.pool.check(&users)
    }

    /// The ring placement of a sequence spread over a sequence-parallel ring; `None` for an
    /// unknown sequence or one held whole by this rank.
    pub fn ring(&self, seq: SeqId) -> Option<&RingPlacement> {
        self.seqs.get(&seq).and_then(|s| s.ring.as_ref())
    }

    /// Drops a sequence's cache. Returns whether it existed. Its named blocks stay cached,
    /// the deepest first in line for eviction (a prefix is only found through its parents).
    pub fn release(&mut self, seq: SeqId) -> bool {
        let Some(entry) = self.seqs.remove(&seq) else { return false };
        for &b in entry.table.iter().rev() {
            self.pool.release(b);
        }
        true
    }

    /// Makes `to` continue from `from`'s tokens (replacing whatever `to` held), for beam search.
    /// The two share `from`'s blocks; a shared block is copied only when one of them writes to
    /// it. Sequences spread over a ring cannot be forked.
    pub fn fork(&mut self, from: SeqId, to: SeqId) -> Result<()> {
        let src = self.seqs.get(&from).ok_or(ModelError::UnknownSequence(from))?;
        if src.ring.is_some() {
            return Err(ModelError::InvalidBatch(format!("sequence {from} is spread over a ring and cannot be forked")));
        }
        let copy = SeqKv { len: src.len, table: src.table.clone(), ring: None, chain: src.chain.clone() };
        for &b in &copy.table {
            self.pool.retain(b);
        }
        if let Some(old) = self.seqs.insert(to, copy) {
            for &b in old.table.iter().rev() {
                self.pool.release(b);
            }
        }
        Ok(())
    }

    /// What [`KvCache::blocks`] would read after `forks` (in order, as [`KvCache::fork`]) and
    /// then writes of positions `start..end` to each `(seq, start, end)` (a new sequence where
    /// `seq` is unknown), assuming no prefix is reused (reuse only lowers it). Exact otherwise:
    /// shared blocks count once, and a shared block a write would copy counts again.
    pub fn blocks_after(&self, forks: &[(SeqId, SeqId)], writes: &[(SeqId, usize, usize)]) -> Result<usize> {
        let mut refs: HashMap<BlockId, u32> = HashMap::new();
        let mut tables: HashMap<SeqId, Option<Vec<BlockId>>> = HashMap::new();
        let mut used = self.pool.used();
        let table = |tables: &HashMap<SeqId, Option<Vec<BlockId>>>, seq: SeqId| match tables.get(&seq) {
            Some(t) => t.clone(),
            None => self.seqs.get(&seq).map(|s| s.table.clone()),
        };
        for &(from, to) in forks {
            let src = table(&tables, from).ok_or(ModelError::UnknownSequence(from))?;
            for &b in &src {
                let r = refs.get(&b).copied().unwrap_or_else(|| self.pool.refs(b));
                if r == 0 {
                    used += 1;
                }
                refs.insert(b, r + 1);
            }
            for b in table(&tables, to).unwrap_or_default() {
                let r = refs.get(&b).copied().unwrap_or_else(|| self.pool.refs(b));
                if r == 1 {
                    used -= 1;
                }
                refs.insert(b, r.saturating_sub(1));
            }
            tables.insert(to, Some(src));
        }
        for &(seq, start, end) in writes {
            let t = table(&tables, seq).unwrap_or_default();
            used += blocks_for(end).saturating_sub(t.len());
            if let Some(&b) = t.get(start / KV_BLOCK_TOKENS).filter(|_| !start.is_multiple_of(KV_BLOCK_TOKENS)) {
                let r = refs.get(&b).copied().unwrap_or_else(|| self.pool.refs(b));
                if r > 1 {
                    used += 1;
                    refs.insert(b, r - 1);
                }
            }
        }
        Ok(used)
    }

    /// Starts `seq` if it is new (`start` 0), then, if its blocks are named as they fill and it
    /// stands at the end of a full block at `start`, gives it the cached blocks that hold the
    /// longest run of whole blocks of `tokens` (the tokens the caller is about to feed from
    /// `start`), always leaving at least the last token to compute. Returns the tokens reused:
    /// the caller feeds only `tokens[reused..]`, from `start + reused`.
    pub fn reuse_prefix(&mut self, seq: SeqId, start: usize, tokens: &[u32], caching: PrefixCaching) -> Result<usize> {
        self.reuse_prefix_for(seq, start, tokens, caching, 0)
    }

    /// [`KvCache::reuse_prefix`] for a sequence of `namespace`: 0 for the base model, or the
    /// identity of the LoRA adapter it runs with (`Adapter::identity`); blocks are shared within
    /// a namespace only.
    pub fn reuse_prefix_for(&mut self, seq: SeqId, start: usize, tokens: &[u32], caching: PrefixCaching, namespace: u64) -> Result<usize> {
        let Self { config, pool, seqs, .. } = self;
        let entry = match seqs.entry(seq) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(_) if start != 0 => return Err(ModelError::UnknownSequence(seq)),
            std::collections::hash_map::Entry::Vacant(e) => {
                let chain = (config.prefix_cache && caching == PrefixCaching::On).then(|| Chain::root(namespace));
                e.insert(SeqKv { len: 0, table: Vec::new(), ring: None, chain })
            }
        };
        let Some(chain) = entry.chain.as_mut() else { return Ok(0) };
        if caching == PrefixCaching::Off || entry.ring.is_some() || entry.len != start || chain.filled != 0 {
            return Ok(0);
        }
        if tokens.len() > KV_BLOCK_TOKENS {
            // Blocks past the sequence's length (made ready by a forward call that then
            // failed) would sit between its tokens and the reused ones: give them back first.
            while entry.table.len() > start / KV_BLOCK_TOKENS {
                if let Some(b) = entry.table.pop() {
                    pool.release(b);
                }
            }
        }
        let mut reused = 0;
        while reused + KV_BLOCK_TOKENS < tokens.len() {
            let mut block_tokens = [0u32; KV_BLOCK_TOKENS];
            block_tokens.copy_from_slice(&tokens[reused..reused + KV_BLOCK_TOKENS]);
            let Some((block, hash)) = pool.cache.lookup(chain.hash, &block_tokens, config.model_identity) else { break };
            pool.retain(block);
            entry.table.push(block);
            chain.hash = hash;
            reused += KV_BLOCK_TOKENS;
        }
        entry.len += reused;
        if tokens.len() > KV_BLOCK_TOKENS {
            // A lookup that could have found a block: counted as a hit or a miss.
            pool.cache.record_lookup(reused);
        }
        Ok(reused)
    }

    /// Makes room for `seq` to reach `new_len` tokens, creating it if `start == 0`. The caller
    /// promises that `start` is where this forward call writes, which must be the current length.
    /// A new sequence's blocks are named in `namespace` ([`KvCache::reuse_prefix_for`]).
    pub(crate) fn prepare(&mut self, seq: SeqId, start: usize, new_len: usize, namespace: u64) -> Result<()> {
        match self.len(seq) {
            None if start == 0 => {
                let chain = self.config.prefix_cache.then(|| Chain::root(namespace));
                self.seqs.insert(seq, SeqKv { len: 0, table: Vec::new(), ring: None, chain });
            }
            None => return Err(ModelError::UnknownSequence(seq)),
            Some(_) if self.ring(seq).is_some() => {
                return Err(ModelError::InvalidBatch(format!(
                    "sequence {seq} is spread over a sequence-parallel ring; continue it with forward_ring"
                )))
            }
            Some(len) if len != start => {
                return Err(ModelError::InvalidBatch(format!("sequence {seq} holds {len} tokens but the batch writes at position {start}")))
            }
            Some(_) => {}
        }
        self.reserve(seq, start, new_len)
    }

    /// Gives `seq` blocks for positions up to `needed`, and its own copy of the block holding
    /// `from` if it shares it (the only block a write there can reach that holds earlier
    /// tokens).
    fn reserve(&mut self, seq: SeqId, from: usize, needed: usize) -> Result<()> {
        let Self { pool, seqs, .. } = self;
        let entry = seqs.get_mut(&seq).ok_or(ModelError::UnknownSequence(seq))?;
        if let Some(slot) = entry.table.get_mut(from / KV_BLOCK_TOKENS) {
            if pool.refs(*slot) > 1 {
                let copy = pool.copy_of(*slot)?;
                pool.release(*slot);
                *slot = copy;
            }
        }
        let blocks = blocks_for(needed);
        if entry.table.capacity() < blocks {
            entry.table.reserve(blocks - entry.table.len());
        }
        while entry.table.len() < blocks {
            entry.table.push(pool.allocate()?);
        }
        Ok(())
    }

    /// Starts `seq` as a ring sequence whose local slots will hold `placement.positions()`
    /// (written by the prefill that follows, then [`KvCache::commit`]ted). A sequence that
    /// already holds tokens is refused; an empty leftover of a failed call is replaced.
    pub(crate) fn begin_ring(&mut self, seq: SeqId, placement: RingPlacement) -> Result<()> {
        if let Some(len) = self.len(seq).filter(|&len| len > 0) {
            return Err(ModelError::InvalidBatch(format!(
                "sequence {seq} already holds {len} tokens; a ring prefill starts a new sequence"
            )));
        }
        self.release(seq);
        let slots = placement.positions.len();
        self.seqs.insert(seq, SeqKv { len: 0, table: Vec::new(), ring: Some(placement), chain: None });
        self.reserve(seq, 0, slots)
    }

    /// Makes room for one more token of ring sequence `seq` on this member.
    pub(crate) fn reserve_ring_append(&mut self, seq: SeqId) -> Result<()> {
        let len = self.len(seq).ok_or(ModelError::UnknownSequence(seq))?;
        self.reserve(seq, len, len + 1)
    }

    /// Records a decode step of ring sequence `seq`: the token at `position` was appended on
    /// member `on` (here, if `on` is this member, in the slot after the last one).
    pub(crate) fn commit_ring_append(&mut self, seq: SeqId, position: usize, on: usize) -> Result<()> {
        let entry = self.seqs.get_mut(&seq).ok_or(ModelError::UnknownSequence(seq))?;
        let ring = entry.ring.as_mut().ok_or(ModelError::UnknownSequence(seq))?;
        let members = ring.held.len();
        let held =
            ring.held.get_mut(on).ok_or_else(|| ModelError::InvalidBatch(format!("append on member {on} of a ring of {members}")))?;
        *held += 1;
        if on == ring.member {
            ring.positions.push(position);
            entry.len += 1;
        }
        Ok(())
    }

    /// `seq`'s keys and values of `layer` for its first `len` slots (`[kv_heads, len, head_dim]`
    /// each), gathered from its blocks, without writing.
    pub(crate) fn view(&self, seq: SeqId, layer: usize, len: usize) -> Result<(Tensor, Tensor)> {
        match self.spec.dtype {
            DType::F32 => self.gather_as::<f32>(seq, layer, len),
            DType::BF16 => self.gather_as::<half::bf16>(seq, layer, len),
            DType::F16 => self.gather_as::<half::f16>(seq, layer, len),
            other => Err(ModelError::InvalidBatch(format!("no KV cache in {other:?}"))),
        }
    }

    /// Writes `k`, `v` (`[kv_heads, n, head_dim]`) of `layer` at position `start` and returns
    /// the keys and values for positions `0..start + n`, gathered into one tensor each.
    pub(crate) fn write(&mut self, seq: SeqId, layer: usize, start: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.write_rows(seq, layer, start, k, v)?;
        self.view(seq, layer, start + k.dim(1)?)
    }

    /// Writes `k`, `v` (`[kv_heads, n, head_dim]`) of `layer` at position `start` into `seq`'s
    /// blocks (which [`KvCache::prepare`] made room for).
    pub(crate) fn write_rows(&mut self, seq: SeqId, layer: usize, start: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        match self.spec.dtype {
            DType::F32 => self.write_rows_as::<f32>(seq, layer, start, [k, v]),
            DType::BF16 => self.write_rows_as::<half::bf16>(seq, layer, start, [k, v]),
            DType::F16 => self.write_rows_as::<half::f16>(seq, layer, start, [k, v]),
            other => Err(ModelError::InvalidBatch(format!("no KV cache in {other:?}"))),
        }
    }

    fn write_rows_as<T: Elem>(&mut self, seq: SeqId, layer: usize, start: usize, kv: [&Tensor; 2]) -> Result<()> {
        let (heads, d) = (self.spec.kv_heads, self.spec.head_dim);
        let Self { pool, seqs, .. } = self;
        let entry = seqs.get(&seq).ok_or(ModelError::UnknownSequence(seq))?;
        for (part, t) in [Part::Keys, Part::Values].into_iter().zip(kv) {
            let (t_heads, n, t_d) = t.dims3()?;
            if (t_heads, t_d) != (heads, d) || blocks_for(start + n) > entry.table.len() {
                return Err(ModelError::InvalidBatch(format!("keys {:?} do not fit sequence {seq}'s cache at {start}", t.dims())));
            }
            let t = t.to_dtype(T::DTYPE)?.to_device(&Device::Cpu)?.contiguous()?;
            let done = with_slice::<T, _>(&t, |src| {
                for (i, pos) in (start..start + n).enumerate() {
                    let Some(block) = pool.block_mut::<T>(layer, part, entry.table[pos / KV_BLOCK_TOKENS]) else { return false };
                    let slot = pos % KV_BLOCK_TOKENS;
                    for h in 0..heads {
                        let from = &src[(h * n + i) * d..(h * n + i + 1) * d];
                        block[(h * KV_BLOCK_TOKENS + slot) * d..(h * KV_BLOCK_TOKENS + slot + 1) * d].copy_from_slice(from);
                    }
                }
                true
            });
            if done != Some(true) {
                return Err(ModelError::InvalidBatch(format!("cannot write {:?} keys into a {:?} cache", t.dtype(), T::DTYPE)));
            }
        }
        Ok(())
    }

    fn gather_as<T: Elem>(&self, seq: SeqId, layer: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let (heads, d) = (self.spec.kv_heads, self.spec.head_dim);
        let entry = self.seqs.get(&seq).ok_or(ModelError::UnknownSequence(seq))?;
        let blocks = entry.table.get(..blocks_for(len)).ok_or_else(|| {
            ModelError::InvalidBatch(format!(
                "sequence {seq} has {} blocks, not the {} of {len} tokens",
                entry.table.len(),
                blocks_for(len)
            ))
        })?;
        let gather = |part: Part| -> Result<Tensor> {
            let mut out = Vec::with_capacity(heads * len * d);
            for h in 0..heads {
                for (i, &b) in blocks.iter().enumerate() {
                    let rows = (len - i * KV_BLOCK_TOKENS).min(KV_BLOCK_TOKENS);
                    let block =
                        self.pool.block::<T>(layer, part, b).ok_or(ModelError::InvalidBatch(format!("block {b} is not in the pool")))?;
                    out.extend_from_slice(&block[h * KV_BLOCK_TOKENS * d..(h * KV_BLOCK_TOKENS + rows) * d]);
                }
            }
            Ok(T::tensor(out, &[heads, len, d])?.to_device(&self.spec.device)?)
        };
        Ok((gather(Part::Keys)?, gather(Part::Values)?))
    }

    /// Writes token `row` of `k`, `v` (`[tokens, kv_heads, head_dim]`) at position `pos` of
    /// `seq`'s `layer`, straight into its block: a decode step's append, without the transposed
    /// copies of [`KvCache::write`]. `false` where it does not apply (not contiguous CPU
    /// tensors of the cache's type); the caller then uses `write_rows`.
    pub(crate) fn write_row(&mut self, seq: SeqId, layer: usize, pos: usize, k: &Tensor, v: &Tensor, row: usize) -> Result<bool> {
        match self.spec.dtype {
            DType::F32 => self.write_row_as::<f32>(seq, layer, pos, [k, v], row),
            DType::BF16 => self.write_row_as::<half::bf16>(seq, layer, pos, [k, v], row),
            DType::F16 => self.write_row_as::<half::f16>(seq, layer, pos, [k, v], row),
            _ => Ok(false),
        }
    }

    fn write_row_as<T: Elem>(&mut self, seq: SeqId, layer: usize, pos: usize, kv: [&Tensor; 2], row: usize) -> Result<bool> {
        let (heads, d) = (self.spec.kv_heads, self.spec.head_dim);
        let entry = self.seqs.get(&seq).ok_or(ModelError::UnknownSequence(seq))?;
        let fits = |t: &Tensor| is_slice::<T>(t) && t.dims().len() == 3 && t.dims()[1..] == [heads, d] && row < t.dims()[0];
        let Some(&block) = entry.table.get(pos / KV_BLOCK_TOKENS) else { return Ok(false) };
        if !kv.iter().all(|t| fits(t)) {
            return Ok(false);
        }
        let slot = pos % KV_BLOCK_TOKENS;
        for (part, src) in [Part::Keys, Part::Values].into_iter().zip(kv) {
            let Some(dst) = self.pool.block_mut::<T>(layer, part, block) else { return Ok(false) };
            let written = with_slice::<T, _>(src, |src| {
                for (h, from) in src[row * heads * d..(row + 1) * heads * d].chunks_exact(d).enumerate() {
                    let at = (h * KV_BLOCK_TOKENS + slot) * d;
                    dst[at..at + d].copy_from_slice(from);
                }
            });
            if written.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The type of the cached keys and values.
    pub(crate) fn dtype(&self) -> DType {
        self.spec.dtype
    }

    /// `seq`'s blocks of `layer` as decode attention reads them in place (the first
    /// [`KvCache::len`] positions, plus any this step wrote, hold tokens).
    pub(crate) fn paged(&self, seq: SeqId, layer: usize) -> Result<Paged<'_>> {
        let entry = self.seqs.get(&seq).ok_or(ModelError::UnknownSequence(seq))?;
        Ok(Paged {
            keys: self.pool.buffers(layer, Part::Keys),
            values: self.pool.buffers(layer, Part::Values),
            table: &entry.table,
            kv_heads: self.pool.kv_heads(),
            head_dim: self.pool.head_dim(),
        })
    }

    /// Records that `seq` now holds `new_len` tokens (after every layer was written), for a
    /// sequence whose tokens are not named (a ring sequence).
    pub(crate) fn commit(&mut self, seq: SeqId, new_len: usize) -> Result<()> {
        let entry = self.seqs.get_mut(&seq).ok_or(ModelError::UnknownSequence(seq))?;
        entry.len = new_len;
        entry.chain = None;
        Ok(())
    }

    /// Records that `seq` now holds `tokens` from `start` on (after every layer was written),
    /// naming each block they fill for the prefix cache.
    pub(crate) fn commit_tokens(&mut self, seq: SeqId, start: usize, tokens: &[u32]) -> Result<()> {
        let Self { config, pool, seqs, .. } = self;
        let entry = seqs.get_mut(&seq).ok_or(ModelError::UnknownSequence(seq))?;
        entry.len = start + tokens.len();
        let Some(chain) = entry.chain.as_mut() else { return Ok(()) };
        if start % KV_BLOCK_TOKENS != chain.filled {
            // Out of step with the chain (cannot happen through `prepare`): stop naming blocks.
            entry.chain = None;
            return Ok(());
        }
        for (pos, &t) in (start..).zip(tokens) {
            chain.pending[chain.filled] = t;
            chain.filled += 1;
            if chain.filled == KV_BLOCK_TOKENS {
                let parent = chain.hash;
                let hash = block_hash(parent, &chain.pending, config.model_identity);
                if let Some(&block) = entry.table.get(pos / KV_BLOCK_TOKENS) {
                    pool.cache.insert(block, hash, parent, chain.pending);
                }
                chain.hash = hash;
                chain.filled = 0;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(max_blocks: Option<usize>) -> KvCache {
        let spec = KvSpec { layers: 2, kv_heads: 1, head_dim: 4, dtype: DType::F32, device: Device::Cpu };
        KvCache::with_config(spec, KvCacheConfig { max_blocks, ..KvCacheConfig::default() })
    }

    /// Fills `seq` with `tokens` as a forward call would (room, then the commit), without
    /// computing keys.
    fn feed(kv: &mut KvCache, seq: SeqId, start: usize, tokens: &[u32]) {
        kv.prepare(seq, start, start + tokens.len(), 0).unwrap();
        kv.commit_tokens(seq, start, tokens).unwrap();
    }

    /// Blocks computed with a LoRA adapter are found by sequences of that adapter only: another
    /// adapter's and the base's keys differ for the same tokens.
    #[test]
    fn an_adapters_blocks_are_shared_within_its_namespace_only() {
        let mut kv = cache(None);
        let prompt: Vec<u32> = (0..40).collect();
        kv.prepare(1, 0, 40, 7).unwrap();
        kv.commit_tokens(1, 0, &prompt).unwrap();
        assert_eq!(kv.reuse_prefix_for(2, 0, &prompt, PrefixCaching::On, 7).unwrap(), 32, "same adapter");
        assert_eq!(kv.reuse_prefix_for(3, 0, &prompt, PrefixCaching::On, 8).unwrap(), 0, "another adapter");
        assert_eq!(kv.reuse_prefix(4, 0, &prompt, PrefixCaching::On).unwrap(), 0, "the base");
        feed(&mut kv, 5, 0, &prompt);
        assert_eq!(kv.reuse_prefix(6, 0, &prompt, PrefixCaching::On).unwrap(), 32, "the base's own blocks");
        assert_eq!(kv.reuse_prefix_for(9, 0, &prompt, PrefixCaching::On, 7).unwrap(), 32, "still the adapter's");
        kv.check().unwrap();
    }

    #[test]
    fn reuse_takes_the_longest_cached_run_of_whole_blocks_and_leaves_a_token_to_compute() {
        let mut kv = cache(None);
        let prompt: Vec<u32> = (0..40).collect();
        feed(&mut kv, 1, 0, &prompt);
        let first_blocks = kv.seqs[&1].table[..2].to_vec();
        // Same 32 tokens, then others: both full blocks reused.
        let other: Vec<u32> = (0..32).chain(100..110).collect();
        assert_eq!(kv.reuse_prefix(2, 0, &other, PrefixCaching::On).unwrap(), 32);
        assert_eq!(kv.seqs[&2].table, first_blocks);
        assert_eq!(kv.len(2), Some(32));
        // Exactly the 32 cached tokens: the last is computed, so only the first block.
        assert_eq!(kv.reuse_prefix(3, 0, &prompt[..32], PrefixCaching::On).unwrap(), 16);
        // Opted out: nothing.
        assert_eq!(kv.reuse_prefix(4, 0, &prompt, PrefixCaching::Off).unwrap(), 0);
        assert_eq!(kv.blocks(), 3, "sequence 1's three blocks, shared");
        kv.check().unwrap();
        for seq in 1..=4 {
            kv.release(seq);
        }
        assert_eq!(kv.check().unwrap(), PoolCounts { blocks: 64, used: 0, cached: 2, free: 62 });
    }

    #[test]
    fn blocks_left_past_the_length_by_a_failed_call_are_given_back_before_a_reuse() {
        let mut kv = cache(None);
        let prompt: Vec<u32> = (0..48).collect();
        feed(&mut kv, 1, 0, &prompt);
        feed(&mut kv, 2, 0, &prompt[..16]);
        // A call that made room for 32 more tokens of sequence 2, then failed before its commit.
        kv.prepare(2, 16, 48, 0).unwrap();
        assert_eq!(kv.seq_blocks(2), 3);
        assert_eq!(kv.reuse_prefix(2, 16, &prompt[16..], PrefixCaching::On).unwrap(), 16);
        assert_eq!(kv.seqs[&2].table[1], kv.seqs[&1].table[1], "the reused block follows the sequence's own");
        assert_eq!(kv.len(2), Some(32));
        kv.check().unwrap();
    }

    #[test]
    fn a_full_pool_evicts_cached_blocks_and_refuses_only_when_all_are_in_use() {
        let mut kv = cache(Some(3));
        feed(&mut kv, 1, 0, &(0..32).collect::<Vec<u32>>());
        kv.release(1);
        assert_eq!(kv.pool_counts().cached, 2);
        feed(&mut kv, 2, 0, &(50..98).collect::<Vec<u32>>());
        assert_eq!(kv.prefix_stats().evictions, 2);
        assert!(matches!(kv.prepare(3, 0, 1, 0), Err(ModelError::KvFull { blocks: 3 })));
        kv.check().unwrap();
    }
}
