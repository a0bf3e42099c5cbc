//! LoRA adapters on one worker: loading checks them against the model, a worker holds at most
//! `max_adapters` (the least recently used goes, and is read again when a sequence names it),
//! cached prefix blocks are shared within one adapter only, and unloading an adapter leaves the
//! sequences running with it untouched.

use std::path::{Path, PathBuf};

use tessera_model::fixture::{demo, write_fixture, write_lora, LoraSpec, WriteOptions};
use tessera_proto::worker as pb;
use tessera_proto::worker::worker_server::Worker;
use tessera_worker::engine::{EngineConfig, EngineHandle};
use tessera_worker::service::WorkerService;
use tonic::{Code, Request};

const GROUP: &str = "g-lora";

struct Served {
    worker: WorkerService,
    adapters: Vec<PathBuf>,
    _root: tempfile::TempDir,
}

/// A worker serving the demo model alone, holding at most two adapters, and three random
/// adapters for it (alpha large enough that each changes the greedy tokens).
async fn serving() -> Served {
    let root = tempfile::tempdir().expect("temp dir");
    let spec = demo();
    let dir = write_fixture(&spec, root.path(), &WriteOptions::default()).expect("write the demo model");
    let adapters = (0..3)
        .map(|i| {
            let lora = LoraSpec { rank: 8, alpha: 2048.0, targets: tessera_model::LORA_TARGETS.to_vec(), seed: 7 + i };
            write_lora(&spec.config, &lora, &root.path().join(format!("lora-{i}"))).expect("write an adapter")
        })
        .collect();
    let config = EngineConfig { collective_host: "127.0.0.1".into(), kv_capacity_tokens: 4096, collective_tls: None, max_adapters: 2 };
    let engine = EngineHandle::spawn(config.clone()).expect("spawn the engine thread");
    let worker = WorkerService::new("w-lora".into(), engine, config);
    let assign = pb::AssignRequest {
        group_id: GROUP.into(),
        model_dir: dir.display().to_string(),
        dtype: "f32".into(),
        tp_rank: 0,
        tp_size: 1,
        batch_invariant: false,
    };
    worker.assign(Request::new(assign)).await.expect("assign");
    worker.rendezvous(Request::new(pb::RendezvousRequest { group_id: GROUP.into(), peers: Vec::new() })).await.expect("rendezvous");
    Served { worker, adapters, _root: root }
}

fn adapter(name: &str, dir: &Path) -> pb::AdapterRef {
    pb::AdapterRef { name: name.into(), dir: dir.display().to_string() }
}

async fn step(w: &WorkerService, seqs: Vec<pb::SeqStep>) -> Vec<pb::SampledToken> {
    let request = pb::StepRequest { group_id: GROUP.into(), step: 0, seqs, forks: Vec::new() };
    w.step(Request::new(request)).await.expect("step").into_inner().tokens
}

async fn status(w: &WorkerService) -> pb::StatusResponse {
    w.status(Request::new(pb::StatusRequest {})).await.expect("status").into_inner()
}

fn prompt() -> Vec<u32> {
    (0..40).map(|i| (i * 37 + 5) % 200).collect()
}

/// Prefill as `seq` with `lora`, then decode to `n` tokens; the sequence is released after.
async fn greedy(w: &WorkerService, seq: u64, lora: Option<pb::AdapterRef>, n: usize) -> Vec<u32> {
    let p = prompt();
    let first = pb::SeqStep {
        seq_id: seq,
        start: 0,
        tokens: p.clone(),
        sampling: Some(pb::Sampling::default()),
        sample: true,
        no_prefix_cache: false,
        adapter: lora,
    };
    let mut out = vec![step(w, vec![first]).await[0].token];
    while out.len() < n {
        let pos = (p.len() + out.len() - 1) as u32;
        let next = pb::SeqStep { seq_id: seq, start: pos, tokens: vec![out[out.len() - 1]], sample: true, ..Default::default() };
        out.push(step(w, vec![next]).await[0].token);
    }
    release(w, seq).await;
    out
}

async fn release(w: &WorkerService, seq: u64) {
    w.release(Request::new(pb::ReleaseRequest { group_id: GROUP.into(), seq_ids: vec![seq] })).await.expect("release");
}

