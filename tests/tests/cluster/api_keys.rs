//! API keys on a real cluster (`tessera up --api-keys`, keys made by `tessera keygen`): no key
//! and a wrong key get one UNAUTHENTICATED / 401 answer, the right key works through both
//! front doors, a key at its concurrency limit gets RESOURCE_EXHAUSTED / 429 until its stream
//! ends, health stays open, and the process log names keys but never holds one.

use std::process::Command;

use tessera_model::fixture::demo;
use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_client::InferenceClient;
use tessera_tests::{spawn_logged, tessera_bin};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::*;
use crate::tls_client::*;

/// `tessera keygen NAME LIMITS...`: the key and its file line.
fn keygen(name: &str, limits: &[&str]) -> (String, String) {
    let out = Command::new(tessera_bin()).arg("keygen").arg(name).args(limits).output().expect("run tessera keygen");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("UTF-8");
    let mut lines = text.lines();
    let (key, line) = (lines.next().expect("key").to_string(), lines.next().expect("file line").to_string());
    assert!(!line.contains(&key), "the file line must not hold the key");
    (key, line)
}

fn request(max_new_tokens: u32) -> pb::GenerateRequest {
    greedy(prompt("Hello"), max_new_tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_both_front_doors_and_stay_out_of_the_log() {
    let dir = scratch("api-keys");
    let (alice, alice_line) = keygen("alice", &[]);
    let (bob, bob_line) = keygen("bob", &["max_concurrent=1"]);
    let keys = dir.join("keys");
    std::fs::write(&keys, format!("# test keys\n{alice_line}\n{bob_line}\n")).expect("write key file");
    let model = fixture(&demo(), "api-keys");
    let log = dir.join("up.log");
    let args = ["up", "--threads", "1", "--port", "0", "--http-port", "0", "--workers", "1", "--api-keys"];
    let mut args: Vec<std::ffi::OsString> = args.iter().map(std::ffi::OsString::from).collect();
    args.push(keys.into_os_string());
    args.push("--model".into());
    args.push(model.into_os_string());
    let (_up, lines, _stdout) = spawn_logged(tessera_bin(), &args, &log, 2).expect("tessera up --api-keys");
    let grpc = lines[0].rsplit(' ').next().expect("URL").to_string();
    let api = socket_of(lines[1].rsplit(' ').next().expect("URL"));
    let mut client = InferenceClient::new(channel(&grpc).await);

    // Health stays open.
    assert_eq!(service_health(&grpc, "tessera.v1.Inference").await.expect("health"), ServingStatus::Serving);
    let (status, _) = http(api, "GET", "/health", None, None).await.expect("HTTP health");
    assert_eq!(status, 200);

    // No key and a wrong key: one answer, on both front doors.
    let none = client.generate(tonic::Request::new(request(4))).await.expect_err("no key");
    let wrong = client.generate(with_key(request(4), "tsk-not-a-key")).await.expect_err("wrong key");
    assert_eq!((none.code(), wrong.code()), (Code::Unauthenticated, Code::Unauthenticated));
    assert_eq!(none.message(), wrong.message());
    let listed = client.list_models(tonic::Request::new(pb::ListModelsRequest {})).await.expect_err("no key");
    assert_eq!(listed.code(), Code::Unauthenticated);
    let body = r#"{"prompt": "Hello", "max_tokens": 4}"#;
    let (s1, b1) = http(api, "POST", "/v1/completions", None, Some(body)).await.expect("HTTP");
    let (s2, b2) = http(api, "POST", "/v1/completions", Some("tsk-not-a-key"), Some(body)).await.expect("HTTP");
    assert_eq!((s1, s2), (401, 401), "{b1} {b2}");
    assert_eq!(b1, b2);
    assert_eq!(http(api, "GET", "/v1/models", None, None).await.expect("HTTP").0, 401);

    // The right key works on both.
    let out = generate_with(&mut client, with_key(request(4), &alice)).await.expect("alice generates");
    assert_eq!(out, 4);
    let (status, reply) = http(api, "POST", "/v1/completions", Some(&alice), Some(body)).await.expect("HTTP");
    assert_eq!(status, 200, "{reply}");

    // bob may run one request at a time: a second gets RESOURCE_EXHAUSTED / 429 while the first
    // streams, and goes through once it has ended.
    let mut first = client.generate(with_key(request(4000), &bob)).await.expect("bob's first").into_inner();
    read_chunks(&mut first, 1).await;
    let second = client.generate(with_key(request(4), &bob)).await.expect_err("over bob's limit");
    assert_eq!(second.code(), Code::ResourceExhausted, "{second:?}");
    let (status, reply) = http(api, "POST", "/v1/completions", Some(&bob), Some(body)).await.expect("HTTP");
    assert_eq!(status, 429, "{reply}");
    assert!(generate_with(&mut client, with_key(request(4), &alice)).await.is_ok(), "alice is not limited by bob");
    drop(first);
    let freed = async {
        loop {
            match generate_with(&mut client, with_key(request(4), &bob)).await {
                Ok(_) => return,
                Err(s) if s.code() == Code::ResourceExhausted => tokio::time::sleep(POLL).await,
                Err(s) => panic!("{s:?}"),
            }
        }
    };
    tokio::time::timeout(PATIENCE, freed).await.expect("bob's slot is freed when his stream is dropped");

    // The log names the keys and holds neither key.
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("alice") && text.contains("bob"), "{text}");
    assert!(!text.contains(&alice) && !text.contains(&bob), "a key reached the log");
}

/// Runs a request to its end and returns how many tokens it generated.
async fn generate_with(client: &mut Client, request: tonic::Request<pb::GenerateRequest>) -> Result<usize, tonic::Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let mut tokens = 0;
    while let Some(m) = stream.message().await? {
        if let Some(pb::generate_response::Event::Chunk(c)) = m.event {
            tokens += c.tokens.len();
        }
    }
    Ok(tokens)
}

