//! Ring steps through the engine (two engines of one process, each a TP=1 group, their ring
//! over TCP on 127.0.0.1): penalised sampling with the whole prompt equals the model and
//! sampler run whole on one rank, and every refusal — one member out of KV capacity, a missing
//! prompt, a wrong position, members sent different steps — reaches every member, which stays
//! usable. The gRPC path and greedy parity are in `tests/tests/worker_ring.rs`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::DType;
use tessera_collective::SingleRank;
use tessera_model::fixture::{test_fixtures, write_fixture, WriteOptions};
use tessera_model::sampler::{Sampler, SamplingParams};
use tessera_model::{Batch, LoadConfig, LogitsMode, Model, SeqChunk, ZigzagLayout};
use tessera_worker::engine::{Assignment, RingMembership, RingSampling, RingSeqStep, RingWork};
use tessera_worker::{EngineConfig, EngineHandle, WorkerError};

const RING: &str = "r";

fn fixture_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("worker-ring-engine-{}", std::process::id()));
        let spec = test_fixtures().into_iter().find(|s| s.name == "llama-gqa").expect("known fixture");
        write_fixture(&spec, &root, &WriteOptions::default()).expect("write fixture")
    })
}

fn prompt(len: usize) -> Vec<u32> {
    (0..len).map(|i| 3 + (i as u32 * 37 + 11) % 300).collect()
}

fn penalised() -> SamplingParams {
    SamplingParams { temperature: 0.9, top_k: Some(40), seed: 11, repetition_penalty: 1.3, ..SamplingParams::default() }
}

fn group(member: usize) -> String {
    format!("g{member}")
}

/// Two engines serving one TP=1 group each (member `m` with `capacities[m]` KV tokens), joined
/// into ring `RING`.
async fn ring(capacities: [u64; 2]) -> Vec<EngineHandle> {
    let mut engines = Vec::new();
    let mut peers = Vec::new();
    for (m, kv_capacity_tokens) in capacities.into_iter().enumerate() {
        let engine = EngineHandle::spawn(EngineConfig {
            collective_host: "127.0.0.1".into(),
            kv_capacity_tokens,
            collective_tls: None,
            max_adapters: 8,
        })
        .expect("spawn");
        let assignment = Assignment {
            group_id: group(m),
            model_dir: fixture_dir().to_path_buf(),
            dtype: DType::F32,
            quantization: None,
            tp_rank: 0,
            tp_size: 1,
            numerics: tessera_model::Numerics::Fast,
        };
        engine.assign(assignment).await.expect("assign");
        engine.rendezvous(group(m), Vec::new()).await.expect("rendezvous");
        let membership = RingMembership { ring_id: RING.into(), member: m, members: 2 };
        peers.push(engine.prepare_ring(group(m), membership).await.expect("prepare ring"));
        engines.push(engine);
    }
    let joins = engines.iter().enumerate().map(|(m, e)| {
        let (e, peers) = (e.clone(), peers.clone());
        async move { e.join_ring(group(m), RING.into(), peers).await }
    });
    for joined in all_at_once(joins).await {
        joined.expect("join ring");
    }
    engines
}

/// Awaits every future at once (each engine blocks in the ring until all have been called).
async fn all_at_once<T>(calls: impl Iterator<Item = impl std::future::Future<Output = T> + Send + 'static>) -> Vec<T>
where
    T: Send + 'static,
{
    let handles: Vec<_> = calls.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("call task"));
    }
    out
}

/// Runs `work(m)` on every member at once; results in member order.
async fn step_all(
    engines: &[EngineHandle],
    seq: u64,
    work: impl Fn(usize) -> RingWork,
) -> Vec<Result<tessera_worker::engine::RingSampled, WorkerError>> {
    let calls = engines.iter().enumerate().map(|(m, e)| {
        let (e, step) = (e.clone(), RingSeqStep { ring_id: RING.into(), seq, work: work(m) });
        async move { e.ring_step(group(m), step).await }
    });
    all_at_once(calls).await
}

fn prefill(prompt: &[u32], member: usize, whole: bool, params: SamplingParams) -> RingWork {
    let tokens = ZigzagLayout::new(prompt.len(), 2).unwrap().local_tokens(prompt, member).unwrap();
    RingWork::Prefill {
        prompt_len: prompt.len(),
        tokens,
        prompt: whole.then(|| prompt.to_vec()),
        sampling: RingSampling { params, top_logprobs: 3, resume: None },
    }
}

