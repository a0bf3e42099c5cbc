//! A randomized run of faults under load: 64 greedy and seeded streams on two coordinators (a
//! leader and a standby) and six workers in three groups at TP=2, while workers are killed, hung, cut off and
//! restarted under their own ids, ring members die, etcd restarts and the leader coordinator
//! is killed, on a seeded schedule printed at the start so a failure can be replayed
//! (`TESSERA_CHAOS_SEED=N`).
//!
//! Every stream either finishes with exactly the tokens of its undisturbed run or ends
//! `UNAVAILABLE` saying why (or, on a coordinator killed under it, with the broken connection
//! tonic reports as `UNKNOWN`); none hangs; afterwards no live worker holds a sequence.
//!
//! The cut-off faults need a network namespace (see [`crate::netns`]): worker 0 then runs in
//! one and the others serve on this side's address of its link, so rings can span both sides.
//! Where no namespace can be made the run says so and hangs worker 0 in place of a cut.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tessera_etcd_harness::EtcdServer;
use tessera_model::fixture::demo;
use tessera_proto::v1 as pb;
use tessera_tests::ChildGuard;
use tokio::sync::oneshot;

use crate::netns::Host;
use crate::support::*;

const STREAMS: u64 = 64;
const TOKENS: u32 = 600;
const FAULTS: usize = 30;
const WORKERS: usize = 6;
/// Tensor-parallel degree: three groups of two.
const TP: usize = 2;
/// Worker lease TTL: a hung worker's lease outlives the step timeout, so the step timeout is
/// what notices it.
const TTL: u64 = 5;
/// Coordinator leadership lease TTL: a killed leader is succeeded within it (plus 2 s), and it
/// outlives an etcd restart.
const LEADER_TTL: &str = "5";
/// Ring requests: a prompt this long is spread over a ring of two groups (see
/// `--ring-prefill-tokens`), and generates this many tokens.
const RING_PROMPT: u32 = 3000;
const RING_PREFILL_TOKENS: &str = "1500";
const RING_TOKENS: u32 = 48;

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL a worker, then start it again under its id.
    Kill(usize),
    /// SIGSTOP a worker past the step timeout, then kill it and start it again.
    Hang(usize),
    /// Restart etcd under everything.
    EtcdRestart,
    /// SIGKILL the leading coordinator; the standby takes over, and the killed one comes back
    /// as the new standby.
    LeaderKill,
    /// Start a ring request, and once it decodes SIGKILL one of its members (then start it
    /// again).
    RingMemberKill,
    /// Cut worker 0's link for this long, then mend it.
    Partition(Duration),
}

fn requests() -> Vec<pb::GenerateRequest> {
    greedy_and_seeded(STREAMS, "Chaos story", TOKENS, 0.8, 1000)
}

fn ring_request() -> pb::GenerateRequest {
    greedy(tokens((0..RING_PROMPT).map(|i| 3 + (i * 37 % 300)).collect()), RING_TOKENS)
}

/// Everything the faults act on.
struct Cluster {
    etcd: EtcdServer,
    net: Option<Host>,
    dir: PathBuf,
    /// Coordinators `c-0` and `c-1`, and how many times each was started.
    coordinators: [Served; 2],
    starts: [u64; 2],
    workers: Vec<ChildGuard>,
}

impl Cluster {
    /// Worker `i`: worker 0 in the namespace when there is one, the others on this side of its
    /// link (so ring peers on both sides reach each other), else all on loopback.
    fn start_worker(etcd: &EtcdServer, net: Option<&Host>, i: usize) -> ChildGuard {
        let id = format!("w-{i}");
        match net {
            Some(host) if i == 0 => host.worker(&etcd.url_on(host.near.into()), &id, TTL, &["--collective-host", &host.far.to_string()]),
            Some(host) => {
                let (listen, near) = (format!("{}:0", host.near), host.near.to_string());
                let extra = ["--listen", &listen, "--collective-host", &near, "--insecure"];
                etcd_worker_with(&etcd.url(), &id, TTL, 65536, &extra).expect("start worker").0
            }
            None => etcd_worker(&etcd.url(), &id, TTL).expect("start worker"),
        }
    }

    fn start_coordinator(dir: &Path, etcd: &EtcdServer, i: usize) -> Served {
        let id = format!("c-{i}");
        let args = [
            "--coordinator-id",
            &id,
            "--lease-ttl-secs",
            LEADER_TTL,
            "--step-timeout-secs",
            "3",
            "--batch-invariant",
            "--ring-prefill-tokens",
            RING_PREFILL_TOKENS,
        ];
        coordinator_with(dir, &etcd.url(), TP, &args).expect("start coordinator")
    }

    fn restart_worker(&mut self, i: usize) {
        let _ = self.workers[i].0.kill();
        let _ = self.workers[i].0.wait();
        self.workers[i] = Self::start_worker(&self.etcd, self.net.as_ref(), i);
    }

