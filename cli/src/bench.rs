//! `tessera bench`: a serving benchmark in the spirit of vLLM's `benchmark_serving.py`.
//!
//! Sends `--num-prompts` requests to a coordinator, arriving at `--request-rate` per second
//! (Poisson or evenly spaced; `inf` sends them all at once), at most `--max-concurrency` in
//! flight. Prompts are random token ids of random length (or lines of a JSONL file), and every
//! request ignores end-of-sequence so it generates exactly the length asked. From each stream it
//! records when every `TokenChunk` arrived: time to first token (TTFT), time per output token
//! after the first (TPOT), and each gap between chunks (ITL). It reports throughput,
//! mean/p50/p90/p99 of each, and goodput (requests per second meeting every given SLO) as a
//! markdown table and, with `--json`, as JSON. The random draws are seeded, so a run is
//! repeatable up to timing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::Client;
use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde::Serialize;
use tessera_model::sampler::SeededRng;
use tessera_proto::v1 as pb;
use tokio::sync::Semaphore;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Coordinator address: its gRPC address, or with `--protocol openai` the base URL of its
    /// OpenAI-compatible HTTP API (`http://HOST:PORT` or `.../v1`).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// TLS (`https://` addresses) and the API key, as `tessera generate` takes them.
    #[command(flatten)]
    auth: crate::client::ClientAuthArgs,
    /// How requests are sent: `tessera.v1` Generate streams, or streamed `/v1/completions`
    /// (server-sent events) over the OpenAI-compatible HTTP API.
    #[arg(long, value_enum, default_value_t = Protocol::Grpc)]
    protocol: Protocol,
    /// Served model name (may be omitted when the coordinator serves one model).
    #[arg(long, default_value = "")]
    model: String,
    /// LoRA adapters the requests name in turn (request i: adapter i mod the count); none: the
    /// base model. Comma-separated or repeated.
    #[arg(long = "adapter", value_name = "NAME", value_delimiter = ',')]
    adapters: Vec<String>,
    /// Requests to send.
    #[arg(long, default_value_t = 64)]
    num_prompts: usize,
    /// Requests per second; `inf` sends every request at once.
    #[arg(long, default_value_t = f64::INFINITY)]
    request_rate: f64,
    /// How request arrivals are spaced at a finite --request-rate.
    #[arg(long, value_enum, default_value_t = Arrivals::Poisson)]
    arrivals: Arrivals,
    /// Most requests in flight at once (default: no cap).
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// Prompt length in tokens (random token ids).
    #[arg(long, default_value_t = 128)]
    input_len: usize,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 64)]
    output_len: u32,
    /// Lengths are drawn uniformly from [len * (1 - r), len * (1 + r)].
    #[arg(long, default_value_t = 0.0)]
    range_ratio: f64,
    /// Random prompt token ids are drawn from [0, this); keep it within the model's vocabulary.
    #[arg(long, default_value_t = 1000)]
    vocab_range: u32,
    /// Prompts from a JSONL file instead of random ids: one object per line with "prompt"
    /// (text) and optionally "output_len"; lines are used in order, cycling.
    #[arg(long)]
    prompts_file: Option<PathBuf>,
    /// Seed of the lengths, prompt ids and arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Goodput counts requests whose TTFT is at most this many milliseconds ...
    #[arg(long)]
    slo_ttft_ms: Option<f64>,
    /// ... and whose TPOT is at most this many milliseconds.
    #[arg(long)]
    slo_tpot_ms: Option<f64>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A name for this run, printed with the results (e.g. "continuous c=16").
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Protocol {
    Grpc,
    Openai,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Arrivals {
    /// Exponential gaps with mean 1 / rate.
    Poisson,
    /// Every gap 1 / rate.
    Fixed,
}

/// Most prompts one run may send: a typo must not queue millions of requests.
const MAX_PROMPTS: usize = 1 << 20;

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    // One thread: the client must take as little CPU from a cluster on the same cores as it can.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(bench(args))
}

/// How requests reach the coordinator.
enum Sender {
    Grpc(Client),
    Openai(crate::bench_http::HttpTarget),
}

/// One request to send.
struct Planned {
    input: pb::generate_request::Input,
    output_len: u32,
    /// Offset from the start of the run at which it arrives.
    arrival: Duration,
}

/// What one request measured.
#[derive(Debug, Clone, Default)]
pub(crate) struct Measured {
    pub ok: bool,
    pub error: String,
    pub prompt_len: usize,
    pub output_tokens: usize,
    pub ttft: f64,
    pub latency: f64,
    /// Gaps between consecutive chunks that carried tokens, in seconds.
    pub itl: Vec<f64>,
}

