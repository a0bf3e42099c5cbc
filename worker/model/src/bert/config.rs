//! Encoder configuration: BERT's `config.json` and the sentence-transformers pooling files.
//!
//! `config.json` must say `model_type: "bert"` with absolute position embeddings. Pooling comes
//! from the `Pooling` module named in `modules.json` (else `1_Pooling/config.json`); with neither,
//! mean pooling is used, as sentence-transformers does for a plain Hugging Face model.
//! Normalisation is on exactly when `modules.json` lists a `Normalize` module. The longest input
//! is `max_seq_length` from `sentence_bert_config.json` when set (all-MiniLM-L6-v2: 256 of its
//! 512 positions), else the positions: sentence-transformers never feeds the model more.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{ModelError, Result};

/// The activation of BERT's MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU (`erf`), transformers' `"gelu"`.
    Gelu,
    /// The tanh approximation, transformers' `"gelu_new"` / `"gelu_pytorch_tanh"`.
    GeluTanh,
}

/// The fields of a BERT `config.json` the encoder uses.
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub activation: Activation,
    /// The longest sequence, in tokens including `[CLS]` and `[SEP]`, the model can encode.
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
}

/// Just `model_type`, read before the rest so another architecture gets a clear error.
#[derive(Deserialize)]
struct Kind {
    model_type: Option<String>,
}

#[derive(Deserialize)]
struct RawBertConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default = "default_act")]
    hidden_act: String,
    max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default)]
    pad_token_id: Option<u32>,
    #[serde(default)]
    position_embedding_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_slice(&bytes).map_err(|source| ModelError::ConfigJson { path: path.to_path_buf(), source })
}

/// Whether the `config.json` in `dir` describes a BERT encoder (`model_type: "bert"`), so a
/// caller can pick between [`crate::Model`] and [`crate::BertModel`] before loading.
pub fn is_bert_dir(dir: &Path) -> Result<bool> {
    let kind: Kind = read_json(&dir.join("config.json"))?;
    Ok(kind.model_type.as_deref() == Some("bert"))
}

impl BertConfig {
    /// Parses and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let kind: Kind = read_json(&path)?;
        if kind.model_type.as_deref() != Some("bert") {
            return Err(ModelError::UnsupportedArchitecture(format!(
                "model_type {:?} (the encoder expects \"bert\")",
                kind.model_type.unwrap_or_default()
            )));
        }
        let raw: RawBertConfig = read_json(&path)?;
        if let Some(p) = raw.position_embedding_type.as_deref() {
            if p != "absolute" {
                return Err(ModelError::InvalidConfig(format!("position_embedding_type {p:?} is not supported (only \"absolute\")")));
            }
        }
        let activation = match raw.hidden_act.as_str() {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => return Err(ModelError::InvalidConfig(format!("hidden_act {other:?} is not supported"))),
        };
        let positive = [
            ("vocab_size", raw.vocab_size),
            ("hidden_size", raw.hidden_size),
            ("num_hidden_layers", raw.num_hidden_layers),
            ("num_attention_heads", raw.num_attention_heads),
            ("intermediate_size", raw.intermediate_size),
            ("max_position_embeddings", raw.max_position_embeddings),
            ("type_vocab_size", raw.type_vocab_size),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ModelError::InvalidConfig(format!("{name} must be positive")));
        }
        if !raw.hidden_size.is_multiple_of(raw.num_attention_heads) {
            return Err(ModelError::InvalidConfig(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                raw.hidden_size, raw.num_attention_heads
            )));
        }
        let pad_token_id = raw.pad_token_id.unwrap_or(0);
        if pad_token_id as usize >= raw.vocab_size {
            return Err(ModelError::InvalidConfig(format!("pad_token_id {pad_token_id} is outside the vocabulary")));
        }
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            intermediate_size: raw.intermediate_size,
            activation,
            max_position_embeddings: raw.max_position_embeddings,
            type_vocab_size: raw.type_vocab_size,
            layer_norm_eps: raw.layer_norm_eps,
            pad_token_id,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[derive(Deserialize)]
struct RawSentenceBert {
    #[serde(default)]
    max_seq_length: Option<usize>,
}

/// sentence-transformers' `max_seq_length` in `dir/sentence_bert_config.json`: the most tokens
/// it feeds the model, cutting longer inputs. `None` without the file or the field.
pub fn max_seq_length(dir: &Path) -> Result<Option<usize>> {
    let path = dir.join("sentence_bert_config.json");
    if !path.exists() {
        return Ok(None);
    }
    let raw: RawSentenceBert = read_json(&path)?;
    match raw.max_seq_length {
        Some(0) => Err(ModelError::InvalidConfig(format!("{}: max_seq_length must be positive", path.display()))),
        n => Ok(n),
    }
}

/// How token states become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Average over the sequence's tokens (padding excluded).
    Mean,
    /// The state of the first token (`[CLS]`).
    Cls,
}

/// The sentence-transformers head: pooling, then optional L2 normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentenceHead {
    pub pooling: Pooling,
    pub normalize: bool,
}

#[derive(Deserialize)]
struct StModule {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct RawPooling {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

impl SentenceHead {
    /// Reads `modules.json` and the pooling config of `dir` (see the module docs for defaults).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let modules_path = dir.join("modules.json");
        let modules: Vec<StModule> = if modules_path.exists() { read_json(&modules_path)? } else { Vec::new() };
        let normalize = modules.iter().any(|m| m.kind.ends_with(".Normalize"));
        let pooling_dir =
            modules.iter().find(|m| m.kind.ends_with(".Pooling")).map(|m| m.path.clone()).unwrap_or_else(|| "1_Pooling".into());
        if pooling_dir.contains("..") || Path::new(&pooling_dir).is_absolute() {
            return Err(ModelError::InvalidConfig(format!("modules.json names a path outside the model directory: {pooling_dir:?}")));
        }
        let pooling_path: PathBuf = dir.join(&pooling_dir).join("config.json");
        let pooling = if pooling_path.exists() { Self::parse_pooling(&pooling_path)? } else { Pooling::Mean };
        Ok(Self { pooling, normalize })
    }

