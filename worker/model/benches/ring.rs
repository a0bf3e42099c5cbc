//! What a sequence-parallel ring costs and buys on one machine: ring prefill time, the largest
//! context a fixed per-member KV capacity serves, and decode step latency with the share of it
//! spent in the ring's collectives, at SP = 1, 2 and 4.
//!
//! usage: cargo bench -p tessera-model --bench ring [-- LONGEST]
//! (14–22 min on 2 cores shared with builds, most of it the three 8k prefills; `LONGEST`,
//! default 8192, drops the longer prompts from the prefill table: `-- 4096` takes 5–8 min.)
//!
//! Model: the SmolLM-135M shape (`fixture::smol135()`: hidden 576, 30 layers, 9 heads, 3 KV
//! heads, vocab 49152, tied embeddings, random weights) in f32, as `benches/model.rs` measures
//! it, written into a temporary directory and loaded once; every member shares that `Model`
//! (TP = 1 inside each member, `SingleRank` as its tensor-parallel collective). Members are
//! threads of this process joined by an `InProcessGroup` ring, one thread per member, as
//! `tests/sp_parity.rs` builds them. SP = 1 is `Model::forward_ring` with a ring of one member
//! (`SingleRank`), the same code path as the larger rings, so the ratios isolate the ring; a
//! plain `Model::forward` of the same prompt is timed next to it for reference.
//!
//! 1. Prefill of 2k, 4k and 8k-token prompts (fewer repetitions for the longer ones; medians).
//!    The time is wall clock from the moment every member passed a barrier to the moment the
//!    last one returned its logits. Next to it: the process's CPU time over the prefill (user
//!    and system: large attention temporaries cost page faults), and the query–key scores the
//!    ring's plans compute as a share of the N × N square plain `Model::forward` computes.
//! 2. Largest servable context at a fixed KV capacity of `CAPACITY` tokens per member: with the
//!    zigzag layout and least-loaded appends a ring of R members holds R × `CAPACITY` tokens.
//!    Checked by running that prefill (R × `CAPACITY` − 1 tokens) and one decode step, reading
//!    every member's cache, and showing from `ZigzagLayout::member_len` that one token more
//!    puts `CAPACITY` + 1 on some member. The library's `KvCache` grows on demand; the capacity
//!    is a budget this bench enforces, not a limit the cache knows.
//! 3. Decode step latency after a 2k-token prompt (the first repetition of that prefill),
//!    median of `DECODE_STEPS` steps after `DECODE_WARMUP` untimed ones, fed fixed token ids
//!    (not greedy, so every ring decodes the same tokens). The ring's collectives are wrapped in
//!    `Timed`, which adds up the time spent inside the `Collective` calls (send, receive,
//!    all-gather — waiting for the slowest member included; packing tensors into buffers is
//!    not a collective call and counts as compute).
//!
//! Numerics are checked on the way, and the bench stops before printing a table if they fail:
//! every member of a ring returns the same bits, and the last-token logits of every SP = 2 and
//! SP = 4 prefill and decode step equal SP = 1's (and plain `Model::forward`'s) within a max
//! relative difference of `TOLERANCE` (`fixture::max_rel_diff`).

use std::sync::Barrier;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use tessera_collective::{Collective, InProcessGroup, Result as CollectiveResult, SingleRank};
use tessera_model::fixture::{self, max_rel_diff, WriteOptions};
use tessera_model::{
    AppendOn, Batch, DecodeStep, LoadConfig, LogitsMode, Model, PrefillStep, RingComm, RingLogits, RingStep, SeqChunk, ZigzagLayout,
};

/// Ring sizes compared.
const SP: [usize; 3] = [1, 2, 4];
/// Prompt lengths of the prefill table, with the repetitions each gets. The 8k prefill at SP=1
/// alone takes minutes on two cores (attention is quadratic), hence one repetition.
const PREFILLS: [(usize, usize); 3] = [(2048, 3), (4096, 1), (8192, 1)];
/// The only length also timed through plain `Model::forward` (once: at 8k each of its
/// full-square attention temporaries would take 2.4 GB).
const PLAIN_PROMPT: usize = 2048;
/// KV capacity per member, in tokens, for the context table.
const CAPACITY: usize = 512;
/// Prompt before the decode steps (one of the prefill lengths: its first repetition decodes).
const DECODE_PROMPT: usize = 2048;
const DECODE_WARMUP: usize = 4;
const DECODE_STEPS: usize = 16;
/// Max relative difference allowed between a ring and SP = 1.
const TOLERANCE: f32 = 1e-4;
const SEQ: u64 = 1;

