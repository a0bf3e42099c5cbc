//! `tessera group`: one tensor-parallel group as one unit (on Kubernetes, one pod).
//!
//! It starts the group's `--tp` ranks as `tessera worker` processes that all name this group
//! (`--group NAME`), so a coordinator forms exactly these ranks into one group and never mixes
//! them with another unit's. The unit lives and dies whole: SIGTERM is passed to every rank
//! (each drains its running sequences, then leaves the registry), and when one rank exits on
//! its own the others are stopped and the command fails, so whatever restarts it (the kubelet)
//! restarts the whole group. The ranks' metrics are served together on one port.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use futures_util::future::select_all;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Child;

use crate::signal::shutdown_signal;

/// Most ranks one unit runs.
const MAX_TP: u64 = 64;
/// Longest wait for one rank's metrics in a scrape.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);
/// Most bytes read of one rank's metrics.
const MAX_SCRAPE_BYTES: u64 = 4 << 20;
/// Worker flags the unit sets for each rank itself.
const OWN_FLAGS: [&str; 5] = ["--listen", "--id", "--group", "--threads", "--metrics-listen"];

#[derive(Args, Debug, Clone)]
pub struct GroupArgs {
    /// Ranks to run: the tensor-parallel degree the coordinator forms groups of (its --tp).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_TP))]
    tp: u64,
    /// Name of this unit, e.g. its pod's name: every rank's --group, and the ranks' ids are
    /// NAME-r0, NAME-r1, ...
    #[arg(long)]
    name: String,
    /// Address the ranks listen on.
    #[arg(long, default_value = "127.0.0.1")]
    listen_host: IpAddr,
    /// Port of rank 0; rank r listens on PORT + r. 0: every rank picks a free port.
    #[arg(long, default_value_t = 7000)]
    port: u16,
    /// Compute threads of the whole unit, split evenly between the ranks (default: every
    /// core). On Kubernetes, the container's CPU limit.
    #[arg(long)]
    threads: Option<usize>,
    /// Serve every rank's Prometheus metrics together at http://ADDR/metrics; port 0 picks
    /// a free port (its URL is the last line printed after the ranks' addresses).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// `tessera worker` flags for every rank, after `--` (--etcd, --advertise-host,
    /// --kv-capacity-tokens, --drain-timeout-secs, TLS, ...).
    #[arg(last = true, value_name = "WORKER FLAGS")]
    worker_args: Vec<String>,
}

/// One running rank.
struct Rank {
    id: String,
    child: Child,
    /// Its own metrics endpoint on loopback, when the unit serves metrics.
    metrics: Option<SocketAddr>,
}

pub fn run(args: GroupArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: GroupArgs) -> anyhow::Result<()> {
    tessera_registry::keys::validate_worker_id(&args.name).context("--name")?;
    if let Some(flag) = args.worker_args.iter().find(|a| OWN_FLAGS.iter().any(|own| a.split('=').next() == Some(own))) {
        anyhow::bail!("{flag} is set by `tessera group` for each rank; leave it out of the worker flags");
    }
    let tp = args.tp as usize;
    if args.port != 0 {
        anyhow::ensure!(usize::from(args.port) + tp - 1 <= usize::from(u16::MAX), "--port {} + --tp {tp} runs past port 65535", args.port);
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let per_rank = (threads / tp).max(1);
    let metrics_listener = match args.metrics_listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} for metrics"))?),
        None => None,
    };
    let mut ranks = Vec::with_capacity(tp);
    for r in 0..tp {
        let port = if args.port == 0 { 0 } else { args.port + r as u16 };
        let id = format!("{}-r{r}", args.name);
        let listen = SocketAddr::new(args.listen_host, port);
        let mut cmd = crate::child::tessera()?;
        cmd.args(["worker", "--listen", &listen.to_string(), "--id", &id, "--group", &args.name])
            .args(["--threads", &per_rank.to_string()]);
        if metrics_listener.is_some() {
            cmd.args(["--metrics-listen", "127.0.0.1:0"]);
        }
        cmd.args(&args.worker_args);
        let mut child = cmd.spawn().context("starting a rank")?;
        let stdout = child.stdout.take().context("rank stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let address = lines.next_line().await?.with_context(|| format!("rank {id} exited before printing its address"))?;
        let metrics = match metrics_listener {
            Some(_) => {
                let url = lines.next_line().await?.with_context(|| format!("rank {id} printed no metrics address"))?;
                let host = url.strip_prefix("http://").and_then(|u| u.strip_suffix("/metrics")).unwrap_or(&url);
                Some(host.parse().with_context(|| format!("rank {id} printed {url:?}, not its metrics address"))?)
            }
            None => None,
        };
        // Whatever a rank prints later goes on to ours.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                say(&line);
            }
        });
        say(&address);
        ranks.push(Rank { id, child, metrics });
    }
    let metrics = metrics_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            say(&format!("http://{addr}/metrics"));
        }
        let sources: Vec<SocketAddr> = ranks.iter().filter_map(|r| r.metrics).collect();
        tokio::spawn(tessera_coordinator::prometheus::serve_text(listener, move || {
            let sources = sources.clone();
            async move { merge_exposition(&futures_util::future::join_all(sources.iter().map(|&a| scrape(a))).await) }
        }))
    });
    tracing::info!(name = %args.name, tp, threads_per_rank = per_rank, "group unit running");
    let outcome = supervise(&args.name, &mut ranks).await;
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    outcome
}

