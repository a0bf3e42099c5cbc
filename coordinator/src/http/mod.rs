//! The OpenAI-compatible HTTP API, a second front door onto the same core as gRPC.
//!
//! `POST /v1/completions`, `POST /v1/chat/completions` (whole, or streamed as server-sent events
//! ending in `data: [DONE]`), `POST /v1/embeddings`, `GET /v1/models[/{id}]`, `GET /health`, and
//! `GET /metrics` when asked ([`HttpConfig::metrics`]). HTTP/1.1 on hyper, on the coordinator's
//! own runtime.
//!
//! *API boundary:* every request is served by calling [`InferenceService`]'s `Inference` methods
//! in process, with a `tonic::Request` built from the body ([`openai`] reads it): validation,
//! limits, placement, errors and metrics are the core's, shared with gRPC; this module only
//! translates shapes ([`response`], [`sse`]) and status codes ([`error`]). Dropping a response
//! body (a client that disconnects) drops the core's streams, which is how the group loops learn
//! to release a sequence on every rank.
//!
//! Credentials: the `Authorization` header is passed on to the core as the `authorization`
//! metadata of each call, so checking API keys in the service covers both front doors; a
//! refused key (`UNAUTHENTICATED`) becomes a 401.

mod embeddings;
pub mod error;
pub mod fields;
mod generate;
mod ids;
pub mod openai;
pub mod response;
mod sse;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_server::Inference;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;

use crate::cluster::Cluster;
use crate::limits::Limits;
use crate::service::InferenceService;
use error::ApiError;
use fields::Fields;
use openai::GenerateCall;

/// A response body: whole, or streamed.
pub type HttpBody = UnsyncBoxBody<Bytes, Infallible>;

/// How the HTTP API is served.
#[derive(Debug, Clone, Default)]
pub struct HttpConfig {
    /// Also serve `GET /metrics` (the Prometheus text of `--metrics-listen`) on this port.
    pub metrics: bool,
    /// TLS (set by the coordinator from its API certificate); `None` serves plaintext.
    pub(crate) tls: Option<Arc<tessera_tls::ServerTls>>,
    /// API keys (set by the coordinator), checked by the core from the `Authorization` header.
    pub(crate) api_keys: Option<Arc<crate::auth::ApiKeys>>,
}

/// What every request handler reads.
pub(crate) struct HttpState {
    service: InferenceService,
    cluster: Arc<Cluster>,
    limits: Limits,
    config: HttpConfig,
    /// Per served model, by name.
    fingerprints: HashMap<String, String>,
    /// When this server started: the `created` time of every model.
    started: u64,
}

impl HttpState {
    fn fingerprint(&self, model: &str) -> String {
        self.fingerprints.get(model).cloned().unwrap_or_default()
    }

    /// Largest request body: room for the biggest prompt or embedding input the limits allow,
    /// JSON-escaped (`\uXXXX` doubles CJK text), plus the other fields.
    fn max_body_bytes(&self) -> usize {
        4 * self.limits.max_prompt_bytes.max(self.limits.max_embed_bytes) + (64 << 10)
    }
}

/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest read buffer of a connection, which bounds the request line and headers.
const MAX_HEADER_BYTES: usize = 64 << 10;

/// Serves the HTTP API on `listener` until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, cluster: Arc<Cluster>, limits: Limits, config: HttpConfig) {
    let fingerprints = cluster.models.iter().map(|m| (m.name().to_string(), ids::fingerprint(m))).collect();
    let service = InferenceService::new(cluster.clone(), limits.clone(), config.api_keys.clone());
    let state = Arc::new(HttpState { service, cluster, limits, config, fingerprints, started: ids::unix_seconds() });
    if let Some(tls) = state.config.tls.clone() {
        // The TLS accept loop the gRPC API uses too: handshake deadline, slots, per-address cap,
        // eviction of the oldest stalled handshake.
        let accept = tessera_tls::accept::AcceptConfig::new("client API (HTTP)");
        let mut connections = tessera_tls::accept::incoming(listener, tls, accept);
        while let Some(connection) = connections.next().await {
            match connection {
                Ok(stream) => {
                    tokio::spawn(serve_connection(TokioIo::new(stream), state.clone()));
                }
                Err(e) => tracing::warn!(error = %e, "HTTP listener: accept failed"),
            }
        }
        return;
    }
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "HTTP listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Each streamed chunk is one small write: without this it can wait on Nagle's
        // algorithm and a delayed ACK.
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(TokioIo::new(stream), state.clone()));
    }
}

/// Serves HTTP/1.1 requests on one connection until it closes.
async fn serve_connection<I>(io: TokioIo<I>, state: Arc<HttpState>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(route(req, &state).await) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(io, service);
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

async fn route(req: Request<Incoming>, state: &HttpState) -> Response<HttpBody> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let result = match (method.clone(), path.as_str()) {
        (Method::POST, "/v1/completions") => post(req, state, GenerateCall::completions).await,
        (Method::POST, "/v1/chat/completions") => post(req, state, GenerateCall::chat).await,
        (Method::POST, "/v1/embeddings") => embeddings(req, state).await,
        (Method::GET, "/v1/models") => models(state, None, req.headers().get(AUTHORIZATION)).await,
        (Method::GET, p) if p.starts_with("/v1/models/") => {
            models(state, Some(&p["/v1/models/".len()..]), req.headers().get(AUTHORIZATION)).await
        }
        (Method::GET | Method::HEAD, "/health") => Ok(health(state)),
        (Method::GET | Method::HEAD, "/metrics") if state.config.metrics => Ok(metrics(state).await),
        (_, "/v1/completions" | "/v1/chat/completions" | "/v1/embeddings") => Err(ApiError::method_not_allowed("POST")),
        (_, "/v1/models" | "/health") => Err(ApiError::method_not_allowed("GET")),
        (_, p) => Err(ApiError::not_found(format!("no route for {method} {p}"))),
    };
    result.unwrap_or_else(|e| json(e.status, e.to_json()))
}

