//! The engine thread: the only owner of a rank's model, KV cache, samplers and collective.
//!
//! Collectives block, and a rank blocks its peers while it computes, so the math runs on one
//! dedicated OS thread, never on the async runtime. Callers talk to it through
//! [`EngineHandle`], a cloneable sender of commands that each carry their reply channel.
//! Whether the engine serves a group is published after every command
//! ([`EngineHandle::serving`]), for the worker's readiness.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use candle_core::{DType, Device};
use tessera_collective::{Collective, Interrupt, SingleRank, TcpCollective, TcpConfig};
use tessera_model::sampler::{Sampler, SamplingParams};
use tessera_model::{
    Batch, BertModel, KvCache, KvCacheConfig, LoadConfig, LogitsMode, Model, Numerics, PrefixCaching, PrefixStats, Quantization,
    RopeScaling, SeqChunk, SeqId,
};
use tokio::sync::{oneshot, watch};

use crate::error::WorkerError;

mod adapters;
mod ring;
mod sampling;
use adapters::Adapters;
pub use ring::{RingMembership, RingSampled, RingSampling, RingSeqStep, RingWork};
use sampling::{Pick, SeqSampling};

type Result<T> = std::result::Result<T, WorkerError>;

/// Fixed settings of one worker's engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Host the collective endpoint binds to (port chosen by the OS).
    pub collective_host: String,
    /// Tokens of KV cache this worker accepts across all sequences.
    pub kv_capacity_tokens: u64,
    /// Mutual TLS on the collective's connections; `None` for plain TCP.
    pub collective_tls: Option<crate::tls::CollectiveTlsFiles>,
    /// LoRA adapters a serving rank holds at most (`adapters.rs`).
    pub max_adapters: usize,
}

/// Where a sequence's LoRA adapter comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSpec {
    pub name: String,
    pub dir: PathBuf,
}

/// What the coordinator asks a rank to become.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub group_id: String,
    pub model_dir: PathBuf,
    pub dtype: DType,
    /// Projections block-quantized on load (`LoadConfig::quantization`).
    pub quantization: Option<Quantization>,
    pub tp_rank: usize,
    pub tp_size: usize,
    /// `LoadConfig::numerics`.
    pub numerics: Numerics,
}

/// One sequence's part of a step.
#[derive(Debug, Clone)]
pub struct SeqWork {
    pub seq: SeqId,
    pub start: usize,
    pub tokens: Vec<u32>,
    /// Present on a sequence's first step.
    pub sampling: Option<SamplingParams>,
    /// Alternatives to report with each sampled token; read with `sampling`.
    pub top_logprobs: usize,
    /// Beam search: report this many best next tokens instead of sampling; read with `sampling`.
    pub beam_candidates: usize,
    /// A sequence recomputed after preemption: (original prompt length, random draws so far);
    /// read with `sampling`.
    pub resume: Option<(usize, u64)>,
    pub sample: bool,
    /// Whether a new sequence reuses and offers cached KV blocks of equal prefixes.
    pub prefix_caching: PrefixCaching,
    /// The LoRA adapter a new sequence (`start` 0) runs with; `None`: the base model.
    pub adapter: Option<AdapterSpec>,
}

/// One step: forks applied first (`to` becomes a copy of `from`), then one forward over `seqs`.
#[derive(Debug, Clone, Default)]
pub struct StepWork {
    pub forks: Vec<(SeqId, SeqId)>,
    pub seqs: Vec<SeqWork>,
}

/// A token chosen for a sequence at the end of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub seq: SeqId,
    pub token: u32,
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, most likely first (empty unless asked).
    pub top: Vec<(u32, f32)>,
    /// Random numbers the sequence's sampler has drawn so far.
    pub rng_draws: u64,
}

