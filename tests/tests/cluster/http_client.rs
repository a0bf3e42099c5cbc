//! A small HTTP/1.1 client for the OpenAI-compatible API (hyper, one connection per request),
//! and starting `tessera up --http-port 0` / `tessera coordinator --http-listen` with both URLs.

use std::io::BufReader;
use std::process::ChildStdout;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tessera_tests::{tessera_bin, ChildGuard};

use crate::support::PATIENCE;

/// A `tessera` process serving gRPC and HTTP.
pub struct HttpServed {
    pub _process: ChildGuard,
    /// Kept open so the process can still print.
    _stdout: BufReader<ChildStdout>,
    /// gRPC, `http://127.0.0.1:P`.
    pub grpc: String,
    /// The OpenAI base URL, `http://127.0.0.1:Q/v1`.
    pub http: String,
}

/// Starts `tessera <args>` and reads its first two stdout lines: the gRPC address, then the
/// HTTP API's URL.
pub fn spawn_with_http(args: &[&std::ffi::OsStr]) -> anyhow::Result<HttpServed> {
    let (process, first, second, stdout) = tessera_tests::spawn_two_lines(tessera_bin(), args)?;
    let http = second.rsplit(' ').next().unwrap_or_default().to_string();
    anyhow::ensure!(http.starts_with("http://") && http.ends_with("/v1"), "second line {second:?} names no HTTP API");
    Ok(HttpServed { _process: process, _stdout: stdout, grpc: format!("http://{first}"), http })
}

/// `tessera up --threads 1 --port 0 --http-port 0 --model MODEL <args>`, once every group loaded.
pub fn up_with_http(model: &std::path::Path, args: &[&str]) -> anyhow::Result<HttpServed> {
    let (process, grpc, http, stdout) = tessera_tests::spawn_up_with_http(tessera_bin(), 1, model, args)?;
    Ok(HttpServed { _process: process, _stdout: stdout, grpc, http })
}

/// Sends one request on a fresh connection; the connection lives as long as the returned task.
async fn send(url: &str, method: Method, body: Option<String>) -> (hyper::Response<Incoming>, tokio::task::JoinHandle<()>) {
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let stream = tokio::net::TcpStream::connect(authority).await.expect("connect");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::builder()
        .method(method)
        .uri(if path.is_empty() { "/" } else { path })
        .header(HOST, authority)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("request");
    let response = tokio::time::timeout(PATIENCE, sender.send_request(request)).await.expect("answered in time").expect("response");
    (response, task)
}

/// A whole response: its status and its body as JSON (`Value::String` if it is not JSON).
pub async fn call(url: &str, method: Method, body: Option<String>) -> (StatusCode, Value) {
    let (response, _connection) = send(url, method, body).await;
    let status = response.status();
    let bytes = tokio::time::timeout(PATIENCE, response.into_body().collect()).await.expect("body in time").expect("body").to_bytes();
    let text = String::from_utf8(bytes.to_vec()).expect("UTF-8 body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

pub async fn post(url: &str, body: &Value) -> (StatusCode, Value) {
    call(url, Method::POST, Some(body.to_string())).await
}

pub async fn get(url: &str) -> (StatusCode, Value) {
    call(url, Method::GET, None).await
}

/// An event stream being read; dropping it closes the connection.
pub struct Events {
    body: Incoming,
    pending: Vec<u8>,
    connection: tokio::task::JoinHandle<()>,
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Data(Value),
    Done,
}

impl Drop for Events {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Events {
    /// POSTs `body` and checks the answer is a 200 event stream.
    pub async fn open(url: &str, body: &Value) -> Self {
        let (response, connection) = send(url, Method::POST, Some(body.to_string())).await;
        assert_eq!(response.status(), StatusCode::OK, "an event stream was refused");
        let kind = response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        assert!(kind.starts_with("text/event-stream"), "content type {kind:?}");
        Self { body: response.into_body(), pending: Vec::new(), connection }
    }

    /// The next event; `None` at the end of the body.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.pending.drain(..end + 2).collect();
                let text = String::from_utf8(raw).expect("events are UTF-8");
                let data = text.trim_end().strip_prefix("data: ").unwrap_or_else(|| panic!("not a data event: {text:?}"));
                return Some(if data == "[DONE]" { Event::Done } else { Event::Data(serde_json::from_str(data).expect("JSON event")) });
            }
            let frame = tokio::time::timeout(PATIENCE, self.body.frame()).await.expect("an event in time")?;
            if let Some(data) = frame.expect("stream healthy").data_ref() {
                self.pending.extend_from_slice(data);
            }
        }
    }

    /// Every event to the end; the last must be `[DONE]`, which is not returned.
    pub async fn all(mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(event) = self.next().await {
            match event {
                Event::Data(v) => out.push(v),
                Event::Done => {
                    assert!(self.next().await.is_none(), "events after [DONE]");
                    return out;
                }
            }
        }
        panic!("the stream ended without [DONE] after {out:?}");
    }
}

/// The text of choice `index` over every chunk: `text` (completions) or `delta.content` (chat).
pub fn joined(chunks: &[Value], index: u64) -> String {
    chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["index"].as_u64() == Some(index))
        .filter_map(|c| c["text"].as_str().or(c["delta"]["content"].as_str()).map(str::to_string))
        .collect()
}
