//! Sequence-parallel rings of `tessera worker` processes, formed and driven over gRPC as a
//! coordinator would: every worker is its own TP=1 group; `PrepareRing` binds each ring
//! endpoint, `JoinRing` connects them, `RingStep` runs a prefill (each member sent its zigzag
//! share) and greedy decode steps. The tokens equal what one worker produces with plain `Step`s,
//! the sequence's KV cache is split over the members, and bad ring calls are refused with clear
//! codes without hanging the ring.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use futures::future::join_all;
use tessera_model::fixture::{test_fixtures, write_fixture, WriteOptions};
use tessera_model::sampler::SeededRng;
use tessera_model::ZigzagLayout;
use tessera_proto::worker as pb;
use tessera_proto::worker::ring_step_request::Step as RingWork;
use tessera_proto::worker::worker_client::WorkerClient;
use tessera_tests::{spawn_worker, ChildGuard};
use tonic::Code;

type Client = WorkerClient<tonic::transport::Channel>;

const PROMPT_LEN: usize = 37;
/// Decode steps after the prefill: the sequence ends with `PROMPT_LEN + STEPS` cached tokens
/// and `STEPS + 1` sampled ones.
const STEPS: usize = 16;
const SEQ: u64 = 42;
/// A ring call that takes longer has hung: fail instead of waiting forever.
const PATIENCE: Duration = Duration::from_secs(120);

fn fixture_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("worker-ring-{}", std::process::id()));
        let spec = test_fixtures().into_iter().find(|s| s.name == "llama-gqa").expect("known fixture");
        write_fixture(&spec, &root, &WriteOptions::default()).expect("write fixture")
    })
}

fn prompt() -> Vec<u32> {
    let mut rng = SeededRng::new(37);
    (0..PROMPT_LEN).map(|_| 3 + (rng.next_u64() % 317) as u32).collect()
}

fn greedy() -> pb::Sampling {
    pb::Sampling { temperature: 0.0, ..Default::default() }
}

fn group(member: usize) -> String {
    format!("g{member}")
}

/// A worker process serving `group` as a TP=1 group of the fixture model.
async fn serving_worker(group: &str) -> (ChildGuard, Client) {
    let (process, addr): (ChildGuard, SocketAddr) = spawn_worker(&["--kv-capacity-tokens", "4096"]).expect("start worker");
    let mut client = WorkerClient::connect(format!("http://{addr}")).await.expect("connect worker");
    let assign = pb::AssignRequest {
        group_id: group.into(),
        model_dir: fixture_dir().display().to_string(),
        dtype: "f32".into(),
        tp_rank: 0,
        tp_size: 1,
        batch_invariant: false,
    };
    client.assign(assign).await.expect("assign");
    client.rendezvous(pb::RendezvousRequest { group_id: group.into(), peers: Vec::new() }).await.expect("rendezvous");
    (process, client)
}

/// Greedy tokens of `prompt` and `STEPS` decode steps on one worker with plain `Step`s.
async fn plain_greedy(client: &mut Client, group: &str, prompt: &[u32]) -> Vec<u32> {
    let mut tokens = Vec::with_capacity(STEPS + 1);
    let mut seq = pb::SeqStep {
        seq_id: 7,
        start: 0,
        tokens: prompt.to_vec(),
        sampling: Some(greedy()),
        sample: true,
        no_prefix_cache: false,
        adapter: None,
    };
    for i in 0..=STEPS {
        let req = pb::StepRequest { group_id: group.into(), step: i as u64, seqs: vec![seq.clone()], ..Default::default() };
        let sampled = client.step(req).await.expect("plain step").into_inner().tokens;
        assert_eq!(sampled.len(), 1);
        tokens.push(sampled[0].token);
        seq = pb::SeqStep {
            seq_id: 7,
            start: (prompt.len() + i) as u32,
            tokens: vec![sampled[0].token],
            sampling: None,
            sample: true,
            no_prefix_cache: false,
            adapter: None,
        };
    }
    client.release(pb::ReleaseRequest { group_id: group.into(), seq_ids: vec![7] }).await.expect("release");
    tokens
}

