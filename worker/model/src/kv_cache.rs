//! Per-sequence key/value cache of one rank.
//!
//! Each sequence keeps, per layer, one preallocated `[kv_heads, capacity, head_dim]` tensor for
//! keys and one for values. New entries are written in place; capacity doubles when exceeded,
//! so a generation of n tokens copies O(n) bytes in total rather than O(n²).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

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
}

/// All sequences cached on one rank.
pub struct KvCache {
    spec: KvSpec,
    seqs: HashMap<SeqId, SeqKv>,
}

/// Smallest allocation per sequence, so short decodes do not reallocate every few tokens.
const MIN_CAPACITY: usize = 64;

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

    /// Drops a sequence's cache. Returns whether it existed.
    pub fn release(&mut self, seq: SeqId) -> bool {
        self.seqs.remove(&seq).is_some()
    }

    /// Makes room for `seq` to reach `new_len` tokens, creating it if `start == 0`. The caller
    /// promises that `start` is where this forward call writes, which must be the current length.
    pub(crate) fn prepare(&mut self, seq: SeqId, start: usize, new_len: usize) -> Result<()> {
        let current = self.len(seq);
        match current {
            None if start == 0 => {
                let capacity = new_len.max(MIN_CAPACITY);
                let entry = self.allocate(capacity)?;
                self.seqs.insert(seq, entry);
                return Ok(());
            }
            None => return Err(ModelError::UnknownSequence(seq)),
            Some(len) if len != start => {
                return Err(ModelError::InvalidBatch(format!(
                    "sequence {seq} holds {len} tokens but the batch writes at position {start}"
                )))
            }
            Some(_) => {}
        }
        let needed = new_len;
        let capacity = self.seqs[&seq].capacity;
        if needed <= capacity {
            return Ok(());
        }
        let new_capacity = needed.max(capacity * 2);
        let mut grown = self.allocate(new_capacity)?;
        let old = self.seqs.get(&seq).ok_or(ModelError::UnknownSequence(seq))?;
        if old.len > 0 {
            for (dst, src) in grown.keys.iter_mut().zip(&old.keys).chain(grown.values.iter_mut().zip(&old.values)) {
                dst.slice_set(&src.narrow(1, 0, old.len)?.contiguous()?, 1, 0)?;
            }
        }
        grown.len = old.len;
        self.seqs.insert(seq, grown);
        Ok(())
    }

    /// Writes `k`, `v` (`[kv_heads, n, head_dim]`) of `layer` at position `start` and returns
    /// views of the keys and values for positions `0..start + n`.
    pub(crate) fn write(
        &mut self,
        seq: SeqId,
        layer: usize,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let entry = self.seqs.get_mut(&seq).ok_or(ModelError::UnknownSequence(seq))?;
        let n = k.dim(1)?;
        entry.keys[layer].slice_set(k, 1, start)?;
        entry.values[layer].slice_set(v, 1, start)?;
        let end = start + n;
        Ok((entry.keys[layer].narrow(1, 0, end)?, entry.values[layer].narrow(1, 0, end)?))
    }

    /// Records that `seq` now holds `new_len` tokens (after every layer was written).
    pub(crate) fn commit(&mut self, seq: SeqId, new_len: usize) -> Result<()> {
        let entry = self.seqs.get_mut(&seq).ok_or(ModelError::UnknownSequence(seq))?;
        entry.len = new_len;
        Ok(())
    }

    fn allocate(&self, capacity: usize) -> Result<SeqKv> {
        let s = &self.spec;
        let shape = (s.kv_heads, capacity, s.head_dim);
        let mut keys = Vec::with_capacity(s.layers);
        let mut values = Vec::with_capacity(s.layers);
        for _ in 0..s.layers {
            keys.push(Tensor::zeros(shape, s.dtype, &s.device)?);
            values.push(Tensor::zeros(shape, s.dtype, &s.device)?);
        }
        Ok(SeqKv { len: 0, capacity, keys, values })
    }
}
