//! Quantized projections (`LoadConfig::quantization`) and GGUF checkpoints.
//!
//! - q8_0 and q4_k stay close to f32 (drift printed, tolerance asserted), and q8_0 picks f32's
//!   next tokens except at near-ties;
//! - a q8_0 model split over two ranks computes what one rank computes;
//! - a GGUF written the way llama.cpp's converter writes it (names, interleaved q/k rows)
//!   loads to the same logits as the safetensors it came from, f32 and q8_0, at TP 1 and 2;
//! - a shard whose rows do not fill whole blocks is refused with a typed error.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;
use common::{fixture_dir, max_abs_diff, run_tp_loaded, spec, Trace};
use serde_json::json;
use tessera_model::fixture::gguf::{write_gguf, GgufOptions};
use tessera_model::fixture::{max_rel_diff, prompt_ids, test_fixtures, write_fixture, FixtureSpec, WriteOptions};
use tessera_model::{LoadConfig, Model, ModelError, Quantization};

const STEPS: usize = 16;

fn quantized(q: Quantization) -> LoadConfig {
    LoadConfig { quantization: Some(q), ..LoadConfig::default() }
}

fn trace(dir: &Path, load: &LoadConfig, tp: usize, prompt: &[u32]) -> Vec<Trace> {
    run_tp_loaded(dir, load, tp, prompt, STEPS)
}

/// A Llama fixture whose every projection input (hidden 256, intermediate 512, 4 heads of 64)
/// fills q4_k's 256-weight blocks, which the 64-wide test fixtures cannot.
fn wide_spec() -> FixtureSpec {
    let mut s = spec("llama-gqa");
    s.name = "llama-wide";
    s.seed = 31;
    s.config["hidden_size"] = json!(256);
    s.config["intermediate_size"] = json!(512);
    s
}

fn scratch() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("quantized-{}", std::process::id())))
}

fn wide_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| write_fixture(&wide_spec(), scratch(), &WriteOptions::default()).expect("write wide fixture"))
}

/// Drift of `q` from `f` over prefill and decode logits: (max abs, max relative).
fn drift(q: &Trace, f: &Trace) -> (f32, f32) {
    let abs = max_abs_diff(&q.prefill, &f.prefill).max(max_abs_diff(&q.decode, &f.decode));
    let rel = max_rel_diff(&q.prefill, &f.prefill).max(max_rel_diff(&q.decode, &f.decode));
    (abs, rel)
}

/// How a quantized model compares with f32 when both read the same tokens: the f32 prompt
/// followed by f32's own 16 greedy tokens (teacher forcing, so one early flip does not turn
/// every later row into a comparison of different inputs).
struct Forced {
    /// Max abs and max relative logit drift over all positions.
    abs: f32,
    rel: f32,
    /// Of the 17 next-token choices after the prompt, how many agree.
    same: usize,
    /// Largest f32 margin by which a choice that differs lost to f32's choice: a flip at a
    /// near-tie has a margin below the drift.
    worst_flip_margin: f32,
}

fn forced(dir: &Path, load: &LoadConfig, prompt: &[u32]) -> Forced {
    let f32_run = trace(dir, &LoadConfig::default(), 1, prompt).remove(0);
    let mut tokens = prompt.to_vec();
    tokens.extend_from_slice(&f32_run.greedy);
    let f = run_tp_loaded(dir, &LoadConfig::default(), 1, &tokens, 0).remove(0);
    let q = run_tp_loaded(dir, load, 1, &tokens, 0).remove(0);
    let argmax = tessera_model::sampler::argmax;
    let (mut same, mut worst_flip_margin) = (0, 0f32);
    for i in prompt.len() - 1..tokens.len() {
        let (fa, qa) = (argmax(&f.prefill[i]) as usize, argmax(&q.prefill[i]) as usize);
        if fa == qa {
            same += 1;
        } else {
            worst_flip_margin = worst_flip_margin.max(f.prefill[i][fa] - f.prefill[i][qa]);
        }
    }
    Forced { abs: max_abs_diff(&q.prefill, &f.prefill), rel: max_rel_diff(&q.prefill, &f.prefill), same, worst_flip_margin }
}

