//! A served model as the coordinator sees it: its name, where its files are, how it is split,
//! and what text handling needs (tokenizer, chat template, context length, end-of-sequence ids).
//!
//! The coordinator never loads weights; it reads only the small JSON files. Workers load the
//! shards from the same directory path (shared storage or an identical copy on every host).

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;
use tokenizers::Tokenizer;

use tessera_model_files::{ModelFiles, SamplingDefaults};

use crate::adapters::AdapterRegistry;
use crate::chat::ChatTemplate;
use crate::error::CoordinatorError;

/// Largest tensor-parallel degree a group may have.
pub const MAX_TP: usize = 64;

/// What the operator asks the coordinator to serve.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Name clients put in `GenerateRequest.model`.
    pub name: String,
    /// Hugging Face model directory or GGUF file, as the workers see it.
    pub dir: PathBuf,
    /// Tensor-parallel degree of each group serving this model.
    pub tp: usize,
    /// Weight dtype on the workers: "f32", "bf16" or "f16", or "q8_0" / "q4_k" for
    /// projections block-quantized on load (f32 elsewhere).
    pub dtype: String,
    /// Longest sequence to accept instead of the model's own limit. Above that limit positions
    /// are extrapolated past what the model was trained (or scaled) for, and quality may drop:
    /// an operator's explicit choice.
    pub max_context: Option<usize>,
    /// Workers compute every token with one arithmetic whatever its batch
    /// (`tessera_model::Numerics::BatchInvariant`): seeded streams give the same tokens under
    /// any load, and a migrated stream continues bit for bit. Prefill is slower.
    pub batch_invariant: bool,
}

/// Whether a model generates text or embeds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Llama-family decoders: `Generate`.
    Decoder,
    /// BERT encoders (`config.json` `model_type: "bert"`): `Embed`, one rank per group.
    Encoder,
}

/// A model ready to accept requests: spec plus its text-side files.
pub struct ServedModel {
    pub spec: ModelSpec,
    pub kind: ModelKind,
    pub tokenizer: Arc<Tokenizer>,
    /// `None` when the model ships no chat template; chat requests are then refused.
    pub chat: Option<ChatTemplate>,
    /// Longest sequence (prompt + generated) the model supports.
    pub max_context: usize,
    /// Tokens that end generation unless the request sets `ignore_eos`.
    pub eos: Vec<u32>,
    pub vocab_size: usize,
    /// `generation_config.json`'s sampling settings, for the fields a request leaves unset.
    pub sampling_defaults: SamplingDefaults,
    /// LoRA adapters requests may name (`adapters.rs`).
    pub adapters: AdapterRegistry,
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedModel").field("spec", &self.spec).field("max_context", &self.max_context).finish_non_exhaustive()
    }
}

