//! The BERT encoder on real weights: all-MiniLM-L6-v2 against sentence-transformers' vectors
//! (`tests/golden/minilm-embeddings.json`, from `scripts/golden/make_embedding_golden.py`).
//!
//! The model comes from `scripts/fetch_minilm.sh` (run by `scripts/setup.sh`); without it these
//! tests fail and say so.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Deserialize;
use tessera_model::bert::Pooling;
use tessera_model::fixture::minilm_dir;
use tessera_model::{BertModel, ModelError};
use tokenizers::Tokenizer;

/// How far from sentence-transformers' vector ours may point: 1 − cosine. Measured ≤ 5e-13 on
/// every golden text; 1e-6 leaves room for another CPU's summation order, and is still far
/// below what a wrong pooling, mask or norm gives (≥ 1e-3).
const MAX_ONE_MINUS_COSINE: f64 = 1e-6;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[derive(Deserialize)]
struct Golden {
    /// The longest input sentence-transformers feeds the model; longer texts were cut to it.
    max_seq_length: usize,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    /// What sentence-transformers fed the model: cut to `max_seq_length` when `truncated`.
    ids: Vec<u32>,
    truncated: bool,
    vector: Vec<f64>,
    /// The same model with CLS pooling instead of mean, then Normalize.
    cls_vector: Vec<f64>,
}

fn golden() -> Golden {
    let path = workspace_root().join("tests/golden/minilm-embeddings.json");
    let text = std::fs::read_to_string(&path).expect("read golden embeddings");
    serde_json::from_str(&text).expect("parse golden embeddings")
}

/// The model's `tokenizer.json` without the padding and 128-token truncation it ships with.
fn tokenizer(dir: &Path) -> Tokenizer {
    let mut tok = Tokenizer::from_file(dir.join("tokenizer.json")).expect("load tokenizer.json");
    tok.with_padding(None);
    tok.with_truncation(None).expect("disable truncation");
    tok
}

/// Gives the model directory `dir` sentence-transformers' CLS pooling instead of mean.
fn write_cls_pooling(dir: &Path) {
    std::fs::create_dir(dir.join("1_Pooling")).expect("mkdir");
    std::fs::write(
        dir.join("1_Pooling/config.json"),
        r#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#,
    )
    .expect("write pooling");
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "vector length");
    assert!(a.iter().all(|x| x.is_finite()), "a non-finite value in the vector");
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * y).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn minilm_matches_sentence_transformers() {
    let dir = minilm_dir();
    let golden = golden();
    assert!(golden.cases.len() >= 10, "golden has {} cases", golden.cases.len());
    let tok = tokenizer(&dir);
    let model = BertModel::load(&dir, &Device::Cpu).expect("load MiniLM");
    assert_eq!(model.head().pooling, Pooling::Mean);
    assert!(model.head().normalize, "modules.json lists Normalize");
    assert_eq!(model.dim(), 384);

    // sentence-transformers cuts every input to its max_seq_length (from
    // sentence_bert_config.json), not to the model's positions; the model takes no more.
    let max = model.max_tokens();
    assert_eq!(max, golden.max_seq_length, "the model's input limit is sentence-transformers' max_seq_length");
    let mut ids = Vec::new();
    let mut cut = 0;
    for case in &golden.cases {
        let enc = tok.encode(case.text.as_str(), true).expect("tokenize");
        let mut got = enc.get_ids().to_vec();
        assert_eq!(got.len() > max, case.truncated, "{} tokens of {:?}", got.len(), case.text);
        if got.len() > max {
            // As the tokenizer truncates: the first max - 1 tokens, then the closing [SEP].
            let sep = got[got.len() - 1];
            got.truncate(max - 1);
            got.push(sep);
            cut += 1;
        }
        assert_eq!(got, case.ids, "token ids of {:?}", case.text);
        ids.push(got);
    }
    assert!(ids.iter().any(|i| i.len() > 128), "a golden text must be longer than tokenizer.json's 128");
    assert!(cut > 0, "a golden text must be longer than max_seq_length, so the cut is checked");

    // One padded batch, then every text alone: padding must not move a vector.
    let batched = model.embed(&ids).expect("embed batch");
    let mut worst = f64::INFINITY;
    for (i, case) in golden.cases.iter().enumerate() {
        let alone = model.embed(&ids[i..=i]).expect("embed one");
        for (how, v) in [("batched", &batched[i]), ("alone", &alone[0])] {
            let c = cosine(v, &case.vector);
            let diff = v.iter().zip(&case.vector).map(|(x, y)| (f64::from(*x) - y).abs()).fold(0.0, f64::max);
            eprintln!("{how:>7} 1-cos={:.2e} max|diff|={diff:.2e} tokens={:>3} {:?}", 1.0 - c, ids[i].len(), case.text);
            assert!(1.0 - c <= MAX_ONE_MINUS_COSINE, "{how}: 1 - cosine = {:e} for {:?}", 1.0 - c, case.text);
            worst = worst.min(c);
        }
        let norm: f32 = batched[i].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "normalised vector has norm {norm}");
    }
    eprintln!("lowest cosine: {worst:.12}");
    // The check has teeth: different sentences are far apart.
    let unrelated = cosine(&batched[0], &golden.cases[6].vector);
    assert!(unrelated < 0.9, "unrelated texts have cosine {unrelated}");
}

