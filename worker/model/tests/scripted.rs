//! Scripted fixtures: greedy decoding follows the written next-token table at any position,
//! tensor-parallel size and dtype, and the Chinese chain spells its text byte-split into tokens.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use tessera_collective::{Collective, InProcessGroup, SingleRank};
use tessera_model::fixture::scripted::{fixture_tokenizer, write_scripted, write_scripted_from, Script, CHINESE_IDS, CHINESE_TEXT, EOS};
use tessera_model::fixture::{by_name, WriteOptions};
use tessera_model::{Batch, LoadConfig, LogitsMode, Model, ModelError, SeqChunk};
use tokenizers::Tokenizer;

/// A fresh directory per test and dtype, so tests running in parallel never share files.
fn root(test: &str, dtype: DType) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("scripted-{}-{test}-{dtype:?}", std::process::id()))
}

fn write(script: &Script, test: &str, dtype: DType) -> PathBuf {
    write_scripted(script, &root(test, dtype), &WriteOptions { dtype, files: 1 }).expect("write scripted fixture")
}

fn row(t: Tensor) -> Vec<f32> {
    t.to_vec2::<f32>().expect("logits to host").remove(0)
}

/// Top logit minus the runner-up.
fn margin(logits: &[f32]) -> f32 {
    let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in logits {
        if v > first {
            (first, second) = (v, first);
        } else if v > second {
            second = v;
        }
    }
    first - second
}

/// What greedy decoding produced after a prompt, and the smallest winning margin on the way.
#[derive(Debug, Clone, PartialEq)]
struct Greedy {
    tokens: Vec<u32>,
    min_margin: f32,
}

/// Prefill `prompt`, then decode greedily until `stop` or `steps` tokens.
fn greedy(model: &Model, comm: &mut dyn Collective, prompt: &[u32], steps: usize, stop: Option<u32>) -> Greedy {
    let mut kv = model.new_kv_cache();
    let chunk = [SeqChunk { seq: 3, start: 0, len: prompt.len() }];
    let batch = Batch { tokens: prompt, chunks: &chunk };
    let mut logits = row(model.forward(&batch, &mut kv, comm, LogitsMode::LastPerChunk).expect("prefill"));
    let mut out = Greedy { tokens: Vec::new(), min_margin: f32::INFINITY };
    while out.tokens.len() < steps {
        let next = tessera_model::sampler::argmax(&logits);
        out.min_margin = out.min_margin.min(margin(&logits));
        out.tokens.push(next);
        if Some(next) == stop {
            break;
        }
        let chunk = [SeqChunk { seq: 3, start: prompt.len() + out.tokens.len() - 1, len: 1 }];
        let batch = Batch { tokens: &[next], chunks: &chunk };
        logits = row(model.forward(&batch, &mut kv, comm, LogitsMode::LastPerChunk).expect("decode"));
    }
    out
}

