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
    assert_eq!(
        (count("total_input_tokens"), count("total_output_tokens")),
        (6 * 12, 6 * 5),
        "ignore_eos: every output has the asked length"
    );
    assert_eq!(report["label"], "test");
    assert_eq!(report["preemptions"], 0, "six short requests fit the default KV capacity");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_are_identical_when_kv_blocks_run_out_and_sequences_are_preempted() {
    let dir = fixture(&demo(), "preemption");
    // 128 KV tokens are 8 blocks: each request fits alone, six together need about 30.
    let cluster = up(&dir, &["--workers", "2", "--tp", "2", "--kv-capacity-tokens", "128", "--max-batch", "8"]).expect("tessera up");
    let client = connect(&cluster.url).await;
    let request = |i: u32| {
        let ids: Vec<u32> = (0..10 + 2 * i).map(|j| 3 + (i * 41 + j * 13) % 300).collect();
        let mut r = greedy(tokens(ids), 40 + 4 * i);
        if i % 2 == 1 {
            // Seeded sampling with every penalty that reads the history: a recomputed sequence
            // must resume the random stream and count its earlier tokens as output.
            r.sampling = Some(pb::SamplingParams {
                temperature: Some(1.1),
                top_k: Some(40),
                seed: Some(100 + u64::from(i)),
                repetition_penalty: Some(1.3),
                presence_penalty: 0.6,
                frequency_penalty: 0.4,
                ..Default::default()
            });
        }
        r
    };
    let mut alone = Vec::new();
    for i in 0..6 {
        let out = generate(&mut client.clone(), request(i)).await.expect("alone");
        alone.push((out.tokens(), out.reason()));
    }
    let counters = |s: pb::ClusterStatusResponse| s.counters.unwrap_or_default();
    let before = counters(client.clone().cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner());
    assert_eq!(before.preemptions, 0, "a request alone fits its group");

    let together = futures::future::join_all((0..6).map(|i| {
        let mut c = client.clone();
        async move {
            let out = generate(&mut c, request(i)).await.expect("concurrent");
            (out.tokens(), out.reason())
        }
    }))
    .await;
    let status = client.clone().cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
    assert!(status.workers.iter().all(|w| w.kv_blocks == 0 && w.sequences == 0), "every rank freed every block: {:?}", status.workers);
    let after = counters(status);
    assert!(after.preemptions > 0, "the budget must force preemption for this test to mean anything");
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.0.len(), 40 + 4 * i, "request {i}");
        assert_eq!(a, t, "request {i}: preempted and recomputed vs alone");
    }
    println!("{} preemptions over 6 concurrent requests", after.preemptions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deadline_ends_the_stream_and_frees_every_rank() {
    let dir = fixture(&demo(), "deadline");
    let cluster = up(&dir, &["--workers", "2", "--tp", "2"]).expect("tessera up");
    let client = connect(&cluster.url).await;

    // Mid-stream: a deadline at a quarter of the time 2,000 tokens take here.
    let per_token = seconds_per_token(&client, greedy(prompt("Once upon a time"), 32)).await;
    let mut request = tonic::Request::new(greedy(prompt("Once upon a time"), 2000));
    request.set_timeout(deadline_well_before(per_token, 2000));
    let mut stream = client.clone().generate(request).await.expect("accepted").into_inner();
    let status = until_error(&mut stream).await;
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("deadline passed after"), "{}", status.message());
    // The sequence is released on every rank before the error is sent.
    let after = client.clone().cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
    assert!(after.workers.iter().all(|w| w.kv_blocks == 0 && w.sequences == 0), "{:?}", after.workers);

    let counters =
        client.clone().cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner().counters.unwrap_or_default();
    assert_eq!(counters.deadlines_exceeded, 1);
    // The group still serves.
    let done = generate(&mut client.clone(), greedy(prompt("Once upon a time"), 4)).await.expect("generate after deadlines");
    assert_eq!(done.tokens().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_passing_while_waiting_for_kv_blocks_ends_the_request() {
    let dir = fixture(&demo(), "deadline-waiting");
    // 128 blocks: the long request grows to 126; the second needs 94 for its prompt alone, so
    // it fits only while the long one holds at most 34 (544 tokens).
    let cluster = up(&dir, &["--workers", "1", "--kv-capacity-tokens", "2048"]).expect("tessera up");
    let client = connect(&cluster.url).await;
    let mut long = client.clone().generate(greedy(tokens((0..10).map(|i| 5 + i * 7).collect()), 2000)).await.expect("long").into_inner();
    let (mut generated, mut from_100) = (0, None);
    while generated < 600 {
        match long.message().await.expect("long stream").and_then(|m| m.event) {
            Some(pb::generate_response::Event::Chunk(c)) => generated += c.tokens.len(),
            Some(_) => {}
            None => panic!("the long stream ended early"),
        }
        if generated >= 100 && from_100.is_none() {
            from_100 = Some((generated, std::time::Instant::now()));
        }
    }
    let (at, since) = from_100.expect("passed 100 tokens");
    let per_token = since.elapsed().as_secs_f64() / (generated - at).max(1) as f64;
    // From here the second request waits for blocks for the long one's last 1,400 steps; its
    // deadline passes at a quarter of that time.
    let mut request = tonic::Request::new(greedy(tokens((0..1500).map(|i| 3 + i % 200).collect()), 8));
    request.set_timeout(deadline_well_before(per_token, 1400));
    let mut waiting = client.clone().generate(request).await.expect("accepted").into_inner();
    let status = until_error(&mut waiting).await;
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("after 0 generated tokens"), "{}", status.message());
    let mut finished = None;
    while let Some(m) = long.message().await.expect("the long request is unaffected") {
        if let Some(pb::generate_response::Event::Finished(f)) = m.event {
            finished = f.usage.map(|u| u.completion_tokens);
        }
    }
    assert_eq!(finished, Some(2000));
    let status = client.clone().cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
    assert_eq!(status.counters.unwrap_or_default().deadlines_exceeded, 1);
    assert!(status.workers.iter().all(|w| w.kv_blocks == 0), "{:?}", status.workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_resource_exhausted_and_the_queued_request_still_runs() {
    let dir = fixture(&demo(), "full-queue");
    // One sequence runs at a time and one more may wait.
    let cluster = up(&dir, &["--workers", "1", "--max-batch", "1", "--queue-depth", "1"]).expect("tessera up");
    let client = connect(&cluster.url).await;
    let mut running = client.clone().generate(greedy(prompt("Once upon a time"), 200)).await.expect("first").into_inner();
    // Its first token means the group took it off the queue; it holds the only batch slot for
    // about 200 steps.
    read_chunks(&mut running, 1).await;
    let queued = tokio::spawn({
        let mut c = client.clone();
        async move { generate(&mut c, greedy(prompt("Once upon a time"), 3)).await }
    });
    // The queued request is in once ClusterStatus counts it.
    let mut c = client.clone();
    let deadline = std::time::Instant::now() + PATIENCE;
    while c.cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner().queued_requests == 0 {
        assert!(std::time::Instant::now() < deadline, "the second request never queued");
        tokio::time::sleep(POLL).await;
    }
    let refused = generate(&mut client.clone(), greedy(prompt("Once upon a time"), 3)).await.expect_err("the queue is full");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("1 requests waiting, its limit"), "{}", refused.message());
    let queued = queued.await.expect("task").expect("the queued request runs after the first");
    assert_eq!(queued.tokens().len(), 3);
    while let Some(m) = running.message().await.expect("first stream") {
        if let Some(pb::generate_response::Event::Finished(f)) = m.event {
            assert_eq!(f.reason, pb::FinishReason::Length as i32);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_beam_search_holding_its_blocks_makes_the_oldest_sequence_wait_not_fail() {
    let dir = fixture(&demo(), "preempt-beside-beams");
    // 16 blocks. The long greedy request grows to 14; the beam search holds 2 × 3 from admission.
    let cluster = up(&dir, &["--workers", "1", "--kv-capacity-tokens", "256"]).expect("tessera up");
    let client = connect(&cluster.url).await;
    let long = greedy(tokens((0..10).map(|i| 5 + i * 7).collect()), 200);
    let mut beam = greedy(tokens((0..5).map(|i| 9 + i * 3).collect()), 40);
    beam.sampling = Some(pb::SamplingParams {
        beam_search: Some(pb::BeamSearch { num_beams: 2, early_stopping: pb::EarlyStopping::Never as i32, ..Default::default() }),
        ..Default::default()
    });
    let long_alone = generate(&mut client.clone(), long.clone()).await.expect("long alone").tokens();
    let beam_alone = generate(&mut client.clone(), beam.clone()).await.expect("beam alone");

    // The beam search arrives when the long request holds 135 tokens (9 blocks): it fits
    // (9 + 6 ≤ 16), and 26 tokens later, while the beams still run (40 steps), the long one
    // needs an 11th block. Only it can give way. The window leaves 25 steps for the beam
    // request to arrive.
    let mut stream = client.clone().generate(long).await.expect("long").into_inner();
    let mut long_tokens = Vec::new();
    while long_tokens.len() < 125 {
        match stream.message().await.expect("long stream").and_then(|m| m.event) {
            Some(pb::generate_response::Event::Chunk(c)) => long_tokens.extend(c.tokens.iter().map(|t| t.id)),
            Some(_) => {}
            None => panic!("the long stream ended early"),
        }
    }
    let beam_run = generate(&mut client.clone(), beam).await.expect("beam beside the long request");
    while let Some(m) = stream.message().await.expect("the long stream survives") {
        if let Some(pb::generate_response::Event::Chunk(c)) = m.event {
            long_tokens.extend(c.tokens.iter().map(|t| t.id));
        }
    }
    assert_eq!(long_tokens, long_alone, "preempted beside a beam search and recomputed");
    assert_eq!(beam_run.tokens(), beam_alone.tokens());
    let status = client.clone().cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
    assert!(status.counters.unwrap_or_default().preemptions >= 1, "the long request had to give way");
}