#[test]
fn inputs_past_max_seq_length_are_refused_not_cut() {
    let model = BertModel::load(&minilm_dir(), &Device::Cpu).expect("load MiniLM");
    let max = model.max_tokens();
    // sentence_bert_config.json's max_seq_length, below the 512 positions.
    assert_eq!((max, model.config().max_position_embeddings), (256, 512));
    let ok = vec![101u32, 2023, 102];
    let long = vec![1996u32; max + 1];
    match model.embed(&[ok.clone(), long]) {
        Err(ModelError::SequenceTooLong { index: 1, len, max: m }) => assert_eq!((len, m), (max + 1, max)),
        other => panic!("expected SequenceTooLong for input 1, got {:?}", other.map(|v| v.len())),
    }
    let empty: Vec<u32> = Vec::new();
    assert!(matches!(model.embed(&[ok.clone(), empty]), Err(ModelError::InvalidBatch(_))));
    assert!(matches!(model.embed(&[vec![101u32, 30522, 102]]), Err(ModelError::InvalidBatch(_))));
    assert!(matches!(model.embed::<Vec<u32>>(&[]), Err(ModelError::InvalidBatch(_))));
    // Exactly the maximum is fine.
    let full = model.embed(&[vec![1996u32; max]]).expect("embed 256 tokens");
    assert_eq!(full[0].len(), 384);
}

/// `BertForMaskedLM`-style checkpoints name every tensor `bert.…`; CLS pooling without
/// `Normalize` comes from the sentence-transformers files.
#[test]
fn bert_prefix_and_cls_pooling() {
    let src = minilm_dir();
    let dir = tempfile::tempdir().expect("temp dir");
    let tensors = candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).expect("read weights");
    let renamed: HashMap<String, Tensor> = tensors.into_iter().map(|(k, v)| (format!("bert.{k}"), v)).collect();
    candle_core::safetensors::save(&renamed, dir.path().join("model.safetensors")).expect("write weights");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).expect("copy config");
    write_cls_pooling(dir.path());

    let prefixed = BertModel::load(dir.path(), &Device::Cpu).expect("load bert.-prefixed copy");
    assert_eq!(prefixed.head().pooling, Pooling::Cls);
    assert!(!prefixed.head().normalize, "no modules.json, so no Normalize");
    let ids = vec![vec![101u32, 7592, 2088, 102], vec![101u32, 2204, 102]];
    let cls = prefixed.embed(&ids).expect("embed");

    // Under the original head (mean + Normalize) the prefixed copy equals the plain checkpoint.
    std::fs::write(dir.path().join("1_Pooling/config.json"), r#"{"pooling_mode_mean_tokens": true}"#).expect("rewrite pooling");
    std::fs::copy(src.join("modules.json"), dir.path().join("modules.json")).expect("copy modules");
    let prefixed_mean = BertModel::load(dir.path(), &Device::Cpu).expect("reload").embed(&ids).expect("embed");
    let plain = BertModel::load(&src, &Device::Cpu).expect("load plain").embed(&ids).expect("embed");
    assert_eq!(prefixed_mean, plain, "bert.-prefixed and plain names give the same model");
    assert_ne!(cls, plain);
    let norm: f32 = cls[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() > 1e-3, "CLS without Normalize should not be unit length (norm {norm})");
}

/// CLS pooling against sentence-transformers' own CLS `Pooling` module on the same weights:
/// a copy of the model directory whose `1_Pooling/config.json` asks for CLS.
#[test]
fn cls_pooling_matches_sentence_transformers() {
    let src = minilm_dir();
    let dir = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(&src).expect("read model dir") {
        let entry = entry.expect("dir entry");
        if entry.file_name() != "1_Pooling" {
            std::os::unix::fs::symlink(entry.path(), dir.path().join(entry.file_name())).expect("link model file");
        }
    }
    write_cls_pooling(dir.path());
    let model = BertModel::load(dir.path(), &Device::Cpu).expect("load the CLS copy");
    assert_eq!(model.head().pooling, Pooling::Cls);
    assert!(model.head().normalize, "modules.json lists Normalize");

    let golden = golden();
    let ids: Vec<Vec<u32>> = golden.cases.iter().map(|c| c.ids.clone()).collect();
    let got = model.embed(&ids).expect("embed");
    for (v, case) in got.iter().zip(&golden.cases) {
        let c = cosine(v, &case.cls_vector);
        assert!(1.0 - c <= MAX_ONE_MINUS_COSINE, "CLS: 1 - cosine = {:e} for {:?}", 1.0 - c, case.text);
        // The check has teeth: the mean-pooled vector of the same text is far from it.
        assert!(cosine(v, &case.vector) < 0.99, "CLS and mean pooling agree for {:?}", case.text);
    }
}
