//! Clients for a cluster that serves TLS or requires API keys: a gRPC channel that trusts one
//! CA, and one HTTP/1.1 exchange over TLS or plain TCP with an optional `Authorization` header.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tessera_tls::{ClientTls, ALPN_HTTP1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::support::PATIENCE;

/// A gRPC channel to `url` (`https://127.0.0.1:P`) that trusts only `ca`.
pub async fn tls_channel(url: &str, ca: &Path) -> anyhow::Result<Channel> {
    let pem = std::fs::read(ca)?;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)).domain_name("localhost");
    let endpoint = Endpoint::from_shared(url.to_string())?.tls_config(tls)?.connect_timeout(PATIENCE);
    Ok(tokio::time::timeout(PATIENCE, endpoint.connect()).await??)
}

/// A gRPC request carrying `authorization: Bearer KEY`.
pub fn with_key<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {key}").parse().expect("ASCII key"));
    request
}

/// One HTTP/1.1 request on a fresh connection; returns the status and the body.
pub async fn exchange<S>(mut stream: S, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> anyhow::Result<(u16, String)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(key) = key {
        request.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    let body = body.unwrap_or_default();
    request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()));
    let talk = async {
        stream.write_all(request.as_bytes()).await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        anyhow::Ok(String::from_utf8_lossy(&reply).into_owned())
    };
    let reply = tokio::time::timeout(PATIENCE, talk).await.context("no answer in time")??;
    let status = reply.split(' ').nth(1).and_then(|s| s.parse().ok()).with_context(|| format!("not an HTTP answer: {reply:?}"))?;
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// [`exchange`] over plain TCP.
pub async fn http(addr: SocketAddr, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> anyhow::Result<(u16, String)> {
    exchange(tokio::net::TcpStream::connect(addr).await?, method, path, key, body).await
}

/// [`exchange`] over TLS, trusting only `ca`.
pub async fn https(addr: SocketAddr, ca: &Path, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<(u16, String)> {
    let config = ClientTls::trusting(ca, &[ALPN_HTTP1])?.config();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = tessera_tls::rustls::pki_types::ServerName::try_from("localhost")?;
    let stream = tokio_rustls::TlsConnector::from(Arc::clone(&config)).connect(name, tcp).await?;
    exchange(stream, method, path, None, body).await
}

/// `https://127.0.0.1:P/...` or `http://...` to its socket address.
pub fn socket_of(url: &str) -> SocketAddr {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("no address in {url:?}"))
}
