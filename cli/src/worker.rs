//! `tessera worker`: serves one rank over gRPC until Ctrl-C or SIGTERM.
//!
//! With `--etcd` the worker also registers itself once its server is bound, keeps the
//! registration while it serves (see [`registration`]) and revokes it on the way out. Its
//! readiness on `grpc.health.v1` follows whether it serves a group ([`readiness`]).

mod metrics;
mod readiness;
mod registration;

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tessera_registry::{EtcdConfig, WorkerRecord};
use tessera_worker::{EngineConfig, EngineHandle, WorkerService};
use tonic::transport::server::TcpIncoming;

use crate::record::worker_record;
use crate::signal::shutdown_signal;

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub compute: crate::ComputeArgs,
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
    /// LoRA adapters held at most; loading one more evicts the least recently used (sequences
    /// running with it keep it until they end, and it is read again when next asked for).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=1024))]
    max_adapters: u64,
    /// etcd client URL to register this worker in, e.g. http://10.0.0.2:2379. Repeat it or
    /// separate URLs with commas to name several members. Without it the worker does not register.
    #[arg(long = "etcd", value_name = "URL", value_delimiter = ',')]
    etcd: Vec<String>,
    #[command(flatten)]
    etcd_security: crate::etcd_args::EtcdSecurityArgs,
    /// Lease time-to-live in seconds: a worker that stops renewing leaves the registry this
    /// long after its last renewal.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    lease_ttl_secs: u64,
    /// Host that coordinators dial, put in the registered address (default: the IP of
    /// --listen). Required with --etcd when listening on a wildcard address such as 0.0.0.0.
    #[arg(long)]
    advertise_host: Option<String>,
    /// On SIGTERM/Ctrl-C with --etcd: announce draining, let running sequences finish for up
    /// to this many seconds, then leave (0: leave at once). Keep it below Kubernetes'
    /// terminationGracePeriodSeconds.
    #[arg(long, default_value_t = 30)]
    drain_timeout_secs: u64,
    /// The deployment unit this worker belongs to (e.g. its pod, when one pod runs a whole
    /// tensor-parallel group): coordinators form groups only from workers that name the same
    /// unit, so a group never spans two. Registered with --etcd.
    #[arg(long, value_name = "NAME")]
    group: Option<String>,
    /// Serve this worker's Prometheus metrics (KV cache, sequences, prefix cache) at
    /// http://ADDR/metrics, plaintext; port 0 picks a free port (its URL is the second line
    /// of stdout).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Mutual TLS with the coordinator and the other ranks: --tls-cert, --tls-key and --tls-ca
    /// together.
    #[command(flatten)]
    tls: crate::tls_args::TlsArgs,
}

/// What this worker serves TLS with, checked from the flags before anything is bound.
struct WorkerTls {
    server: std::sync::Arc<tessera_tls::ServerTls>,
    collective: tessera_worker::CollectiveTlsFiles,
}

impl WorkerTls {
    /// `None` without --tls-cert; off loopback that needs --insecure.
    fn from_args(args: &WorkerArgs) -> anyhow::Result<Option<Self>> {
        let collective_ip = match args.collective_host.as_str() {
            "localhost" => IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
            // A host name off this machine counts as not loopback.
            host => host.parse().unwrap_or(IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED)),
        };
        let Some(files) = args.tls.files() else {
            args.tls.check_plaintext("the worker's gRPC service", args.listen.ip(), false)?;
            args.tls.check_plaintext("the collective", collective_ip, false)?;
            return Ok(None);
        };
        anyhow::ensure!(files.ca.is_some(), "a worker speaks mutual TLS: --tls-cert needs --tls-ca too");
        let server = tessera_tls::ServerTls::mutual(&files, &[tessera_tls::ALPN_H2]).context("worker TLS")?;
        let collective = tessera_worker::CollectiveTlsFiles::new(&files).context("collective TLS")?;
        Ok(Some(Self { server: std::sync::Arc::new(server), collective }))
    }
}

/// How this worker registers, validated from the flags before anything is bound.
struct Registering {
    etcd: EtcdConfig,
    /// Host part of the registered address, ready to be joined with a port.
    advertise_host: String,
}

impl Registering {
    /// `None` when no `--etcd` was given: the worker serves unregistered, as a bare rank.
    fn from_args(args: &WorkerArgs) -> anyhow::Result<Option<Self>> {
        let endpoints: Vec<String> = args.etcd.iter().map(|url| url.trim()).filter(|url| !url.is_empty()).map(str::to_string).collect();
        if endpoints.is_empty() {
            anyhow::ensure!(args.etcd.is_empty(), "--etcd was given but names no URL");
            return Ok(None);
        }
        let advertise_host = advertise_host(args.advertise_host.as_deref(), args.listen.ip())?;
        let etcd = EtcdConfig {
            lease_ttl: Duration::from_secs(args.lease_ttl_secs),
            security: args.etcd_security.security()?,
            ..EtcdConfig::new(endpoints)
        };
        etcd.validate().context("invalid registry settings")?;
        Ok(Some(Self { etcd, advertise_host }))
    }

    /// The address coordinators dial: the advertised host with the port actually bound.
    fn address(&self, port: u16) -> String {
        format!("{}:{port}", self.advertise_host)
    }
}