impl Measured {
    /// Time per output token after the first, when there was more than one.
    fn tpot(&self) -> Option<f64> {
        (self.output_tokens > 1).then(|| (self.latency - self.ttft) / (self.output_tokens - 1) as f64)
    }
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!((1..=MAX_PROMPTS).contains(&args.num_prompts), "--num-prompts must be in 1..={MAX_PROMPTS}");
    anyhow::ensure!(args.request_rate > 0.0, "--request-rate must be positive (inf: all at once)");
    anyhow::ensure!((0.0..1.0).contains(&args.range_ratio), "--range-ratio must be in [0, 1)");
    anyhow::ensure!(args.max_concurrency != Some(0), "--max-concurrency must be at least 1");
    anyhow::ensure!(args.output_len > 0, "--output-len must be at least 1");
    anyhow::ensure!(args.vocab_range > 0, "--vocab-range must be at least 1");
    let plan = plan(&args)?;
    let sender = match args.protocol {
        Protocol::Grpc => Sender::Grpc(args.auth.connect(&args.addr).await?),
        Protocol::Openai => {
            let tls = args.auth.http_tls()?;
            Sender::Openai(crate::bench_http::HttpTarget::parse(&args.addr, tls, args.auth.authorization()?)?)
        }
    };
    let preempted_before = match &sender {
        Sender::Grpc(client) => preemptions(client).await,
        Sender::Openai(_) => None,
    };
    let limit = Arc::new(Semaphore::new(args.max_concurrency.unwrap_or(Semaphore::MAX_PERMITS)));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(plan.len());
    for (i, p) in plan.into_iter().enumerate() {
        tokio::time::sleep_until((start + p.arrival).into()).await;
        let limit = limit.clone();
        let adapter = if args.adapters.is_empty() { String::new() } else { args.adapters[i % args.adapters.len()].clone() };
        let send: futures_util::future::BoxFuture<'static, Measured> = match &sender {
            Sender::Grpc(client) => Box::pin(measure(client.clone(), request(&args, p.input, p.output_len, adapter))),
            Sender::Openai(target) => {
                let model = if adapter.is_empty() { args.model.clone() } else { format!("{}:{adapter}", args.model) };
                let body = crate::bench_http::body(&model, &p.input, p.output_len, args.temperature);
                Box::pin(crate::bench_http::measure(target.clone(), body))
            }
        };
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await;
            send.await
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await?);
    }
    let duration = start.elapsed().as_secs_f64();
    let mut report = Report::new(&args, &results, duration);
    // The coordinator's counter, so a run under memory pressure says what it cost; absent when
    // the server does not report it.
    if let Sender::Grpc(client) = &sender {
        report.preemptions = preempted_before.zip(preemptions(client).await).map(|(before, after)| after.saturating_sub(before));
    }
    print!("{}", report.markdown());
    if let Some(e) = results.iter().find(|r| !r.ok) {
        eprintln!("first failure: {}", e.error);
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    if report.completed == 0 {
        bail!("no request completed");
    }
    Ok(())
}

/// Sequences the coordinator has preempted so far (`ClusterStatus.counters.preemptions`).
async fn preemptions(client: &Client) -> Option<u64> {
    let status = client.clone().cluster_status(pb::ClusterStatusRequest {}).await.ok()?.into_inner();
    Some(status.counters?.preemptions)
}

/// The run's requests: lengths, prompts and arrival times, all from the seed.
fn plan(args: &BenchArgs) -> anyhow::Result<Vec<Planned>> {
    let mut rng = SeededRng::new(args.seed);
    let file = match &args.prompts_file {
        Some(path) => read_prompts(path)?,
        None => Vec::new(),
    };
    let mut arrival = Duration::ZERO;
    let mut out = Vec::with_capacity(args.num_prompts);
    for i in 0..args.num_prompts {
        let draw_len = |rng: &mut SeededRng, len: usize| {
            let low = (len as f64 * (1.0 - args.range_ratio)).floor().max(1.0) as usize;
            let high = ((len as f64 * (1.0 + args.range_ratio)).ceil() as usize).max(low);
            low + (rng.next_u64() % (high - low + 1) as u64) as usize
        };
        let output_len = draw_len(&mut rng, args.output_len as usize) as u32;
        let (input, output_len) = if file.is_empty() {
            let n = draw_len(&mut rng, args.input_len);
            let ids: Vec<u32> = (0..n).map(|_| (rng.next_u64() % u64::from(args.vocab_range)) as u32).collect();
            (pb::generate_request::Input::Tokens(pb::TokenIds { ids }), output_len)
        } else {
            let (prompt, len) = &file[i % file.len()];
            (pb::generate_request::Input::Prompt(prompt.clone()), len.unwrap_or(output_len))
        };
        out.push(Planned { input, output_len, arrival });
        if args.request_rate.is_finite() {
            let gap = match args.arrivals {
                // Inverse transform; 1 - u is in (0, 1], so the log is finite.
                Arrivals::Poisson => -(1.0 - rng.next_f64()).ln() / args.request_rate,
                Arrivals::Fixed => 1.0 / args.request_rate,
            };
            arrival += Duration::from_secs_f64(gap);
        }
    }
    Ok(out)
}

