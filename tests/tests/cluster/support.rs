//! Shared pieces of the cluster tests: starting `tessera up`, `tessera coordinator` and
//! workers as real processes, writing fixtures, and a client that collects a whole stream.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use tessera_model::fixture::{write_fixture, FixtureSpec, WriteOptions};
use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_client::InferenceClient;
use tessera_tests::{tessera_bin, ChildGuard};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

pub type Client = InferenceClient<Channel>;

/// Longest any single test step may take before the test fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A scratch directory under the target dir, unique to this test process and `name`.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cluster-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

pub fn fixture(spec: &FixtureSpec, name: &str) -> PathBuf {
    write_fixture(spec, &scratch(name), &WriteOptions::default()).expect("write fixture")
}

/// A `tessera` child process and the URL it serves on.
pub struct Served {
    /// Killed when dropped.
    pub _process: ChildGuard,
    pub url: String,
}

/// Starts `tessera up --port 0 <args>` (one math thread per worker) and waits until every
/// group has loaded.
pub fn up(model: &Path, args: &[&str]) -> anyhow::Result<Served> {
    let (process, url) = tessera_tests::spawn_up(tessera_bin(), 1, model, args)?;
    Ok(Served { url, _process: process })
}

/// Starts `tessera coordinator` on a free port against etcd.
pub fn coordinator(model: &Path, etcd: &str, tp: usize) -> anyhow::Result<Served> {
    coordinator_with(model, etcd, tp, &[])
}

/// [`coordinator`] with more flags.
pub fn coordinator_with(model: &Path, etcd: &str, tp: usize, extra: &[&str]) -> anyhow::Result<Served> {
    let tp = tp.to_string();
    let args = ["coordinator", "--listen", "127.0.0.1:0", "--etcd", etcd, "--tp", &tp, "--model"].map(std::ffi::OsStr::new);
    let mut args = args.to_vec();
    args.push(model.as_os_str());
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    let (process, line) = tessera_tests::spawn_tessera(tessera_bin(), &args)?;
    let addr: std::net::SocketAddr = line.parse().with_context(|| format!("coordinator printed {line:?}"))?;
    Ok(Served { url: format!("http://{addr}"), _process: process })
}

/// Reads `stream` until it fails and returns the error status; panics if it ends cleanly or
/// stays open past [`PATIENCE`] (a stream whose group broke must neither succeed nor hang).
pub async fn until_error(stream: &mut tonic::Streaming<pb::GenerateResponse>) -> tonic::Status {
    let wait = async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended cleanly although its group broke"),
                Err(status) => return status,
            }
        }
    };
    tokio::time::timeout(PATIENCE, wait).await.expect("the stream must not hang")
}

/// Reads `stream` until `n` chunks have arrived; the stream must stay healthy meanwhile.
pub async fn read_chunks(stream: &mut tonic::Streaming<pb::GenerateResponse>, n: usize) {
    let mut chunks = 0;
    while chunks < n {
        let message = stream.message().await.expect("stream healthy").expect("stream open");
        chunks += matches!(message.event, Some(pb::generate_response::Event::Chunk(_))) as usize;
    }
}

/// Starts `tessera worker` registered in etcd with a short lease.
pub fn etcd_worker(etcd: &str, id: &str, lease_ttl_secs: u64) -> anyhow::Result<ChildGuard> {
    etcd_worker_with_kv(etcd, id, lease_ttl_secs, 65536)
}

/// [`etcd_worker`] with a given KV capacity.
pub fn etcd_worker_with_kv(etcd: &str, id: &str, lease_ttl_secs: u64, kv_tokens: u64) -> anyhow::Result<ChildGuard> {
    Ok(etcd_worker_at(etcd, id, lease_ttl_secs, kv_tokens)?.0)
}

/// [`etcd_worker_with_kv`], also returning the worker's gRPC URL.
pub fn etcd_worker_at(etcd: &str, id: &str, lease_ttl_secs: u64, kv_tokens: u64) -> anyhow::Result<(ChildGuard, String)> {
    let (ttl, kv) = (lease_ttl_secs.to_string(), kv_tokens.to_string());
    let (guard, addr) = tessera_tests::spawn_worker(&["--id", id, "--etcd", etcd, "--lease-ttl-secs", &ttl, "--kv-capacity-tokens", &kv])?;
    Ok((guard, format!("http://{addr}")))
}

