//! Clusters started with `tessera up` on the embedded in-memory registry: the one-machine
//! default a newcomer runs first.

use std::time::{Duration, Instant};

use tessera_model::fixture::demo;
use tessera_proto::v1 as pb;
use tonic::Code;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_form_two_groups_that_serve_concurrently() {
    let dir = fixture(&demo(), "two-groups");
    let cluster = up(&dir, &["--workers", "4", "--tp", "2"]).expect("tessera up");
    let mut client = connect(&cluster.url).await;
    let models = client.list_models(pb::ListModelsRequest {}).await.expect("ListModels").into_inner().models;
    assert_eq!(models[0].serving_groups, 2, "up prints its address only once every group is loaded");

    let request = || greedy(prompt("The quick brown fox"), 48);
    let (mut c1, mut c2) = (client.clone(), client.clone());
    let (a, b) = tokio::join!(generate(&mut c1, request()), generate(&mut c2, request()));
    let (a, b) = (a.expect("first request"), b.expect("second request"));
    let (wa, wb) = (a.workers(), b.workers());
    assert_eq!((wa.len(), wb.len()), (2, 2));
    assert!(wa.iter().all(|w| !wb.contains(w)), "concurrent requests must go to different groups: {wa:?} vs {wb:?}");
    assert_eq!(a.tokens(), b.tokens(), "both groups hold the same model and decode greedily");
    assert_eq!(a.tokens().len(), 48);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_is_released_on_every_rank() {
    let dir = fixture(&demo(), "cancel");
    let cluster = up(&dir, &["--workers", "2", "--tp", "2"]).expect("tessera up");
    let mut client = connect(&cluster.url).await;
    let mut stream = client.generate(greedy(prompt("Once upon a time"), 4000)).await.expect("generate").into_inner();
    read_chunks(&mut stream, 3).await;
    let during = client.cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
    assert_eq!(during.workers.len(), 2);
    for w in &during.workers {
        assert_eq!((w.state.as_str(), w.sequences), ("serving", 1), "mid-stream, every rank holds the sequence: {w:?}");
        assert!(w.kv_tokens > 0, "{w:?}");
    }
    assert_eq!(during.running_requests, 1);

    drop(stream);
    // The group loop notices the closed stream before its next step and releases the sequence
    // on every rank; poll the workers' own reports until it has.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let status = client.cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
        if status.workers.iter().all(|w| w.sequences == 0 && w.kv_tokens == 0) && status.running_requests == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "sequence still held after cancel: {status:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = generate(&mut client, greedy(prompt("Hello"), 4)).await.expect("still serving after a cancel");
    assert_eq!(after.tokens().len(), 4);
    let status = client.cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
    let counters = status.counters.expect("counters");
    assert_eq!((counters.finished["CANCELLED"], counters.finished["LENGTH"]), (1, 1), "{counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_naming_the_limit() {
    let dir = fixture(&demo(), "bad-input");
    let cluster = up(&dir, &["--workers", "1"]).expect("tessera up");
    let mut client = connect(&cluster.url).await;
    let base = || greedy(prompt("Hello"), 4);
    let with_sampling = |s: pb::SamplingParams| pb::GenerateRequest { sampling: Some(s), ..base() };
    let with_stopping = |s: pb::StoppingCriteria| pb::GenerateRequest { stopping: Some(s), ..base() };
    let beams = |num_beams: u32, num_return_sequences: u32, length_penalty: f32, temperature: f32| {
        let beam_search =
            Some(pb::BeamSearch { num_beams, num_return_sequences, length_penalty: Some(length_penalty), ..Default::default() });
        with_sampling(pb::SamplingParams { beam_search, temperature: Some(temperature), ..Default::default() })
    };
    let beams_with_stop = pb::GenerateRequest {
        stopping: Some(pb::StoppingCriteria { max_new_tokens: 4, stop: vec!["x".into()], ..Default::default() }),
        ..beams(2, 1, 1.0, 0.0)
    };

    let cases: Vec<(&str, pb::GenerateRequest, Code, &str)> = vec![
        ("unknown model", pb::GenerateRequest { model: "nope".into(), ..base() }, Code::NotFound, "\"nope\" is not served"),
        ("no input", pb::GenerateRequest { input: None, ..base() }, Code::InvalidArgument, "no input"),
        ("empty prompt", greedy(prompt(""), 4), Code::InvalidArgument, "prompt is empty"),
        ("empty token list", greedy(tokens(vec![]), 4), Code::InvalidArgument, "prompt is empty"),
        (
            "negative temperature",
            with_sampling(pb::SamplingParams { temperature: Some(-0.5), ..Default::default() }),
            Code::InvalidArgument,
            "temperature must be a finite number >= 0",
        ),
        (
            "NaN temperature",
            with_sampling(pb::SamplingParams { temperature: Some(f32::NAN), ..Default::default() }),
            Code::InvalidArgument,
            "temperature",
        ),
        (
            "infinite temperature",
            with_sampling(pb::SamplingParams { temperature: Some(f32::INFINITY), ..Default::default() }),
            Code::InvalidArgument,
            "temperature",
        ),
        (
            "top_p zero",
            with_sampling(pb::SamplingParams { top_p: Some(0.0), ..Default::default() }),
            Code::InvalidArgument,
            "top_p must be in (0, 1]",
        ),
        (
            "top_p above one",
            with_sampling(pb::SamplingParams { top_p: Some(1.5), ..Default::default() }),
            Code::InvalidArgument,
            "top_p must be in (0, 1]",
        ),
        ("top_p NaN", with_sampling(pb::SamplingParams { top_p: Some(f32::NAN), ..Default::default() }), Code::InvalidArgument, "top_p"),
        (
            "max_new_tokens above the cap",
            greedy(prompt("Hello"), 1_000_000),
            Code::InvalidArgument,
            "max_new_tokens is 1000000; the limit is 8192",
        ),
        (
            "prompt plus max_new_tokens past the context",
            greedy(tokens(vec![40; 4000]), 200),
            Code::InvalidArgument,
            "exceeds the model's context of 4096 tokens",
        ),
        (
            "token prompt longer than the context",
            greedy(tokens(vec![40; 5000]), 4),
            Code::InvalidArgument,
            "the model's context is 4096 tokens",
        ),
        (
            "text prompt longer than the context",
            greedy(prompt(&"hello ".repeat(6000)), 4),
            Code::InvalidArgument,
            "the model's context is 4096 tokens",
        ),
        ("prompt over the byte limit", greedy(prompt(&"x".repeat((1 << 20) + 1)), 4), Code::InvalidArgument, "the limit is 1048576"),
        (
            "token id outside the vocabulary",
            greedy(tokens(vec![5, 100_000]), 4),
            Code::InvalidArgument,
            "outside the vocabulary (size 320)",
        ),
        (
            "too many stop strings",
            with_stopping(pb::StoppingCriteria { max_new_tokens: 4, stop: vec!["x".into(); 17], ..Default::default() }),
            Code::InvalidArgument,
            "17 stop strings; the limit is 16",
        ),
        (
            "stop string too long",
            with_stopping(pb::StoppingCriteria { max_new_tokens: 4, stop: vec!["y".repeat(300)], ..Default::default() }),
            Code::InvalidArgument,
            "a stop string is 300 bytes; the limit is 256",
        ),
        (
            "too many stop token ids",
            with_stopping(pb::StoppingCriteria { max_new_tokens: 4, stop_token_ids: vec![5; 65], ..Default::default() }),
            Code::InvalidArgument,
            "65 stop token ids; the limit is 64",
        ),
        (
            "request id too long",
            pb::GenerateRequest { request_id: "r".repeat(200), ..base() },
            Code::InvalidArgument,
            "request_id is 200 bytes; the limit is 128",
        ),
        ("too many beams", beams(9, 1, 1.0, 0.0), Code::InvalidArgument, "beam_search.num_beams is 9; the limit is 8"),
        (
            "more hypotheses than beams",
            beams(2, 3, 1.0, 0.0),
            Code::InvalidArgument,
            "num_return_sequences is 3; it must be at most num_beams (2)",
        ),
        ("NaN length penalty", beams(2, 1, f32::NAN, 0.0), Code::InvalidArgument, "beam_search.length_penalty must be a finite number"),
        ("sampling with beams", beams(2, 1, 1.0, 0.7), Code::InvalidArgument, "temperature cannot be combined with beam_search"),
        ("stop strings with beams", beams_with_stop, Code::InvalidArgument, "stop cannot be combined with beam_search"),
        (
            "chat without messages",
            greedy(pb::generate_request::Input::Chat(pb::ChatInput { messages: vec![] }), 4),
            Code::InvalidArgument,
            "chat has no messages",
        ),
    ];
    for (what, request, code, needle) in cases {
        let status = generate(&mut client, request).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(status.message().contains(needle), "{what}: message {:?} lacks {needle:?}", status.message());
    }
    let ok = generate(&mut client, base()).await.expect("the cluster keeps serving after bad input");
    assert_eq!(ok.tokens().len(), 4);
    let status = client.cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
    assert!(status.workers.iter().all(|w| w.state == "serving" && w.sequences == 0), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chinese_streams_whole_characters_and_stops_where_asked() {
    use tessera_model::fixture::scripted::{write_scripted, Script, CHINESE_IDS, CHINESE_TEXT};
    use tessera_model::fixture::WriteOptions;
    // A model whose greedy continuation of "风" is "和日丽" then EOS, with every character split
    // over two or three byte-level tokens.
    let script = Script::chinese().expect("script");
    let dir = write_scripted(&script, &scratch("chinese"), &WriteOptions::default()).expect("write scripted model");
    let cluster = up(&dir, &["--workers", "2", "--tp", "2"]).expect("tessera up");
    let mut client = connect(&cluster.url).await;
    let request = |stop: Vec<String>| pb::GenerateRequest {
        input: Some(prompt("风")),
        stopping: Some(pb::StoppingCriteria { max_new_tokens: 64, stop, ..Default::default() }),
        ..greedy(prompt("风"), 64)
    };

    let out = generate(&mut client, request(vec![])).await.expect("generate");
    for chunk in &out.chunks {
        assert!(!chunk.text.contains('\u{FFFD}'), "chunk {chunk:?} holds half a character");
    }
    let expected: String = CHINESE_TEXT.chars().skip(1).collect();
    assert_eq!(out.text(), expected, "streamed pieces concatenate to the full decode");
    assert_eq!(out.tokens(), CHINESE_IDS[3..], "EOS ends the stream without being streamed");
    assert_eq!(out.reason(), Some(pb::FinishReason::Eos));
    assert!(out.chunks.iter().filter(|c| !c.text.is_empty()).count() >= 3, "text arrives as it completes, not at the end");
    assert_eq!(out.finished.as_ref().and_then(|f| f.usage).map(|u| u.completion_tokens), Some(CHINESE_IDS.len() as u32 - 3 + 1));

    let stopped = generate(&mut client, request(vec!["日".into()])).await.expect("generate with a stop string");
    assert_eq!(stopped.text(), "和", "text stops before the stop string");
    assert_eq!(stopped.reason(), Some(pb::FinishReason::Stop));
    assert_eq!(stopped.finished.as_ref().map(|f| f.matched_stop.as_str()), Some("日"));

    let chat = pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Chat(pb::ChatInput {
            messages: vec![pb::ChatMessage { role: "user".into(), content: "风".into() }],
        })),
        ..greedy(prompt("unused"), 4)
    };
    let rendered = generate(&mut client, chat).await.expect("chat input through the template");
    let prompt_tokens = rendered.started.as_ref().map(|s| s.prompt_tokens).unwrap_or(0);
    assert!(prompt_tokens > 3, "the chat template wraps the message in role markers ({prompt_tokens} tokens)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_wait_for_kv_room_instead_of_failing_the_group() {
    let dir = fixture(&demo(), "kv-budget");
    // 20 KV blocks: room for one sequence of 16 + 200 tokens (14 blocks) to finish, not two. The
    // second waits, or runs and is preempted, and never fails the group.
    let cluster = up(&dir, &["--workers", "1", "--kv-capacity-tokens", "320"]).expect("tessera up");
    let mut client = connect(&cluster.url).await;
    let prompt_ids: Vec<u32> = (0..16).map(|i| 40 + i).collect();

    let too_big = generate(&mut client, greedy(tokens(prompt_ids.clone()), 400)).await.expect_err("cannot ever fit");
    assert_eq!(too_big.code(), Code::InvalidArgument, "{too_big:?}");
    assert!(too_big.message().contains("the most this cluster can hold for one request now is 320"), "{}", too_big.message());

    let (mut c1, mut c2) = (client.clone(), client.clone());
    let (a, b) = tokio::join!(
        generate(&mut c1, greedy(tokens(prompt_ids.clone()), 200)),
        generate(&mut c2, greedy(tokens(prompt_ids.clone()), 200))
    );
    let (a, b) = (a.expect("first fits"), b.expect("second waits for room, then runs"));
    assert_eq!((a.tokens().len(), b.tokens().len()), (200, 200));
    assert_eq!(a.tokens(), b.tokens());
    assert_eq!((a.reason(), b.reason()), (Some(pb::FinishReason::Length), Some(pb::FinishReason::Length)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_prompt_prefix_is_reused_alike_by_both_ranks_and_changes_no_token() {
    let dir = fixture(&demo(), "prefix-cache");
    let cluster = up(&dir, &["--workers", "2", "--tp", "2", "--step-tokens", "64"]).expect("tessera up");
    let mut client = connect(&cluster.url).await;
    let system: Vec<u32> = (0..200).map(|i| 8 + (i * 7919 % 300)).collect();
    let request = |user: u32, no_prefix_cache: bool| pb::GenerateRequest {
        no_prefix_cache,
        ..greedy(tokens([&system[..], &[user, user + 1, user + 2]].concat()), 16)
    };
    let hits = |s: &pb::ClusterStatusResponse| s.workers.iter().map(|w| (w.prefix_hits, w.prefix_hit_tokens)).collect::<Vec<_>>();
    generate(&mut client, request(40, false)).await.expect("first request");
    assert_eq!(hits(&cluster_status(&client).await), vec![(0, 0); 2], "nothing to reuse yet");
    let cached = generate(&mut client, request(50, false)).await.expect("request reusing the prefix");
    let after = hits(&cluster_status(&client).await);
    assert_eq!(after[0], after[1], "both ranks reuse the same blocks");
    // The first 64-token chunk keeps its last token to compute: at least its first 3 blocks.
    assert!(after[0].0 >= 1 && after[0].1 >= 48, "{after:?}");
    let computed = generate(&mut client, request(50, true)).await.expect("request opting out");
    assert_eq!(hits(&cluster_status(&client).await), after, "the opted-out request looked nothing up");
    assert_eq!(cached.tokens(), computed.tokens());
    assert_eq!(cached.tokens().len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prefill_does_not_hold_back_a_short_request() {
    let dir = fixture(&demo(), "chunked-prefill");
    // 64 tokens per step: the 3,000-token prompt needs ~47 steps of prefill.
    let cluster = up(&dir, &["--workers", "1", "--step-tokens", "64"]).expect("tessera up");
    let mut client = connect(&cluster.url).await;
    let long_prompt: Vec<u32> = (0..3000).map(|i| 8 + (i * 7919 % 300)).collect();
    let mut long = client.generate(greedy(tokens(long_prompt), 4)).await.expect("long request").into_inner();
    let started = long.message().await.expect("stream").and_then(|m| m.event);
    assert!(matches!(started, Some(pb::generate_response::Event::Started(_))), "{started:?}");
    let long_first_token = tokio::spawn(async move {
        loop {
            match long.message().await.expect("long stream").and_then(|m| m.event) {
                Some(pb::generate_response::Event::Chunk(_)) => return Instant::now(),
                Some(_) => continue,
                None => panic!("long stream ended without a token"),
            }
        }
    });
    let short = generate(&mut client, greedy(tokens(vec![40, 41, 42, 43, 44, 45, 46, 47]), 4)).await.expect("short request");
    let short_done = Instant::now();
    assert_eq!(short.tokens().len(), 4);
    let long_first = tokio::time::timeout(PATIENCE, long_first_token).await.expect("long request finishes").expect("task");
    // The bound: the short request is prefilled and decodes all its tokens while the long
    // prompt is still being prefilled, instead of waiting behind it.
    assert!(short_done < long_first, "the short request finished {:?} after the long one's first token", short_done - long_first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_can_allow_sequences_past_the_model_context() {
    // llama-gqa has 256 positions: small enough to go past quickly.
    let spec = tessera_model::fixture::test_fixtures().into_iter().find(|s| s.name == "llama-gqa").expect("fixture");
    let dir = fixture(&spec, "extrapolate");
    let long: Vec<u32> = (0..300).map(|i| 8 + (i * 7919 % 300)).collect();
    let strict = up(&dir, &["--workers", "1"]).expect("tessera up");
    let refused = generate(&mut connect(&strict.url).await, greedy(tokens(long.clone()), 8)).await.expect_err("past 256");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("the model's context is 256 tokens"), "{}", refused.message());
    drop(strict);

    let lenient = up(&dir, &["--workers", "1", "--max-context", "400"]).expect("tessera up");
    let out = generate(&mut connect(&lenient.url).await, greedy(tokens(long), 8)).await.expect("served past 256 positions");
    assert_eq!(out.tokens().len(), 8);
    assert_eq!(out.reason(), Some(pb::FinishReason::Length));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_the_whole_local_cluster() {
    let dir = fixture(&demo(), "ctrl-c");
    let mut cluster = up(&dir, &["--workers", "2", "--tp", "2"]).expect("tessera up");
    let mut client = connect(&cluster.url).await;
    let status = client.cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
    let workers: Vec<String> = status.workers.iter().map(|w| w.address.clone()).collect();
    assert_eq!(workers.len(), 2);

    let pid = cluster._process.0.id().to_string();
    let sent = std::process::Command::new("kill").args(["-INT", &pid]).status().expect("run kill");
    assert!(sent.success());
    let exit = tokio::task::spawn_blocking(move || {
        let status = cluster._process.0.wait();
        (status, cluster)
    });
    let (status, _cluster) = tokio::time::timeout(PATIENCE, exit).await.expect("up exits after Ctrl-C").expect("join");
    assert!(status.expect("exit status").success(), "tessera up must exit cleanly on Ctrl-C");
    // The workers are stopped too: nothing listens on their addresses any more.
    for address in workers {
        let refused = std::net::TcpStream::connect(&address);
        assert!(refused.is_err(), "worker at {address} still accepts connections");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_guard_stops_a_looping_generation_and_says_so() {
    use tessera_model::fixture::scripted::{write_scripted, Script};
    use tessera_model::fixture::WriteOptions;
    // Greedy decoding of this model cycles through ten tokens forever.
    let cycle: Vec<u32> = (0..10).map(|i| 40 + 7 * i).collect();
    let script = Script::cycle("scripted-cycle", &cycle).expect("script");
    let dir = write_scripted(&script, &scratch("loop-guard"), &WriteOptions::default()).expect("write scripted model");
    let cluster = up(&dir, &["--workers", "1"]).expect("tessera up");
    let mut client = connect(&cluster.url).await;
    let guard =
        pb::LoopGuard { max_period: 16, min_repeats: 3, sentences: false, action: pb::LoopAction::Stop as i32, ..Default::default() };
    let guarded = |prompt_ids: Vec<u32>| pb::GenerateRequest {
        sampling: Some(pb::SamplingParams { loop_guard: Some(guard), ..Default::default() }),
        ..greedy(tokens(prompt_ids), 200)
    };

    let looping = generate(&mut client, guarded(vec![cycle[0]])).await.expect("generate");
    assert_eq!(looping.reason(), Some(pb::FinishReason::Repetition));
    let finished = looping.finished.as_ref().expect("finished");
    let report = finished.r#loop.as_ref().expect("the guard says what it saw");
    assert_eq!((report.period, report.repeats), (10, 3));
    assert_eq!(report.action, pb::LoopAction::Stop as i32);
    assert_eq!(finished.usage.map(|u| u.completion_tokens), Some(30), "stopped as soon as the third repeat closed");
    assert_eq!(looping.tokens()[..10], looping.tokens()[10..20]);

    // The remedy: sample hotter for a while. This model's loop is far too strong to leave
    // (its scripted logit wins by ~76), so the loop forms again after each remedy and, after
    // the third, the generation stops: 4 loops of 30 tokens.
    let remedy = pb::LoopGuard { action: pb::LoopAction::RaiseTemperature as i32, remedy_temperature: 1.5, remedy_tokens: 8, ..guard };
    let request = pb::GenerateRequest {
        sampling: Some(pb::SamplingParams { loop_guard: Some(remedy), seed: Some(3), ..Default::default() }),
        ..greedy(tokens(vec![cycle[0]]), 200)
    };
    let remedied = generate(&mut client, request).await.expect("generate");
    assert_eq!(remedied.reason(), Some(pb::FinishReason::Repetition));
    let finished = remedied.finished.as_ref().expect("finished");
    let report = finished.r#loop.as_ref().expect("report");
    assert_eq!((report.remedies, report.action), (3, pb::LoopAction::Stop as i32), "{report:?}");
    assert_eq!(finished.usage.map(|u| u.completion_tokens), Some(120));

    // Without the guard the same request runs to its budget.
    let unguarded = generate(&mut client, greedy(tokens(vec![cycle[0]]), 60)).await.expect("generate");
    assert_eq!(unguarded.reason(), Some(pb::FinishReason::Length));
    assert_eq!(unguarded.tokens().len(), 60);

    // The coordinator's counters saw all three.
    let status = client.cluster_status(pb::ClusterStatusRequest {}).await.expect("status").into_inner();
    let counters = status.counters.expect("counters");
    assert_eq!((counters.finished["REPETITION"], counters.finished["LENGTH"]), (2, 1), "{counters:?}");
    assert_eq!((counters.loop_guard_stops, counters.loop_guard_remedies), (2, 3), "{counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_fails_its_stream_after_the_step_timeout_and_then_rejoins() {
    let dir = fixture(&demo(), "hung");
    let cluster = up(&dir, &["--workers", "1", "--step-timeout-secs", "1"]).expect("tessera up");
    let mut client = connect(&cluster.url).await;
    // Under `tessera up` the worker's registration is renewed by `up`, so a hung worker never
    // loses its lease: only the step timeout can free its clients.
    let up_pid = cluster._process.0.id().to_string();
    let children = std::process::Command::new("pgrep").args(["-P", &up_pid]).output().expect("pgrep");
    let worker_pid = String::from_utf8_lossy(&children.stdout).trim().to_string();
    assert!(!worker_pid.is_empty() && !worker_pid.contains('\n'), "one worker child, got {worker_pid:?}");

    let mut stream = client.generate(greedy(prompt("Once upon a time"), 4000)).await.expect("generate").into_inner();
    read_chunks(&mut stream, 3).await;
    let signal = |sig: &str| {
        let status = std::process::Command::new("kill").args([sig, &worker_pid]).status().expect("kill");
        assert!(status.success(), "kill {sig}");
    };
    signal("-STOP");
    let status = until_error(&mut stream).await;
    signal("-CONT");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("did not finish within 1s"), "{}", status.message());

    // Resumed, the worker answers the reset and forms a new group on its own, so there is no
    // event to wait for: retry (bounded) until the group is back.
    let deadline = Instant::now() + PATIENCE;
    let again = loop {
        match generate(&mut client, greedy(prompt("Hello"), 4)).await {
            Ok(out) => break out,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(s) => panic!("not served again: {s:?}"),
        }
    };
    assert_eq!(again.tokens().len(), 4);
}
