//! Two `tessera worker` processes driven over gRPC, as the coordinator drives them: assign,
//! rendezvous, lockstep steps, release. Greedy tokens equal the in-process TP=1 reference.

use std::path::PathBuf;

use futures::future::join_all;
use tessera_collective::SingleRank;
use tessera_model::fixture::{prompt_ids, test_fixtures, write_fixture, WriteOptions};
use tessera_model::{LoadConfig, Model};
use tessera_proto::worker as pb;
use tessera_proto::worker::worker_client::WorkerClient;
use tessera_tests::{greedy_trace, spawn_worker};
use tonic::Code;

type Client = WorkerClient<tonic::transport::Channel>;

async fn connect(addr: std::net::SocketAddr) -> Client {
    WorkerClient::connect(format!("http://{addr}")).await.expect("connect worker")
}

fn step(group: &str, step: u64, seqs: Vec<pb::SeqStep>) -> pb::StepRequest {
    pb::StepRequest { group_id: group.into(), step, seqs, forks: Vec::new() }
}

/// Runs one lockstep step on every rank and checks they agree.
async fn lockstep(clients: &mut [Client], req: pb::StepRequest) -> Result<Vec<pb::SampledToken>, tonic::Status> {
    let calls = clients.iter_mut().map(|c| {
        let req = req.clone();
        async move { c.step(req).await.map(|r| r.into_inner().tokens) }
    });
    // Every call must be in flight at once: a rank blocks in its collective until its peers arrive.
    let results = join_all(calls).await;
    let mut first: Option<Vec<pb::SampledToken>> = None;
    for r in results {
        let tokens = r?;
        match &first {
            None => first = Some(tokens),
            Some(f) => assert_eq!(f, &tokens, "ranks sampled different tokens"),
        }
    }
    Ok(first.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_worker_processes_serve_a_tp2_group() {
    let spec = test_fixtures().into_iter().find(|s| s.name == "llama-gqa").unwrap();
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("worker-grpc-{}", std::process::id()));
    let dir = write_fixture(&spec, &root, &WriteOptions::default()).unwrap();
    let prompt = prompt_ids(&spec);
    let steps = 16;
    let reference = greedy_trace(&Model::load(&dir, &LoadConfig::default()).unwrap(), &mut SingleRank, &prompt, steps).unwrap();

    let (_w0, a0) = spawn_worker(&["--kv-capacity-tokens", "4096"]).unwrap();
    let (_w1, a1) = spawn_worker(&["--kv-capacity-tokens", "4096"]).unwrap();
    let mut clients = vec![connect(a0).await, connect(a1).await];
    let group = "g0";

    let mut peers = Vec::new();
    for (rank, c) in clients.iter_mut().enumerate() {
        let r = c
            .assign(pb::AssignRequest {
                group_id: group.into(),
                model_dir: dir.display().to_string(),
                dtype: "f32".into(),
                tp_rank: rank as u32,
                tp_size: 2,
                batch_invariant: false,
            })
            .await
            .unwrap()
            .into_inner();
        peers.push(r.collective_address);
    }
    let rv = clients.iter_mut().map(|c| {
        let req = pb::RendezvousRequest { group_id: group.into(), peers: peers.clone() };
        async move { c.rendezvous(req).await }
    });
    for r in join_all(rv).await {
        r.expect("rendezvous");
    }

    // Prefill (sampled), then greedy decode steps.
    let sampling = pb::Sampling { temperature: 0.0, top_k: 0, top_p: None, seed: 0, ..Default::default() };
    let first = lockstep(
        &mut clients,
        step(
            group,
            0,
            vec![pb::SeqStep {
                seq_id: 42,
                start: 0,
                tokens: prompt.clone(),
                sampling: Some(sampling.clone()),
                sample: true,
                no_prefix_cache: false,
                adapter: None,
            }],
        ),
    )
    .await
    .unwrap();
    assert_eq!(first.len(), 1);
    let mut greedy = vec![first[0].token];
    assert!(first[0].logprob <= 0.0 && first[0].logprob.is_finite());
    for i in 0..steps - 1 {
        let seq = pb::SeqStep {
            seq_id: 42,
            start: (prompt.len() + i) as u32,
            tokens: vec![*greedy.last().unwrap()],
            sampling: None,
            sample: true,
            no_prefix_cache: false,
            adapter: None,
        };
        let t = lockstep(&mut clients, step(group, 1 + i as u64, vec![seq])).await.unwrap();
        greedy.push(t[0].token);
    }
    assert_eq!(greedy, reference.greedy, "TP=2 over worker processes differs from in-process TP=1");

    // Status shows the sequence on both ranks; release frees it everywhere.
    for c in clients.iter_mut() {
        let s = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
        assert_eq!((s.state.as_str(), s.sequences, s.kv_tokens), ("serving", 1, (prompt.len() + steps - 1) as u64));
    }
    for c in clients.iter_mut() {
        c.release(pb::ReleaseRequest { group_id: group.into(), seq_ids: vec![42] }).await.unwrap();
        let s = c.status(pb::StatusRequest {}).await.unwrap().into_inner();
        assert_eq!((s.sequences, s.kv_tokens), (0, 0));
    }

    // Bad input is refused with a clear code and the group keeps serving.
    let bad = lockstep(
        &mut clients,
        step(
            group,
            99,
            vec![pb::SeqStep {
                seq_id: 7,
                start: 0,
                tokens: vec![1, 100_000],
                sampling: Some(sampling.clone()),
                sample: true,
                no_prefix_cache: false,
                adapter: None,
            }],
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("100000"), "{bad:?}");
    let too_long = lockstep(
        &mut clients,
        step(
            group,
            100,
            vec![pb::SeqStep {
                seq_id: 8,
                start: 0,
                tokens: vec![5; 5000],
                sampling: Some(sampling.clone()),
                sample: true,
                no_prefix_cache: false,
                adapter: None,
            }],
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(too_long.code(), Code::ResourceExhausted, "{too_long:?}");
    let ok = lockstep(
        &mut clients,
        step(
            group,
            101,
            vec![pb::SeqStep {
                seq_id: 9,
                start: 0,
                tokens: prompt.clone(),
                sampling: Some(sampling.clone()),
                sample: true,
                no_prefix_cache: false,
                adapter: None,
            }],
        ),
    )
    .await
    .unwrap();
    assert_eq!(ok[0].token, reference.greedy[0]);
}
