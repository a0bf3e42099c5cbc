//! Tensor parallelism across separate OS processes over TCP gives the logits and greedy tokens
//! of a single-process TP=1 run, on every fixture shape.

use std::io::BufRead;
use std::path::PathBuf;

use tessera_collective::SingleRank;
use tessera_model::fixture::{max_rel_diff, prompt_ids, test_fixtures, write_fixture, WriteOptions};
use tessera_model::{LoadConfig, Model};
use tessera_tests::{greedy_trace, spawn_ranks, Trace};

const STEPS: usize = 32;
const DECODE_CHECKED: usize = 16;

fn reference(dir: &std::path::Path, prompt: &[u32]) -> Trace {
    let model = Model::load(dir, &LoadConfig::default()).unwrap();
    greedy_trace(&model, &mut SingleRank, prompt, STEPS).unwrap()
}

fn check(tp: usize) {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tcp-fixtures-{}", std::process::id()));
    let program = PathBuf::from(env!("CARGO_BIN_EXE_tessera-tp-rank"));
    for spec in test_fixtures() {
        let dir = write_fixture(&spec, &root, &WriteOptions::default()).unwrap();
        let prompt = prompt_ids(&spec);
        let expected = reference(&dir, &prompt);
        let prompt_arg = prompt.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let args = vec![dir.display().to_string(), STEPS.to_string(), prompt_arg];
        let ranks = spawn_ranks(&program, tp, &args).unwrap();
        for (rank, (mut child, mut out)) in ranks.into_iter().enumerate() {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            let status = child.0.wait().unwrap();
            assert!(status.success(), "{} tp={tp} rank {rank} exited with {status}", spec.name);
            let got: Trace = serde_json::from_str(&line).unwrap_or_else(|e| panic!("rank {rank} output: {e}: {line:?}"));
            let pre = max_rel_diff(&got.prefill, &expected.prefill);
            let dec = max_rel_diff(&got.decode[..DECODE_CHECKED], &expected.decode[..DECODE_CHECKED]);
            assert!(pre <= 1e-4 && dec <= 1e-4, "{} tp={tp} rank {rank}: prefill {pre}, decode {dec}", spec.name);
            assert_eq!(got.greedy, expected.greedy, "{} tp={tp} rank {rank}: greedy differs", spec.name);
        }
    }
}

#[test]
fn tp2_over_tcp_processes_matches_tp1() {
    check(2);
}

#[test]
fn tp4_over_tcp_processes_matches_tp1() {
    check(4);
}
