//! Integration tests of the registry against a real etcd and the in-memory backend.
//!
//! One test binary: `behaviour` runs the same cases on both backends, `recovery` covers what
//! only etcd can do (lost connections, compacted history). Both need the `etcd` binary;
//! `tessera-etcd-harness` starts it.

mod behaviour;
mod recovery;
mod support;
