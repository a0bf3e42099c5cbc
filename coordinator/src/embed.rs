//! `Embed` on an encoder model: validation, tokenization and (requested) truncation of an
//! `EmbedRequest`, then one `Embed` call to the worker of a serving encoder group.
//!
//! Encoders run whole on one worker, so an `Embed` is one RPC: no group loop, no KV budget.
//! An input past the model's context is refused unless the request asks for truncation, and a
//! truncated input is reported in its `Embedding`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tessera_proto::v1 as pb;
use tessera_proto::worker as wpb;
use tessera_proto::worker::worker_client::WorkerClient;
use tonic::transport::Channel;

use crate::cluster::Cluster;
use crate::error::{invalid, CoordinatorError};
use crate::limits::Limits;
use crate::model::{ModelKind, ServedModel};
use crate::request::find_model;

/// An `EmbedRequest` that passed every check: token ids within the model's context.
#[derive(Debug)]
pub struct PreparedEmbed {
    pub model: Arc<ServedModel>,
    pub inputs: Vec<Vec<u32>>,
    /// Per input: it was cut to the model's context.
    pub truncated: Vec<bool>,
}

/// Checks `req` against `limits` and the model, tokenizes texts, and cuts (only when asked)
/// inputs longer than the model's context.
pub fn prepare_embed(req: pb::EmbedRequest, models: &[Arc<ServedModel>], limits: &Limits) -> Result<PreparedEmbed, CoordinatorError> {
    let model = find_model(models, &req.model)?;
    if model.kind != ModelKind::Encoder {
        return Err(invalid(format!("model {:?} is a decoder: it serves Generate, not Embed", model.name())));
    }
    let count = req.texts.len() + req.token_ids.len();
    if req.texts.is_empty() == req.token_ids.is_empty() {
        return Err(invalid("give either texts or token_ids, not both and not neither"));
    }
    if count > limits.max_embed_inputs {
        return Err(invalid(format!("{count} inputs; the limit is {}", limits.max_embed_inputs)));
    }
    let bytes: usize = req.texts.iter().map(String::len).sum();
    if bytes > limits.max_embed_bytes {
        return Err(invalid(format!("texts are {bytes} bytes; the limit is {}", limits.max_embed_bytes)));
    }
    let max = model.max_context;
    let mut inputs = Vec::with_capacity(count);
    let mut truncated = Vec::with_capacity(count);
    for (i, text) in req.texts.iter().enumerate() {
        let enc = model.tokenizer.encode(text.as_str(), true).map_err(|e| invalid(format!("cannot tokenize text {i}: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        let cut = ids.len() > max;
        if cut {
            check_truncate(req.truncate, i, ids.len(), max)?;
            // Keep the closing special token ([SEP]) the tokenizer appended.
            let last = ids[ids.len() - 1];
            ids.truncate(max - 1);
            ids.push(last);
        }
        inputs.push(ids);
        truncated.push(cut);
    }
    for (i, list) in req.token_ids.into_iter().enumerate() {
        let mut ids = list.ids;
        if ids.is_empty() {
            return Err(invalid(format!("token_ids {i} is empty")));
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= model.vocab_size) {
            return Err(invalid(format!("token_ids {i} holds id {bad}; the vocabulary has {} ids", model.vocab_size)));
        }
        let cut = ids.len() > max;
        if cut {
            check_truncate(req.truncate, i, ids.len(), max)?;
            ids.truncate(max);
        }
        inputs.push(ids);
        truncated.push(cut);
    }
    if inputs.iter().any(Vec::is_empty) {
        return Err(invalid("an input tokenized to no tokens"));
    }
    Ok(PreparedEmbed { model, inputs, truncated })
}

fn check_truncate(allowed: bool, index: usize, len: usize, max: usize) -> Result<(), CoordinatorError> {
    if allowed {
        Ok(())
    } else {
        Err(invalid(format!("input {index} is {len} tokens; the model takes at most {max} (set truncate to cut it)")))
    }
}

/// The one worker of a serving encoder group, counted busy while this lives.
pub(crate) struct EmbedTarget {
    group: String,
    client: WorkerClient<Channel>,
    active: Arc<AtomicUsize>,
}

impl EmbedTarget {
    pub(crate) fn new(group: String, client: WorkerClient<Channel>, active: Arc<AtomicUsize>) -> Self {
        active.fetch_add(1, Ordering::Relaxed);
        Self { group, client, active }
    }
}

impl Drop for EmbedTarget {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs `prepared` on a serving group of its model.
pub(crate) async fn embed(cluster: &Cluster, prepared: PreparedEmbed) -> Result<pb::EmbedResponse, CoordinatorError> {
    let mut target = cluster.embed_target(&prepared.model)?;
    let tokens: Vec<u32> = prepared.inputs.iter().map(|i| i.len() as u32).collect();
    let request = wpb::EmbedRequest {
        group_id: target.group.clone(),
        inputs: prepared.inputs.into_iter().map(|ids| wpb::EmbedInput { ids }).collect(),
    };
    let answer = tokio::time::timeout(cluster.step_timeout(), target.client.embed(request))
        .await
        .map_err(|_| CoordinatorError::Unavailable(format!("group {} did not embed in time; retry", target.group)))?;
    let vectors = match answer {
        Ok(r) => r.into_inner().embeddings,
        Err(status) if status.code() == tonic::Code::InvalidArgument => return Err(invalid(status.message())),
        Err(status) => {
            return Err(CoordinatorError::Unavailable(format!("group {} failed to embed: {}; retry", target.group, status.message())))
        }
    };
    if vectors.len() != tokens.len() {
        return Err(CoordinatorError::Internal(format!("worker returned {} vectors for {} inputs", vectors.len(), tokens.len())));
    }
    let embeddings = vectors
        .into_iter()
        .zip(tokens)
        .zip(prepared.truncated)
        .map(|((v, tokens), truncated)| pb::Embedding { values: v.values, tokens, truncated })
        .collect();
    Ok(pb::EmbedResponse { embeddings })
}
