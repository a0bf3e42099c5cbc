//! `tessera worker`: serves one rank over gRPC until Ctrl-C or SIGTERM.

use std::net::SocketAddr;

use clap::Args;
use tessera_worker::{EngineConfig, EngineHandle, WorkerService};
use tokio_stream::wrappers::TcpListenerStream;

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// gRPC listen address; port 0 picks a free port (printed on the first line of stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Worker id (default: derived from the listen address).
    #[arg(long)]
    id: Option<String>,
    /// Host the tensor-parallel collective binds to.
    #[arg(long, default_value = "127.0.0.1")]
    collective_host: String,
    /// KV cache capacity of this worker, in tokens over all sequences.
    #[arg(long, default_value_t = 1 << 20)]
    kv_capacity_tokens: u64,
}

pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: WorkerArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let id = args.id.unwrap_or_else(|| format!("worker-{}", addr.port()));
    // Tests and `tessera up` read this line to learn the port.
    println!("{addr}");
    let config = EngineConfig { collective_host: args.collective_host, kv_capacity_tokens: args.kv_capacity_tokens };
    let engine = EngineHandle::spawn(config.clone())?;
    let service = WorkerService::new(id.clone(), engine, config);
    tracing::info!(%id, %addr, "worker serving");
    tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown_signal())
        .await?;
    tracing::info!(%id, "worker stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return ctrl_c.await.unwrap_or(()),
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