/// (prompt, output_len) per line of a JSONL file.
fn read_prompts(path: &std::path::Path) -> anyhow::Result<Vec<(String, Option<u32>)>> {
    #[derive(serde::Deserialize)]
    struct Line {
        prompt: String,
        output_len: Option<u32>,
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let l: Line = serde_json::from_str(line).with_context(|| format!("{} line {}", path.display(), i + 1))?;
        out.push((l.prompt, l.output_len));
    }
    if out.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(out)
}

fn request(args: &BenchArgs, input: pb::generate_request::Input, output_len: u32, adapter: String) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: args.model.clone(),
        input: Some(input),
        sampling: Some(pb::SamplingParams { temperature: Some(args.temperature), ..Default::default() }),
        stopping: Some(pb::StoppingCriteria { max_new_tokens: output_len, ignore_eos: true, ..Default::default() }),
        request_id: String::new(),
        no_prefix_cache: false,
        adapter,
        long_input: None,
    }
}

/// Sends one request and times its stream.
async fn measure(mut client: Client, request: pb::GenerateRequest) -> Measured {
    let mut m = Measured::default();
    let sent = Instant::now();
    let mut stream = match client.generate(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            m.error = format!("{:?}: {}", status.code(), status.message());
            return m;
        }
    };
    let mut last: Option<Instant> = None;
    loop {
        match stream.message().await {
            Ok(Some(r)) => match r.event {
                // The server's count, which a text prompt needs.
                Some(pb::generate_response::Event::Started(s)) => m.prompt_len = s.prompt_tokens as usize,
                Some(pb::generate_response::Event::Chunk(c)) if !c.tokens.is_empty() => {
                    let now = Instant::now();
                    match last {
                        None => m.ttft = now.duration_since(sent).as_secs_f64(),
                        Some(previous) => m.itl.push(now.duration_since(previous).as_secs_f64()),
                    }
                    last = Some(now);
                    m.output_tokens += c.tokens.len();
                }
                Some(pb::generate_response::Event::Finished(_)) => {
                    m.latency = sent.elapsed().as_secs_f64();
                    m.ok = last.is_some();
                    if !m.ok {
                        m.error = "finished without a token".into();
                    }
                    return m;
                }
                _ => {}
            },
            Ok(None) => {
                m.error = "the stream ended without Finished".into();
                return m;
            }
            Err(status) => {
                m.error = format!("{:?}: {}", status.code(), status.message());
                return m;
            }
        }
    }
}

/// Mean and percentiles of one latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Summary {
    mean_ms: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
}

impl Summary {
    /// Percentiles interpolate linearly between ranks (numpy's default); empty input gives 0.
    fn of(seconds: &[f64]) -> Self {
        if seconds.is_empty() {
            return Self::default();
        }
        let mut v: Vec<f64> = seconds.iter().map(|s| s * 1e3).collect();
        v.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            let rank = p / 100.0 * (v.len() - 1) as f64;
            let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
        };
        Self { mean_ms: v.iter().sum::<f64>() / v.len() as f64, p50_ms: pct(50.0), p90_ms: pct(90.0), p99_ms: pct(99.0) }
    }
}

/// The run's results, as printed and as written with `--json`.
#[derive(Debug, Serialize)]
struct Report {
    label: String,
    protocol: Protocol,
    num_prompts: usize,
    request_rate: Option<f64>,
    max_concurrency: Option<usize>,
    completed: usize,
    failed: usize,
    duration_s: f64,
    total_input_tokens: usize,
    total_output_tokens: usize,
    request_throughput: f64,
    output_throughput: f64,
    total_token_throughput: f64,
    ttft: Summary,
    tpot: Summary,
    itl: Summary,
    e2e_latency: Summary,
    slo_ttft_ms: Option<f64>,
    slo_tpot_ms: Option<f64>,
    /// Requests per second that met every SLO given; absent without SLOs.
    goodput: Option<f64>,
    /// Sequences the server preempted for want of KV memory during the run.
    preemptions: Option<u64>,
}

