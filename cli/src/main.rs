//! `tessera`: one binary for every role.
//!
//! `worker` serves one tensor-parallel rank over gRPC. `run` loads a model in this process — sharded over `--tp` threads that
//! talk through the in-process collective, exactly as separate workers do over TCP — and streams
//! a completion to the terminal.

mod run;
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
    /// Load a model in this process and stream a completion.
    Run(run::RunArgs),
    /// Serve one tensor-parallel rank to a coordinator over gRPC.
    Worker(worker::WorkerArgs),
}

fn main() -> anyhow::Result<()> {
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
        Command::Run(args) => run::run(args),
        Command::Worker(args) => worker::run(args),
    }
}
