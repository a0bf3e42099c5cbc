//! KV memory in blocks on one worker: what a step may hold is counted in 16-token blocks and
//! refused whole when it does not fit; a sequence recomputed after preemption (`Resume`)
//! samples exactly what it would have sampled; each step is a tracing span with its timings.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tessera_model::fixture::{demo, write_fixture, WriteOptions};
use tessera_proto::worker as pb;
use tessera_proto::worker::worker_server::Worker;
use tessera_worker::engine::{EngineConfig, EngineHandle};
use tessera_worker::service::WorkerService;
use tonic::{Code, Request};

async fn serving(group: &str, kv_capacity_tokens: u64) -> (WorkerService, tempfile::TempDir) {
    let root = tempfile::tempdir().expect("temp dir");
    let dir = write_fixture(&demo(), root.path(), &WriteOptions::default()).expect("write the demo model");
    let config = EngineConfig { collective_host: "127.0.0.1".into(), kv_capacity_tokens, collective_tls: None, max_adapters: 8 };
    let engine = EngineHandle::spawn(config.clone()).expect("spawn the engine thread");
    let service = WorkerService::new(format!("w-{group}"), engine, config);
    let assign = pb::AssignRequest {
        group_id: group.into(),
        model_dir: dir.display().to_string(),
        dtype: "f32".into(),
        tp_rank: 0,
        tp_size: 1,
        batch_invariant: false,
    };
    service.assign(Request::new(assign)).await.expect("assign");
    service.rendezvous(Request::new(pb::RendezvousRequest { group_id: group.into(), peers: Vec::new() })).await.expect("rendezvous");
    (service, root)
}

fn seq_step(seq_id: u64, start: u32, tokens: Vec<u32>, sampling: Option<pb::Sampling>) -> pb::SeqStep {
    pb::SeqStep { seq_id, start, tokens, sampling, sample: true, no_prefix_cache: false, adapter: None }
}

async fn step(service: &WorkerService, group: &str, seqs: Vec<pb::SeqStep>) -> Result<Vec<pb::SampledToken>, tonic::Status> {
    let request = pb::StepRequest { group_id: group.into(), step: 0, seqs, forks: Vec::new() };
    Ok(service.step(Request::new(request)).await?.into_inner().tokens)
}

async fn blocks(service: &WorkerService) -> (u64, u64, u64) {
    let s = service.status(Request::new(pb::StatusRequest {})).await.expect("status").into_inner();
    (s.kv_tokens, s.kv_blocks, s.kv_capacity_blocks)
}

fn prompt(len: u32, salt: u32) -> Vec<u32> {
    (0..len).map(|i| (i * 37 + salt * 11 + 5) % 200).collect()
}

#[tokio::test]
async fn kv_memory_is_counted_and_refused_in_blocks() {
    let (w, _dir) = serving("g-blocks", 64).await;
    assert_eq!(blocks(&w).await, (0, 0, 4), "64 tokens are 4 blocks of 16");

    // 17 tokens take two blocks; decoding to 32 tokens stays in them, the 33rd takes a third.
    let greedy = pb::Sampling::default();
    let mut next = step(&w, "g-blocks", vec![seq_step(1, 0, prompt(17, 1), Some(greedy))]).await.expect("prefill")[0].token;
    assert_eq!(blocks(&w).await, (17, 2, 4));
    for pos in 17..32 {
        next = step(&w, "g-blocks", vec![seq_step(1, pos, vec![next], None)]).await.expect("decode")[0].token;
    }
    assert_eq!(blocks(&w).await, (32, 2, 4), "a sequence grows a block at a time, when the last one is full");
    step(&w, "g-blocks", vec![seq_step(1, 32, vec![next], None)]).await.expect("decode into a third block");
    assert_eq!(blocks(&w).await, (33, 3, 4));

    // A 17-token sequence needs two more blocks; one is free. The step is refused whole, before
    // anything runs, and names the limit.
    let refused = step(&w, "g-blocks", vec![seq_step(2, 0, prompt(17, 2), Some(pb::Sampling::default()))])
        .await
        .expect_err("two blocks do not fit in one");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("5 blocks of 16 tokens needed, capacity 4 blocks"), "{}", refused.message());
    assert_eq!(blocks(&w).await, (33, 3, 4), "a refused step holds nothing");

    // 16 tokens fit in the last block exactly.
    step(&w, "g-blocks", vec![seq_step(2, 0, prompt(16, 2), Some(pb::Sampling::default()))]).await.expect("one block fits");
    assert_eq!(blocks(&w).await, (49, 4, 4));
    w.release(Request::new(pb::ReleaseRequest { group_id: "g-blocks".into(), seq_ids: vec![1, 2] })).await.expect("release");
    assert_eq!(blocks(&w).await, (0, 0, 4), "release frees every block");
}