/// q8_0 keeps 8 bits per weight with one scale per 32: on every fixture the logits stay within
/// 5% of the largest f32 logit of their row (measured: 1.3–3.6% where prefill quantizes the
/// activations to 8 bits per block as decode does, on CPUs with AVX-512 VNNI (`gemm/q8.rs`);
/// 1.0–1.8% with f32 activations in prefill; random fixture weights give flat rows).
/// Next-token choices agree with f32 at all but at most one of the 17 positions per fixture
/// (measured: 135 of 136; llama-rope-llama3 flips its 17th), and a choice may differ only at a
/// near-tie: f32's winner beats q8_0's pick by less than the logit drift.
#[test]
fn q8_0_stays_close_to_f32_and_decodes_the_same_tokens() {
    for s in test_fixtures() {
        let prompt = prompt_ids(&s);
        let r = forced(&fixture_dir(s.name), &quantized(Quantization::Q8_0), &prompt);
        println!(
            "{}: q8_0 vs f32 logits: max abs {:.5}, max rel {:.5}; next-token choices {}/{} (worst flip margin {:.5})",
            s.name,
            r.abs,
            r.rel,
            r.same,
            STEPS + 1,
            r.worst_flip_margin
        );
        assert!(r.rel <= 0.05, "{}: q8_0 drifts {} from f32", s.name, r.rel);
        assert!(r.same >= STEPS, "{}: only {} of {} q8_0 next-token choices equal f32's", s.name, r.same, STEPS + 1);
        assert!(r.worst_flip_margin <= r.abs, "{}: a flip by {} is no near-tie", s.name, r.worst_flip_margin);
    }
}

/// q4_k (4.5 bits per weight) drifts more. On the wide fixture (the only one whose inputs fill
/// 256-weight blocks) its logits stay within 30% of the row's largest f32 logit (measured:
/// 21%), and at least 11 of the 17 next-token choices equal f32's (measured: 12): the
/// fixture's random weights give flat logits with close runners-up, which 4-bit noise swaps.
/// q8_0 on the same model drifts less and agrees on every choice.
#[test]
fn q4_k_stays_close_to_f32() {
    let s = wide_spec();
    let prompt = prompt_ids(&s);
    let q4 = forced(wide_dir(), &quantized(Quantization::Q4K), &prompt);
    println!("{}: q4_k vs f32 logits: max abs {:.5}, max rel {:.5}; next-token choices {}/{}", s.name, q4.abs, q4.rel, q4.same, STEPS + 1);
    let q8 = forced(wide_dir(), &quantized(Quantization::Q8_0), &prompt);
    println!("{}: q8_0 vs f32 logits: max abs {:.5}, max rel {:.5}; next-token choices {}/{}", s.name, q8.abs, q8.rel, q8.same, STEPS + 1);
    assert!(q4.rel <= 0.30, "q4_k drifts {} from f32", q4.rel);
    assert!(q4.same >= 11, "only {} of {} q4_k next-token choices equal f32's", q4.same, STEPS + 1);
    assert!(q4.worst_flip_margin <= q4.abs, "a q4_k flip by {} is no near-tie", q4.worst_flip_margin);
    assert!(q8.rel < q4.rel, "q8_0 ({}) should drift less than q4_k ({})", q8.rel, q4.rel);
    assert_eq!(q8.same, STEPS + 1, "q8_0 next-token choices differ from f32's");
}

/// Each rank quantizes its own shard; since the shards' `in` lengths are whole blocks, the
/// blocks are the ones a single rank makes, and two ranks agree with one up to summation order.
#[test]
fn q8_0_tp2_matches_q8_0_tp1() {
    for name in ["llama-gqa", "qwen2-tied", "llama-rope-yarn"] {
        let s = spec(name);
        let prompt = prompt_ids(&s);
        let load = quantized(Quantization::Q8_0);
        let one = trace(&fixture_dir(name), &load, 1, &prompt).remove(0);
        for (rank, t) in trace(&fixture_dir(name), &load, 2, &prompt).iter().enumerate() {
            let (abs, rel) = drift(t, &one);
            println!("{name}: q8_0 tp=2 rank {rank} vs tp=1: max abs {abs:.2e}, max rel {rel:.2e}");
            assert!(rel <= 1e-4, "{name} rank {rank}: tp=2 drifts {rel} from tp=1");
            assert_eq!(t.greedy, one.greedy, "{name} rank {rank}: greedy differs");
        }
    }
}