/// A collective that adds up the time spent inside its calls.
struct Timed<C> {
    inner: C,
    spent: Duration,
    calls: u64,
}

impl<C: Collective> Timed<C> {
    fn new(inner: C) -> Self {
        Self { inner, spent: Duration::ZERO, calls: 0 }
    }

    fn time<T>(&mut self, call: impl FnOnce(&mut C) -> T) -> T {
        let start = Instant::now();
        let out = call(&mut self.inner);
        self.spent += start.elapsed();
        self.calls += 1;
        out
    }
}

impl<C: Collective> Collective for Timed<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> CollectiveResult<()> {
        self.time(|c| c.all_reduce_sum(data))
    }
    fn all_gather(&mut self, local: &[f32], out: &mut [f32]) -> CollectiveResult<()> {
        self.time(|c| c.all_gather(local, out))
    }
    fn send(&mut self, peer: usize, data: &[f32]) -> CollectiveResult<()> {
        self.time(|c| c.send(peer, data))
    }
    fn recv(&mut self, peer: usize, out: &mut [f32]) -> CollectiveResult<()> {
        self.time(|c| c.recv(peer, out))
    }
    fn all_reduce_tensor(&mut self, x: &Tensor) -> CollectiveResult<Tensor> {
        self.time(|c| c.all_reduce_tensor(x))
    }
}

/// One decode step as one member saw it.
struct StepRun {
    total: Duration,
    comm: Duration,
    calls: u64,
    logits: Vec<f32>,
}

/// One member's side of a ring run.
struct MemberRun {
    start: Instant,
    prefill_end: Instant,
    prefill_comm: Duration,
    /// Member 0 only: the process's (user, system) CPU seconds from before the prefill until
    /// every member finished it.
    prefill_cpu: Option<CpuTime>,
    last: Vec<f32>,
    steps: Vec<StepRun>,
    /// Tokens in this member's cache at the end, and its record of every member's count.
    cached: usize,
    held: Vec<usize>,
}

/// Every member of one ring run, in member order.
struct RingRun {
    members: Vec<MemberRun>,
}

impl RingRun {
    fn prefill_ms(&self) -> f64 {
        let start = self.members.iter().map(|m| m.start).min().expect("a ring has members");
        let end = self.members.iter().map(|m| m.prefill_end).max().expect("a ring has members");
        ms(end - start)
    }

    /// Share of the prefill each member spent inside ring collectives, averaged over members.
    fn prefill_comm_share(&self) -> f64 {
        let wall = self.prefill_ms();
        self.members.iter().map(|m| ms(m.prefill_comm) / wall).sum::<f64>() / self.members.len() as f64
    }

    /// Timed steps (after the warm-up): the slowest member's time of each step.
    fn step_ms(&self) -> Vec<f64> {
        (DECODE_WARMUP..self.members[0].steps.len())
            .map(|i| self.members.iter().map(|m| ms(m.steps[i].total)).fold(0.0, f64::max))
            .collect()
    }

    /// Per member, the share of its timed steps spent inside ring collectives.
    fn step_comm_shares(&self) -> Vec<f64> {
        self.members
            .iter()
            .map(|m| {
                let timed = &m.steps[DECODE_WARMUP..];
                let comm: Duration = timed.iter().map(|s| s.comm).sum();
                let total: Duration = timed.iter().map(|s| s.total).sum();
                comm.as_secs_f64() / total.as_secs_f64()
            })
            .collect()
    }
}

/// CPU seconds of the whole process, every thread counted: ring members and the math pool.
#[derive(Debug, Clone, Copy)]
struct CpuTime {
    user: f64,
    system: f64,
}

impl CpuTime {
    /// So far, from `/proc/self/stat` (`None` where there is no such file).
    fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name (which may hold spaces): state is field 3, utime 14,
        // stime 15.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok().map(|t| t / CLOCK_TICKS);
        Some(Self { user: ticks(11)?, system: ticks(12)? })
    }

    /// Spent since `before` was read.
    fn since(before: Option<Self>) -> Option<Self> {
        let (before, now) = (before?, Self::now()?);
        Some(Self { user: now.user - before.user, system: now.system - before.system })
    }
}

