//! Which prompt prefixes each group has been sent lately, so that placement can prefer a group
//! whose workers likely still hold a request's prefix in their KV cache.
//!
//! The coordinator does not ask workers what they cache: it remembers the full 16-token blocks
//! of the prompts it placed on each group (a hash chain, so a block stands for its whole
//! prefix), the most recent `per_group` of them. Workers evict under pressure and name blocks
//! their own way, so this is a hint: a wrong guess costs a prefill, never a wrong token.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use tessera_proto::KV_BLOCK_TOKENS;

/// The hash chain of `prompt`'s full blocks for `model` and the LoRA adapter the request uses
/// (whose blocks the workers keep apart from the base's): entry `i` names blocks `0..=i`.
pub(crate) fn prompt_blocks(model: usize, adapter: Option<&str>, prompt: &[u32]) -> Vec<u64> {
    let mut parent = match adapter {
        None => model as u64,
        Some(name) => {
            let mut h = DefaultHasher::new();
            (model, name).hash(&mut h);
            h.finish()
        }
    };
    prompt
        .chunks_exact(KV_BLOCK_TOKENS as usize)
        .map(|block| {
            let mut h = DefaultHasher::new();
            (parent, block).hash(&mut h);
            parent = h.finish();
            parent
        })
        .collect()
}

/// Blocks remembered per group: about 64k prompt tokens.
const PER_GROUP: usize = 4096;

/// Recently placed prompt blocks per group.
pub(crate) struct PrefixIndex {
    per_group: usize,
    groups: HashMap<u64, Recent>,
}

/// One group's blocks, each with when it was last placed; `order` lists (tick, block) oldest
/// first, with stale entries (a block placed again later) skipped when met.
#[derive(Default)]
struct Recent {
    last: HashMap<u64, u64>,
    order: VecDeque<(u64, u64)>,
    tick: u64,
}

impl Default for PrefixIndex {
    fn default() -> Self {
        Self::new(PER_GROUP)
    }
}

impl PrefixIndex {
    /// Remembers at most `per_group` blocks per group.
    pub(crate) fn new(per_group: usize) -> Self {
        Self { per_group, groups: HashMap::new() }
    }

    /// Tokens of the prompt whose `blocks` group `group` was sent lately: its longest run of
    /// leading blocks found there.
    pub(crate) fn cached_tokens(&self, group: u64, blocks: &[u64]) -> usize {
        let Some(recent) = self.groups.get(&group) else { return 0 };
        blocks.iter().take_while(|b| recent.last.contains_key(b)).count() * KV_BLOCK_TOKENS as usize
    }

    /// Records that a prompt of `blocks` was placed on `group`.
    pub(crate) fn record(&mut self, group: u64, blocks: &[u64]) {
        if self.per_group == 0 {
            return;
        }
        let recent = self.groups.entry(group).or_default();
        for &b in blocks {
            recent.tick += 1;
            recent.last.insert(b, recent.tick);
            recent.order.push_back((recent.tick, b));
        }
        while recent.last.len() > self.per_group {
            let Some((tick, b)) = recent.order.pop_front() else { break };
            if recent.last.get(&b) == Some(&tick) {
                recent.last.remove(&b);
            }
        }
        // Blocks placed again leave stale entries behind; keep the queue near the map's size.
        if recent.order.len() > 2 * self.per_group.max(1) {
            let last = &recent.last;
            recent.order.retain(|(tick, b)| last.get(b) == Some(tick));
        }
    }

    /// Forgets a group that is gone.
    pub(crate) fn forget(&mut self, group: u64) {
        self.groups.remove(&group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_found_on_the_group_it_went_to_until_it_is_pushed_out() {
        let system: Vec<u32> = (0..64).collect();
        let a = prompt_blocks(0, None, &[&system[..], &[100; 20]].concat());
        let b = prompt_blocks(0, None, &[&system[..], &[200; 20]].concat());
        assert_eq!(a.len(), 5);
        assert_eq!(a[..4], b[..4], "a shared prefix, block for block");
        assert_ne!(a[4], b[4]);
        assert_ne!(prompt_blocks(1, None, &system), b[..4], "another model");
        assert_ne!(prompt_blocks(0, Some("sql"), &system), b[..4], "an adapter");
        assert_ne!(prompt_blocks(0, Some("sql"), &system), prompt_blocks(0, Some("legal"), &system), "another adapter");
        let mut index = PrefixIndex::new(8);
        index.record(7, &a);
        assert_eq!(index.cached_tokens(7, &b), 64);
        assert_eq!(index.cached_tokens(7, &a), 80);
        assert_eq!(index.cached_tokens(8, &b), 0, "another group");
        // Eight more blocks of another prompt push the oldest of `a` out; the chain then
        // breaks at its first block.
        index.record(7, &prompt_blocks(0, None, &[5; 128]));
        assert_eq!(index.cached_tokens(7, &b), 0);
        index.forget(7);
        assert_eq!(index.cached_tokens(7, &prompt_blocks(0, None, &[5; 128])), 0);
    }
}