    fn parse_pooling(path: &Path) -> Result<Pooling> {
        let raw: RawPooling = read_json(path)?;
        let unsupported = [
            ("max_tokens", raw.pooling_mode_max_tokens),
            ("mean_sqrt_len_tokens", raw.pooling_mode_mean_sqrt_len_tokens),
            ("weightedmean_tokens", raw.pooling_mode_weightedmean_tokens),
            ("lasttoken", raw.pooling_mode_lasttoken),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, on)| *on) {
            return Err(ModelError::InvalidConfig(format!("{}: pooling mode {name} is not supported", path.display())));
        }
        match (raw.pooling_mode_mean_tokens, raw.pooling_mode_cls_token) {
            (true, false) => Ok(Pooling::Mean),
            (false, true) => Ok(Pooling::Cls),
            (true, true) => {
                Err(ModelError::InvalidConfig(format!("{}: combined pooling (mean and CLS concatenated) is not supported", path.display())))
            }
            (false, false) => Err(ModelError::InvalidConfig(format!("{}: no pooling mode is enabled", path.display()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{"model_type": "bert", "vocab_size": 100, "hidden_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 32}"#;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        }
        dir
    }

    #[test]
    fn config_defaults_and_refusals() {
        let dir = dir_with(&[("config.json", CONFIG)]);
        let cfg = BertConfig::from_dir(dir.path()).expect("parse");
        assert_eq!((cfg.activation, cfg.type_vocab_size, cfg.pad_token_id, cfg.head_dim()), (Activation::Gelu, 2, 0, 4));
        assert!(is_bert_dir(dir.path()).expect("kind"));

        let llama = dir_with(&[("config.json", r#"{"model_type": "llama"}"#)]);
        assert!(!is_bert_dir(llama.path()).expect("kind"));
        assert!(matches!(BertConfig::from_dir(llama.path()), Err(ModelError::UnsupportedArchitecture(_))));
        let swap = |from: &str, to: &str| dir_with(&[("config.json", &CONFIG.replace(from, to))]);
        let not_bert = swap(r#""bert""#, r#""roberta""#);
        assert!(matches!(BertConfig::from_dir(not_bert.path()), Err(ModelError::UnsupportedArchitecture(_))));
        let odd_heads = swap(r#""num_attention_heads": 2"#, r#""num_attention_heads": 3"#);
        assert!(matches!(BertConfig::from_dir(odd_heads.path()), Err(ModelError::InvalidConfig(_))));
        let relative =
            swap(r#""max_position_embeddings": 32"#, r#""max_position_embeddings": 32, "position_embedding_type": "relative_key""#);
        assert!(matches!(BertConfig::from_dir(relative.path()), Err(ModelError::InvalidConfig(_))));
        let relu = swap(r#""max_position_embeddings": 32"#, r#""max_position_embeddings": 32, "hidden_act": "relu""#);
        assert!(matches!(BertConfig::from_dir(relu.path()), Err(ModelError::InvalidConfig(_))));
    }

    #[test]
    fn sentence_head_from_modules_and_pooling_config() {
        let plain = dir_with(&[]);
        assert_eq!(SentenceHead::from_dir(plain.path()).expect("head"), SentenceHead { pooling: Pooling::Mean, normalize: false });

        let modules = r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "pool", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]"#;
        let cls = dir_with(&[("modules.json", modules), ("pool/config.json", r#"{"pooling_mode_cls_token": true}"#)]);
        assert_eq!(SentenceHead::from_dir(cls.path()).expect("head"), SentenceHead { pooling: Pooling::Cls, normalize: true });

        for bad in
            [r#"{"pooling_mode_max_tokens": true}"#, r#"{"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": true}"#, r#"{}"#]
        {
            let dir = dir_with(&[("1_Pooling/config.json", bad)]);
            assert!(matches!(SentenceHead::from_dir(dir.path()), Err(ModelError::InvalidConfig(_))), "{bad}");
        }
        let escape = dir_with(&[("modules.json", r#"[{"path": "../x", "type": "sentence_transformers.models.Pooling"}]"#)]);
        assert!(matches!(SentenceHead::from_dir(escape.path()), Err(ModelError::InvalidConfig(_))));
    }

    #[test]
    fn max_seq_length_from_sentence_bert_config() {
        assert_eq!(max_seq_length(dir_with(&[]).path()).expect("no file"), None);
        let file = |text: &str| dir_with(&[("sentence_bert_config.json", text)]);
        let set = file(r#"{"max_seq_length": 256, "do_lower_case": false}"#);
        assert_eq!(max_seq_length(set.path()).expect("parse"), Some(256));
        assert_eq!(max_seq_length(file(r#"{"do_lower_case": true}"#).path()).expect("no field"), None);
        assert_eq!(max_seq_length(file(r#"{"max_seq_length": null}"#).path()).expect("null"), None);
        assert!(matches!(max_seq_length(file(r#"{"max_seq_length": 0}"#).path()), Err(ModelError::InvalidConfig(_))));
        assert!(matches!(max_seq_length(file(r#"{"max_seq_length": -1}"#).path()), Err(ModelError::ConfigJson { .. })));
    }
}
