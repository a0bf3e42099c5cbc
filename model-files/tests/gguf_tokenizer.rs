//! Tokenizers rebuilt from GGUF metadata against the ones transformers builds from the same files
//! (`scripts/golden/make_gguf_tokenizer_golden.py`):
//!
//! * `tests/golden/smollm2-tokenizer.json`: SmolLM2-135M-Instruct's byte-level vocabulary, as the
//!   file is and with its `tokenizer.ggml.pre` swapped for every other supported pre-tokenizer.
//!   The model comes from `scripts/fetch_smollm2.sh` (run by `scripts/setup.sh`); without it the
//!   test fails and says so.
//! * `tests/golden/gguf-tokenizer-spm.json` with the committed `gguf-tokenizer-spm.gguf`: a small
//!   sentencepiece vocabulary (byte fallback, merges recovered from scores).
//!
//! Every case must give the golden's ids and decoded text. Where the golden's reference departs
//! from transformers to follow the file (see the script), it keeps transformers' ids beside.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tessera_model_files::gguf::{GgufHeader, Value};
use tessera_model_files::tokenizer::{from_metadata, GgufTokenizer};
use tessera_model_files::FilesError;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[derive(Deserialize)]
struct Golden {
    gguf_sha256: String,
    variants: Vec<Variant>,
}

#[derive(Deserialize)]
struct Variant {
    overrides: serde_json::Map<String, serde_json::Value>,
    cases: Vec<Case>,
    /// `(id, content, special)` of transformers' added tokens, for the file as it is.
    added_tokens: Option<Vec<(u32, String, bool)>>,
    /// transformers' merge ranking, when the file lists no merges and both recover them.
    merges: Option<Vec<(String, String)>>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

fn golden(name: &str) -> Golden {
    let path = workspace_root().join("tests/golden").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// SmolLM2's GGUF, fetched (or found) by the script that fetches it for every other test.
fn smollm2_gguf() -> PathBuf {
    let script = workspace_root().join("scripts/fetch_smollm2.sh");
    let out = Command::new("bash").arg(&script).output().unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "SmolLM2-135M-Instruct is missing and {} could not fetch it: run scripts/setup.sh first\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn metadata(path: &Path) -> HashMap<String, Value> {
    GgufHeader::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())).metadata
}

fn with_overrides(base: &HashMap<String, Value>, overrides: &serde_json::Map<String, serde_json::Value>) -> HashMap<String, Value> {
    let mut meta = base.clone();
    for (key, value) in overrides {
        let value = match value {
            serde_json::Value::String(s) => Value::String(s.clone()),
            serde_json::Value::Bool(b) => Value::Bool(*b),
            other => panic!("override {key} = {other} is neither string nor bool"),
        };
        meta.insert(key.clone(), value);
    }
    meta
}

