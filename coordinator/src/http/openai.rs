//! OpenAI's `/v1/completions` and `/v1/chat/completions` request bodies, read into the
//! `tessera.v1` requests the core serves.
//!
//! Only the shapes are checked here (types, OpenAI-only fields such as `n` or `echo`, the
//! keys of `logit_bias`); every range the gRPC API also has (temperature, top_p, penalties, stop strings,
//! `max_tokens`, logprobs, context length) is left to the core's one validation, so both front
//! doors refuse the same requests with the same messages. Besides OpenAI's fields this accepts,
//! as vLLM does, `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`, and
//! Tessera's `no_repeat_ngram_size`, DRY (`dry_multiplier`, `dry_base`, `dry_allowed_length`,
//! `dry_penalty_last_n`, `dry_sequence_breakers`, llama.cpp's names), `loop_guard`,
//! `remove_repeated_sentences`, `return_token_ids`, `long_input` and `no_prefix_cache` (the
//! request neither reuses nor leaves cached prompt blocks, as the gRPC field).

use serde::Deserialize;
use serde_json::Value;
use tessera_proto::v1 as pb;

use super::error::ApiError;
use super::fields::{Fields, Input};

/// Most completions one request may ask for per prompt (`n`).
pub const MAX_N: u32 = 16;
/// Most prompts in one `/v1/completions` request.
pub const MAX_PROMPTS: usize = 64;
/// Most completions one request may ask for in all (prompts × `n`).
pub const MAX_CHOICES: usize = 64;
/// `max_tokens` of a completion that does not set it: OpenAI's default for `/v1/completions`.
const DEFAULT_COMPLETION_TOKENS: u32 = 16;

/// Which endpoint a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// A completions or chat request, read and shape-checked.
#[derive(Debug, Clone)]
pub struct GenerateCall {
    pub endpoint: Endpoint,
    /// As sent; empty means the only served model.
    pub model: String,
    /// One per prompt (a chat has one).
    pub inputs: Vec<pb::generate_request::Input>,
    pub n: u32,
    pub seed: Option<u64>,
    /// Everything but the seed, which differs per choice.
    pub sampling: pb::SamplingParams,
    pub stopping: pb::StoppingCriteria,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk carries the usage.
    pub include_usage: bool,
    /// Set when the client asked for log-probabilities: how many alternatives per token.
    pub logprobs: Option<u32>,
    /// Add the generated token ids (and the prompt's) to each choice.
    pub return_token_ids: bool,
    /// Tessera's extra field `long_input` (the prompt is a document longer than the context).
    pub long_input: Option<pb::LongInput>,
    /// Tessera's extra field `no_prefix_cache`: the request opts out of prefix caching.
    pub no_prefix_cache: bool,
}