/// [`greedy`] on every rank of a `tp`-thread group; asserts the ranks agree.
fn greedy_tp(dir: &Path, dtype: DType, tp: usize, prompt: &[u32], steps: usize, stop: Option<u32>) -> Greedy {
    if tp == 1 {
        let model = Model::load(dir, &LoadConfig { dtype, ..LoadConfig::default() }).expect("load");
        return greedy(&model, &mut SingleRank, prompt, steps, stop);
    }
    let ranks: Vec<Greedy> = std::thread::scope(|s| {
        let handles: Vec<_> = InProcessGroup::new(tp)
            .into_iter()
            .enumerate()
            .map(|(rank, mut comm)| {
                s.spawn(move || {
                    let load = LoadConfig { dtype, tp_rank: rank, tp_size: tp, ..LoadConfig::default() };
                    let model = Model::load(dir, &load).expect("load shard");
                    greedy(&model, &mut comm, prompt, steps, stop)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    });
    assert!(ranks.iter().all(|r| r == &ranks[0]), "ranks disagree: {ranks:?}");
    ranks.into_iter().next().expect("one rank at least")
}

#[test]
fn chinese_text_is_a_chain_of_distinct_byte_split_tokens() {
    let tok = fixture_tokenizer().expect("fixture tokenizer");
    let encode = |text: &str| tok.encode(text, false).expect("encode").get_ids().to_vec();
    assert_eq!(encode(CHINESE_TEXT), CHINESE_IDS);
    let mut distinct = CHINESE_IDS.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), CHINESE_IDS.len(), "ids repeat");

    // Whole characters encode to prefixes, and every character takes more than one token.
    let mut end = 0;
    for (i, c) in CHINESE_TEXT.char_indices() {
        let alone = encode(&c.to_string());
        assert!(alone.len() > 1, "{c} is one token");
        end += alone.len();
        let prefix = &CHINESE_TEXT[..i + c.len_utf8()];
        assert_eq!(encode(prefix), CHINESE_IDS[..end], "{prefix}");
    }
    assert_eq!(tok.decode(&CHINESE_IDS, false).expect("decode"), CHINESE_TEXT);
    let partial = tok.decode(&CHINESE_IDS[..1], false).expect("decode");
    assert!(!partial.starts_with('风'), "the first id alone is a whole character: {partial:?}");
}

#[test]
fn chinese_chain_decodes_to_the_text_then_eos_at_any_tp_and_dtype() {
    let script = Script::chinese().expect("chinese chain");
    let mut expected = CHINESE_IDS[1..].to_vec();
    expected.push(EOS);
    for dtype in [DType::F32, DType::BF16] {
        let dir = write(&script, "chinese", dtype);
        let tok = Tokenizer::from_file(dir.join("tokenizer.json")).expect("written tokenizer");
        for tp in [1, 2] {
            let got = greedy_tp(&dir, dtype, tp, &CHINESE_IDS[..1], 32, Some(EOS));
            assert_eq!(got.tokens, expected, "{dtype:?} tp={tp}");
            let mut all = CHINESE_IDS[..1].to_vec();
            all.extend(&got.tokens);
            assert_eq!(tok.decode(&all, true).expect("decode"), CHINESE_TEXT);
            println!("chinese {dtype:?} tp={tp}: min margin {:.2}", got.min_margin);
            assert!(got.min_margin > 50.0, "{dtype:?} tp={tp}: margin {}", got.min_margin);

            // A text prompt of the first character: the rest of the text follows.
            let prompt = tok.encode("风", false).expect("encode").get_ids().to_vec();
            let got = greedy_tp(&dir, dtype, tp, &prompt, 32, Some(EOS));
            assert_eq!(got.tokens, expected[prompt.len() - 1..], "{dtype:?} tp={tp} after 风");
        }
    }
}

#[test]
fn cycle_is_followed_for_hundreds_of_steps_after_any_context() {
    let tokens: Vec<u32> = vec![40, 77, 3, 150, 299, 12, 201, 88, 260, 319];
    let script = Script::cycle("scripted-cycle", &tokens).expect("cycle");
    for dtype in [DType::F32, DType::BF16] {
        let dir = write(&script, "cycle", dtype);
        // Unrelated context first: only the last token may decide the next.
        let mut prompt: Vec<u32> = (0..37).map(|i| 5 + (i * 41 % 300)).collect();
        prompt.push(tokens[4]);
        let got = greedy_tp(&dir, dtype, 1, &prompt, 200, None);
        let expected: Vec<u32> = tokens.iter().cycle().skip(5).take(200).copied().collect();
        assert_eq!(got.tokens, expected, "{dtype:?}");
        assert_eq!(script.follow(tokens[4], 200), expected);
        println!("cycle {dtype:?}: min margin over 200 steps {:.2}", got.min_margin);
        assert!(got.min_margin > 50.0, "{dtype:?}: margin {}", got.min_margin);
    }
}

#[test]
fn a_cycle_through_the_whole_vocabulary_is_followed() {
    // Every id scripted at once: the worst case for embeddings that are too alike.
    let ids: Vec<u32> = (0..320).map(|i| (i * 97 + 13) % 320).collect();
    let script = Script::cycle("scripted-everything", &ids).expect("cycle");
    for dtype in [DType::F32, DType::BF16] {
        let dir = write(&script, "everything", dtype);
        let got = greedy_tp(&dir, dtype, 1, &ids[..1], 330, None);
        assert_eq!(got.tokens, script.follow(ids[0], 330), "{dtype:?}");
        println!("whole vocabulary {dtype:?}: min margin {:.2}", got.min_margin);
        assert!(got.min_margin > 50.0, "{dtype:?}: margin {}", got.min_margin);
    }
}

#[test]
fn other_shapes_biases_tied_embeddings_and_split_files_are_scripted_too() {
    // Qwen2 ties its embeddings and has q/k/v biases; llama-headdim-bias has an o_proj bias.
    let script = Script::chain("scripted-shapes", &[100, 200, 300, 50], Some(EOS)).expect("chain");
    for base in ["qwen2-tied", "llama-headdim-bias"] {
        let base = by_name(base).expect("known fixture");
        let root = root(base.name, DType::F32);
        let opts = WriteOptions { dtype: DType::F32, files: 3 };
        let dir = write_scripted_from(&script, &base, &root, &opts).expect("write");
        assert!(dir.join("model.safetensors.index.json").exists());
        for tp in [1, 2] {
            let got = greedy_tp(&dir, DType::F32, tp, &[100], 8, Some(EOS));
            assert_eq!(got.tokens, [200, 300, 50, EOS], "{} tp={tp}", base.name);
        }
    }
}

fn assert_invalid(result: Result<Script, ModelError>, what: &str) {
    match result {
        Err(ModelError::InvalidConfig(msg)) => assert!(msg.contains(what), "{msg:?} does not say {what:?}"),
        other => panic!("expected InvalidConfig mentioning {what:?}, got {other:?}"),
    }
}

#[test]
fn invalid_tables_are_typed_errors() {
    assert_invalid(Script::new("two-successors", vec![(5, 6), (5, 7)]), "token 5 has two successors");
    assert_invalid(Script::new("two-predecessors", vec![(5, 7), (6, 7)]), "token 7 has two predecessors");
    assert_invalid(Script::new("empty", vec![]), "empty");
    assert_invalid(Script::chain("repeat", &[10, 11, 10, 12], Some(EOS)), "token 10 appears twice");
    assert_invalid(Script::chain("end-inside", &[10, 11, 12], Some(11)), "token 11 has two predecessors");
    assert_invalid(Script::cycle("repeat-cycle", &[10, 11, 11]), "token 11 appears twice");

    // A chain whose end is its start is a cycle, not an error.
    let closed = Script::chain("closed", &[10, 11, 12], Some(10)).expect("closed chain");
    assert_eq!(closed.follow(10, 6), [11, 12, 10, 11, 12, 10]);

    // Scripts built field by field are checked when written, as are ids outside the vocabulary.
    let opts = WriteOptions::default();
    let dir = root("invalid", DType::F32);
    let unchecked = Script { name: "unchecked", next: vec![(5, 6), (5, 7)] };
    assert!(matches!(write_scripted(&unchecked, &dir, &opts), Err(ModelError::InvalidConfig(_))));
    let outside = Script::new("outside", vec![(5, 320)]).expect("shape is valid");
    let written = write_scripted(&outside, &dir, &opts);
    assert!(matches!(written, Err(ModelError::InvalidConfig(m)) if m.contains("outside the vocabulary")));
}
