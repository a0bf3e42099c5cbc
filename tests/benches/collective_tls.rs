//! What sealing the collective's records costs: all-reduce over TCP between two ranks (threads of
//! this process on 127.0.0.1), plain against mutual TLS with encrypted records, rounds alternated
//! so load from elsewhere hits both alike. Small sizes report the median time of one all-reduce
//! (a TP decode step makes two per layer, of hidden x 4 bytes per token: 2.25 KiB for SmolLM2);
//! large ones the best throughput.
//!
//! usage: cargo bench -p tessera-tests --bench collective_tls [-- ROUNDS]

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tessera_collective::{Collective, TcpCollective, TcpConfig};
use tessera_tests::certs::{collective_tls, TestCa};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Runs `iters` all-reduces of `bytes` on a fresh 2-rank group; returns rank 0's time of each.
fn measure(ca: Option<&TestCa>, bytes: usize, iters: usize) -> Vec<Duration> {
    let listeners: Vec<TcpListener> = (0..2).map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind")).collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr().expect("addr")).collect();
    let ranks: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, listener)| {
            let tls = ca.map(|ca| collective_tls(&ca.leaf(&format!("rank{rank}")).expect("leaf")));
            let config = TcpConfig { tls, ..TcpConfig::new(rank, peers.clone()) };
            std::thread::spawn(move || {
                let mut comm = TcpCollective::connect(config, listener).expect("connect");
                let mut data = vec![1.0f32; bytes / 4];
                for _ in 0..iters / 10 {
                    comm.all_reduce_sum(&mut data).expect("warm-up");
                }
                (0..iters)
                    .map(|_| {
                        data.fill(1.0);
                        let start = Instant::now();
                        comm.all_reduce_sum(&mut data).expect("all-reduce");
                        start.elapsed()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut times: Vec<Vec<Duration>> = ranks.into_iter().map(|t| t.join().expect("rank")).collect();
    times.swap_remove(0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args().skip(1).find(|a| !a.starts_with("--")).and_then(|a| a.parse().ok()).unwrap_or(2);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("collective-tls-bench-{}", std::process::id()));
    let ca = TestCa::new(&dir, "bench").expect("CA");
    println!("| size | round | plain | TLS | TLS / plain |");
    println!("|---:|---:|---:|---:|---:|");
    for (bytes, iters) in [(2304, 3000), (64 * KIB, 1000), (MIB, 100), (16 * MIB, 10)] {
        for round in 1..=rounds {
            let (plain, sealed) = (measure(None, bytes, iters), measure(Some(&ca), bytes, iters));
            let (label, p, s) = if bytes < MIB {
                (format!("{:.2} KiB", bytes as f64 / KIB as f64), median(plain).as_secs_f64(), median(sealed).as_secs_f64())
            } else {
                let best = |v: Vec<Duration>| v.into_iter().min().unwrap_or_default().as_secs_f64();
                (format!("{} MiB", bytes / MIB), best(plain), best(sealed))
            };
            let show = |t: f64| if bytes < MIB { format!("{:.1} us", t * 1e6) } else { format!("{:.2} GB/s", bytes as f64 / t / 1e9) };
            println!("| {label} | {round} | {} | {} | {:.2}x time |", show(p), show(s), s / p);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