impl Report {
    fn new(args: &BenchArgs, results: &[Measured], duration: f64) -> Self {
        let ok: Vec<&Measured> = results.iter().filter(|r| r.ok).collect();
        let input: usize = ok.iter().map(|r| r.prompt_len).sum();
        let output: usize = ok.iter().map(|r| r.output_tokens).sum();
        let per_s = |n: usize| if duration > 0.0 { n as f64 / duration } else { 0.0 };
        let ttfts: Vec<f64> = ok.iter().map(|r| r.ttft).collect();
        let tpots: Vec<f64> = ok.iter().filter_map(|r| r.tpot()).collect();
        let itls: Vec<f64> = ok.iter().flat_map(|r| r.itl.iter().copied()).collect();
        let latencies: Vec<f64> = ok.iter().map(|r| r.latency).collect();
        let has_slo = args.slo_ttft_ms.is_some() || args.slo_tpot_ms.is_some();
        let good = ok
            .iter()
            .filter(|r| {
                args.slo_ttft_ms.is_none_or(|slo| r.ttft * 1e3 <= slo)
                    && args.slo_tpot_ms.is_none_or(|slo| r.tpot().unwrap_or(0.0) * 1e3 <= slo)
            })
            .count();
        Self {
            label: args.label.clone(),
            protocol: args.protocol,
            num_prompts: args.num_prompts,
            request_rate: args.request_rate.is_finite().then_some(args.request_rate),
            max_concurrency: args.max_concurrency,
            completed: ok.len(),
            failed: results.len() - ok.len(),
            duration_s: duration,
            total_input_tokens: input,
            total_output_tokens: output,
            request_throughput: per_s(ok.len()),
            output_throughput: per_s(output),
            total_token_throughput: per_s(input + output),
            ttft: Summary::of(&ttfts),
            tpot: Summary::of(&tpots),
            itl: Summary::of(&itls),
            e2e_latency: Summary::of(&latencies),
            slo_ttft_ms: args.slo_ttft_ms,
            slo_tpot_ms: args.slo_tpot_ms,
            goodput: has_slo.then(|| per_s(good)),
            preemptions: None,
        }
    }

    fn markdown(&self) -> String {
        let rate = self.request_rate.map_or("inf".to_string(), |r| format!("{r}"));
        let conc = self.max_concurrency.map_or("none".to_string(), |c| c.to_string());
        let mut rows = vec![
            ("successful requests".to_string(), format!("{} of {}", self.completed, self.num_prompts)),
            ("request rate / max concurrency".into(), format!("{rate} / {conc}")),
            ("duration (s)".into(), format!("{:.2}", self.duration_s)),
            ("input tokens / output tokens".into(), format!("{} / {}", self.total_input_tokens, self.total_output_tokens)),
            ("request throughput (req/s)".into(), format!("{:.2}", self.request_throughput)),
            ("output token throughput (tok/s)".into(), format!("{:.2}", self.output_throughput)),
            ("total token throughput (tok/s)".into(), format!("{:.2}", self.total_token_throughput)),
        ];
        if let Some(goodput) = self.goodput {
            let slo = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v}"));
            rows.push((
                format!("goodput (req/s; TTFT ≤ {} ms, TPOT ≤ {} ms)", slo(self.slo_ttft_ms), slo(self.slo_tpot_ms)),
                format!("{goodput:.2}"),
            ));
        }
        if let Some(n) = self.preemptions {
            rows.push(("preemptions (KV memory ran out)".into(), n.to_string()));
        }
        for (name, s) in [("TTFT", self.ttft), ("TPOT", self.tpot), ("ITL", self.itl), ("E2E latency", self.e2e_latency)] {
            rows.push((
                format!("{name} mean / p50 / p90 / p99 (ms)"),
                format!("{:.2} / {:.2} / {:.2} / {:.2}", s.mean_ms, s.p50_ms, s.p90_ms, s.p99_ms),
            ));
        }
        let title = if self.label.is_empty() { "tessera bench".to_string() } else { format!("tessera bench: {}", self.label) };
        let mut out = format!("| {title} | |\n|---|---:|\n");
        for (k, v) in rows {
            out.push_str(&format!("| {k} | {v} |\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let s = Summary::of(&[0.001, 0.002, 0.003, 0.004]);
        assert!((s.mean_ms - 2.5).abs() < 1e-9);
        assert!((s.p50_ms - 2.5).abs() < 1e-9);
        assert!((s.p90_ms - 3.7).abs() < 1e-9, "{}", s.p90_ms);
        assert_eq!(Summary::of(&[]).p99_ms, 0.0);
    }
}
