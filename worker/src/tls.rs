//! The collective's mutual TLS as a worker holds it: built from the worker's certificate files
//! each time a group or ring connects, so a renewed certificate applies to the next one.

use std::sync::Arc;

use tessera_collective::CollectiveTls;
use tessera_tls::{ClientTls, ServerTls, TlsError, TlsFiles};

/// The worker's certificate, key and cluster CA, for its collective connections.
#[derive(Clone)]
pub struct CollectiveTlsFiles {
    server: Arc<ServerTls>,
    client: Arc<ClientTls>,
}

impl CollectiveTlsFiles {
    /// Reads the files now (a bad file fails at start-up); `files.ca` is required.
    pub fn new(files: &TlsFiles) -> Result<Self, TlsError> {
        Ok(Self { server: Arc::new(ServerTls::mutual(files, &[])?), client: Arc::new(ClientTls::mutual(files, &[])?) })
    }

    /// The configurations for the files as they are now.
    pub fn current(&self) -> CollectiveTls {
        CollectiveTls { server: self.server.config(), client: self.client.config() }
    }
}

impl std::fmt::Debug for CollectiveTlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CollectiveTlsFiles")
    }
}
