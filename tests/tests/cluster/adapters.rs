//! LoRA adapters through a real cluster (`tessera up`, TP=2 on two worker processes): PEFT's
//! greedy tokens for each adapter over gRPC and HTTP, requests for three adapters and the base
//! batched together, workers that hold fewer adapters than are in use, and adapters loaded and
//! unloaded while streams run, none of which changes a running stream.
//!
//! The adapters and goldens are `tests/golden/lora/` (`scripts/golden/make_lora_golden.py`,
//! PEFT on the `llama-gqa` fixture).

use std::path::PathBuf;

use futures::future::join_all;
use serde_json::json;
use tessera_proto::v1 as pb;

use crate::http_client::*;
use crate::support::*;

fn golden_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden").join(name)
}

fn adapter_dir(name: &str) -> String {
    golden_file(&format!("lora/{name}")).display().to_string()
}

/// The golden's prompt and greedy tokens: an adapter's (`lora/NAME`) or the base fixture's.
fn golden(name: &str) -> (Vec<u32>, Vec<u32>) {
    let bytes = std::fs::read(golden_file(&format!("{name}.safetensors"))).expect("golden");
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu).expect("golden tensors");
    let ids = |k: &str| -> Vec<u32> { tensors[k].to_vec1::<i64>().expect("ids").into_iter().map(|v| v as u32).collect() };
    (ids("prompt_ids"), ids("greedy_ids"))
}

fn llama_gqa(name: &str) -> PathBuf {
    fixture(&tessera_model::fixture::by_name("llama-gqa").expect("fixture"), name)
}

fn with_adapter(mut request: pb::GenerateRequest, adapter: &str) -> pb::GenerateRequest {
    request.adapter = adapter.to_string();
    request
}

/// (adapter served as, golden) for the three adapters of `llama-gqa`, and the base.
const SERVED: [(&str, &str); 4] = [("attn", "lora/r8-attn"), ("all", "lora/r16-all-rslora"), ("mlp", "lora/r8-mlp"), ("", "llama-gqa")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_match_peft_over_grpc_and_http_and_share_one_batch() {
    let dir = llama_gqa("adapters-peft");
    let lora: Vec<String> = SERVED[..3].iter().map(|(name, golden)| format!("{name}={}", adapter_dir(&golden["lora/".len()..]))).collect();
    let mut args = vec!["--workers", "2", "--tp", "2", "--max-adapters", "2"];
    for l in &lora {
        args.extend(["--lora", l]);
    }
    let cluster = up_with_http(&dir, &args).expect("tessera up --lora");
    let mut client = connect(&cluster.grpc).await;

    let models = client.list_models(pb::ListModelsRequest {}).await.expect("list").into_inner().models;
    let base = models[0].name.clone();
    let listed: Vec<(String, u32, bool)> = models[0].adapters.iter().map(|a| (a.name.clone(), a.rank, a.use_rslora)).collect();
    assert_eq!(listed, [("all".into(), 16, true), ("attn".into(), 8, false), ("mlp".into(), 8, false)]);
    assert!(models[0].adapters.iter().all(|a| a.base == base));

    // Eight requests at once over three adapters and the base: one batch on the one group,
    // whose workers hold only two adapters (the third is read again as asked for).
    let order = [0, 1, 3, 2, 1, 0, 3, 2];
    let runs = order.map(|i| {
        let (name, golden_name) = SERVED[i];
        let (prompt, greedy) = golden(golden_name);
        let request = with_adapter(crate::support::greedy(tokens(prompt), greedy.len() as u32), name);
        let mut client = client.clone();
        async move { (name, greedy, generate(&mut client, request).await) }
    });
    for (name, greedy, result) in join_all(runs).await {
        let got = result.unwrap_or_else(|e| panic!("adapter {name:?}: {e}"));
        assert_eq!(got.tokens(), greedy, "adapter {name:?}: tokens differ from PEFT's");
    }

    // OpenAI clients name an adapter as "base:adapter", or by its name alone (vLLM's way).
    let (prompt, greedy) = golden("lora/r16-all-rslora");
    for model in [format!("{base}:all"), "all".to_string()] {
        let body = json!({"model": model, "prompt": prompt, "max_tokens": greedy.len(), "temperature": 0,
                          "ignore_eos": true, "return_token_ids": true});
        let (status, answer) = post(&format!("{}/completions", cluster.http), &body).await;
        assert_eq!(status, 200, "{model}: {answer}");
        let ids: Vec<u32> =
            answer["choices"][0]["token_ids"].as_array().expect("token_ids").iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(ids, greedy, "{model}: tokens differ from PEFT's");
    }
    let (_, listed) = get(&format!("{}/models", cluster.http)).await;
    let ids: Vec<&str> = listed["data"].as_array().expect("data").iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [base.clone(), format!("{base}:all"), format!("{base}:attn"), format!("{base}:mlp")]);
    assert_eq!(listed["data"][1]["parent"], json!(base));

    // Unknown adapters, and run-time loading, which this coordinator does not allow.
    let (prompt, _) = golden("llama-gqa");
    let unknown =
        client.generate(with_adapter(crate::support::greedy(tokens(prompt.clone()), 4), "nope")).await.expect_err("unknown adapter");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    assert!(unknown.message().contains("\"all\", \"attn\", \"mlp\""), "{}", unknown.message());
    let (status, answer) = post(&format!("{}/completions", cluster.http), &json!({"model": format!("{base}:nope"), "prompt": "a"})).await;
    assert_eq!(status, 404, "{answer}");
    let load = pb::LoadAdapterRequest { model: String::new(), name: "more".into(), dir: adapter_dir("r8-mlp") };
    let refused = client.load_adapter(load).await.expect_err("loading is off");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("--allow-adapter-loading"), "{}", refused.message());
}

