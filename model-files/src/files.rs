//! Where a model's files are, and its small text-side files read the way current tools write
//! them.
//!
//! A model is given as a path that is either
//! - a Hugging Face directory (`config.json`, safetensors or one `.gguf`, `tokenizer.json`, the
//!   chat template and `generation_config.json`), or
//! - a llama.cpp GGUF file, or a directory whose only model file is one `.gguf` and that has no
//!   `config.json`: the file then carries everything — hyperparameters, tokenizer and chat
//!   template in its metadata.
//!
//! In a directory, a side file wins over the GGUF's metadata where both exist (a user who wrote
//! a `tokenizer.json` beside a GGUF meant it). A file named directly is read alone: a stray
//! `config.json` next to a download must not change the model.
//!
//! The coordinator reads the text side from here and the workers read the weights, so both
//! agree on what a path means.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::{json, Map, Value};

use crate::error::{FilesError, Result};
use crate::gguf::GgufHeader;
use crate::tokenizer::{self, GgufTokenizer};

/// The sampling settings a model's `generation_config.json` recommends. The coordinator uses
/// them where a request leaves a field unset, as vLLM does (`--generation-config auto`); a field
/// the request sets wins. transformers' `do_sample` is not consulted, as vLLM does not.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

/// A chat template and the special tokens it may refer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplateText {
    pub template: String,
    /// Where the template was read from, for messages.
    pub source: String,
    pub bos: String,
    pub eos: String,
}

/// A located model: its directory, and the GGUF file its weights come from, if any.
pub struct ModelFiles {
    dir: PathBuf,
    /// Read side files (`config.json`, `tokenizer.json`, ...) from `dir`.
    side_files: bool,
    gguf: Option<Gguf>,
}

struct Gguf {
    path: PathBuf,
    header: GgufHeader,
    /// Built once on first use: the config, the chat template's special tokens, the end
    /// tokens and the tokenizer itself all come from it, and a 50k-token vocabulary with its
    /// merges is not rebuilt for each.
    tokenizer: OnceLock<GgufTokenizer>,
}

impl std::fmt::Debug for ModelFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFiles").field("dir", &self.dir).field("gguf", &self.gguf.as_ref().map(|g| &g.path)).finish_non_exhaustive()
    }
}

