//! One stream through a local cluster (`tessera up`, one worker, TP=1) over gRPC and over the
//! OpenAI-compatible HTTP API (server-sent events), against the same model decoded in this
//! process: decode tokens/s and time to first token, side by side.
//!
//! usage: cargo bench -p tessera-tests --bench cluster_decode -- [MODEL_DIR]
//! Without MODEL_DIR it runs two models: the SmolLM-135M-sized fixture (f32, given the
//! fixtures' tokenizer), where the math dominates, and the tiny demo model, where a step takes
//! about a millisecond and the coordinator hop's own cost shows. The two engines alternate round by round so machine noise hits both alike; both
//! use every core for the math (the worker through `--threads`, this process through rayon's
//! default) and both are release builds. The HTTP client opens one connection per stream.
//! Reported: medians over the rounds, and their ratios.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tessera_collective::SingleRank;
use tessera_model::fixture::{demo, smol135, write_fixture, WriteOptions};
use tessera_model::sampler::argmax;
use tessera_model::{Batch, LoadConfig, LogitsMode, Model, SeqChunk};
use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_client::InferenceClient;

const PROMPT_LEN: usize = 16;
const NEW_TOKENS: usize = 64;
const ROUNDS: usize = 7;

/// Time to first token and decode rate of one stream.
#[derive(Debug, Clone, Copy)]
struct Run {
    ttft: Duration,
    decode_tok_s: f64,
}

fn model_dirs(arg: Option<String>) -> anyhow::Result<Vec<PathBuf>> {
    if let Some(dir) = arg {
        return Ok(vec![PathBuf::from(dir)]);
    }
    let root = std::env::temp_dir().join("tessera-bench");
    let dir = write_fixture(&smol135(), &root, &WriteOptions::default())?;
    // The benchmark model feeds token ids; the coordinator still wants a tokenizer to detokenize.
    let text_side = write_fixture(&demo(), &root.join("text-side"), &WriteOptions::default())?;
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(text_side.join(file), dir.join(file))?;
    }
    Ok(vec![dir, text_side])
}

fn prompt(vocab: u32) -> Vec<u32> {
    // Past the fixtures' special tokens, inside any vocabulary.
    (0..PROMPT_LEN as u32).map(|i| 8 + (i * 7919 + 13) % (vocab - 8)).collect()
}

fn in_process(model: &Model) -> anyhow::Result<Run> {
    let prompt = prompt(model.config().vocab_size as u32);
    let mut kv = model.new_kv_cache();
    let start = Instant::now();
    let chunk = [SeqChunk { seq: 1, start: 0, len: prompt.len() }];
    let logits = model.forward(&Batch { tokens: &prompt, chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk)?;
    let mut next = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
    let first = Instant::now();
    for i in 1..NEW_TOKENS {
        let chunk = [SeqChunk { seq: 1, start: prompt.len() + i - 1, len: 1 }];
        let logits = model.forward(&Batch { tokens: &[next], chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk)?;
        next = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
    }
    let last = Instant::now();
    Ok(Run { ttft: first - start, decode_tok_s: (NEW_TOKENS - 1) as f64 / (last - first).as_secs_f64() })
}

async fn through_cluster(url: &str, vocab: u32) -> anyhow::Result<Run> {
    let mut client = InferenceClient::connect(url.to_string()).await?;
    let request = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Tokens(pb::TokenIds { ids: prompt(vocab) })),
        sampling: Some(pb::SamplingParams::default()),
        stopping: Some(pb::StoppingCriteria { max_new_tokens: NEW_TOKENS as u32, ignore_eos: true, ..Default::default() }),
        ..Default::default()
    };
    let start = Instant::now();
    let mut stream = client.generate(request).await?.into_inner();
    let (mut first, mut last, mut tokens) = (None, start, 0usize);
    while let Some(message) = stream.message().await? {
        if let Some(pb::generate_response::Event::Chunk(c)) = message.event {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
            tokens += c.tokens.len();
        }
    }
    anyhow::ensure!(tokens == NEW_TOKENS, "cluster streamed {tokens} tokens, expected {NEW_TOKENS}");
    let first = first.ok_or_else(|| anyhow::anyhow!("no tokens"))?;
    Ok(Run { ttft: first - start, decode_tok_s: (NEW_TOKENS - 1) as f64 / (last - first).as_secs_f64() })
}

