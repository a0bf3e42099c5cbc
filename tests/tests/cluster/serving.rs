//! Serving under load: `tessera bench` against a local cluster, the static-batching baseline,
//! and the Prometheus endpoint. Timings are never asserted here, only that the numbers exist
//! and the counts add up.

use std::io::{Read, Write};

use tessera_model::fixture::demo;
use tessera_proto::v1 as pb;
use tessera_tests::tessera_bin;

use crate::support::*;

#[test]
fn tessera_bench_reports_counts_and_finite_latencies() {
    let dir = fixture(&demo(), "bench");
    let cluster = up(&dir, &["--workers", "1"]).expect("tessera up");
    let json = scratch("bench").join("bench.json");
    let output = std::process::Command::new(tessera_bin())
        .args(["bench", "--addr", &cluster.url, "--num-prompts", "6", "--input-len", "12", "--output-len", "5"])
        .args(["--vocab-range", "300"])
        .args(["--request-rate", "50", "--max-concurrency", "3", "--seed", "7", "--label", "test"])
        .args(["--slo-ttft-ms", "600000", "--slo-tpot-ms", "600000", "--json"])
        .arg(&json)
        .output()
        .expect("run tessera bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "tessera bench failed: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("| output token throughput (tok/s) |"), "markdown table expected:\n{stdout}");

    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON written")).expect("valid JSON");
    let count = |k: &str| report[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {report}"));
    assert_eq!((count("completed"), count("failed")), (6, 0), "{report}");
    assert_eq!((count("total_input_tokens"), count("total_output_tokens")), (6 * 12, 6 * 5), "ignore_eos: every output has the asked length");
    assert_eq!(report["label"], "test");
    assert_eq!(report["max_concurrency"], 3);
    for k in ["duration_s", "request_throughput", "output_throughput", "total_token_throughput", "goodput"] {
        let v = report[k].as_f64().unwrap_or_else(|| panic!("{k} missing in {report}"));
        assert!(v.is_finite() && v > 0.0, "{k} = {v}");
    }
    for k in ["ttft", "tpot", "itl", "e2e_latency"] {
        for stat in ["mean_ms", "p50_ms", "p90_ms", "p99_ms"] {
            let v = report[k][stat].as_f64().unwrap_or_else(|| panic!("{k}.{stat} missing in {report}"));
            assert!(v.is_finite() && v >= 0.0, "{k}.{stat} = {v}");
        }
    }
    let (p50, p99) = (report["ttft"]["p50_ms"].as_f64().unwrap_or_default(), report["ttft"]["p99_ms"].as_f64().unwrap_or_default());
    assert!(p50 <= p99, "percentiles must be ordered: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_batching_leaves_greedy_outputs_unchanged() {
    let dir = fixture(&demo(), "static-batching");
    let requests: Vec<pb::GenerateRequest> =
        (0..4u32).map(|i| greedy(tokens((0..5 + 7 * i).map(|t| (t * 31 + i) % 200 + 3).collect()), 6 + 3 * i)).collect();
    let mut outputs = Vec::new();
    for flags in [&["--workers", "1"][..], &["--workers", "1", "--static-batching"]] {
        let cluster = up(&dir, flags).expect("tessera up");
        let client = connect(&cluster.url).await;
        let runs = requests.iter().map(|r| {
            let mut client = client.clone();
            let r = r.clone();
            async move { generate(&mut client, r).await.expect("generate") }
        });
        let collected = futures::future::join_all(runs).await;
        outputs.push(collected.iter().map(|c| (c.tokens(), c.reason())).collect::<Vec<_>>());
    }
    for (i, out) in outputs[0].iter().enumerate() {
        assert_eq!(out.0.len(), 6 + 3 * i, "request {i}");
        assert_eq!(out.1, Some(pb::FinishReason::Length));
    }
    assert_eq!(outputs[0], outputs[1], "static batching changes when sequences run, not what they generate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_counts_a_finished_request() {
    let dir = fixture(&demo(), "metrics");
    // A free port for the metrics listener (up prints only its gRPC address).
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let listen = format!("127.0.0.1:{port}");
    let cluster = up(&dir, &["--workers", "1", "--metrics-listen", &listen]).expect("tessera up");
    let mut client = connect(&cluster.url).await;
    let done = generate(&mut client, greedy(prompt("Once upon a time"), 6)).await.expect("generate");
    assert_eq!(done.tokens().len(), 6);

    let (head, body) = tokio::task::spawn_blocking(move || scrape(port, "/metrics")).await.expect("scrape");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    for line in [
        "tessera_requests_finished_total{reason=\"LENGTH\"} 1",
        "tessera_requests_finished_total{reason=\"CANCELLED\"} 0",
        "tessera_output_tokens_total 6",
        "tessera_time_to_first_token_seconds_count 1",
        "tessera_time_to_first_token_seconds_bucket{le=\"+Inf\"} 1",
        "tessera_inter_token_latency_seconds_count 5",
        "tessera_queued_requests 0",
        "tessera_running_requests 0",
        "tessera_serving_groups 1",
        "tessera_loop_guard_stops_total 0",
        "tessera_worker_kv_capacity_tokens{worker=\"local-0\"} 1048576",
        "tessera_worker_kv_tokens{worker=\"local-0\"} 0",
    ] {
        assert!(body.lines().any(|l| l == line), "missing {line:?} in\n{body}");
    }
    let (head, _) = tokio::task::spawn_blocking(move || scrape(port, "/other")).await.expect("scrape");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

/// `GET path` over plain HTTP/1.1; returns the head and the body.
fn scrape(port: u16, path: &str) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_streams_equal_each_run_alone() {
    let dir = fixture(&demo(), "concurrent-32");
    let cluster = up(&dir, &["--workers", "1", "--max-batch", "32"]).expect("tessera up");
    let client = connect(&cluster.url).await;
    // Prompts of different lengths, so sequences prefill and finish at different steps.
    let request = |i: usize| {
        let prompt: Vec<u32> = (0..3 + (i * 7) % 40).map(|j| 3 + ((i * 31 + j * 17) % 300) as u32).collect();
        greedy(tokens(prompt), 8 + (i % 5) as u32 * 6)
    };
    let mut alone = Vec::new();
    for i in 0..32 {
        alone.push(generate(&mut client.clone(), request(i)).await.expect("alone").tokens());
    }
    let together = futures::future::join_all((0..32).map(|i| {
        let mut c = client.clone();
        async move { generate(&mut c, request(i)).await.expect("concurrent").tokens() }
    }))
    .await;
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, t, "request {i}: concurrent vs alone");
    }
    let status = connect(&cluster.url).await.cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
    assert_eq!(status.counters.and_then(|c| c.finished.get("LENGTH").copied()), Some(64));
}
