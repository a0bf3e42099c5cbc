//! What one forward call computes: a flat list of tokens from one or more sequences.
//!
//! Prefill, chunked prefill and batched decode are the same call: each [`SeqChunk`] names a
//! sequence, where its tokens start, and how many there are. Linear layers run once over all
//! tokens of the batch; attention runs per chunk against that sequence's cache.

use crate::model::kv_cache::SeqId;

/// A run of consecutive tokens of one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqChunk {
    pub seq: SeqId,
    /// Position of the first token; must equal the tokens already cached for `seq`.
    pub start: usize,
    /// Number of tokens; at least one.
    pub len: usize,
}

/// Tokens of all chunks, concatenated in chunk order.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub tokens: &'a [u32],
    pub chunks: &'a [SeqChunk],
}

/// Which logits a forward call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// One row per chunk: the logits after its last token (what generation needs).
    LastPerChunk,
    /// One row per token (for checking against a reference).
    All,
}
