//! Sequence-parallel runs on threads: R ring members of T tensor-parallel ranks each.

use std::path::Path;

use tessera_collective::{Collective as _, InProcessGroup};
use tessera_model::sampler::argmax;
use tessera_model::{AppendOn, DecodeStep, LoadConfig, Model, PrefillStep, RingComm, RingLogits, RingStep, ZigzagLayout};

const SEQ: u64 = 7;

fn rows(t: &candle_core::Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().expect("logits to host")
}

/// What one rank of one member computed.
#[derive(Debug, Clone)]
pub struct RankTrace {
    pub member: usize,
    /// Prefill logits of this member's rows, with their global positions.
    pub local: Vec<(usize, Vec<f32>)>,
    /// Prefill logits of the prompt's last token.
    pub last: Vec<f32>,
    pub decode: Vec<Vec<f32>>,
    pub greedy: Vec<u32>,
    /// Tokens cached here, and this rank's record of every member's count.
    pub cached: usize,
    pub held: Vec<usize>,
}

/// Prefill `prompt` over the ring, then `steps` greedy decode steps, on one rank.
pub fn ring_trace(model: &Model, comm: &mut RingComm, prompt: &[u32], steps: usize, append: AppendOn) -> RankTrace {
    let member = comm.sp.rank();
    let layout = ZigzagLayout::new(prompt.len(), comm.sp.world_size()).expect("layout");
    let tokens = layout.local_tokens(prompt, member).expect("local tokens");
    let mut kv = model.new_kv_cache();
    let step = RingStep::Prefill(PrefillStep { seq: SEQ, prompt_len: prompt.len(), tokens: &tokens });
    let out = model.forward_ring(&step, &mut kv, comm, RingLogits::LastAndLocal).expect("ring prefill");
    let local = out.local.expect("local rows");
    let local = local.positions.into_iter().zip(rows(&local.logits)).collect();
    let last = rows(&out.last).remove(0);
    let mut next = argmax(&last);
    let mut greedy = vec![next];
    let mut decode = Vec::with_capacity(steps);
    for i in 0..steps {
        let step = RingStep::Decode(DecodeStep { seq: SEQ, token: next, position: prompt.len() + i, append });
        let out = model.forward_ring(&step, &mut kv, comm, RingLogits::Last).expect("ring decode");
        let row = rows(&out.last).remove(0);
        next = argmax(&row);
        decode.push(row);
        if i + 1 < steps {
            greedy.push(next);
        }
    }
    let placement = kv.ring(SEQ).expect("ring placement");
    RankTrace { member, local, last, decode, greedy, cached: kv.len(SEQ).expect("cached"), held: placement.held().to_vec() }
}

/// Runs `ring_trace` on R × T threads: member m, tensor rank t talks to its member's group of T
/// and to the ring of the R ranks with tensor rank t.
pub fn run_ring(dir: &Path, base: &LoadConfig, sp: usize, tp: usize, prompt: &[u32], steps: usize, append: AppendOn) -> Vec<RankTrace> {
    let mut groups: Vec<Vec<InProcessGroup>> = (0..sp).map(|_| InProcessGroup::new(tp)).collect();
    let mut rings: Vec<Vec<InProcessGroup>> = (0..tp).map(|_| InProcessGroup::new(sp)).collect();
    // Hand out in reverse so `pop` yields each rank's own handle.
    let mut ranks = Vec::new();
    for m in (0..sp).rev() {
        for t in (0..tp).rev() {
            let tp_comm = groups[m].pop().expect("tp handle");
            let sp_comm = rings[t].pop().expect("sp handle");
            ranks.push((m, t, tp_comm, sp_comm));
        }
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|(m, t, mut tp_comm, mut sp_comm)| {
                s.spawn(move || {
                    assert_eq!((tp_comm.rank(), sp_comm.rank()), (t, m));
                    let load = LoadConfig { tp_rank: t, tp_size: tp, ..base.clone() };
                    let model = Model::load(dir, &load).expect("load shard");
                    let mut comm = RingComm { tp: &mut tp_comm, sp: &mut sp_comm };
                    ring_trace(&model, &mut comm, prompt, steps, append)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    })
}
