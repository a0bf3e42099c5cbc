//! One tensor-parallel rank as its own OS process, connected to its peers over TCP.
//!
//! usage: tessera-tp-rank RANK WORLD MODEL_DIR STEPS PROMPT_IDS(comma-separated)
//! Prints its listen address, reads the peer list (space-separated) from stdin, runs prefill
//! plus STEPS greedy steps, and prints the trace as one JSON line.

use std::io::BufRead;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;

use anyhow::Context;
use tessera_collective::{TcpCollective, TcpConfig};
use tessera_model::{LoadConfig, Model};
use tessera_tests::greedy_trace;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [rank, world, dir, steps, prompt] = args.as_slice() else {
        anyhow::bail!("usage: tessera-tp-rank RANK WORLD MODEL_DIR STEPS PROMPT_IDS");
    };
    let (rank, world, steps): (usize, usize, usize) = (rank.parse()?, world.parse()?, steps.parse()?);
    let prompt: Vec<u32> = prompt.split(',').map(str::parse).collect::<Result<_, _>>()?;

    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("{}", listener.local_addr()?);
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let peers: Vec<SocketAddr> = line.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
    let mut comm = TcpCollective::connect(TcpConfig::new(rank, peers), listener).context("rendezvous")?;

    let load = LoadConfig { tp_rank: rank, tp_size: world, ..LoadConfig::default() };
    let model = Model::load(&PathBuf::from(dir), &load)?;
    let trace = greedy_trace(&model, &mut comm, &prompt, steps)?;
    println!("{}", serde_json::to_string(&trace)?);
    Ok(())
}
