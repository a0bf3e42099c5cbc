//! Per-sequence key/value cache of one rank.
//!
//! Each sequence keeps, per layer, one `[kv_heads, capacity, head_dim]` tensor for keys and one
//! for values, written in place. Capacity is a whole number of blocks of [`KV_BLOCK_TOKENS`]
//! tokens and grows to the blocks a step needs, never more, so the memory a rank holds is
//! exactly the blocks it counts ([`KvCache::blocks`]) and a scheduler that counts the same
//! blocks knows what fits. Storage stays contiguous per sequence because attention reads a
//! sequence's keys as one tensor; the price is that growing copies the sequence's cache, once
//! per block of new tokens (see BENCHMARKS.md for what that costs in decode).
//!
//! A sequence spread over a sequence-parallel ring also keeps a [`RingPlacement`]: which global
//! positions this member's slots hold, and how many tokens every member holds. Slots stay dense
//! (slot `i` is the `i`-th position this member holds), so attention reads them as one tensor.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::kernels::elem::{is_slice, with_dest_mut, with_slice, Dest, Elem};

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

struct SeqKv {
    len: usize,
    capacity: usize,
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    /// Per layer, the keys and values again as targets of in-place writes (`KvCache::write_row`).
    dests: Vec<[Dest; 2]>,
    /// Set for sequences spread over a ring: slot `i` then holds `ring.positions[i]`.
    ring: Option<RingPlacement>,
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

/// All sequences cached on one rank.
pub struct KvCache {
    spec: KvSpec,
    seqs: HashMap<SeqId, SeqKv>,
}

/// Tokens per block of KV memory.
pub const KV_BLOCK_TOKENS: usize = 16;

/// Blocks needed to hold `tokens` entries.
pub fn blocks_for(tokens: usize) -> usize {
    tokens.div_ceil(KV_BLOCK_TOKENS)
}

impl KvCache {
    pub fn new(spec: KvSpec) -> Self {
        Self { spec, seqs: HashMap::new() }
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

    /// Blocks of KV memory held over all sequences: what the cache's tensors occupy.
    pub fn blocks(&self) -> usize {
        self.seqs.values().map(|s| s.capacity / KV_BLOCK_TOKENS).sum()
    }

    /// Blocks `seq` holds now (0 for an unknown sequence).
    pub fn seq_blocks(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.capacity / KV_BLOCK_TOKENS)
    }

    /// The ring placement of a sequence spread over a sequence-parallel ring; `None` for an
    /// unknown sequence or one held whole by this rank.
    pub fn ring(&self, seq: SeqId) -> Option<&RingPlacement> {
        self.seqs.get(&seq).and_then(|s| s.ring.as_ref())
    }

    /// Drops a sequence's cache. Returns whether it existed.
    pub fn release(&mut self, seq: SeqId) -> bool {
        self.seqs.remove(&seq).is_some()
    }

