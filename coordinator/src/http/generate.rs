//! `POST /v1/completions` and `POST /v1/chat/completions`: each choice is one `Generate` call on
//! the core's own service, in process.
//!
//! Every choice is started before the response begins, so anything the core refuses —
//! validation, an unknown model, a full queue, no serving group — is the response's HTTP status
//! rather than an event in a 200 stream. Without `stream` the choices are collected whole (one
//! failing fails the request, and dropping the others cancels them); with it they stream as
//! server-sent events ([`sse`](super::sse)).

use futures_util::future::try_join_all;
use futures_util::StreamExt;
use hyper::header::HeaderValue;
use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_server::Inference;
use tonic::Status;

use super::error::ApiError;
use super::openai::{Endpoint, GenerateCall};
use super::response::{ChatChoice, CompletionChoice, Ending, Envelope, Head, Message, TokenText, Usage};
use super::sse::{self, ChoiceStream, Streamer};
use super::{HttpBody, HttpState};
use crate::request::find_model_and_adapter;

type CoreStream = crate::auth::MeteredStream;

/// Serves one completions or chat request.
pub async fn generate(state: &HttpState, call: GenerateCall, authorization: Option<&HeaderValue>) -> Result<Reply, ApiError> {
    // The core resolves the name again; this lookup is for the tokenizer and the reply's name.
    let (model, adapter) = find_model_and_adapter(&state.cluster.models, &call.model, "").map_err(|e| ApiError::from(Status::from(e)))?;
    let (prefix, object) = match call.endpoint {
        Endpoint::Completions => ("cmpl", "text_completion"),
        Endpoint::Chat => ("chatcmpl", if call.stream { "chat.completion.chunk" } else { "chat.completion" }),
    };
    let head = Head {
        id: format!("{prefix}-{}", super::ids::request_id()),
        object,
        created: super::ids::unix_seconds(),
        // An adapter's reply names it as asked ("base:adapter" or the adapter), as vLLM's does.
        model: if adapter.is_some() { call.model.clone() } else { model.name().to_string() },
        system_fingerprint: state.fingerprint(model.name()),
    };
    // OpenAI samples at temperature 1 unless told otherwise; a model's generation_config.json
    // recommendation, which the core applies, comes first (vLLM's rule).
    let default_temperature = model.sampling_defaults.temperature.is_none().then_some(1.0);
    let mut streams = Vec::new();
    for request in call.requests(&head.id, default_temperature) {
        let request = super::with_authorization(request, authorization);
        streams.push(state.service.generate(request).await?.into_inner());
    }
    let tokens = call.logprobs.is_some().then(|| TokenText::new(model.tokenizer.clone()));
    if call.stream {
        let mut streamer = Streamer::new(head, call.endpoint, streams.len(), call.n);
        streamer.include_usage = call.include_usage;
        streamer.logprobs = tokens;
        streamer.return_token_ids = call.return_token_ids;
        let choices: Vec<ChoiceStream> =
            streams.into_iter().enumerate().map(|(i, s)| s.map(move |event| (i as u32, event)).boxed()).collect();
        return Ok(Reply::Stream(sse::body(streamer, choices)));
    }
    let collected = try_join_all(streams.into_iter().map(collect)).await?;
    Ok(Reply::Json(whole(head, &call, &collected, tokens.as_ref())))
}

/// A response: one JSON document, or an event stream.
pub enum Reply {
    Json(String),
    Stream(HttpBody),
}

/// Everything one choice produced.
#[derive(Debug, Default)]
struct Collected {
    text: String,
    tokens: Vec<pb::Token>,
    finished: pb::Finished,
}

async fn collect(mut stream: CoreStream) -> Result<Collected, ApiError> {
    use pb::generate_response::Event;
    let mut out = Collected::default();
    while let Some(event) = stream.next().await {
        match event?.event {
            Some(Event::Chunk(chunk)) => {
                out.text.push_str(&chunk.text);
                out.tokens.extend(chunk.tokens);
            }
            Some(Event::Finished(finished)) => {
                out.finished = finished;
                return Ok(out);
            }
            Some(Event::Started(_) | Event::Progress(_)) | None => {}
        }
    }
    Err(ApiError::internal("the generation ended without finishing"))
}

/// The whole response: choices in order, usage counting each prompt once.
fn whole(head: Head, call: &GenerateCall, collected: &[Collected], tokens: Option<&TokenText>) -> String {
    let usage_of = |c: &Collected| c.finished.usage.unwrap_or_default();
    let prompt: u32 = collected.iter().step_by(call.n as usize).map(|c| usage_of(c).prompt_tokens).sum();
    let completion: u32 = collected.iter().map(|c| usage_of(c).completion_tokens).sum();
    let usage = Some(Some(Usage::new(prompt, completion)));
    let ids = |c: &Collected| call.return_token_ids.then(|| c.tokens.iter().map(|t| t.id).collect());
    let json = match call.endpoint {
        Endpoint::Completions => {
            let choices = collected
                .iter()
                .enumerate()
                .map(|(i, c)| CompletionChoice {
                    index: i as u32,
                    text: c.text.clone(),
                    logprobs: tokens.map(|t| t.completion(&c.tokens, 0).0),
                    ending: Ending::of(&c.finished),
                    token_ids: ids(c),
                })
                .collect();
            serde_json::to_string(&Envelope { head, choices, usage })
        }
        Endpoint::Chat => {
            let choices = collected
                .iter()
                .enumerate()
                .map(|(i, c)| ChatChoice {
                    index: i as u32,
                    message: Some(Message { role: "assistant", content: c.text.clone() }),
                    delta: None,
                    logprobs: tokens.map(|t| t.chat(&c.tokens)),
                    ending: Ending::of(&c.finished),
                    token_ids: ids(c),
                })
                .collect();
            serde_json::to_string(&Envelope { head, choices, usage })
        }
    };
    json.unwrap_or_default()
}