/// A snapshot of the engine for status reports.
#[derive(Debug, Clone, Default)]
pub struct EngineStatus {
    pub state: &'static str,
    pub group_id: String,
    pub tp_rank: usize,
    pub sequences: usize,
    pub kv_tokens: u64,
    pub kv_blocks: u64,
    pub error: String,
    pub prefix: PrefixStats,
    /// LoRA adapters held, least recently used first.
    pub adapters: Vec<String>,
}

enum Command {
    Assign(Assignment, oneshot::Sender<Result<Option<SocketAddr>>>),
    Rendezvous(String, Vec<SocketAddr>, oneshot::Sender<Result<()>>),
    Step(String, StepWork, oneshot::Sender<Result<Vec<Sampled>>>),
    Release(String, Vec<SeqId>, oneshot::Sender<Result<()>>),
    Reset(oneshot::Sender<()>),
    Status(oneshot::Sender<EngineStatus>),
    /// Sequence-parallel ring membership and steps (`ring.rs`), for the named group.
    Ring(String, ring::RingCommand),
    Embed(String, Vec<Vec<u32>>, oneshot::Sender<Result<Vec<Vec<f32>>>>),
    LoadAdapter(String, AdapterSpec, oneshot::Sender<Result<u64>>),
    UnloadAdapter(String, String, oneshot::Sender<Result<()>>),
}

/// Cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    /// Whether `Assign` is taken; shared with the engine thread, which reads it when it runs an
    /// `Assign`, so an assignment queued before a pause is undone by the pause's reset and one
    /// run after it is refused.
    accepting: Arc<AtomicBool>,
    /// Whether the engine serves a group: its shard (or encoder) loaded, its peers connected.
    serving: watch::Receiver<bool>,
    /// Ends the group's and the ring's collective calls, set while they are connected.
    interrupt: Interruptible,
}

/// Where the engine thread leaves its collectives' [`Interrupt`]s for the handles: a reset
/// must not wait behind a step blocked on a peer that will never answer, in its group or in
/// a sequence-parallel ring.
type Interruptible = Arc<Mutex<Interrupts>>;

/// The interrupts of the collectives a worker holds: its group's and its ring's (a worker is
/// in at most one ring at a time).
#[derive(Default)]
struct Interrupts {
    group: Option<Interrupt>,
    ring: Option<Interrupt>,
}