/// A GGUF of f32 tensors is the same model as the safetensors: same logits at TP 1 and 2 on
/// every fixture shape (GQA, biases, head_dim ≠ hidden/heads, tied qwen2, sliding window).
#[test]
fn f32_gguf_equals_safetensors() {
    for s in test_fixtures() {
        let prompt = prompt_ids(&s);
        let gguf = scratch().join(format!("{}-f32-gguf", s.name));
        write_gguf(&fixture_dir(s.name), &gguf, &GgufOptions::default()).expect("write gguf");
        for tp in [1, 2] {
            let st = trace(&fixture_dir(s.name), &LoadConfig::default(), tp, &prompt);
            let gg = trace(&gguf, &LoadConfig::default(), tp, &prompt);
            for (a, b) in gg.iter().zip(&st) {
                let (abs, _) = drift(a, b);
                assert!(abs <= 1e-5, "{} tp={tp}: f32 GGUF logits differ by {abs}", s.name);
                assert_eq!(a.greedy, b.greedy, "{} tp={tp}", s.name);
            }
        }
    }
}

/// A q8_0 GGUF holds the blocks quantize-on-load makes (rows are quantized independently, so
/// interleaving q/k rows moves whole blocks): the logits equal `--dtype q8_0` on the
/// safetensors, at TP 1 and at TP 2 (where o/down are split inside each stored row).
#[test]
fn q8_0_gguf_equals_quantizing_on_load() {
    for name in ["llama-gqa", "qwen2-tied", "mistral-swa", "llama-headdim-bias"] {
        let s = spec(name);
        let prompt = prompt_ids(&s);
        let gguf = scratch().join(format!("{name}-q8_0-gguf"));
        write_gguf(&fixture_dir(name), &gguf, &q8_0_gguf()).expect("write gguf");
        // The GGUF keeps the embedding f32, so a tied lm_head is quantized on load as well.
        let load = quantized(Quantization::Q8_0);
        let tps: &[usize] = if name == "llama-headdim-bias" { &[1] } else { &[1, 2] };
        for &tp in tps {
            let st = trace(&fixture_dir(name), &load, tp, &prompt);
            let gg = trace(&gguf, &load, tp, &prompt);
            for (a, b) in gg.iter().zip(&st) {
                let (abs, _) = drift(a, b);
                assert!(abs <= 1e-5, "{name} tp={tp}: q8_0 GGUF logits differ from q8_0 on load by {abs}");
                assert_eq!(a.greedy, b.greedy, "{name} tp={tp}");
            }
        }
        // Without asking for quantization the stored q8_0 projections are still used as stored.
        if !s.config["tie_word_embeddings"].as_bool().unwrap_or(false) {
            let plain = trace(&gguf, &LoadConfig::default(), 1, &prompt).remove(0);
            let st = trace(&fixture_dir(name), &load, 1, &prompt).remove(0);
            assert!(drift(&plain, &st).0 <= 1e-5, "{name}: stored q8_0 not used as stored");
        }
    }
}

fn q8_0_gguf() -> GgufOptions {
    GgufOptions { quantization: Some(GgmlDType::Q8_0), quantize_embedding: false }
}

/// llama.cpp's own q8_0 files quantize `token_embd` too: the embedding is then read dequantized
/// and a tied `lm_head` uses the stored blocks as they are (the blocks quantize-on-load makes
/// from the f32 embedding). Against quantizing the safetensors on load, only the embedding's
/// rounding differs: prompt logits within 5% of the row's largest, at least 90% of the prompt
/// positions choose the same next token (measured: 40/40 and 38/40), and a choice may differ
/// only at a near-tie, by less than the logit drift.
#[test]
fn a_gguf_with_a_quantized_embedding_loads_like_llama_cpp_files() {
    for name in ["qwen2-tied", "llama-gqa"] {
        let s = spec(name);
        let prompt = prompt_ids(&s);
        let gguf = scratch().join(format!("{name}-q8_0-embd-gguf"));
        let opts = GgufOptions { quantization: Some(GgmlDType::Q8_0), quantize_embedding: true };
        write_gguf(&fixture_dir(name), &gguf, &opts).expect("write gguf");
        let on_load = trace(&fixture_dir(name), &quantized(Quantization::Q8_0), 1, &prompt).remove(0);
        let stored = trace(&gguf, &LoadConfig::default(), 1, &prompt).remove(0);
        let rel = max_rel_diff(&stored.prefill, &on_load.prefill);
        println!("{name}: q8_0 embedding vs f32 embedding, prompt logits max rel {rel:.5}");
        assert!(rel <= 0.05, "{name}: {rel}");
        let abs = max_abs_diff(&stored.prefill, &on_load.prefill);
        let argmax = tessera_model::sampler::argmax;
        let mut same = 0;
        for (a, b) in stored.prefill.iter().zip(&on_load.prefill) {
            let (ia, ib) = (argmax(a) as usize, argmax(b) as usize);
            if ia == ib {
                same += 1;
            } else {
                assert!(b[ib] - b[ia] <= abs, "{name}: a flip by {} is no near-tie (drift {abs})", b[ib] - b[ia]);
            }
        }
        println!("{name}: {same}/{} prompt positions choose the same token", prompt.len());
        assert!(same * 10 >= prompt.len() * 9, "{name}: only {same} of {} prompt positions agree", prompt.len());
    }
}

