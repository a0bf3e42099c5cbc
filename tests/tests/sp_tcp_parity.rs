//! Sequence parallelism across separate OS processes over TCP gives the SP=1 result: rings of
//! R members (T tensor-parallel ranks each, one process per rank, `tessera-sp-rank`) produce the
//! logits of every prompt position and of every greedy step that one in-process rank computes,
//! and the same greedy tokens; all ranks agree bit for bit on the last-token and decode logits.
//!
//! "Relative difference" is the one `sp_parity.rs` uses: |a − b| divided by the largest |b| of
//! the reference row (at least 1e-3).

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use tessera_collective::SingleRank;
use tessera_model::fixture::max_rel_diff;
use tessera_model::fixture::{test_fixtures, write_fixture, WriteOptions};
use tessera_model::sampler::SeededRng;
use tessera_model::{LoadConfig, Model};
use tessera_tests::{greedy_trace, RankLaunch, RingTrace, Trace, STARTUP_PATIENCE};

const STEPS: usize = 16;
const TOLERANCE: f32 = 1e-4;
const FIXTURE: &str = "llama-gqa";
const LONG: usize = 300;

/// `llama-gqa` with room for the long prompt and its decode steps.
fn fixture_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("sp-tcp-fixtures-{}", std::process::id()));
        let mut spec = test_fixtures().into_iter().find(|s| s.name == FIXTURE).expect("known fixture");
        spec.config["max_position_embeddings"] = 1024.into();
        write_fixture(&spec, &root, &WriteOptions::default()).expect("write fixture")
    })
}

fn prompt(len: usize, seed: u64) -> Vec<u32> {
    let mut rng = SeededRng::new(seed);
    (0..len).map(|_| 3 + (rng.next_u64() % 317) as u32).collect()
}

/// Runs a ring of `members` × `tp` rank processes; returns each rank's trace, ordered by
/// (member, tp_rank). Every process is killed if anything fails, and no read waits longer than
/// [`STARTUP_PATIENCE`].
fn run_ring(dir: &Path, members: usize, tp: usize, prompt: &[u32]) -> Vec<RingTrace> {
    let prompt_arg = prompt.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let args = (0..members * tp)
        .map(|i| {
            let (m, t) = (i / tp, i % tp);
            [dir.display().to_string(), prompt_arg.clone(), STEPS.to_string()]
                .into_iter()
                .chain([members, tp, m, t].map(|n| n.to_string()))
                .collect()
        })
        .collect();
    let launch = RankLaunch {
        program: Path::new(env!("CARGO_BIN_EXE_tessera-sp-rank")),
        args,
        env: vec![("RAYON_NUM_THREADS".into(), "1".into())],
        listeners: 2,
    };
    // Rank i = (m, t) gets its member's group (first addresses of ranks m·T..m·T+T) and its
    // ring (second addresses of the ranks with tp_rank t, in member order).
    let ranks = launch
        .spawn(|i, addresses| {
            let (m, t) = (i / tp, i % tp);
            vec![(0..tp).map(|u| addresses[m * tp + u][0]).collect(), (0..members).map(|n| addresses[n * tp + t][1]).collect()]
        })
        .expect("start the ring");

    // Read every rank's output to its end concurrently: the ranks run in lockstep.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut children = Vec::with_capacity(ranks.len());
    for (i, (child, mut out)) in ranks.into_iter().enumerate() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut text = String::new();
            let read = out.read_to_string(&mut text).map(|_| text);
            let _ = tx.send((i, read));
        });
        children.push(child);
    }
    // A rank's output ends when it exits; the first that fails fails the case at once, and the
    // guards kill the rest instead of leaving them to time out in their collectives.
    let deadline = Instant::now() + STARTUP_PATIENCE;
    let mut traces: Vec<Option<RingTrace>> = vec![None; children.len()];
    for _ in 0..children.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let (i, read) = rx.recv_timeout(left).expect("every rank finishes in time");
        let text = read.unwrap_or_else(|e| panic!("rank {i} output: {e}"));
        let status = children[i].0.wait().expect("wait for rank");
        assert!(status.success(), "rank {i} (member {}, tp_rank {}) exited with {status}", i / tp, i % tp);
        let trace = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("rank {i} printed {} bytes: {e}", text.len()));
        traces[i] = Some(trace);
    }
    traces.into_iter().map(|t| t.expect("every rank reported")).collect()
}

