//! Tessera's gRPC contracts, generated from the `.proto` files next to this crate.
//!
//! `tessera.v1` is the public API and a stability boundary: fields are only ever added.
//! `tessera.worker.v1` is spoken between the coordinator and workers and may change freely.
//! Only the two server crates use these types; they convert at their edge.

/// The public API (`tessera.v1`).
pub mod v1 {
    tonic::include_proto!("tessera.v1");
}

/// The coordinator ↔ worker API (`tessera.worker.v1`).
pub mod worker {
    tonic::include_proto!("tessera.worker.v1");
}

/// Encoded descriptors of every message and service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tessera_descriptor");

/// Tokens per KV-cache block. Workers allocate and count KV memory in blocks of this many
/// tokens, and the coordinator admits and preempts sequences by the same count, so both sides
/// agree on what fits without asking.
pub const KV_BLOCK_TOKENS: u64 = 16;

/// Metadata key a worker sets on an error `Status` whose cause retrying cannot fix (the
/// model's files cannot be served as they are); the coordinator then marks the model failed
/// instead of forming groups for it again.
pub const PERMANENT_ERROR_KEY: &str = "tessera-permanent";

/// Blocks that hold `tokens` KV entries.
pub const fn kv_blocks(tokens: u64) -> u64 {
    tokens.div_ceil(KV_BLOCK_TOKENS)
}
