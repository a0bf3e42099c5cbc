//! Text longer than any context (`GenerateRequest.long_input`) on the real SmolLM2-135M-Instruct
//! (context 8,192): a document of over 30,000 tokens is split into overlapping chunks, each
//! answered on one of two groups, and the answers combined into one that streams; REFINE walks
//! the chunks in order; bad configurations are refused before anything runs, naming the field;
//! the OpenAI endpoint takes the same settings as an extra field.

use std::time::Duration;

use serde_json::json;
use tessera_model::fixture::smollm2_gguf;
use tessera_proto::v1 as pb;
use tonic::Code;

use crate::http_client::*;
use crate::support::*;

/// SmolLM2-135M-Instruct's context.
const CONTEXT: u32 = 8192;
/// A whole job: 30,000 tokens of prefill and some answers on two shared cores.
const JOB_PATIENCE: Duration = Duration::from_secs(600);

/// `sentences` distinct sentences of a made-up log book.
fn document(sentences: usize) -> String {
    let islands = ["Arran", "Bute", "Coll", "Eigg", "Islay", "Jura", "Mull"];
    (0..sentences)
        .map(|i| {
            format!(
                "Record {i}: the keeper of the lighthouse on {} counted {} ships and {} gulls on day {}. ",
                islands[i % islands.len()],
                (i * 37) % 101,
                (i * 53) % 97,
                i / 3 + 1
            )
        })
        .collect()
}

fn long_request(
    text: String,
    strategy: pb::long_input::Strategy,
    chunk_tokens: u32,
    overlap_tokens: u32,
    max_new_tokens: u32,
) -> pb::GenerateRequest {
    let mut request = greedy(prompt(&text), max_new_tokens);
    request.stopping.as_mut().expect("stopping").ignore_eos = false;
    request.long_input = Some(pb::LongInput {
        strategy: strategy as i32,
        chunk_tokens,
        overlap_tokens,
        instruction: "Summarise the following text in one sentence.".into(),
    });
    request
}

async fn run_job(client: &mut Client, request: pb::GenerateRequest) -> Collected {
    generate_within(client, request, JOB_PATIENCE).await.expect("the job finishes")
}

