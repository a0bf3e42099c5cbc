//! Sequence parallelism: one sequence's tokens and KV cache spread over a ring of members.
//!
//! A member is a whole tensor-parallel group; ring links join equal `tp_rank`s of the members,
//! so each rank talks over two collectives: its group's (`tp`, the layer all-reduces) and its
//! ring's (`sp`). The model, the layers and everything per token are the ones
//! [`Model::forward`] runs; only the attention step differs (`PrefillAttention`,
//! `DecodeAttention`).
//!
//! - **Prefill** (pass-KV ring attention): the prompt is cut by [`ZigzagLayout`]; each member
//!   computes Q/K/V of its own tokens at their global positions and keeps its K/V. The K/V
//!   blocks travel around the ring `R − 1` times; each held block is attended with the causal
//!   (and sliding-window) mask of the global positions, as an (output, lse) pair merged exactly.
//!   Query runs that see nothing of a block skip it, and runs that see all of it need no mask:
//!   with the zigzag layout only a member's own block needs a causal mask.
//! - **Decode** (distributed KV): every member gets the same token and position and attends it
//!   over its own share of the cache; one member also appends the token's K/V and includes it.
//!   The partial (output, lse) of every member are all-gathered and merged in member order on
//!   every member, so all of them get the same bits, compute the same logits, and equal
//!   samplers stay in step without talking.
//!
//! After a prefill every member returns the logits of the prompt's last token: the member that
//! holds it shares its final hidden row over the ring, and every member applies the same norm
//! and head to the same bits.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use tessera_collective::{all_gather_tensor, Collective};

use crate::error::{ModelError, Result};
use crate::kernels::elem::Dest;
use crate::model::attention::{attend_partial, attend_partial_blocked, merge_stacked, Causal, Partial};
use crate::model::kv_cache::{KvCache, RingPlacement, SeqId};
use crate::model::layer::{AttentionStep, LayerSlot};
use crate::model::linear::StepRows;
use crate::model::sequence::ZigzagLayout;
use crate::model::Model;

/// The two collectives a rank of a sequence-parallel ring uses.
pub struct RingComm<'a> {
    /// This member's tensor-parallel group (layer all-reduces).
    pub tp: &'a mut dyn Collective,
    /// The ring: the ranks with this `tp_rank` in every member, in member order.
    pub sp: &'a mut dyn Collective,
}

/// Which member keeps a decoded token's keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOn {
    /// The member holding the fewest tokens of the sequence, lowest index among equals
    /// ([`RingPlacement::least_loaded`]), which keeps the members' caches within one token.
    LeastLoaded,
    /// A member chosen by the caller (for example, the one with the most free memory).
    Member(usize),
}

/// The first call of a new sequence over the ring: the whole prompt at once.
#[derive(Debug, Clone, Copy)]
pub struct PrefillStep<'a> {
    pub seq: SeqId,
    /// Tokens in the whole prompt.
    pub prompt_len: usize,
    /// This member's tokens in its row order ([`ZigzagLayout::local_tokens`]).
    pub tokens: &'a [u32],
}

/// One new token of a sequence over the ring, after its prefill.
#[derive(Debug, Clone, Copy)]
pub struct DecodeStep {
    pub seq: SeqId,
    pub token: u32,
    /// Its global position: the tokens the ring already holds for `seq`.
    pub position: usize,
    pub append: AppendOn,
}

/// One forward call of a sequence over the ring. Every rank of every member makes the same call,
/// except that each member passes its own share of a prefill's tokens.
#[derive(Debug, Clone, Copy)]
pub enum RingStep<'a> {
    Prefill(PrefillStep<'a>),
    Decode(DecodeStep),
}

/// Which logits a ring call returns besides the last token's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingLogits {
    /// Only the logits of the sequence's last token (what generation needs).
    Last,
    /// Also every row this member computed, with its global position (for checking against a
    /// reference).
    LastAndLocal,
}

/// Logits of the rows one member computed.
#[derive(Debug, Clone)]
pub struct LocalLogits {
    /// f32 `[rows, vocab]`.
    pub logits: Tensor,
    /// Global position of each row.
    pub positions: Vec<usize>,
}

/// What a ring call returns.
#[derive(Debug, Clone)]
pub struct RingOutput {
    /// f32 `[1, vocab]`: the logits after the sequence's last token, the same bits on every
    /// rank of every member.
    pub last: Tensor,
    /// With [`RingLogits::LastAndLocal`]: this member's rows.
    pub local: Option<LocalLogits>,
}

