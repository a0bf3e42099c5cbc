//! Chat input rendered with the model's own chat template (`chat_template.jinja`,
//! `chat_template.json`, `tokenizer_config.json` or a GGUF file's `tokenizer.chat_template`).
//!
//! Templates are Jinja written for Python: they call string methods (`.strip()`), raise errors
//! through `raise_exception`, and read `bos_token`/`eos_token`. minijinja with its Python
//! compatibility callback runs them without any Python.

use std::path::Path;

use serde::Serialize;

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
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

impl ChatTemplate {
    /// The chat template of the model at `path` (a directory or a GGUF file), found where
    /// transformers looks for it (`tessera_model_files::ModelFiles::chat_template`).
    pub fn from_model(path: &Path) -> Result<Self, ChatError> {
        let read = |e: tessera_model_files::FilesError| ChatError::Read { path: path.display().to_string(), reason: e.to_string() };
        let files = tessera_model_files::ModelFiles::locate(path).map_err(read)?;
        let t = files.chat_template().map_err(read)?.ok_or(ChatError::NoTemplate)?;
        Self::new(t.template, t.bos, t.eos)
    }

    pub fn new(template: String, bos: String, eos: String) -> Result<Self, ChatError> {
        let mut env = minijinja::Environment::new();
        // transformers compiles chat templates with both set; newlines after tags depend on them.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatError::Template(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned(NAME, template).map_err(|e| ChatError::Template(e.to_string()))?;
        Ok(Self { env, bos, eos })
    }

    /// Renders a one-message conversation, so a template that fails on any input (a bad
    /// filter, an exception it always raises) is found when the model is loaded, not by the
    /// first client.
    pub fn check(&self) -> Result<(), ChatError> {
        let hello = [ChatMessage { role: "user".into(), content: "Hello".into() }];
        self.render(&hello, true).map(|_| ())
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
