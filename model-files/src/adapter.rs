//! A PEFT LoRA adapter's `adapter_config.json`: what the coordinator checks when an adapter is
//! registered and what the workers read before its weights (`tessera_model`'s `lora.rs`).
//! Anything in PEFT's `LoraConfig` that would change the adapter's arithmetic and that Tessera
//! does not implement is refused by name rather than ignored.

use std::path::Path;

use serde::Deserialize;

use crate::error::{FilesError, Result};

/// Largest rank accepted: PEFT adapters in use are 4–256; a larger one would be a mistake or an
/// attempt to make every request pay for a full-size matrix.
pub const MAX_LORA_RANK: usize = 1024;

/// Largest `adapter_config.json` read; PEFT writes about 1 KB.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The seven projections an adapter may target, by their Hugging Face module names.
pub const LORA_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// What `adapter_config.json` says, after the checks.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    pub rank: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    /// The model the adapter was trained on, as PEFT recorded it (informational).
    pub base_model: Option<String>,
}

impl AdapterConfig {
    /// The factor of the update: `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// The fields of PEFT's `LoraConfig` that change what an adapter computes. Anything Tessera does
/// not implement is refused by name rather than ignored.
#[derive(Deserialize)]
struct RawConfig {
    peft_type: Option<String>,
    r: Option<serde_json::Value>,
    lora_alpha: Option<serde_json::Value>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    fan_in_fan_out: bool,
    bias: Option<String>,
    #[serde(default)]
    lora_bias: bool,
    modules_to_save: Option<serde_json::Value>,
    target_modules: Option<serde_json::Value>,
    rank_pattern: Option<serde_json::Value>,
    alpha_pattern: Option<serde_json::Value>,
    layer_replication: Option<serde_json::Value>,
    target_parameters: Option<serde_json::Value>,
    base_model_name_or_path: Option<String>,
}

fn bad(dir: &Path, reason: impl Into<String>) -> FilesError {
    FilesError::InvalidAdapter { dir: dir.to_path_buf(), reason: reason.into() }
}

/// Whether a JSON value is absent in effect: null, an empty list, map or string.
fn is_empty(v: &Option<serde_json::Value>) -> bool {
    match v {
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::Array(a)) => a.is_empty(),
        Some(serde_json::Value::Object(o)) => o.is_empty(),
        Some(serde_json::Value::String(s)) => s.is_empty(),
        Some(_) => false,
    }
}

/// Reads and checks `dir/adapter_config.json`.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join("adapter_config.json");
    let meta = std::fs::metadata(&path).map_err(|source| FilesError::Io { path: path.clone(), source })?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(bad(dir, format!("adapter_config.json is {} bytes, more than the {MAX_CONFIG_BYTES} allowed", meta.len())));
    }
    let bytes = std::fs::read(&path).map_err(|source| FilesError::Io { path: path.clone(), source })?;
    let raw: RawConfig = serde_json::from_slice(&bytes).map_err(|source| FilesError::Json { path, source })?;
    if let Some(t) = raw.peft_type.as_deref().filter(|t| !t.eq_ignore_ascii_case("LORA")) {
        return Err(bad(dir, format!("peft_type {t:?} is not LORA")));
    }
    let rank = match raw.r.as_ref().and_then(serde_json::Value::as_u64) {
        Some(r) if r >= 1 && r as usize <= MAX_LORA_RANK => r as usize,
        Some(r) => return Err(bad(dir, format!("r = {r} is outside 1..={MAX_LORA_RANK}"))),
        None => return Err(bad(dir, "r is missing or not a positive integer")),
    };
    let alpha = match raw.lora_alpha.as_ref().and_then(serde_json::Value::as_f64) {
        Some(a) if a.is_finite() => a,
        _ => return Err(bad(dir, "lora_alpha is missing or not a finite number")),
    };
    let refuse = |what: &str| Err(bad(dir, format!("{what} is not supported")));
    if raw.use_dora {
        return refuse("use_dora (DoRA)");
    }
    if raw.fan_in_fan_out {
        return refuse("fan_in_fan_out (Conv1D-style weights)");
    }
    if raw.bias.as_deref().is_some_and(|b| b != "none") || raw.lora_bias {
        return refuse("a trained bias (bias other than \"none\", or lora_bias)");
    }
    if !is_empty(&raw.modules_to_save) {
        return refuse("modules_to_save (fully trained copies of base modules)");
    }
    if !is_empty(&raw.rank_pattern) || !is_empty(&raw.alpha_pattern) {
        return refuse("rank_pattern / alpha_pattern (a rank or alpha per module)");
    }
    if !is_empty(&raw.layer_replication) {
        return refuse("layer_replication");
    }
    if !is_empty(&raw.target_parameters) {
        return refuse("target_parameters");
    }
    // A list names modules; a string is a regular expression (or "all-linear") matched by PEFT
    // against module paths, so the tensors present say what it matched.
    if let Some(serde_json::Value::Array(names)) = &raw.target_modules {
        for n in names {
            let name = n.as_str().unwrap_or_default();
            if !LORA_TARGETS.contains(&name) {
                return Err(bad(dir, format!("target module {n} is not one of {}", LORA_TARGETS.join(", "))));
            }
        }
    }
    Ok(AdapterConfig { rank, alpha, use_rslora: raw.use_rslora, base_model: raw.base_model_name_or_path })
}