fn interrupts(slot: &Interruptible) -> std::sync::MutexGuard<'_, Interrupts> {
    slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl EngineHandle {
    /// Starts the engine thread, accepting assignments. It stops when every handle is dropped.
    pub fn spawn(config: EngineConfig) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let accepting = Arc::new(AtomicBool::new(true));
        let flag = Arc::clone(&accepting);
        let (publish, serving) = watch::channel(false);
        let interrupt = Interruptible::default();
        let slot = Arc::clone(&interrupt);
        // Built on its own thread: the engine holds a collective, which need not be `Send`.
        std::thread::Builder::new().name("tessera-engine".into()).spawn(move || Engine::new(config, flag, publish, slot).run(rx))?;
        Ok(Self { tx, accepting, serving, interrupt })
    }

    /// Whether the engine serves a group (shard loaded, rendezvous done), updated as that
    /// changes: false while idle, assigned, failed, and after a reset. The sender closes when
    /// the engine thread ends.
    pub fn serving(&self) -> watch::Receiver<bool> {
        self.serving.clone()
    }

    /// Refuses further assignments, then resets the engine: whatever group it belonged to is
    /// dropped. The flag is set before the reset is queued, so no assignment survives.
    pub(crate) async fn pause(&self) -> Result<()> {
        self.accepting.store(false, Ordering::SeqCst);
        self.reset().await
    }

    /// Takes assignments again.
    pub(crate) fn resume(&self) {
        self.accepting.store(true, Ordering::SeqCst);
    }

    /// Whether assignments are taken now.
    pub(crate) fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> std::result::Result<T, WorkerError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| WorkerError::EngineGone)?;
        rx.await.map_err(|_| WorkerError::EngineGone)
    }

    pub async fn assign(&self, a: Assignment) -> Result<Option<SocketAddr>> {
        self.call(|r| Command::Assign(a, r)).await?
    }

    pub async fn rendezvous(&self, group: String, peers: Vec<SocketAddr>) -> Result<()> {
        self.call(|r| Command::Rendezvous(group, peers, r)).await?
    }

    pub async fn step(&self, group: String, work: StepWork) -> Result<Vec<Sampled>> {
        self.call(|r| Command::Step(group, work, r)).await?
    }

    pub async fn release(&self, group: String, seqs: Vec<SeqId>) -> Result<()> {
        self.call(|r| Command::Release(group, seqs, r)).await?
    }

    /// Leaves the group: first shuts the group's connections, so a step blocked on a peer
    /// (hung, or cut off) fails at once and the reset is not queued behind it, then resets.
    pub async fn reset(&self) -> Result<()> {
        let fired = {
            let mut held = interrupts(&self.interrupt);
            [held.ring.take(), held.group.take()]
        };
        for interrupt in fired.into_iter().flatten() {
            interrupt.fire();
        }
        self.call(Command::Reset).await
    }

    pub async fn status(&self) -> Result<EngineStatus> {
        self.call(Command::Status).await
    }

    /// Loads this rank's share of a LoRA adapter; returns the bytes it holds.
    pub async fn load_adapter(&self, group: String, adapter: AdapterSpec) -> Result<u64> {
        self.call(|r| Command::LoadAdapter(group, adapter, r)).await?
    }

    /// Forgets an adapter; sequences running with it finish with it.
    pub async fn unload_adapter(&self, group: String, name: String) -> Result<()> {
        self.call(|r| Command::UnloadAdapter(group, name, r)).await?
    }

    /// One vector per input, from a group serving an encoder.
    pub async fn embed(&self, group: String, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>> {
        self.call(|r| Command::Embed(group, inputs, r)).await?
    }
}

struct Serving {
    group_id: String,
    tp_rank: usize,
    model: Model,
    kv: KvCache,
    comm: Box<dyn Collective>,
    samplers: HashMap<SeqId, SeqSampling>,
    /// The sequence-parallel ring this group's rank belongs to, if any.
    ring: Option<ring::Ring>,
    /// LoRA adapters held, and the sequences running with them.
    adapters: Adapters,
}

/// Inputs an encoder runs through the model at once.
const EMBED_BATCH: usize = 16;

/// A group of one rank serving a BERT encoder: no KV cache, no sampler, no collective.
struct Encoding {
    group_id: String,
    model: BertModel,
}

enum State {
    Idle,
    Assigned { assignment: Assignment, listener: Option<TcpListener> },
    Serving(Box<Serving>),
    Encoding(Box<Encoding>),
    Failed { group_id: String, error: String },
}

struct Engine {
    config: EngineConfig,
    state: State,
    accepting: Arc<AtomicBool>,
    /// Where [`EngineHandle::serving`] is published.
    serving: watch::Sender<bool>,
    /// Where the group collective's interrupt is left for the handles.
    interrupt: Interruptible,
}

impl Engine {
    fn new(config: EngineConfig, accepting: Arc<AtomicBool>, serving: watch::Sender<bool>, interrupt: Interruptible) -> Self {
        Self { config, state: State::Idle, accepting, serving, interrupt }
    }

