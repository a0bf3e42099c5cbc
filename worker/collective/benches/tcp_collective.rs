//! Loopback benchmark of the TCP collectives, printed as markdown tables:
//!
//! - all-reduce latency (p50/p99) for small buffers at 2 and 4 ranks;
//! - all-reduce bus bandwidth (algorithm bandwidth x 2(n-1)/n) for large buffers, next to a
//!   plain point-to-point TCP transfer of the same bytes between two threads, the ceiling;
//! - direct exchange against ring around the switch-over, which is how
//!   `TcpCollective::DEFAULT_RING_THRESHOLD` was chosen.
//!
//! Ranks are threads of this one process, each with its own `TcpCollective` over 127.0.0.1,
//! so all ranks share this machine's cores: at 4 ranks on a small machine the numbers measure
//! CPU contention as much as the algorithm.
//!
//! Run with `cargo bench -p tessera-collective --bench tcp_collective`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tessera_collective::{Collective, TcpCollective, TcpConfig};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// One measurement, run by every rank in the same order.
#[derive(Clone, Copy)]
enum Task {
    /// Times each of `iters` all-reduces of `bytes`, after `warmup` untimed ones.
    Latency { bytes: usize, warmup: usize, iters: usize, threshold: usize },
    /// Times `iters` back-to-back all-reduces of `bytes` as a whole.
    Bandwidth { bytes: usize, iters: usize },
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("# TCP collective benchmark");
    println!();
    println!("Ranks are threads of one process on 127.0.0.1 ({cores} cores available).");
    println!();
    let started = Instant::now();
    latency_table();
    bandwidth_table();
    crossover_table();
    println!("Total benchmark time: {:.1} s", started.elapsed().as_secs_f64());
}

fn latency_table() {
    println!("## All-reduce latency");
    println!();
    println!("| ranks | size | p50 (us) | p99 (us) |");
    println!("|---:|---:|---:|---:|");
    let sizes = [64, KIB, 4 * KIB, 64 * KIB];
    for world in [2, 4] {
        let threshold = TcpCollective::DEFAULT_RING_THRESHOLD;
        let tasks: Vec<Task> =
            sizes.iter().map(|&bytes| Task::Latency { bytes, warmup: 300, iters: 3000, threshold }).collect();
        let samples = run_group(world, &tasks);
        for (bytes, s) in sizes.iter().zip(samples) {
            let (p50, p99) = (percentile(&s, 0.50), percentile(&s, 0.99));
            println!("| {world} | {} | {:.1} | {:.1} |", size_label(*bytes), micros(p50), micros(p99));
        }
    }
    println!();
}

