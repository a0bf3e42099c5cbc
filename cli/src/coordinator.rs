//! `tessera coordinator`: serves `tessera.v1` for a cluster whose workers register in etcd.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Args;
use tessera_coordinator::Coordinator;
use tessera_registry::{EtcdConfig, EtcdRegistry, Registry};

use crate::serve_args::{ModelArg, ServeArgs};
use crate::signal::shutdown_signal;

#[derive(Args, Debug, Clone)]
pub struct CoordinatorArgs {
    /// Hugging Face model directory, at the same path on every worker: `DIR` or `NAME=DIR`;
    /// repeat to serve several models (BERT encoders run on one worker per group).
    #[arg(long, required = true)]
    model: Vec<ModelArg>,
    /// Tensor-parallel degree of each decoder group.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// gRPC listen address; port 0 picks a free port (printed on the first line of stdout).
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
    /// /v1/embeddings, /v1/models, /health) on this address; port 0 picks a free port (its URL
    /// is the second line of stdout).
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// etcd endpoints the workers register in (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    #[command(flatten)]
    etcd_security: crate::etcd_args::EtcdSecurityArgs,
    /// This coordinator's name in the leader election (default: the host name and process
    /// id). Run several coordinators on one etcd for failover: the elected one serves, the
    /// others stand by (health NOT_SERVING for tessera.v1.Inference) and one takes over when
    /// the leader's lease ends.
    #[arg(long)]
    coordinator_id: Option<String>,
    /// Seconds the leader's lease lives without renewal: how long a dead leader's standby
    /// waits before taking over.
    #[arg(long, default_value_t = 5)]
    lease_ttl_secs: u64,
    /// Wait up to this many seconds for every --model directory to appear (weights still
    /// being copied onto a shared volume) instead of exiting at once. Whoever writes the
    /// weights should move a finished directory into place, so a half-copied model is never
    /// seen.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=MAX_MODEL_WAIT_SECS))]
    model_wait_secs: u64,
    #[command(flatten)]
    serve: ServeArgs,
}

pub fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(serve(args))
}

/// A week: far beyond any copy, but a typo still fails.
const MAX_MODEL_WAIT_SECS: u64 = 7 * 86_400;
/// How often a missing model directory is looked for again.
const MODEL_POLL: std::time::Duration = std::time::Duration::from_secs(2);

async fn serve(args: CoordinatorArgs) -> anyhow::Result<()> {
    wait_for_models(&args.model, std::time::Duration::from_secs(args.model_wait_secs)).await?;
    let tls = args.serve.tls.files().is_some();
    args.serve.tls.check_plaintext("the gRPC API (--listen)", args.listen.ip(), tls)?;
    if let Some(http) = args.http_listen {
        args.serve.tls.check_plaintext("the HTTP API (--http-listen)", http.ip(), tls)?;
    }
    let mut config = args.serve.config(&args.model, args.tp)?;
    let id = args.coordinator_id.clone().unwrap_or_else(default_candidate);
    config.candidate = id.clone();
    anyhow::ensure!((1..=3600).contains(&args.lease_ttl_secs), "--lease-ttl-secs must be in 1..=3600");
    let etcd = EtcdConfig {
        lease_ttl: std::time::Duration::from_secs(args.lease_ttl_secs),
        security: args.etcd_security.security()?,
        ..EtcdConfig::new(args.etcd.clone())
    };
    let registry: Arc<dyn Registry> = Arc::new(EtcdRegistry::connect(etcd).await?);
    let coordinator = Coordinator::start(config, registry).await?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to learn the port.
    println!("{addr}");
    tracing::info!(%addr, etcd = ?args.etcd, %id, "coordinator listening; once elected leader, groups form as workers register");
    let metrics = crate::serve_args::serve_metrics(args.serve.metrics_listen, &coordinator).await?;
    let http = crate::serve_args::serve_http(args.http_listen, args.serve.http_metrics, &coordinator).await?;
    if let Some((_, http_addr)) = &http {
        let scheme = if tls { "https" } else { "http" };
        crate::serve_args::announce(&format!("{scheme}://{http_addr}/v1"));
    }
    let serving = coordinator.serving_groups();
    let report = tokio::spawn(report_groups(serving));
    coordinator.serve(listener, shutdown_signal()).await?;
    report.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    if let Some((http, _)) = http {
        http.abort();
    }
    tracing::info!("coordinator stopped");
    Ok(())
}

/// Returns once every model directory exists, or after `patience` (the model is then read
/// anyway, so the error names what is missing).
async fn wait_for_models(models: &[ModelArg], patience: std::time::Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut logged = false;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    while let Some(missing) = models.iter().find(|m| !m.dir.is_dir()) {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        if !logged {
            tracing::info!(dir = %missing.dir.display(), ?patience, "waiting for the model directory to appear");
            logged = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(MODEL_POLL) => {}
            _ = &mut stop => anyhow::bail!("interrupted while waiting for {}", missing.dir.display()),
        }
    }
    Ok(())
}

/// Logs whenever the number of serving groups changes.
async fn report_groups(mut serving: tokio::sync::watch::Receiver<usize>) {
    while serving.changed().await.is_ok() {
        let n = *serving.borrow_and_update();
        tracing::info!(groups = n, "serving groups changed");
    }
}

/// The election name when `--coordinator-id` is not given: the host name (a pod's name on
/// Kubernetes) and the process id, reduced to the characters a registry id allows.
fn default_candidate() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "coordinator".into());
    let host: String =
        host.trim().chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '-' }).take(100).collect();
    format!("{host}-{}", std::process::id())
}