    fn run(mut self, rx: mpsc::Receiver<Command>) {
        // A dropped reply receiver means the caller gave up (e.g. the RPC was cancelled); the
        // work is done either way, so send errors are ignored.
        while let Ok(cmd) = rx.recv() {
            match cmd {
                Command::Assign(a, reply) => {
                    let _ = reply.send(self.assign(a));
                }
                Command::Rendezvous(group, peers, reply) => {
                    let result = self.rendezvous(&group, peers);
                    let _ = reply.send(result);
                }
                Command::Step(group, work, reply) => {
                    let result = self.step(&group, work);
                    let _ = reply.send(result);
                }
                Command::Release(group, seqs, reply) => {
                    let _ = reply.send(self.release(&group, &seqs));
                }
                Command::Reset(reply) => {
                    self.state = State::Idle;
                    let _ = reply.send(());
                }
                Command::Status(reply) => {
                    let _ = reply.send(self.status());
                }
                Command::Ring(group, cmd) => self.ring_command(&group, cmd),
                Command::Embed(group, inputs, reply) => {
                    let _ = reply.send(self.embed(&group, &inputs));
                }
                Command::LoadAdapter(group, adapter, reply) => {
                    let result =
                        self.serving(&group, "load an adapter").and_then(|s| s.adapters.load(&s.model, &adapter.name, &adapter.dir));
                    let _ = reply.send(result.map(|a| a.bytes() as u64));
                }
                Command::UnloadAdapter(group, name, reply) => {
                    let result = self.serving(&group, "unload an adapter").map(|s| {
                        if s.adapters.unload(&name) {
                            tracing::info!(adapter = %name, "adapter unloaded");
                        }
                    });
                    let _ = reply.send(result);
                }
            }
            // Any command may have moved the state (a step that breaks the collective fails
            // the engine), so it is published after each; watchers hear only of changes.
            let serving = matches!(self.state, State::Serving(_) | State::Encoding(_));
            self.serving.send_if_modified(|s| std::mem::replace(s, serving) != serving);
            // An interrupt holds its collective's connections open: it goes with the group or
            // the ring, so peers see this rank leave when the collective is dropped.
            let (in_group, in_ring) = match &self.state {
                State::Serving(s) => (true, s.ring.as_ref().is_some_and(ring::Ring::is_joined)),
                _ => (false, false),
            };
            let mut held = interrupts(&self.interrupt);
            if !in_group {
                held.group = None;
            }
            if !in_ring {
                held.ring = None;
            }
        }
    }

