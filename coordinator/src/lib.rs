//! The coordinator: speaks `tessera.v1` to clients and drives worker groups step by step.
//!
//! Built so far: chat templates ([`chat`]) and the text side of streaming — incremental detokenization that never emits half
//! a UTF-8 character ([`detokenize`]) and stop-string matching that holds back only what could
//! still become a stop string ([`stop`]). The service, placement and iteration loop build on them.

pub mod chat;
pub mod detokenize;
pub mod stop;