    /// Starts again every worker that exited on its own, as a supervisor (Kubernetes) would: a
    /// worker restarted during a cut cannot reach etcd within its start-up patience and exits
    /// rather than wait for ever.
    fn revive_exited(&mut self) {
        for i in 0..self.workers.len() {
            if let Ok(Some(exit)) = self.workers[i].0.try_wait() {
                eprintln!("chaos: w-{i} exited ({exit}); starting it again");
                self.workers[i] = Self::start_worker(&self.etcd, self.net.as_ref(), i);
            }
        }
    }

    /// The leading coordinator: its index, how many times it was started, and a client.
    async fn leader(&self) -> (usize, u64, Client) {
        let wait = async {
            let mut tick = tokio::time::interval(POLL);
            loop {
                tick.tick().await;
                for (i, served) in self.coordinators.iter().enumerate() {
                    let Ok(mut client) = Client::connect(served.url.clone()).await else { continue };
                    let status = client.cluster_status(pb::ClusterStatusRequest {}).await;
                    if status.is_ok_and(|s| s.into_inner().leading) {
                        return (i, self.starts[i], client);
                    }
                }
            }
        };
        tokio::time::timeout(PATIENCE, wait).await.expect("a coordinator leads")
    }
}

/// What a disturbed run ended with, and on which coordinator start it ran.
struct Outcome {
    stream: String,
    coordinator: (usize, u64),
    expected: Vec<u32>,
    result: Result<Collected, tonic::Status>,
}

