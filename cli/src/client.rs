//! How the client commands (`generate`, `bench`) reach a coordinator that serves TLS and
//! requires API keys: a CA to trust for `https://`, and the key on every call (gRPC metadata
//! or an HTTP header).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tessera_proto::v1::inference_client::InferenceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A `tessera.v1.Inference` client that sends the API key, if any, with every call.
pub type Client = InferenceClient<InterceptedService<Channel, Bearer>>;

#[derive(Args, Debug, Clone, Default)]
pub struct ClientAuthArgs {
    /// CA certificate (PEM) to trust for an `https://` address, instead of none.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// API key for a coordinator started with --api-keys (default: $TESSERA_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
}

/// Puts `authorization: Bearer KEY` on every gRPC call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl ClientAuthArgs {
    /// The key from --api-key or $TESSERA_API_KEY; none when empty.
    pub fn key(&self) -> Option<String> {
        self.api_key.clone().or_else(|| std::env::var("TESSERA_API_KEY").ok()).filter(|k| !k.is_empty())
    }

    /// `authorization`'s value, checked once: a key must be printable ASCII.
    pub fn authorization(&self) -> anyhow::Result<Option<String>> {
        let value = self.key().map(|k| format!("Bearer {k}"));
        if let Some(v) = &value {
            anyhow::ensure!(v.bytes().all(|b| (0x20..0x7f).contains(&b)), "the API key is not printable ASCII");
        }
        Ok(value)
    }

    /// A gRPC client of the coordinator at `addr` (`http://` or, with --tls-ca, `https://`).
    pub async fn connect(&self, addr: &str) -> anyhow::Result<Client> {
        let mut endpoint = tonic::transport::Endpoint::from_shared(addr.to_string())?;
        if let Some(ca) = &self.tls_ca {
            let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
            endpoint = endpoint
                .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem)))?;
        }
        let channel = endpoint.connect().await.with_context(|| format!("cannot reach {addr}"))?;
        let authorization = self.authorization()?.map(|v| v.parse()).transpose().context("the API key is not printable ASCII")?;
        Ok(InferenceClient::with_interceptor(channel, Bearer(authorization)))
    }

    /// TLS for HTTP/1.1 to an `https://` API: trusting --tls-ca only; `None` without it.
    pub fn http_tls(&self) -> anyhow::Result<Option<Arc<tessera_tls::ClientTls>>> {
        self.tls_ca
            .as_deref()
            .map(|ca| tessera_tls::ClientTls::trusting(ca, &[tessera_tls::ALPN_HTTP1]).map(Arc::new).context("--tls-ca"))
            .transpose()
    }
}