/// `USER_HZ`, the unit of `/proc` CPU times: 100 on every Linux configuration in use.
const CLOCK_TICKS: f64 = 100.0;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn prompt(len: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 7919 + 13 + salt * 104_729) % vocab) as u32).collect()
}

fn row(t: &Tensor) -> anyhow::Result<Vec<f32>> {
    Ok(t.squeeze(0)?.to_vec1()?)
}

/// One member: waits at `barrier` for the others, prefills its share of `prompt` over the ring,
/// then decodes `decode` one token at a time.
fn run_member<C: Collective>(model: &Model, sp: C, barrier: &Barrier, prompt: &[u32], decode: &[u32]) -> anyhow::Result<MemberRun> {
    let mut sp = Timed::new(sp);
    let mut tp = SingleRank;
    let member = sp.rank();
    let layout = ZigzagLayout::new(prompt.len(), sp.world_size())?;
    let tokens = layout.local_tokens(prompt, member)?;
    let mut kv = model.new_kv_cache();
    let cpu_before = if member == 0 { CpuTime::now() } else { None };
    barrier.wait();
    let start = Instant::now();
    let step = RingStep::Prefill(PrefillStep { seq: SEQ, prompt_len: prompt.len(), tokens: &tokens });
    let out = model.forward_ring(&step, &mut kv, &mut RingComm { tp: &mut tp, sp: &mut sp }, RingLogits::Last)?;
    let last = row(&out.last)?;
    let prefill_end = Instant::now();
    let prefill_comm = sp.spent;
    // Decode starts once every member has finished the prefill, so the CPU time is the prefill's.
    barrier.wait();
    let prefill_cpu = CpuTime::since(cpu_before);

    let mut steps = Vec::with_capacity(decode.len());
    for (i, &token) in decode.iter().enumerate() {
        let (comm_before, calls_before) = (sp.spent, sp.calls);
        let started = Instant::now();
        let step = RingStep::Decode(DecodeStep { seq: SEQ, token, position: prompt.len() + i, append: AppendOn::LeastLoaded });
        let out = model.forward_ring(&step, &mut kv, &mut RingComm { tp: &mut tp, sp: &mut sp }, RingLogits::Last)?;
        let logits = row(&out.last)?;
        steps.push(StepRun { total: started.elapsed(), comm: sp.spent - comm_before, calls: sp.calls - calls_before, logits });
    }
    let placement = kv.ring(SEQ).ok_or_else(|| anyhow::anyhow!("member {member} lost its ring placement"))?;
    Ok(MemberRun {
        start,
        prefill_end,
        prefill_comm,
        prefill_cpu,
        last,
        steps,
        cached: kv.len(SEQ).unwrap_or(0),
        held: placement.held().to_vec(),
    })
}

/// Runs `prompt` (then `decode`) over a ring of `sp` members, one thread each, and checks that
/// every member returned the same bits.
fn run_ring(model: &Model, sp: usize, prompt: &[u32], decode: &[u32]) -> anyhow::Result<RingRun> {
    let barrier = Barrier::new(sp);
    let members = if sp == 1 {
        vec![run_member(model, SingleRank, &barrier, prompt, decode)?]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = InProcessGroup::new(sp)
                .into_iter()
                .map(|ring| {
                    let barrier = &barrier;
                    s.spawn(move || run_member(model, ring, barrier, prompt, decode))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow::anyhow!("a member thread panicked"))?)
                .collect::<anyhow::Result<Vec<_>>>()
        })?
    };
    let first = &members[0];
    for (m, other) in members.iter().enumerate().skip(1) {
        anyhow::ensure!(other.last == first.last, "SP={sp}: member {m}'s prefill logits differ from member 0's");
        for (i, (a, b)) in other.steps.iter().zip(&first.steps).enumerate() {
            anyhow::ensure!(a.logits == b.logits, "SP={sp}: member {m}'s logits of decode step {i} differ from member 0's");
        }
        anyhow::ensure!(other.held == first.held, "SP={sp}: member {m} records other token counts");
    }
    Ok(RingRun { members })
}

