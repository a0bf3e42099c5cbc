//! `tessera up`: a whole cluster on this machine — a coordinator in this process and N worker
//! processes — on the embedded in-memory registry, or on etcd with `--etcd`.
//!
//! With the in-memory registry the workers cannot reach the registry themselves, so this
//! process registers each one on its behalf and revokes the registration the moment the
//! worker process exits: the coordinator sees a crash at once, as it would see an etcd lease
//! expire. Ctrl-C stops the server, then the workers (SIGTERM, then SIGKILL after a grace period).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use tessera_coordinator::Coordinator;
use tessera_registry::{EtcdConfig, EtcdRegistry, MemoryConfig, MemoryRegistry, Registry};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use crate::record::worker_record;
use crate::serve_args::{ModelArg, ServeArgs};
use crate::signal::shutdown_signal;

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    #[command(flatten)]
    pub compute: crate::ComputeArgs,
    /// Hugging Face model directory or GGUF file, `PATH` or `NAME=PATH`; repeat to serve several models
    /// (BERT encoders run on one worker per group). Without it a small demo model with random
    /// weights is written and served.
    #[arg(long)]
    model: Vec<ModelArg>,
    /// Worker processes to start.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Tensor-parallel degree of each decoder group (default: the largest that at most
    /// `--workers` ranks split the model's heads over evenly; 1 when several models are served).
    #[arg(long)]
    tp: Option<usize>,
    /// Port the coordinator listens on (127.0.0.1); 0 picks a free one.
    #[arg(long, default_value_t = 50051)]
    port: u16,
    /// Also serve the OpenAI-compatible HTTP API on this port (127.0.0.1); 0 picks a free one.
    /// Its URL is printed on the line after "serving ...".
    #[arg(long)]
    http_port: Option<u16>,
    /// etcd endpoints; without them the cluster uses the in-memory registry.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// KV cache capacity of each worker, in tokens.
    #[arg(long, default_value_t = 1 << 20)]
    kv_capacity_tokens: u64,
    /// LoRA adapters each worker holds at most (the least recently used goes first).
    #[arg(long, default_value_t = 16)]
    max_adapters: u64,
    #[command(flatten)]
    serve: ServeArgs,
}

/// More worker processes than this on one machine is a typo.
const MAX_WORKERS: usize = 64;
/// How long workers get to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

pub fn run(args: UpArgs, threads: Option<usize>) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(up(args, threads))
}

