//! OpenAI's error object (`{"error": {"message", "type", "param", "code"}}`) and the one mapping
//! from the core's gRPC status codes to HTTP statuses.
//!
//! The core reports every failure as a `tonic::Status` (through `CoordinatorError`'s own single
//! mapping); this module only translates it, so a request refused over gRPC is refused over HTTP
//! with the same message. What only HTTP can get wrong (a body that is not JSON, a field of the
//! wrong type, a size over the body limit) is built here with the field named in `param`.

use hyper::StatusCode;
use serde::Serialize;
use tonic::Code;

/// One failed HTTP request, as OpenAI reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `error.type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A machine-readable reason (`model_not_found`, `queue_full`, ...), when there is one.
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// A 400 about the request: `param` names the field when the fault is in one.
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
        }
    }

    /// A 400 for a field whose value is of the right type but not supported here.
    pub fn unsupported(param: &str, what: &str) -> Self {
        Self { code: Some("unsupported_parameter"), ..Self::invalid(format!("{param}: {what}"), Some(param)) }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self { status: StatusCode::NOT_FOUND, code: Some("not_found"), ..Self::invalid(message, None) }
    }

    pub fn body_too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: Some("body_too_large"),
            ..Self::invalid(format!("the request body is larger than the limit of {limit} bytes"), None)
        }
    }

    pub fn method_not_allowed(allowed: &str) -> Self {
        Self { status: StatusCode::METHOD_NOT_ALLOWED, ..Self::invalid(format!("use {allowed}"), None) }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into(), kind: "server_error", param: None, code: None }
    }

    /// The HTTP form of a status the core returned.
    pub fn from_status(status: &tonic::Status) -> Self {
        let (http, kind, code) = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => (StatusCode::BAD_REQUEST, "invalid_request_error", None),
            // The core's only NOT_FOUND is an unknown model.
            Code::NotFound => (StatusCode::NOT_FOUND, "invalid_request_error", Some("model_not_found")),
            // An API key over one of its limits, or a full queue.
            Code::ResourceExhausted if status.message().starts_with("API key") => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("rate_limit_exceeded"))
            }
            Code::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", Some("queue_full")),
            Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("no_capacity")),
            // A model its workers could not load serves nothing until the operator fixes it.
            Code::FailedPrecondition => (StatusCode::SERVICE_UNAVAILABLE, "server_error", Some("model_failed")),
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "timeout", Some("deadline_exceeded")),
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "authentication_error", Some("invalid_api_key")),
            Code::PermissionDenied => (StatusCode::FORBIDDEN, "permission_error", None),
            Code::Unimplemented => (StatusCode::NOT_IMPLEMENTED, "invalid_request_error", None),
            Code::AlreadyExists | Code::Aborted => (StatusCode::CONFLICT, "invalid_request_error", None),
            // nginx's "client closed request": only ever seen by a client that already left.
            Code::Cancelled => (StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST), "cancelled", None),
            Code::Ok | Code::Unknown | Code::Internal | Code::DataLoss => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
        };
        let param = if http == StatusCode::BAD_REQUEST { param_of(status.message()) } else { None };
        Self { status: http, message: status.message().to_string(), kind, param: param.map(str::to_string), code }
    }

    /// `{"error": {...}}`, the body of an error response and of an error event mid-stream.
    pub fn to_json(&self) -> String {
        let body = Body { error: Inner { message: &self.message, kind: self.kind, param: self.param.as_deref(), code: self.code } };
        serde_json::to_string(&body).unwrap_or_else(|_| r#"{"error":{"message":"error","type":"server_error"}}"#.into())
    }
}

/// The OpenAI field a core message is about: the core names the `tessera.v1` field first
/// ("temperature must be ...", "max_new_tokens is ...", "3 stop strings; ...").
fn param_of(message: &str) -> Option<&'static str> {
    const FIELDS: [(&str, &str); 16] = [
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("top_k", "top_k"),
        ("min_p", "min_p"),
        ("presence_penalty", "presence_penalty"),
        ("frequency_penalty", "frequency_penalty"),
        ("repetition_penalty", "repetition_penalty"),
        ("no_repeat_ngram_size", "no_repeat_ngram_size"),
        ("logprobs", "logprobs"),
        ("max_new_tokens", "max_tokens"),
        ("dry.", "dry_multiplier"),
        ("loop_guard", "loop_guard"),
        ("a stop string", "stop"),
        ("stop token id", "stop_token_ids"),
        ("chat", "messages"),
        ("prompt", "prompt"),
    ];
    let first = message.split([' ', ';', ':']).next().unwrap_or_default();
    FIELDS
        .iter()
        .find(|(core, _)| first == *core || (core.ends_with('.') && first.starts_with(core)) || message.starts_with(core))
        .map(|(_, openai)| *openai)
        .or_else(|| message.contains(" stop strings;").then_some("stop"))
        .or_else(|| message.contains(" stop token ids;").then_some("stop_token_ids"))
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        Self::from_status(&status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_statuses_map_to_openai_statuses() {
        let cases = [
            (Code::InvalidArgument, 400, "invalid_request_error"),
            (Code::NotFound, 404, "invalid_request_error"),
            (Code::ResourceExhausted, 429, "rate_limit_error"),
            (Code::Unavailable, 503, "server_error"),
            (Code::FailedPrecondition, 503, "server_error"),
            (Code::DeadlineExceeded, 504, "timeout"),
            (Code::Unauthenticated, 401, "authentication_error"),
            (Code::PermissionDenied, 403, "permission_error"),
            (Code::Internal, 500, "server_error"),
        ];
        for (code, http, kind) in cases {
            let e = ApiError::from_status(&tonic::Status::new(code, "why"));
            assert_eq!((e.status.as_u16(), e.kind, e.message.as_str()), (http, kind, "why"), "{code:?}");
        }
        assert_eq!(ApiError::from_status(&tonic::Status::not_found("m")).code, Some("model_not_found"));
    }

    #[test]
    fn core_messages_name_the_openai_field() {
        let param = |m: &str| ApiError::from_status(&tonic::Status::invalid_argument(m)).param;
        assert_eq!(param("temperature must be a finite number >= 0 (0 means greedy); got -1").as_deref(), Some("temperature"));
        assert_eq!(param("max_new_tokens is 9000; the limit is 8192").as_deref(), Some("max_tokens"));
        assert_eq!(param("dry.base must be a finite number >= 1; got 0").as_deref(), Some("dry_multiplier"));
        assert_eq!(param("17 stop strings; the limit is 16").as_deref(), Some("stop"));
        assert_eq!(param("prompt is empty").as_deref(), Some("prompt"));
        assert_eq!(param("something else entirely"), None);
        assert_eq!(ApiError::from_status(&tonic::Status::unavailable("prompt")).param, None, "only 400s name a field");
    }

    #[test]
    fn the_body_is_openais_error_object() {
        let e = ApiError::invalid("temperature: invalid type", Some("temperature"));
        let v: serde_json::Value = serde_json::from_str(&e.to_json()).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"error": {"message": "temperature: invalid type", "type": "invalid_request_error",
                "param": "temperature", "code": null}})
        );
        let v: serde_json::Value =
            serde_json::from_str(&ApiError::from_status(&tonic::Status::resource_exhausted("full")).to_json()).expect("json");
        assert_eq!(v["error"]["code"], "queue_full");
        assert_eq!(v["error"]["param"], serde_json::Value::Null);
    }
}
