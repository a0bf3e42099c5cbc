//! Validation and tokenization of a `GenerateRequest`: the only place public request fields are
//! read. What comes out ([`Prepared`]) is in range, tokenized, and fits the model's context.

use std::sync::Arc;

use tessera_proto::v1 as pb;
use tessera_proto::worker::Sampling;

use crate::chat::{ChatError, ChatMessage};
use crate::error::{invalid, CoordinatorError};
use crate::limits::Limits;
use crate::model::ServedModel;

/// When to stop generating, after validation.
#[derive(Debug, Clone)]
pub struct Stopping {
    pub max_new_tokens: u32,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// End-of-sequence ids that stop generation (empty when the request ignores EOS).
    pub eos: Vec<u32>,
}

/// A request that passed every check.
#[derive(Debug)]
pub struct Prepared {
    pub model: Arc<ServedModel>,
    /// Client's id, or empty (the caller assigns one).
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub sampling: Sampling,
    /// The client gave no seed: the caller picks one.
    pub seed_given: bool,
    pub stopping: Stopping,
}

/// The served model a request names. An empty name means the only served model, if there is
/// exactly one.
pub fn find_model(models: &[Arc<ServedModel>], name: &str) -> Result<Arc<ServedModel>, CoordinatorError> {
    if name.is_empty() {
        return match models {
            [only] => Ok(only.clone()),
            _ => Err(invalid(format!("model is required: this coordinator serves {}", names(models)))),
        };
    }
    models
        .iter()
        .find(|m| m.name() == name)
        .cloned()
        .ok_or_else(|| CoordinatorError::NotFound(format!("model {name:?} is not served here; served: {}", names(models))))
}

fn names(models: &[Arc<ServedModel>]) -> String {
    models.iter().map(|m| format!("{:?}", m.name())).collect::<Vec<_>>().join(", ")
}

/// Checks every field of `req` against `limits` and the model, and tokenizes its input.
pub fn prepare(req: pb::GenerateRequest, models: &[Arc<ServedModel>], limits: &Limits) -> Result<Prepared, CoordinatorError> {
    let model = find_model(models, &req.model)?;
    if req.request_id.len() > limits.max_request_id_bytes {
        return Err(invalid(format!(
            "request_id is {} bytes; the limit is {}",
            req.request_id.len(),
            limits.max_request_id_bytes
        )));
    }
    let sampling = sampling(req.sampling.unwrap_or_default())?;
    let seed_given = req.sampling.as_ref().is_some_and(|s| s.seed.is_some());
    let prompt = prompt_tokens(req.input, &model, limits)?;
    let stopping = stopping(req.stopping.unwrap_or_default(), prompt.len(), &model, limits)?;
    Ok(Prepared { model, request_id: req.request_id, prompt, sampling, seed_given, stopping })
}

fn sampling(s: pb::SamplingParams) -> Result<Sampling, CoordinatorError> {
    if !(s.temperature.is_finite() && s.temperature >= 0.0) {
        return Err(invalid(format!("temperature must be a finite number >= 0 (0 means greedy); got {}", s.temperature)));
    }
    if let Some(p) = s.top_p {
        // Written so that NaN fails too.
        if !(p > 0.0 && p <= 1.0) {
            return Err(invalid(format!("top_p must be in (0, 1]; got {p}")));
        }
    }
    Ok(Sampling { temperature: s.temperature, top_k: s.top_k, top_p: s.top_p, seed: s.seed.unwrap_or(0) })
}

