//! One rank of a sequence-parallel ring as its own OS process: member M of R, tensor-parallel
//! rank TP_RANK of T inside it, connected to its peers over TCP.
//!
//! usage: tessera-sp-rank MODEL_DIR PROMPT_IDS(comma-separated) STEPS R T M TP_RANK
//!
//! Binds two listeners, one for its member's tensor-parallel group and one for its ring (the
//! ranks with the same TP_RANK in every member), and prints both addresses on its first line:
//! `TP_ADDR SP_ADDR`. Then reads two lines from stdin: the group's T addresses and the ring's R
//! addresses (space-separated, in rank and member order). A group or ring of one uses
//! `SingleRank`. Runs the ring prefill of the whole prompt (this member's zigzag share), then
//! STEPS greedy decode steps, and prints a `RingTrace` as one JSON line.

use std::io::BufRead;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;

use anyhow::{bail, ensure, Context};
use tessera_collective::{Collective, SingleRank, TcpCollective, TcpConfig};
use tessera_model::sampler::argmax;
use tessera_model::{AppendOn, DecodeStep, LoadConfig, Model, PrefillStep, RingComm, RingLogits, RingStep, ZigzagLayout};
use tessera_tests::RingTrace;

const SEQ: u64 = 1;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, prompt, steps, members, tp_size, member, tp_rank] = args.as_slice() else {
        bail!("usage: tessera-sp-rank MODEL_DIR PROMPT_IDS STEPS R T M TP_RANK");
    };
    let number = |name: &str, value: &str| -> anyhow::Result<usize> {
        value.parse().with_context(|| format!("{name} must be a number, not {value:?}"))
    };
    let steps = number("STEPS", steps)?;
    let (members, tp_size) = (number("R", members)?, number("T", tp_size)?);
    let (member, tp_rank) = (number("M", member)?, number("TP_RANK", tp_rank)?);
    ensure!(member < members && tp_rank < tp_size, "rank ({member}, {tp_rank}) is outside a {members}x{tp_size} layout");
    let prompt: Vec<u32> = prompt
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("PROMPT_IDS must be comma-separated token ids, not {prompt:?}"))?;

    let tp_listener = TcpListener::bind("127.0.0.1:0").context("bind the group listener")?;
    let sp_listener = TcpListener::bind("127.0.0.1:0").context("bind the ring listener")?;
    println!("{} {}", tp_listener.local_addr()?, sp_listener.local_addr()?);
    let mut stdin = std::io::stdin().lock();
    let tp_peers = read_peers(&mut stdin, "group", tp_size)?;
    let sp_peers = read_peers(&mut stdin, "ring", members)?;
    // Every rank joins its group before its ring; groups are disjoint, so this cannot deadlock.
    let mut tp = connect(tp_rank, tp_peers, tp_listener).context("group rendezvous")?;
    let mut sp = connect(member, sp_peers, sp_listener).context("ring rendezvous")?;

    let load = LoadConfig { tp_rank, tp_size, ..LoadConfig::default() };
    let dir = PathBuf::from(dir);
    let model = Model::load(&dir, &load).with_context(|| format!("load {}", dir.display()))?;
    let mut comm = RingComm { tp: tp.as_mut(), sp: sp.as_mut() };
    let trace = ring_trace(&model, &mut comm, &prompt, steps, tp_rank)?;
    println!("{}", serde_json::to_string(&trace)?);
    Ok(())
}

/// One line of `count` space-separated addresses.
fn read_peers(stdin: &mut impl BufRead, what: &str, count: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let mut line = String::new();
    stdin.read_line(&mut line).with_context(|| format!("read the {what} peer list"))?;
    let peers: Vec<SocketAddr> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("the {what} peer list {line:?} is not addresses"))?;
    ensure!(peers.len() == count, "the {what} peer list has {} addresses, not {count}", peers.len());
    Ok(peers)
}

/// A TCP group, or `SingleRank` for a group of one.
fn connect(rank: usize, peers: Vec<SocketAddr>, listener: TcpListener) -> anyhow::Result<Box<dyn Collective>> {
    if peers.len() == 1 {
        return Ok(Box::new(SingleRank));
    }
    Ok(Box::new(TcpCollective::connect(TcpConfig::new(rank, peers), listener)?))
}

/// Ring prefill of `prompt` with this member's rows, then `steps` greedy decode steps.
fn ring_trace(model: &Model, comm: &mut RingComm, prompt: &[u32], steps: usize, tp_rank: usize) -> anyhow::Result<RingTrace> {
    let member = comm.sp.rank();
    let layout = ZigzagLayout::new(prompt.len(), comm.sp.world_size())?;
    let tokens = layout.local_tokens(prompt, member)?;
    let mut kv = model.new_kv_cache();
    let step = RingStep::Prefill(PrefillStep { seq: SEQ, prompt_len: prompt.len(), tokens: &tokens });
    let out = model.forward_ring(&step, &mut kv, comm, RingLogits::LastAndLocal).context("ring prefill")?;
    let local = out.local.context("the prefill returned no local rows")?;
    let rows: Vec<Vec<f32>> = local.logits.to_vec2()?;
    let local: Vec<(usize, Vec<f32>)> = local.positions.into_iter().zip(rows).collect();
    let last = out.last.to_vec2::<f32>()?.pop().context("no last-token row")?;
    let mut next = argmax(&last);
    let mut greedy = vec![next];
    let mut decode = Vec::with_capacity(steps);
    for i in 0..steps {
        let step = RingStep::Decode(DecodeStep { seq: SEQ, token: next, position: prompt.len() + i, append: AppendOn::LeastLoaded });
        let out = model.forward_ring(&step, &mut kv, comm, RingLogits::Last).with_context(|| format!("decode step {i}"))?;
        let row = out.last.to_vec2::<f32>()?.pop().context("no decode row")?;
        next = argmax(&row);
        decode.push(row);
        if i + 1 < steps {
            greedy.push(next);
        }
    }
    let held = kv.ring(SEQ).context("no ring placement after the prefill")?.held().to_vec();
    Ok(RingTrace { member, tp_rank, local, last, decode, greedy, held })
}