/// How often [`until_serving_groups`] and similar waits ask again.
pub const POLL: Duration = Duration::from_millis(20);

/// Waits until the coordinator reports `n` serving groups of its only model, asking every
/// [`POLL`] (a bounded wait on a condition, not a fixed sleep).
pub async fn until_serving_groups(client: &mut Client, n: u32) {
    until_groups(client, &format!("{n} groups serving"), |groups| groups == n).await;
}

/// Waits until the number of serving groups of the coordinator's only model satisfies `done`.
/// `ListModels` answers from the coordinator's own view, never waiting on a worker, so this
/// sees a lost group at once even while its worker cannot be reached.
pub async fn until_groups(client: &Client, what: &str, done: impl Fn(u32) -> bool) {
    let wait = async {
        let mut client = client.clone();
        let mut tick = tokio::time::interval(POLL);
        loop {
            tick.tick().await;
            let models = client.list_models(pb::ListModelsRequest {}).await.expect("list models").into_inner().models;
            if models.first().is_some_and(|m| done(m.serving_groups)) {
                return;
            }
        }
    };
    tokio::time::timeout(PATIENCE, wait).await.unwrap_or_else(|_| panic!("never saw {what}"));
}

/// A channel to `url` (the generated clients of other crates have no `connect`).
pub async fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_string()).expect("valid URL").connect().await.expect("connect")
}

pub async fn connect(url: &str) -> Client {
    InferenceClient::connect(url.to_string()).await.expect("connect to the coordinator")
}

/// Waits (on the health service's watch stream, not by polling) until the inference service
/// reports `want`.
pub async fn wait_health(url: &str, want: ServingStatus) -> anyhow::Result<()> {
    wait_service_health(url, "tessera.v1.Inference", want).await
}

/// What the health service at `url` says of `service` now.
pub async fn service_health(url: &str, service: &str) -> anyhow::Result<ServingStatus> {
    let mut health = HealthClient::new(channel(url).await);
    let answer = health.check(HealthCheckRequest { service: service.into() }).await?.into_inner();
    ServingStatus::try_from(answer.status).context("unknown serving status")
}

/// Waits (on the health service's watch stream, not by polling) until `service` at `url`
/// reports `want`.
pub async fn wait_service_health(url: &str, service: &str, want: ServingStatus) -> anyhow::Result<()> {
    let mut health = HealthClient::new(channel(url).await);
    let mut stream = health.watch(HealthCheckRequest { service: service.into() }).await?.into_inner();
    let wait = async {
        while let Some(update) = stream.message().await? {
            if update.status == want as i32 {
                return Ok(());
            }
        }
        bail!("health watch ended before {want:?}")
    };
    tokio::time::timeout(PATIENCE, wait).await.context("health did not change in time")?
}

/// Everything one `Generate` call returned.
#[derive(Debug, Default)]
pub struct Collected {
    pub started: Option<pb::Started>,
    pub chunks: Vec<pb::TokenChunk>,
    pub finished: Option<pb::Finished>,
    /// A long-input job's progress events, in order.
    pub progress: Vec<pb::LongInputProgress>,
}

impl Collected {
    pub fn tokens(&self) -> Vec<u32> {
        self.chunks.iter().flat_map(|c| c.tokens.iter().map(|t| t.id)).collect()
    }

    pub fn text(&self) -> String {
        self.chunks.iter().map(|c| c.text.as_str()).collect()
    }

    pub fn reason(&self) -> Option<pb::FinishReason> {
        self.finished.as_ref().and_then(|f| pb::FinishReason::try_from(f.reason).ok())
    }

    pub fn workers(&self) -> Vec<String> {
        self.started.as_ref().and_then(|s| s.placement.as_ref()).map(|p| p.workers.clone()).unwrap_or_default()
    }
}

/// A greedy request for `input` that ignores EOS, so it runs exactly `max_new_tokens`.
pub fn greedy(input: pb::generate_request::Input, max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: String::new(),
        input: Some(input),
        sampling: Some(pb::SamplingParams::default()),
        stopping: Some(pb::StoppingCriteria { max_new_tokens, ignore_eos: true, ..Default::default() }),
        request_id: String::new(),
        no_prefix_cache: false,
        adapter: String::new(),
        long_input: None,
    }
}