impl ServedModel {
    /// Reads the model's text side (`model_files.rs`: a Hugging Face directory's config,
    /// tokenizer, chat template and generation config, or the same from a GGUF file's
    /// metadata) and checks it can be served as `spec` asks, so a bad model fails at start.
    pub fn load(spec: ModelSpec) -> Result<Self, CoordinatorError> {
        let err = |reason: String| CoordinatorError::Model { name: spec.name.clone(), reason };
        if spec.name.is_empty() {
            return Err(err("the model name is empty".into()));
        }
        if spec.tp == 0 || spec.tp > MAX_TP {
            return Err(err(format!("tp {} is outside 1..={MAX_TP}", spec.tp)));
        }
        if !matches!(spec.dtype.as_str(), "f32" | "bf16" | "f16" | "q8_0" | "q4_k") {
            return Err(err(format!("dtype {:?} is not one of f32, bf16, f16, q8_0, q4_k", spec.dtype)));
        }
        let files = ModelFiles::locate(&spec.dir).map_err(|e| err(e.to_string()))?;
        let config = files.config_json().map_err(|e| err(e.to_string()))?;
        let kind = match config.get("model_type").and_then(Value::as_str) {
            Some("bert") => ModelKind::Encoder,
            _ => ModelKind::Decoder,
        };
        if kind == ModelKind::Encoder && spec.tp != 1 {
            return Err(err(format!("an encoder runs on one worker per group; tp {} is not supported", spec.tp)));
        }
        if kind == ModelKind::Decoder {
            // The family the workers will build, by the same rule, so an unknown one fails
            // `up` at once instead of every worker failing to load it.
            tessera_model_files::decoder_architecture(&config).map_err(|e| err(e.to_string()))?;
            check_tp_split(&config, spec.tp).map_err(err)?;
        }
        let trained = scaled_context(&config).ok_or_else(|| err("config.json has no max_position_embeddings".into()))?;
        let max_context = match spec.max_context {
            Some(n) if n < 2 => return Err(err(format!("max_context {n} leaves no room to generate"))),
            Some(n) => {
                if n > trained {
                    tracing::warn!(model = %spec.name, trained, allowed = n, "accepting sequences past the model's context; positions beyond it are extrapolated");
                }
                n
            }
            None => trained,
        };
        if kind == ModelKind::Encoder && max_context > trained {
            return Err(err(format!("an encoder has no positions past {trained}; max_context {max_context} is too long")));
        }
        // generation_config.json often lists more end tokens (chat models end turns with one).
        let eos = files.eos_ids().map_err(|e| err(e.to_string()))?;
        let sampling_defaults = files.sampling_defaults().map_err(|e| err(e.to_string()))?;
        crate::request::check_sampling_defaults(&sampling_defaults).map_err(|e| err(format!("generation_config.json: {e}")))?;
        let mut tokenizer = files.tokenizer().map_err(|e| err(e.to_string()))?;
        // Encoder tokenizers often ship fixed padding and truncation (all-MiniLM: 128 tokens);
        // lengths are the coordinator's to check, and a cut is reported, never silent.
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).map_err(|e| err(format!("cannot switch off truncation: {e}")))?;
        let chat = match files.chat_template().map_err(|e| err(e.to_string()))? {
            Some(t) => {
                let source = t.source.clone();
                let template = ChatTemplate::new(t.template, t.bos, t.eos).map_err(|e| err(format!("{source}: {e}")))?;
                // A template that cannot render a plain exchange would fail every chat request.
                template.check().map_err(|e| err(format!("{source}: {e}")))?;
                Some(template)
            }
            None => None,
        };
        // The embedding often has more rows than the tokenizer has tokens (padded for fast
        // matmuls); every row is a valid input id.
        let vocab_size =
            config.get("vocab_size").and_then(Value::as_u64).map(|v| v as usize).unwrap_or_else(|| tokenizer.get_vocab_size(true));
        // Encoders: sentence-transformers' shorter max_seq_length, where the model names one.
        crate::embed::cap_at_max_seq_length(Self {
            spec,
            kind,
            tokenizer: Arc::new(tokenizer),
            chat,
            max_context,
            eos,
            vocab_size,
            sampling_defaults,
            adapters: AdapterRegistry::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

/// The longest sequence the model supports with its rope scaling: `max_position_embeddings`,
/// except for dynamic NTK scaling, whose configs keep the original length there and reach
/// `factor` times further (the model crate's `ModelConfig::max_context` follows the same rule).
fn scaled_context(config: &Value) -> Option<usize> {
    let positions = config.get("max_position_embeddings").and_then(Value::as_u64).filter(|&n| n > 1)? as usize;
    let scaling = ["rope_parameters", "rope_scaling"].iter().find_map(|k| config.get(*k).filter(|v| v.is_object()));
    let kind = scaling.and_then(|p| p.get("rope_type").or_else(|| p.get("type"))).and_then(Value::as_str);
    let factor = scaling.and_then(|p| p.get("factor")).and_then(Value::as_f64).filter(|f| f.is_finite() && *f >= 1.0);
    Some(match (kind, factor) {
        (Some("dynamic"), Some(f)) => (positions as f64 * f) as usize,
        _ => positions,
    })
}

/// The largest tensor-parallel degree of at most `max` that the decoder at `path` splits over
/// evenly (heads, KV heads and MLP features, as `check_tp_split` requires); 1 for encoders.
pub fn largest_tp(path: &std::path::Path, max: usize) -> Result<usize, String> {
    let files = ModelFiles::locate(path).map_err(|e| e.to_string())?;
    let config = files.config_json().map_err(|e| e.to_string())?;
    if config.get("model_type").and_then(Value::as_str) == Some("bert") {
        return Ok(1);
    }
    (1..=max.max(1))
        .rev()
        .find(|&tp| check_tp_split(&config, tp).is_ok())
        .ok_or_else(|| check_tp_split(&config, 1).err().unwrap_or_default())
}

/// Refuses a TP degree the model cannot be split over, the rules the workers' `TpLayout`
/// applies, so a coordinator fails at start instead of retrying group formation for ever.
fn check_tp_split(config: &Value, tp: usize) -> Result<(), String> {
    let field = |name: &str| config.get(name).and_then(Value::as_u64).map(|v| v as usize);
    let heads = field("num_attention_heads").ok_or("config.json has no num_attention_heads")?;
    let kv = field("num_key_value_heads").unwrap_or(heads);
    let intermediate = field("intermediate_size").ok_or("config.json has no intermediate_size")?;
    let uneven = |what: &str, n: usize| format!("cannot split {what} = {n} evenly over tensor-parallel size {tp}");
    if !heads.is_multiple_of(tp) {
        return Err(uneven("num_attention_heads", heads));
    }
    if !intermediate.is_multiple_of(tp) {
        return Err(uneven("intermediate_size", intermediate));
    }
    if kv == 0 || !(kv.is_multiple_of(tp) || tp.is_multiple_of(kv)) {
        return Err(uneven("num_key_value_heads", kv));
    }
    Ok(())
}
