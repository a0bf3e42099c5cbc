//! Building rustls configurations from PEM files: servers (with or without client
//! certificates) and clients (trusting the cluster CA, with or without their own certificate).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::reload::Reloading;
use crate::TlsError;

/// ALPN of gRPC (HTTP/2); tonic's TLS clients insist on it.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of the HTTP/1.1 API.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// A process's certificate files, all PEM.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    /// This process's certificate chain, leaf first.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The cluster CA: peers must present a certificate it signed. Needed for mutual TLS.
    pub ca: Option<PathBuf>,
}

impl TlsFiles {
    fn ca(&self) -> Result<&Path, TlsError> {
        self.ca.as_deref().ok_or(TlsError::NoCa)
    }
}

/// The one crypto provider every configuration uses. rustls deprecates ring's provider for
/// lacking post-quantum key exchange; aws-lc-rs would add a CMake and C build to every machine
/// that builds Tessera, so classical X25519/P-256 it is until ring gains ML-KEM.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server's TLS configuration, rebuilt when its files change.
pub struct ServerTls(Reloading<ServerConfig>);

impl ServerTls {
    /// A server that presents `files.cert` and asks clients for nothing (the client API: clients
    /// authenticate with API keys).
    pub fn new(files: &TlsFiles, alpn: &[&[u8]]) -> Result<Self, TlsError> {
        let (files, alpn) = (files.clone(), owned(alpn));
        let paths = vec![files.cert.clone(), files.key.clone()];
        Ok(Self(Reloading::new(paths, move || {
            let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
            let mut config = builder.with_no_client_auth().with_single_cert(chain(&files.cert)?, key(&files.key)?)?;
            config.alpn_protocols = alpn.clone();
            Ok(config)
        })?))
    }

    /// A server that also requires a client certificate signed by `files.ca` (the worker and
    /// collective planes). It sends no session tickets: the collective reads its records one
    /// by one and then leaves TLS, so nothing may follow the handshake unasked.
    pub fn mutual(files: &TlsFiles, alpn: &[&[u8]]) -> Result<Self, TlsError> {
        let ca = files.ca()?.to_path_buf();
        let (files, alpn) = (files.clone(), owned(alpn));
        let paths = vec![files.cert.clone(), files.key.clone(), ca.clone()];
        Ok(Self(Reloading::new(paths, move || {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots(&ca)?, provider())
                .build()
                .map_err(|source| TlsError::Verifier { path: ca.clone(), source })?;
            let builder = ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
            let mut config = builder.with_client_cert_verifier(verifier).with_single_cert(chain(&files.cert)?, key(&files.key)?)?;
            config.alpn_protocols = alpn.clone();
            config.send_tls13_tickets = 0;
            Ok(config)
        })?))
    }

    /// The configuration for the files as they are now.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.0.get()
    }
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerTls")
    }
}

/// A client's TLS configuration, rebuilt when its files change.
pub struct ClientTls(Reloading<ClientConfig>);

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

impl ClientTls {
    /// A client that trusts only `files.ca` and presents `files.cert` (the coordinator to its
    /// workers, a rank to its peers).
    pub fn mutual(files: &TlsFiles, alpn: &[&[u8]]) -> Result<Self, TlsError> {
        let ca = files.ca()?.to_path_buf();
        let (files, alpn) = (files.clone(), owned(alpn));
        let paths = vec![files.cert.clone(), files.key.clone(), ca.clone()];
        Ok(Self(Reloading::new(paths, move || {
            let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
            let mut config = builder.with_root_certificates(roots(&ca)?).with_client_auth_cert(chain(&files.cert)?, key(&files.key)?)?;
            config.alpn_protocols = alpn.clone();
            Ok(config)
        })?))
    }

    /// A client that trusts only `ca` and has no certificate of its own (an API client).
    pub fn trusting(ca: &Path, alpn: &[&[u8]]) -> Result<Self, TlsError> {
        let (ca, alpn) = (ca.to_path_buf(), owned(alpn));
        Ok(Self(Reloading::new(vec![ca.clone()], move || {
            let builder = ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
            let mut config = builder.with_root_certificates(roots(&ca)?).with_no_client_auth();
            config.alpn_protocols = alpn.clone();
            Ok(config)
        })?))
    }

    /// The configuration for the files as they are now.
    pub fn config(&self) -> Arc<ClientConfig> {
        self.0.get()
    }

    /// Opens TLS over `stream` to `host` (a name or IP address its certificate must hold).
    pub async fn connect(
        &self,
        host: &str,
        stream: tokio::net::TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
        tokio_rustls::TlsConnector::from(self.config()).connect(name, stream).await
    }
}

fn owned(alpn: &[&[u8]]) -> Vec<Vec<u8>> {
    alpn.iter().map(|p| p.to_vec()).collect()
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    match e {
        rustls::pki_types::pem::Error::Io(source) => TlsError::Read { path: path.to_path_buf(), source },
        other => TlsError::Pem { path: path.to_path_buf(), what: other.to_string() },
    }
}

fn chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path).map_err(|e| pem_error(path, e))?;
    let certs = certs.collect::<Result<Vec<_>, _>>().map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_path_buf() });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error(path, e))
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in chain(path)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}
