//! Model configuration parsed from a Hugging Face `config.json`.
//!
//! Accepts `LlamaForCausalLM`, `MistralForCausalLM` and `Qwen2ForCausalLM`, with rope settings in
//! either the legacy top-level form (`rope_theta`, `rope_scaling`) or the `rope_parameters` form
//! that transformers 5 writes. Anything not understood is a typed error, never a silent default.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// The model families this crate implements. They share one implementation; they differ only in
/// which projections carry a bias and how sliding-window attention is switched on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    fn from_hf_name(name: &str) -> Result<Self> {
        match name {
            "LlamaForCausalLM" => Ok(Self::Llama),
            "MistralForCausalLM" => Ok(Self::Mistral),
            "Qwen2ForCausalLM" => Ok(Self::Qwen2),
            other => Err(ModelError::UnsupportedArchitecture(other.to_string())),
        }
    }

    /// The name Hugging Face uses in `architectures`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// How rotary position frequencies are scaled for contexts past the training length.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// NTK-aware base growth once the sequence passes `original_max_position_embeddings`;
    /// recomputed from the current sequence length at every forward call (as transformers does).
    Dynamic { factor: f64, original_max_position_embeddings: usize },
    /// YaRN: per-dimension ramp between interpolation and extrapolation, plus a cos/sin scale.
    Yarn { factor: f64, original_max_position_embeddings: usize, attention_factor: f64, beta_fast: f64, beta_slow: f64, truncate: bool },
    /// Llama 3.1 frequency-band scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
}

impl RopeScaling {
    /// The context length the model was trained at, when the scaling names one.
    pub fn original_max_position_embeddings(&self) -> Option<usize> {
        match self {
            Self::None | Self::Linear { .. } => None,
            Self::Dynamic { original_max_position_embeddings, .. }
            | Self::Yarn { original_max_position_embeddings, .. }
            | Self::Llama3 { original_max_position_embeddings, .. } => Some(*original_max_position_embeddings),
        }
    }
}

/// A validated model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Bias on q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Bias on gate, up and down projections.
    pub mlp_bias: bool,
    /// Sliding attention window per layer (`None` = full attention).
    pub sliding_window: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// `config.json` as written by transformers; only the fields we read.
#[derive(Debug, Deserialize)]
struct RawConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
}

impl ModelConfig {
    /// Reads and validates the config of the model at `path`: a directory's `config.json`, or
    /// a GGUF file's metadata (`model_files.rs` says which).
    pub fn from_dir(path: &Path) -> Result<Self> {
        Self::from_value(tessera_model_files::ModelFiles::locate(path)?.config_json()?)
    }

    /// Validates a parsed `config.json` document.
    pub fn from_value(value: Value) -> Result<Self> {
        let architecture = Architecture::from_hf_name(tessera_model_files::decoder_architecture(&value)?)?;
        let raw: RawConfig =
            serde_json::from_value(value).map_err(|source| ModelError::ConfigJson { path: "config.json".into(), source })?;
        Self::from_raw(raw, architecture)
    }

    /// Parses and validates a `config.json` document.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self> {
        let value: Value = serde_json::from_slice(bytes).map_err(|source| ModelError::ConfigJson { path: "config.json".into(), source })?;
        Self::from_value(value)
    }

    fn from_raw(raw: RawConfig, architecture: Architecture) -> Result<Self> {
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(ModelError::InvalidConfig(format!("hidden_act {act:?} is not supported (only silu)")));
            }
        }
        let heads = raw.num_attention_heads;
        if heads == 0 || raw.hidden_size == 0 || raw.num_hidden_layers == 0 || raw.vocab_size == 0 {
            return Err(ModelError::InvalidConfig(
                "hidden_size, num_attention_heads, num_hidden_layers and vocab_size must be positive".into(),
            ));
        }
        let kv_heads = raw.num_key_value_heads.unwrap_or(heads);
        if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(ModelError::InvalidConfig(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
            )));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.hidden_size.is_multiple_of(heads) => raw.hidden_size / heads,
            None => {
                return Err(ModelError::InvalidConfig(format!(
                    "hidden_size {} is not divisible by num_attention_heads {heads} and head_dim is absent",
                    raw.hidden_size
                )))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(ModelError::InvalidConfig(format!("head_dim {head_dim} must be even and positive")));
        }
        let max_position_embeddings =
            raw.max_position_embeddings.ok_or_else(|| ModelError::InvalidConfig("max_position_embeddings is missing".into()))?;

        let (rope_theta, rope_scaling) = parse_rope(&raw.rope_parameters, raw.rope_theta, &raw.rope_scaling, max_position_embeddings)?;

        // Llama's `attention_bias` covers q, k, v and o; Qwen2 always biases q, k, v and never o.
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            _ => {
                let b = raw.attention_bias.unwrap_or(false);
                (b, b)
            }
        };
        let layers = raw.num_hidden_layers;
        let sliding_window = match architecture {
            Architecture::Llama => vec![None; layers],
            Architecture::Mistral => vec![raw.sliding_window; layers],
            Architecture::Qwen2 => {
                // transformers: layers at index >= max_window_layers use the window, and only when
                // use_sliding_window is set.
                let window = if raw.use_sliding_window.unwrap_or(false) { raw.sliding_window } else { None };
                let first = raw.max_window_layers.unwrap_or(layers);
                (0..layers).map(|i| if i >= first { window } else { None }).collect()
            }
        };
        if sliding_window.contains(&Some(0)) {
            return Err(ModelError::InvalidConfig("sliding_window must be positive".into()));
        }

        Ok(Self {
            architecture,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            vocab_size: raw.vocab_size,
            max_position_embeddings,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            sliding_window,
            bos_token_id: token_ids(&raw.bos_token_id, "bos_token_id")?.first().copied(),
            eos_token_ids: token_ids(&raw.eos_token_id, "eos_token_id")?,
        })
    }

    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// The longest context the model supports with its rope scaling: `max_position_embeddings`,
    /// except for dynamic NTK, whose config keeps the original length there.
    pub fn max_context(&self) -> usize {
        match &self.rope_scaling {
            RopeScaling::Dynamic { factor, original_max_position_embeddings } => {
                (*original_max_position_embeddings as f64 * factor) as usize
            }
            _ => self.max_position_embeddings,
        }
    }
}