    fn assign(&mut self, a: Assignment) -> Result<Option<SocketAddr>> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(WorkerError::NotAccepting);
        }
        if a.tp_size == 0 || a.tp_rank >= a.tp_size {
            return Err(WorkerError::InvalidArgument(format!("rank {} of tp {}", a.tp_rank, a.tp_size)));
        }
        // Re-assignment replaces whatever the worker held: the coordinator owns placement.
        let listener = if a.tp_size > 1 {
            Some(TcpListener::bind((self.config.collective_host.as_str(), 0)).map_err(WorkerError::Bind)?)
        } else {
            None
        };
        let addr = listener.as_ref().map(|l| l.local_addr()).transpose().map_err(WorkerError::Bind)?;
        self.state = State::Assigned { assignment: a, listener };
        Ok(addr)
    }

    fn rendezvous(&mut self, group: &str, peers: Vec<SocketAddr>) -> Result<()> {
        let (assignment, listener) = match std::mem::replace(&mut self.state, State::Idle) {
            State::Assigned { assignment, listener } if assignment.group_id == group => (assignment, listener),
            other => {
                let err = match &other {
                    State::Assigned { .. } => WorkerError::WrongGroup(group.into()),
                    _ => WorkerError::BadState { state: state_name(&other), action: "rendezvous" },
                };
                self.state = other;
                return Err(err);
            }
        };
        let result = match tessera_model::bert::is_bert_dir(&assignment.model_dir) {
            Ok(true) => self.load_encoder(&assignment).map(|e| State::Encoding(Box::new(e))),
            // Not an encoder, or no readable config.json: the decoder loader reports which.
            Ok(false) | Err(_) => self.connect_and_load(&assignment, listener, peers).map(|s| State::Serving(Box::new(s))),
        };
        match result {
            Ok(state) => {
                self.state = state;
                Ok(())
            }
            Err(e) => {
                self.state = State::Failed { group_id: assignment.group_id, error: e.to_string() };
                Err(e)
            }
        }
    }

    /// The collective's settings for this rank, with the worker's TLS as it is now.
    fn tcp_config(&self, rank: usize, peers: Vec<SocketAddr>) -> TcpConfig {
        TcpConfig { tls: self.config.collective_tls.as_ref().map(|t| t.current()), ..TcpConfig::new(rank, peers) }
    }

    fn connect_and_load(&self, a: &Assignment, listener: Option<TcpListener>, peers: Vec<SocketAddr>) -> Result<Serving> {
        let comm: Box<dyn Collective> = match listener {
            None => Box::new(SingleRank),
            Some(listener) => {
                if peers.len() != a.tp_size {
                    return Err(WorkerError::InvalidArgument(format!("{} peers for tp {}", peers.len(), a.tp_size)));
                }
                Box::new(TcpCollective::connect(self.tcp_config(a.tp_rank, peers), listener)?)
            }
        };
        interrupts(&self.interrupt).group = comm.interrupt();
        let load = LoadConfig {
            dtype: a.dtype,
            quantization: a.quantization,
            tp_rank: a.tp_rank,
            tp_size: a.tp_size,
            device: Device::Cpu,
            dequantize: false,
            numerics: a.numerics,
        };
        let start = std::time::Instant::now();
        let model = Model::load(&a.model_dir, &load).map_err(WorkerError::loading)?;
        tracing::info!(group = %a.group_id, rank = a.tp_rank, secs = start.elapsed().as_secs_f64(), "shard loaded");
        let kv = model.new_kv_cache_with(self.kv_config(a, &model));
        let adapters = Adapters::new(self.config.max_adapters);
        Ok(Serving { group_id: a.group_id.clone(), tp_rank: a.tp_rank, model, kv, comm, samplers: HashMap::new(), ring: None, adapters })
    }

    /// The pool holds the blocks this worker accepts, so that cached blocks nobody uses never
    /// take room a step needs. Blocks are named for this checkpoint, type and shard. Under
    /// dynamic NTK scaling a position's keys depend on the sequence's length when computed, so
    /// no prefix is reused there.
    fn kv_config(&self, a: &Assignment, model: &Model) -> KvCacheConfig {
        use std::hash::{Hash, Hasher};
        let mut identity = std::collections::hash_map::DefaultHasher::new();
        (a.model_dir.as_path(), a.dtype.as_str(), a.quantization.map(Quantization::name), a.tp_rank, a.tp_size).hash(&mut identity);
        let dynamic = matches!(model.config().rope_scaling, RopeScaling::Dynamic { .. });
        KvCacheConfig {
            max_blocks: Some(usize::try_from(self.config.kv_capacity_tokens / tessera_model::KV_BLOCK_TOKENS as u64).unwrap_or(usize::MAX)),
            prefix_cache: !dynamic,
            model_identity: identity.finish(),
        }
    }

    /// Encoders run whole on one rank (tensor parallelism is for decoders).
    fn load_encoder(&self, a: &Assignment) -> Result<Encoding> {
        if a.tp_size != 1 {
            return Err(WorkerError::InvalidArgument(format!("an encoder runs on one rank, not tp {}", a.tp_size)));
        }
        let start = std::time::Instant::now();
        let model = BertModel::load(&a.model_dir, &Device::Cpu).map_err(WorkerError::loading)?;
        tracing::info!(group = %a.group_id, secs = start.elapsed().as_secs_f64(), "encoder loaded");
        Ok(Encoding { group_id: a.group_id.clone(), model })
    }

    fn embed(&mut self, group: &str, inputs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let state = state_name(&self.state);
        match &self.state {
            State::Encoding(e) if e.group_id == group => {
                // Batches of a few inputs bound the attention scores' memory; padding is per batch.
                let mut out = Vec::with_capacity(inputs.len());
                for batch in inputs.chunks(EMBED_BATCH) {
                    out.extend(e.model.embed(batch).map_err(|err| match err {
                        tessera_model::ModelError::SequenceTooLong { index, len, max } => {
                            let index = index + out.len();
                            tessera_model::ModelError::SequenceTooLong { index, len, max }
                        }
                        other => other,
                    })?);
                }
                if out.is_empty() {
                    return Err(WorkerError::InvalidArgument("no inputs to embed".into()));
                }
                Ok(out)
            }
            State::Serving(s) if s.group_id == group => {
                Err(WorkerError::WrongModelKind { group: group.into(), loaded: "a decoder", action: "embed" })
            }
            State::Serving(_) | State::Encoding(_) => Err(WorkerError::WrongGroup(group.into())),
            _ => Err(WorkerError::BadState { state, action: "embed" }),
        }
    }

    fn serving(&mut self, group: &str, action: &'static str) -> Result<&mut Serving> {
        let state = state_name(&self.state);
        match &mut self.state {
            State::Serving(s) if s.group_id == group => Ok(s),
            State::Encoding(e) if e.group_id == group => {
                Err(WorkerError::WrongModelKind { group: group.into(), loaded: "an encoder", action })
            }
            State::Serving(_) => Err(WorkerError::WrongGroup(group.into())),
            _ => Err(WorkerError::BadState { state, action }),
        }
    }

    /// One step of a group: check the KV room, apply the forks, prepare the samplers, run the
    /// forward pass over every chunk at once, and sample the rows that ask for a token.
    fn step(&mut self, group: &str, StepWork { forks, seqs: work }: StepWork) -> Result<Vec<Sampled>> {
        let capacity = self.config.kv_capacity_tokens;
        // One span per step with where its time went, for whatever subscriber the process runs
        // (the `tessera` binary logs them at debug level; a tracing exporter can collect them).
        let span = tracing::info_span!(
            "step",
            group,
            seqs = work.len(),
            tokens = tracing::field::Empty,
            kv_blocks = tracing::field::Empty,
            forward_ms = tracing::field::Empty,
            sample_ms = tracing::field::Empty,
        );
        let _entered = span.enter();
        let s = self.serving(group, "step")?;
        check_kv_room(&s.kv, &work, &forks, capacity)?;
        attach_adapters(s, &work)?;
        apply_forks(s, &forks)?;
        let reused = reuse_prefixes(&mut s.kv, &s.adapters, &work)?;
        let (tokens, chunks) = prepare_samplers(s, &work, &reused);
        span.record("tokens", tokens.len());
        let started = std::time::Instant::now();
        let batch = Batch { tokens: &tokens, chunks: &chunks };
        // Only a step with an adapted sequence looks up each chunk's adapter.
        let adapters: Vec<_> = if s.adapters.any_attached() { chunks.iter().map(|c| s.adapters.of(c.seq)).collect() } else { Vec::new() };
        let result = s.model.forward_adapted(&batch, &adapters, &mut s.kv, s.comm.as_mut(), LogitsMode::LastPerChunk);
        span.record("forward_ms", started.elapsed().as_secs_f64() * 1e3);
        span.record("kv_blocks", s.kv.blocks());
        let logits = match result {
            Ok(l) => l,
            // A failed collective leaves the group unusable: every rank must be re-formed.
            Err(e @ tessera_model::ModelError::Collective(_)) => {
                let group_id = s.group_id.clone();
                self.state = State::Failed { group_id, error: e.to_string() };
                return Err(e.into());
            }
            Err(e) => {
                // A refused step holds nothing: the sequences it started (and the cached
                // blocks they took) are given back, as every rank refuses alike.
                for w in work.iter().filter(|w| w.start == 0) {
                    s.kv.release(w.seq);
                    s.adapters.detach(w.seq);
                }
                return Err(e.into());
            }
        };
        let started = std::time::Instant::now();
        let rows: Vec<Vec<f32>> = logits.to_vec2().map_err(tessera_model::ModelError::from)?;
        let mut out = Vec::new();
        for (w, row) in work.iter().zip(&rows).filter(|(w, _)| w.sample) {
            let seq = s
                .samplers
                .get_mut(&w.seq)
                .ok_or_else(|| WorkerError::InvalidArgument(format!("sequence {} has no sampling parameters", w.seq)))?;
            let Pick { token, logprob, top, rng_draws } = seq.pick(row);
            out.push(Sampled { seq: w.seq, token, logprob, top, rng_draws });
        }
        span.record("sample_ms", started.elapsed().as_secs_f64() * 1e3);
        tracing::debug!("step done");
        Ok(out)
    }

    fn release(&mut self, group: &str, seqs: &[SeqId]) -> Result<()> {
        let s = self.serving(group, "release")?;
        for seq in seqs {
            s.kv.release(*seq);
            s.samplers.remove(seq);
            s.adapters.detach(*seq);
        }
        Ok(())
    }

    fn status(&self) -> EngineStatus {
        let state = state_name(&self.state);
        match &self.state {
            State::Idle => EngineStatus { state, ..EngineStatus::default() },
            State::Assigned { assignment, .. } => {
                EngineStatus { state, group_id: assignment.group_id.clone(), tp_rank: assignment.tp_rank, ..EngineStatus::default() }
            }
            State::Serving(s) => EngineStatus {
                state,
                group_id: s.group_id.clone(),
                tp_rank: s.tp_rank,
                sequences: s.kv.num_sequences(),
                kv_tokens: s.kv.tokens() as u64,
                kv_blocks: s.kv.blocks() as u64,
                error: String::new(),
                prefix: s.kv.prefix_stats(),
                adapters: s.adapters.names(),
            },
            State::Encoding(e) => EngineStatus { state, group_id: e.group_id.clone(), ..EngineStatus::default() },
            State::Failed { group_id, error } => {
                EngineStatus { state, group_id: group_id.clone(), error: error.clone(), ..EngineStatus::default() }
            }
        }
    }
}

