//! Harness for tests that run Tessera as real, separate processes on 127.0.0.1.

mod timed;

pub use timed::Timed;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// Path of the `tessera` binary, built once per test process with the dev profile the tests use.
pub fn tessera_bin() -> &'static Path {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| build_tessera(false))
}

/// Path of an optimised `tessera` binary, for benchmarks that compare it with in-process code
/// compiled in release.
pub fn tessera_bin_release() -> &'static Path {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| build_tessera(true))
}

fn build_tessera(release: bool) -> std::path::PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut args = vec!["build", "-q", "-p", "tessera", "--bin", "tessera"];
    if release {
        args.push("--release");
    }
    let status = Command::new(cargo).args(&args).current_dir(&root).status().expect("run cargo build");
    assert!(status.success(), "building the tessera binary failed");
    let target = std::env::var_os("CARGO_TARGET_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| root.join("target"));
    target.join(if release { "release" } else { "debug" }).join("tessera")
}

/// How long a starting `tessera` process may take to print its first line.
pub const STARTUP_PATIENCE: std::time::Duration = std::time::Duration::from_secs(120);

/// The first line a child prints, or an error after [`STARTUP_PATIENCE`]: a child that never
/// gets ready must fail the caller, not hang it.
pub fn first_line(stdout: std::process::ChildStdout) -> anyhow::Result<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = tx.send(read);
    });
    Ok(rx.recv_timeout(STARTUP_PATIENCE).context("the process printed nothing in time")??)
}

/// Starts `bin <args>` and returns it with the first line it printed on stdout (its address,
/// or whatever line says it is ready).
pub fn spawn_tessera<S: AsRef<std::ffi::OsStr>>(bin: &Path, args: &[S]) -> anyhow::Result<(ChildGuard, String)> {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    let process = ChildGuard(child);
    let line = first_line(stdout)?;
    Ok((process, line.trim().to_string()))
}

/// Starts `bin --threads T up --port 0 --model MODEL <args>` and waits for its "serving NAME on
/// URL" line, printed once every group has loaded. Returns the process and the URL.
pub fn spawn_up(bin: &Path, threads: usize, model: &Path, args: &[&str]) -> anyhow::Result<(ChildGuard, String)> {
    let threads = threads.to_string();
    let mut all: Vec<&std::ffi::OsStr> = ["--threads", &threads, "up", "--port", "0", "--model"].map(std::ffi::OsStr::new).to_vec();
    all.push(model.as_os_str());
    all.extend(args.iter().map(std::ffi::OsStr::new));
    let (process, line) = spawn_tessera(bin, &all)?;
    let url = line.rsplit(' ').next().filter(|u| u.starts_with("http://")).with_context(|| format!("tessera up printed {line:?}"))?;
    Ok((process, url.to_string()))
}

/// Starts `tessera worker` on a free port and returns it with the gRPC address it printed.
pub fn spawn_worker(extra_args: &[&str]) -> anyhow::Result<(ChildGuard, SocketAddr)> {
    let args: Vec<&str> = std::iter::once("worker").chain(extra_args.iter().copied()).collect();
    let (guard, line) = spawn_tessera(tessera_bin(), &args)?;
    let addr = line.parse().with_context(|| format!("worker printed {line:?}, not an address"))?;
    Ok((guard, addr))
}

/// What one rank computed: all prefill logits, each greedy step's logits, the greedy tokens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Trace {
    pub prefill: Vec<Vec<f32>>,
    pub decode: Vec<Vec<f32>>,
    pub greedy: Vec<u32>,
}

/// A child process killed when dropped, so a failing test leaves no strays.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `world` rank processes of `program`, each told its rank; reads the port each bound
/// from its first stdout line, then sends every rank the full peer list on stdin — the
/// rendezvous a coordinator performs by RPC in a real cluster.
pub fn spawn_ranks(program: &Path, world: usize, extra_args: &[String]) -> anyhow::Result<Vec<(ChildGuard, BufReader<std::process::ChildStdout>)>> {
    let mut ranks = Vec::with_capacity(world);
    let mut stdins: Vec<ChildStdin> = Vec::with_capacity(world);
    let mut peers: Vec<SocketAddr> = Vec::with_capacity(world);
    for rank in 0..world {
        let mut child = Command::new(program)
            .arg(rank.to_string())
            .arg(world.to_string())
            .args(extra_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("spawn rank {rank}"))?;
        let stdin = child.stdin.take().context("rank stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("rank stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let addr: SocketAddr = line.trim().parse().with_context(|| format!("rank {rank} printed {line:?}, not an address"))?;
        peers.push(addr);
        stdins.push(stdin);
        ranks.push((ChildGuard(child), stdout));
    }
    let list = peers.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" ");
    for mut stdin in stdins {
        writeln!(stdin, "{list}")?;
    }
    if ranks.len() != world {
        bail!("started {} of {world} ranks", ranks.len());
    }
    Ok(ranks)
}

/// Prefill `prompt` as sequence 1, then `steps` greedy decode steps, on one rank of a group.
pub fn greedy_trace(
    model: &tessera_model::Model,
    comm: &mut dyn tessera_collective::Collective,
    prompt: &[u32],
    steps: usize,
) -> anyhow::Result<Trace> {
    use tessera_model::{sampler::argmax, Batch, LogitsMode, SeqChunk};
    let mut kv = model.new_kv_cache();
    let chunk = [SeqChunk { seq: 1, start: 0, len: prompt.len() }];
    let prefill: Vec<Vec<f32>> =
        model.forward(&Batch { tokens: prompt, chunks: &chunk }, &mut kv, comm, LogitsMode::All)?.to_vec2()?;
    let mut next = argmax(prefill.last().context("empty prompt")?);
    let mut greedy = vec![next];
    let mut decode = Vec::with_capacity(steps);
    for i in 0..steps {
        let chunk = [SeqChunk { seq: 1, start: prompt.len() + i, len: 1 }];
        let mut rows: Vec<Vec<f32>> =
            model.forward(&Batch { tokens: &[next], chunks: &chunk }, &mut kv, comm, LogitsMode::LastPerChunk)?.to_vec2()?;
        let row = rows.pop().context("one logits row")?;
        next = argmax(&row);
        decode.push(row);
        if i + 1 < steps {
            greedy.push(next);
        }
    }
    Ok(Trace { prefill, decode, greedy })
}
