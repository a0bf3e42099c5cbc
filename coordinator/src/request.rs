//! Validation and tokenization of a `GenerateRequest`: the only place public request fields are
//! read. What comes out ([`Prepared`]) is in range, tokenized, and fits the model's context.

use std::sync::Arc;

use tessera_model_files::SamplingDefaults;
use tessera_proto::v1 as pb;
use tessera_proto::worker::Sampling;

use crate::adapters::AdapterEntry;
use crate::beam::{BeamConfig, EarlyStopping, MAX_BEAMS};
use crate::chat::{ChatError, ChatMessage};
use crate::error::{invalid, CoordinatorError};
use crate::limits::Limits;
use crate::loop_guard::{LoopGuardConfig, Remedy, MAX_PERIOD, MAX_REMEDY_TOKENS, MAX_REPEATS};
use crate::model::{ModelKind, ServedModel};

/// When to stop generating, after validation.
#[derive(Debug, Clone)]
pub struct Stopping {
    pub max_new_tokens: u32,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    /// End-of-sequence ids that stop generation (empty when the request ignores EOS).
    pub eos: Vec<u32>,
    /// Set when the request turned the loop guard on.
    pub loop_guard: Option<LoopGuardConfig>,
    /// Drop repeated sentences from the streamed text.
    pub remove_repeated_sentences: bool,
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
    /// Set when the request asked for beam search.
    pub beam: Option<BeamConfig>,
    /// The request opted out of prefix caching on the workers.
    pub no_prefix_cache: bool,
    /// The LoRA adapter the request generates with.
    pub adapter: Option<Arc<AdapterEntry>>,
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

/// The model and LoRA adapter a request names: `adapter` of `model`, or as OpenAI clients
/// name one (vLLM's convention), `model: "base:adapter"` or the adapter's name alone when one
/// model has an adapter of that name. A served model's own name always wins.
pub fn find_model_and_adapter(
    models: &[Arc<ServedModel>],
    model: &str,
    adapter: &str,
) -> Result<(Arc<ServedModel>, Option<Arc<AdapterEntry>>), CoordinatorError> {
    if !adapter.is_empty() || model.is_empty() || models.iter().any(|m| m.name() == model) {
        let m = find_model(models, model)?;
        let a = (!adapter.is_empty()).then(|| m.adapters.find(adapter, m.name())).transpose()?;
        return Ok((m, a));
    }
    if let Some((base, adapter)) = model.rsplit_once(':') {
        let m = find_model(models, base)?;
        let a = m.adapters.find(adapter, m.name())?;
        return Ok((m, Some(a)));
    }
    let mut owners = models.iter().filter_map(|m| m.adapters.get(model).map(|a| (m.clone(), a)));
    match (owners.next(), owners.next()) {
        (Some((m, a)), None) => Ok((m, Some(a))),
        (Some(_), Some(_)) => Err(invalid(format!("adapter {model:?} belongs to several models; name it as \"base:{model}\""))),
        (None, _) => find_model(models, model).map(|m| (m, None)),
    }
}

fn names(models: &[Arc<ServedModel>]) -> String {
    models.iter().map(|m| format!("{:?}", m.name())).collect::<Vec<_>>().join(", ")
}

/// Checks every field of `req` against `limits` and the model, and tokenizes its input.
pub fn prepare(req: pb::GenerateRequest, models: &[Arc<ServedModel>], limits: &Limits) -> Result<Prepared, CoordinatorError> {
    let (model, adapter) = find_model_and_adapter(models, &req.model, &req.adapter)?;
    if model.kind == ModelKind::Encoder {
        return Err(invalid(format!("model {:?} is an encoder: it serves Embed, not Generate", model.name())));
    }
    if req.request_id.len() > limits.max_request_id_bytes {
        return Err(invalid(format!("request_id is {} bytes; the limit is {}", req.request_id.len(), limits.max_request_id_bytes)));
    }
    let mut params = req.sampling.unwrap_or_default();
    let seed_given = params.seed.is_some();
    let beam = beam_search(&params, req.stopping.as_ref())?;
    with_model_defaults(&mut params, &model.sampling_defaults, beam.is_some());
    let loop_guard = loop_guard(params.loop_guard)?;
    let remove_repeated_sentences = params.remove_repeated_sentences;
    let sampling = sampling(params, &model, limits)?;
    let prompt = prompt_tokens(req.input, &model, limits)?;
    let mut stopping = stopping(req.stopping.unwrap_or_default(), prompt.len(), &model, limits)?;
    stopping.loop_guard = loop_guard;
    stopping.remove_repeated_sentences = remove_repeated_sentences;
    let no_prefix_cache = req.no_prefix_cache;
    Ok(Prepared { model, request_id: req.request_id, prompt, sampling, seed_given, stopping, beam, no_prefix_cache, adapter })
}

/// Beam search settings, when asked for (`num_beams` ≥ 2). Beam search is deterministic and
/// streams only its result, so the sampling controls, alternatives, the loop guard and stop
/// strings, which act on a stream of sampled tokens, are refused beside it rather than ignored.
fn beam_search(params: &pb::SamplingParams, stopping: Option<&pb::StoppingCriteria>) -> Result<Option<BeamConfig>, CoordinatorError> {
    let Some(b) = params.beam_search.as_ref().filter(|b| b.num_beams >= 2) else { return Ok(None) };
    if b.num_beams > MAX_BEAMS {
        return Err(invalid(format!("beam_search.num_beams is {}; the limit is {MAX_BEAMS}", b.num_beams)));
    }
    let num_return = b.num_return_sequences.max(1);
    if num_return > b.num_beams {
        return Err(invalid(format!("beam_search.num_return_sequences is {num_return}; it must be at most num_beams ({})", b.num_beams)));
    }
    let length_penalty = b.length_penalty.unwrap_or(1.0);
    check("beam_search.length_penalty", length_penalty, true, "a finite number")?;
    let unused = [
        ("temperature", params.temperature.is_some_and(|t| t != 0.0)),
        ("top_k", params.top_k.is_some_and(|k| k != 0)),
        ("top_p", params.top_p.is_some_and(|p| p < 1.0)),
        ("min_p", params.min_p != 0.0),
        ("logprobs", params.logprobs != 0),
        ("loop_guard", params.loop_guard.is_some()),
        ("stop", stopping.is_some_and(|s| !s.stop.is_empty())),
    ];
    if let Some((field, _)) = unused.iter().find(|u| u.1) {
        return Err(invalid(format!(
            "{field} cannot be combined with beam_search: beam search is deterministic and streams only its result"
        )));
    }
    let early_stopping = match pb::EarlyStopping::try_from(b.early_stopping) {
        Ok(pb::EarlyStopping::Heuristic) => EarlyStopping::Heuristic,
        Ok(pb::EarlyStopping::First) => EarlyStopping::First,
        Ok(pb::EarlyStopping::Never) => EarlyStopping::Never,
        Err(_) => return Err(invalid(format!("beam_search.early_stopping {} is not a known value", b.early_stopping))),
    };
    Ok(Some(BeamConfig { num_beams: b.num_beams as usize, length_penalty, early_stopping, num_return: num_return as usize }))
}

/// Largest `no_repeat_ngram_size`: longer n-grams cost more to track than they could prevent.
const MAX_NGRAM: u32 = 64;
/// Largest DRY `allowed_length`.
const MAX_DRY_ALLOWED: u32 = 1024;
/// Most alternatives a token may carry (as OpenAI's API).
pub const MAX_LOGPROBS: u32 = 20;
/// Most tokens one request may bias, and the largest bias (OpenAI's limits).
pub const MAX_LOGIT_BIAS: usize = 300;
const MAX_BIAS: f32 = 100.0;

/// Fails with a message naming `field` unless `ok` holds for `value` (NaN never does).
fn check(field: &str, value: f32, ok: bool, range: &str) -> Result<(), CoordinatorError> {
    if ok && value.is_finite() {
        Ok(())
    } else {
        Err(invalid(format!("{field} must be {range}; got {value}")))
    }
}

/// Fills the fields `params` leaves unset from the model's `generation_config.json`, as vLLM
/// does. A beam search takes only the repetition penalty: its other fields are sampling controls
/// it refuses when asked for explicitly, and a model's recommendation is not a request.
fn with_model_defaults(params: &mut pb::SamplingParams, defaults: &SamplingDefaults, beam: bool) {
    params.repetition_penalty = params.repetition_penalty.or(defaults.repetition_penalty);
    if !beam {
        params.temperature = params.temperature.or(defaults.temperature);
        params.top_k = params.top_k.or(defaults.top_k);
        params.top_p = params.top_p.or(defaults.top_p);
    }
}

/// The ranges a request's temperature, top_p and repetition penalty must be in.
fn check_core(temperature: Option<f32>, top_p: Option<f32>, repetition_penalty: Option<f32>) -> Result<(), CoordinatorError> {
    if let Some(t) = temperature {
        check("temperature", t, t >= 0.0, "a finite number >= 0 (0 means greedy)")?;
    }
    if let Some(p) = top_p {
        check("top_p", p, p > 0.0 && p <= 1.0, "in (0, 1]")?;
    }
    if let Some(r) = repetition_penalty {
        check("repetition_penalty", r, r > 0.0, "a finite number > 0 (1 means off)")?;
    }
    Ok(())
}

/// A model's `generation_config.json` defaults must pass the checks a request's values pass,
/// so a bad file fails at start instead of failing every request that relies on it.
pub(crate) fn check_sampling_defaults(d: &SamplingDefaults) -> Result<(), CoordinatorError> {
    check_core(d.temperature, d.top_p, d.repetition_penalty)
}

fn sampling(s: pb::SamplingParams, model: &ServedModel, limits: &Limits) -> Result<Sampling, CoordinatorError> {
    check_core(s.temperature, s.top_p, s.repetition_penalty)?;
    check("min_p", s.min_p, (0.0..=1.0).contains(&s.min_p), "in [0, 1]")?;
    let repetition_penalty = s.repetition_penalty.unwrap_or(1.0);
    check("presence_penalty", s.presence_penalty, (-2.0..=2.0).contains(&s.presence_penalty), "in [-2, 2]")?;
    check("frequency_penalty", s.frequency_penalty, (-2.0..=2.0).contains(&s.frequency_penalty), "in [-2, 2]")?;
    if s.logprobs > MAX_LOGPROBS {
        return Err(invalid(format!("logprobs is {}; the limit is {MAX_LOGPROBS}", s.logprobs)));
    }
    if s.no_repeat_ngram_size > MAX_NGRAM {
        return Err(invalid(format!("no_repeat_ngram_size is {}; the limit is {MAX_NGRAM}", s.no_repeat_ngram_size)));
    }
    if s.logit_bias.len() > MAX_LOGIT_BIAS {
        return Err(invalid(format!("logit_bias has {} entries; the limit is {MAX_LOGIT_BIAS}", s.logit_bias.len())));
    }
    for b in &s.logit_bias {
        check("logit_bias", b.bias, (-MAX_BIAS..=MAX_BIAS).contains(&b.bias), "in [-100, 100]")?;
    }
    let biased: Vec<u32> = s.logit_bias.iter().map(|b| b.token).collect();
    check_ids(&biased, model, "logit_bias token")?;
    let dry = s.dry.unwrap_or_default();
    check("dry.multiplier", dry.multiplier, dry.multiplier >= 0.0, "a finite number >= 0 (0 means off)")?;
    let mut dry_breakers = Vec::new();
    if dry.multiplier > 0.0 {
        check("dry.base", dry.base, dry.base >= 1.0, "a finite number >= 1")?;
        if dry.allowed_length > MAX_DRY_ALLOWED {
            return Err(invalid(format!("dry.allowed_length is {}; the limit is {MAX_DRY_ALLOWED}", dry.allowed_length)));
        }
        if dry.sequence_breakers.len() > limits.max_dry_breakers {
            return Err(invalid(format!(
                "{} dry.sequence_breakers; the limit is {}",
                dry.sequence_breakers.len(),
                limits.max_dry_breakers
            )));
        }
        for breaker in &dry.sequence_breakers {
            if breaker.len() > limits.max_stop_bytes {
                return Err(invalid(format!(
                    "a dry.sequence_breakers entry is {} bytes; the limit is {}",
                    breaker.len(),
                    limits.max_stop_bytes
                )));
            }
            // A breaker is matched by token: every token of its encoding ends a repeat.
            dry_breakers.extend(encode(model, breaker, false)?);
        }
        dry_breakers.sort_unstable();
        dry_breakers.dedup();
    }
    Ok(Sampling {
        temperature: s.temperature.unwrap_or(0.0),
        top_k: s.top_k.unwrap_or(0),
        top_p: s.top_p,
        seed: s.seed.unwrap_or(0),
        min_p: s.min_p,
        repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        no_repeat_ngram_size: s.no_repeat_ngram_size,
        dry_multiplier: dry.multiplier,
        dry_base: dry.base,
        dry_allowed_length: dry.allowed_length,
        dry_penalty_last_n: dry.penalty_last_n,
        dry_breakers,
        top_logprobs: s.logprobs,
        // Set by the group loop for a beam search, from its width.
        beam_candidates: 0,
        // Set by the group loop when it recomputes a preempted sequence.
        resume: None,
        logit_bias: s.logit_bias.iter().map(|b| tessera_proto::worker::TokenBias { token: b.token, bias: b.bias }).collect(),
    })
}

fn loop_guard(guard: Option<pb::LoopGuard>) -> Result<Option<LoopGuardConfig>, CoordinatorError> {
    let Some(g) = guard else { return Ok(None) };
    if g.max_period == 0 || g.max_period > MAX_PERIOD {
        return Err(invalid(format!("loop_guard.max_period must be in 1..={MAX_PERIOD}; got {}", g.max_period)));
    }
    if g.min_repeats < 2 || g.min_repeats > MAX_REPEATS {
        return Err(invalid(format!("loop_guard.min_repeats must be in 2..={MAX_REPEATS}; got {}", g.min_repeats)));
    }
    let remedy = match pb::LoopAction::try_from(g.action) {
        Ok(pb::LoopAction::Unspecified | pb::LoopAction::Stop) => None,
        Ok(pb::LoopAction::RaiseTemperature) => {
            let temperature = if g.remedy_temperature == 0.0 { 1.0 } else { g.remedy_temperature };
            check("loop_guard.remedy_temperature", temperature, temperature > 0.0, "a finite number > 0 (0 means 1.0)")?;
            let tokens = if g.remedy_tokens == 0 { 32 } else { g.remedy_tokens };
            if tokens > MAX_REMEDY_TOKENS {
                return Err(invalid(format!("loop_guard.remedy_tokens is {tokens}; the limit is {MAX_REMEDY_TOKENS}")));
            }
            Some(Remedy { temperature, tokens })
        }
        Err(_) => return Err(invalid(format!("loop_guard.action {} is not a known action", g.action))),
    };
    Ok(Some(LoopGuardConfig { max_period: g.max_period as usize, min_repeats: g.min_repeats as usize, sentences: g.sentences, remedy }))
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
            let template = model
                .chat
                .as_ref()
                .ok_or_else(|| invalid(format!("model {:?} has no chat template; send prompt or tokens instead", model.name())))?;
            let messages: Vec<ChatMessage> = chat.messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect();
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
                return Err(invalid(format!("prompt is {} tokens; the model's context is {} tokens", tokens.ids.len(), model.max_context)));
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
        return Err(invalid(format!("{} stop token ids; the limit is {}", s.stop_token_ids.len(), limits.max_stop_token_ids)));
    }
    check_ids(&s.stop_token_ids, model, "stop token id")?;
    let eos = if s.ignore_eos { Vec::new() } else { model.eos.clone() };
    Ok(Stopping { max_new_tokens, stop: s.stop, stop_token_ids: s.stop_token_ids, eos, loop_guard: None, remove_repeated_sentences: false })
}
