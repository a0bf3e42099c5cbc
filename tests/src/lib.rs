//! Harness for tests that run Tessera as real, separate processes on 127.0.0.1.

pub mod certs;
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

/// Starts `bin <args>` with its stdout piped to the caller and its stderr inherited.
fn spawn_piped<S: AsRef<std::ffi::OsStr>>(bin: &Path, args: &[S]) -> anyhow::Result<(ChildGuard, std::process::ChildStdout)> {
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    Ok((ChildGuard(child), stdout))
}

/// Starts `bin <args>` with its stderr (its log) written to `log`, and returns it with its first
/// `lines` stdout lines and the rest of its stdout, kept open so the process can go on printing.
pub fn spawn_logged<S: AsRef<std::ffi::OsStr>>(
    bin: &Path,
    args: &[S],
    log: &Path,
    lines: usize,
) -> anyhow::Result<(ChildGuard, Vec<String>, BufReader<std::process::ChildStdout>)> {
    let stderr = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    let guard = ChildGuard(child);
    let mut stdout = BufReader::new(stdout);
    let mut printed = Vec::with_capacity(lines);
    for _ in 0..lines {
        let (line, rest) = read_line_within(stdout, STARTUP_PATIENCE)
            .with_context(|| format!("log so far: {}", std::fs::read_to_string(log).unwrap_or_default()))?;
        printed.push(line.trim().to_string());
        stdout = rest;
    }
    Ok((guard, printed, stdout))
}

/// Reads `log` until it holds `needle` and returns the log, or fails after `patience`.
pub fn until_logged(log: &Path, needle: &str, patience: std::time::Duration) -> anyhow::Result<String> {
    let deadline = std::time::Instant::now() + patience;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(text);
        }
        if std::time::Instant::now() >= deadline {
            bail!("{} never said {needle:?}; it holds:\n{text}", log.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Starts `bin <args>` and returns it with the first line it printed on stdout (its address,
/// or whatever line says it is ready).
pub fn spawn_tessera<S: AsRef<std::ffi::OsStr>>(bin: &Path, args: &[S]) -> anyhow::Result<(ChildGuard, String)> {
    let (process, stdout) = spawn_piped(bin, args)?;
    let line = first_line(stdout)?;
    Ok((process, line.trim().to_string()))
}

/// Starts `bin up --threads T --port 0 --model MODEL <args>` and waits for its "serving NAME on
/// URL" line, printed once every group has loaded. Returns the process and the URL.
pub fn spawn_up(bin: &Path, threads: usize, model: &Path, args: &[&str]) -> anyhow::Result<(ChildGuard, String)> {
    let threads = threads.to_string();
    let mut all: Vec<&std::ffi::OsStr> = ["up", "--threads", &threads, "--port", "0", "--model"].map(std::ffi::OsStr::new).to_vec();
    all.push(model.as_os_str());
    all.extend(args.iter().map(std::ffi::OsStr::new));
    let (process, line) = spawn_tessera(bin, &all)?;
    let url = line.rsplit(' ').next().filter(|u| u.starts_with("http://")).with_context(|| format!("tessera up printed {line:?}"))?;
    Ok((process, url.to_string()))
}

/// Starts `bin <args>` and returns it with the first two lines it printed on stdout (e.g. its
/// gRPC address, then its HTTP API's URL), and the rest of its stdout, kept open so the process
/// can go on printing.
pub fn spawn_two_lines<S: AsRef<std::ffi::OsStr>>(
    bin: &Path,
    args: &[S],
) -> anyhow::Result<(ChildGuard, String, String, BufReader<std::process::ChildStdout>)> {
    let (process, stdout) = spawn_piped(bin, args)?;
    let stdout = BufReader::new(stdout);
    let (first, stdout) = read_line_within(stdout, STARTUP_PATIENCE)?;
    let (second, stdout) = read_line_within(stdout, STARTUP_PATIENCE)?;
    Ok((process, first, second, stdout))
}

/// [`spawn_up`] with `--http-port 0`: returns the process, the gRPC URL, the OpenAI-compatible
/// API's base URL (`http://127.0.0.1:P/v1`, printed on the line after "serving ..."), and the
/// rest of its stdout.
pub fn spawn_up_with_http(
    bin: &Path,
    threads: usize,
    model: &Path,
    args: &[&str],
) -> anyhow::Result<(ChildGuard, String, String, BufReader<std::process::ChildStdout>)> {
    let threads = threads.to_string();
    let mut all: Vec<&std::ffi::OsStr> =
        ["up", "--threads", &threads, "--port", "0", "--http-port", "0", "--model"].map(std::ffi::OsStr::new).to_vec();
    all.push(model.as_os_str());
    all.extend(args.iter().map(std::ffi::OsStr::new));
    let (process, first, second, stdout) = spawn_two_lines(bin, &all)?;
    let last = |line: &str| line.rsplit(' ').next().unwrap_or_default().to_string();
    let (grpc, http) = (last(&first), last(&second));
    if !grpc.starts_with("http://") || !http.ends_with("/v1") {
        bail!("tessera up printed {first:?} and {second:?}");
    }
    Ok((process, grpc, http, stdout))
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
pub fn spawn_ranks(
    program: &Path,
    world: usize,
    extra_args: &[String],
) -> anyhow::Result<Vec<(ChildGuard, BufReader<std::process::ChildStdout>)>> {
    let args: Vec<Vec<String>> =
        (0..world).map(|rank| [rank.to_string(), world.to_string()].into_iter().chain(extra_args.iter().cloned()).collect()).collect();
    let launch = RankLaunch { program, args, env: Vec::new(), listeners: 1 };
    launch.spawn(|_, addresses| vec![addresses.iter().map(|a| a[0]).collect()])
}

/// A group of rank processes that each bind `listeners` sockets before meeting their peers:
/// each prints its addresses, space-separated, on its first stdout line, then reads one peer
/// list per line from stdin.
pub struct RankLaunch<'a> {
    pub program: &'a Path,
    /// The arguments of each rank process, one entry per rank.
    pub args: Vec<Vec<String>>,
    /// Environment variables set on every rank process.
    pub env: Vec<(String, String)>,
    /// Addresses each rank prints.
    pub listeners: usize,
}

impl RankLaunch<'_> {
    /// Starts every rank (each must print its addresses within [`STARTUP_PATIENCE`]), then
    /// writes to rank `i` the lines of `peer_lists(i, addresses)`, where `addresses[j]` are
    /// the addresses rank `j` printed. Returns the processes, killed on drop, with their
    /// stdout after the first line.
    pub fn spawn(
        &self,
        peer_lists: impl Fn(usize, &[Vec<SocketAddr>]) -> Vec<Vec<SocketAddr>>,
    ) -> anyhow::Result<Vec<(ChildGuard, BufReader<std::process::ChildStdout>)>> {
        let world = self.args.len();
        let mut ranks = Vec::with_capacity(world);
        let mut stdins: Vec<ChildStdin> = Vec::with_capacity(world);
        let mut addresses: Vec<Vec<SocketAddr>> = Vec::with_capacity(world);
        for (rank, args) in self.args.iter().enumerate() {
            let mut child = Command::new(self.program)
                .args(args)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("spawn rank {rank}"))?;
            let stdin = child.stdin.take().context("rank stdin")?;
            let stdout = child.stdout.take().context("rank stdout")?;
            let guard = ChildGuard(child);
            let (line, stdout) = read_line_within(BufReader::new(stdout), STARTUP_PATIENCE)
                .with_context(|| format!("rank {rank} did not print its addresses"))?;
            let addrs: Vec<SocketAddr> = line
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .with_context(|| format!("rank {rank} printed {line:?}, not addresses"))?;
            if addrs.len() != self.listeners {
                bail!("rank {rank} printed {} addresses, not {}: {line:?}", addrs.len(), self.listeners);
            }
            addresses.push(addrs);
            stdins.push(stdin);
            ranks.push((guard, stdout));
        }
        for (rank, mut stdin) in stdins.into_iter().enumerate() {
            for list in peer_lists(rank, &addresses) {
                let list = list.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" ");
                writeln!(stdin, "{list}").with_context(|| format!("send peers to rank {rank}"))?;
            }
        }
        if ranks.len() != world {
            bail!("started {} of {world} ranks", ranks.len());
        }
        Ok(ranks)
    }
}