/// `n` streams of `max_new_tokens` each, on prompts `"{story} {i}"`: even ones greedy, odd
/// ones sampled at `temperature` with seed `seed + i`, so a fault strikes both kinds.
pub fn greedy_and_seeded(n: u64, story: &str, max_new_tokens: u32, temperature: f32, seed: u64) -> Vec<pb::GenerateRequest> {
    (0..n)
        .map(|i| {
            let mut r = greedy(prompt(&format!("{story} {i}")), max_new_tokens);
            if i % 2 == 1 {
                r.sampling = Some(pb::SamplingParams { temperature: Some(temperature), seed: Some(seed + i), ..Default::default() });
            }
            r
        })
        .collect()
}

pub fn tokens(ids: Vec<u32>) -> pb::generate_request::Input {
    pb::generate_request::Input::Tokens(pb::TokenIds { ids })
}

pub fn prompt(text: &str) -> pb::generate_request::Input {
    pb::generate_request::Input::Prompt(text.to_string())
}

/// Runs a request to its end; an error status mid-stream is returned as `Err`.
pub async fn generate(client: &mut Client, request: pb::GenerateRequest) -> Result<Collected, tonic::Status> {
    generate_within(client, request, PATIENCE).await
}

/// [`generate`] for requests that take longer than [`PATIENCE`] (a long-input job).
pub async fn generate_within(client: &mut Client, request: pb::GenerateRequest, patience: Duration) -> Result<Collected, tonic::Status> {
    let run = async {
        let mut stream = client.generate(request).await?.into_inner();
        let mut out = Collected::default();
        while let Some(message) = stream.message().await? {
            match message.event {
                Some(pb::generate_response::Event::Started(s)) => out.started = Some(s),
                Some(pb::generate_response::Event::Chunk(c)) => out.chunks.push(c),
                Some(pb::generate_response::Event::Finished(f)) => out.finished = Some(f),
                Some(pb::generate_response::Event::Progress(p)) => out.progress.push(p),
                None => {}
            }
        }
        Ok(out)
    };
    tokio::time::timeout(patience, run).await.unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("test patience ran out")))
}

/// Seconds per decode step of `request` on this machine now: a probe of the same request cut
/// to 32 tokens, timed from its first token to its last (so neither the queue nor the prefill
/// counts).
pub async fn seconds_per_token(client: &Client, mut request: pb::GenerateRequest) -> f64 {
    const PROBE: usize = 32;
    request.stopping.get_or_insert_with(Default::default).max_new_tokens = PROBE as u32;
    let mut stream = client.clone().generate(request).await.expect("probe accepted").into_inner();
    let (mut first, mut last, mut after_first) = (None, std::time::Instant::now(), 0usize);
    while let Some(m) = stream.message().await.expect("probe stream") {
        if let Some(pb::generate_response::Event::Chunk(c)) = m.event {
            last = std::time::Instant::now();
            match first {
                None => first = Some(last),
                Some(_) => after_first += c.tokens.len(),
            }
        }
    }
    let first = first.expect("the probe streamed tokens");
    assert!(after_first > 0, "the probe's tokens came in one chunk");
    last.duration_since(first).as_secs_f64() / after_first as f64
}

/// A client deadline for work of `tokens` decode steps at `seconds_per_token`: a quarter of
/// that time, and at least 150 ms so the request is accepted first. Deadline tests then hold
/// on a fast idle machine and on a loaded one alike, since they rest on this order, not on a
/// speed.
pub fn deadline_well_before(seconds_per_token: f64, tokens: u32) -> Duration {
    let expected = Duration::from_secs_f64(seconds_per_token * f64::from(tokens));
    let deadline = (expected / 4).max(Duration::from_millis(150));
    assert!(deadline < expected / 2, "{tokens} steps take only {expected:?} here: too quick for a deadline of {deadline:?}");
    eprintln!("deadline {deadline:?}: {tokens} steps take about {expected:?} here");
    deadline
}

/// The coordinator's `ClusterStatus` now.
pub async fn cluster_status(client: &Client) -> pb::ClusterStatusResponse {
    client.clone().cluster_status(pb::ClusterStatusRequest {}).await.expect("ClusterStatus").into_inner()
}

/// Asks `ClusterStatus` every [`POLL`] until `done` holds and returns that answer; fails the
/// test, naming `what`, after [`PATIENCE`].
pub async fn until_status(client: &Client, what: &str, done: impl Fn(&pb::ClusterStatusResponse) -> bool) -> pb::ClusterStatusResponse {
    let wait = async {
        let mut tick = tokio::time::interval(POLL);
        loop {
            tick.tick().await;
            let status = cluster_status(client).await;
            if done(&status) {
                return status;
            }
        }
    };
    tokio::time::timeout(PATIENCE, wait).await.unwrap_or_else(|_| panic!("never saw {what}"))
}