    /// Makes `to` an independent copy of `from` (replacing whatever `to` held), for beam search:
    /// a beam that continues from another beam's prefix. The copy holds only `from`'s tokens, so
    /// it costs one pass over them; sequences spread over a ring cannot be copied.
    pub fn fork(&mut self, from: SeqId, to: SeqId) -> Result<()> {
        let src = self.seqs.get(&from).ok_or(ModelError::UnknownSequence(from))?;
        if src.ring.is_some() {
            return Err(ModelError::InvalidBatch(format!("sequence {from} is spread over a ring and cannot be forked")));
        }
        let len = src.len;
        let mut copy = self.allocate(len)?;
        if len > 0 {
            for (dst, s) in copy.keys.iter_mut().zip(&src.keys).chain(copy.values.iter_mut().zip(&src.values)) {
                dst.slice_set(&s.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
            }
        }
        copy.len = len;
        self.seqs.insert(to, copy);
        Ok(())
    }

    /// Makes room for `seq` to reach `new_len` tokens, creating it if `start == 0`. The caller
    /// promises that `start` is where this forward call writes, which must be the current length.
    pub(crate) fn prepare(&mut self, seq: SeqId, start: usize, new_len: usize) -> Result<()> {
        let current = self.len(seq);
        match current {
            None if start == 0 => {
                let entry = self.allocate(new_len)?;
                self.seqs.insert(seq, entry);
                return Ok(());
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
        self.reserve(seq, new_len)
    }

    /// Grows `seq`'s tensors, if needed, to hold `needed` tokens.
    fn reserve(&mut self, seq: SeqId, needed: usize) -> Result<()> {
        let capacity = self.seqs.get(&seq).ok_or(ModelError::UnknownSequence(seq))?.capacity;
        if needed <= capacity {
            return Ok(());
        }
        let mut grown = self.allocate(needed)?;
        let old = self.seqs.get(&seq).ok_or(ModelError::UnknownSequence(seq))?;
        if old.len > 0 {
            for (dst, src) in grown.keys.iter_mut().zip(&old.keys).chain(grown.values.iter_mut().zip(&old.values)) {
                dst.slice_set(&src.narrow(1, 0, old.len)?.contiguous()?, 1, 0)?;
            }
        }
        grown.len = old.len;
        grown.ring = old.ring.clone();
        self.seqs.insert(seq, grown);
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
        let mut entry = self.allocate(placement.positions.len())?;
        entry.ring = Some(placement);
        self.seqs.insert(seq, entry);
        Ok(())
    }

    /// Makes room for one more token of ring sequence `seq` on this member.
    pub(crate) fn reserve_ring_append(&mut self, seq: SeqId) -> Result<()> {
        let len = self.len(seq).ok_or(ModelError::UnknownSequence(seq))?;
        self.reserve(seq, len + 1)
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

    /// Views of `seq`'s keys and values of `layer` for its first `len` slots, without writing.
    pub(crate) fn view(&self, seq: SeqId, layer: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let entry = self.seqs.get(&seq).ok_or(ModelError::UnknownSequence(seq))?;
        Ok((entry.keys[layer].narrow(1, 0, len)?, entry.values[layer].narrow(1, 0, len)?))
    }

    /// Writes `k`, `v` (`[kv_heads, n, head_dim]`) of `layer` at position `start` and returns
    /// views of the keys and values for positions `0..start + n`.
    pub(crate) fn write(&mut self, seq: SeqId, layer: usize, start: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let entry = self.seqs.get_mut(&seq).ok_or(ModelError::UnknownSequence(seq))?;
        let n = k.dim(1)?;
        entry.keys[layer].slice_set(k, 1, start)?;
        entry.values[layer].slice_set(v, 1, start)?;
        let end = start + n;
        Ok((entry.keys[layer].narrow(1, 0, end)?, entry.values[layer].narrow(1, 0, end)?))
    }

    /// Writes token `row` of `k`, `v` (`[tokens, kv_heads, head_dim]`) at position `pos` of
    /// `seq`'s `layer`, straight into the cache's storage: a decode step's append, without the
    /// transposed copies and views of [`KvCache::write`]. `false` where it does not apply
    /// (not contiguous CPU tensors of the cache's type); the caller then uses `write`.
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
        if pos >= entry.capacity || !kv.iter().all(|t| fits(t)) {
            return Ok(false);
        }
        let capacity = entry.capacity;
        for (cache, src) in entry.dests[layer].iter().zip(kv) {
            let written = with_slice::<T, _>(src, |src| {
                with_dest_mut::<T, _>(cache, |cache| {
                    for (h, from) in src[row * heads * d..(row + 1) * heads * d].chunks_exact(d).enumerate() {
                        let at = (h * capacity + pos) * d;
                        cache[at..at + d].copy_from_slice(from);
                    }
                })
            });
            if written.transpose()?.flatten().is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// `seq`'s whole key and value tensors of `layer` (`[kv_heads, capacity, head_dim]`; the
    /// first [`KvCache::len`] slots, plus any this step wrote, hold tokens).
    pub(crate) fn tensors(&self, seq: SeqId, layer: usize) -> Result<(&Tensor, &Tensor)> {
        let entry = self.seqs.get(&seq).ok_or(ModelError::UnknownSequence(seq))?;
        Ok((&entry.keys[layer], &entry.values[layer]))
    }

    /// Records that `seq` now holds `new_len` tokens (after every layer was written).
    pub(crate) fn commit(&mut self, seq: SeqId, new_len: usize) -> Result<()> {
        let entry = self.seqs.get_mut(&seq).ok_or(ModelError::UnknownSequence(seq))?;
        entry.len = new_len;
        Ok(())
    }

    /// Storage for at least `tokens` entries (at least one block), in whole blocks.
    fn allocate(&self, tokens: usize) -> Result<SeqKv> {
        let capacity = blocks_for(tokens.max(1)) * KV_BLOCK_TOKENS;
        let s = &self.spec;
        let shape = (s.kv_heads, capacity, s.head_dim);
        let mut keys = Vec::with_capacity(s.layers);
        let mut values = Vec::with_capacity(s.layers);
        let mut dests = Vec::with_capacity(s.layers);
        for _ in 0..s.layers {
            let (k, v) = (Tensor::zeros(shape, s.dtype, &s.device)?, Tensor::zeros(shape, s.dtype, &s.device)?);
            let dest = |t: &Tensor| Ok::<_, ModelError>(Dest::new(t.clone(), t.flatten_all()?.narrow(0, 0, 1)?)?);
            dests.push([dest(&k)?, dest(&v)?]);
            keys.push(k);
            values.push(v);
        }
        Ok(SeqKv { len: 0, capacity, keys, values, dests, ring: None })
    }
}