fn prompt_tokens(input: Option<pb::generate_request::Input>, model: &ServedModel, limits: &Limits) -> Result<Vec<u32>, CoordinatorError> {
    use pb::generate_request::Input;
    let too_long = |bytes: usize| invalid(format!("prompt is {bytes} bytes; the limit is {}", limits.max_prompt_bytes));
    let ids = match input {
        None => return Err(invalid("request has no input: set prompt, chat or tokens")),
        Some(Input::Prompt(text)) => {
            if text.is_empty() {
                return Err(invalid("prompt is empty"));
            }
            if text.len() > limits.max_prompt_bytes {
                return Err(too_long(text.len()));
            }
            encode(model, &text, true)?
        }
        Some(Input::Chat(chat)) => {
            if chat.messages.is_empty() {
                return Err(invalid("chat has no messages"));
            }
            if chat.messages.len() > limits.max_messages {
                return Err(invalid(format!("chat has {} messages; the limit is {}", chat.messages.len(), limits.max_messages)));
            }
            let bytes: usize = chat.messages.iter().map(|m| m.role.len() + m.content.len()).sum();
            if bytes > limits.max_prompt_bytes {
                return Err(too_long(bytes));
            }
            let template = model.chat.as_ref().ok_or_else(|| {
                invalid(format!("model {:?} has no chat template; send prompt or tokens instead", model.name()))
            })?;
            let messages: Vec<ChatMessage> =
                chat.messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect();
            let text = template.render(&messages, true).map_err(|e| match e {
                ChatError::Rejected(_) => invalid(e.to_string()),
                other => CoordinatorError::Internal(other.to_string()),
            })?;
            // The template writes the special tokens itself (BOS included); adding them again
            // would double them.
            encode(model, &text, false)?
        }
        Some(Input::Tokens(tokens)) => {
            if tokens.ids.len() > model.max_context {
                return Err(invalid(format!(
                    "prompt is {} tokens; the model's context is {} tokens",
                    tokens.ids.len(),
                    model.max_context
                )));
            }
            check_ids(&tokens.ids, model, "token id")?;
            tokens.ids
        }
    };
    if ids.is_empty() {
        return Err(invalid("prompt is empty after tokenization"));
    }
    // At least one token must be left to generate.
    if ids.len() >= model.max_context {
        return Err(invalid(format!(
            "prompt is {} tokens; the model's context is {} tokens, so at most {} prompt tokens leave room to generate",
            ids.len(),
            model.max_context,
            model.max_context - 1
        )));
    }
    Ok(ids)
}

/// Every id must index the model's embedding.
fn check_ids(ids: &[u32], model: &ServedModel, what: &str) -> Result<(), CoordinatorError> {
    match ids.iter().find(|&&id| id as usize >= model.vocab_size) {
        Some(bad) => Err(invalid(format!("{what} {bad} is outside the vocabulary (size {})", model.vocab_size))),
        None => Ok(()),
    }
}

fn encode(model: &ServedModel, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, CoordinatorError> {
    let encoding = model.tokenizer.encode(text, add_special_tokens).map_err(|e| invalid(format!("cannot tokenize the input: {e}")))?;
    Ok(encoding.get_ids().to_vec())
}

fn stopping(s: pb::StoppingCriteria, prompt_len: usize, model: &ServedModel, limits: &Limits) -> Result<Stopping, CoordinatorError> {
    let room = (model.max_context - prompt_len) as u64;
    let max_new_tokens = match s.max_new_tokens {
        0 => (limits.default_max_new_tokens as u64).min(room) as u32,
        n if n > limits.max_new_tokens => {
            return Err(invalid(format!("max_new_tokens is {n}; the limit is {}", limits.max_new_tokens)));
        }
        n if n as u64 > room => {
            return Err(invalid(format!(
                "prompt ({prompt_len} tokens) plus max_new_tokens ({n}) exceeds the model's context of {} tokens",
                model.max_context
            )));
        }
        n => n,
    };
    if s.stop.len() > limits.max_stop_strings {
        return Err(invalid(format!("{} stop strings; the limit is {}", s.stop.len(), limits.max_stop_strings)));
    }
    if let Some(long) = s.stop.iter().find(|t| t.len() > limits.max_stop_bytes) {
        return Err(invalid(format!("a stop string is {} bytes; the limit is {}", long.len(), limits.max_stop_bytes)));
    }
    if s.stop_token_ids.len() > limits.max_stop_token_ids {
        return Err(invalid(format!(
            "{} stop token ids; the limit is {}",
            s.stop_token_ids.len(),
            limits.max_stop_token_ids
        )));
    }
    check_ids(&s.stop_token_ids, model, "stop token id")?;
    let eos = if s.ignore_eos { Vec::new() } else { model.eos.clone() };
    Ok(Stopping { max_new_tokens, stop: s.stop, stop_token_ids: s.stop_token_ids, eos })
}
