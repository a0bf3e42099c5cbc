//! How one prompt is cut over the members of a sequence-parallel ring: the zigzag layout.
//!
//! The prompt's `N` tokens are cut into `2R` contiguous chunks of as equal a size as possible,
//! and member `i` holds chunks `i` and `2R − 1 − i`. With causal attention a token's work grows
//! with its position, so pairing an early chunk with the matching late one gives every member
//! the same amount of work (exactly, when `2R` divides `N`); contiguous blocks would leave the
//! last member with about `2R − 1` times the work of the first.
//!
//! Every member computes the same layout from `(N, R)` alone, so the ring never has to tell a
//! member how big the block it is about to receive is.

use std::ops::Range;

use crate::error::{ModelError, Result};

/// The zigzag partition of a prompt of `tokens` tokens over `members` ring members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZigzagLayout {
    tokens: usize,
    members: usize,
}

impl ZigzagLayout {
    /// The layout of `tokens` tokens over `members` members; a ring needs at least one member.
    /// Any number of tokens is fine: for fewer than `2R` tokens some chunks are empty.
    pub fn new(tokens: usize, members: usize) -> Result<Self> {
        if members == 0 {
            return Err(ModelError::InvalidConfig("a sequence-parallel ring needs at least one member".into()));
        }
        Ok(Self { tokens, members })
    }

    /// Tokens in the prompt.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Members of the ring.
    pub fn members(&self) -> usize {
        self.members
    }

    /// Number of chunks: two per member.
    pub fn chunks(&self) -> usize {
        2 * self.members
    }

    /// Size of chunk `c`. Sizes differ by at most one. The `N mod 2R` extra tokens go to the
    /// first chunks of members `0, 1, …` and then to their second chunks, so members' token
    /// counts also differ by at most one (a short prompt never puts two tokens on one member
    /// while another has none).
    fn chunk_len(&self, c: usize) -> usize {
        let (r, n) = (self.members, self.chunks());
        // Rank of chunk c in the order the extras are handed out: 0, 1, …, R−1, then 2R−1, …, R.
        let order = if c < r { c } else { r + (n - 1 - c) };
        self.tokens / n + usize::from(order < self.tokens % n)
    }

    /// Global positions of chunk `c` (`c < 2R`).
    pub fn chunk(&self, c: usize) -> Range<usize> {
        let start: usize = (0..c).map(|i| self.chunk_len(i)).sum();
        start..start + self.chunk_len(c)
    }

    /// The two position ranges member `m` holds, ascending: chunk `m`, then chunk `2R − 1 − m`.
    pub fn member_runs(&self, m: usize) -> [Range<usize>; 2] {
        [self.chunk(m), self.chunk(self.chunks() - 1 - m)]
    }

    /// Tokens member `m` holds.
    pub fn member_len(&self, m: usize) -> usize {
        self.member_runs(m).iter().map(|r| r.len()).sum()
    }

    /// Global positions member `m` holds, ascending: the order of its rows and cache slots.
    pub fn positions(&self, m: usize) -> Vec<usize> {
        self.member_runs(m).into_iter().flatten().collect()
    }

    /// The member that holds global position `pos` (`None` past the prompt).
    pub fn owner(&self, pos: usize) -> Option<usize> {
        if pos >= self.tokens {
            return None;
        }
        let c = (0..self.chunks()).find(|&c| self.chunk(c).contains(&pos))?;
        Some(if c < self.members { c } else { self.chunks() - 1 - c })
    }

