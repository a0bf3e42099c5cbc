//! Options shared by `tessera coordinator` and `tessera up`: what to serve and the limits.

use std::path::{Path, PathBuf};

use clap::Args;
use tessera_coordinator::server::AdapterArg;
use tessera_coordinator::{ClusterConfig, CoordinatorConfig, Limits, LoopConfig, ModelSpec};

/// One `--model` value: `DIR`, or `NAME=DIR` to name the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelArg {
    pub name: Option<String>,
    pub dir: PathBuf,
}

impl std::str::FromStr for ModelArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            // A '/' before the '=' means the '=' belongs to a path.
            Some((name, dir)) if !name.contains('/') => {
                if name.is_empty() || dir.is_empty() {
                    return Err(format!("{s:?}: expected NAME=DIR with both parts non-empty"));
                }
                Ok(Self { name: Some(name.to_string()), dir: PathBuf::from(dir) })
            }
            _ => Ok(Self { name: None, dir: PathBuf::from(s) }),
        }
    }
}

/// `--lora [MODEL:]NAME=DIR`: a LoRA adapter served from the start.
#[derive(Debug, Clone)]
pub struct LoraArg {
    pub model: String,
    pub name: String,
    pub dir: PathBuf,
}

impl std::str::FromStr for LoraArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((named, dir)) = s.split_once('=') else { return Err(format!("{s:?}: expected [MODEL:]NAME=DIR")) };
        let (model, name) = named.rsplit_once(':').unwrap_or(("", named));
        if name.is_empty() || dir.is_empty() {
            return Err(format!("{s:?}: expected [MODEL:]NAME=DIR with NAME and DIR non-empty"));
        }
        Ok(Self { model: model.to_string(), name: name.to_string(), dir: PathBuf::from(dir) })
    }
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Serve a PEFT LoRA adapter (a directory with adapter_config.json and
    /// adapter_model.safetensors, at the same path on every worker) as NAME for the model
    /// (MODEL:NAME=DIR when several are served). Requests name it in `adapter`, or as
    /// `model: "BASE:NAME"` over HTTP. Repeat for more.
    #[arg(long = "lora", value_name = "[MODEL:]NAME=DIR")]
    pub lora: Vec<LoraArg>,
    /// Let clients load and unload adapters at run time (LoadAdapter / UnloadAdapter): any
    /// directory the workers can read may then be named, so only where clients are trusted.
    #[arg(long)]
    pub allow_adapter_loading: bool,
    /// Name clients use for the model when one `--model DIR` is served (default: the model
    /// directory's name); name several with `--model NAME=DIR` instead.
    #[arg(long)]
    pub name: Option<String>,
    /// Weight dtype on the workers: f32, bf16 or f16; or q8_0 / q4_k to quantize the linear
    /// projections on load (each rank its own shard; embeddings, norms and activations stay
    /// f32). A directory holding a `.gguf` instead of safetensors uses its stored quantization.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Sequences one group runs at once.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Tokens one step may carry; longer prompts are prefilled in chunks so running streams
    /// keep decoding meanwhile.
    #[arg(long, default_value_t = 256)]
    pub step_tokens: usize,
    /// Seconds a new group's workers may take to load their shards and connect before the
    /// group is given up and formed again (large models on network storage need long).
    #[arg(long, default_value_t = ClusterConfig::default().load_timeout.as_secs())]
    pub load_timeout_secs: u64,
    /// Seconds a step may take before its group is declared lost (a hung worker).
    #[arg(long, default_value_t = 300)]
    pub step_timeout_secs: u64,
    /// Requests waiting per group before new ones are refused.
    #[arg(long, default_value_t = 256)]
    pub queue_depth: usize,
    /// Accept sequences up to this many tokens instead of the model's own context limit
    /// (positions past it are extrapolated; quality may drop).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Largest max_new_tokens a request may ask for.
    #[arg(long, default_value_t = Limits::default().max_new_tokens)]
    pub max_new_tokens_limit: u32,
    /// Spread a prompt of at least this many tokens over a sequence-parallel ring of
    /// ceil(prompt / N) groups even when one group could hold it, to cut its prefill time
    /// (0: only when no group can hold it).
    #[arg(long, default_value_t = 0)]
    pub ring_prefill_tokens: usize,
    /// Send a request to the group that was lately sent the longest prefix of its prompt (its
    /// workers likely still cache it) unless that group runs more than this many requests
    /// beyond the least busy one.
    #[arg(long, default_value_t = 2)]
    pub prefix_affinity_margin: usize,
    /// Place every request on the least busy group, ignoring cached prefixes.
    #[arg(long)]
    pub no_prefix_affinity: bool,
    /// Times one request may move to another group when its group is lost mid-request (it
    /// re-prefills what it had and goes on exactly); past that it ends UNAVAILABLE. 0: never.
    #[arg(long, default_value_t = ClusterConfig::default().migration_limit)]
    pub migration_limit: u32,
    /// Batch-invariant numerics: every token is computed with one arithmetic whatever else runs
    /// in its step, so seeded streams give the same tokens under any load and a stream moved
    /// off a lost group continues bit for bit, and a prompt's answer does not change with the
    /// prefix cache's state. Costs prefill speed (BENCHMARKS.md). Float weights and the block
    /// formats q4_0 ... q6_k and q8_0; other formats keep candle's kernels.
    #[arg(long)]
    pub batch_invariant: bool,
    /// Static batching (a baseline for benchmarks): a group admits new requests only when it
    /// runs none, so each batch finishes before the next one forms.
    #[arg(long)]
    pub static_batching: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9090).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Also serve `GET /metrics` on the OpenAI-compatible HTTP port.
    #[arg(long)]
    pub http_metrics: bool,
    /// TLS on the client API with --tls-cert/--tls-key; with --tls-ca also mutual TLS to the
    /// workers (this certificate is then the coordinator's client certificate too).
    #[command(flatten)]
    pub tls: crate::tls_args::TlsArgs,
    /// Require an API key on the client API: a file of `NAME SHA256HEX [max_concurrent=N]
    /// [tokens_per_minute=N]` lines (`tessera keygen NAME` makes one), re-read when it changes.
    /// Health and reflection stay open.
    #[arg(long, value_name = "FILE")]
    pub api_keys: Option<PathBuf>,
}