/// The next line `reader` yields, with the reader for later lines, or an error after
/// `patience` (or at end of output): a child that stops talking fails the caller instead of
/// hanging it. On timeout the reader is lost to a thread that ends when the child's stdout
/// closes (as it does once the child is killed).
pub fn read_line_within<R: BufRead + Send + 'static>(mut reader: R, patience: std::time::Duration) -> anyhow::Result<(String, R)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = reader.read_line(&mut line).map(|n| (n, line));
        let _ = tx.send(read.map(|(n, line)| (n, line, reader)));
    });
    let (n, line, reader) = rx.recv_timeout(patience).context("the process printed nothing in time")??;
    if n == 0 {
        bail!("the process closed its output");
    }
    Ok((line.trim_end().to_string(), reader))
}

/// What one rank of a sequence-parallel ring computed (the `tessera-sp-rank` binary's output).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RingTrace {
    /// Member of the ring and tensor-parallel rank inside it.
    pub member: usize,
    pub tp_rank: usize,
    /// Prefill logits of the rows this member computed, each with its global position.
    pub local: Vec<(usize, Vec<f32>)>,
    /// Prefill logits of the prompt's last token.
    pub last: Vec<f32>,
    /// Logits of each greedy decode step.
    pub decode: Vec<Vec<f32>>,
    /// The greedy tokens: one from the prefill, then one from each decode step but the last.
    pub greedy: Vec<u32>,
    /// Tokens each member holds at the end, as this rank records them.
    pub held: Vec<usize>,
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
    let prefill: Vec<Vec<f32>> = model.forward(&Batch { tokens: prompt, chunks: &chunk }, &mut kv, comm, LogitsMode::All)?.to_vec2()?;
    // `argmax` skips NaN: a non-finite logit must fail the trace, not pick another token.
    let finite = |rows: &[Vec<f32>], what: &str| -> anyhow::Result<()> {
        anyhow::ensure!(rows.iter().flatten().all(|v| v.is_finite()), "a non-finite logit in {what}");
        Ok(())
    };
    finite(&prefill, "the prefill")?;
    let mut next = argmax(prefill.last().context("empty prompt")?);
    let mut greedy = vec![next];
    let mut decode = Vec::with_capacity(steps);
    for i in 0..steps {
        let chunk = [SeqChunk { seq: 1, start: prompt.len() + i, len: 1 }];
        let mut rows: Vec<Vec<f32>> =
            model.forward(&Batch { tokens: &[next], chunks: &chunk }, &mut kv, comm, LogitsMode::LastPerChunk)?.to_vec2()?;
        let row = rows.pop().context("one logits row")?;
        finite(std::slice::from_ref(&row), &format!("decode step {i}"))?;
        next = argmax(&row);
        decode.push(row);
        if i + 1 < steps {
            greedy.push(next);
        }
    }
    Ok(Trace { prefill, decode, greedy })
}
