//! Caps every gRPC server of the cluster puts on one connection, whoever is on the other end:
//! concurrent streams, header list size, reset floods, and keepalive pings that find dead peers.
//!
//! Message sizes are capped per service (tonic's default of 4 MiB per decoded message, which
//! `limits.rs` keeps every valid request far below); request fields are capped in `limits.rs`.

use std::time::Duration;

/// Streams one connection may have open at once. A benchmark client multiplexes its whole
/// concurrency over one connection, so this is well above any `--concurrency` it uses.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Largest header list (all metadata of one call, decoded).
pub const MAX_HEADER_LIST_BYTES: u32 = 16 << 10;
/// Streams a client may open and reset before the server has accepted them (the HTTP/2
/// rapid-reset attack) before the connection is closed.
pub const MAX_PENDING_RESETS: usize = 64;
/// How often an idle connection is pinged, and how long the answer may take before the
/// connection is closed.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A tonic server builder with the caps above.
pub fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}