impl GenerateCall {
    /// A `/v1/completions` body.
    pub fn completions(f: &Fields) -> Result<Self, ApiError> {
        let inputs = f
            .inputs("prompt", MAX_PROMPTS)?
            .into_iter()
            .map(|input| match input {
                Input::Text(text) => pb::generate_request::Input::Prompt(text),
                Input::Ids(ids) => pb::generate_request::Input::Tokens(pb::TokenIds { ids }),
            })
            .collect();
        if f.get::<bool>("echo")?.unwrap_or(false) {
            return Err(ApiError::unsupported("echo", "returning the prompt with the completion is not supported"));
        }
        if f.get::<String>("suffix")?.is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::unsupported("suffix", "insertion (a suffix after the completion) is not supported"));
        }
        let max_tokens = max_tokens(f, "max_tokens")?.unwrap_or(DEFAULT_COMPLETION_TOKENS);
        let logprobs = f.get::<u32>("logprobs")?;
        Self::common(f, Endpoint::Completions, inputs, max_tokens, logprobs)
    }

    /// A `/v1/chat/completions` body.
    pub fn chat(f: &Fields) -> Result<Self, ApiError> {
        let messages = messages(f)?;
        let inputs = vec![pb::generate_request::Input::Chat(pb::ChatInput { messages })];
        // Without a limit a chat may fill the model's context (0: the server's default).
        let max_tokens = match max_tokens(f, "max_completion_tokens")? {
            Some(n) => n,
            None => max_tokens(f, "max_tokens")?.unwrap_or(0),
        };
        let top = f.get::<u32>("top_logprobs")?;
        let logprobs = match (f.get::<bool>("logprobs")?.unwrap_or(false), top) {
            (true, top) => Some(top.unwrap_or(0)),
            (false, Some(k)) if k > 0 => {
                return Err(ApiError::invalid("top_logprobs needs logprobs set to true", Some("top_logprobs")));
            }
            (false, _) => None,
        };
        if let Some(format) = f.raw("response_format") {
            if format.get("type").and_then(Value::as_str) != Some("text") {
                return Err(ApiError::unsupported("response_format", "only {\"type\": \"text\"} is supported"));
            }
        }
        if f.get::<Vec<Value>>("tools")?.is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::unsupported("tools", "tool calling is not supported"));
        }
        Self::common(f, Endpoint::Chat, inputs, max_tokens, logprobs)
    }

    /// The fields both endpoints share.
    fn common(
        f: &Fields,
        endpoint: Endpoint,
        inputs: Vec<pb::generate_request::Input>,
        max_new_tokens: u32,
        logprobs: Option<u32>,
    ) -> Result<Self, ApiError> {
        let model = f.get::<String>("model")?.unwrap_or_default();
        let n = f.get::<u32>("n")?.unwrap_or(1);
        if n == 0 || n > MAX_N {
            return Err(ApiError::invalid(format!("n must be in 1..={MAX_N}; got {n}"), Some("n")));
        }
        if inputs.len() * n as usize > MAX_CHOICES {
            return Err(ApiError::invalid(
                format!(
                    "{} prompts times n = {n} ask for {} completions; the limit is {MAX_CHOICES}",
                    inputs.len(),
                    inputs.len() * n as usize
                ),
                Some("n"),
            ));
        }
        if let Some(best_of) = f.get::<u32>("best_of")? {
            if best_of != n {
                return Err(ApiError::unsupported("best_of", "only best_of equal to n is supported"));
            }
        }
        let logit_bias = logit_bias(f.get::<serde_json::Map<String, Value>>("logit_bias")?)?;
        // Type-checked although unused: OpenAI's abuse-tracking id.
        f.get::<String>("user")?;
        let stream = f.get::<bool>("stream")?.unwrap_or(false);
        let include_usage = match f.get::<StreamOptions>("stream_options")? {
            Some(_) if !stream => return Err(ApiError::invalid("stream_options needs stream set to true", Some("stream_options"))),
            Some(o) => o.include_usage.unwrap_or(false),
            None => false,
        };
        let sampling = pb::SamplingParams {
            temperature: f.get("temperature")?,
            top_k: f.top_k()?,
            top_p: f.get("top_p")?,
            seed: None,
            min_p: f.get("min_p")?.unwrap_or(0.0),
            repetition_penalty: f.get("repetition_penalty")?,
            presence_penalty: f.get("presence_penalty")?.unwrap_or(0.0),
            frequency_penalty: f.get("frequency_penalty")?.unwrap_or(0.0),
            no_repeat_ngram_size: f.get("no_repeat_ngram_size")?.unwrap_or(0),
            dry: dry(f)?,
            loop_guard: loop_guard(f)?,
            logprobs: logprobs.unwrap_or(0),
            beam_search: None,
            remove_repeated_sentences: f.get("remove_repeated_sentences")?.unwrap_or(false),
            logit_bias,
        };
        let stopping = pb::StoppingCriteria {
            max_new_tokens,
            stop: f.stop()?,
            stop_token_ids: f.get("stop_token_ids")?.unwrap_or_default(),
            ignore_eos: f.get("ignore_eos")?.unwrap_or(false),
        };
        Ok(Self {
            endpoint,
            model,
            inputs,
            n,
            seed: f.seed()?,
            sampling,
            stopping,
            stream,
            include_usage,
            logprobs,
            return_token_ids: f.get("return_token_ids")?.unwrap_or(false),
            long_input: long_input(f)?,
            no_prefix_cache: f.get("no_prefix_cache")?.unwrap_or(false),
        })
    }

    /// The `Generate` requests, `n` per input in choice order (choice `i` of input `p` is
    /// `p * n + i`). A seeded request gives choice `i` the seed `seed + i`, so each choice is
    /// reproducible alone. `default_temperature` fills an unset temperature (OpenAI samples at 1
    /// unless the model recommends otherwise; the core then applies the model's own default).
    pub fn requests(&self, request_id: &str, default_temperature: Option<f32>) -> Vec<pb::GenerateRequest> {
        let mut sampling = self.sampling.clone();
        sampling.temperature = sampling.temperature.or(default_temperature);
        let mut out = Vec::with_capacity(self.inputs.len() * self.n as usize);
        for input in &self.inputs {
            for i in 0..self.n {
                let index = out.len();
                out.push(pb::GenerateRequest {
                    model: self.model.clone(),
                    input: Some(input.clone()),
                    sampling: Some(pb::SamplingParams { seed: self.seed.map(|s| s.wrapping_add(u64::from(i))), ..sampling.clone() }),
                    stopping: Some(self.stopping.clone()),
                    request_id: format!("{request_id}-{index}"),
                    no_prefix_cache: self.no_prefix_cache,
                    // `model: "base:adapter"` names an adapter (`request::find_model`).
                    adapter: String::new(),
                    long_input: self.long_input.clone(),
                });
            }
        }
        out
    }
}