fn load_error(dir: &Path, q: Quantization, tp_rank: usize, tp_size: usize) -> ModelError {
    let load = LoadConfig { quantization: Some(q), tp_rank, tp_size, ..LoadConfig::default() };
    match Model::load(dir, &load) {
        Ok(_) => panic!("{} loaded as {q} at tp={tp_size}", dir.display()),
        Err(e) => e,
    }
}

/// A projection whose shard `in` length is not a whole number of blocks is refused, naming the
/// tensor and the sizes, whether it is quantized on load or stored quantized in a GGUF.
#[test]
fn a_shard_that_splits_a_block_is_refused() {
    // head_dim 24 × 4 heads: o_proj has 96 inputs, 48 per rank at tp=2 (q8_0 blocks are 32).
    let dir = fixture_dir("llama-headdim-bias");
    match load_error(&dir, Quantization::Q8_0, 1, 2) {
        ModelError::QuantBlock { name, len, block, format } => {
            assert_eq!((name.as_str(), len, block), ("model.layers.0.self_attn.o_proj.weight", 48, 32));
            assert_eq!(format, "q8_0");
        }
        other => panic!("expected QuantBlock, got {other}"),
    }
    // hidden 64 cannot hold one 256-weight q4_k block (lm_head is the first projection read).
    match load_error(&fixture_dir("llama-gqa"), Quantization::Q4K, 0, 1) {
        ModelError::QuantBlock { name, len, block, .. } => {
            assert_eq!((name.as_str(), len, block), ("lm_head.weight", 64, 256));
        }
        other => panic!("expected QuantBlock, got {other}"),
    }
    // Stored q8_0 rows split inside a block by the column shard of o_proj.
    let gguf = scratch().join("headdim-bias-q8_0-refused");
    write_gguf(&dir, &gguf, &q8_0_gguf()).expect("write gguf");
    let err = load_error(&gguf, Quantization::Q8_0, 0, 2);
    assert!(
        matches!(&err, ModelError::QuantBlock { name, len: 48, block: 32, .. } if name == "model.layers.0.self_attn.o_proj.weight"),
        "got {err}"
    );
    println!("refused: {err}");
}

/// A GGUF whose q/k rows were interleaved for other head counts than config.json's would load
/// scrambled attention; it is refused instead.
#[test]
fn a_gguf_for_other_head_counts_is_refused() {
    let gguf = scratch().join("llama-gqa-heads-gguf");
    write_gguf(&fixture_dir("llama-gqa"), &gguf, &GgufOptions::default()).expect("write gguf");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(gguf.join("config.json")).expect("config")).expect("json");
    config["num_key_value_heads"] = json!(4);
    std::fs::write(gguf.join("config.json"), config.to_string()).expect("write config");
    match Model::load(&gguf, &LoadConfig::default()) {
        Err(ModelError::InvalidConfig(msg)) => assert!(msg.contains("KV heads"), "{msg}"),
        Err(other) => panic!("expected InvalidConfig, got {other}"),
        Ok(_) => panic!("loaded a GGUF written for other head counts"),
    }
}

/// A GGUF cut short (a partial download) is an error naming the file, not a panic or garbage.
#[test]
fn a_truncated_gguf_is_refused() {
    let gguf = scratch().join("llama-gqa-truncated-gguf");
    let path = write_gguf(&fixture_dir("llama-gqa"), &gguf, &q8_0_gguf()).expect("write gguf");
    let bytes = std::fs::read(&path).expect("read gguf");
    for keep in [bytes.len() - 1000, 64] {
        std::fs::write(&path, &bytes[..keep]).expect("truncate");
        match Model::load(&gguf, &LoadConfig::default()) {
            Err(ModelError::Gguf { .. } | ModelError::InvalidConfig(_)) => {}
            Err(other) => panic!("cut at {keep}: unexpected error {other}"),
            Ok(_) => panic!("cut at {keep}: loaded"),
        }
    }
}
