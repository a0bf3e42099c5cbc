//! TLS for Tessera's network planes, on rustls with the ring provider.
//!
//! - [`TlsFiles`]: a process's own certificate chain and key, and the cluster CA it trusts, as
//!   PEM files. [`ServerTls`] and [`ClientTls`] build rustls configurations from them and build
//!   them again when a file changes (checked by modification time on every use, so a renewed
//!   certificate takes effect at the next connection without a restart).
//! - [`accept`]: TLS over an accepted TCP connection with a handshake deadline, and an incoming
//!   stream of such connections for a tonic server. A peer whose handshake fails (no
//!   certificate where one is required, one from another CA, plaintext on a TLS port) is logged
//!   and dropped.
//!
//! *API boundary:* the collective receives plain `rustls` configurations built here; it never
//! depends on this crate (it has no async).

pub mod accept;
mod config;
mod error;
mod reload;

pub use config::{provider, ClientTls, ServerTls, TlsFiles, ALPN_H2, ALPN_HTTP1};
pub use error::TlsError;
pub use rustls;
