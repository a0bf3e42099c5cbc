//! TLS of the coordinator: the client API's listeners (gRPC speaks `h2`, the HTTP API
//! `http/1.1`, from the same certificate files) and the connector its worker clients dial with
//! when the cluster runs mutual TLS.
//!
//! The connector does the handshake itself rather than through tonic's TLS settings so that a
//! worker whose certificate the cluster CA did not sign is logged with the reason, by address;
//! tonic would report only "transport error" to the group being formed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tessera_tls::rustls::pki_types::ServerName;
use tessera_tls::{ClientTls, ServerTls, TlsError, TlsFiles, ALPN_H2, ALPN_HTTP1};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tonic::codegen::http::Uri;

/// The client API's TLS, one configuration per protocol.
#[derive(Clone)]
pub(crate) struct ApiTls {
    pub grpc: Arc<ServerTls>,
    pub http: Arc<ServerTls>,
}

impl ApiTls {
    pub fn new(files: &TlsFiles) -> Result<Self, TlsError> {
        Ok(Self { grpc: Arc::new(ServerTls::new(files, &[ALPN_H2])?), http: Arc::new(ServerTls::new(files, &[ALPN_HTTP1])?) })
    }
}

/// Dials a worker and speaks mutual TLS with it: the worker must present a certificate the
/// cluster CA signed, for the host it registered.
#[derive(Clone)]
pub(crate) struct WorkerConnector {
    pub tls: Arc<ClientTls>,
    pub handshake_timeout: Duration,
}

type Connecting = Pin<Box<dyn Future<Output = Result<TokioIo<TlsStream<TcpStream>>, std::io::Error>> + Send>>;

impl tonic::codegen::Service<Uri> for WorkerConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (config, timeout) = (self.tls.config(), self.handshake_timeout);
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(443);
            let name = ServerName::try_from(host.clone()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            // A step's request must not wait on Nagle's algorithm.
            tcp.set_nodelay(true)?;
            let handshake = TlsConnector::from(config).connect(name, tcp);
            match tokio::time::timeout(timeout, handshake).await {
                Ok(Ok(stream)) => Ok(TokioIo::new(stream)),
                Ok(Err(e)) => {
                    tracing::warn!(worker = %uri, error = %e, "refused a worker: TLS handshake failed (its certificate must be signed by the cluster CA for the host it registered)");
                    Err(e)
                }
                Err(_) => {
                    tracing::warn!(worker = %uri, ?timeout, "refused a worker: TLS handshake did not finish in time");
                    Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))
                }
            }
        })
    }
}
