//! Tensor parallelism changes nothing: TP=2 and TP=4 (ranks as threads) give the logits and
//! greedy tokens of TP=1 on every fixture shape.

mod common;

use common::{run_tp, spec};
use tessera_model::fixture::max_rel_diff;
use tessera_model::fixture::{prompt_ids, test_fixtures};

const DECODE_STEPS: usize = 16;
const GREEDY_STEPS: usize = 32;

fn check(name: &str, tp: usize) {
    let prompt = prompt_ids(&spec(name));
    let reference = run_tp(name, 1, &prompt, GREEDY_STEPS).remove(0);
    let ranks = run_tp(name, tp, &prompt, GREEDY_STEPS);
    assert_eq!(ranks.len(), tp);
    for (rank, t) in ranks.iter().enumerate() {
        let pre = max_rel_diff(&t.prefill, &reference.prefill);
        let dec = max_rel_diff(&t.decode[..DECODE_STEPS], &reference.decode[..DECODE_STEPS]);
        assert!(pre <= 1e-4, "{name} tp={tp} rank {rank}: prefill max rel diff {pre}");
        assert!(dec <= 1e-4, "{name} tp={tp} rank {rank}: decode max rel diff {dec}");
        assert_eq!(t.greedy, reference.greedy, "{name} tp={tp} rank {rank}: greedy continuation differs");
        assert_eq!(t.greedy.len(), GREEDY_STEPS);
    }
}

#[test]
fn tp2_matches_tp1_on_every_fixture() {
    for s in test_fixtures() {
        check(s.name, 2);
    }
}

#[test]
fn tp4_matches_tp1_on_every_fixture() {
    for s in test_fixtures() {
        check(s.name, 4);
    }
}

/// The parity measures cannot be fooled by a NaN (which `f32::max` skips): one NaN logit in a
/// row makes the difference infinite, so every tolerance fails.
#[test]
fn a_nan_logit_fails_every_tolerance() {
    let reference = vec![vec![0.5f32, -1.0, 2.0]];
    let mut poisoned = reference.clone();
    poisoned[0][1] = f32::NAN;
    assert_eq!(tessera_model::fixture::max_rel_diff(&reference, &reference), 0.0);
    assert!(tessera_model::fixture::max_rel_diff(&poisoned, &reference).is_infinite());
    assert!(tessera_model::fixture::max_rel_diff(&reference, &poisoned).is_infinite());
    assert!(common::max_abs_diff(&poisoned, &reference).is_infinite());
    poisoned[0][1] = f32::INFINITY;
    assert!(common::max_abs_diff(&poisoned, &reference).is_infinite());
}