/// A counter of `ClusterStatus.counters.finished` ("LENGTH", "CANCELLED", "LOST", ...).
pub fn finished_count(status: &pb::ClusterStatusResponse, reason: &str) -> u64 {
    status.counters.as_ref().and_then(|c| c.finished.get(reason).copied()).unwrap_or_default()
}

/// [`etcd_worker_at`] with more `tessera worker` flags (e.g. `--drain-timeout-secs`).
pub fn etcd_worker_with(etcd: &str, id: &str, lease_ttl_secs: u64, kv_tokens: u64, extra: &[&str]) -> anyhow::Result<(ChildGuard, String)> {
    let (ttl, kv) = (lease_ttl_secs.to_string(), kv_tokens.to_string());
    let mut args = vec!["--id", id, "--etcd", etcd, "--lease-ttl-secs", &ttl, "--kv-capacity-tokens", &kv];
    args.extend_from_slice(extra);
    let (guard, addr) = tessera_tests::spawn_worker(&args)?;
    Ok((guard, format!("http://{addr}")))
}

/// Sends SIGTERM to a child: a worker then drains and leaves.
pub fn sigterm(child: &ChildGuard) {
    signal(child, "-TERM");
}

/// Sends a signal (`kill`'s spelling: "-TERM", "-STOP", "-CONT") to a child.
pub fn signal(child: &ChildGuard, which: &str) {
    let pid = child.0.id().to_string();
    let sent = std::process::Command::new("kill").args([which, &pid]).status().expect("run kill");
    assert!(sent.success(), "kill {which} {pid} failed");
}

/// Waits (up to [`PATIENCE`]) for a child to exit on its own and returns how it exited.
pub async fn exit_of(mut child: ChildGuard) -> std::process::ExitStatus {
    let exit = tokio::task::spawn_blocking(move || child.0.wait());
    tokio::time::timeout(PATIENCE, exit).await.expect("the process did not exit in time").expect("join").expect("wait")
}

/// Reads a stream until its first tokens arrive and returns them; the stream must stay
/// healthy and must not finish first.
pub async fn first_tokens(stream: &mut tonic::Streaming<pb::GenerateResponse>) -> Vec<u32> {
    loop {
        match stream.message().await.expect("stream healthy").and_then(|m| m.event) {
            Some(pb::generate_response::Event::Chunk(c)) if !c.tokens.is_empty() => return c.tokens.iter().map(|t| t.id).collect(),
            Some(pb::generate_response::Event::Finished(f)) => panic!("a stream ended before its first tokens: {f:?}"),
            _ => {}
        }
    }
}

/// Reads a stream to its end: the further tokens and the `Finished` event; an error status
/// or a stream open past [`PATIENCE`] fails the test.
pub async fn rest_of(mut stream: tonic::Streaming<pb::GenerateResponse>) -> (Vec<u32>, Option<pb::Finished>) {
    let mut tokens = Vec::new();
    let mut finished = None;
    let read = async {
        while let Some(m) = stream.message().await.expect("the stream survives") {
            match m.event {
                Some(pb::generate_response::Event::Chunk(c)) => tokens.extend(c.tokens.iter().map(|t| t.id)),
                Some(pb::generate_response::Event::Finished(f)) => finished = Some(f),
                _ => {}
            }
        }
    };
    tokio::time::timeout(PATIENCE, read).await.expect("the stream must not hang");
    (tokens, finished)
}

/// Starts `tessera group --tp 2 --name NAME` (one pod's unit of two ranks) registered in
/// `etcd` with a 2 s lease, `worker_flags` going to every rank; returns once both ranks listen.
pub fn group_unit(etcd: &str, name: &str, worker_flags: &[&str]) -> ChildGuard {
    let mut args =
        vec!["group", "--tp", "2", "--name", name, "--port", "0", "--threads", "2", "--", "--etcd", etcd, "--lease-ttl-secs", "2"];
    args.extend_from_slice(worker_flags);
    let (process, first) = tessera_tests::spawn_tessera(tessera_bin(), &args).expect("tessera group");
    assert!(first.parse::<std::net::SocketAddr>().is_ok(), "tessera group printed {first:?}");
    process
}