fn token_ids(v: &Option<Value>, field: &str) -> Result<Vec<u32>> {
    let bad = || ModelError::InvalidConfig(format!("{field} must be an integer, a list of integers or null"));
    let one = |x: &Value| x.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad);
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(items)) => items.iter().map(one).collect(),
        Some(x) => Ok(vec![one(x)?]),
    }
}

/// Resolves rope theta and scaling from either config form. `rope_parameters` wins when present,
/// because transformers 5 writes it instead of the legacy fields.
fn parse_rope(
    rope_parameters: &Option<Value>,
    legacy_theta: Option<f64>,
    legacy_scaling: &Option<Value>,
    max_position_embeddings: usize,
) -> Result<(f64, RopeScaling)> {
    let (theta, params) = match rope_parameters {
        Some(Value::Object(p)) => {
            let theta = p.get("rope_theta").and_then(Value::as_f64).or(legacy_theta);
            (theta, Some(p))
        }
        Some(Value::Null) | None => match legacy_scaling {
            Some(Value::Object(p)) => (legacy_theta, Some(p)),
            Some(Value::Null) | None => (legacy_theta, None),
            Some(_) => return Err(ModelError::InvalidConfig("rope_scaling must be an object".into())),
        },
        Some(_) => return Err(ModelError::InvalidConfig("rope_parameters must be an object".into())),
    };
    // A missing theta is an error rather than 10000: transformers-5 configs keep it inside
    // rope_parameters, and silently assuming the Llama-2 value corrupts every other model.
    let theta =
        theta.ok_or_else(|| ModelError::InvalidConfig("rope_theta is missing (neither top-level nor in rope_parameters)".into()))?;
    if !(theta.is_finite() && theta > 1.0) {
        return Err(ModelError::InvalidConfig(format!("rope_theta {theta} must be finite and > 1")));
    }
    let Some(p) = params else { return Ok((theta, RopeScaling::None)) };

    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| p.get(key).and_then(Value::as_f64);
    let need = |key: &str| num(key).ok_or_else(|| ModelError::InvalidConfig(format!("rope scaling {kind:?} needs a numeric {key:?}")));
    let factor = || -> Result<f64> {
        let f = need("factor")?;
        if f.is_finite() && f >= 1.0 {
            Ok(f)
        } else {
            Err(ModelError::InvalidConfig(format!("rope scaling factor {f} must be finite and >= 1")))
        }
    };
    let original = |default: usize| -> usize {
        p.get("original_max_position_embeddings").and_then(Value::as_u64).map(|v| v as usize).unwrap_or(default)
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic {
            factor: factor()?,
            // transformers' dynamic NTK measures growth against max_position_embeddings.
            original_max_position_embeddings: max_position_embeddings,
        },
        "yarn" => {
            let factor = factor()?;
            let mscale = num("mscale");
            let mscale_all_dim = num("mscale_all_dim");
            let get_mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
            let attention_factor = match (num("attention_factor"), mscale, mscale_all_dim) {
                (Some(a), _, _) => a,
                (None, Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => get_mscale(factor, m) / get_mscale(factor, ma),
                _ => get_mscale(factor, 1.0),
            };
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: original(max_position_embeddings),
                attention_factor,
                beta_fast: num("beta_fast").unwrap_or(32.0),
                beta_slow: num("beta_slow").unwrap_or(1.0),
                truncate: p.get("truncate").and_then(Value::as_bool).unwrap_or(true),
            }
        }
        "llama3" => {
            let low = need("low_freq_factor")?;
            let high = need("high_freq_factor")?;
            if high <= low {
                return Err(ModelError::InvalidConfig(format!(
                    "llama3 rope scaling needs high_freq_factor ({high}) > low_freq_factor ({low})"
                )));
            }
            let original = p
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .ok_or_else(|| ModelError::InvalidConfig("llama3 rope scaling needs original_max_position_embeddings".into()))?;
            RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original as usize,
            }
        }
        other => return Err(ModelError::UnsupportedRopeType(other.to_string())),
    };
    Ok((theta, scaling))
}
