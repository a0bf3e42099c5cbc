//! One rank of a TCP collective group as its own process, for the multi-process tests.
//!
//! Usage: `tessera-collective-rank <rank> <world> [full|die|survive]`. The process binds
//! 127.0.0.1:0 and prints `port <p>`, then reads one line from stdin with every rank's port in
//! rank order, connects, prints `connected`, and runs its script:
//!
//! - `full` runs a fixed list of operations and prints one line of results per operation;
//! - `die` exits at once, leaving its peers with dead connections;
//! - `survive` attempts an all-reduce and prints `error <message>` or `ok`.
//!
//! Input values are functions of rank and index, so the test can compute what every line
//! should say.

use std::io::{self, BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::process::ExitCode;
use std::time::Duration;

use tessera_collective::{Collective, TcpCollective, TcpConfig};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tessera-collective-rank: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: tessera-collective-rank <rank> <world> [full|die|survive]";
    let rank: usize = args.first().and_then(|a| a.parse().ok()).ok_or(usage)?;
    let world: usize = args.get(1).and_then(|a| a.parse().ok()).ok_or(usage)?;
    let script = args.get(2).map_or("full", String::as_str);

    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("bind: {e}"))?;
    let port = listener.local_addr().map_err(|e| format!("local_addr: {e}"))?.port();
    say(&format!("port {port}"))?;

    let mut line = String::new();
    io::stdin().lock().read_line(&mut line).map_err(|e| format!("reading peers: {e}"))?;
    let peers: Vec<SocketAddr> = line
        .split_whitespace()
        .map(|p| p.parse::<u16>().map(|p| SocketAddr::from((Ipv4Addr::LOCALHOST, p))))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad peer port list {line:?}: {e}"))?;
    if peers.len() != world {
        return Err(format!("expected {world} ports, got {}", peers.len()));
    }

    let config = TcpConfig { connect_timeout: Duration::from_secs(30), ..TcpConfig::new(rank, peers) };
    let mut comm = TcpCollective::connect(config, listener).map_err(|e| format!("connect: {e}"))?;
    say("connected")?;

    match script {
        "full" => full(&mut comm).map_err(|e| format!("operation failed: {e}"))?,
        // Leave without closing anything gracefully, as a crashed process would.
        "die" => std::process::exit(0),
        "survive" => {
            let mut data = vec![1.0f32; 1 << 20];
            match comm.all_reduce_sum(&mut data) {
                Ok(()) => say("ok")?,
                Err(e) => say(&format!("error {e}"))?,
            }
        }
        other => return Err(format!("unknown script {other:?}; {usage}")),
    }
    say("done")
}

fn full(comm: &mut TcpCollective) -> tessera_collective::Result<()> {
    let (rank, world) = (comm.rank(), comm.world_size());
    for len in [1usize, 7, 1000, 16 * 1024 + 3, 1 << 20] {
        let mut data: Vec<f32> = (0..len).map(|i| exact_value(rank, i)).collect();
        comm.all_reduce_sum(&mut data)?;
        out(format!("allreduce_exact {len} {:016x}", fnv(&data)));
    }
    for len in [7usize, 1 << 20] {
        let mut data: Vec<f32> = (0..len).map(|i| float_value(rank, i)).collect();
        comm.all_reduce_sum(&mut data)?;
        let sum: f64 = data.iter().map(|&v| f64::from(v)).sum();
        out(format!("allreduce_float {len} {:016x} {} {} {sum:e}", fnv(&data), data[0].to_bits(), data[len - 1].to_bits()));
    }
    for len in [5usize, 50_000, 600_000] {
        let local: Vec<f32> = (0..len).map(|i| exact_value(rank, i)).collect();
        let mut gathered = vec![0f32; len * world];
        comm.all_gather(&local, &mut gathered)?;
        out(format!("allgather {len} {:016x}", fnv(&gathered)));
    }
    // Every rank sends before it receives: the sends must not wait for the receiver.
    for len in [1000usize, 300_000] {
        let mine: Vec<f32> = (0..len).map(|i| exact_value(rank + 100, i)).collect();
        let mut theirs = vec![0f32; len];
        comm.send((rank + 1) % world, &mine)?;
        comm.recv((rank + world - 1) % world, &mut theirs)?;
        out(format!("pass {len} {:016x}", fnv(&theirs)));
    }
    Ok(())
}

/// Small integers: sums over a few ranks are exact in any order, so the test knows the bits.
fn exact_value(rank: usize, i: usize) -> f32 {
    ((i * 7 + rank * 13) % 1024) as f32 - 512.0
}

/// Values whose sums round, to check that ranks agree bit for bit.
fn float_value(rank: usize, i: usize) -> f32 {
    (i as f32 * 0.37 + rank as f32 * 1.7).sin() * 1.3 + 0.01 * rank as f32
}

/// FNV-1a over the values' bits.
fn fnv(values: &[f32]) -> u64 {
    values
        .iter()
        .flat_map(|v| v.to_bits().to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

fn out(line: String) {
    // Results go to stdout for the test; a closed pipe only means the test gave up.
    let _ = say(&line);
}

fn say(line: &str) -> Result<(), String> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}").and_then(|()| stdout.flush()).map_err(|e| format!("stdout: {e}"))
}
