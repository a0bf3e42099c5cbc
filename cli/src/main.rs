//! `tessera`: one binary for every role.
//!
//! `up` starts a local cluster (a coordinator in this process plus worker processes) and
//! `generate` streams a completion from it; `bench` measures a coordinator's serving throughput and
//! latencies under many concurrent requests. `coordinator` and `worker` are the two roles of a
//! real deployment: the coordinator serves `tessera.v1`, each worker one tensor-parallel rank.
//! `run` loads a model in this process — sharded over `--tp` threads that talk through the
//! in-process collective, exactly as separate workers do over TCP — and streams a completion.

#![deny(unsafe_op_in_unsafe_fn)]

mod bench;
mod bench_http;
mod child;
mod client;
mod coordinator;
mod etcd_args;
mod generate;
mod group;
mod keygen;
mod record;
mod run;
mod serve_args;
mod signal;
mod tls_args;
mod up;
mod worker;

use clap::{Args, Parser, Subcommand};

/// Flags of the commands that run the math.
#[derive(Args, Debug, Clone, Default)]
pub struct ComputeArgs {
    /// Compute threads for the math (default: every core; `up` splits the cores between its
    /// workers).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Parser)]
#[command(name = "tessera", version, about = "Distributed LLM inference")]
struct Cli {
    /// Also accepted before the command (`tessera --threads N up`), as earlier versions took it.
    #[arg(long, hide = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a local cluster: a coordinator and worker processes, ready for `generate`.
    Up(up::UpArgs),
    /// Stream a completion from a running coordinator.
    Generate(generate::GenerateArgs),
    /// Measure a coordinator under load: throughput, TTFT, TPOT, inter-token latency, goodput.
    Bench(bench::BenchArgs),
    /// Serve the public API for workers that register in etcd.
    Coordinator(coordinator::CoordinatorArgs),
    /// Load a model in this process and stream a completion.
    Run(run::RunArgs),
    /// Serve one tensor-parallel rank to a coordinator over gRPC.
    Worker(worker::WorkerArgs),
    /// Run one tensor-parallel group's ranks as one unit (a pod): started, stopped and
    /// restarted together, formed into one group and never mixed with another unit's.
    Group(group::GroupArgs),
    /// Make a new API key and the line of the --api-keys file that accepts it.
    Keygen(keygen::KeygenArgs),
}

fn main() -> anyhow::Result<()> {
    // Before any thread starts: candle reads this when its element-wise pool starts.
    tessera_model::limit_candle_spinning();
    let cli = Cli::parse();
    // Only the commands that compute take `--threads`; a client's help does not offer it.
    let threads = cli.threads.or(match &cli.command {
        Command::Up(a) => a.compute.threads,
        Command::Run(a) => a.compute.threads,
        Command::Worker(a) => a.compute.threads,
        Command::Generate(_) | Command::Bench(_) | Command::Coordinator(_) | Command::Group(_) | Command::Keygen(_) => None,
    });
    // Logs go to stderr so stdout stays for results; RUST_LOG overrides the level.
    // Colours only on a terminal, and never with NO_COLOR set (https://no-color.org): logs
    // piped to a file or collected by Kubernetes stay plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if let Some(n) = threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        // candle sizes its thread pools from this variable; set it before any math runs.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    match cli.command {
        Command::Up(args) => up::run(args, threads),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Coordinator(args) => coordinator::run(args),
        Command::Run(args) => run::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Group(args) => group::run(args),
        Command::Keygen(args) => keygen::run(args),
    }
}
