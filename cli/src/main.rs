//! `tessera`: one binary for every role.
//!
//! `up` starts a local cluster (a coordinator in this process plus worker processes) and
//! `generate` streams a completion from it; `bench` measures a coordinator's serving throughput and
//! latencies under many concurrent requests. `coordinator` and `worker` are the two roles of a
//! real deployment: the coordinator serves `tessera.v1`, each worker one tensor-parallel rank.
//! `run` loads a model in this process — sharded over `--tp` threads that talk through the
//! in-process collective, exactly as separate workers do over TCP — and streams a completion.

mod bench;
mod coordinator;
mod generate;
mod record;
mod run;
mod serve_args;
mod signal;
mod up;
mod worker;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tessera", version, about = "Distributed LLM inference")]
struct Cli {
    /// Compute threads for the math (default: every core).
    #[arg(long, global = true)]
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
}

fn main() -> anyhow::Result<()> {
    // Before any thread starts: candle reads this when its element-wise pool starts.
    tessera_model::limit_candle_spinning();
    let cli = Cli::parse();
    // Logs go to stderr so stdout stays for results; RUST_LOG overrides the level.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if let Some(n) = cli.threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        // candle sizes its thread pools from this variable; set it before any math runs.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    match cli.command {
        Command::Up(args) => up::run(args, cli.threads),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Coordinator(args) => coordinator::run(args),
        Command::Run(args) => run::run(args),
        Command::Worker(args) => worker::run(args),
    }
}