impl Model {
    /// Runs `step` for a sequence spread over a sequence-parallel ring of `comm.sp.world_size()`
    /// members, this rank being member `comm.sp.rank()`. Every rank of every member must make
    /// the matching call in the same order; all return the same last-token logits.
    ///
    /// A ring of one member is allowed and computes what [`Model::forward`] does. The sequence
    /// must start with a prefill and is then continued with decode steps only.
    pub fn forward_ring(&self, step: &RingStep, kv: &mut KvCache, comm: &mut RingComm, mode: RingLogits) -> Result<RingOutput> {
        let (tp_rank, tp_size) = (comm.tp.rank(), comm.tp.world_size());
        if (tp_rank, tp_size) != (self.layout().rank, self.layout().size) {
            return Err(ModelError::InvalidConfig(format!(
                "tensor-parallel collective is rank {tp_rank} of {tp_size} but the model was loaded as rank {} of {}",
                self.layout().rank,
                self.layout().size
            )));
        }
        match step {
            RingStep::Prefill(step) => self.ring_prefill(step, kv, comm, mode),
            RingStep::Decode(step) => self.ring_decode(step, kv, comm, mode),
        }
    }

    fn ring_prefill(&self, step: &PrefillStep, kv: &mut KvCache, comm: &mut RingComm, mode: RingLogits) -> Result<RingOutput> {
        let PrefillStep { seq, prompt_len, tokens } = *step;
        let (member, members) = (comm.sp.rank(), comm.sp.world_size());
        let layout = ZigzagLayout::new(prompt_len, members)?;
        if prompt_len == 0 {
            return Err(ModelError::InvalidBatch(format!("ring prefill of sequence {seq} has no tokens")));
        }
        if tokens.len() != layout.member_len(member) {
            return Err(ModelError::InvalidBatch(format!(
                "member {member} of {members} holds {} of a {prompt_len}-token prompt but was given {} tokens",
                layout.member_len(member),
                tokens.len()
            )));
        }
        self.check_tokens(tokens)?;
        let positions = layout.positions(member);
        let held = (0..members).map(|m| layout.member_len(m)).collect();
        kv.begin_ring(seq, RingPlacement::new(member, held, positions.clone()))?;

        let mut attention = PrefillAttention::new(self, seq, layout, kv, comm.sp)?;
        // Held until the logits are out: `x` may be one of its tensors.
        let mut ws = self.workspace();
        let x = if tokens.is_empty() {
            // Nothing to compute here (a prompt shorter than the ring), but the blocks of the
            // other members still pass through this one, layer by layer.
            for _ in self.layers() {
                attention.relay()?;
            }
            None
        } else {
            let runs = layout.member_runs(member).into_iter().map(|r| (r, prompt_len));
            let (cos, sin) = self.rope_tables(runs, &mut ws)?;
            Some(self.run_layers(tokens, [&cos, &sin], &mut attention, comm.tp, &mut ws, None)?)
        };
        kv.commit(seq, tokens.len())?;

        // The prompt's last token is the last row of the member that holds it; everyone takes
        // that member's row from an all-gather, so all apply the head to the same bits.
        let hidden = self.config().hidden_size;
        let owner = layout.owner(prompt_len - 1).unwrap_or(0);
        let row = match &x {
            Some(x) if member == owner => x.narrow(0, tokens.len() - 1, 1)?,
            _ => Tensor::zeros((1, hidden), self.dtype(), self.device())?,
        };
        let rows = all_gather_tensor(comm.sp, &row)?;
        let last = self.head(&rows.narrow(1, owner * hidden, hidden)?)?;
        let local = match (mode, x) {
            (RingLogits::Last, _) => None,
            (RingLogits::LastAndLocal, Some(x)) => Some(LocalLogits { logits: self.head(&x)?, positions }),
            (RingLogits::LastAndLocal, None) => {
                Some(LocalLogits { logits: Tensor::zeros((0, self.config().vocab_size), DType::F32, self.device())?, positions })
            }
        };
        Ok(RingOutput { last, local })
    }