    /// Member `m`'s tokens of `prompt` (all `N` tokens in order), in its row order.
    pub fn local_tokens(&self, prompt: &[u32], m: usize) -> Result<Vec<u32>> {
        if prompt.len() != self.tokens {
            return Err(ModelError::InvalidBatch(format!("the layout is for {} tokens but the prompt has {}", self.tokens, prompt.len())));
        }
        Ok(self.member_runs(m).into_iter().flat_map(|r| prompt[r].iter().copied()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Query–key pairs a causal prefill computes for member `m`: each token attends to itself
    /// and every earlier one.
    fn causal_work(layout: &ZigzagLayout, m: usize) -> usize {
        layout.positions(m).iter().map(|p| p + 1).sum()
    }

    #[test]
    fn chunks_tile_the_prompt_in_order_with_sizes_within_one() {
        for members in 1..=5 {
            for tokens in [0, 1, 2, 3, 5, 7, 9, 10, 11, 64, 1000, 1001] {
                let l = ZigzagLayout::new(tokens, members).unwrap();
                let mut next = 0;
                let sizes: Vec<usize> = (0..l.chunks()).map(|c| l.chunk(c).len()).collect();
                for c in 0..l.chunks() {
                    assert_eq!(l.chunk(c).start, next, "N={tokens} R={members} chunk {c}");
                    next = l.chunk(c).end;
                }
                assert_eq!(next, tokens);
                let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(hi - lo <= 1, "N={tokens} R={members}: chunk sizes {sizes:?}");
            }
        }
    }

    #[test]
    fn every_position_is_held_exactly_once_and_owner_agrees() {
        for members in 1..=5 {
            for tokens in [0, 1, 2, 3, 4, 5, 6, 7, 13, 100, 1000] {
                let l = ZigzagLayout::new(tokens, members).unwrap();
                let mut seen = vec![0usize; tokens];
                for m in 0..members {
                    let pos = l.positions(m);
                    assert_eq!(pos.len(), l.member_len(m));
                    assert!(pos.windows(2).all(|w| w[0] < w[1]), "member {m} positions ascend: {pos:?}");
                    for &p in &pos {
                        seen[p] += 1;
                        assert_eq!(l.owner(p), Some(m), "N={tokens} R={members} pos {p}");
                    }
                }
                assert!(seen.iter().all(|&n| n == 1), "N={tokens} R={members}: {seen:?}");
                assert_eq!(l.owner(tokens), None);
                let counts: Vec<usize> = (0..members).map(|m| l.member_len(m)).collect();
                let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
                assert!(hi - lo <= 1, "N={tokens} R={members}: member counts {counts:?}");
            }
        }
    }

    #[test]
    fn member_holds_chunks_i_and_mirror() {
        let l = ZigzagLayout::new(16, 2).unwrap();
        assert_eq!(l.member_runs(0), [0..4, 12..16]);
        assert_eq!(l.member_runs(1), [4..8, 8..12]);
        let l = ZigzagLayout::new(1, 3).unwrap();
        assert_eq!(l.positions(0), vec![0]);
        assert!(l.positions(1).is_empty() && l.positions(2).is_empty());
        let prompt: Vec<u32> = (100..116).collect();
        let l = ZigzagLayout::new(16, 2).unwrap();
        assert_eq!(l.local_tokens(&prompt, 1).unwrap(), vec![104, 105, 106, 107, 108, 109, 110, 111]);
        assert!(matches!(l.local_tokens(&prompt[1..], 0), Err(ModelError::InvalidBatch(_))));
        assert!(matches!(ZigzagLayout::new(5, 0), Err(ModelError::InvalidConfig(_))));
    }

    #[test]
    fn causal_work_is_balanced() {
        // Exactly equal when 2R divides N.
        for members in 2..=4 {
            let l = ZigzagLayout::new(96 * members, members).unwrap();
            let work: Vec<usize> = (0..members).map(|m| causal_work(&l, m)).collect();
            assert!(work.iter().all(|&w| w == work[0]), "R={members}: {work:?}");
        }
        // Within a fraction of a percent otherwise; contiguous blocks would be off by ~(2R−1)×.
        for members in 2..=4 {
            let l = ZigzagLayout::new(1001, members).unwrap();
            let work: Vec<usize> = (0..members).map(|m| causal_work(&l, m)).collect();
            let (lo, hi) = (*work.iter().min().unwrap() as f64, *work.iter().max().unwrap() as f64);
            assert!(hi / lo < 1.01, "R={members}: {work:?}");
        }
    }
}
