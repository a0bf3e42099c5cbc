//! Decode step latency of TP=2 over TCP (two OS processes on loopback) against TP=1, and the
//! share of the TP=2 step spent in collectives.
//!
//! usage: cargo bench -p tessera-tests --bench tp_decode -- MODEL_DIR
//! (MODEL_DIR: `tessera-fixtures DIR smol135-tp`, the SmolLM-135M-sized model with 8 heads)
//! Each rank process gets an equal share of the cores (RAYON_NUM_THREADS), so TP=2 and TP=1
//! use the same hardware.

use std::io::BufRead;
use std::path::PathBuf;

use tessera_tests::spawn_ranks;

fn run(program: &std::path::Path, world: usize, dir: &str, threads: usize) -> anyhow::Result<Vec<String>> {
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let prompt = (0..128u32).map(|i| ((i * 7919 + 13) % 49152).to_string()).collect::<Vec<_>>().join(",");
    let args = vec![dir.to_string(), "64".to_string(), prompt, "timing".to_string()];
    let mut lines = Vec::new();
    for (mut child, mut out) in spawn_ranks(program, world, &args)? {
        let mut line = String::new();
        out.read_line(&mut line)?;
        anyhow::ensure!(child.0.wait()?.success(), "rank failed");
        lines.push(line.trim().to_string());
    }
    Ok(lines)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let dir = args.first().cloned().unwrap_or_else(|| "/tmp/tessera-bench/smol135-tp".into());
    let program = PathBuf::from(env!("CARGO_BIN_EXE_tessera-tp-rank"));
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    println!("model {dir}, {cores} cores");
    println!("TP=1 ({cores} threads): {:?}", run(&program, 1, &dir, cores)?);
    println!("TP=2 over TCP ({} thread(s) per rank): {:?}", (cores / 2).max(1), run(&program, 2, &dir, (cores / 2).max(1))?);
    println!("TP=1 (1 thread, the per-rank share): {:?}", run(&program, 1, &dir, (cores / 2).max(1))?);
    Ok(())
}