async fn status(service: &WorkerService) -> pb::StatusResponse {
    service.status(Request::new(pb::StatusRequest {})).await.expect("status").into_inner()
}

/// Greedy: prefill `p` as sequence `seq` (opting out of the prefix cache if `private`), then
/// decode until `n` tokens; returns them.
async fn greedy(w: &WorkerService, group: &str, seq: u64, p: &[u32], n: usize, private: bool) -> Vec<u32> {
    let first = pb::SeqStep { no_prefix_cache: private, ..seq_step(seq, 0, p.to_vec(), Some(pb::Sampling::default())) };
    let mut out = vec![step(w, group, vec![first]).await.expect("prefill")[0].token];
    while out.len() < n {
        let pos = (p.len() + out.len() - 1) as u32;
        out.push(step(w, group, vec![seq_step(seq, pos, vec![out[out.len() - 1]], None)]).await.expect("decode")[0].token);
    }
    out
}

#[tokio::test]
async fn a_cached_prefix_is_reused_counted_and_gives_the_same_tokens() {
    let group = "g-prefix";
    let (w, _dir) = serving(group, 4096).await;
    let p = prompt(50, 6);
    let first = greedy(&w, group, 1, &p, 8, false).await;
    let s = status(&w).await;
    assert_eq!((s.prefix_hits, s.prefix_cached_blocks), (0, 3), "a first run reuses nothing and names its 3 full blocks");
    w.release(Request::new(pb::ReleaseRequest { group_id: group.into(), seq_ids: vec![1] })).await.expect("release");
    let s = status(&w).await;
    assert_eq!((s.kv_blocks, s.prefix_unused_blocks), (0, 3), "released: no block in use, 3 waiting in the cache");

    // The same prompt again: its 3 full blocks (48 tokens) come from the cache, the last 2
    // tokens are computed, and the tokens are the same.
    assert_eq!(greedy(&w, group, 2, &p, 8, false).await, first);
    let s = status(&w).await;
    assert_eq!((s.prefix_hits, s.prefix_hit_tokens), (1, 48));
    assert_eq!(s.kv_tokens, 57, "the reused tokens count as the sequence's own");

    // A sequence that opts out computes everything beside it, with the same result.
    assert_eq!(greedy(&w, group, 3, &p, 8, true).await, first);
    assert_eq!(status(&w).await.prefix_hits, 1, "the private sequence looked nothing up");
    assert_eq!(status(&w).await.kv_blocks, 8, "4 blocks each: the shared blocks once, the private copy's own");

    // A new sequence refused by the model (a token outside the vocabulary) after taking the
    // cached blocks of its prefix gives them back.
    let bad = [&p[..49], &[1_000_000]].concat();
    let refused = step(&w, group, vec![seq_step(4, 0, bad, Some(pb::Sampling::default()))]).await.expect_err("bad token");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let s = status(&w).await;
    assert_eq!((s.sequences, s.kv_blocks, s.prefix_hits), (2, 8, 2), "looked up, then given back");
}