/// `tessera bench` against `args` (after `bench`); returns the JSON report and whether it
/// exited successfully.
fn bench(args: &[&str], json: &std::path::Path) -> (serde_json::Value, bool) {
    let out = Command::new(tessera_bin())
        .arg("bench")
        .args(args)
        .args(["--num-prompts", "3", "--input-len", "8", "--output-len", "4", "--vocab-range", "300", "--json"])
        .arg(json)
        .output()
        .expect("run tessera bench");
    let report = std::fs::read_to_string(json).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    (report, out.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tessera_bench_measures_a_coordinator_behind_tls_and_api_keys() {
    let dir = scratch("bench-tls-keys");
    let ca = tessera_tests::certs::TestCa::new(&dir, "api").expect("CA");
    let leaf = ca.leaf("coordinator").expect("server certificate");
    let (key, line) = keygen("bench", &[]);
    let keys = dir.join("keys");
    std::fs::write(&keys, format!("{line}\n")).expect("write key file");
    let model = fixture(&demo(), "bench-tls-keys");
    let path = |p: &std::path::Path| p.to_str().expect("UTF-8 path").to_string();
    let (cert, tls_key, keys, model) = (path(&leaf.cert), path(&leaf.key), path(&keys), path(&model));
    let args = ["up", "--threads", "1", "--port", "0", "--http-port", "0", "--workers", "1", "--tls-cert", &cert, "--tls-key", &tls_key];
    let mut args: Vec<&str> = args.to_vec();
    args.extend(["--api-keys", &keys, "--model", &model]);
    let (_up, lines, _stdout) = spawn_logged(tessera_bin(), &args, &dir.join("up.log"), 2).expect("tessera up with TLS and keys");
    let grpc = lines[0].rsplit(' ').next().expect("URL").to_string();
    let api = lines[1].rsplit(' ').next().expect("URL").to_string();
    assert!(grpc.starts_with("https://") && api.starts_with("https://"), "{grpc} {api}");
    let ca_pem = path(&ca.cert);

    for (protocol, addr) in [("grpc", &grpc), ("openai", &api)] {
        let json = dir.join(format!("{protocol}.json"));
        let (report, ok) = bench(&["--protocol", protocol, "--addr", addr, "--tls-ca", &ca_pem, "--api-key", &key], &json);
        assert!(ok, "{protocol}: {report}");
        assert_eq!((report["completed"].as_u64(), report["failed"].as_u64()), (Some(3), Some(0)), "{protocol}: {report}");
        assert_eq!(report["total_output_tokens"].as_u64(), Some(12), "{protocol}: {report}");
        // Without the key every request is refused and the run fails.
        let refused = dir.join(format!("{protocol}-no-key.json"));
        let (report, ok) = bench(&["--protocol", protocol, "--addr", addr, "--tls-ca", &ca_pem, "--api-key", ""], &refused);
        assert!(!ok, "{protocol}: a run with no key must fail: {report}");
    }
}