/// Prints a line on stdout. Whoever started this unit may have stopped reading (a test that
/// took the first line): a closed pipe must not stop the group.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// Waits for a stop signal or for a rank to exit; either way stops every rank and waits for
/// them. A rank that exits on its own fails the unit.
async fn supervise(name: &str, ranks: &mut [Rank]) -> anyhow::Result<()> {
    let lost = {
        let exits = ranks.iter_mut().map(|r| Box::pin(async move { (r.id.clone(), r.child.wait().await) }));
        tokio::select! {
            ((id, status), _, _) = select_all(exits) => Some((id, status)),
            _ = shutdown_signal() => None,
        }
    };
    for r in ranks.iter() {
        crate::child::ask_to_stop(&r.child);
    }
    // Each rank drains within its --drain-timeout-secs; whatever stops this process (the
    // kubelet after terminationGracePeriodSeconds) bounds the wait.
    for r in ranks.iter_mut() {
        let status = r.child.wait().await;
        tracing::info!(id = %r.id, ?status, "rank stopped");
    }
    match lost {
        None => Ok(()),
        Some((id, status)) => {
            let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            anyhow::bail!("rank {id} of group {name} exited ({status}); stopped the other ranks so the group restarts whole")
        }
    }
}

/// One rank's metrics text, or nothing when it does not answer in time.
async fn scrape(addr: SocketAddr) -> String {
    let fetch = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
        let mut reply = Vec::new();
        stream.take(MAX_SCRAPE_BYTES).read_to_end(&mut reply).await?;
        std::io::Result::Ok(reply)
    };
    let Ok(Ok(reply)) = tokio::time::timeout(SCRAPE_TIMEOUT, fetch).await else { return String::new() };
    let reply = String::from_utf8_lossy(&reply);
    match reply.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") => body.to_string(),
        _ => String::new(),
    }
}

/// Several exposition texts as one: each family's `# HELP`/`# TYPE` once, followed by the
/// samples of every text (the text format allows a family to appear only once). Families
/// keep the order in which they first appear.
fn merge_exposition(texts: &[String]) -> String {
    let mut families: Vec<(String, Vec<String>)> = Vec::new();
    for text in texts {
        let mut current: Option<usize> = None;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")) {
                let family = rest.split(' ').next().unwrap_or_default();
                let index = match families.iter().position(|(name, _)| name == family) {
                    Some(i) => i,
                    None => {
                        families.push((family.to_string(), Vec::new()));
                        families.len() - 1
                    }
                };
                let lines = &mut families[index].1;
                let header = lines.iter().take_while(|l| l.starts_with('#')).count();
                if !lines[..header].iter().any(|l| l == line) {
                    lines.insert(header, line.to_string());
                }
                current = Some(index);
            } else if let Some(i) = current {
                families[i].1.push(line.to_string());
            }
        }
    }
    let mut out = String::new();
    for (_, lines) in families {
        for line in lines {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_metrics_declare_each_family_once_with_every_ranks_samples() {
        let rank = |id: &str, kv: u32| {
            format!(
                "# HELP tessera_worker_serving 1 while serving.\n# TYPE tessera_worker_serving gauge\n\
                 tessera_worker_serving{{worker=\"{id}\"}} 1\n\
                 # HELP tessera_worker_kv_tokens KV tokens.\n# TYPE tessera_worker_kv_tokens gauge\n\
                 tessera_worker_kv_tokens{{worker=\"{id}\"}} {kv}\n"
            )
        };
        let merged = merge_exposition(&[rank("g-r0", 12), rank("g-r1", 34), String::new()]);
        assert_eq!(
            merged,
            "# HELP tessera_worker_serving 1 while serving.\n# TYPE tessera_worker_serving gauge\n\
             tessera_worker_serving{worker=\"g-r0\"} 1\ntessera_worker_serving{worker=\"g-r1\"} 1\n\
             # HELP tessera_worker_kv_tokens KV tokens.\n# TYPE tessera_worker_kv_tokens gauge\n\
             tessera_worker_kv_tokens{worker=\"g-r0\"} 12\ntessera_worker_kv_tokens{worker=\"g-r1\"} 34\n"
        );
    }
}