    fn ring_decode(&self, step: &DecodeStep, kv: &mut KvCache, comm: &mut RingComm, mode: RingLogits) -> Result<RingOutput> {
        let DecodeStep { seq, token, position, append } = *step;
        let (member, members) = (comm.sp.rank(), comm.sp.world_size());
        self.check_tokens(&[token])?;
        let placement = kv.ring(seq).ok_or(ModelError::UnknownSequence(seq))?;
        if placement.members() != members || placement.member() != member {
            return Err(ModelError::InvalidBatch(format!(
                "sequence {seq} was placed as member {} of {} but this call is member {member} of {members}",
                placement.member(),
                placement.members()
            )));
        }
        if position != placement.len() {
            return Err(ModelError::InvalidBatch(format!(
                "sequence {seq} holds {} tokens over the ring but the step writes at position {position}",
                placement.len()
            )));
        }
        let on = match append {
            AppendOn::LeastLoaded => placement.least_loaded(),
            AppendOn::Member(m) if m < members => m,
            AppendOn::Member(m) => return Err(ModelError::InvalidBatch(format!("append on member {m} of a ring of {members}"))),
        };
        // Every cached position is before the new one, so only a sliding window hides keys:
        // positions ascend, so what a window keeps is a suffix of the slots.
        let first_visible: Vec<(Option<usize>, usize)> = self
            .windows()
            .iter()
            .map(|&w| {
                let first = w.map_or(0, |w| placement.positions().partition_point(|&p| p + w <= position));
                (w, first)
            })
            .collect();
        let local_len = placement.positions().len();
        let append_here = on == member;
        if append_here {
            kv.reserve_ring_append(seq)?;
        }

        let mut ws = self.workspace();
        let (cos, sin) = self.rope_tables(std::iter::once((position..position + 1, position + 1)), &mut ws)?;
        let mut attention = DecodeAttention { sp: &mut *comm.sp, kv: &mut *kv, seq, local_len, append_here, first_visible };
        let x = self.run_layers(&[token], [&cos, &sin], &mut attention, comm.tp, &mut ws, None)?;
        kv.commit_ring_append(seq, position, on)?;

        let last = self.head(&x)?;
        let local = match mode {
            RingLogits::Last => None,
            RingLogits::LastAndLocal => Some(LocalLogits { logits: last.clone(), positions: vec![position] }),
        };
        Ok(RingOutput { last, local })
    }
}

/// Which keys of one member's block a run of local query rows attends to.
struct RunPlan {
    /// Local query rows of the run.
    rows: Range<usize>,
    /// The position of the run's first query (the others follow it).
    first_query: usize,
    /// Key indices within the block that some row of the run may see; empty: skip the block.
    keys: Range<usize>,
    /// The positions of those keys, ascending.
    key_positions: Vec<usize>,
    window: Option<usize>,
    /// Whether some row misses some key of `keys`: only such runs are masked.
    masked: bool,
}

impl RunPlan {
    /// Plans queries at `queries` (contiguous positions, local rows `rows`) against a block
    /// whose keys sit at `key_positions` (ascending), under an optional sliding `window`.
    fn new(rows: Range<usize>, queries: Range<usize>, key_positions: &[usize], window: Option<usize>) -> Self {
        let visible = |q: usize, k: usize| k <= q && window.is_none_or(|w| q - k < w);
        let empty = Self { rows: rows.clone(), first_query: queries.start, keys: 0..0, key_positions: Vec::new(), window, masked: false };
        let (Some(first_q), Some(last_q)) = (queries.clone().next(), queries.clone().last()) else {
            return empty;
        };
        // Keys after the run's last query are hidden from all of it, and so are keys the
        // window has already dropped for its first query: both ends of the ascending block.
        let hi = key_positions.partition_point(|&k| k <= last_q);
        let lo = window.map_or(0, |w| key_positions.partition_point(|&k| k + w <= first_q));
        if lo >= hi {
            return empty;
        }
        let keys = &key_positions[lo..hi];
        let masked = !(visible(first_q, keys[keys.len() - 1]) && visible(last_q, keys[0]));
        Self { rows, first_query: first_q, keys: lo..hi, key_positions: keys.to_vec(), window, masked }
    }

    /// The run's visibility, as the blocked kernel reads it.
    fn causal(&self) -> Causal<'_> {
        Causal { first_query: self.first_query, key_positions: &self.key_positions, window: self.window }
    }

    /// The additive mask `[rows, keys]` (0 or −∞), for devices without the blocked kernel;
    /// `None` when every row sees every key.
    fn mask(&self, device: &Device) -> Result<Option<Tensor>> {
        if !self.masked {
            return Ok(None);
        }
        let causal = self.causal();
        let mask: Vec<f32> = (0..self.rows.len())
            .flat_map(|i| {
                let causal = &causal;
                self.key_positions.iter().map(move |&k| if causal.visible(self.first_query + i, k) { 0f32 } else { f32::NEG_INFINITY })
            })
            .collect();
        Ok(Some(Tensor::from_vec(mask, (self.rows.len(), self.key_positions.len()), device)?))
    }
}

