//! `tessera`: one binary for every role.
//!
//! Today it has `run`, which loads a model in this process — sharded over `--tp` threads that
//! talk through the in-process collective, exactly as separate workers do over TCP — and streams
//! a completion to the terminal.

mod run;

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        anyhow::ensure!(n > 0, "--threads must be at least 1");
        // candle sizes its thread pools from this variable; set it before any math runs.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    match cli.command {
        Command::Run(args) => run::run(args),
    }
}
