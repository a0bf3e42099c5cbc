//! The coordinator: speaks `tessera.v1` to clients and drives worker groups step by step.
//!
//! * [`server`] — [`Coordinator`]: loads the served models' text-side files, follows the
//!   registry, and serves `Inference`, health and reflection.
//! * [`cluster`] — membership, group formation and teardown, placement of requests.
//! * [`scheduler`] — a group's scheduling policy as a synchronous state machine (admission by
//!   KV blocks, preemption, chunked prefill, deadlines, beams); [`group`] — the async loop that
//!   performs its plans over `Step` RPCs; [`fanout`] — one RPC to every rank, and agreement.
//! * [`placement`] — where a request goes (one group, a ring, or a refusal), as pure functions.
//! * [`output`] — one request's output: `Started`, chunks, the loop guard's resampling, the end.
//! * [`request`] — validation and tokenization; [`limits`] the caps it enforces.
//! * [`embed`] — `Embed` on encoder models: validation, truncation, the one worker call.
//! * [`metrics`] — counters and latency histograms ([`histogram`]); `prometheus` serves them
//!   as `GET /metrics`.
//! * [`generation`] — one sequence's output: detokenization ([`detokenize`]), stop strings
//!   ([`stop`]), the loop guard ([`loop_guard`]), finishing rules.
//! * `http` — the OpenAI-compatible HTTP API, served onto the same `Inference` service.
//! * [`chat`] — chat templates; [`model`] — what a served model is; [`error`] — the one mapping
//!   to gRPC codes.

pub mod adapters;
pub mod auth;
pub mod beam;
pub mod chat;
pub mod cluster;
pub mod connection;
mod deadline;
pub mod detokenize;
pub mod embed;
pub mod error;
mod fanout;
pub mod generation;
mod group;
pub mod histogram;
mod http;
mod leadership;
pub mod limits;
mod long_input;
pub mod loop_guard;
pub mod metrics;
pub mod model;
mod output;
mod placement;
mod prefix_affinity;
pub mod prometheus;
pub mod request;
mod ring;
mod scheduler;
pub mod sentences;
pub mod server;
mod service;
pub mod stop;
mod template_guard;
#[cfg(test)]
mod testing;
mod tls;

pub use cluster::ClusterConfig;
pub use error::CoordinatorError;
pub use http::HttpConfig;
pub use limits::Limits;
pub use model::{largest_tp, ModelSpec};
pub use scheduler::LoopConfig;
pub use server::{Coordinator, CoordinatorConfig, INFERENCE_SERVICE};