/// Every variant and case of a golden; all mismatches are reported together.
fn check_golden(golden: &Golden, base: &HashMap<String, Value>) -> usize {
    let mut failures = Vec::new();
    let mut cases = 0;
    for variant in &golden.variants {
        let tok = from_metadata(&with_overrides(base, &variant.overrides)).expect("build tokenizer").tokenizer;
        if let Some(expected) = &variant.added_tokens {
            let mut added: Vec<(u32, String, bool)> =
                tok.get_added_tokens_decoder().into_iter().map(|(id, t)| (id, t.content, t.special)).collect();
            added.sort();
            assert_eq!(&added, expected, "added tokens");
        }
        if let Some(expected) = &variant.merges {
            let model = serde_json::to_value(tok.get_model()).expect("serialize the model");
            let merges: Vec<(String, String)> = serde_json::from_value(model["merges"].clone()).expect("merges");
            assert_eq!(merges.len(), expected.len(), "number of merges");
            let first = merges.iter().zip(expected).position(|(a, b)| a != b);
            assert_eq!(first, None, "merge rank {first:?} differs");
        }
        for case in &variant.cases {
            cases += 1;
            let enc = tok.encode(case.text.as_str(), true).expect("encode");
            let decoded = tok.decode(enc.get_ids(), false).expect("decode");
            if enc.get_ids() != case.ids.as_slice() || decoded != case.decoded {
                failures.push(format!(
                    "{:?} {:?}:\n  ids     {:?}\n  golden  {:?}\n  decoded {:?}\n  golden  {:?}",
                    variant.overrides,
                    case.text,
                    enc.get_ids(),
                    case.ids,
                    decoded,
                    case.decoded
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {cases} cases differ:\n{}", failures.len(), failures.join("\n"));
    cases
}

#[test]
fn smollm2_matches_transformers() {
    let path = smollm2_gguf();
    let golden = golden("smollm2-tokenizer.json");
    assert_eq!(sha256(&path), golden.gguf_sha256, "{} is not the file the golden was made from", path.display());
    let base = metadata(&path);

    let GgufTokenizer { bos, eos, bos_id, eos_ids, add_bos, .. } = from_metadata(&base).expect("build tokenizer");
    assert_eq!((bos.as_deref(), bos_id), (Some("<|im_start|>"), Some(1)));
    assert_eq!((eos.as_deref(), eos_ids), (Some("<|im_end|>"), vec![2]));
    assert!(!add_bos, "SmolLM2's GGUF says add_bos_token = false");

    let pres: Vec<&str> = golden.variants.iter().filter_map(|v| v.overrides.get("tokenizer.ggml.pre")?.as_str()).collect();
    for pre in ["gpt-2", "no-such-pre", "llama-bpe", "qwen2", "qwen35", "tekken", "gpt-4o"] {
        assert!(pres.contains(&pre), "the golden has no {pre} variant");
    }
    let cases = check_golden(&golden, &base);
    assert!(cases >= 12 * 8, "{cases} cases");
}

#[test]
fn sentencepiece_matches_transformers() {
    let path = workspace_root().join("tests/golden/gguf-tokenizer-spm.gguf");
    let golden = golden("gguf-tokenizer-spm.json");
    assert_eq!(sha256(&path), golden.gguf_sha256, "{} is not the file the golden was made from", path.display());
    let base = metadata(&path);

    let GgufTokenizer { bos, eos, bos_id, eos_ids, add_bos, .. } = from_metadata(&base).expect("build tokenizer");
    assert_eq!((bos.as_deref(), bos_id), (Some("<s>"), Some(1)));
    // eos, then the end-of-turn token the file also names.
    assert_eq!((eos.as_deref(), eos_ids), (Some("</s>"), vec![2, 4]));
    assert!(add_bos, "sentencepiece vocabularies add BOS unless told otherwise");
    let cases = check_golden(&golden, &base);
    assert!(cases >= 12 * 4, "{cases} cases");
}

/// Byte-level metadata: the 256 byte tokens, then `extra` tokens with their types.
fn byte_level_metadata(extra: &[(&str, i32)], merges: &[&str]) -> HashMap<String, Value> {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let mut types = vec![1; tokens.len()];
    for (token, token_type) in extra {
        tokens.push((*token).to_owned());
        types.push(*token_type);
    }
    let strings = |items: Vec<String>| Value::Array(items.into_iter().map(Value::String).collect());
    HashMap::from([
        ("tokenizer.ggml.model".to_owned(), Value::String("gpt2".to_owned())),
        ("tokenizer.ggml.tokens".to_owned(), strings(tokens)),
        ("tokenizer.ggml.token_type".to_owned(), Value::Array(types.into_iter().map(Value::I32).collect())),
        ("tokenizer.ggml.merges".to_owned(), strings(merges.iter().map(|m| (*m).to_owned()).collect())),
    ])
}

/// GPT-2's printable spelling of a byte.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + rank).expect("valid char")
}

#[test]
fn control_tokens_outside_the_byte_alphabet_keep_their_ids() {
    let meta = byte_level_metadata(&[("<｜User｜>", 3), ("<think>", 4), ("hi", 1)], &["h i"]);
    let tok = from_metadata(&meta).expect("build").tokenizer;
    let enc = tok.encode("<｜User｜>hi<think>", true).expect("encode");
    assert_eq!(enc.get_ids(), &[256, 258, 257]);
    assert_eq!(tok.decode(enc.get_ids(), false).expect("decode"), "<｜User｜>hi<think>");
    assert_eq!(tok.decode(enc.get_ids(), true).expect("decode"), "hi<think>", "only the control token is special");
}

#[test]
fn bos_and_eos_follow_the_flags() {
    let mut meta = byte_level_metadata(&[("<s>", 3), ("</s>", 3), ("<eot>", 3)], &[]);
    meta.insert("tokenizer.ggml.bos_token_id".to_owned(), Value::U32(256));
    meta.insert("tokenizer.ggml.eos_token_id".to_owned(), Value::U32(257));
    meta.insert("tokenizer.ggml.eot_token_id".to_owned(), Value::U32(258));
    let plain = from_metadata(&meta).expect("build");
    assert!(!plain.add_bos, "byte-level vocabularies add no BOS unless told to");
    assert_eq!(plain.eos_ids, vec![257, 258]);
    assert_eq!(plain.tokenizer.encode("a", true).expect("encode").get_ids(), &[b'a' as u32]);

    meta.insert("tokenizer.ggml.add_bos_token".to_owned(), Value::Bool(true));
    meta.insert("tokenizer.ggml.add_eos_token".to_owned(), Value::Bool(true));
    let both = from_metadata(&meta).expect("build");
    assert!(both.add_bos);
    assert_eq!(both.tokenizer.encode("a", true).expect("encode").get_ids(), &[256, b'a' as u32, 257]);
    assert_eq!(both.tokenizer.encode("a", false).expect("encode").get_ids(), &[b'a' as u32]);
}

fn invalid_config(meta: &HashMap<String, Value>) -> String {
    match from_metadata(meta) {
        Err(FilesError::Invalid(message)) => message,
        Err(other) => panic!("expected InvalidConfig, got {other}"),
        Ok(_) => panic!("expected an error"),
    }
}

#[test]
fn bad_metadata_is_an_error_naming_its_key() {
    let good = byte_level_metadata(&[], &[]);
    from_metadata(&good).expect("the base metadata is valid");

    let mut meta = good.clone();
    meta.remove("tokenizer.ggml.tokens");
    assert!(invalid_config(&meta).contains("tokenizer.ggml.tokens"));

    let mut meta = good.clone();
    meta.remove("tokenizer.ggml.model");
    assert!(invalid_config(&meta).contains("tokenizer.ggml.model"));

    let mut meta = good.clone();
    meta.insert("tokenizer.ggml.model".to_owned(), Value::String("bert".to_owned()));
    let message = invalid_config(&meta);
    assert!(message.contains("tokenizer.ggml.model \"bert\" is not supported"), "{message}");

    let mut meta = good.clone();
    meta.insert("tokenizer.ggml.bos_token_id".to_owned(), Value::U32(256));
    assert!(invalid_config(&meta).contains("tokenizer.ggml.bos_token_id = 256"));

    let mut meta = good.clone();
    meta.insert("tokenizer.ggml.add_bos_token".to_owned(), Value::Bool(true));
    assert!(invalid_config(&meta).contains("tokenizer.ggml.add_bos_token"));

    let mut meta = good.clone();
    meta.insert("tokenizer.ggml.tokens".to_owned(), Value::String("abc".to_owned()));
    assert!(invalid_config(&meta).contains("tokenizer.ggml.tokens should be an array"));

    let meta = byte_level_metadata(&[], &["a b c"]);
    assert!(invalid_config(&meta).contains("tokenizer.ggml.merges[0]"));

    // "a b" merges into "ab", which the vocabulary lacks.
    let meta = byte_level_metadata(&[], &["a b"]);
    assert!(invalid_config(&meta).contains("tokenizer.ggml.merges"));

    let mut meta = good.clone();
    meta.insert("tokenizer.ggml.token_type".to_owned(), Value::Array(vec![Value::I32(1)]));
    assert!(invalid_config(&meta).contains("tokenizer.ggml.token_type has 1 entries"));

    let mut meta = good.clone();
    meta.remove("tokenizer.ggml.merges");
    assert!(invalid_config(&meta).contains("tokenizer.ggml.merges"));

    let mut meta = good;
    meta.insert("tokenizer.ggml.model".to_owned(), Value::String("llama".to_owned()));
    meta.insert("general.architecture".to_owned(), Value::String("gemma2".to_owned()));
    assert!(invalid_config(&meta).contains("general.architecture \"gemma2\""));
}