/// One member's keys and values of one layer, as held during a ring pass.
struct Block {
    /// `[kv_heads, len, head_dim]` each.
    keys: Tensor,
    values: Tensor,
    /// The flat f32 `[keys | values]` message, kept so a received block is passed on as is.
    wire: Option<Vec<f32>>,
}

impl Block {
    fn wire(&mut self) -> Result<&[f32]> {
        if self.wire.is_none() {
            let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
            let mut message = flat(&self.keys)?;
            message.extend(flat(&self.values)?);
            self.wire = Some(message);
        }
        Ok(self.wire.as_deref().unwrap_or_default())
    }
}

/// The shape every member's blocks share, and the sizes the layout gives them.
struct BlockShape {
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: Device,
}

impl BlockShape {
    fn values(&self, tokens: usize) -> usize {
        2 * self.kv_heads * tokens * self.head_dim
    }

    fn decode(&self, message: Vec<f32>, tokens: usize) -> Result<Block> {
        let both = Tensor::from_slice(&message, (2, self.kv_heads, tokens, self.head_dim), &self.device)?.to_dtype(self.dtype)?;
        Ok(Block { keys: both.get(0)?, values: both.get(1)?, wire: Some(message) })
    }
}

/// Passes blocks around the ring once: at step `s` member `i` holds member `(i − s) mod R`'s
/// block, calls `visit` with it, and sends it on to member `i + 1` while receiving the next one
/// from member `i − 1`. `local` is this member's block (`None` when it holds no tokens).
///
/// Even members send before they receive and odd members receive before they send, so the
/// ring cannot deadlock even on a backend whose send waits for the matching receive (NCCL);
/// on the buffered backends (threads, TCP) sends return at once and the exchange overlaps
/// the attention of the held block. Empty blocks are neither sent nor received: every member
/// knows every block's size from the layout.
fn circulate(
    sp: &mut dyn Collective,
    layout: &ZigzagLayout,
    shape: &BlockShape,
    local: Option<Block>,
    mut visit: impl FnMut(usize, &Block) -> Result<()>,
) -> Result<()> {
    let (member, members) = (sp.rank(), sp.world_size());
    let (next, prev) = ((member + 1) % members, (member + members - 1) % members);
    let mut held = local;
    for step in 0..members {
        let owner = (member + members - step) % members;
        let incoming_owner = (owner + members - 1) % members;
        let exchange = step + 1 < members;
        let incoming_len = layout.member_len(incoming_owner);
        let receive = |sp: &mut dyn Collective| -> Result<Option<Block>> {
            if incoming_len == 0 {
                return Ok(None);
            }
            let mut message = vec![0f32; shape.values(incoming_len)];
            sp.recv(prev, &mut message)?;
            Ok(Some(shape.decode(message, incoming_len)?))
        };
        let mut incoming = None;
        if exchange && member % 2 == 1 {
            incoming = receive(sp)?;
        }
        if exchange {
            if let Some(block) = held.as_mut() {
                sp.send(next, block.wire()?)?;
            }
        }
        if let Some(block) = &held {
            visit(owner, block)?;
        }
        if exchange && member % 2 == 0 {
            incoming = receive(sp)?;
        }
        held = incoming;
    }
    Ok(())
}

/// Ring attention of one member's prompt tokens (see the module comment).
struct PrefillAttention<'a> {
    sp: &'a mut dyn Collective,
    kv: &'a mut KvCache,
    seq: SeqId,
    layout: ZigzagLayout,
    shape: BlockShape,
    /// Per distinct window: per source member, the plan of each local query run.
    plans: Vec<(Option<usize>, Vec<Vec<RunPlan>>)>,
}