impl ModelFiles {
    /// Finds the model at `path` (a directory or a `.gguf` file) and reads a GGUF file's
    /// metadata (not its tensors).
    pub fn locate(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|source| FilesError::Io { path: path.to_path_buf(), source })?;
        if meta.is_file() {
            if path.extension().is_none_or(|x| x != "gguf") {
                return Err(FilesError::Invalid(format!(
                    "{} is a file but not a .gguf file; give a Hugging Face model directory or a GGUF file",
                    path.display()
                )));
            }
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            return Ok(Self { dir, side_files: false, gguf: Some(Gguf::read(path)?) });
        }
        let has_safetensors = path.join("model.safetensors").exists() || path.join("model.safetensors.index.json").exists();
        let gguf = match has_safetensors {
            true => None,
            false => find_gguf(path)?.map(|p| Gguf::read(&p)).transpose()?,
        };
        if gguf.is_none() && !has_safetensors && !path.join("config.json").exists() {
            return Err(FilesError::Invalid(format!(
                "{} holds no model: expected config.json with model.safetensors, or a .gguf file",
                path.display()
            )));
        }
        Ok(Self { dir: path.to_path_buf(), side_files: true, gguf })
    }

    /// The model's directory (side files live here).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The GGUF file the weights come from, if any.
    pub fn gguf_path(&self) -> Option<&Path> {
        self.gguf.as_ref().map(|g| g.path.as_path())
    }

    fn side(&self, name: &str) -> Option<PathBuf> {
        let p = self.dir.join(name);
        (self.side_files && p.exists()).then_some(p)
    }

    /// `config.json`, or its equivalent built from the GGUF metadata (the fields
    /// `tessera_model::ModelConfig` and the coordinator read, under transformers' names).
    pub fn config_json(&self) -> Result<Value> {
        if let Some(path) = self.side("config.json") {
            return read_json(&path);
        }
        match &self.gguf {
            Some(g) => gguf_config(g),
            None => Err(FilesError::Io {
                path: self.dir.join("config.json"),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no config.json"),
            }),
        }
    }

    /// `tokenizer.json`, or the tokenizer in the GGUF metadata.
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer> {
        if let Some(path) = self.side("tokenizer.json") {
            return tokenizers::Tokenizer::from_file(&path)
                .map_err(|e| FilesError::Invalid(format!("cannot load {}: {e}", path.display())));
        }
        match &self.gguf {
            Some(g) => Ok(g.tokenizer()?.tokenizer.clone()),
            None => Err(FilesError::Io {
                path: self.dir.join("tokenizer.json"),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no tokenizer.json"),
            }),
        }
    }

    /// The chat template, looked up in transformers' order: `chat_template.jinja`,
    /// `chat_template.json`, `tokenizer_config.json`'s `chat_template`, then the GGUF's
    /// `tokenizer.chat_template`. `None` when the model has none.
    pub fn chat_template(&self) -> Result<Option<ChatTemplateText>> {
        let tokenizer_config = self.side("tokenizer_config.json").map(|p| read_json(&p)).transpose()?;
        let special_map = self.side("special_tokens_map.json").map(|p| read_json(&p)).transpose()?;
        let token =
            |key: &str| -> Option<String> { [&tokenizer_config, &special_map].into_iter().flatten().find_map(|c| token_text(c.get(key))) };
        let found = if let Some(path) = self.side("chat_template.jinja") {
            let text = std::fs::read_to_string(&path).map_err(|source| FilesError::Io { path: path.clone(), source })?;
            Some((text, path.display().to_string()))
        } else if let Some(path) = self.side("chat_template.json") {
            let v = read_json(&path)?;
            let t = template_field(v.get("chat_template"))
                .ok_or_else(|| FilesError::Invalid(format!("{} has no \"chat_template\" string", path.display())))?;
            Some((t, path.display().to_string()))
        } else if let Some(t) = tokenizer_config.as_ref().and_then(|c| template_field(c.get("chat_template"))) {
            Some((t, self.dir.join("tokenizer_config.json").display().to_string()))
        } else {
            match &self.gguf {
                Some(g) => g
                    .header
                    .string("tokenizer.chat_template")
                    .map(|t| (t.to_string(), format!("{} (tokenizer.chat_template)", g.path.display()))),
                None => None,
            }
        };
        let Some((template, source)) = found else { return Ok(None) };
        let (mut bos, mut eos) = (token("bos_token"), token("eos_token"));
        if bos.is_none() || eos.is_none() {
            if let Some(g) = &self.gguf {
                let t = g.tokenizer()?;
                bos = bos.or_else(|| t.bos.clone());
                eos = eos.or_else(|| t.eos.clone());
            }
        }
        Ok(Some(ChatTemplateText { template, source, bos: bos.unwrap_or_default(), eos: eos.unwrap_or_default() }))
    }

    /// `generation_config.json`, when the directory has one.
    pub fn generation_config(&self) -> Result<Option<Value>> {
        self.side("generation_config.json").map(|p| read_json(&p)).transpose()
    }

    /// The sampling settings `generation_config.json` recommends (none without one, or for a
    /// GGUF file, which carries none). A key of the wrong type is an error, so a broken file
    /// fails at start rather than being half applied.
    pub fn sampling_defaults(&self) -> Result<SamplingDefaults> {
        let Some(g) = self.generation_config()? else { return Ok(SamplingDefaults::default()) };
        let number = |key: &str| -> Result<Option<f64>> {
            match g.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => {
                    v.as_f64().map(Some).ok_or_else(|| FilesError::Invalid(format!("generation_config.json: {key} is {v}, not a number")))
                }
            }
        };
        Ok(SamplingDefaults {
            temperature: number("temperature")?.map(|v| v as f32),
            // transformers' 0 and vLLM's -1 both mean no top-k cut, as does the request's 0.
            top_k: number("top_k")?.filter(|&k| k >= 1.0).map(|k| k.min(f64::from(u32::MAX)) as u32),
            top_p: number("top_p")?.map(|v| v as f32),
            repetition_penalty: number("repetition_penalty")?.map(|v| v as f32),
        })
    }

    /// End-of-sequence ids: the config's, then `generation_config.json`'s, then the GGUF
    /// tokenizer's end-of-turn token, without repeats.
    pub fn eos_ids(&self) -> Result<Vec<u32>> {
        let mut eos = token_ids(self.config_json()?.get("eos_token_id"));
        let mut add = |ids: Vec<u32>| {
            for id in ids {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        };
        if let Some(g) = self.generation_config()? {
            add(token_ids(g.get("eos_token_id")));
        }
        if let Some(g) = &self.gguf {
            add(g.tokenizer()?.eos_ids.clone());
        }
        Ok(eos)
    }
}

impl Gguf {
    fn read(path: &Path) -> Result<Self> {
        Ok(Self { path: path.to_path_buf(), header: GgufHeader::read(path)?, tokenizer: OnceLock::new() })
    }

    fn tokenizer(&self) -> Result<&GgufTokenizer> {
        if let Some(t) = self.tokenizer.get() {
            return Ok(t);
        }
        let built =
            tokenizer::from_metadata(&self.header.metadata).map_err(|e| FilesError::Invalid(format!("{}: {e}", self.path.display())))?;
        Ok(self.tokenizer.get_or_init(|| built))
    }
}

