//! Sequence parallelism changes nothing: a prompt spread over a ring of R members (ring prefill
//! with the zigzag layout, then distributed-KV decode) gives the logits of every prompt position
//! and of every greedy step that one rank alone computes, and the same greedy tokens.
//!
//! Ranks are threads: R members of T tensor-parallel ranks each, `InProcessGroup`s of T for the
//! members and one ring of R per `tp_rank`. "Relative difference" is the one `tp_parity` uses:
//! |a − b| divided by the largest |b| of the reference row (at least 1e-3).

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use common::ring::{run_ring, RankTrace};
use common::{run_trace, spec};
use tessera_collective::{InProcessGroup, SingleRank};
use tessera_model::fixture::max_rel_diff;
use tessera_model::fixture::{write_fixture, FixtureSpec, WriteOptions};
use tessera_model::sampler::SeededRng;
use tessera_model::{
    AppendOn, Batch, DecodeStep, LoadConfig, LogitsMode, Model, ModelError, PrefillStep, RingComm, RingLogits, RingStep, SeqChunk,
    ZigzagLayout,
};

const STEPS: usize = 32;
const TOLERANCE: f32 = 1e-4;
/// Fixtures of every shape the ring must handle: GQA; q/k/v biases with tied embeddings and one
/// KV head; a sliding window (16) far shorter than the long prompts.
const FIXTURES: [&str; 3] = ["llama-gqa", "qwen2-tied", "mistral-swa"];
const LONG: usize = 1000;

/// The test fixtures, with room for the long prompts: `max_position_embeddings` 2048.
fn fixture_dir(name: &str) -> PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    let root = ROOT.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("sp-fixtures-{}", std::process::id()));
        for name in FIXTURES.into_iter().chain(["llama-rope-dynamic"]) {
            let mut s: FixtureSpec = spec(name);
            if name != "llama-rope-dynamic" {
                s.config["max_position_embeddings"] = 2048.into();
            }
            write_fixture(&s, &root, &WriteOptions::default()).expect("write fixture");
        }
        root
    });
    root.join(name)
}

fn prompt(len: usize, seed: u64) -> Vec<u32> {
    let mut rng = SeededRng::new(seed);
    (0..len).map(|_| 3 + (rng.next_u64() % 317) as u32).collect()
}

/// The SP=1/TP=1 reference, computed once per fixture and prompt length.
fn reference(dir: &Path, prompt: &[u32]) -> common::Trace {
    let model = Model::load(dir, &LoadConfig::default()).expect("load tp=1");
    run_trace(&model, &mut SingleRank, prompt, STEPS)
}

/// Checks every rank of a ring run against the reference; returns (prefill, decode) max
/// relative differences.
fn check(case: &str, reference: &common::Trace, traces: &[RankTrace], prompt_len: usize, sp: usize) -> (f32, f32) {
    // Prefill rows, reassembled by global position: every position exactly once per tp rank.
    let mut by_position: Vec<Option<&Vec<f32>>> = vec![None; prompt_len];
    for t in traces {
        for (pos, row) in &t.local {
            if let Some(seen) = by_position[*pos] {
                assert_eq!(seen, row, "{case}: position {pos} computed differently by two ranks");
            }
            by_position[*pos] = Some(row);
        }
    }
    let assembled: Vec<Vec<f32>> = by_position
        .into_iter()
        .enumerate()
        .map(|(p, r)| r.unwrap_or_else(|| panic!("{case}: no member computed position {p}")).clone())
        .collect();
    let pre = max_rel_diff(&assembled, &reference.prefill);
    let last = max_rel_diff(&[traces[0].last.clone()], &reference.prefill[prompt_len - 1..]);
    let dec = max_rel_diff(&traces[0].decode, &reference.decode);
    assert!(pre <= TOLERANCE, "{case}: prefill max rel diff {pre}");
    assert!(last <= TOLERANCE, "{case}: last-token max rel diff {last}");
    assert_eq!(traces[0].greedy, reference.greedy, "{case}: greedy tokens differ");
    assert!(dec <= TOLERANCE, "{case}: decode max rel diff {dec}");
    // Lockstep: every rank of every member has the same bits.
    for t in traces {
        assert_eq!(t.last, traces[0].last, "{case}: member {} last-token logits differ", t.member);
        assert_eq!(t.decode, traces[0].decode, "{case}: member {} decode logits differ", t.member);
        assert_eq!(t.greedy, traces[0].greedy, "{case}: member {} greedy tokens differ", t.member);
        assert_eq!(t.held, traces[0].held, "{case}: member {} records other counts", t.member);
        assert_eq!(t.cached, t.held[t.member], "{case}: member {} caches what the record says", t.member);
    }
    assert_eq!(traces[0].held.len(), sp);
    assert_eq!(traces[0].held.iter().sum::<usize>(), prompt_len + STEPS, "{case}: cached tokens over the ring");
    (pre.max(last), dec)
}

/// Every fixture, every prompt length the brief names for this ring size, against SP=1/TP=1.
fn check_ring(sp: usize, tp: usize) {
    let mut lengths = vec![1, sp - 1, sp, 2 * sp + 1, LONG];
    lengths.retain(|&n| n > 0);
    lengths.dedup();
    for name in FIXTURES {
        let dir = fixture_dir(name);
        for &n in &lengths {
            let prompt = prompt(n, n as u64);
            let reference = reference(&dir, &prompt);
            let start = Instant::now();
            let traces = run_ring(&dir, &LoadConfig::default(), sp, tp, &prompt, STEPS, AppendOn::LeastLoaded);
            let secs = start.elapsed().as_secs_f64();
            assert_eq!(traces.len(), sp * tp);
            let case = format!("{name} sp={sp} tp={tp} n={n}");
            let (pre, dec) = check(&case, &reference, &traces, n, sp);
            // Least-loaded appends keep the members within one token of each other.
            let held = &traces[0].held;
            assert!(held.iter().max().unwrap() - held.iter().min().unwrap() <= 1, "{case}: {held:?}");
            println!("{case}: prefill rel {pre:.2e}, decode rel {dec:.2e}, held {held:?}, {secs:.2}s");
        }
    }
}