/// The checks every finished job must pass: the chunks of stage 0 tile the document with the
/// asked overlap, within the chunk size and the context; every call's counts add up to its
/// stage's, and the stages' to the usage.
fn check_accounting(job: &Collected, chunk_tokens: u32, overlap_tokens: u32) -> Vec<pb::LongInputProgress> {
    let document_tokens = job.started.as_ref().expect("started").prompt_tokens;
    let finished = job.finished.as_ref().expect("finished");
    let chunks: Vec<pb::LongInputProgress> = {
        let mut c: Vec<_> = job.progress.iter().filter(|p| p.stage == 0).cloned().collect();
        c.sort_by_key(|p| p.first_token);
        c
    };
    assert!(chunks.len() >= 2, "{} chunks", chunks.len());
    assert_eq!(chunks[0].first_token, 0);
    assert_eq!(chunks.last().map(|c| c.end_token), Some(document_tokens), "the chunks reach the document's end");
    for pair in chunks.windows(2) {
        assert_eq!(pair[0].end_token - pair[1].first_token, overlap_tokens, "overlap as asked: {pair:?}");
    }
    for p in &job.progress {
        assert!(p.end_token - p.first_token <= chunk_tokens, "{p:?}");
        assert!(p.prompt_tokens + p.completion_tokens <= CONTEXT, "a call within the context: {p:?}");
        assert!(p.prompt_tokens > 0, "{p:?}");
    }
    let stages = &finished.stages;
    assert_eq!(stages[0].calls as usize, chunks.len(), "stage 0 answers every chunk");
    for s in stages {
        let calls: Vec<_> = job.progress.iter().filter(|p| p.stage == s.stage).collect();
        assert_eq!(calls.len(), s.calls as usize, "stage {}", s.stage);
        assert!(calls.iter().all(|p| p.total == s.calls), "stage {}: totals", s.stage);
        assert_eq!(calls.iter().map(|p| u64::from(p.prompt_tokens)).sum::<u64>(), s.prompt_tokens, "stage {}", s.stage);
        assert_eq!(calls.iter().map(|p| u64::from(p.completion_tokens)).sum::<u64>(), s.completion_tokens, "stage {}", s.stage);
    }
    let usage = finished.usage.expect("usage");
    assert_eq!(u64::from(usage.prompt_tokens), stages.iter().map(|s| s.prompt_tokens).sum::<u64>());
    assert_eq!(u64::from(usage.completion_tokens), stages.iter().map(|s| s.completion_tokens).sum::<u64>());
    let streamed: u32 = job.chunks.iter().map(|c| c.tokens.len() as u32).sum();
    let last = job.progress.last().expect("progress");
    assert_eq!(streamed, last.completion_tokens, "the last call's answer is what streamed");
    chunks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_four_times_the_context_is_answered_in_chunks() {
    // Long steps: fewer passes over the weights for the same prefill.
    let cluster = up_with_http(&smollm2_gguf(), &["--workers", "2", "--step-tokens", "2048"]).expect("tessera up");
    let mut client = connect(&cluster.grpc).await;
    // About 31 tokens a sentence: over 30,000 tokens in all.
    let text = document(980);

    // Map-reduce over 30,000+ tokens: chunks of 2,048 with 64 overlapping (shorter chunks cost
    // less attention for the same document).
    let job = run_job(&mut client, long_request(text.clone(), pb::long_input::Strategy::MapReduce, 2048, 64, 16)).await;
    let document_tokens = job.started.as_ref().expect("started").prompt_tokens;
    assert!(document_tokens >= 30_000, "the document is {document_tokens} tokens");
    let chunks = check_accounting(&job, 2048, 64);
    let finished = job.finished.as_ref().expect("finished");
    assert!(finished.stages.len() >= 2, "chunks, then at least one round of combining: {:?}", finished.stages);
    assert_eq!(finished.stages.last().map(|s| s.calls), Some(1), "one answer at the end");
    assert!(!job.text().trim().is_empty(), "an answer streamed");
    eprintln!(
        "long_input: {document_tokens} tokens in {} chunks, stages {:?}, answer {:?}",
        chunks.len(),
        finished.stages.iter().map(|s| (s.calls, s.prompt_tokens, s.completion_tokens)).collect::<Vec<_>>(),
        job.text()
    );

    // Refine over a shorter document: every chunk in order, one stage.
    let refine = run_job(&mut client, long_request(document(60), pb::long_input::Strategy::Refine, 1024, 64, 16)).await;
    let chunks = check_accounting(&refine, 1024, 64);
    assert_eq!(refine.finished.as_ref().expect("finished").stages.len(), 1);
    let in_order: Vec<u32> = refine.progress.iter().map(|p| p.first_token).collect();
    assert_eq!(in_order, chunks.iter().map(|c| c.first_token).collect::<Vec<_>>(), "refined chunk after chunk");

    // Refused before anything runs, naming the field.
    let refused = |request: pb::GenerateRequest| {
        let mut client = client.clone();
        async move { client.generate(request).await.expect_err("refused") }
    };
    let status = refused(long_request(text.clone(), pb::long_input::Strategy::MapReduce, 1024, 1024, 24)).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("long_input.overlap_tokens"), "{}", status.message());
    let status = refused(long_request(text.clone(), pb::long_input::Strategy::MapReduce, 9000, 0, 24)).await;
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("long_input.chunk_tokens") && status.message().contains("8192"), "{}", status.message());
    let status = refused(long_request(text.clone(), pb::long_input::Strategy::MapReduce, 40, 0, 24)).await;
    assert!(
        status.message().contains("long_input.chunk_tokens") && status.message().contains("two partial answers"),
        "{}",
        status.message()
    );
    let mut chat_input = long_request(String::new(), pb::long_input::Strategy::Refine, 1024, 0, 16);
    chat_input.input = Some(pb::generate_request::Input::Chat(pb::ChatInput {
        messages: vec![pb::ChatMessage { role: "user".into(), content: text.clone() }],
    }));
    let status = refused(chat_input).await;
    assert!(status.message().contains("prompt text"), "{}", status.message());

    // The OpenAI endpoint: the same settings as an extra field.
    let (code, body) = post(
        &format!("{}/completions", cluster.http),
        &json!({
            "prompt": document(40),
            "max_tokens": 16,
            "temperature": 0,
            "long_input": {"strategy": "map_reduce", "chunk_tokens": 512, "overlap_tokens": 32, "instruction": "Summarise the following text in one sentence."}
        }),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let usage = &body["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap_or(0) > 1024, "every call's prompt counted (three calls over 1,200 tokens): {body}");
    assert!(!body["choices"][0]["text"].as_str().unwrap_or_default().trim().is_empty(), "{body}");
    let (code, body) = post(
        &format!("{}/completions", cluster.http),
        &json!({"prompt": "x", "max_tokens": 16, "long_input": {"strategy": "fold", "chunk_tokens": 1024, "instruction": "y"}}),
    )
    .await;
    assert_eq!(code, 400, "{body}");
}