/// Checks every rank of a ring run against the reference; returns the max relative
/// differences of (prompt positions, last token, decode steps).
fn check(case: &str, reference: &Trace, traces: &[RingTrace], members: usize, tp: usize) -> (f32, f32, f32) {
    let n = reference.prefill.len();
    let ranks: BTreeSet<(usize, usize)> = traces.iter().map(|t| (t.member, t.tp_rank)).collect();
    assert_eq!(ranks.len(), members * tp, "{case}: every (member, tp_rank) reports once");
    assert!(ranks.iter().all(|&(m, t)| m < members && t < tp), "{case}: ranks {ranks:?}");

    // Prompt rows reassembled by global position: each held by one member, with the same bits
    // on each of its tensor-parallel ranks.
    let mut by_position: Vec<Option<(usize, &Vec<f32>)>> = vec![None; n];
    for t in traces {
        for (pos, row) in &t.local {
            assert!(*pos < n, "{case}: member {} reports position {pos} of a {n}-token prompt", t.member);
            if let Some((member, seen)) = by_position[*pos] {
                assert_eq!(member, t.member, "{case}: position {pos} computed by members {member} and {}", t.member);
                assert_eq!(seen, row, "{case}: position {pos} differs between tensor-parallel ranks");
            }
            by_position[*pos] = Some((t.member, row));
        }
    }
    let assembled: Vec<Vec<f32>> = by_position
        .into_iter()
        .enumerate()
        .map(|(p, r)| r.unwrap_or_else(|| panic!("{case}: no member computed position {p}")).1.clone())
        .collect();
    let first = &traces[0];
    let pre = max_rel_diff(&assembled, &reference.prefill);
    let last = max_rel_diff(std::slice::from_ref(&first.last), &reference.prefill[n - 1..]);
    let dec = max_rel_diff(&first.decode, &reference.decode);
    assert!(pre <= TOLERANCE, "{case}: prompt positions max rel diff {pre}");
    assert!(last <= TOLERANCE, "{case}: last-token max rel diff {last}");
    assert!(dec <= TOLERANCE, "{case}: decode max rel diff {dec}");
    assert_eq!(first.greedy, reference.greedy, "{case}: greedy tokens differ from SP=1");

    // Lockstep: every rank of every member has the same bits and the same record of the cache.
    for t in traces {
        let who = format!("{case}: member {} tp_rank {}", t.member, t.tp_rank);
        assert_eq!(t.last, first.last, "{who}: last-token logits differ");
        assert_eq!(t.decode, first.decode, "{who}: decode logits differ");
        assert_eq!(t.greedy, first.greedy, "{who}: greedy tokens differ");
        assert_eq!(t.held, first.held, "{who}: records other cache counts");
    }
    assert_eq!(first.held.len(), members, "{case}: one count per member");
    assert_eq!(first.held.iter().sum::<usize>(), n + STEPS, "{case}: cached tokens over the ring");
    let (lo, hi) = (first.held.iter().min(), first.held.iter().max());
    assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{case}: least-loaded appends keep {:?} within one", first.held);
    (pre, last, dec)
}

/// Every prompt length the issue names for a ring of `members`, against in-process SP=1/TP=1.
fn check_ring(members: usize, tp: usize) {
    let dir = fixture_dir();
    let model = Model::load(dir, &LoadConfig::default()).expect("load tp=1");
    let mut lengths = vec![1, members - 1, members, 2 * members + 1, LONG];
    lengths.retain(|&n| n > 0);
    lengths.dedup();
    for n in lengths {
        let prompt = prompt(n, n as u64);
        let reference = greedy_trace(&model, &mut SingleRank, &prompt, STEPS).expect("SP=1 reference");
        let start = Instant::now();
        let traces = run_ring(dir, members, tp, &prompt);
        let secs = start.elapsed().as_secs_f64();
        let case = format!("{FIXTURE} sp={members} tp={tp} n={n}");
        let (pre, last, dec) = check(&case, &reference, &traces, members, tp);
        println!("{case}: positions rel {pre:.2e}, last rel {last:.2e}, decode rel {dec:.2e}, held {:?}, {secs:.2}s", traces[0].held);
    }
}

#[test]
fn sp2_over_tcp_processes_matches_sp1() {
    check_ring(2, 1);
}

#[test]
fn sp3_over_tcp_processes_matches_sp1() {
    check_ring(3, 1);
}

#[test]
fn sp2_with_tp2_over_tcp_processes_matches_sp1() {
    check_ring(2, 2);
}