/// Streams long enough to still run while adapters come and go.
const LONG: u32 = 1500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loading_and_unloading_adapters_leaves_running_streams_alone() {
    let dir = llama_gqa("adapters-live");
    let attn = format!("attn={}", adapter_dir("r8-attn"));
    let args = ["--workers", "2", "--tp", "2", "--max-context", "2048", "--allow-adapter-loading", "--lora", &attn];
    let cluster = up_with_http(&dir, &args).expect("tessera up --allow-adapter-loading");
    let mut client = connect(&cluster.grpc).await;
    let (prompt, _) = golden("llama-gqa");
    let long = |adapter: &str| with_adapter(crate::support::greedy(tokens(prompt.clone()), LONG), adapter);

    // Each stream alone first: what it must give whatever happens beside it.
    let reference_attn = generate(&mut client, long("attn")).await.expect("attn alone").tokens();
    let reference_base = generate(&mut client, long("")).await.expect("base alone").tokens();
    assert_ne!(reference_attn, reference_base, "the adapter changes the stream");

    let mut streams = Vec::new();
    for adapter in ["attn", "", "attn", ""] {
        let mut stream = client.generate(long(adapter)).await.expect("stream").into_inner();
        read_chunks(&mut stream, 2).await;
        streams.push((adapter, stream));
    }

    // While they run: load a new adapter, refuse one that does not fit the model, and unload
    // the one two of the streams use.
    let load = |name: &str, from: &str| pb::LoadAdapterRequest { model: String::new(), name: name.into(), dir: adapter_dir(from) };
    let loaded = client.load_adapter(load("mlp2", "r8-mlp")).await.expect("load mlp2").into_inner();
    assert_eq!(loaded.adapter.map(|a| (a.name, a.rank)), Some(("mlp2".into(), 8)));
    let misfit = client.load_adapter(load("qwen", "r16-all")).await.expect_err("an adapter for another model");
    assert_eq!(misfit.code(), tonic::Code::InvalidArgument, "{misfit:?}");
    assert!(misfit.message().contains("expected [32, 16]"), "{}", misfit.message());
    let taken = client.load_adapter(load("attn", "r8-mlp")).await.expect_err("a name in use");
    assert_eq!(taken.code(), tonic::Code::AlreadyExists, "{taken:?}");
    client.unload_adapter(pb::UnloadAdapterRequest { model: String::new(), name: "attn".into() }).await.expect("unload attn");
    let running = cluster_status(&client).await.running_requests;
    assert_eq!(running, 4, "the streams were still running when the adapters changed");

    for (adapter, mut stream) in streams {
        let mut got = Vec::new();
        while let Some(message) = tokio::time::timeout(PATIENCE, stream.message()).await.expect("in time").expect("stream ok") {
            if let Some(pb::generate_response::Event::Chunk(c)) = message.event {
                got.extend(c.tokens.iter().map(|t| t.id));
            }
        }
        let reference = if adapter.is_empty() { &reference_base } else { &reference_attn };
        // The two chunks read before the changes are not in `got`.
        assert!(
            !got.is_empty() && got.len() < reference.len() && reference.ends_with(&got),
            "stream with {adapter:?} changed after the adapters did"
        );
    }

    let models = client.list_models(pb::ListModelsRequest {}).await.expect("list").into_inner().models;
    let names: Vec<&str> = models[0].adapters.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["mlp2"], "attn unloaded, the misfit never listed");
    let gone = client.generate(with_adapter(crate::support::greedy(tokens(prompt.clone()), 4), "attn")).await.expect_err("unloaded");
    assert_eq!(gone.code(), tonic::Code::NotFound, "{gone:?}");
    let (mlp_prompt, mlp_greedy) = golden("lora/r8-mlp");
    let mlp = generate(&mut client, with_adapter(crate::support::greedy(tokens(mlp_prompt), mlp_greedy.len() as u32), "mlp2")).await;
    assert_eq!(mlp.expect("mlp2").tokens(), mlp_greedy, "an adapter loaded at run time gives PEFT's tokens");
}
