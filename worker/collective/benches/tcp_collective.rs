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
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tessera_collective::{Collective, TcpCollective, TcpConfig};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// Repetitions of each bandwidth measurement; the best is reported.
const ROUNDS: usize = 3;

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
        let group = Group::start(world);
        for &bytes in &sizes {
            let s = group.run(Task::Latency { bytes, warmup: 300, iters: 3000, threshold });
            let (p50, p99) = (percentile(&s, 0.50), percentile(&s, 0.99));
            println!("| {world} | {} | {:.1} | {:.1} |", size_label(bytes), micros(p50), micros(p99));
        }
    }
    println!();
}

fn bandwidth_table() {
    println!("## All-reduce bus bandwidth against point-to-point TCP");
    println!();
    println!("Best of {ROUNDS} rounds; each round times the all-reduce and both ceilings back to back,");
    println!("so load from other processes hits them alike. p2p: one thread streams to another.");
    println!("p2p 2-way: two such streams in opposite directions at once, the traffic of a 2-rank ring");
    println!("(GB/s per direction). Path: the algorithm the default threshold picks.");
    println!();
    println!(
        "| ranks | size | path | time (ms) | algbw (GB/s) | busbw (GB/s) | p2p (GB/s) \
         | busbw / p2p | p2p 2-way (GB/s) | busbw / 2-way |"
    );
    println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    let sizes = [(MIB, 40), (4 * MIB, 12), (16 * MIB, 5), (64 * MIB, 2)];
    for world in [2, 4] {
        let group = Group::start(world);
        for &(bytes, iters) in &sizes {
            let (mut op, mut one_way, mut both_ways) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
            for _ in 0..ROUNDS {
                one_way = one_way.min(stream_time(bytes, iters, false));
                both_ways = both_ways.min(stream_time(bytes, iters, true));
                let total = group.run(Task::Bandwidth { bytes, iters })[0];
                op = op.min(total.as_secs_f64() / iters as f64);
            }
            let algbw = bytes as f64 / op / 1e9;
            let busbw = algbw * 2.0 * (world - 1) as f64 / world as f64;
            let (p2p, duplex) = (bytes as f64 / one_way / 1e9, bytes as f64 / both_ways / 1e9);
            let ring = bytes * (world - 1) > TcpCollective::DEFAULT_RING_THRESHOLD;
            println!(
                "| {world} | {} | {} | {:.2} | {algbw:.2} | {busbw:.2} | {p2p:.2} | {:.0}% \
                 | {duplex:.2} | {:.0}% |",
                size_label(bytes),
                if ring { "ring" } else { "direct" },
                op * 1e3,
                100.0 * busbw / p2p,
                100.0 * busbw / duplex
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
    let sizes = [16 * KIB, 64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, MIB, 2 * MIB, 4 * MIB];
    for world in [2, 4] {
        let group = Group::start(world);
        for &bytes in &sizes {
            let iters = (300 * 64 * KIB / bytes).clamp(20, 300);
            let [direct, ring] = [usize::MAX, 0].map(|threshold| {
                let samples = group.run(Task::Latency { bytes, warmup: iters / 10, iters, threshold });
                percentile(&samples, 0.5)
            });
            println!("| {world} | {} | {:.1} | {:.1} |", size_label(bytes), micros(direct), micros(ring));
        }
    }
    println!();
}

/// A TCP group whose ranks are threads of this process, running [`Task`]s on command.
struct Group {
    commands: Vec<mpsc::Sender<Task>>,
    results: mpsc::Receiver<(usize, Vec<Duration>)>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Group {
    fn start(world: usize) -> Self {
        let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind")).collect();
        let peers: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().expect("addr")).collect();
        let (result_tx, results) = mpsc::channel();
        let mut commands = Vec::new();
        let mut threads = Vec::new();
        for (rank, listener) in listeners.into_iter().enumerate() {
            let (command_tx, command_rx) = mpsc::channel::<Task>();
            let result_tx = result_tx.clone();
            let config = TcpConfig::new(rank, peers.clone());
            commands.push(command_tx);
            threads.push(std::thread::spawn(move || {
                let mut comm = TcpCollective::connect(config, listener).expect("connect");
                for task in command_rx {
                    let timings = run_task(&mut comm, task);
                    if result_tx.send((rank, timings)).is_err() {
                        return;
                    }
                }
            }));
        }
        Group { commands, results, threads }
    }

    /// Runs `task` on every rank and returns rank 0's timings.
    fn run(&self, task: Task) -> Vec<Duration> {
        for command in &self.commands {
            command.send(task).expect("rank thread alive");
        }
        let mut rank0 = Vec::new();
        for _ in 0..self.commands.len() {
            let (rank, timings) = self.results.recv().expect("rank thread alive");
            if rank == 0 {
                rank0 = timings;
            }
        }
        rank0
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.commands.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
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

/// Seconds per `bytes` of a plain TCP stream between two threads of this process, streaming
/// `iters` blocks after one warm-up block; with `both_ways`, while another stream runs in the
/// opposite direction over the same connection.
fn stream_time(bytes: usize, iters: usize, both_ways: bool) -> f64 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let far = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        stream.set_nodelay(true).expect("nodelay");
        let reader = both_ways.then(|| {
            let mut stream = stream.try_clone().expect("clone");
            std::thread::spawn(move || drain(&mut stream, bytes, iters))
        });
        pour(&stream, bytes, iters);
        if let Some(reader) = reader {
            reader.join().expect("far reader");
        }
    });
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let writer = both_ways.then(|| {
        let stream = stream.try_clone().expect("clone");
        std::thread::spawn(move || pour(&stream, bytes, iters))
    });
    let elapsed = drain(&mut &stream, bytes, iters);
    if let Some(writer) = writer {
        writer.join().expect("near writer");
    }
    far.join().expect("far end");
    elapsed.as_secs_f64() / iters as f64
}

/// Writes `iters + 1` blocks of `bytes`.
fn pour(mut stream: &TcpStream, bytes: usize, iters: usize) {
    let block = vec![7u8; bytes];
    for _ in 0..=iters {
        stream.write_all(&block).expect("write");
    }
}

/// Reads `iters + 1` blocks of `bytes`, timing all but the first.
fn drain(stream: &mut impl Read, bytes: usize, iters: usize) -> Duration {
    let mut block = vec![0u8; bytes];
    stream.read_exact(&mut block).expect("read");
    let start = Instant::now();
    for _ in 0..iters {
        stream.read_exact(&mut block).expect("read");
    }
    start.elapsed()
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