/// What is read and dropped of a body past its limit, and for how long, before the 413 goes
/// out: a server that answers and closes while the client still sends resets the connection,
/// and the client never sees the answer.
const MAX_DRAIN_BYTES: usize = 16 << 20;
const MAX_DRAIN_TIME: Duration = Duration::from_secs(5);

/// Reads a JSON body within the size limit.
async fn body(req: Request<Incoming>, state: &HttpState) -> Result<Fields, ApiError> {
    let limit = state.max_body_bytes();
    let mut body = req.into_body();
    let mut kept = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::invalid(format!("cannot read the request body: {e}"), None))?;
        let Ok(data) = frame.into_data() else { continue };
        if kept.len() + data.len() > limit {
            let drain = async {
                let mut drained = 0;
                while drained < MAX_DRAIN_BYTES {
                    match body.frame().await {
                        Some(Ok(frame)) => drained += frame.data_ref().map_or(0, Bytes::len),
                        _ => break,
                    }
                }
            };
            let _ = tokio::time::timeout(MAX_DRAIN_TIME, drain).await;
            return Err(ApiError::body_too_large(limit));
        }
        kept.extend_from_slice(&data);
    }
    Fields::parse(&kept)
}

async fn post(
    req: Request<Incoming>,
    state: &HttpState,
    read: fn(&Fields) -> Result<GenerateCall, ApiError>,
) -> Result<Response<HttpBody>, ApiError> {
    let authorization = req.headers().get(AUTHORIZATION).cloned();
    state.service.authenticate(&with_authorization((), authorization.as_ref()))?;
    let call = read(&body(req, state).await?)?;
    Ok(match generate::generate(state, call, authorization.as_ref()).await? {
        generate::Reply::Json(text) => json(StatusCode::OK, text),
        generate::Reply::Stream(body) => {
            let mut response = Response::new(body);
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream; charset=utf-8"));
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            response
        }
    })
}

async fn embeddings(req: Request<Incoming>, state: &HttpState) -> Result<Response<HttpBody>, ApiError> {
    let authorization = req.headers().get(AUTHORIZATION).cloned();
    state.service.authenticate(&with_authorization((), authorization.as_ref()))?;
    let fields = body(req, state).await?;
    Ok(json(StatusCode::OK, embeddings::embeddings(state, &fields, authorization.as_ref()).await?))
}

#[derive(Serialize)]
struct ModelCard {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
    /// vLLM's field: the longest sequence (prompt + completion) the model takes.
    max_model_len: u32,
    /// vLLM's fields for a LoRA adapter, listed as `base:adapter`: its base model, and the
    /// model itself for a base.
    root: String,
    parent: Option<String>,
}

/// `GET /v1/models` (every served model, from the core's `ListModels`), or one by name.
async fn models(state: &HttpState, name: Option<&str>, authorization: Option<&HeaderValue>) -> Result<Response<HttpBody>, ApiError> {
    let list = state.service.list_models(with_authorization(pb::ListModelsRequest {}, authorization)).await?.into_inner();
    let card = |id: String, m: &pb::ModelInfo, parent: Option<String>| ModelCard {
        id,
        object: "model",
        created: state.started,
        owned_by: "tessera",
        max_model_len: m.max_context,
        root: m.name.clone(),
        parent,
    };
    // Each model, then its adapters as `base:adapter`.
    let cards = list.models.iter().flat_map(|m| {
        std::iter::once(card(m.name.clone(), m, None))
            .chain(m.adapters.iter().map(|a| card(format!("{}:{}", m.name, a.name), m, Some(m.name.clone()))))
    });
    let text = match name {
        None => {
            let data: Vec<ModelCard> = cards.collect();
            serde_json::to_string(&serde_json::json!({"object": "list", "data": data}))
        }
        Some(name) => match cards.into_iter().find(|c| c.id == name) {
            Some(c) => serde_json::to_string(&c),
            None => {
                let mut e = ApiError::not_found(format!("model {name:?} is not served here"));
                e.code = Some("model_not_found");
                return Err(e);
            }
        },
    };
    Ok(json(StatusCode::OK, text.map_err(|e| ApiError::internal(e.to_string()))?))
}

/// Ready while at least one group serves (the gRPC health of `tessera.v1.Inference`).
fn health(state: &HttpState) -> Response<HttpBody> {
    if *state.cluster.serving_groups().borrow() > 0 {
        json(StatusCode::OK, r#"{"status":"serving"}"#.into())
    } else {
        json(StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"not serving"}"#.into())
    }
}

async fn metrics(state: &HttpState) -> Response<HttpBody> {
    let status = state.cluster.status().await;
    let serving = *state.cluster.serving_groups().borrow();
    let mut text = crate::prometheus::render(&status, &state.cluster.metrics.token_snapshot(), serving);
    if let Some(keys) = &state.config.api_keys {
        text.push_str(&keys.prometheus());
    }
    let mut response = Response::new(full(text));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    response
}

/// A core request carrying the HTTP request's `Authorization` header as gRPC metadata.
pub(crate) fn with_authorization<T>(message: T, authorization: Option<&HeaderValue>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = authorization.and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()) {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

fn full(text: String) -> HttpBody {
    Full::new(Bytes::from(text)).boxed_unsync()
}

fn json(status: StatusCode, text: String) -> Response<HttpBody> {
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