async fn up(args: UpArgs, threads: Option<usize>) -> anyhow::Result<()> {
    // Installed first: Ctrl-C while workers load must still stop everything cleanly.
    let mut shutdown = std::pin::pin!(shutdown_signal());
    if args.workers == 0 || args.workers > MAX_WORKERS {
        bail!("--workers must be in 1..={MAX_WORKERS}");
    }
    let models = match args.model.as_slice() {
        [] => vec![ModelArg { name: None, dir: crate::run::demo_model_dir()? }],
        given => given.to_vec(),
    };
    let tp = match (args.tp, models.as_slice()) {
        (Some(tp), _) => tp,
        // One model: the largest degree the workers allow that splits its heads evenly.
        (None, [only]) => {
            let tp =
                tessera_coordinator::largest_tp(&only.dir, args.workers).map_err(|e| anyhow::anyhow!("{}: {e}", only.dir.display()))?;
            eprintln!(
                "tensor-parallel size {tp} (the largest of at most {} workers that splits the model evenly; --tp to choose)",
                args.workers
            );
            tp
        }
        (None, _) => 1,
    };
    if tp == 0 || tp > args.workers {
        bail!("--tp {tp} needs at least that many --workers (have {})", args.workers);
    }
    if !args.workers.is_multiple_of(tp) {
        eprintln!("note: {} workers make {} groups of TP={tp}; {} stay idle", args.workers, args.workers / tp, args.workers % tp);
    }
    let config = args.serve.config(&models, tp)?;
    let model_name = config.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(",");
    // One model: as many groups as the workers make. Several: one group each to start with.
    let groups = match config.models.as_slice() {
        [only] => args.workers / only.tp,
        several => {
            let needed: usize = several.iter().map(|m| m.tp).sum();
            if needed > args.workers {
                bail!("one group of every model needs {needed} workers (have {})", args.workers);
            }
            several.len()
        }
    };

    let (registry, memory): (Arc<dyn Registry>, Option<MemoryRegistry>) = if args.etcd.is_empty() {
        let memory = MemoryRegistry::new(MemoryConfig::default())?;
        (Arc::new(memory.clone()), Some(memory))
    } else {
        (Arc::new(EtcdRegistry::connect(EtcdConfig::new(args.etcd.clone())).await?), None)
    };

    // Workers share the machine: split the cores between them unless told otherwise.
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let per_worker = threads.unwrap_or_else(|| (cores / args.workers).max(1));
    let mut workers = Vec::with_capacity(args.workers);
    for i in 0..args.workers {
        let id = format!("local-{i}");
        workers.push(spawn_worker(&id, &args, per_worker).await.with_context(|| format!("starting worker {id}"))?);
    }
    if let Some(memory) = &memory {
        for w in &mut workers {
            let registration = memory.register(worker_record(&w.id, w.addr, args.kv_capacity_tokens)).await?;
            w.registration = Some(registration);
        }
    }
    let watchers: Vec<_> = workers.into_iter().map(watch_worker).collect();

    let coordinator = Coordinator::start(config, registry).await?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{} (use --port to pick another)", args.port))?;
    let addr = listener.local_addr()?;
    eprintln!("loading {model_name} onto {} workers ({groups} group(s)) ...", args.workers);
    let mut serving = coordinator.serving_groups();
    let mut failed = coordinator.failed_models();
    let metrics = crate::serve_args::serve_metrics(args.serve.metrics_listen, &coordinator).await?;
    let http_addr = args.http_port.map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
    let http = crate::serve_args::serve_http(http_addr, args.serve.http_metrics, &coordinator).await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(coordinator.serve(listener, async {
        let _ = stop_rx.await;
    }));
    let loading = Instant::now();
    let scheme = if args.serve.tls.files().is_some() { "https" } else { "http" };
    let ready = async {
        let mut shown = 0;
        while shown < groups {
            if serving.changed().await.is_err() {
                return;
            }
            let n = *serving.borrow_and_update();
            if n > shown {
                shown = n;
                eprintln!("  {n}/{groups} group(s) loaded ({:.1} s)", loading.elapsed().as_secs_f64());
            }
        }
    };
    let failure = async {
        match failed.wait_for(|f| !f.is_empty()).await {
            Ok(f) => f.iter().map(|(name, reason)| format!("model {name}: {reason}")).collect::<Vec<_>>().join("; "),
            // The coordinator is gone; `ready` or the server reports why.
            Err(_) => std::future::pending().await,
        }
    };
    let mut outcome = Ok(());
    tokio::select! {
        reason = failure => {
            eprintln!("cannot serve: {reason}");
            outcome = Err(anyhow::anyhow!("the model could not be loaded: {reason}"));
        }
        _ = ready => {
            // Scripts wait for this line on stdout.
            println!("serving {model_name} on {scheme}://{addr}");
            eprintln!("try:  tessera generate --addr {scheme}://{addr} \"Once upon a time\"");
            if let Some((_, http_addr)) = &http {
                crate::serve_args::announce(&format!("OpenAI-compatible HTTP API on {scheme}://{http_addr}/v1"));
                eprintln!("      curl {scheme}://{http_addr}/v1/completions -H 'Content-Type: application/json' -d '{{\"prompt\": \"Once upon a time\"}}'");
            }
            eprintln!("stop: Ctrl-C");
            shutdown.as_mut().await;
        }
        _ = shutdown.as_mut() => {}
    }
    eprintln!("stopping ...");
    let _ = stop_tx.send(());
    if let Ok(Err(e)) = server.await {
        eprintln!("coordinator: {e}");
    }
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    if let Some((http, _)) = http {
        http.abort();
    }
    for w in watchers {
        w.stop().await;
    }
    outcome
}

struct LocalWorker {
    id: String,
    addr: SocketAddr,
    child: Child,
    registration: Option<tessera_registry::Registration>,
}

async fn spawn_worker(id: &str, args: &UpArgs, threads: usize) -> anyhow::Result<LocalWorker> {
    let mut cmd = crate::child::tessera()?;
    cmd.args(["worker", "--threads", &threads.to_string(), "--listen", "127.0.0.1:0", "--id", id])
        .args(["--kv-capacity-tokens", &args.kv_capacity_tokens.to_string()])
        .args(["--max-adapters", &args.max_adapters.to_string()]);
    if !args.etcd.is_empty() {
        cmd.args(["--etcd", &args.etcd.join(",")]);
    }
    // With a cluster CA the workers speak mutual TLS with the coordinator and each other, with
    // the same certificate (it must name 127.0.0.1).
    if let (Some(files), Some(ca)) = (args.serve.tls.files(), &args.serve.tls.tls_ca) {
        cmd.arg("--tls-cert").arg(&files.cert).arg("--tls-key").arg(&files.key).arg("--tls-ca").arg(ca);
    }
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().context("worker stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).await?;
    let addr = line.trim().parse().with_context(|| format!("worker printed {line:?}, not its address"))?;
    Ok(LocalWorker { id: id.to_string(), addr, child, registration: None })
}

/// Owns a worker process: revokes its registration when it exits, and stops it on request.
struct Watched {
    stop: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
}

fn watch_worker(mut w: LocalWorker) -> Watched {
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        tokio::select! {
            status = w.child.wait() => {
                eprintln!("worker {} exited ({})", w.id, status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()));
            }
            _ = stop_rx => terminate(&mut w.child).await,
        }
        if let Some(registration) = w.registration.take() {
            let _ = registration.revoke().await;
        }
    });
    Watched { stop, done }
}

impl Watched {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.done.await;
    }
}

/// SIGTERM (the worker revokes its etcd registration and exits), then SIGKILL if it lingers.
async fn terminate(child: &mut Child) {
    if crate::child::ask_to_stop(child) && tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
        return;
    }
    let _ = child.kill().await;
}
