//! The OpenAI-compatible HTTP API of a real cluster (`tessera up --http-port 0`, TP=2 on two
//! worker processes), driven with a plain HTTP client: the same tokens as gRPC for a seeded
//! request, `n`, streaming (Chinese split over byte-level tokens arrives whole), logprobs in
//! both shapes, stop strings, errors as OpenAI's error object, and a client that disconnects —
//! mid-stream or while waiting for a whole response — freeing its sequence on every rank.

use serde_json::{json, Value};
use tessera_etcd_harness::EtcdServer;
use tessera_model::fixture::scripted::{fixture_tokenizer, write_scripted, Script, CHINESE_IDS, CHINESE_TEXT, EOS};
use tessera_model::fixture::{demo, WriteOptions};
use tessera_proto::v1 as pb;
use tokio::io::AsyncWriteExt;

use crate::http_client::*;
use crate::support::*;

/// A cluster serving a scripted model whose greedy continuation of "风" is "和日丽", then EOS,
/// and whose chat answer (the continuation of the template's closing "\n") is "风和日丽".
fn chinese_cluster(name: &str) -> HttpServed {
    let newline = fixture_tokenizer().expect("tokenizer").encode("\n", false).expect("encode").get_ids().to_vec();
    assert_eq!(newline.len(), 1, "a newline is one token");
    let mut next = vec![(newline[0], CHINESE_IDS[0])];
    next.extend(CHINESE_IDS.windows(2).map(|w| (w[0], w[1])));
    next.push((CHINESE_IDS[CHINESE_IDS.len() - 1], EOS));
    let script = Script::new("scripted-chinese-chat", next).expect("script");
    let dir = write_scripted(&script, &scratch(name), &WriteOptions::default()).expect("write scripted model");
    up_with_http(&dir, &["--workers", "2", "--tp", "2", "--http-metrics"]).expect("tessera up --http-port 0")
}

fn ids(choice: &Value) -> Vec<u32> {
    choice["token_ids"].as_array().expect("token_ids").iter().map(|v| v.as_u64().expect("id") as u32).collect()
}