/// Largest values the flags accept: a typo must not allocate the machine away.
const MAX_BATCH: usize = 4096;
const MAX_QUEUE: usize = 1 << 16;
const MAX_STEP_TOKENS: usize = 1 << 20;

impl ServeArgs {
    /// The coordinator's configuration for serving `models`: decoders in groups of `tp` ranks,
    /// BERT encoders (`model_type: "bert"`) on one rank each.
    pub fn config(&self, models: &[ModelArg], tp: usize) -> anyhow::Result<CoordinatorConfig> {
        anyhow::ensure!(!models.is_empty(), "no --model to serve");
        if let Some(metrics) = self.metrics_listen {
            // Metrics are always plaintext and unauthenticated.
            self.tls.check_plaintext("the Prometheus metrics (--metrics-listen)", metrics.ip(), false)?;
        }
        anyhow::ensure!(models.len() == 1 || self.name.is_none(), "--name names a single model; use --model NAME=DIR for several");
        let mut specs: Vec<ModelSpec> = Vec::with_capacity(models.len());
        for m in models {
            let encoder = tessera_model::bert::is_bert_dir(&m.dir).unwrap_or(false);
            let mut spec = self.spec(&m.dir, if encoder { 1 } else { tp })?;
            if let Some(name) = m.name.as_ref().or(self.name.as_ref()) {
                spec.name = name.clone();
            }
            anyhow::ensure!(!specs.iter().any(|s| s.name == spec.name), "two models are named {:?}; name them with NAME=DIR", spec.name);
            specs.push(spec);
        }
        let mut config = self.coordinator_config()?;
        config.models = specs;
        config.adapters = self
            .lora
            .iter()
            .map(|l| Ok(AdapterArg { model: l.model.clone(), name: l.name.clone(), dir: std::path::absolute(&l.dir)? }))
            .collect::<anyhow::Result<_>>()?;
        Ok(config)
    }

    fn spec(&self, dir: &Path, tp: usize) -> anyhow::Result<ModelSpec> {
        // Workers may run in another directory: give them an absolute path.
        Ok(ModelSpec {
            name: model_name(dir),
            dir: std::path::absolute(dir)?,
            tp,
            dtype: self.dtype.clone(),
            max_context: self.max_context,
            batch_invariant: self.batch_invariant,
        })
    }