#[test]
fn sp2_matches_sp1() {
    check_ring(2, 1);
}

#[test]
fn sp3_matches_sp1() {
    check_ring(3, 1);
}

#[test]
fn sp2_with_tp2_matches_sp1() {
    check_ring(2, 2);
}

#[test]
fn sp3_with_tp2_matches_sp1() {
    check_ring(3, 2);
}

/// Dynamic NTK scaling depends on the sequence length: a ring prefill must rotate with the
/// whole prompt's length, not a member's share (the fixture trains at 32 positions).
#[test]
fn ring_uses_the_global_length_for_dynamic_rope() {
    let dir = fixture_dir("llama-rope-dynamic");
    let prompt = prompt(40, 40);
    let reference = reference(&dir, &prompt);
    for sp in [2, 3] {
        let traces = run_ring(&dir, &LoadConfig::default(), sp, 1, &prompt, STEPS, AppendOn::LeastLoaded);
        check(&format!("llama-rope-dynamic sp={sp}"), &reference, &traces, prompt.len(), sp);
    }
}

/// A caller-chosen member receives every decoded token; a ring of one equals `Model::forward`.
#[test]
fn appends_land_on_the_chosen_member() {
    let dir = fixture_dir("llama-gqa");
    let prompt = prompt(9, 9);
    let reference = reference(&dir, &prompt);
    let layout = ZigzagLayout::new(prompt.len(), 3).unwrap();
    let traces = run_ring(&dir, &LoadConfig::default(), 3, 1, &prompt, STEPS, AppendOn::Member(1));
    check("llama-gqa sp=3 append on 1", &reference, &traces, prompt.len(), 3);
    let expected: Vec<usize> = (0..3).map(|m| layout.member_len(m) + if m == 1 { STEPS } else { 0 }).collect();
    assert_eq!(traces[0].held, expected);

    let traces = run_ring(&dir, &LoadConfig::default(), 1, 1, &prompt, STEPS, AppendOn::LeastLoaded);
    check("llama-gqa sp=1 ring", &reference, &traces, prompt.len(), 1);
}

/// Malformed ring steps are refused with typed errors, and a ring sequence cannot be continued
/// through the single-rank entry point.
#[test]
fn bad_ring_steps_are_refused() {
    let model = Model::load(&fixture_dir("llama-gqa"), &LoadConfig::default()).expect("load");
    let mut kv = model.new_kv_cache();
    let (mut tp, mut sp) = (SingleRank, SingleRank);
    let mut comm = RingComm { tp: &mut tp, sp: &mut sp };
    fn prefill(tokens: &[u32], prompt_len: usize) -> RingStep<'_> {
        RingStep::Prefill(PrefillStep { seq: 3, prompt_len, tokens })
    }
    let decode = |position| RingStep::Decode(DecodeStep { seq: 3, token: 5, position, append: AppendOn::LeastLoaded });
    let mut call = |step: &RingStep, kv: &mut tessera_model::KvCache| model.forward_ring(step, kv, &mut comm, RingLogits::Last);

    assert!(matches!(call(&prefill(&[1, 2], 3), &mut kv), Err(ModelError::InvalidBatch(_))), "wrong share");
    assert!(matches!(call(&prefill(&[], 0), &mut kv), Err(ModelError::InvalidBatch(_))), "empty prompt");
    assert!(matches!(call(&prefill(&[1, 999], 2), &mut kv), Err(ModelError::InvalidBatch(_))), "token id");
    assert!(matches!(call(&decode(0), &mut kv), Err(ModelError::UnknownSequence(3))));
    assert_eq!(kv.num_sequences(), 0, "refused calls leave nothing behind");

    call(&prefill(&[1, 2, 3], 3), &mut kv).expect("prefill");
    assert!(matches!(call(&prefill(&[1, 2, 3], 3), &mut kv), Err(ModelError::InvalidBatch(_))), "second prefill");
    assert!(matches!(call(&decode(5), &mut kv), Err(ModelError::InvalidBatch(_))), "gap in positions");
    let bad_member = RingStep::Decode(DecodeStep { seq: 3, token: 5, position: 3, append: AppendOn::Member(1) });
    assert!(matches!(call(&bad_member, &mut kv), Err(ModelError::InvalidBatch(_))), "no member 1");
    call(&decode(3), &mut kv).expect("decode");
    assert_eq!(kv.len(3), Some(4));

    let chunk = [SeqChunk { seq: 3, start: 4, len: 1 }];
    let plain = model.forward(&Batch { tokens: &[5], chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk);
    assert!(matches!(plain, Err(ModelError::InvalidBatch(m)) if m.contains("ring")));

    // A ring of two seen through a one-rank tensor-parallel collective that claims rank 1.
    let groups = InProcessGroup::new(2);
    let mut wrong_tp = groups.into_iter().nth(1).expect("rank 1");
    let mut sp = SingleRank;
    let mut comm = RingComm { tp: &mut wrong_tp, sp: &mut sp };
    let r = model.forward_ring(&prefill(&[1], 1), &mut model.new_kv_cache(), &mut comm, RingLogits::Last);
    assert!(matches!(r, Err(ModelError::InvalidConfig(_))));
}