/// `long_input`: `{"strategy": "map_reduce" | "refine", "chunk_tokens", "overlap_tokens",
/// "instruction"}`, the gRPC `LongInput` (the core checks the values).
fn long_input(f: &Fields) -> Result<Option<pb::LongInput>, ApiError> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct LongInput {
        strategy: Option<String>,
        chunk_tokens: u32,
        overlap_tokens: Option<u32>,
        instruction: String,
    }
    let Some(l) = f.get::<LongInput>("long_input")? else { return Ok(None) };
    let strategy = match l.strategy.as_deref() {
        None | Some("map_reduce") => pb::long_input::Strategy::MapReduce,
        Some("refine") => pb::long_input::Strategy::Refine,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("long_input.strategy must be \"map_reduce\" or \"refine\"; got {other:?}"),
                Some("long_input"),
            ))
        }
    };
    Ok(Some(pb::LongInput {
        strategy: strategy as i32,
        chunk_tokens: l.chunk_tokens,
        overlap_tokens: l.overlap_tokens.unwrap_or(0),
        instruction: l.instruction,
    }))
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// `max_tokens` / `max_completion_tokens`: at least 1 when given.
fn max_tokens(f: &Fields, name: &str) -> Result<Option<u32>, ApiError> {
    match f.get::<u32>(name)? {
        Some(0) => Err(ApiError::invalid(format!("{name} must be at least 1"), Some(name))),
        other => Ok(other),
    }
}

/// OpenAI's roles; `developer` is the newer name of `system`, which chat templates know.
const ROLES: [&str; 6] = ["system", "developer", "user", "assistant", "tool", "function"];