fn bandwidth_table() {
    println!("## All-reduce bus bandwidth against point-to-point TCP");
    println!();
    println!("| ranks | size | time (ms) | algbw (GB/s) | busbw (GB/s) | p2p (GB/s) | busbw / p2p |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let sizes = [(MIB, 40), (4 * MIB, 12), (16 * MIB, 5), (64 * MIB, 3)];
    let p2p: Vec<f64> = sizes.iter().map(|&(bytes, iters)| point_to_point(bytes, iters)).collect();
    for world in [2, 4] {
        let tasks: Vec<Task> = sizes.iter().map(|&(bytes, iters)| Task::Bandwidth { bytes, iters }).collect();
        let samples = run_group(world, &tasks);
        for ((&(bytes, iters), s), ceiling) in sizes.iter().zip(samples).zip(&p2p) {
            let per_op = s[0].as_secs_f64() / iters as f64;
            let algbw = bytes as f64 / per_op / 1e9;
            let busbw = algbw * 2.0 * (world - 1) as f64 / world as f64;
            println!(
                "| {world} | {} | {:.2} | {algbw:.2} | {busbw:.2} | {ceiling:.2} | {:.0}% |",
                size_label(bytes),
                per_op * 1e3,
                100.0 * busbw / ceiling
            );
        }
    }
    println!();
}

fn crossover_table() {
    println!("## Direct exchange against ring (p50 latency, us)");
    println!();
    println!("| ranks | size | direct | ring |");
    println!("|---:|---:|---:|---:|");
    let sizes = [16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB, 256 * KIB];
    for world in [2, 4] {
        let mut tasks = Vec::new();
        for &bytes in &sizes {
            for threshold in [usize::MAX, 0] {
                tasks.push(Task::Latency { bytes, warmup: 30, iters: 300, threshold });
            }
        }
        let samples = run_group(world, &tasks);
        for (bytes, pair) in sizes.iter().zip(samples.chunks(2)) {
            let (direct, ring) = (percentile(&pair[0], 0.5), percentile(&pair[1], 0.5));
            println!("| {world} | {} | {:.1} | {:.1} |", size_label(*bytes), micros(direct), micros(ring));
        }
    }
    println!();
}

/// Runs `tasks` on a fresh group of `world` thread ranks and returns rank 0's timings, one
/// vector per task.
fn run_group(world: usize, tasks: &[Task]) -> Vec<Vec<Duration>> {
    let listeners: Vec<TcpListener> =
        (0..world).map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind")).collect();
    let peers: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().expect("addr")).collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let config = TcpConfig::new(rank, peers.clone());
                scope.spawn(move || {
                    let mut comm = TcpCollective::connect(config, listener).expect("connect");
                    tasks.iter().map(|task| run_task(&mut comm, *task)).collect::<Vec<_>>()
                })
            })
            .collect();
        let mut results: Vec<Vec<Vec<Duration>>> =
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect();
        results.swap_remove(0)
    })
}

fn run_task(comm: &mut TcpCollective, task: Task) -> Vec<Duration> {
    let rank = comm.rank() as f32;
    match task {
        Task::Latency { bytes, warmup, iters, threshold } => {
            comm.set_ring_threshold(threshold);
            let mut data = vec![rank; bytes / 4];
            for _ in 0..warmup {
                comm.all_reduce_sum(&mut data).expect("all_reduce_sum");
            }
            let samples = (0..iters)
                .map(|_| {
                    let start = Instant::now();
                    comm.all_reduce_sum(&mut data).expect("all_reduce_sum");
                    start.elapsed()
                })
                .collect();
            comm.set_ring_threshold(TcpCollective::DEFAULT_RING_THRESHOLD);
            samples
        }
        Task::Bandwidth { bytes, iters } => {
            let mut data = vec![rank; bytes / 4];
            // One untimed round warms buffers and lines the ranks up.
            comm.all_reduce_sum(&mut data).expect("all_reduce_sum");
            let start = Instant::now();
            for _ in 0..iters {
                comm.all_reduce_sum(&mut data).expect("all_reduce_sum");
            }
            vec![start.elapsed()]
        }
    }
}

/// GB/s of a plain one-way TCP transfer of `bytes` between two threads, the best loopback can
/// do with one connection: each round the receiver asks for the bytes and times their arrival.
fn point_to_point(bytes: usize, iters: usize) -> f64 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let sender = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream.set_nodelay(true).expect("nodelay");
        let payload = vec![7u8; bytes];
        let mut go = [0u8; 1];
        for _ in 0..=iters {
            stream.read_exact(&mut go).expect("go");
            stream.write_all(&payload).expect("payload");
        }
    });
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let mut buf = vec![0u8; bytes];
    let mut total = Duration::ZERO;
    for round in 0..=iters {
        let start = Instant::now();
        stream.write_all(&[1]).expect("go");
        stream.read_exact(&mut buf).expect("payload");
        // Round 0 warms up the connection.
        if round > 0 {
            total += start.elapsed();
        }
    }
    sender.join().expect("sender");
    bytes as f64 * iters as f64 / total.as_secs_f64() / 1e9
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn size_label(bytes: usize) -> String {
    match bytes {
        b if b >= MIB => format!("{} MiB", b / MIB),
        b if b >= KIB => format!("{} KiB", b / KIB),
        b => format!("{b} B"),
    }
}
