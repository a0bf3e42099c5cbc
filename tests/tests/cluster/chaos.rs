//! A randomized run of faults under load: 64 greedy and seeded streams while workers are
//! killed, hung and restarted under their own ids and etcd restarts, on a seeded schedule
//! printed at the start so a failure can be replayed (`TESSERA_CHAOS_SEED=N`). Every stream
//! either finishes with exactly the tokens of its undisturbed run or ends `UNAVAILABLE` saying
//! why; none hangs; afterwards no live worker holds a sequence.

use std::time::Duration;

use tessera_etcd_harness::EtcdServer;
use tessera_model::fixture::demo;
use tessera_proto::v1 as pb;
use tessera_tests::ChildGuard;

use crate::support::*;

const STREAMS: u64 = 64;
const TOKENS: u32 = 600;
const FAULTS: usize = 30;
const WORKERS: usize = 4;
/// Worker lease TTL: a hung worker's lease outlives the step timeout, so the step timeout is
/// what notices it.
const TTL: u64 = 5;

/// A small deterministic generator for the schedule (SplitMix64).
struct Schedule(u64);

impl Schedule {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL a worker, then start it again under its id.
    Kill(usize),
    /// SIGSTOP a worker past the step timeout, then kill it and start it again.
    Hang(usize),
    /// Restart etcd under everything.
    EtcdRestart,
}

fn requests() -> Vec<pb::GenerateRequest> {
    (0..STREAMS)
        .map(|i| {
            let mut r = greedy(prompt(&format!("Chaos story {i} begins")), TOKENS);
            if i % 2 == 1 {
                r.sampling = Some(pb::SamplingParams { temperature: Some(0.8), seed: Some(1000 + i), ..Default::default() });
            }
            r
        })
        .collect()
}

fn start(etcd: &str, i: usize) -> ChildGuard {
    etcd_worker(etcd, &format!("w-{i}"), TTL).expect("start worker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_under_random_faults_finish_exactly_or_end_unavailable() {
    let seed = std::env::var("TESSERA_CHAOS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(20261207u64);
    let mut schedule = Schedule(seed);
    let plan: Vec<(Duration, Fault)> = (0..FAULTS)
        .map(|_| {
            let pause = Duration::from_millis(1500 + schedule.below(2500));
            let fault = match schedule.below(10) {
                0 => Fault::EtcdRestart,
                1..=3 => Fault::Hang(schedule.below(WORKERS as u64) as usize),
                _ => Fault::Kill(schedule.below(WORKERS as u64) as usize),
            };
            (pause, fault)
        })
        .collect();
    eprintln!("chaos seed {seed} (replay with TESSERA_CHAOS_SEED={seed}); schedule: {plan:?}");

    let mut etcd = EtcdServer::start().await;
    let url = etcd.url();
    let dir = fixture(&demo(), "chaos");
    let args = ["--step-timeout-secs", "3", "--batch-invariant", "--lease-ttl-secs", "10"];
    let coordinator = coordinator_with(&dir, &url, 1, &args).expect("start coordinator");
    let mut workers: Vec<ChildGuard> = (0..WORKERS).map(|i| start(&url, i)).collect();
    let mut client = connect(&coordinator.url).await;
    until_serving_groups(&mut client, WORKERS as u32).await;

    // The undisturbed runs (a seed gives the same tokens under any load).
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
    for (pause, fault) in &plan {
        for (i, r) in pending.by_ref().take(per_fault) {
            let mut client = client.clone();
            runs.push((i, tokio::spawn(async move { generate(&mut client, r).await })));
        }
        tokio::time::sleep(*pause).await;
        eprintln!("chaos: {fault:?}");
        match *fault {
            Fault::Kill(i) => {
                let _ = workers[i].0.kill();
                let _ = workers[i].0.wait();
                workers[i] = start(&url, i);
            }
            Fault::Hang(i) => {
                signal(&workers[i], "-STOP");
                tokio::time::sleep(Duration::from_secs(4)).await;
                let _ = workers[i].0.kill();
                let _ = workers[i].0.wait();
                workers[i] = start(&url, i);
            }
            Fault::EtcdRestart => etcd.restart().await,
        }
    }
    for (i, r) in pending {
        let mut client = client.clone();
        runs.push((i, tokio::spawn(async move { generate(&mut client, r).await })));
    }
    let runs = futures::future::join_all(runs.into_iter().map(|(i, run)| async move { (i, run.await) }));
    let runs = tokio::time::timeout(PATIENCE * 3, runs).await.expect("no stream may hang");
    let (mut exact, mut unavailable, mut moved) = (0, 0, 0);
    for (i, run) in runs {
        let expected = &reference[i];
        match run.expect("join") {
            Ok(run) => {
                assert_eq!(&run.tokens(), expected, "stream {i} finished with other tokens than its undisturbed run");
                exact += 1;
                moved += usize::from(run.finished.as_ref().is_some_and(|f| f.migrations > 0));
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "stream {i} ended otherwise than UNAVAILABLE: {status:?}");
                assert!(!status.message().is_empty(), "stream {i} ended without a reason");
                unavailable += 1;
            }
        }
    }
    eprintln!("chaos: {exact} streams finished exactly ({moved} of them after moving), {unavailable} ended UNAVAILABLE");
    assert!(moved > 0, "the faults must have struck running streams");
    // Every live worker is back and holds nothing.
    until_status(&client, "every worker back, serving and empty", |s| {
        s.workers.len() == WORKERS && s.workers.iter().all(|w| w.state == "serving" && w.sequences == 0 && w.kv_blocks == 0)
    })
    .await;
    drop(workers);
}