/// Runs one call per member at once (every member blocks in the ring until all have called)
/// and returns the results in member order.
async fn on_all<T, F, Fut>(clients: &[Client], call: F) -> Vec<Result<T, tonic::Status>>
where
    F: Fn(usize, Client) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let calls = clients.iter().enumerate().map(|(m, c)| call(m, c.clone()));
    let results = tokio::time::timeout(PATIENCE, join_all(calls)).await.expect("the ring answered in time");
    results.into_iter().map(|r| r.map(tonic::Response::into_inner)).collect()
}

fn ring_step(member: usize, seq: u64, work: RingWork) -> pb::RingStepRequest {
    pb::RingStepRequest { group_id: group(member), ring_id: "ring-a".into(), seq_id: seq, step: Some(work) }
}

fn prefill(prompt: &[u32], members: usize, member: usize) -> RingWork {
    let share = ZigzagLayout::new(prompt.len(), members).unwrap().local_tokens(prompt, member).unwrap();
    RingWork::Prefill(pb::RingPrefill { prompt_len: prompt.len() as u32, tokens: share, sampling: Some(greedy()), prompt: Vec::new() })
}

/// The token every member sampled; they must agree.
fn agreed(results: Vec<Result<pb::RingStepResponse, tonic::Status>>) -> u32 {
    let answers: Vec<pb::RingStepResponse> = results.into_iter().map(|r| r.expect("ring step")).collect();
    assert!(answers.iter().all(|a| a == &answers[0]), "members sampled differently: {answers:?}");
    assert!(answers[0].logprob <= 0.0 && answers[0].logprob.is_finite(), "{answers:?}");
    answers[0].token
}

async fn kv_tokens(clients: &mut [Client]) -> Vec<u64> {
    let mut held = Vec::with_capacity(clients.len());
    for c in clients.iter_mut() {
        let s = c.status(pb::StatusRequest {}).await.expect("status").into_inner();
        assert_eq!(s.state, "serving", "{s:?}");
        held.push(s.kv_tokens);
    }
    held
}