/// Refuses forks whose targets repeat or are also sources, as their order would then matter.
fn check_forks(kv: &KvCache, forks: &[(SeqId, SeqId)]) -> Result<()> {
    for (i, &(from, to)) in forks.iter().enumerate() {
        if forks[..i].iter().any(|&(_, t)| t == to) || forks.iter().any(|&(f, _)| f == to) {
            return Err(WorkerError::InvalidArgument(format!("fork target {to} repeats or is also a fork source")));
        }
        if kv.len(from).is_none() {
            return Err(WorkerError::InvalidArgument(format!("fork from unknown sequence {from}")));
        }
    }
    Ok(())
}

/// Refuses a step whole, before anything runs, when the blocks the KV cache would use
/// afterwards (forks sharing their source's blocks, new tokens, copies of shared blocks written
/// to; no prefix reuse assumed, which only lowers it) do not fit `capacity_tokens`. Blocks
/// cached for prefixes but unused do not count: the pool evicts them for room.
fn check_kv_room(kv: &KvCache, work: &[SeqWork], forks: &[(SeqId, SeqId)], capacity_tokens: u64) -> Result<()> {
    let capacity = capacity_tokens / tessera_model::KV_BLOCK_TOKENS as u64;
    check_forks(kv, forks)?;
    let writes: Vec<(SeqId, usize, usize)> = work.iter().map(|w| (w.seq, w.start, w.start + w.tokens.len())).collect();
    let needed = kv.blocks_after(forks, &writes)? as u64;
    if needed > capacity {
        return Err(WorkerError::KvExhausted { needed, capacity });
    }
    Ok(())
}

