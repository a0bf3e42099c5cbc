//! The TCP backend with every rank in its own OS process (`tessera-collective-rank`): the
//! printed results must match values computed here, and a process that dies must turn into
//! errors on the others rather than hangs.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use common::{exact_value, float_value, fnv, rank_order_sum, HANG_LIMIT};

const RANK_BIN: &str = env!("CARGO_BIN_EXE_tessera-collective-rank");

/// Kills every child still running when the test ends, however it ends.
struct Ranks(Vec<Child>);

impl Drop for Ranks {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts one process per script, wires them together, and returns each one's stdout lines
/// after `connected`.
fn run_processes(scripts: &[&str]) -> Vec<Vec<String>> {
    let world = scripts.len();
    let mut ranks = Ranks(Vec::new());
    let (tx, rx) = mpsc::channel::<(usize, Option<String>)>();
    for (rank, script) in scripts.iter().enumerate() {
        let mut child = Command::new(RANK_BIN)
            .args([rank.to_string(), world.to_string(), script.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn rank process");
        let stdout = child.stdout.take().expect("piped stdout");
        ranks.0.push(child);
        // One reader per process, so a silent process cannot block reading the others.
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((rank, Some(line))).is_err() {
                    return;
                }
            }
            let _ = tx.send((rank, None));
        });
    }
    drop(tx);

    let mut ports: Vec<Option<String>> = vec![None; world];
    let mut lines: Vec<Vec<String>> = vec![Vec::new(); world];
    let mut finished = 0;
    while finished < world {
        let (rank, line) = rx.recv_timeout(HANG_LIMIT).unwrap_or_else(|_| panic!("rank processes hung; output so far: {lines:?}"));
        match line {
            Some(line) => match line.strip_prefix("port ") {
                Some(port) if ports[rank].is_none() => {
                    ports[rank] = Some(port.to_string());
                    if ports.iter().all(Option::is_some) {
                        let list: Vec<String> = ports.iter().flatten().cloned().collect();
                        for child in &mut ranks.0 {
                            let stdin = child.stdin.as_mut().expect("piped stdin");
                            writeln!(stdin, "{}", list.join(" ")).expect("write peer list");
                        }
                    }
                }
                _ => lines[rank].push(line),
            },
            None => finished += 1,
        }
    }
    for (rank, child) in ranks.0.iter_mut().enumerate() {
        let status = child.wait().expect("wait for rank");
        assert!(status.success(), "rank {rank} exited with {status}; output {:?}", lines[rank]);
    }
    lines
}

/// What rank `rank` of `world` should print for the `full` script.
fn expected_full(world: usize, rank: usize) -> Vec<String> {
    let mut lines = vec!["connected".to_string()];
    for len in [1usize, 7, 1000, 16 * 1024 + 3, 1 << 20] {
        let sum = rank_order_sum(world, len, exact_value);
        lines.push(format!("allreduce_exact {len} {:016x}", fnv(&sum)));
    }
    lines.push("FLOAT 7".to_string());
    lines.push(format!("FLOAT {}", 1 << 20));
    for len in [5usize, 50_000, 600_000] {
        let gathered: Vec<f32> = (0..world).flat_map(|r| (0..len).map(move |i| exact_value(r, i))).collect();
        lines.push(format!("allgather {len} {:016x}", fnv(&gathered)));
    }
    let prev = (rank + world - 1) % world;
    for len in [1000usize, 300_000] {
        let theirs: Vec<f32> = (0..len).map(|i| exact_value(prev + 100, i)).collect();
        lines.push(format!("pass {len} {:016x}", fnv(&theirs)));
    }
    lines.push("done".to_string());
    lines
}

/// Checks an `allreduce_float <len> <fnv> <first bits> <last bits> <f64 sum>` line against an
/// f64 reference; ranks must additionally agree on the fnv, checked by the caller.
fn check_float_line(line: &str, world: usize, len: usize) {
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields.len(), 6, "{line}");
    assert_eq!(fields[0], "allreduce_float", "{line}");
    assert_eq!(fields[1].parse::<usize>().expect("len"), len, "{line}");
    let close = |got: f64, index: usize| {
        let exact: f64 = (0..world).map(|r| f64::from(float_value(r, index))).sum();
        let scale: f64 = (0..world).map(|r| f64::from(float_value(r, index)).abs()).sum();
        assert!((got - exact).abs() <= 1e-5 * scale, "{line}: element {index} is {got}, reference {exact}");
    };
    close(f64::from(f32::from_bits(fields[3].parse().expect("bits"))), 0);
    close(f64::from(f32::from_bits(fields[4].parse().expect("bits"))), len - 1);
    let sum: f64 = fields[5].parse().expect("sum");
    let exact: f64 = (0..len).flat_map(|i| (0..world).map(move |r| f64::from(float_value(r, i)))).sum();
    let scale: f64 = (0..len).flat_map(|i| (0..world).map(move |r| f64::from(float_value(r, i)).abs())).sum();
    assert!((sum - exact).abs() <= 1e-5 * scale, "{line}: sum {sum}, reference {exact}");
}

fn check_full_group(world: usize) {
    let outputs = run_processes(&vec!["full"; world]);
    for (rank, lines) in outputs.iter().enumerate() {
        let expected = expected_full(world, rank);
        assert_eq!(lines.len(), expected.len(), "rank {rank}: {lines:?}");
        for (got, want) in lines.iter().zip(&expected) {
            match want.strip_prefix("FLOAT ") {
                Some(len) => check_float_line(got, world, len.parse().expect("len")),
                None => assert_eq!(got, want, "rank {rank}"),
            }
        }
    }
    // Rounded sums must still be bit-identical across processes.
    for k in 0..outputs[0].len() {
        if outputs[0][k].starts_with("allreduce_float") {
            assert!(outputs.iter().all(|o| o[k] == outputs[0][k]), "ranks disagree: {outputs:?}");
        }
    }
}

#[test]
fn two_processes_compute_the_expected_results() {
    check_full_group(2);
}

#[test]
fn four_processes_compute_the_expected_results() {
    check_full_group(4);
}

#[test]
fn a_dead_process_gives_errors_on_the_others() {
    let outputs = run_processes(&["survive", "die", "survive"]);
    assert_eq!(outputs[1], vec!["connected".to_string()]);
    for rank in [0, 2] {
        assert_eq!(outputs[rank].len(), 3, "rank {rank}: {:?}", outputs[rank]);
        assert!(outputs[rank][1].starts_with("error "), "rank {rank}: {:?}", outputs[rank]);
        assert_eq!(outputs[rank][2], "done");
    }
}