impl<'a> PrefillAttention<'a> {
    /// Plans are built once per call and shared by every layer with the same window.
    fn new(model: &Model, seq: SeqId, layout: ZigzagLayout, kv: &'a mut KvCache, sp: &'a mut dyn Collective) -> Result<Self> {
        let member = sp.rank();
        let device = model.device();
        let mut query_runs = Vec::with_capacity(2);
        let mut row = 0;
        for run in layout.member_runs(member) {
            query_runs.push((row..row + run.len(), run.clone()));
            row += run.len();
        }
        let key_positions: Vec<Vec<usize>> = (0..layout.members()).map(|m| layout.positions(m)).collect();
        let plans = model
            .windows()
            .iter()
            .map(|&window| {
                let per_member = key_positions
                    .iter()
                    .map(|keys| {
                        query_runs
                            .iter()
                            .map(|(rows, queries)| RunPlan::new(rows.clone(), queries.clone(), keys, window))
                            .collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>();
                Ok((window, per_member))
            })
            .collect::<Result<Vec<_>>>()?;
        let shape = BlockShape {
            kv_heads: model.layout().kv_heads,
            head_dim: model.config().head_dim,
            dtype: model.dtype(),
            device: device.clone(),
        };
        Ok(Self { sp, kv, seq, layout, shape, plans })
    }

    /// Takes part in a layer's ring pass without queries of its own.
    fn relay(&mut self) -> Result<()> {
        circulate(self.sp, &self.layout, &self.shape, None, |_, _| Ok(()))
    }
}

impl AttentionStep for PrefillAttention<'_> {
    fn rows(&self) -> StepRows {
        StepRows::Prefill
    }

    fn attend(&mut self, layer: LayerSlot, q: &Tensor, k: &Tensor, v: &Tensor, _dest: Option<&Dest>) -> Result<Tensor> {
        let k = k.transpose(0, 1)?.contiguous()?;
        let v = v.transpose(0, 1)?.contiguous()?;
        let (keys, values) = self.kv.write(self.seq, layer.index, 0, &k, &v)?;
        let Some((_, plans)) = self.plans.iter().find(|(w, _)| *w == layer.window) else {
            return Err(ModelError::InvalidConfig(format!("no ring plans for window {:?}", layer.window)));
        };
        let mut merged: Vec<Option<Partial>> = plans[0].iter().map(|_| None).collect();
        let local = Block { keys, values, wire: None };
        circulate(self.sp, &self.layout, &self.shape, Some(local), |owner, block| {
            for (run, acc) in plans[owner].iter().zip(merged.iter_mut()) {
                if run.rows.is_empty() || run.keys.is_empty() {
                    continue;
                }
                let n = run.keys.len();
                let (q, keys, values) = (
                    q.narrow(0, run.rows.start, run.rows.len())?,
                    block.keys.narrow(1, run.keys.start, n)?,
                    block.values.narrow(1, run.keys.start, n)?,
                );
                let part = match attend_partial_blocked(&q, &keys, &values, &run.causal())? {
                    Some(part) => part,
                    None => attend_partial(&q, &keys, &values, run.mask(q.device())?.as_ref())?,
                };
                *acc = Some(match acc.take() {
                    Some(sofar) => sofar.merge(&part)?,
                    None => part,
                });
            }
            Ok(())
        })?;
        // Every query sees at least its own key, in this member's block, so no run is left
        // empty; `Partial::empty` covers runs without rows.
        let (_, heads, head_dim) = q.dims3()?;
        let mut outputs = plans[0]
            .iter()
            .zip(merged)
            .filter(|(run, _)| !run.rows.is_empty())
            .map(|(run, part)| {
                let part = match part {
                    Some(part) => part,
                    None => Partial::empty(heads, run.rows.len(), head_dim, q.device())?,
                };
                part.into_output(q.dtype())
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(if outputs.len() == 1 { outputs.swap_remove(0) } else { Tensor::cat(&outputs, 0)? })
    }
}

/// Distributed-KV attention of one decoded token (see the module comment).
struct DecodeAttention<'a> {
    sp: &'a mut dyn Collective,
    kv: &'a mut KvCache,
    seq: SeqId,
    /// Tokens this member held before the step.
    local_len: usize,
    /// Whether this member keeps the new token's keys and values.
    append_here: bool,
    /// Per distinct window, the first slot the new token can see.
    first_visible: Vec<(Option<usize>, usize)>,
}

impl AttentionStep for DecodeAttention<'_> {
    fn rows(&self) -> StepRows {
        StepRows::Decode
    }

    fn attend(&mut self, layer: LayerSlot, q: &Tensor, k: &Tensor, v: &Tensor, _dest: Option<&Dest>) -> Result<Tensor> {
        let (_, heads, head_dim) = q.dims3()?;
        let (keys, values) = if self.append_here {
            let k = k.transpose(0, 1)?.contiguous()?;
            let v = v.transpose(0, 1)?.contiguous()?;
            self.kv.write(self.seq, layer.index, self.local_len, &k, &v)?
        } else {
            self.kv.view(self.seq, layer.index, self.local_len)?
        };
        let first = self.first_visible.iter().find(|(w, _)| *w == layer.window).map_or(0, |(_, f)| *f);
        let visible = keys.dim(1)?.saturating_sub(first);
        let part = attend_partial(q, &keys.narrow(1, first, visible)?, &values.narrow(1, first, visible)?, None)?;

        // Every member contributes [o | lse] of every head; all merge the gathered copies in
        // member order, so they end with the same bits.
        let local = Tensor::cat(&[part.o.flatten_all()?, part.lse.flatten_all()?], 0)?.unsqueeze(0)?;
        let members = self.sp.world_size();
        let width = heads * head_dim + heads;
        let all = all_gather_tensor(self.sp, &local)?.reshape((members, width))?;
        let o = all.narrow(1, 0, heads * head_dim)?.reshape((members, heads, 1, head_dim))?;
        let lse = all.narrow(1, heads * head_dim, heads)?.reshape((members, heads, 1, 1))?;
        merge_stacked(&o, &lse)?.into_output(q.dtype())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
    use std::time::{Duration, Instant};

    use tessera_collective::{CollectiveError, Result as CollectiveResult};

    use super::*;

    /// With the zigzag layout and no window, a member's own block is the only one that needs a
    /// causal mask; of a remote block, either only its first chunk is visible (to all local
    /// queries) or it is visible only to the local second chunk (all of it).
    #[test]
    fn zigzag_masks_only_the_own_block_and_skips_hidden_halves() {
        for members in 2..=4 {
            let layout = ZigzagLayout::new(16 * members, members).unwrap();
            for i in 0..members {
                let [first, second] = layout.member_runs(i);
                let runs = [(0..first.len(), first.clone()), (first.len()..first.len() + second.len(), second)];
                for j in 0..members {
                    let keys = layout.positions(j);
                    let plan = |r: usize| RunPlan::new(runs[r].0.clone(), runs[r].1.clone(), &keys, None);
                    let (p0, p1) = (plan(0), plan(1));
                    let chunk_j = layout.member_runs(j)[0].len();
                    if j == i {
                        assert!(p0.masked && p1.masked, "R={members} own block is causal");
                        assert_eq!(p0.keys, 0..chunk_j, "first chunk sees only the first chunk");
                        assert_eq!(p1.keys, 0..keys.len());
                    } else if j < i {
                        assert_eq!((p0.keys.clone(), p1.keys.clone()), (0..chunk_j, 0..chunk_j), "R={members} i={i} j={j}");
                        assert!(!p0.masked && !p1.masked);
                    } else {
                        assert!(p0.keys.is_empty(), "R={members} i={i} j={j}: skipped");
                        assert_eq!(p1.keys, 0..keys.len());
                        assert!(!p1.masked);
                    }
                }
            }
        }
    }

    #[test]
    fn sliding_window_trims_keys_and_masks_the_edges() {
        // Queries 10..14 with window 4 see keys 7..=13 at most; keys 0..3 and 20.. never.
        let keys: Vec<usize> = (0..4).chain(6..14).chain(20..24).collect();
        let plan = RunPlan::new(0..4, 10..14, &keys, Some(4));
        let visible: Vec<usize> = keys[plan.keys.clone()].to_vec();
        assert_eq!(visible, (7..14).collect::<Vec<_>>());
        let mask = plan.mask(&Device::Cpu).unwrap().expect("edges are masked").to_vec2::<f32>().unwrap();
        for (qi, row) in mask.iter().enumerate() {
            let q = 10 + qi;
            for (ki, &m) in row.iter().enumerate() {
                let k = visible[ki];
                assert_eq!(m == 0.0, k <= q && q - k < 4, "q={q} k={k}");
            }
        }
        let far = RunPlan::new(0..2, 40..42, &keys, Some(4));
        assert!(far.keys.is_empty(), "a block entirely outside the window is skipped");
    }

    /// Point-to-point where a send waits until the peer receives it, like NCCL's: the ring's
    /// send/receive order must not deadlock on it. Times out instead of hanging.
    struct Rendezvous {
        rank: usize,
        world: usize,
        to: Vec<Option<SyncSender<Vec<f32>>>>,
        from: Vec<Option<Receiver<Vec<f32>>>>,
    }

    const PATIENCE: Duration = Duration::from_secs(10);

    fn rendezvous_group(world: usize) -> Vec<Rendezvous> {
        let mut group: Vec<Rendezvous> = (0..world)
            .map(|rank| Rendezvous { rank, world, to: (0..world).map(|_| None).collect(), from: (0..world).map(|_| None).collect() })
            .collect();
        for src in 0..world {
            for dst in 0..world {
                if src != dst {
                    let (tx, rx) = sync_channel(0);
                    group[src].to[dst] = Some(tx);
                    group[dst].from[src] = Some(rx);
                }
            }
        }
        group
    }

    impl Collective for Rendezvous {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.world
        }
        fn all_reduce_sum(&mut self, _: &mut [f32]) -> CollectiveResult<()> {
            Err(CollectiveError::InvalidArgument("not used".into()))
        }
        fn all_gather(&mut self, _: &[f32], _: &mut [f32]) -> CollectiveResult<()> {
            Err(CollectiveError::InvalidArgument("not used".into()))
        }
        fn send(&mut self, peer: usize, data: &[f32]) -> CollectiveResult<()> {
            let tx = self.to[peer].as_ref().ok_or(CollectiveError::PeerLost)?;
            let deadline = Instant::now() + PATIENCE;
            let mut message = data.to_vec();
            loop {
                match tx.try_send(message) {
                    Ok(()) => return Ok(()),
                    Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                        message = m;
                        std::thread::yield_now();
                    }
                    Err(_) => return Err(CollectiveError::Protocol(format!("rank {} stuck sending", self.rank))),
                }
            }
        }
        fn recv(&mut self, peer: usize, out: &mut [f32]) -> CollectiveResult<()> {
            let rx = self.from[peer].as_ref().ok_or(CollectiveError::PeerLost)?;
            let message =
                rx.recv_timeout(PATIENCE).map_err(|_| CollectiveError::Protocol(format!("rank {} stuck receiving", self.rank)))?;
            out.copy_from_slice(&message);
            Ok(())
        }
    }