/// `messages`: roles and contents, a content being a string or a list of text parts.
fn messages(f: &Fields) -> Result<Vec<pb::ChatMessage>, ApiError> {
    let list = f.get::<Vec<Value>>("messages")?.ok_or_else(|| ApiError::invalid("messages is required", Some("messages")))?;
    if list.is_empty() {
        return Err(ApiError::invalid("messages must not be empty", Some("messages")));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let param = |field: &str| format!("messages[{i}].{field}");
            let bad = |field: &str, what: &str| ApiError::invalid(format!("{}: {what}", param(field)), Some(&param(field)));
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| bad("role", "expected a string"))?;
            if !ROLES.contains(&role) {
                return Err(bad("role", &format!("{role:?} is not one of {}", ROLES.join(", "))));
            }
            let content = match m.get("content") {
                None | Some(Value::Null) if role == "assistant" => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let texts = parts.iter().enumerate().map(|(j, part)| match part.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            part.get("text").and_then(Value::as_str).ok_or_else(|| bad(&format!("content[{j}].text"), "expected a string"))
                        }
                        other => Err(ApiError::unsupported(
                            &param(&format!("content[{j}].type")),
                            &format!("{other:?}: only text parts are supported"),
                        )),
                    });
                    texts.collect::<Result<Vec<_>, _>>()?.join("\n")
                }
                _ => return Err(bad("content", "expected a string or a list of text parts")),
            };
            let role = if role == "developer" { "system" } else { role };
            Ok(pb::ChatMessage { role: role.to_string(), content })
        })
        .collect()
}

/// llama.cpp's DRY fields; off unless `dry_multiplier` is above 0. Unset parts take llama.cpp's
/// defaults.
fn dry(f: &Fields) -> Result<Option<pb::Dry>, ApiError> {
    let multiplier = f.get::<f32>("dry_multiplier")?.unwrap_or(0.0);
    if multiplier == 0.0 {
        return Ok(None);
    }
    Ok(Some(pb::Dry {
        multiplier,
        base: f.get("dry_base")?.unwrap_or(1.75),
        allowed_length: f.get("dry_allowed_length")?.unwrap_or(2),
        penalty_last_n: f.get("dry_penalty_last_n")?.unwrap_or(0),
        sequence_breakers: f
            .get("dry_sequence_breakers")?
            .unwrap_or_else(|| ["\n", ":", "\"", "*"].iter().map(|s| s.to_string()).collect()),
    }))
}

#[derive(Deserialize)]
struct LoopGuardArg {
    max_period: Option<u32>,
    min_repeats: Option<u32>,
    sentences: Option<bool>,
    action: Option<String>,
    remedy_temperature: Option<f32>,
    remedy_tokens: Option<u32>,
}

/// `loop_guard`: `true` for `tessera generate --loop-guard`'s settings, or an object with the
/// gRPC `LoopGuard` fields (`action`: `"stop"` or `"raise_temperature"`).
fn loop_guard(f: &Fields) -> Result<Option<pb::LoopGuard>, ApiError> {
    let arg = match f.raw("loop_guard") {
        None | Some(Value::Bool(false)) => return Ok(None),
        Some(Value::Bool(true)) => LoopGuardArg {
            max_period: None,
            min_repeats: None,
            sentences: None,
            action: None,
            remedy_temperature: None,
            remedy_tokens: None,
        },
        Some(_) => f.get::<LoopGuardArg>("loop_guard")?.ok_or_else(|| ApiError::internal("loop_guard vanished"))?,
    };
    let action = match arg.action.as_deref() {
        None | Some("stop") => pb::LoopAction::Stop,
        Some("raise_temperature") => pb::LoopAction::RaiseTemperature,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("loop_guard.action: {other:?} is not \"stop\" or \"raise_temperature\""),
                Some("loop_guard.action"),
            ))
        }
    };
    Ok(Some(pb::LoopGuard {
        max_period: arg.max_period.unwrap_or(32),
        min_repeats: arg.min_repeats.unwrap_or(3),
        sentences: arg.sentences.unwrap_or(true),
        action: action as i32,
        remedy_temperature: arg.remedy_temperature.unwrap_or(0.0),
        remedy_tokens: arg.remedy_tokens.unwrap_or(0),
    }))
}