fn decode(token: u32, position: usize) -> RingWork {
    RingWork::Decode { token, position, append_member: None, sampling: None }
}

/// What `Step` computes on one rank: the whole prompt, then each sampled token fed back.
fn whole_on_one_rank(prompt: &[u32], steps: usize, params: SamplingParams) -> Vec<u32> {
    let model = Model::load(fixture_dir(), &LoadConfig::default()).expect("load");
    let mut kv = model.new_kv_cache();
    let mut sampler = Sampler::new(params);
    sampler.observe_prompt(prompt);
    let (mut fed, mut start, mut out) = (prompt.to_vec(), 0, Vec::new());
    for _ in 0..=steps {
        let chunk = [SeqChunk { seq: 1, start, len: fed.len() }];
        let logits = model.forward(&Batch { tokens: &fed, chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk);
        let row: Vec<Vec<f32>> = logits.expect("forward").to_vec2().expect("logits");
        let token = sampler.sample(&row[0]);
        out.push(token);
        start += fed.len();
        fed = vec![token];
    }
    out
}

fn refusal(results: Vec<Result<tessera_worker::engine::RingSampled, WorkerError>>) -> Vec<WorkerError> {
    results.into_iter().map(|r| r.expect_err("refused")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn penalised_sampling_over_a_ring_matches_one_rank_and_refusals_reach_every_member() {
    // Member 1 can hold 32 tokens, 2 blocks: a 37-token prompt gives it 18 (24 after the decode
    // steps below), a 70-token one 35, which takes 3.
    let engines = ring([4096, 32]).await;
    let short = prompt(37);
    let long = prompt(70);

    // Out of KV capacity on member 1: it says so, member 0 says who refused; nothing is cached.
    let out_of_kv = refusal(step_all(&engines, 1, |m| prefill(&long, m, true, penalised())).await);
    assert!(matches!(out_of_kv[0], WorkerError::RingRefused { ref members } if *members == [1]), "{out_of_kv:?}");
    assert!(matches!(out_of_kv[1], WorkerError::KvExhausted { needed: 3, capacity: 2 }), "{out_of_kv:?}");

    // Penalties read the history, so the whole prompt must come along.
    let no_prompt = refusal(step_all(&engines, 1, |m| prefill(&short, m, false, penalised())).await);
    assert!(no_prompt.iter().all(|e| matches!(e, WorkerError::InvalidArgument(m) if m.contains("whole prompt"))), "{no_prompt:?}");

    let steps = 12;
    let reference = whole_on_one_rank(&short, steps, penalised());
    let first = step_all(&engines, 1, |m| prefill(&short, m, true, penalised())).await;
    let first: Vec<_> = first.into_iter().map(|r| r.expect("prefill")).collect();
    assert_eq!(first[0], first[1], "members sampled differently");
    assert_eq!(first[0].top.len(), 3);
    let mut tokens = vec![first[0].token];
    for i in 0..steps {
        let token = *tokens.last().unwrap();
        let position = short.len() + i;
        if i == 3 {
            // A wrong position is refused by both; members sent different steps refuse together.
            let wrong = refusal(step_all(&engines, 1, |_| decode(token, position + 1)).await);
            assert!(wrong.iter().all(|e| matches!(e, WorkerError::InvalidArgument(m) if m.contains("position"))), "{wrong:?}");
            let differ = refusal(step_all(&engines, 1, |m| decode(token ^ m as u32, position)).await);
            assert!(differ.iter().all(|e| matches!(e, WorkerError::InvalidArgument(m) if m.contains("different steps"))), "{differ:?}");
        }
        let sampled = step_all(&engines, 1, |_| decode(token, position)).await;
        let sampled: Vec<_> = sampled.into_iter().map(|r| r.expect("decode")).collect();
        assert_eq!(sampled[0], sampled[1], "members sampled differently at step {i}");
        tokens.push(sampled[0].token);
    }
    assert_eq!(tokens, reference, "penalised sampling over the ring differs from one rank");

    // Leaving releases the sequence on both members.
    for (m, e) in engines.iter().enumerate() {
        assert_eq!(e.leave_ring(group(m), RING.into()).await.expect("leave"), vec![1]);
        let status = e.status().await.expect("status");
        assert_eq!((status.state, status.kv_tokens), ("serving", 0));
    }
}