/// Forms ring "ring-a" of `members` single-worker groups, checks the refusals on the way, then
/// prefills and decodes one sequence over it. Returns the workers (kept alive) and clients.
async fn ring_matches_a_single_worker(members: usize) -> (Vec<ChildGuard>, Vec<Client>) {
    let prompt = prompt();
    let mut processes = Vec::with_capacity(members);
    let mut clients = Vec::with_capacity(members);
    for m in 0..members {
        let (process, client) = serving_worker(&group(m)).await;
        processes.push(process);
        clients.push(client);
    }
    let reference = plain_greedy(&mut clients[0], &group(0), &prompt).await;

    // A ring of one and a member past the end are refused; nothing is bound.
    let prepare =
        |m: usize, member: u32, members: u32| pb::PrepareRingRequest { group_id: group(m), ring_id: "ring-a".into(), member, members };
    let single = clients[0].prepare_ring(prepare(0, 0, 1)).await.expect_err("ring of one");
    assert_eq!(single.code(), Code::InvalidArgument, "{single:?}");
    let past = clients[0].prepare_ring(prepare(0, members as u32, members as u32)).await.expect_err("member past the end");
    assert_eq!(past.code(), Code::InvalidArgument, "{past:?}");

    let mut peers = Vec::with_capacity(members);
    for (m, c) in clients.iter_mut().enumerate() {
        let bound = c.prepare_ring(prepare(m, m as u32, members as u32)).await.expect("prepare ring").into_inner();
        peers.push(bound.ring_address);
    }
    // A retried prepare gets the same endpoint; another ring is refused while this one is held.
    let again = clients[0].prepare_ring(prepare(0, 0, members as u32)).await.expect("retried prepare").into_inner();
    assert_eq!(again.ring_address, peers[0]);
    let other = pb::PrepareRingRequest { ring_id: "ring-b".into(), ..prepare(0, 0, members as u32) };
    let busy = clients[0].prepare_ring(other).await.expect_err("a second ring");
    assert_eq!(busy.code(), Code::FailedPrecondition, "{busy:?}");

    // A peer list of the wrong length is refused and leaves the ring prepared.
    let join = |m: usize, peers: Vec<String>| pb::JoinRingRequest { group_id: group(m), ring_id: "ring-a".into(), peers };
    let short = clients[0].join_ring(join(0, peers[..members - 1].to_vec())).await.expect_err("short peer list");
    assert_eq!(short.code(), Code::InvalidArgument, "{short:?}");
    assert!(short.message().contains("peers"), "{short:?}");
    for r in on_all(&clients, |m, mut c| {
        let req = join(m, peers.clone());
        async move { c.join_ring(req).await }
    })
    .await
    {
        r.expect("join ring");
    }

    // A step of an unknown ring is refused by the one worker it reaches, before any collective.
    let mut unknown = ring_step(0, SEQ, prefill(&prompt, members, 0));
    unknown.ring_id = "ring-z".into();
    let unknown = clients[0].ring_step(unknown).await.expect_err("unknown ring");
    assert_eq!(unknown.code(), Code::FailedPrecondition, "{unknown:?}");

    // A share that is not the member's zigzag share: that member refuses it, the others learn
    // of it and refuse too, and the ring is unharmed.
    let bad = on_all(&clients, |m, mut c| {
        let mut req = ring_step(m, SEQ, prefill(&prompt, members, m));
        if let (1, Some(RingWork::Prefill(p))) = (m, req.step.as_mut()) {
            p.tokens.pop();
        }
        async move { c.ring_step(req).await }
    })
    .await;
    for (m, r) in bad.into_iter().enumerate() {
        let e = r.expect_err("a bad share refuses the step everywhere");
        let want = if m == 1 { Code::InvalidArgument } else { Code::Aborted };
        assert_eq!(e.code(), want, "member {m}: {e:?}");
    }
    assert_eq!(kv_tokens(&mut clients).await, vec![0; members], "a refused step caches nothing");

    // Prefill, then greedy decode steps: the tokens of a single worker.
    let first = agreed(
        on_all(&clients, |m, mut c| {
            let req = ring_step(m, SEQ, prefill(&prompt, members, m));
            async move { c.ring_step(req).await }
        })
        .await,
    );
    let mut tokens = vec![first];
    for i in 0..STEPS {
        let token = *tokens.last().unwrap();
        let decode = RingWork::Decode(pb::RingDecode { token, position: (PROMPT_LEN + i) as u32, append_member: None, sampling: None });
        tokens.push(agreed(
            on_all(&clients, |m, mut c| {
                let req = ring_step(m, SEQ, decode.clone());
                async move { c.ring_step(req).await }
            })
            .await,
        ));
    }
    assert_eq!(tokens, reference, "a ring of {members} differs from one worker's plain steps");

    // The sequence's KV cache is spread over the members, each holding its part.
    let held = kv_tokens(&mut clients).await;
    let total = (PROMPT_LEN + STEPS) as u64;
    assert_eq!(held.iter().sum::<u64>(), total, "{held:?}");
    assert!(held.iter().all(|&h| h > 0 && h < total), "every member holds a part: {held:?}");
    assert!(held.iter().max().unwrap() - held.iter().min().unwrap() <= 1, "balanced: {held:?}");
    (processes, clients)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ring_of_two_workers_generates_what_one_worker_does() {
    let (_processes, mut clients) = ring_matches_a_single_worker(2).await;
    // Release frees a ring sequence on every member, as any other; leaving then finds none.
    for (m, c) in clients.iter_mut().enumerate() {
        c.release(pb::ReleaseRequest { group_id: group(m), seq_ids: vec![SEQ] }).await.expect("release");
    }
    assert_eq!(kv_tokens(&mut clients).await, vec![0, 0]);
    for (m, c) in clients.iter_mut().enumerate() {
        let left = c.leave_ring(pb::LeaveRingRequest { group_id: group(m), ring_id: "ring-a".into() }).await;
        assert_eq!(left.expect("leave ring").into_inner().released_seq_ids, Vec::<u64>::new());
    }
    // Out of the ring, a ring step is refused and the group still serves plain steps.
    let req = ring_step(0, SEQ, prefill(&prompt(), 2, 0));
    let gone = clients[0].ring_step(req).await.expect_err("left the ring");
    assert_eq!(gone.code(), Code::FailedPrecondition, "{gone:?}");
    assert_eq!(plain_greedy(&mut clients[1], &group(1), &prompt()).await.len(), STEPS + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ring_of_three_workers_generates_what_one_worker_does() {
    let (_processes, mut clients) = ring_matches_a_single_worker(3).await;
    // Leaving the ring releases the ring's sequences.
    for (m, c) in clients.iter_mut().enumerate() {
        let left = c.leave_ring(pb::LeaveRingRequest { group_id: group(m), ring_id: "ring-a".into() }).await;
        assert_eq!(left.expect("leave ring").into_inner().released_seq_ids, vec![SEQ]);
    }
    assert_eq!(kv_tokens(&mut clients).await, vec![0, 0, 0]);
}

/// How long a reset may take when a ring member has gone silent: far below any TCP timeout
/// (minutes), well above a loaded machine's scheduling delays.
const RESET_PATIENCE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_ends_a_ring_step_blocked_on_a_silent_member() {
    let mut processes = Vec::new();
    let mut clients = Vec::new();
    for m in 0..2 {
        let (process, client) = serving_worker(&group(m)).await;
        processes.push(process);
        clients.push(client);
    }
    let mut peers = Vec::new();
    for (m, c) in clients.iter_mut().enumerate() {
        let req = pb::PrepareRingRequest { group_id: group(m), ring_id: "ring-a".into(), member: m as u32, members: 2 };
        peers.push(c.prepare_ring(req).await.expect("prepare ring").into_inner().ring_address);
    }
    for r in on_all(&clients, |m, mut c| {
        let req = pb::JoinRingRequest { group_id: group(m), ring_id: "ring-a".into(), peers: peers.clone() };
        async move { c.join_ring(req).await }
    })
    .await
    {
        r.expect("join ring");
    }

    // Member 1 stops answering (a hung process); member 0's step waits on it.
    let stopped = std::process::Command::new("kill").args(["-STOP", &processes[1].0.id().to_string()]).status().expect("kill");
    assert!(stopped.success());
    let mut stepping = clients[0].clone();
    let step = tokio::spawn(async move { stepping.ring_step(ring_step(0, SEQ, prefill(&prompt(), 2, 0))).await });
    // The step is under way before the reset comes: it holds the engine, so a status request
    // queued behind it goes unanswered.
    let mut status = clients[0].clone();
    let blocked = async {
        loop {
            assert!(!step.is_finished(), "the ring step ended although a member is silent");
            if tokio::time::timeout(Duration::from_millis(300), status.status(pb::StatusRequest {})).await.is_err() {
                return;
            }
        }
    };
    tokio::time::timeout(RESET_PATIENCE, blocked).await.expect("the ring step never blocked on the silent member");

    // The reset shuts the ring's connections: the blocked step fails and the reset returns,
    // without waiting for the silent member or for TCP to give up.
    let reset = tokio::time::timeout(RESET_PATIENCE, clients[0].reset(pb::ResetRequest {})).await;
    reset.expect("the reset must not wait behind the blocked ring step").expect("reset");
    let ended = tokio::time::timeout(RESET_PATIENCE, step).await.expect("the step ends").expect("join");
    assert!(ended.is_err(), "the interrupted step fails: {ended:?}");
    let s = clients[0].status(pb::StatusRequest {}).await.expect("status").into_inner();
    assert_eq!(s.state, "idle", "{s:?}");
    let resumed = std::process::Command::new("kill").args(["-CONT", &processes[1].0.id().to_string()]).status().expect("kill");
    assert!(resumed.success());
}
