//! One tensor-parallel rank as its own OS process, connected to its peers over TCP.
//!
//! usage: tessera-tp-rank RANK WORLD MODEL_DIR STEPS PROMPT_IDS(comma-separated)
//! Prints its listen address, reads the peer list (space-separated) from stdin, runs prefill
//! plus STEPS greedy steps, and prints the trace as one JSON line.
//!
//! With a sixth argument `timing` it instead decodes STEPS tokens after the prompt several times
//! and prints the median step time and the share of it spent in collectives.

use std::io::BufRead;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;

use anyhow::Context;
use std::time::Instant;
use tessera_collective::{TcpCollective, TcpConfig};

use tessera_collective::Collective;
use tessera_model::{sampler::argmax, Batch, LoadConfig, LogitsMode, Model, SeqChunk};
use tessera_tests::{greedy_trace, Timed};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (rank, world, dir, steps, prompt, timing) = match args.as_slice() {
        [r, w, d, s, p] => (r, w, d, s, p, false),
        [r, w, d, s, p, t] if t == "timing" => (r, w, d, s, p, true),
        _ => anyhow::bail!("usage: tessera-tp-rank RANK WORLD MODEL_DIR STEPS PROMPT_IDS [timing]"),
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
    if timing {
        let mut samples = Vec::new();
        for _ in 0..5 {
            samples.push(decode_timing(&model, &mut comm, &prompt, steps)?);
        }
        samples.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (step_ms, share) = samples[samples.len() / 2];
        println!("{{\"step_ms\": {step_ms:.3}, \"collective_share\": {share:.3}}}");
    } else {
        let trace = greedy_trace(&model, &mut comm, &prompt, steps)?;
        println!("{}", serde_json::to_string(&trace)?);
    }
    Ok(())
}

/// Prefills `prompt`, then times `steps` greedy decode steps: (ms per step, share in collectives).
fn decode_timing(model: &Model, comm: &mut (dyn Collective + Send), prompt: &[u32], steps: usize) -> anyhow::Result<(f64, f64)> {
    let mut kv = model.new_kv_cache();
    let chunk = [SeqChunk { seq: 1, start: 0, len: prompt.len() }];
    let logits: Vec<Vec<f32>> =
        model.forward(&Batch { tokens: prompt, chunks: &chunk }, &mut kv, comm, LogitsMode::LastPerChunk)?.to_vec2()?;
    let mut next = argmax(&logits[0]);
    let mut timed = Timed::new(comm);
    let start = Instant::now();
    for i in 0..steps {
        let chunk = [SeqChunk { seq: 1, start: prompt.len() + i, len: 1 }];
        let logits: Vec<Vec<f32>> =
            model.forward(&Batch { tokens: &[next], chunks: &chunk }, &mut kv, &mut timed, LogitsMode::LastPerChunk)?.to_vec2()?;
        next = argmax(&logits[0]);
    }
    let total = start.elapsed().as_secs_f64();
    Ok((total * 1e3 / steps as f64, timed.spent.as_secs_f64() / total))
}
