//! `TlsError`: what can go wrong reading certificates and building a configuration.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("the CA in {path} cannot verify clients: {source}")]
    Verifier { path: PathBuf, source: rustls::server::VerifierBuilderError },
    #[error("mutual TLS needs a CA file (--tls-ca)")]
    NoCa,
}