/// Plain `Model::forward` of the whole prompt on one rank: (ms, process CPU seconds (user,
/// system), last-token logits).
fn plain_prefill(model: &Model, prompt: &[u32]) -> anyhow::Result<(f64, Option<CpuTime>, Vec<f32>)> {
    let mut kv = model.new_kv_cache();
    let chunk = [SeqChunk { seq: SEQ, start: 0, len: prompt.len() }];
    let cpu_before = CpuTime::now();
    let start = Instant::now();
    let logits = model.forward(&Batch { tokens: prompt, chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk)?;
    let last = row(&logits)?;
    Ok((ms(start.elapsed()), CpuTime::since(cpu_before), last))
}

/// "user / system" CPU seconds, medians over repetitions; "—" where unknown.
fn cpu_cell(cpu: &[Option<CpuTime>]) -> String {
    let known: Vec<CpuTime> = cpu.iter().flatten().copied().collect();
    if known.is_empty() {
        return "—".into();
    }
    let user = median(known.iter().map(|c| c.user).collect());
    let system = median(known.iter().map(|c| c.system).collect());
    format!("{user:.1} / {system:.1}")
}

/// Fails unless `got` is within `TOLERANCE` of `reference`; returns the difference.
fn check_close(what: &str, got: &[f32], reference: &[f32]) -> anyhow::Result<f32> {
    let diff = max_rel_diff(&[got.to_vec()], &[reference.to_vec()]);
    anyhow::ensure!(diff <= TOLERANCE, "NUMERICS FAILED, no timings reported: {what}: max relative difference {diff:.3e} > {TOLERANCE:e}");
    Ok(diff)
}

/// Results of one prompt length, over its repetitions.
struct PrefillRows {
    tokens: usize,
    reps: usize,
    /// Per SP degree (in `SP` order): times, collective shares, worst difference from SP = 1.
    ring_ms: Vec<Vec<f64>>,
    ring_comm: Vec<Vec<f64>>,
    ring_cpu: Vec<Vec<Option<CpuTime>>>,
    ring_diff: Vec<f32>,
    plain_ms: Vec<f64>,
    plain_cpu: Vec<Option<CpuTime>>,
    plain_diff: f32,
}

/// The prefill table's runs; the first repetition at `DECODE_PROMPT` also decodes and is
/// returned per SP degree.
fn prefill_runs(model: &Model, longest: usize) -> anyhow::Result<(Vec<PrefillRows>, Vec<RingRun>)> {
    let vocab = model.config().vocab_size;
    let decode_tokens = prompt(DECODE_WARMUP + DECODE_STEPS, vocab, 99);
    let mut tables = Vec::new();
    let mut decodes = Vec::new();
    for (tokens, reps) in PREFILLS.into_iter().filter(|&(t, _)| t <= longest) {
        let p = prompt(tokens, vocab, tokens);
        let mut rows = PrefillRows {
            tokens,
            reps,
            ring_ms: vec![Vec::new(); SP.len()],
            ring_comm: vec![Vec::new(); SP.len()],
            ring_cpu: vec![Vec::new(); SP.len()],
            ring_diff: vec![0.0; SP.len()],
            plain_ms: Vec::new(),
            plain_cpu: Vec::new(),
            plain_diff: 0.0,
        };
        for rep in 0..reps {
            // SP degrees alternate within a repetition, so slow minutes hit all of them.
            let decode = if tokens == DECODE_PROMPT && rep == 0 { &decode_tokens[..] } else { &[] };
            let mut reference: Option<RingRun> = None;
            for (i, &sp) in SP.iter().enumerate() {
                let run = run_ring(model, sp, &p, decode)?;
                rows.ring_ms[i].push(run.prefill_ms());
                rows.ring_comm[i].push(run.prefill_comm_share());
                rows.ring_cpu[i].push(run.members[0].prefill_cpu);
                println!("  prefill {tokens} SP={sp} rep {rep}: {:.0} ms", run.prefill_ms());
                match &reference {
                    None => reference = Some(run),
                    Some(base) => {
                        let case = format!("prefill of {tokens} tokens at SP={sp}");
                        let mut worst = check_close(&case, &run.members[0].last, &base.members[0].last)?;
                        for (s, (a, b)) in run.members[0].steps.iter().zip(&base.members[0].steps).enumerate() {
                            worst = worst.max(check_close(&format!("{case}, decode step {s}"), &a.logits, &b.logits)?);
                        }
                        rows.ring_diff[i] = rows.ring_diff[i].max(worst);
                        if !decode.is_empty() {
                            decodes.push(run);
                        }
                    }
                }
            }
            let base = reference.expect("SP lists 1 first");
            if tokens == PLAIN_PROMPT && rep == 0 {
                let (plain_ms, plain_cpu, plain_last) = plain_prefill(model, &p)?;
                println!("  prefill {tokens} plain Model::forward: {plain_ms:.0} ms");
                rows.plain_ms.push(plain_ms);
                rows.plain_cpu.push(plain_cpu);
                let case = format!("plain Model::forward of {tokens} tokens vs SP=1 ring");
                rows.plain_diff = check_close(&case, &plain_last, &base.members[0].last)?;
            }
            if !decode.is_empty() {
                decodes.insert(0, base);
            }
        }
        tables.push(rows);
    }
    Ok((tables, decodes))
}

/// Query–key scores a ring prefill computes per head and layer, as a share of the full N × N
/// square that plain `Model::forward` computes before masking: what `ring.rs`'s plans keep of
/// each block (keys after a run's last query are skipped; no sliding window in this model).
fn score_share(tokens: usize, sp: usize) -> f64 {
    let Ok(layout) = ZigzagLayout::new(tokens, sp) else {
        return f64::NAN;
    };
    let keys: Vec<Vec<usize>> = (0..sp).map(|m| layout.positions(m)).collect();
    let mut scores = 0usize;
    for member in 0..sp {
        for run in layout.member_runs(member).into_iter().filter(|r| !r.is_empty()) {
            let last = run.end - 1;
            scores += keys.iter().map(|k| run.len() * k.partition_point(|&p| p <= last)).sum::<usize>();
        }
    }
    scores as f64 / (tokens * tokens) as f64
}

fn print_prefill(tables: &[PrefillRows]) {
    println!();
    println!("### Ring prefill (wall clock, all members on one machine)");
    println!();
    println!("| prompt tokens | configuration | reps | prefill ms (median) | ÷ SP=1 | tok/s | share in SP collectives | process CPU s, user / system | KV tokens per member | attention scores computed, ÷ N² | max rel diff vs SP=1 |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for t in tables {
        let base = median(t.ring_ms[0].clone());
        for (i, &sp) in SP.iter().enumerate() {
            let m = median(t.ring_ms[i].clone());
            let per_member = ZigzagLayout::new(t.tokens, sp).map(|l| l.member_len(0)).unwrap_or(0);
            let diff = if sp == 1 { "—".to_string() } else { format!("{:.1e}", t.ring_diff[i]) };
            println!(
                "| {} | ring SP={sp} | {} | {m:.0} | {:.2}× | {:.0} | {:.1}% | {} | {per_member} | {:.3} | {diff} |",
                t.tokens,
                t.reps,
                m / base,
                t.tokens as f64 / (m / 1e3),
                100.0 * median(t.ring_comm[i].clone()),
                cpu_cell(&t.ring_cpu[i]),
                score_share(t.tokens, sp),
            );
        }
        if t.plain_ms.is_empty() {
            continue;
        }
        let m = median(t.plain_ms.clone());
        println!(
            "| {} | plain `Model::forward` | {} | {m:.0} | {:.2}× | {:.0} | — | {} | {} | 1.000 | {:.1e} |",
            t.tokens,
            t.plain_ms.len(),
            m / base,
            t.tokens as f64 / (m / 1e3),
            cpu_cell(&t.plain_cpu),
            t.tokens,
            t.plain_diff
        );
    }
}

fn print_decode(decodes: &[RingRun]) {
    println!();
    println!(
        "### Decode step after a {DECODE_PROMPT}-token prompt (median of {DECODE_STEPS} steps after {DECODE_WARMUP} untimed; slowest member per step)"
    );
    println!();
    println!("| SP | decode step ms (median) | ÷ SP=1 | share in SP collectives, mean (min–max over members) | SP collective calls per step | KV tokens per member at the end |");
    println!("|---:|---:|---:|---:|---:|---|");
    let base = median(decodes[0].step_ms());
    for (run, sp) in decodes.iter().zip(SP) {
        let step = median(run.step_ms());
        let shares = run.step_comm_shares();
        let mean = shares.iter().sum::<f64>() / shares.len() as f64;
        let (lo, hi) = (shares.iter().copied().fold(f64::MAX, f64::min), shares.iter().copied().fold(0.0, f64::max));
        let calls = run.members[0].steps.last().map_or(0, |s| s.calls);
        let held: Vec<String> = run.members[0].held.iter().map(usize::to_string).collect();
        println!(
            "| {sp} | {step:.1} | {:.2}× | {:.1}% ({:.1}–{:.1}%) | {calls} | {} |",
            step / base,
            100.0 * mean,
            100.0 * lo,
            100.0 * hi,
            held.join(" / ")
        );
    }
}

/// The context table: the largest prompt that leaves room for one decoded token at `CAPACITY`
/// tokens per member, run and checked at every SP degree. Returns the table's rows.
fn context_runs(model: &Model) -> anyhow::Result<Vec<String>> {
    let vocab = model.config().vocab_size;
    let mut lines = Vec::new();
    for sp in SP {
        let context = sp * CAPACITY;
        let p = prompt(context - 1, vocab, 7);
        let prefill = ZigzagLayout::new(context - 1, sp)?;
        let after_prefill: Vec<usize> = (0..sp).map(|m| prefill.member_len(m)).collect();
        let run = run_ring(model, sp, &p, &prompt(1, vocab, 8))?;
        let cached: Vec<usize> = run.members.iter().map(|m| m.cached).collect();
        let held = &run.members[0].held;
        anyhow::ensure!(
            &cached == held && held.iter().all(|&n| n == CAPACITY),
            "SP={sp}: after {} prompt tokens and one decode step the members cache {cached:?} (record {held:?}), expected {CAPACITY} each",
            context - 1
        );
        // One token more: held at once by a prompt that long, or appended by the next decode
        // step to a member that is already full.
        let over = ZigzagLayout::new(context + 1, sp)?;
        let over_max = (0..sp).map(|m| over.member_len(m)).max().unwrap_or(0);
        anyhow::ensure!(over_max > CAPACITY, "SP={sp}: {} tokens would still fit", context + 1);
        let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(" / ");
        lines.push(format!(
            "| {sp} | {CAPACITY} | {context} | {:.2}× | {} | {} | {over_max} > {CAPACITY} | {:.0} |",
            context as f64 / CAPACITY as f64,
            list(&after_prefill),
            list(&cached),
            run.prefill_ms()
        ));
        println!("  context SP={sp}: prompt {} + 1 decoded, {:.0} ms prefill", context - 1, run.prefill_ms());
    }
    Ok(lines)
}

fn print_context(lines: &[String]) {
    println!();
    println!("### Largest context at {CAPACITY} KV tokens per member (prompt of context − 1 tokens, then one decode step, both run)");
    println!();
    println!("| SP | KV capacity per member | largest context (tokens) | ÷ SP=1 | KV per member after prefill | KV per member after 1 decode step (read from each cache) | one token more: most on one member | prefill ms |");
    println!("|---:|---:|---:|---:|---|---|---:|---:|");
    for line in lines {
        println!("{line}");
    }
}

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    // `cargo bench` appends `--bench`; ignore flags.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let longest: usize = args.first().map(|a| a.parse()).transpose()?.unwrap_or(8192).max(DECODE_PROMPT);
    let root = tempfile::tempdir()?;
    let dir = fixture::write_fixture(&fixture::smol135(), root.path(), &WriteOptions::default())?;
    let model = Model::load(&dir, &LoadConfig::default())?;
    let reps: Vec<String> = PREFILLS.iter().filter(|&&(t, _)| t <= longest).map(|(t, r)| format!("{t} ×{r}")).collect();
    println!(
        "smol135 shape (f32, random weights), TP=1 per member, SP members as threads with InProcessGroup; \
         math threads {}; prefill repetitions per prompt length: {}; decode: {DECODE_STEPS} timed steps after \
         {DECODE_WARMUP} untimed; loaded in {:.1} s",
        candle_core::utils::get_num_threads(),
        reps.join(", "),
        started.elapsed().as_secs_f64()
    );
    // Warm-up: page the weights in and start the threads' allocators.
    for sp in SP {
        run_ring(&model, sp, &prompt(256, model.config().vocab_size, 1), &[])?;
    }

    let (tables, decodes) = prefill_runs(&model, longest)?;
    let context = context_runs(&model)?;
    print_prefill(&tables);
    print_context(&context);
    print_decode(&decodes);
    println!();
    println!("numerics: every ring member returned the same bits; SP=2 and SP=4 (prefill and decode) within {TOLERANCE:e} of SP=1");
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
