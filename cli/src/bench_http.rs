//! `tessera bench --protocol openai`: one request as a streamed `/v1/completions` call over the
//! OpenAI-compatible HTTP API, timed as the gRPC path times a `Generate` stream.
//!
//! Each request opens its own HTTP/1.1 connection (as a client without a pool does; a loopback
//! connect costs tens of microseconds) and asks for `return_token_ids`, so every token the
//! server samples arrives in an event, as every gRPC chunk does, even when its text is held
//! back (half a character, a possible stop string). Output tokens are the usage's count.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tessera_proto::v1 as pb;
use tessera_tls::ClientTls;

use crate::bench::Measured;

/// Where the HTTP API is and how to reach it: `host:port` from `http://host:port` (or
/// `https://` with a CA to trust) with or without `/v1`, and the API key's header.
#[derive(Debug, Clone)]
pub struct HttpTarget {
    authority: String,
    /// The host part, which the server's certificate must name.
    host: String,
    tls: Option<Arc<ClientTls>>,
    authorization: Option<String>,
}

impl HttpTarget {
    pub fn parse(addr: &str, tls: Option<Arc<ClientTls>>, authorization: Option<String>) -> anyhow::Result<Self> {
        let rest = match (addr.strip_prefix("http://"), addr.strip_prefix("https://"), &tls) {
            (Some(rest), _, None) => rest,
            (_, Some(rest), Some(_)) => rest,
            (_, Some(_), None) => bail!("{addr}: an https:// API needs --tls-ca"),
            (Some(_), _, Some(_)) => bail!("{addr}: --tls-ca is for an https:// API"),
            (None, None, _) => bail!("{addr}: the OpenAI API is reached over http:// or https://"),
        };
        let authority = rest.trim_end_matches('/').trim_end_matches("/v1").trim_end_matches('/');
        anyhow::ensure!(!authority.is_empty() && !authority.contains('/'), "{addr}: expected http(s)://HOST:PORT[/v1]");
        let host = match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => authority,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        Ok(Self { authority: authority.to_string(), host, tls, authorization })
    }
}

/// The body of one benchmark request: greedy or sampled, exactly `output_len` tokens.
pub fn body(model: &str, input: &pb::generate_request::Input, output_len: u32, temperature: f32) -> String {
    let prompt = match input {
        pb::generate_request::Input::Prompt(text) => json!(text),
        pb::generate_request::Input::Tokens(t) => json!(t.ids),
        pb::generate_request::Input::Chat(_) => json!(""),
    };
    let mut body = json!({
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": temperature,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
        "return_token_ids": true,
    });
    if !model.is_empty() {
        body["model"] = json!(model);
    }
    body.to_string()
}

/// Sends `request` on a new HTTP/1.1 connection over `io`.
async fn send<IO>(io: IO, request: Request<Full<Bytes>>) -> anyhow::Result<hyper::Response<hyper::body::Incoming>>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender.send_request(request).await?)
}

/// Sends one request and times its events.
pub async fn measure(target: HttpTarget, body: String) -> Measured {
    let sent = Instant::now();
    let mut m = Measured::default();
    if let Err(e) = run(&target, body, sent, &mut m).await {
        m.ok = false;
        m.error = format!("{e:#}");
    }
    m
}

async fn run(target: &HttpTarget, body: String, sent: Instant, m: &mut Measured) -> anyhow::Result<()> {
    let stream = tokio::net::TcpStream::connect(&target.authority).await.with_context(|| format!("connect to {}", target.authority))?;
    stream.set_nodelay(true)?;
    let mut request = Request::post("/v1/completions").header(HOST, &target.authority).header(CONTENT_TYPE, "application/json");
    if let Some(value) = &target.authorization {
        request = request.header(AUTHORIZATION, value);
    }
    let request = request.body(Full::new(Bytes::from(body)))?;
    let response = match &target.tls {
        None => send(TokioIo::new(stream), request).await?,
        Some(tls) => {
            let stream = tls.connect(&target.host, stream).await.with_context(|| format!("TLS to {}", target.authority))?;
            send(TokioIo::new(stream), request).await?
        }
    };
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let text = body.collect().await.map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned()).unwrap_or_default();
        bail!("{status}: {text}");
    }
    let mut pending: Vec<u8> = Vec::new();
    let mut last: Option<Instant> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Some(data) = frame.data_ref() else { continue };
        pending.extend_from_slice(data);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let text = std::str::from_utf8(&event).context("an event that is not UTF-8")?;
            let Some(data) = text.trim_end().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                m.latency = sent.elapsed().as_secs_f64();
                m.ok = last.is_some() && m.output_tokens > 0;
                if !m.ok {
                    bail!("the stream ended without tokens");
                }
                return Ok(());
            }
            let chunk: Value = serde_json::from_str(data).context("an event that is not JSON")?;
            if let Some(error) = chunk.get("error") {
                bail!("error event: {error}");
            }
            let tokens = chunk["choices"][0]["token_ids"].as_array().map_or(0, Vec::len);
            if tokens > 0 {
                let now = Instant::now();
                match last {
                    None => m.ttft = now.duration_since(sent).as_secs_f64(),
                    Some(previous) => m.itl.push(now.duration_since(previous).as_secs_f64()),
                }
                last = Some(now);
            }
            if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
                m.prompt_len = usage["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                m.output_tokens = usage["completion_tokens"].as_u64().unwrap_or(0) as usize;
            }
        }
    }
    bail!("the stream ended without [DONE]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_take_the_base_url_with_or_without_v1() {
        for addr in ["http://127.0.0.1:8000", "http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1/"] {
            let target = HttpTarget::parse(addr, None, None).expect(addr);
            assert_eq!((target.authority.as_str(), target.host.as_str()), ("127.0.0.1:8000", "127.0.0.1"));
        }
        assert_eq!(HttpTarget::parse("http://[::1]:8000/v1", None, None).expect("IPv6").host, "::1");
        assert!(HttpTarget::parse("https://x:1", None, None).is_err(), "https:// needs a CA");
        assert!(HttpTarget::parse("http://x:1/api/v1", None, None).is_err());
        assert!(HttpTarget::parse("ftp://x:1", None, None).is_err());
    }

    #[test]
    fn bodies_ask_for_exact_lengths_and_every_token() {
        let input = pb::generate_request::Input::Tokens(pb::TokenIds { ids: vec![1, 2] });
        let v: Value = serde_json::from_str(&body("", &input, 8, 0.0)).expect("json");
        assert_eq!((v["prompt"].clone(), v["max_tokens"].as_u64(), v["ignore_eos"].as_bool()), (json!([1, 2]), Some(8), Some(true)));
        assert_eq!((v["stream_options"]["include_usage"].as_bool(), v["return_token_ids"].as_bool()), (Some(true), Some(true)));
        assert!(v.get("model").is_none());
    }
}