#[tokio::test]
async fn prefix_blocks_are_shared_within_one_adapter_only() {
    let s = serving().await;
    let a = adapter("a", &s.adapters[0]);
    let with_a = greedy(&s.worker, 1, Some(a.clone()), 8).await;
    assert_eq!(status(&s.worker).await.prefix_hits, 0);
    let base = greedy(&s.worker, 2, None, 8).await;
    assert_ne!(base, with_a, "the adapter changes the tokens");
    assert_eq!(status(&s.worker).await.prefix_hits, 0, "the base found none of the adapter's blocks");
    let b = greedy(&s.worker, 3, Some(adapter("b", &s.adapters[1])), 8).await;
    assert_ne!(b, with_a);
    assert_eq!(status(&s.worker).await.prefix_hits, 0, "another adapter found none of them either");
    let again = greedy(&s.worker, 4, Some(a), 8).await;
    let st = status(&s.worker).await;
    assert_eq!((st.prefix_hits, st.prefix_hit_tokens), (1, 32), "the same adapter reuses its two full blocks");
    assert_eq!(again, with_a, "and gives the same tokens");
}

#[tokio::test]
async fn a_worker_holds_at_most_its_bound_and_reads_an_evicted_adapter_again() {
    let s = serving().await;
    let load = |name: &str, i: usize| pb::LoadAdapterRequest { group_id: GROUP.into(), adapter: Some(adapter(name, &s.adapters[i])) };
    for (name, i) in [("a", 0), ("b", 1), ("c", 2)] {
        let bytes = s.worker.load_adapter(Request::new(load(name, i))).await.expect("load").into_inner().bytes;
        assert!(bytes > 0);
    }
    assert_eq!(status(&s.worker).await.adapters, ["b", "c"], "two held, the least recently used gone");
    // A sequence naming the evicted adapter reads it again; it is then the most recent.
    let with_a = greedy(&s.worker, 1, Some(adapter("a", &s.adapters[0])), 4).await;
    assert_eq!(status(&s.worker).await.adapters, ["c", "a"]);
    let fresh = serving().await;
    assert_eq!(greedy(&fresh.worker, 1, Some(adapter("a", &fresh.adapters[0])), 4).await, with_a, "read again, it computes the same");

    // One that does not fit, and one that is not there, are refused with the reason.
    let other = demo_sized_differently(&s);
    let misfit =
        s.worker.load_adapter(Request::new(pb::LoadAdapterRequest { group_id: GROUP.into(), adapter: Some(adapter("x", &other)) })).await;
    let misfit = misfit.expect_err("a misfit");
    assert_eq!(misfit.code(), Code::InvalidArgument);
    assert!(misfit.message().contains("expected ["), "{}", misfit.message());
    let missing = s
        .worker
        .load_adapter(Request::new(pb::LoadAdapterRequest {
            group_id: GROUP.into(),
            adapter: Some(adapter("y", Path::new("/nonexistent"))),
        }))
        .await;
    let missing = missing.expect_err("no such directory");
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert!(missing.message().contains("adapter_config.json"), "{}", missing.message());
    assert_eq!(status(&s.worker).await.adapters, ["c", "a"], "refused adapters take no place");
}

/// An adapter written for a model twice as wide as the demo.
fn demo_sized_differently(s: &Served) -> PathBuf {
    let mut config = demo().config;
    config["hidden_size"] = 256.into();
    let dir = s.adapters[0].with_file_name("wide");
    let lora = LoraSpec { rank: 8, alpha: 16.0, targets: vec!["q_proj"], seed: 1 };
    write_lora(&config, &lora, &dir).expect("write")
}

#[tokio::test]
async fn unloading_an_adapter_leaves_its_running_sequences_alone() {
    let s = serving().await;
    let a = adapter("a", &s.adapters[0]);
    let reference = greedy(&s.worker, 1, Some(a.clone()), 12).await;

    // Half-way through a sequence, the adapter is unloaded and two others take the places.
    let p = prompt();
    let first = pb::SeqStep {
        seq_id: 2,
        start: 0,
        tokens: p.clone(),
        sampling: Some(pb::Sampling::default()),
        sample: true,
        no_prefix_cache: true,
        adapter: Some(a),
    };
    let mut out = vec![step(&s.worker, vec![first]).await[0].token];
    while out.len() < reference.len() {
        if out.len() == 6 {
            s.worker
                .unload_adapter(Request::new(pb::UnloadAdapterRequest { group_id: GROUP.into(), name: "a".into() }))
                .await
                .expect("unload");
            for (name, i) in [("b", 1), ("c", 2)] {
                let load = pb::LoadAdapterRequest { group_id: GROUP.into(), adapter: Some(adapter(name, &s.adapters[i])) };
                s.worker.load_adapter(Request::new(load)).await.expect("load");
            }
            assert_eq!(status(&s.worker).await.adapters, ["b", "c"], "a is no longer held");
        }
        let pos = (p.len() + out.len() - 1) as u32;
        let next = pb::SeqStep { seq_id: 2, start: pos, tokens: vec![out[out.len() - 1]], sample: true, ..Default::default() };
        out.push(step(&s.worker, vec![next]).await[0].token);
    }
    assert_eq!(out, reference, "the running sequence kept its adapter");
}
