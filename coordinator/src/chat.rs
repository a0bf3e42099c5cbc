//! Chat input rendered with the model's own chat template (`tokenizer_config.json`).
//!
//! Templates are Jinja written for Python: they call string methods (`.strip()`), raise errors
//! through `raise_exception`, and read `bos_token`/`eos_token`. minijinja with its Python
//! compatibility callback runs them without any Python.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("model has no chat template")]
    NoTemplate,
    #[error("invalid chat template: {0}")]
    Template(String),
    /// The template refused the conversation (e.g. roles out of order); the client's fault.
    #[error("chat template rejected the messages: {0}")]
    Rejected(String),
}

/// A model's chat template with the special tokens it refers to.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

const NAME: &str = "chat";

fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        // Older configs store added tokens as {"content": "...", ...}.
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).unwrap_or("").to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// Reads `dir/tokenizer_config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self, ChatError> {
        let path = dir.join("tokenizer_config.json");
        let read_err = |reason: String| ChatError::Read { path: path.display().to_string(), reason };
        let bytes = std::fs::read(&path).map_err(|e| read_err(e.to_string()))?;
        let config: Value = serde_json::from_slice(&bytes).map_err(|e| read_err(e.to_string()))?;
        let template = match config.get("chat_template") {
            Some(Value::String(t)) => t.clone(),
            // A list of named templates: the one named "default" serves plain chat.
            Some(Value::Array(named)) => named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .ok_or(ChatError::NoTemplate)?
                .to_string(),
            _ => return Err(ChatError::NoTemplate),
        };
        Self::new(template, token_text(config.get("bos_token")), token_text(config.get("eos_token")))
    }

    pub fn new(template: String, bos: String, eos: String) -> Result<Self, ChatError> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(NAME, template).map_err(|e| ChatError::Template(e.to_string()))?;
        Ok(Self { env, bos, eos })
    }

    /// Renders `messages`, ending with the assistant's turn opened when `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, ChatError> {
        let template = self.env.get_template(NAME).map_err(|e| ChatError::Template(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos.clone(),
                eos_token => self.eos.clone(),
            })
            .map_err(|e| match e.kind() {
                minijinja::ErrorKind::InvalidOperation => ChatError::Rejected(e.to_string()),
                _ => ChatError::Template(e.to_string()),
            })
    }
}
