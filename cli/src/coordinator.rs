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
    serve: ServeArgs,
}

pub fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: CoordinatorArgs) -> anyhow::Result<()> {
    let tls = args.serve.tls.files().is_some();
    args.serve.tls.check_plaintext("the gRPC API (--listen)", args.listen.ip(), tls)?;
    if let Some(http) = args.http_listen {
        args.serve.tls.check_plaintext("the HTTP API (--http-listen)", http.ip(), tls)?;
    }
    let config = args.serve.config(&args.model, args.tp)?;
    let registry: Arc<dyn Registry> = Arc::new(EtcdRegistry::connect(EtcdConfig::new(args.etcd.clone())).await?);
    let coordinator = Coordinator::start(config, registry).await?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    // Tests and scripts read this line to learn the port.
    println!("{addr}");
    tracing::info!(%addr, etcd = ?args.etcd, "coordinator listening; groups form as workers register");
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

/// Logs whenever the number of serving groups changes.
async fn report_groups(mut serving: tokio::sync::watch::Receiver<usize>) {
    while serving.changed().await.is_ok() {
        let n = *serving.borrow_and_update();
        tracing::info!(groups = n, "serving groups changed");
    }
}