/// Builds transformers' `config.json` fields from llama.cpp's metadata keys
/// (`{arch}.context_length`, `{arch}.attention.head_count`, ...), as transformers' own GGUF
/// loader maps them.
fn gguf_config(g: &Gguf) -> Result<Value> {
    let meta = &g.header;
    let bad = |what: String| FilesError::Invalid(format!("{}: {what}", g.path.display()));
    let arch = meta.string("general.architecture").ok_or_else(|| bad("no general.architecture".into()))?;
    // llama.cpp writes Mistral checkpoints as `llama`.
    let (hf_arch, model_type) = match arch {
        "llama" => ("LlamaForCausalLM", "llama"),
        "qwen2" => ("Qwen2ForCausalLM", "qwen2"),
        other => return Err(FilesError::UnsupportedArchitecture(format!("{other} (GGUF general.architecture)"))),
    };
    let key = |k: &str| format!("{arch}.{k}");
    let int = |k: &str| meta.get(&key(k)).and_then(|v| v.as_u64()).map(|v| v as usize);
    let need = |k: &str| int(k).ok_or_else(|| bad(format!("{} is missing", key(k))));
    if meta.tensors.contains_key("rope_freqs.weight") {
        return Err(bad("per-dimension rope frequencies (rope_freqs.weight, Llama 3.1 scaling) are not supported".into()));
    }
    let heads = need("attention.head_count")?;
    let vocab = int("vocab_size")
        .or_else(|| match meta.get("tokenizer.ggml.tokens") {
            Some(crate::gguf::Value::Array(tokens)) => Some(tokens.len()),
            _ => None,
        })
        .ok_or_else(|| bad(format!("neither {} nor tokenizer.ggml.tokens is present", key("vocab_size"))))?;
    let mut c = Map::new();
    c.insert("architectures".into(), json!([hf_arch]));
    c.insert("model_type".into(), json!(model_type));
    c.insert("hidden_size".into(), json!(need("embedding_length")?));
    c.insert("intermediate_size".into(), json!(need("feed_forward_length")?));
    c.insert("num_hidden_layers".into(), json!(need("block_count")?));
    c.insert("num_attention_heads".into(), json!(heads));
    c.insert("num_key_value_heads".into(), json!(int("attention.head_count_kv").unwrap_or(heads)));
    if let Some(d) = int("attention.key_length") {
        c.insert("head_dim".into(), json!(d));
    }
    c.insert("vocab_size".into(), json!(vocab));
    c.insert("max_position_embeddings".into(), json!(need("context_length")?));
    // llama.cpp's defaults when a file leaves these out.
    c.insert("rms_norm_eps".into(), json!(meta.get(&key("attention.layer_norm_rms_epsilon")).and_then(|v| v.as_f64()).unwrap_or(1e-5)));
    c.insert("rope_theta".into(), json!(meta.get(&key("rope.freq_base")).and_then(|v| v.as_f64()).unwrap_or(10_000.0)));
    c.insert("hidden_act".into(), json!("silu"));
    // The converter writes no output matrix when the head is tied to the embedding.
    c.insert("tie_word_embeddings".into(), json!(!meta.tensors.contains_key("output.weight")));
    let scaling = meta.string(&key("rope.scaling.type"));
    match scaling {
        None | Some("none") => {}
        Some(kind @ ("linear" | "yarn")) => {
            let factor = meta
                .get(&key("rope.scaling.factor"))
                .and_then(|v| v.as_f64())
                .ok_or_else(|| bad(format!("{} is missing", key("rope.scaling.factor"))))?;
            let mut s = json!({"rope_type": kind, "factor": factor});
            if let Some(orig) = int("rope.scaling.original_context_length") {
                s["original_max_position_embeddings"] = json!(orig);
            }
            c.insert("rope_scaling".into(), s);
        }
        Some(other) => return Err(FilesError::UnsupportedRopeType(format!("{other} (GGUF {})", key("rope.scaling.type")))),
    }
    for (gguf_key, hf_key) in [("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")] {
        if let Some(id) = meta.get(gguf_key).and_then(|v| v.as_u64()) {
            c.insert(hf_key.into(), json!(id));
        }
    }
    Ok(Value::Object(c))
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).map_err(|source| FilesError::Io { path: path.to_path_buf(), source })?;
    serde_json::from_slice(&bytes).map_err(|source| FilesError::Json { path: path.to_path_buf(), source })
}

/// A chat template field: a string, or a list of named templates of which "default" serves
/// plain chat.
fn template_field(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(t) => Some(t.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(str::to_string),
        _ => None,
    }
}

/// A special token as `tokenizer_config.json` stores it: a string, or (older files) an object
/// with its `content`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// `eos_token_id` is an int, a list of ints, or absent.
fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()).into_iter().collect(),
        Some(Value::Array(items)) => items.iter().filter_map(|i| i.as_u64().and_then(|n| u32::try_from(n).ok())).collect(),
        _ => Vec::new(),
    }
}

/// The directory's only `*.gguf` file, if it has one; several are ambiguous.
pub fn find_gguf(dir: &Path) -> Result<Option<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| FilesError::Io { path: dir.to_path_buf(), source })?;
    let mut found: Vec<PathBuf> =
        entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "gguf")).collect();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        n => Err(FilesError::Invalid(format!("{} holds {n} .gguf files; expected one", dir.display()))),
    }
}
