//! Which decoder family a `config.json` describes, by the rule transformers loads it with: its
//! one `architectures` entry, else its `model_type`. The coordinator checks it at start and the
//! model crate builds from it, so the two cannot disagree about what is served.

use serde_json::Value;

use crate::error::{FilesError, Result};

/// The decoder families Tessera implements: (`architectures` name, `model_type`).
pub const DECODERS: [(&str, &str); 3] = [("LlamaForCausalLM", "llama"), ("MistralForCausalLM", "mistral"), ("Qwen2ForCausalLM", "qwen2")];

/// The `architectures` name of the decoder `config` describes.
pub fn decoder_architecture(config: &Value) -> Result<&'static str> {
    match config.get("architectures") {
        Some(Value::Array(names)) => match names.as_slice() {
            [Value::String(name)] => {
                DECODERS.iter().find(|(a, _)| a == name).map(|(a, _)| *a).ok_or_else(|| FilesError::UnsupportedArchitecture(name.clone()))
            }
            _ => Err(FilesError::Invalid(format!("expected exactly one entry in `architectures`, found {names:?}"))),
        },
        Some(Value::Null) | None => match config.get("model_type").and_then(Value::as_str) {
            Some(t) => DECODERS
                .iter()
                .find(|(_, m)| *m == t)
                .map(|(a, _)| *a)
                .ok_or_else(|| FilesError::UnsupportedArchitecture(format!("model_type {t:?}"))),
            None => {
                Err(FilesError::Invalid("config.json has neither `architectures` nor `model_type`, so the model family is unknown".into()))
            }
        },
        Some(other) => Err(FilesError::Invalid(format!("`architectures` must be a list of names, found {other}"))),
    }
}