/// OpenAI's `logit_bias`: token ids (as strings) to biases. Shapes only: the core checks the
/// count, the range and the vocabulary.
fn logit_bias(map: Option<serde_json::Map<String, Value>>) -> Result<Vec<pb::TokenBias>, ApiError> {
    let shape = || ApiError::invalid("logit_bias maps token ids (as strings) to numbers", Some("logit_bias"));
    let mut out = Vec::new();
    for (token, bias) in map.unwrap_or_default() {
        let token = token.parse::<u32>().map_err(|_| shape())?;
        let bias = bias.as_f64().ok_or_else(shape)? as f32;
        out.push(pb::TokenBias { token, bias });
    }
    // A JSON object has no order; the worker adds them in any, but keep requests comparable.
    out.sort_by_key(|b| b.token);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completions(json: &str) -> Result<GenerateCall, ApiError> {
        GenerateCall::completions(&Fields::parse(json.as_bytes()).expect("object"))
    }

    fn chat(json: &str) -> Result<GenerateCall, ApiError> {
        GenerateCall::chat(&Fields::parse(json.as_bytes()).expect("object"))
    }

    #[test]
    fn a_completion_maps_every_sampling_field() {
        let call = completions(
            r#"{"model": "m", "prompt": "Hi", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 3,
                "presence_penalty": 0.1, "frequency_penalty": -0.2, "stop": ["x"], "logprobs": 2, "user": "u",
                "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "no_repeat_ngram_size": 3, "ignore_eos": true,
                "stop_token_ids": [7], "dry_multiplier": 0.8, "loop_guard": {"max_period": 8, "action": "raise_temperature"},
                "some_future_field": {"ignored": true}}"#,
        )
        .expect("valid");
        let reqs = call.requests("cmpl-1", Some(1.0));
        assert_eq!(reqs.len(), 1);
        let r = &reqs[0];
        assert_eq!((r.model.as_str(), r.request_id.as_str()), ("m", "cmpl-1-0"));
        assert_eq!(r.input, Some(pb::generate_request::Input::Prompt("Hi".into())));
        let s = r.sampling.clone().expect("sampling");
        assert_eq!((s.temperature, s.top_p, s.seed, s.top_k, s.logprobs), (Some(0.5), Some(0.9), Some(3), Some(40), 2));
        assert_eq!((s.min_p, s.repetition_penalty, s.presence_penalty, s.frequency_penalty), (0.05, Some(1.1), 0.1, -0.2));
        assert_eq!(s.no_repeat_ngram_size, 3);
        let dry = s.dry.expect("dry");
        assert_eq!((dry.multiplier, dry.base, dry.allowed_length, dry.sequence_breakers.len()), (0.8, 1.75, 2, 4));
        let guard = s.loop_guard.expect("loop guard");
        assert_eq!((guard.max_period, guard.min_repeats, guard.action), (8, 3, pb::LoopAction::RaiseTemperature as i32));
        let stop = r.stopping.clone().expect("stopping");
        assert_eq!((stop.max_new_tokens, stop.stop, stop.stop_token_ids, stop.ignore_eos), (5, vec!["x".to_string()], vec![7], true));
        assert_eq!(call.logprobs, Some(2));
    }

    #[test]
    fn n_and_prompt_lists_fan_out_with_consecutive_seeds() {
        let call = completions(r#"{"prompt": ["a", "b"], "n": 2, "seed": 10}"#).expect("valid");
        let reqs = call.requests("cmpl-x", None);
        let seeds: Vec<_> = reqs.iter().map(|r| r.sampling.as_ref().and_then(|s| s.seed)).collect();
        assert_eq!(seeds, [Some(10), Some(11), Some(10), Some(11)]);
        let prompts: Vec<_> = reqs.iter().map(|r| r.input.clone()).collect();
        let text = |t: &str| Some(pb::generate_request::Input::Prompt(t.into()));
        assert_eq!(prompts, [text("a"), text("a"), text("b"), text("b")]);
        assert_eq!(reqs[3].request_id, "cmpl-x-3");
        // Unseeded choices are left to the core, which seeds each request afresh.
        let unseeded = completions(r#"{"prompt": "a", "n": 2}"#).expect("valid").requests("c", None);
        assert!(unseeded.iter().all(|r| r.sampling.as_ref().is_some_and(|s| s.seed.is_none())));
    }

    #[test]
    fn no_prefix_cache_reaches_every_request_and_is_off_unless_asked() {
        let call = completions(r#"{"prompt": ["a", "b"], "n": 2, "no_prefix_cache": true}"#).expect("valid");
        let reqs = call.requests("cmpl-x", None);
        assert_eq!(reqs.len(), 4);
        assert!(reqs.iter().all(|r| r.no_prefix_cache));
        let call = chat(r#"{"messages": [{"role": "user", "content": "Hi"}]}"#).expect("valid");
        assert!(call.requests("chat-x", None).iter().all(|r| !r.no_prefix_cache));
        let bad = completions(r#"{"prompt": "a", "no_prefix_cache": "yes"}"#).err().map(|e| format!("{e:?}")).unwrap_or_default();
        assert!(bad.contains("no_prefix_cache"), "{bad}");
    }

    #[test]
    fn defaults_follow_openai() {
        let call = completions(r#"{"prompt": "a"}"#).expect("valid");
        assert_eq!(call.stopping.max_new_tokens, 16, "OpenAI's default for completions");
        assert_eq!(call.requests("c", Some(1.0))[0].sampling.as_ref().and_then(|s| s.temperature), Some(1.0));
        let set = completions(r#"{"prompt": "a", "temperature": 0}"#).expect("valid");
        assert_eq!(set.requests("c", Some(1.0))[0].sampling.as_ref().and_then(|s| s.temperature), Some(0.0));
        let c = chat(r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9, "max_completion_tokens": 7}"#).expect("chat");
        assert_eq!(c.stopping.max_new_tokens, 7, "max_completion_tokens wins");
        let c = chat(r#"{"messages": [{"role": "user", "content": "hi"}]}"#).expect("chat");
        assert_eq!(c.stopping.max_new_tokens, 0, "the server's default");
    }

    #[test]
    fn chat_messages_take_strings_and_text_parts() {
        let c = chat(
            r#"{"messages": [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": null}], "logprobs": true, "top_logprobs": 3}"#,
        )
        .expect("chat");
        let pb::generate_request::Input::Chat(chat) = &c.inputs[0] else { panic!("a chat input") };
        let pairs: Vec<_> = chat.messages.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
        assert_eq!(pairs, [("system", "Be brief."), ("user", "a\nb"), ("assistant", "")]);
        assert_eq!(c.logprobs, Some(3));
        assert_eq!(
            chat_err(r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}"#),
            "messages[0].content[0].type"
        );
        assert_eq!(chat_err(r#"{"messages": [{"role": "robot", "content": "x"}]}"#), "messages[0].role");
        assert_eq!(chat_err(r#"{"messages": [{"role": "user", "content": 5}]}"#), "messages[0].content");
        assert_eq!(chat_err(r#"{"messages": []}"#), "messages");
        assert_eq!(chat_err(r#"{}"#), "messages");
        assert_eq!(chat_err(r#"{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}"#), "top_logprobs");
        assert_eq!(
            chat_err(r#"{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}"#),
            "response_format"
        );
    }

    fn chat_err(json: &str) -> String {
        chat(json).expect_err(json).param.unwrap_or_default()
    }

    fn completion_err(json: &str) -> (u16, String) {
        let e = completions(json).expect_err(json);
        (e.status.as_u16(), e.param.unwrap_or_default())
    }

    #[test]
    fn wrong_types_and_unsupported_fields_are_400_naming_the_field() {
        for (json, param) in [
            (r#"{"prompt": "a", "temperature": "hot"}"#, "temperature"),
            (r#"{"prompt": "a", "max_tokens": -3}"#, "max_tokens"),
            (r#"{"prompt": "a", "max_tokens": 0}"#, "max_tokens"),
            (r#"{"prompt": "a", "n": 0}"#, "n"),
            (r#"{"prompt": "a", "n": 17}"#, "n"),
            (r#"{"prompt": "a", "stream": "yes"}"#, "stream"),
            (r#"{"prompt": "a", "stream_options": {"include_usage": true}}"#, "stream_options"),
            (r#"{"prompt": "a", "logit_bias": {"x": -100}}"#, "logit_bias"),
            (r#"{"prompt": "a", "logit_bias": {"5": "high"}}"#, "logit_bias"),
            (r#"{"prompt": "a", "echo": true}"#, "echo"),
            (r#"{"prompt": "a", "best_of": 3}"#, "best_of"),
            (r#"{"prompt": "a", "stop_token_ids": ["x"]}"#, "stop_token_ids"),
            (r#"{"prompt": "a", "loop_guard": {"action": "explode"}}"#, "loop_guard.action"),
            (r#"{"prompt": "a", "user": 5}"#, "user"),
            (r#"{"prompt": ["a", "b", "c", "d", "e", "f", "g", "h", "i"], "n": 8}"#, "n"),
        ] {
            assert_eq!(completion_err(json), (400, param.to_string()), "{json}");
        }
        // Empty logit_bias and best_of == n are what OpenAI's defaults send.
        assert!(completions(r#"{"prompt": "a", "logit_bias": {}, "best_of": 1, "echo": false}"#).is_ok());
    }

    #[test]
    fn logit_bias_maps_token_ids_to_biases() {
        let c = completions(r#"{"prompt": "a", "logit_bias": {"50": -100, "7": 5.5}}"#).expect("valid");
        let biases: Vec<(u32, f32)> = c.sampling.logit_bias.iter().map(|b| (b.token, b.bias)).collect();
        assert_eq!(biases, [(7, 5.5), (50, -100.0)]);
    }

    #[test]
    fn streaming_options() {
        let c = completions(r#"{"prompt": "a", "stream": true, "stream_options": {"include_usage": true}}"#).expect("valid");
        assert!(c.stream && c.include_usage);
        let c = completions(r#"{"prompt": "a", "stream": true}"#).expect("valid");
        assert!(c.stream && !c.include_usage);
    }

    /// Seeded mutation fuzzing of the OpenAI request bodies (see `tessera_mutate`): JSON
    /// parsing, every field's conversion and the fan-out into `Generate` calls end in a call or
    /// a 400, never a panic, for 100,000 mutated bodies of each endpoint.
    #[test]
    fn hostile_request_bodies_become_calls_or_400s() {
        use tessera_mutate::Campaign;
        let completions = [
            r#"{"model":"m","prompt":"Once upon a time","max_tokens":16,"temperature":0.7,"top_p":0.9,"top_k":40,"n":2,"seed":5,"stop":["\n","END"],"logit_bias":{"5":-100,"17":3.5},"presence_penalty":0.5,"frequency_penalty":0.2,"stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"prompt":[[1,2,3],[4,5]],"max_tokens":4,"min_p":0.1,"repetition_penalty":1.2,"no_repeat_ngram_size":3,"dry_multiplier":0.8,"dry_base":1.75,"dry_allowed_length":2,"dry_sequence_breakers":["\n"],"loop_guard":{"window":64,"min_repeats":3}}"#,
        ];
        let chat = [
            r#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi"},{"type":"text","text":" there"}]}],"max_completion_tokens":8,"temperature":0,"seed":1,"n":1}"#,
        ];
        let body = |bytes: &[u8]| Fields::parse(bytes).ok();
        let fan_out = |call: Result<GenerateCall, ApiError>| call.map(|c| c.requests("req-1", Some(0.7)).len()).is_ok();
        let corpus: Vec<Vec<u8>> = completions.iter().map(|b| b.as_bytes().to_vec()).collect();
        let accepted =
            Campaign::new("completions body").run(&corpus, |bytes| body(bytes).is_some_and(|f| fan_out(GenerateCall::completions(&f))));
        assert!(accepted > 1000, "mutated completion bodies still convert ({accepted})");
        let corpus: Vec<Vec<u8>> = chat.iter().map(|b| b.as_bytes().to_vec()).collect();
        let accepted = Campaign::new("chat body").run(&corpus, |bytes| body(bytes).is_some_and(|f| fan_out(GenerateCall::chat(&f))));
        assert!(accepted > 1000, "mutated chat bodies still convert ({accepted})");
    }
}