/// Gives each sequence the cached blocks of its longest cached prefix among the tokens it is
/// fed, and returns per sequence how many of them need no computing. Every rank sees the same
/// tokens and holds the same cache, so all reuse the same blocks.
/// Blocks are shared among sequences of one adapter (or of the base) only.
fn reuse_prefixes(kv: &mut KvCache, adapters: &Adapters, work: &[SeqWork]) -> Result<Vec<usize>> {
    let mut reused = Vec::with_capacity(work.len());
    for w in work {
        let namespace = adapters.of(w.seq).map_or(0, |a| a.identity());
        reused.push(kv.reuse_prefix_for(w.seq, w.start, &w.tokens, w.prefix_caching, namespace)?);
    }
    Ok(reused)
}

/// Gives each new sequence that names an adapter that adapter, loading it if this rank does
/// not hold it (evicted, or asked for before this group formed). Done before anything else of
/// the step changes, so a refused adapter leaves the step undone.
fn attach_adapters(s: &mut Serving, work: &[SeqWork]) -> Result<()> {
    for w in work.iter().filter(|w| w.start == 0) {
        match &w.adapter {
            Some(spec) => {
                let adapter = s.adapters.get_or_load(&s.model, &spec.name, &spec.dir)?;
                s.adapters.attach(w.seq, adapter);
            }
            None => s.adapters.detach(w.seq),
        }
    }
    Ok(())
}