    /// Each member sees every non-empty block exactly once, its own first and then the ring
    /// predecessors', with the right contents, for rings of one to five members and prompts
    /// shorter than the ring (empty blocks are neither sent nor received).
    #[test]
    fn ring_pass_visits_every_block_once_even_with_rendezvous_sends() {
        let shape = BlockShape { kv_heads: 2, head_dim: 3, dtype: DType::F32, device: Device::Cpu };
        for members in 1..=5 {
            for tokens in [1, 2, members, 13] {
                let layout = ZigzagLayout::new(tokens, members).unwrap();
                let seen: Vec<Vec<usize>> = std::thread::scope(|s| {
                    let handles: Vec<_> = rendezvous_group(members)
                        .into_iter()
                        .map(|mut sp| {
                            let (layout, shape) = (&layout, &shape);
                            s.spawn(move || {
                                let me = sp.rank();
                                let n = layout.member_len(me);
                                let fill = |v: f32| Tensor::full(v, (2, n, 3), &Device::Cpu).unwrap();
                                let local = (n > 0).then(|| Block { keys: fill(me as f32), values: fill(-(me as f32)), wire: None });
                                let mut seen = Vec::new();
                                circulate(&mut sp, layout, shape, local, |owner, block| {
                                    assert_eq!(block.keys.dim(1)?, layout.member_len(owner));
                                    let k: Vec<f32> = block.keys.flatten_all()?.to_vec1()?;
                                    let v: Vec<f32> = block.values.flatten_all()?.to_vec1()?;
                                    assert!(k.iter().all(|&x| x == owner as f32) && v.iter().all(|&x| x == -(owner as f32)));
                                    seen.push(owner);
                                    Ok(())
                                })
                                .expect("ring pass");
                                seen
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().expect("member thread")).collect()
                });
                for (me, seen) in seen.iter().enumerate() {
                    let expected: Vec<usize> =
                        (0..members).map(|s| (me + members - s) % members).filter(|&owner| layout.member_len(owner) > 0).collect();
                    assert_eq!(seen, &expected, "R={members} N={tokens} member {me}");
                }
            }
        }
    }
}
