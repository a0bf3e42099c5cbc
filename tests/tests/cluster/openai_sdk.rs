//! The official `openai` Python package (pinned in `scripts/fetch_openai_sdk.sh`, installed by
//! `scripts/setup.sh` into `target/openai-venv`) against a real cluster: SmolLM2-135M-Instruct
//! and all-MiniLM-L6-v2 served by `tessera up --http-port 0`. The checks live in
//! `tests/openai_sdk/test_openai_sdk.py`: completions and chat, whole and streamed, `n` with a
//! seed, logprobs, stop strings, Chinese chat streamed in whole characters, embeddings equal to
//! this test's gRPC `Embed` vectors, `models.list`, and errors raised as the SDK's typed
//! exceptions (`BadRequestError`, `NotFoundError`, `RateLimitError`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tessera_model::fixture::{minilm_dir, smollm2_gguf};
use tessera_proto::v1 as pb;

use crate::http_client::up_with_http;
use crate::support::*;

/// Requests one group may hold waiting; the script fills the queue to see a 429.
const QUEUE_DEPTH: &str = "2";

fn sdk_python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/openai-venv/bin/python");
    assert!(
        python.is_file(),
        "the openai SDK venv is missing at {}: run scripts/setup.sh (or scripts/fetch_openai_sdk.sh) first",
        python.display()
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_passes_against_a_cluster() {
    let python = sdk_python();
    let minilm = format!("minilm={}", minilm_dir().display());
    let cluster = up_with_http(&smollm2_gguf(), &["--workers", "2", "--model", &minilm, "--max-batch", "1", "--queue-depth", QUEUE_DEPTH])
        .expect("tessera up --http-port 0");
    let mut client = connect(&cluster.grpc).await;

    // The vectors gRPC gives, for the script to compare the SDK's with: the texts together, as
    // the script sends them, and the first alone.
    let texts: Vec<String> = ["hello", "你好，世界", "The quick brown fox jumps over the lazy dog."].map(String::from).to_vec();
    let embed = |texts: Vec<String>| pb::EmbedRequest { model: "minilm".into(), texts, ..Default::default() };
    let together = client.embed(embed(texts.clone())).await.expect("Embed").into_inner().embeddings;
    let single = client.embed(embed(vec![texts[0].clone()])).await.expect("Embed").into_inner().embeddings;
    let reference = serde_json::json!({
        "texts": texts,
        "vectors": together.iter().map(|e| e.values.clone()).collect::<Vec<_>>(),
        "tokens": together.iter().map(|e| e.tokens).sum::<u32>(),
        "single": single[0].values,
    });
    let reference_path = scratch("openai-sdk").join("grpc-embeddings.json");
    std::fs::write(&reference_path, reference.to_string()).expect("write the reference vectors");

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("openai_sdk/test_openai_sdk.py");
    let mut command = std::process::Command::new(python);
    command
        .arg(script)
        .args(["--base-url", &cluster.http, "--model", "SmolLM2-135M-Instruct.Q4_1", "--encoder", "minilm", "--queue-depth", QUEUE_DEPTH])
        .arg("--grpc-embeddings")
        .arg(&reference_path);
    let run = tokio::task::spawn_blocking(move || command.output());
    let output = tokio::time::timeout(Duration::from_secs(900), run)
        .await
        .expect("the SDK script finished in time")
        .expect("join")
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the SDK checks failed ({}):\n{stdout}\n{stderr}", output.status);
    assert!(stdout.lines().any(|l| l.ends_with(" 10 passed, 0 failed")), "every check ran:\n{stdout}");
    eprint!("{stdout}");
}