/// Runs a ring request, telling `placed` the ring's workers once its first token arrived.
async fn ring_run(mut client: Client, placed: oneshot::Sender<Vec<String>>) -> Result<Collected, tonic::Status> {
    let mut stream = client.generate(ring_request()).await?.into_inner();
    let mut run = Collected::default();
    let mut placed = Some(placed);
    while let Some(message) = stream.message().await? {
        match message.event {
            Some(pb::generate_response::Event::Started(s)) => run.started = Some(s),
            Some(pb::generate_response::Event::Chunk(c)) => run.chunks.push(c),
            Some(pb::generate_response::Event::Finished(f)) => run.finished = Some(f),
            Some(pb::generate_response::Event::Progress(_)) | None => {}
        }
        if !run.chunks.is_empty() {
            if let Some(tell) = placed.take() {
                let _ = tell.send(run.workers());
            }
        }
    }
    Ok(run)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_under_random_faults_finish_exactly_or_end_unavailable() {
    let seed = std::env::var("TESSERA_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261207u64);
    let mut schedule = tessera_mutate::Rng::new(seed);
    let plan: Vec<(Duration, Fault)> = (0..FAULTS)
        .map(|_| {
            let pause = Duration::from_millis(1500 + schedule.below(2500) as u64);
            let fault = match schedule.below(12) {
                0 => Fault::EtcdRestart,
                1 => Fault::LeaderKill,
                2 => Fault::RingMemberKill,
                3 => Fault::Partition(Duration::from_millis(1000 + schedule.below(7000) as u64)),
                4..=5 => Fault::Hang(schedule.below(WORKERS)),
                _ => Fault::Kill(schedule.below(WORKERS)),
            };
            (pause, fault)
        })
        .collect();
    eprintln!("chaos seed {seed} (replay with TESSERA_CHAOS_SEED={seed}); schedule: {plan:?}");

    let net = match Host::create() {
        Ok(host) => Some(host),
        Err(why) => {
            eprintln!("chaos: NO PARTITIONS: this machine cannot make a network namespace ({why}); each cut becomes a hang of worker 0");
            None
        }
    };
    let etcd = match &net {
        Some(host) => EtcdServer::start_also_on(host.near.into()).await,
        None => EtcdServer::start().await,
    };
    let dir = fixture(&demo(), "chaos");
    let first = Cluster::start_coordinator(&dir, &etcd, 0);
    until_status(&connect(&first.url).await, "c-0 elected", |s| s.leading).await;
    let coordinators = [first, Cluster::start_coordinator(&dir, &etcd, 1)];
    let workers = (0..WORKERS).map(|i| Cluster::start_worker(&etcd, net.as_ref(), i)).collect();
    let mut cluster = Cluster { etcd, net, dir, coordinators, starts: [1, 1], workers };
    let (_, _, mut client) = cluster.leader().await;
    until_serving_groups(&mut client, (WORKERS / TP) as u32).await;

    // The undisturbed runs (a seed gives the same tokens under any load), the ring's alone.
    let ring_reference = generate(&mut client, ring_request()).await.expect("undisturbed ring run");
    let sp = ring_reference.started.as_ref().and_then(|s| s.placement.as_ref()).map(|p| p.sp);
    assert_eq!(sp, Some(2), "the ring request runs on a ring of two groups");
    let ring_reference = ring_reference.tokens();
    let calls = requests().into_iter().map(|r| {
        let mut client = client.clone();
        async move { generate(&mut client, r).await.expect("undisturbed run").tokens() }
    });
    let reference: Vec<Vec<u32>> = futures::future::join_all(calls).await;

    // The disturbed runs, a few started before each fault, so streams are always running when
    // one lands.
    let mut pending = requests().into_iter().enumerate();
    let per_fault = (STREAMS as usize).div_ceil(FAULTS);
    let mut runs = Vec::new();
    let mut killed_coordinators = HashSet::new();
    let mut ring_members_killed = 0;
    for (pause, fault) in &plan {
        cluster.revive_exited();
        let (leader, start, client) = cluster.leader().await;
        for (i, r) in pending.by_ref().take(per_fault) {
            let mut client = client.clone();
            let run = tokio::spawn(async move { generate(&mut client, r).await });
            runs.push((format!("stream {i}"), (leader, start), reference[i].clone(), run));
        }
        tokio::time::sleep(*pause).await;
        eprintln!("chaos: {fault:?}");
        match *fault {
            Fault::Kill(i) => cluster.restart_worker(i),
            Fault::Hang(i) => {
                signal(&cluster.workers[i], "-STOP");
                tokio::time::sleep(Duration::from_secs(4)).await;
                cluster.restart_worker(i);
            }
            Fault::EtcdRestart => cluster.etcd.restart().await,
            Fault::LeaderKill => {
                let (leader, start, _) = cluster.leader().await;
                let _ = cluster.coordinators[leader]._process.0.kill();
                let _ = cluster.coordinators[leader]._process.0.wait();
                killed_coordinators.insert((leader, start));
                cluster.coordinators[leader] = Cluster::start_coordinator(&cluster.dir, &cluster.etcd, leader);
                cluster.starts[leader] += 1;
            }
            Fault::RingMemberKill => {
                let (tell, placed) = oneshot::channel();
                let run = tokio::spawn(ring_run(client.clone(), tell));
                runs.push((format!("ring request before fault {}", runs.len()), (leader, start), ring_reference.clone(), run));
                match tokio::time::timeout(PATIENCE, placed).await {
                    Ok(Ok(members)) => {
                        let victim = members.iter().find_map(|w| w.strip_prefix("w-")?.parse::<usize>().ok()).expect("a ring member");
                        eprintln!("chaos: killing w-{victim} of the ring {members:?}");
                        cluster.restart_worker(victim);
                        ring_members_killed += 1;
                    }
                    _ => eprintln!("chaos: the ring request ended (or never decoded) before its member could be killed"),
                }
            }
            Fault::Partition(length) => match &cluster.net {
                Some(host) => {
                    host.cut();
                    tokio::time::sleep(length).await;
                    host.mend();
                }
                None => {
                    signal(&cluster.workers[0], "-STOP");
                    tokio::time::sleep(length).await;
                    cluster.restart_worker(0);
                }
            },
        }
    }
    let (leader, start, client) = cluster.leader().await;
    for (i, r) in pending {
        let mut client = client.clone();
        let run = tokio::spawn(async move { generate(&mut client, r).await });
        runs.push((format!("stream {i}"), (leader, start), reference[i].clone(), run));
    }
    let runs = futures::future::join_all(runs.into_iter().map(|(stream, coordinator, expected, run)| async move {
        Outcome { stream, coordinator, expected, result: run.await.expect("join") }
    }));
    let outcomes = tokio::time::timeout(PATIENCE * 3, runs).await.expect("no stream may hang");
    let (mut exact, mut unavailable, mut broken, mut moved) = (0, 0, 0, 0);
    for Outcome { stream, coordinator, expected, result } in outcomes {
        match result {
            Ok(run) => {
                assert_eq!(run.tokens(), expected, "{stream} finished with other tokens than its undisturbed run");
                exact += 1;
                moved += usize::from(run.finished.as_ref().is_some_and(|f| f.migrations > 0));
            }
            Err(status) if killed_coordinators.contains(&coordinator) && status.code() == tonic::Code::Unknown => broken += 1,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{stream} ended otherwise than UNAVAILABLE: {status:?}");
                assert!(!status.message().is_empty(), "{stream} ended without a reason");
                eprintln!("chaos: {stream} ended UNAVAILABLE: {}", status.message());
                unavailable += 1;
            }
        }
    }
    eprintln!(
        "chaos: {exact} streams finished exactly ({moved} of them after moving), {unavailable} ended UNAVAILABLE, \
         {broken} broke with a killed coordinator; {} leaders and {ring_members_killed} ring members killed",
        killed_coordinators.len()
    );
    assert!(moved > 0, "the faults must have struck running streams");
    // Every worker is back and holds nothing.
    cluster.revive_exited();
    let (_, _, client) = cluster.leader().await;
    until_status(&client, "every worker back, serving and empty", |s| {
        s.workers.len() == WORKERS && s.workers.iter().all(|w| w.state == "serving" && w.sequences == 0 && w.kv_blocks == 0)
    })
    .await;
}
