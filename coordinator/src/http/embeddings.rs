//! `POST /v1/embeddings`: one `Embed` call on the core's own service, in process; vectors as
//! JSON floats or, with `encoding_format: "base64"` (what the OpenAI SDKs ask for by default),
//! as the base64 of little-endian f32s.

use base64::Engine as _;
use hyper::header::HeaderValue;
use serde::Serialize;
use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_server::Inference;

use super::error::ApiError;
use super::fields::{Fields, Input};
use super::HttpState;
use crate::request::find_model;

#[derive(Serialize)]
struct Response {
    object: &'static str,
    data: Vec<Embedding>,
    model: String,
    usage: Usage,
}

#[derive(Serialize)]
struct Embedding {
    object: &'static str,
    index: u32,
    embedding: Vector,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u32,
    total_tokens: u32,
}

/// The encoder request an embeddings body asks for, and how to write the vectors.
#[derive(Debug, PartialEq)]
struct EmbedCall {
    request: pb::EmbedRequest,
    base64: bool,
    dimensions: Option<u32>,
}

fn read(f: &Fields, max_inputs: usize) -> Result<EmbedCall, ApiError> {
    let model = f.get::<String>("model")?.unwrap_or_default();
    let mut request = pb::EmbedRequest { model, ..Default::default() };
    for input in f.inputs("input", max_inputs)? {
        match input {
            Input::Text(text) => request.texts.push(text),
            Input::Ids(ids) => request.token_ids.push(pb::TokenIds { ids }),
        }
    }
    let base64 = match f.get::<String>("encoding_format")?.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!("encoding_format: {other:?} is not \"float\" or \"base64\""), Some("encoding_format")))
        }
    };
    f.get::<String>("user")?;
    Ok(EmbedCall { request, base64, dimensions: f.get("dimensions")? })
}

/// Serves one embeddings request.
pub async fn embeddings(state: &HttpState, f: &Fields, authorization: Option<&HeaderValue>) -> Result<String, ApiError> {
    let call = read(f, state.limits.max_embed_inputs)?;
    let model = find_model(&state.cluster.models, &call.request.model).map_err(|e| ApiError::from(tonic::Status::from(e)))?;
    let request = super::with_authorization(call.request, authorization);
    let answer = state.service.embed(request).await?.into_inner();
    render(answer, model.name(), call.base64, call.dimensions)
}

fn render(answer: pb::EmbedResponse, model: &str, base64: bool, dimensions: Option<u32>) -> Result<String, ApiError> {
    if let (Some(asked), Some(first)) = (dimensions, answer.embeddings.first()) {
        if asked as usize != first.values.len() {
            return Err(ApiError::unsupported(
                "dimensions",
                &format!("this model's embeddings have {} dimensions and cannot be shortened", first.values.len()),
            ));
        }
    }
    let tokens: u32 = answer.embeddings.iter().map(|e| e.tokens).sum();
    let data = answer
        .embeddings
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = e.values.iter().flat_map(|v| v.to_le_bytes()).collect();
                Vector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Vector::Float(e.values)
            };
            Embedding { object: "embedding", index: i as u32, embedding }
        })
        .collect();
    let response =
        Response { object: "list", data, model: model.to_string(), usage: Usage { prompt_tokens: tokens, total_tokens: tokens } };
    serde_json::to_string(&response).map_err(|e| ApiError::internal(format!("cannot write the response: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(json: &str) -> Result<EmbedCall, ApiError> {
        read(&Fields::parse(json.as_bytes()).expect("object"), 4)
    }

    #[test]
    fn inputs_become_texts_or_token_ids() {
        let c = call(r#"{"model": "minilm", "input": ["a", "b"], "encoding_format": "base64"}"#).expect("valid");
        assert_eq!((c.request.texts.len(), c.request.token_ids.len(), c.base64), (2, 0, true));
        let c = call(r#"{"input": [[1, 2], [3]]}"#).expect("valid");
        assert_eq!(c.request.token_ids, vec![pb::TokenIds { ids: vec![1, 2] }, pb::TokenIds { ids: vec![3] }]);
        assert!(!c.base64);
        assert_eq!(call(r#"{"input": "a", "encoding_format": "int8"}"#).expect_err("format").param.as_deref(), Some("encoding_format"));
        assert_eq!(call(r#"{"input": ["a", "b", "c", "d", "e"]}"#).expect_err("too many").param.as_deref(), Some("input"));
    }

    #[test]
    fn base64_is_little_endian_f32() {
        let answer = pb::EmbedResponse { embeddings: vec![pb::Embedding { values: vec![1.0, -2.5], tokens: 3, truncated: false }] };
        let json: serde_json::Value = serde_json::from_str(&render(answer.clone(), "m", true, None).expect("render")).expect("json");
        let text = json["data"][0]["embedding"].as_str().expect("a string");
        let bytes = base64::engine::general_purpose::STANDARD.decode(text).expect("base64");
        let values: Vec<f32> = bytes.chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(values, [1.0, -2.5]);
        assert_eq!(json["usage"], serde_json::json!({"prompt_tokens": 3, "total_tokens": 3}));
        let json: serde_json::Value = serde_json::from_str(&render(answer.clone(), "m", false, Some(2)).expect("render")).expect("json");
        assert_eq!(json["data"][0], serde_json::json!({"object": "embedding", "index": 0, "embedding": [1.0, -2.5]}));
        assert_eq!(render(answer, "m", false, Some(8)).expect_err("dimensions").param.as_deref(), Some("dimensions"));
    }
}