/// A sampled gRPC request for "风" that runs exactly `n` tokens.
fn sampled(seed: u64, n: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        sampling: Some(pb::SamplingParams { temperature: Some(1.0), seed: Some(seed), ..Default::default() }),
        ..greedy(prompt("风"), n)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_gives_grpcs_tokens_streams_whole_characters_and_reports_openai_errors() {
    let cluster = chinese_cluster("openai-http");
    let mut client = connect(&cluster.grpc).await;
    let completions = format!("{}/completions", cluster.http);
    let chat = format!("{}/chat/completions", cluster.http);

    // The same seeded request gives the same tokens through both front doors; with n = 2 the
    // second choice is the request seeded one higher.
    let body = json!({"prompt": "风", "max_tokens": 24, "temperature": 1.0, "seed": 42, "n": 2, "ignore_eos": true,
                      "return_token_ids": true});
    let (status, reply) = post(&completions, &body).await;
    assert_eq!(status, 200, "{reply}");
    let choices = reply["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2);
    let mut prompt_tokens = 0;
    for (choice, seed) in choices.iter().zip([42, 43]) {
        let grpc = generate(&mut client, sampled(seed, 24)).await.expect("gRPC");
        prompt_tokens = grpc.started.as_ref().map_or(0, |s| s.prompt_tokens);
        assert_eq!(ids(choice), grpc.tokens(), "seed {seed}");
        assert_eq!(choice["text"].as_str(), Some(grpc.text().as_str()), "seed {seed}");
        assert_eq!(choice["finish_reason"], "length");
    }
    assert_eq!(prompt_tokens, 3, "\"风\" is three byte-level tokens");
    assert_eq!(reply["usage"], json!({"prompt_tokens": 3, "completion_tokens": 48, "total_tokens": 51}), "the prompt counts once");
    let id = reply["id"].as_str().expect("id");
    assert!(id.starts_with("cmpl-") && id.len() == 29, "{id}");
    assert_eq!(reply["object"], "text_completion");
    assert!(reply["system_fingerprint"].as_str().is_some_and(|f| f.starts_with("fp_")), "{reply}");
    let (_, again) = post(&completions, &json!({"prompt": "风", "max_tokens": 1})).await;
    assert_eq!(again["system_fingerprint"], reply["system_fingerprint"], "one fingerprint per served model");
    assert_ne!(again["id"], reply["id"]);

    // Greedy Chinese: every streamed piece is whole characters, and they join to the whole text.
    let body = json!({"prompt": "风", "max_tokens": 64, "temperature": 0});
    let (_, whole) = post(&completions, &body).await;
    let expected: String = CHINESE_TEXT.chars().skip(1).collect();
    assert_eq!(whole["choices"][0]["text"].as_str(), Some(expected.as_str()));
    assert_eq!(whole["choices"][0]["finish_reason"], "stop", "EOS is OpenAI's stop");
    let streamed = json!({"prompt": "风", "max_tokens": 64, "temperature": 0, "stream": true,
                          "stream_options": {"include_usage": true}});
    let chunks = Events::open(&completions, &streamed).await.all().await;
    assert_eq!(joined(&chunks, 0), expected);
    let pieces: Vec<&str> = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).filter(|t| !t.is_empty()).collect();
    assert!(pieces.len() >= 3 && pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    let usage = chunks.last().expect("a usage chunk")["usage"].clone();
    let generated = CHINESE_IDS.len() as u64 - 3 + 1;
    assert_eq!((usage["completion_tokens"].as_u64(), chunks.last().expect("last")["choices"].clone()), (Some(generated), json!([])));
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()), "usage is null until the last chunk");
    assert_eq!(whole["usage"]["completion_tokens"].as_u64(), Some(generated), "EOS is counted, as the core counts it");

    // Chat in Chinese, streamed and whole: the deltas are whole characters and join to the
    // message.
    let chat_body = json!({"messages": [{"role": "user", "content": "风"}], "max_tokens": 64, "temperature": 0});
    let (status, whole_chat) = post(&chat, &chat_body).await;
    assert_eq!(status, 200, "{whole_chat}");
    assert_eq!(whole_chat["object"], "chat.completion");
    assert_eq!(whole_chat["choices"][0]["message"], json!({"role": "assistant", "content": CHINESE_TEXT}));
    assert_eq!(whole_chat["choices"][0]["finish_reason"], "stop");
    assert!(whole_chat["id"].as_str().is_some_and(|id| id.starts_with("chatcmpl-")), "{whole_chat}");
    let mut streamed_chat = chat_body.clone();
    streamed_chat["stream"] = json!(true);
    let chunks = Events::open(&chat, &streamed_chat).await.all().await;
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    assert!(chunks.iter().all(|c| c.get("usage").is_none()), "no usage unless asked for");
    assert_eq!(joined(&chunks, 0), CHINESE_TEXT);
    let deltas: Vec<&str> = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).filter(|t| !t.is_empty()).collect();
    assert!(deltas.len() >= 3 && deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
    assert_eq!(chunks.last().expect("last")["choices"][0]["finish_reason"], "stop");

    // Log-probabilities, chat's shape: each token's bytes, joined, are the text's bytes (a
    // token holding part of a character says which bytes).
    let body = json!({"messages": [{"role": "user", "content": "风"}], "max_tokens": 64, "temperature": 0, "logprobs": true,
                      "top_logprobs": 2});
    let (_, reply) = post(&chat, &body).await;
    let content = reply["choices"][0]["logprobs"]["content"].as_array().expect("logprobs.content");
    assert_eq!(content.len(), CHINESE_IDS.len(), "one entry per streamed token");
    let bytes: Vec<u8> =
        content.iter().flat_map(|t| t["bytes"].as_array().expect("bytes").iter().map(|b| b.as_u64().expect("byte") as u8)).collect();
    assert_eq!(String::from_utf8(bytes).expect("whole characters"), CHINESE_TEXT);
    for t in content {
        let top = t["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(top.len(), 2, "{t}");
        assert!(t["logprob"].as_f64().is_some_and(|lp| lp <= 0.0), "{t}");
        assert_eq!(top[0]["logprob"], t["logprob"], "greedy: the token is the most likely one");
    }
    // ... and the completions shape.
    let (_, reply) = post(&completions, &json!({"prompt": "风", "max_tokens": 64, "temperature": 0, "logprobs": 1})).await;
    let lp = &reply["choices"][0]["logprobs"];
    let n = lp["tokens"].as_array().expect("tokens").len();
    assert_eq!((n, lp["token_logprobs"].as_array().map(Vec::len), lp["top_logprobs"].as_array().map(Vec::len)), (8, Some(8), Some(8)));
    assert_eq!(lp["text_offset"][0], 0);

    // Stop strings end the text before them and are named in stop_reason.
    let (_, stopped) = post(&completions, &json!({"prompt": "风", "max_tokens": 64, "temperature": 0, "stop": "日"})).await;
    assert_eq!(stopped["choices"][0]["text"], "和");
    assert_eq!(
        (stopped["choices"][0]["finish_reason"].clone(), stopped["choices"][0]["stop_reason"].clone()),
        (json!("stop"), json!("日"))
    );

    // Errors are OpenAI's error object with the HTTP status the SDKs branch on.
    let error = |v: &Value| (v["error"]["type"].clone(), v["error"]["param"].clone(), v["error"]["code"].clone());
    let (status, e) = post(&completions, &json!({"prompt": "风", "max_tokens": "ten"})).await;
    assert_eq!((status.as_u16(), error(&e)), (400, (json!("invalid_request_error"), json!("max_tokens"), Value::Null)), "{e}");
    let (status, e) = post(&completions, &json!({"prompt": "风", "temperature": -1})).await;
    assert_eq!((status.as_u16(), e["error"]["param"].clone()), (400, json!("temperature")), "{e}");
    assert!(e["error"]["message"].as_str().is_some_and(|m| m.contains("temperature must be")), "the core's own message: {e}");
    let (status, e) = post(&completions, &json!({"prompt": "风", "model": "nope"})).await;
    assert_eq!((status.as_u16(), e["error"]["code"].clone()), (404, json!("model_not_found")), "{e}");
    let (status, e) = post(&completions, &json!({"prompt": "风", "max_tokens": 100000})).await;
    assert_eq!((status.as_u16(), e["error"]["param"].clone()), (400, json!("max_tokens")), "{e}");
    let (status, e) = call(&completions, hyper::Method::POST, Some("{not json".into())).await;
    assert_eq!(status, 400, "{e}");
    let (status, _) = call(&completions, hyper::Method::GET, None).await;
    assert_eq!(status, 405);
    let (status, _) = get(&format!("{}/nothing-here", cluster.http)).await;
    assert_eq!(status, 404);
    let huge = json!({"prompt": "风".repeat(2 << 20)});
    let (status, e) = post(&completions, &huge).await;
    assert_eq!((status.as_u16(), e["error"]["code"].clone()), (413, json!("body_too_large")), "bodies are capped");

    // Models, health and metrics on the same port.
    let (status, models) = get(&format!("{}/models", cluster.http)).await;
    assert_eq!(status, 200);
    let name = models["data"][0]["id"].as_str().expect("a model id").to_string();
    assert_eq!((models["object"].clone(), models["data"][0]["object"].clone()), (json!("list"), json!("model")));
    assert_eq!(get(&format!("{}/models/{name}", cluster.http)).await.1["id"], json!(name));
    assert_eq!(get(&format!("{}/models/nope", cluster.http)).await.0, 404);
    let root = cluster.http.trim_end_matches("/v1");
    assert_eq!(get(&format!("{root}/health")).await, (hyper::StatusCode::OK, json!({"status": "serving"})));
    let (status, metrics) = get(&format!("{root}/metrics")).await;
    assert_eq!(status, 200);
    let text = metrics.as_str().expect("text");
    assert!(text.lines().any(|l| l.starts_with("tessera_requests_finished_total{reason=\"LENGTH\"}")), "{text}");

    // Everything the core counted went through the core.
    let status = cluster_status(&client).await;
    assert!(status.workers.iter().all(|w| w.sequences == 0), "{status:?}");
}

/// Waits until both ranks hold the one running sequence.
async fn held_on_every_rank(client: &Client) {
    until_status(client, "the sequence on every rank", |s| s.workers.len() == 2 && s.workers.iter().all(|w| w.sequences == 1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_connection_frees_the_sequence_on_every_rank() {
    let cluster = chinese_cluster("openai-disconnect");
    let client = connect(&cluster.grpc).await;
    let completions = format!("{}/completions", cluster.http);
    let long = json!({"prompt": "风", "max_tokens": 3000, "temperature": 0, "ignore_eos": true, "stream": true,
                      "return_token_ids": true});

    // Mid-stream: a few events arrive, then the client goes away.
    let mut events = Events::open(&completions, &long).await;
    for _ in 0..3 {
        assert!(matches!(events.next().await, Some(Event::Data(_))));
    }
    held_on_every_rank(&client).await;
    let during = cluster_status(&client).await;
    assert!(during.workers.iter().all(|w| w.kv_tokens > 0), "{during:?}");
    drop(events);
    let after = until_status(&client, "the streamed sequence freed on every rank", |s| {
        s.running_requests == 0 && s.workers.iter().all(|w| w.sequences == 0 && w.kv_tokens == 0)
    })
    .await;
    assert_eq!(finished_count(&after, "CANCELLED"), 1);

    // Waiting for a whole response: the request is running when the socket closes.
    let mut whole = long.clone();
    whole["stream"] = json!(false);
    let body = whole.to_string();
    let addr = completions.trim_start_matches("http://").split('/').next().expect("authority").to_string();
    let mut socket = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.expect("write head");
    socket.write_all(body.as_bytes()).await.expect("write body");
    held_on_every_rank(&client).await;
    drop(socket);
    let after = until_status(&client, "the waiting request's sequence freed on every rank", |s| {
        s.running_requests == 0 && s.workers.iter().all(|w| w.sequences == 0 && w.kv_tokens == 0)
    })
    .await;
    assert_eq!(finished_count(&after, "CANCELLED"), 2);

    // The cluster still serves.
    let (status, reply) = post(&completions, &json!({"prompt": "风", "max_tokens": 4, "ignore_eos": true})).await;
    assert_eq!((status.as_u16(), reply["usage"]["completion_tokens"].as_u64()), (200, Some(4)));
}

/// With no worker registered nothing can serve: health says so and requests get 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_with_no_workers_answers_503() {
    let etcd = EtcdServer::start().await;
    let dir = fixture(&demo(), "openai-no-workers");
    let args = ["coordinator", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--etcd", &etcd.url(), "--model"];
    let mut args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    args.push(dir.as_os_str());
    let coordinator = spawn_with_http(&args).expect("tessera coordinator --http-listen");
    let root = coordinator.http.trim_end_matches("/v1");
    assert_eq!(get(&format!("{root}/health")).await, (hyper::StatusCode::SERVICE_UNAVAILABLE, json!({"status": "not serving"})));
    let (status, e) = post(&format!("{}/completions", coordinator.http), &json!({"prompt": "Hello"})).await;
    assert_eq!(
        (status.as_u16(), e["error"]["type"].clone(), e["error"]["code"].clone()),
        (503, json!("server_error"), json!("no_capacity"))
    );
    let (status, models) = get(&format!("{}/models", coordinator.http)).await;
    assert_eq!((status.as_u16(), models["data"][0]["id"].clone()), (200, json!("demo")));
    // Metrics were not asked for on this port.
    assert_eq!(get(&format!("{root}/metrics")).await.0, 404);
}