/// The host to advertise, bracketed if it is an IPv6 literal. A wildcard address only means
/// "every interface" to this machine; registered, it would send coordinators to themselves.
fn advertise_host(flag: Option<&str>, listen_ip: IpAddr) -> anyhow::Result<String> {
    let host = match flag.map(str::trim) {
        Some("") => anyhow::bail!("--advertise-host is empty"),
        Some(host) => host.to_string(),
        None if listen_ip.is_unspecified() => anyhow::bail!(
            "--listen {listen_ip} accepts connections on every interface, but other machines cannot \
             dial {listen_ip}: pass --advertise-host with this machine's reachable name or IP"
        ),
        None => listen_ip.to_string(),
    };
    if host.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified()) {
        anyhow::bail!("--advertise-host {host} is a wildcard address that other machines cannot dial");
    }
    Ok(if host.parse::<Ipv6Addr>().is_ok() { format!("[{host}]") } else { host })
}

/// The name health checks use for the worker's own service.
pub const WORKER_SERVICE: &str = "tessera.worker.v1.Worker";

pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: WorkerArgs) -> anyhow::Result<()> {
    // Flags are checked before binding, so a bad one fails before an address is printed.
    let registering = Registering::from_args(&args)?;
    let tls = WorkerTls::from_args(&args)?;
    let shutdown = shutdown_signal();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let id = args.id.unwrap_or_else(|| format!("worker-{}", addr.port()));
    let kv_capacity_tokens = args.kv_capacity_tokens;
    if registering.is_some() {
        tessera_registry::keys::validate_worker_id(&id)?;
    }
    if let Some(group) = &args.group {
        tessera_registry::keys::validate_worker_id(group).context("--group")?;
    }
    let metrics_listener = match args.metrics_listen {
        Some(addr) => {
            args.tls.check_plaintext("the Prometheus metrics (--metrics-listen)", addr.ip(), false)?;
            Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} for metrics"))?)
        }
        None => None,
    };
    // Tests and `tessera up` read this line to learn the port; `tessera group` also the
    // second, the metrics address.
    println!("{addr}");
    if let Some(metrics) = &metrics_listener {
        println!("http://{}/metrics", metrics.local_addr()?);
    }
    let config = EngineConfig {
        collective_host: args.collective_host,
        kv_capacity_tokens,
        collective_tls: tls.as_ref().map(|t| t.collective.clone()),
        max_adapters: args.max_adapters as usize,
    };
    let engine = EngineHandle::spawn(config.clone())?;
    let serving = engine.serving();
    let metrics = metrics_listener.map(|listener| {
        let metrics = metrics::WorkerMetrics { id: id.clone(), engine: engine.clone(), kv_capacity_tokens };
        tokio::spawn(metrics.serve(listener))
    });
    let service = WorkerService::new(id.clone(), engine, config);
    let admission = service.admission();
    // Health for probes: "" while the process serves; the worker service while it serves a
    // group and is neither unregistered nor draining.
    let (health, health_service) = tonic_health::server::health_reporter();
    let readiness = readiness::Readiness::start(health, serving).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = tessera_coordinator::connection::grpc_server().add_service(health_service).add_service(service.into_server());
    // A dropped sender stops the server as well as a sent value does.
    let stopped = async move {
        let _ = stopped.await;
    };
    let mut server = match &tls {
        // TCP_NODELAY on accepted sockets: a step's reply must not wait on Nagle's algorithm.
        None => tokio::spawn(router.serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), stopped)),
        Some(tls) => {
            let incoming = tessera_tls::accept::incoming(listener, tls.server.clone(), tessera_tls::accept::AcceptConfig::new("worker"));
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
        }
    };
    tracing::info!(%id, %addr, tls = tls.is_some(), "worker serving");
    let lifetime = async {
        match registering {
            None => {
                shutdown.await;
                Ok(())
            }
            Some(registering) => {
                let record =
                    WorkerRecord { group: args.group.clone(), ..worker_record(&id, registering.address(addr.port()), kv_capacity_tokens) };
                let drain = Duration::from_secs(args.drain_timeout_secs);
                registration::stay_registered(registering.etcd, record, admission, &readiness, shutdown, drain).await
            }
        }
    };
    tokio::select! {
        served = &mut server => {
            // The server ends on its own only when it fails. Leaving `lifetime` drops the
            // registration, whose lease then expires within one TTL.
            served.context("the gRPC server task")??;
            anyhow::bail!("the gRPC server stopped unexpectedly");
        }
        lived = lifetime => {
            let _ = stop.send(());
            let served = server.await;
            lived?;
            served.context("the gRPC server task")??;
        }
    }
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    tracing::info!(%id, "worker stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("literal IP")
    }

    #[test]
    fn advertised_host_defaults_to_the_listen_ip_but_never_a_wildcard() {
        assert_eq!(advertise_host(None, ip("10.0.0.7")).expect("concrete IP"), "10.0.0.7");
        assert_eq!(advertise_host(None, ip("::1")).expect("IPv6 loopback"), "[::1]");
        assert!(advertise_host(None, ip("0.0.0.0")).is_err());
        assert!(advertise_host(None, ip("::")).is_err());
        assert_eq!(advertise_host(Some("node-3"), ip("0.0.0.0")).expect("named host"), "node-3");
        assert_eq!(advertise_host(Some("fe80::1"), ip("::")).expect("IPv6 host"), "[fe80::1]");
        assert!(advertise_host(Some("0.0.0.0"), ip("0.0.0.0")).is_err());
        assert!(advertise_host(Some(" "), ip("127.0.0.1")).is_err());
    }
}