/// Copies each fork's source sequence (cache and sampler) onto its target.
fn apply_forks(s: &mut Serving, forks: &[(SeqId, SeqId)]) -> Result<()> {
    for &(from, to) in forks {
        let sampling = s
            .samplers
            .get(&from)
            .cloned()
            .ok_or_else(|| WorkerError::InvalidArgument(format!("fork from sequence {from}, which has no sampler")))?;
        s.kv.fork(from, to)?;
        s.samplers.insert(to, sampling);
        s.adapters.fork(from, to);
    }
    Ok(())
}

/// Creates, changes or resumes each sequence's sampler as its work says, records what the
/// sequence is fed, and lays the step's tokens out as one batch of chunks.
fn prepare_samplers(s: &mut Serving, work: &[SeqWork], reused: &[usize]) -> (Vec<u32>, Vec<SeqChunk>) {
    let mut tokens = Vec::with_capacity(work.iter().map(|w| w.tokens.len()).sum());
    let mut chunks = Vec::with_capacity(work.len());
    for (w, &reused) in work.iter().zip(reused) {
        if let Some(params) = &w.sampling {
            match s.samplers.get_mut(&w.seq) {
                // A change mid-sequence (the coordinator's loop guard raising the
                // temperature, then restoring it) keeps the history and the random stream.
                Some(seq) => {
                    seq.sampler.set_params(params.clone());
                    seq.top_logprobs = w.top_logprobs;
                    seq.beam_candidates = w.beam_candidates;
                }
                None => {
                    let sampler = match w.resume {
                        Some((prompt_len, draws)) => Sampler::resumed(params.clone(), prompt_len, draws),
                        None => Sampler::new(params.clone()),
                    };
                    let sampling = SeqSampling { sampler, top_logprobs: w.top_logprobs, beam_candidates: w.beam_candidates };
                    s.samplers.insert(w.seq, sampling);
                }
            }
        }
        // Until a sequence has sampled, what it is fed is its prompt (possibly in chunks);
        // afterwards it is fed the tokens its sampler chose, which the sampler has recorded,
        // or, in beam search, the tokens the coordinator chose, recorded here.
        if let Some(seq) = s.samplers.get_mut(&w.seq) {
            if !seq.sampler.has_sampled() {
                seq.sampler.observe_context(w.start, &w.tokens);
            } else if seq.beam_candidates > 0 {
                seq.sampler.observe_generated(&w.tokens);
            }
        }
        // Positions whose keys and values came from the prefix cache are not computed again.
        let fed = &w.tokens[reused..];
        chunks.push(SeqChunk { seq: w.seq, start: w.start + reused, len: fed.len() });
        tokens.extend_from_slice(fed);
    }
    (tokens, chunks)
}

fn state_name(state: &State) -> &'static str {
    match state {
        State::Idle => "idle",
        State::Assigned { .. } => "assigned",
        State::Serving(_) | State::Encoding(_) => "serving",
        State::Failed { .. } => "failed",
    }
}
