//! Time to resume: how long a stream waits, from the death of a worker under it to its next
//! token, when its request moves and prefills its context again — on one group, or on a ring
//! of groups (the prefill-cost rule, `--ring-prefill-tokens`) — beside the time the original
//! prefill took (its time to first token). Contexts of 1k, 4k and 8k tokens.
//!
//! usage: RUST_LOG=warn cargo bench -p tessera-tests --bench resume -- [ROUNDS]
//! Real processes on loopback: etcd, a coordinator and `tessera worker`s (TP=1, one math thread
//! each), the tiny demo model (hidden 128, 4 layers; its 4,096 positions stretched to 9,000 by
//! `--max-context`). Group: two workers, the stream's own is killed, the other re-prefills it.
//! Ring: three workers, rings of two chosen by the prefill rule; a ring member is killed and a
//! new ring (the survivor, reset and formed again, and the spare) re-prefills it.

use std::time::{Duration, Instant};

use tessera_etcd_harness::EtcdServer;
use tessera_model::fixture::{demo, write_fixture, WriteOptions};
use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_client::InferenceClient;
use tessera_tests::{spawn_tessera, tessera_bin_release, ChildGuard};

const NEW_TOKENS: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Group,
    Ring,
}

/// The original time to first token and the gap the move left in the stream.
struct Measured {
    first_token: Duration,
    resume: Duration,
}

fn worker(etcd: &str, id: &str) -> anyhow::Result<ChildGuard> {
    let args = ["worker", "--id", id, "--etcd", etcd, "--lease-ttl-secs", "120", "--threads", "1", "--listen", "127.0.0.1:0"];
    Ok(spawn_tessera(tessera_bin_release(), &args)?.0)
}

async fn measure(dir: &std::path::Path, context: usize, mode: Mode) -> anyhow::Result<Measured> {
    let etcd = EtcdServer::start().await;
    let url = etcd.url();
    // Rings of two: the prompt (and the prompt plus outputs, on resume) over a member's share.
    let ring_rule = (context / 2 + NEW_TOKENS as usize).to_string();
    let mut args = vec!["coordinator", "--listen", "127.0.0.1:0", "--etcd", &url, "--tp", "1", "--max-context", "9000"];
    if mode == Mode::Ring {
        args.extend(["--ring-prefill-tokens", &ring_rule]);
    }
    let model = dir.to_str().ok_or_else(|| anyhow::anyhow!("model path is not UTF-8"))?;
    args.extend(["--model", model]);
    let (_coordinator, address) = spawn_tessera(tessera_bin_release(), &args)?;
    let ids: &[&str] = if mode == Mode::Ring { &["w-a", "w-b", "w-c"] } else { &["w-a", "w-b"] };
    let mut workers = ids.iter().map(|id| Ok((id.to_string(), worker(&url, id)?))).collect::<anyhow::Result<Vec<_>>>()?;
    let mut client = InferenceClient::connect(format!("http://{address}")).await?;
    loop {
        let models = client.list_models(pb::ListModelsRequest {}).await?.into_inner().models;
        if models.first().is_some_and(|m| m.serving_groups == ids.len() as u32) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let prompt: Vec<u32> = (0..context).map(|i| 3 + (i * 37 % 300) as u32).collect();
    let request = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Tokens(pb::TokenIds { ids: prompt })),
        sampling: Some(pb::SamplingParams::default()),
        stopping: Some(pb::StoppingCriteria { max_new_tokens: NEW_TOKENS, ignore_eos: true, ..Default::default() }),
        ..Default::default()
    };
    let sent = Instant::now();
    let mut stream = client.generate(request).await?.into_inner();
    let (mut placed, mut first, mut tokens) = (Vec::new(), None, 0usize);
    while tokens < 4 {
        match stream.message().await?.and_then(|m| m.event) {
            Some(pb::generate_response::Event::Started(s)) => placed = s.placement.map(|p| p.workers).unwrap_or_default(),
            Some(pb::generate_response::Event::Chunk(c)) => {
                first.get_or_insert_with(Instant::now);
                tokens += c.tokens.len();
            }
            other => anyhow::bail!("the stream ended early: {other:?}"),
        }
    }
    let first_token = first.map(|f| f - sent).unwrap_or_default();
    let victim = workers.iter().position(|(id, _)| placed.contains(id)).ok_or_else(|| anyhow::anyhow!("placed on {placed:?}"))?;
    workers[victim].1 .0.kill()?;
    let killed = Instant::now();
    let mut resume = None;
    let mut finished = None;
    while let Some(m) = stream.message().await? {
        match m.event {
            Some(pb::generate_response::Event::Chunk(c)) => {
                resume.get_or_insert_with(|| killed.elapsed());
                tokens += c.tokens.len();
            }
            Some(pb::generate_response::Event::Finished(f)) => finished = Some(f),
            _ => {}
        }
    }
    let finished = finished.ok_or_else(|| anyhow::anyhow!("no Finished event"))?;
    anyhow::ensure!(finished.migrations == 1 && tokens == NEW_TOKENS as usize, "moved {} times, {tokens} tokens", finished.migrations);
    Ok(Measured { first_token, resume: resume.ok_or_else(|| anyhow::anyhow!("no token after the kill"))? })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args().skip(1).find(|a| !a.starts_with("--")).map(|r| r.parse()).transpose()?.unwrap_or(2);
    let dir = write_fixture(&demo(), &std::env::temp_dir().join("tessera-bench-resume"), &WriteOptions::default())?;
    println!("| context | re-prefill on | original prefill (time to first token), ms | time to resume, ms | resume ÷ prefill |");
    println!("|---|---|---|---|---|");
    for context in [1024usize, 4096, 8192] {
        for mode in [Mode::Group, Mode::Ring] {
            for _ in 0..rounds {
                let m = measure(&dir, context, mode).await?;
                let (p, r) = (m.first_token.as_secs_f64() * 1e3, m.resume.as_secs_f64() * 1e3);
                println!("| {context} | {} | {p:.0} | {r:.0} | {:.2} |", if mode == Mode::Ring { "ring of 2" } else { "one group" }, r / p);
            }
        }
    }
    Ok(())
}