#[tokio::test]
async fn unused_cached_blocks_give_way_and_never_cause_a_refusal() {
    let group = "g-evict";
    let (w, _dir) = serving(group, 64).await;
    // 40 tokens: two full blocks named, kept after the release.
    greedy(&w, group, 1, &prompt(40, 7), 1, false).await;
    w.release(Request::new(pb::ReleaseRequest { group_id: group.into(), seq_ids: vec![1] })).await.expect("release");
    assert_eq!(status(&w).await.prefix_unused_blocks, 2);
    // Another 60-token prompt needs all 4 blocks: the cached ones are evicted for it.
    greedy(&w, group, 2, &prompt(60, 8), 3, false).await;
    let s = status(&w).await;
    assert_eq!((s.kv_blocks, s.prefix_evictions), (4, 2));
}

#[tokio::test]
async fn a_resumed_sequence_samples_what_it_would_have_sampled() {
    let (w, _dir) = serving("g-resume", 4096).await;
    let sampling = pb::Sampling {
        temperature: 1.3,
        top_k: 50,
        seed: 77,
        presence_penalty: 0.8,
        frequency_penalty: 0.4,
        repetition_penalty: 1.2,
        ..Default::default()
    };
    let p = prompt(23, 3);
    // Uninterrupted: 12 tokens.
    let mut outputs = Vec::new();
    let mut draws = Vec::new();
    let mut t = step(&w, "g-resume", vec![seq_step(1, 0, p.clone(), Some(sampling.clone()))]).await.expect("prefill")[0].clone();
    for i in 0..12u32 {
        outputs.push(t.token);
        draws.push(t.rng_draws);
        if i < 11 {
            t = step(&w, "g-resume", vec![seq_step(1, 23 + i, vec![t.token], None)]).await.expect("decode")[0].clone();
        }
    }
    assert_eq!(draws[5], 6, "one random draw per token at temperature > 0");
    assert!(outputs.iter().collect::<std::collections::HashSet<_>>().len() > 3, "the run samples, not repeats: {outputs:?}");

    // Preempted after 6 tokens: the prompt and those 6 are prefilled again (in two chunks, as a
    // chunked prefill would), with the sampler resumed after its 6 draws.
    let resume = pb::Resume { prompt_len: 23, rng_draws: draws[5] };
    let fed: Vec<u32> = p.iter().chain(&outputs[..6]).copied().collect();
    let first =
        pb::SeqStep { sample: false, ..seq_step(2, 0, fed[..20].to_vec(), Some(pb::Sampling { resume: Some(resume), ..sampling })) };
    step(&w, "g-resume", vec![first]).await.expect("first chunk");
    let mut t = step(&w, "g-resume", vec![seq_step(2, 20, fed[20..].to_vec(), None)]).await.expect("last chunk")[0].clone();
    let mut again = Vec::new();
    for i in 0..6u32 {
        again.push(t.token);
        if i < 5 {
            t = step(&w, "g-resume", vec![seq_step(2, 29 + i, vec![t.token], None)]).await.expect("decode")[0].clone();
        }
    }
    assert_eq!(again, outputs[6..], "same tokens as the uninterrupted run");
}

/// A `MakeWriter` into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn every_step_is_a_span_with_its_timings() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    // The engine runs on its own thread, so the subscriber must be the process's.
    tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber of this test binary");
    let (w, _dir) = serving("g-spans", 4096).await;
    step(&w, "g-spans", vec![seq_step(1, 0, prompt(9, 4), Some(pb::Sampling::default()))]).await.expect("step");
    let text = String::from_utf8(captured.0.lock().expect("buffer").clone()).expect("utf-8 log");
    let line = text
        .lines()
        .find(|l| l.contains("step{group=\"g-spans\"") && l.contains("close"))
        .unwrap_or_else(|| panic!("no step span in:\n{text}"));
    for field in ["seqs=1", "tokens=9", "kv_blocks=1", "forward_ms=", "sample_ms=", "time.busy="] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
}