/// The same stream as [`through_cluster`], as server-sent events from the OpenAI-compatible
/// `/v1/completions` (`return_token_ids`, so every token arrives in an event as every gRPC chunk
/// does). `http` is the API's base URL, `http://HOST:PORT/v1`.
async fn through_http(http: &str, vocab: u32) -> anyhow::Result<Run> {
    use http_body_util::BodyExt;
    let rest = http.strip_prefix("http://").ok_or_else(|| anyhow::anyhow!("{http}: not http://"))?;
    let authority = rest.split('/').next().unwrap_or_default().to_string();
    let body = serde_json::json!({"prompt": prompt(vocab), "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": true,
                                  "stream": true, "return_token_ids": true});
    let start = Instant::now();
    let stream = tokio::net::TcpStream::connect(&authority).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::post("/v1/completions")
        .header(hyper::header::HOST, &authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(hyper::body::Bytes::from(body.to_string())))?;
    let mut body = sender.send_request(request).await?.into_body();
    let (mut first, mut last, mut tokens, mut pending) = (None, start, 0usize, Vec::new());
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let text = String::from_utf8(event)?;
            let Some(data) = text.trim_end().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                continue;
            }
            let chunk: serde_json::Value = serde_json::from_str(data)?;
            let n = chunk["choices"][0]["token_ids"].as_array().map_or(0, Vec::len);
            if n > 0 {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                tokens += n;
            }
        }
    }
    anyhow::ensure!(tokens == NEW_TOKENS, "HTTP streamed {tokens} tokens, expected {NEW_TOKENS}");
    let first = first.ok_or_else(|| anyhow::anyhow!("no tokens"))?;
    Ok(Run { ttft: first - start, decode_tok_s: (NEW_TOKENS - 1) as f64 / (last - first).as_secs_f64() })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let arg = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let bin = tessera_tests::tessera_bin_release();
    println!("{cores} cores, prompt {PROMPT_LEN} tokens, {NEW_TOKENS} new tokens, {ROUNDS} rounds, medians");
    for dir in model_dirs(arg)? {
        compare(bin, &dir, cores)?;
    }
    Ok(())
}

fn compare(bin: &std::path::Path, dir: &std::path::Path, cores: usize) -> anyhow::Result<()> {
    let model = Model::load(dir, &LoadConfig::default())?;
    let vocab = model.config().vocab_size as u32;
    let (_cluster, url, http, _stdout) = tessera_tests::spawn_up_with_http(bin, cores, dir, &["--workers", "1"])?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // One untimed round each: page in the weights, warm the connection.
    in_process(&model)?;
    runtime.block_on(through_cluster(&url, vocab))?;
    runtime.block_on(through_http(&http, vocab))?;
    let (mut local, mut remote, mut sse) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        local.push(in_process(&model)?);
        remote.push(runtime.block_on(through_cluster(&url, vocab))?);
        sse.push(runtime.block_on(through_http(&http, vocab))?);
    }
    let rate = |runs: &[Run]| median(runs.iter().map(|r| r.decode_tok_s).collect());
    let ttft = |runs: &[Run]| median(runs.iter().map(|r| r.ttft.as_secs_f64() * 1e3).collect());
    let (lr, rr, hr) = (rate(&local), rate(&remote), rate(&sse));
    let (lt, rt, ht) = (ttft(&local), ttft(&remote), ttft(&sse));
    println!("model {}", dir.display());
    println!("  in-process : decode {lr:8.2} tok/s   time to first token {lt:7.2} ms");
    println!("  cluster    : decode {rr:8.2} tok/s   time to first token {rt:7.2} ms   (gRPC)");
    println!("  HTTP SSE   : decode {hr:8.2} tok/s   time to first token {ht:7.2} ms   (/v1/completions)");
    println!("  ratio cluster/in-process decode: {:.3}   added time to first token: {:+.2} ms", rr / lr, rt - lt);
    println!("  ratio HTTP/gRPC decode: {:.3}   HTTP's added time to first token: {:+.2} ms", hr / rr, ht - rt);
    Ok(())
}