    /// Everything but the models.
    fn coordinator_config(&self) -> anyhow::Result<CoordinatorConfig> {
        anyhow::ensure!((1..=MAX_BATCH).contains(&self.max_batch), "--max-batch must be in 1..={MAX_BATCH}");
        anyhow::ensure!((1..=MAX_QUEUE).contains(&self.queue_depth), "--queue-depth must be in 1..={MAX_QUEUE}");
        anyhow::ensure!(self.max_new_tokens_limit > 0, "--max-new-tokens-limit must be at least 1");
        anyhow::ensure!((1..=MAX_STEP_TOKENS).contains(&self.step_tokens), "--step-tokens must be in 1..={MAX_STEP_TOKENS}");
        anyhow::ensure!((1..=86_400).contains(&self.step_timeout_secs), "--step-timeout-secs must be in 1..=86400");
        anyhow::ensure!((1..=86_400).contains(&self.load_timeout_secs), "--load-timeout-secs must be in 1..=86400");
        let limits = Limits {
            max_new_tokens: self.max_new_tokens_limit,
            default_max_new_tokens: Limits::default().default_max_new_tokens.min(self.max_new_tokens_limit),
            allow_adapter_loading: self.allow_adapter_loading,
            ..Limits::default()
        };
        let cluster = ClusterConfig {
            queue_depth: self.queue_depth,
            group_loop: LoopConfig {
                max_batch: self.max_batch,
                step_tokens: self.step_tokens,
                step_timeout: std::time::Duration::from_secs(self.step_timeout_secs),
                static_batching: self.static_batching,
            },
            ring_prefill_tokens: self.ring_prefill_tokens,
            prefix_affinity_margin: (!self.no_prefix_affinity).then_some(self.prefix_affinity_margin),
            migration_limit: self.migration_limit,
            load_timeout: std::time::Duration::from_secs(self.load_timeout_secs),
            ..ClusterConfig::default()
        };
        let api_tls = self.tls.files();
        let worker_tls = match &api_tls {
            Some(files) if files.ca.is_some() => Some(std::sync::Arc::new(tessera_tls::ClientTls::mutual(files, &[tessera_tls::ALPN_H2])?)),
            _ => None,
        };
        let cluster = ClusterConfig { worker_tls, ..cluster };
        let api_keys = match &self.api_keys {
            Some(path) => {
                let keys = tessera_coordinator::auth::ApiKeys::load(path)?;
                tracing::info!(keys = ?keys, "API keys required on the client API");
                Some(std::sync::Arc::new(keys))
            }
            None => None,
        };
        Ok(CoordinatorConfig { models: Vec::new(), limits, cluster, api_tls, api_keys, candidate: "local".into(), adapters: Vec::new() })
    }
}

/// Binds `--metrics-listen` and serves `/metrics` there; `None` without the flag.
pub async fn serve_metrics(
    addr: Option<std::net::SocketAddr>,
    coordinator: &tessera_coordinator::Coordinator,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr} for metrics: {e}"))?;
    tracing::info!(addr = %listener.local_addr()?, "serving Prometheus metrics at /metrics");
    Ok(Some(coordinator.serve_metrics(listener)))
}

/// Binds `addr` and serves the OpenAI-compatible HTTP API there; `None` without an address.
/// Returns the task and the address bound (port 0 picks a free one).
pub async fn serve_http(
    addr: Option<std::net::SocketAddr>,
    metrics: bool,
    coordinator: &tessera_coordinator::Coordinator,
) -> anyhow::Result<Option<(tokio::task::JoinHandle<()>, std::net::SocketAddr)>> {
    let Some(addr) = addr else {
        anyhow::ensure!(!metrics, "--http-metrics needs the HTTP API (--http-port or --http-listen)");
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr} for HTTP: {e}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(addr = %bound, "serving the OpenAI-compatible HTTP API at /v1");
    let mut config = tessera_coordinator::HttpConfig::default();
    config.metrics = metrics;
    Ok(Some((coordinator.serve_http(listener, config), bound)))
}

/// Prints a line on stdout for scripts and tests to read, ignoring a reader that has gone
/// (a closed pipe must not stop the server).
pub fn announce(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The name clients use: the directory's name, or a GGUF file's name without `.gguf`.
fn model_name(path: &Path) -> String {
    let name = match path.extension() {
        Some(x) if x == "gguf" => path.file_stem(),
        _ => path.file_name(),
    };
    name.and_then(|n| n.to_str()).filter(|n| !n.is_empty()).unwrap_or("model").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_args_take_an_optional_name() {
        let plain: ModelArg = "/models/llama".parse().expect("dir");
        assert_eq!(plain, ModelArg { name: None, dir: "/models/llama".into() });
        let named: ModelArg = "minilm=/models/all-MiniLM".parse().expect("name=dir");
        assert_eq!(named, ModelArg { name: Some("minilm".into()), dir: "/models/all-MiniLM".into() });
        let equals_in_path: ModelArg = "./runs/lr=3e-4".parse().expect("dir with '='");
        assert_eq!(equals_in_path.name, None);
        assert!("=dir".parse::<ModelArg>().is_err());
        assert!("name=".parse::<ModelArg>().is_err());
    }

    #[test]
    fn a_gguf_file_is_named_without_its_extension() {
        assert_eq!(model_name(Path::new("/m/SmolLM2-135M-Instruct.Q4_1.gguf")), "SmolLM2-135M-Instruct.Q4_1");
        assert_eq!(model_name(Path::new("/models/llama")), "llama");
    }
}
