//! `Embed` on an encoder model: validation, tokenization and (requested) truncation of an
//! `EmbedRequest`, then one `Embed` call to the worker of a serving encoder group.
//!
//! Encoders run whole on one worker: no group loop, no KV budget. Each encoder group has an
//! [`EmbedBatcher`]: requests that arrive while the worker is busy are joined into its next
//! `Embed` call (up to [`MAX_BATCH_INPUTS`] inputs), so many small requests share one forward
//! pass. An input past the model's context is refused unless the request asks for truncation,
//! and a truncated input is reported in its `Embedding`. An encoder's context is
//! sentence-transformers' `max_seq_length` where its files set one
//! ([`cap_at_max_seq_length`]), as that is where the reference vectors cut their inputs.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tessera_proto::v1 as pb;
use tessera_proto::worker as wpb;
use tessera_proto::worker::worker_client::WorkerClient;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

use crate::cluster::Cluster;
use crate::error::{invalid, CoordinatorError};
use crate::limits::Limits;
use crate::model::{ModelKind, ServedModel};
use crate::request::find_model;

/// An encoder `model` with its `max_context` cut to sentence-transformers' `max_seq_length`
/// (`sentence_bert_config.json` in its directory), when that is shorter. sentence-transformers
/// feeds the model no more (all-MiniLM-L6-v2: 256 of 512 positions), so an input embedded
/// whole past it would get a vector no reference gives, and the workers' encoder refuses it.
/// Decoders, and encoders without the file or the field, are returned as they are.
pub fn cap_at_max_seq_length(mut model: ServedModel) -> Result<ServedModel, CoordinatorError> {
    if model.kind != ModelKind::Encoder {
        return Ok(model);
    }
    match read_max_seq_length(&model.spec.dir.join("sentence_bert_config.json")) {
        Ok(Some(n)) => model.max_context = model.max_context.min(n),
        Ok(None) => {}
        Err(reason) => return Err(CoordinatorError::Model { name: model.spec.name.clone(), reason }),
    }
    Ok(model)
}

/// `max_seq_length` from a `sentence_bert_config.json`; `None` without the file, the field, or
/// with `null`.
fn read_max_seq_length(path: &Path) -> Result<Option<usize>, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        // A model given as a single file (GGUF) has no sentence-transformers files beside it.
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let config: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| format!("cannot parse {}: {e}", path.display()))?;
    match config.get("max_seq_length") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => match v.as_u64().filter(|&n| n > 0) {
            Some(n) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
            None => Err(format!("{}: max_seq_length {v} is not a positive integer", path.display())),
        },
    }
}

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

/// Most inputs one batched `Embed` call carries (a request's own inputs are never split).
pub const MAX_BATCH_INPUTS: usize = 256;

/// One request's inputs, and where its vectors go.
struct EmbedJob {
    inputs: Vec<Vec<u32>>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, CoordinatorError>>,
}

/// The queue in front of one encoder group's worker. Dropping it (with its group) ends the task
/// that drains it.
#[derive(Clone)]
pub(crate) struct EmbedBatcher {
    jobs: mpsc::UnboundedSender<EmbedJob>,
}

impl EmbedBatcher {
    /// Starts the batching task for the worker `client` of group `group`.
    pub(crate) fn spawn(group: String, client: WorkerClient<Channel>, timeout: Duration) -> Self {
        let (jobs, queue) = mpsc::unbounded_channel();
        let call = move |inputs: Vec<Vec<u32>>| {
            let (mut client, group) = (client.clone(), group.clone());
            async move { call_worker(&mut client, &group, inputs, timeout).await }
        };
        tokio::spawn(drain(queue, call));
        Self { jobs }
    }

    async fn embed(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>, CoordinatorError> {
        let (reply, answer) = oneshot::channel();
        let gone = || CoordinatorError::Unavailable("the encoder group stopped serving; retry".into());
        self.jobs.send(EmbedJob { inputs, reply }).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Runs queued jobs through `call`, one call per batch: the first job waiting, plus every job
/// already queued behind it while the batch stays within [`MAX_BATCH_INPUTS`]. Nothing waits
/// to fill a batch: jobs join only while the previous call was running.
async fn drain<F, Fut>(mut queue: mpsc::UnboundedReceiver<EmbedJob>, mut call: F)
where
    F: FnMut(Vec<Vec<u32>>) -> Fut,
    Fut: Future<Output = Result<Vec<Vec<f32>>, CoordinatorError>>,
{
    let mut next: Option<EmbedJob> = None;
    loop {
        let first = match next.take() {
            Some(job) => job,
            None => match queue.recv().await {
                Some(job) => job,
                None => return,
            },
        };
        let mut batch = vec![first];
        let mut size = batch[0].inputs.len();
        while let Ok(job) = queue.try_recv() {
            if size + job.inputs.len() > MAX_BATCH_INPUTS {
                next = Some(job);
                break;
            }
            size += job.inputs.len();
            batch.push(job);
        }
        if batch.iter().all(|j| j.reply.is_closed()) {
            continue;
        }
        let counts: Vec<usize> = batch.iter().map(|j| j.inputs.len()).collect();
        let inputs: Vec<Vec<u32>> = batch.iter_mut().flat_map(|j| std::mem::take(&mut j.inputs)).collect();
        match call(inputs.clone()).await {
            Ok(vectors) if vectors.len() == size => {
                let mut vectors = vectors.into_iter();
                for (job, n) in batch.into_iter().zip(counts) {
                    let _ = job.reply.send(Ok(vectors.by_ref().take(n).collect()));
                }
            }
            Ok(vectors) => {
                for job in batch {
                    let message = format!("the worker returned {} vectors for {size} inputs", vectors.len());
                    let _ = job.reply.send(Err(CoordinatorError::Internal(message)));
                }
            }
            // One request's refusal must not fail the others: each is run again on its own.
            Err(CoordinatorError::InvalidArgument(_)) if batch.len() > 1 => {
                let mut rest = inputs.into_iter();
                for (job, n) in batch.into_iter().zip(counts) {
                    let own: Vec<Vec<u32>> = rest.by_ref().take(n).collect();
                    let _ = job.reply.send(call(own).await);
                }
            }
            Err(e) => {
                let mut jobs = batch.into_iter();
                if let Some(first) = jobs.next() {
                    for job in jobs {
                        let _ = job.reply.send(Err(copy_of(&e)));
                    }
                    let _ = first.reply.send(Err(e));
                }
            }
        }
    }
}

/// The same error for another request of a failed batch (the error type is not `Clone`: it can
/// hold transport errors, which a worker call never returns).
fn copy_of(e: &CoordinatorError) -> CoordinatorError {
    match e {
        CoordinatorError::InvalidArgument(m) => CoordinatorError::InvalidArgument(m.clone()),
        CoordinatorError::Unavailable(m) => CoordinatorError::Unavailable(m.clone()),
        CoordinatorError::ResourceExhausted(m) => CoordinatorError::ResourceExhausted(m.clone()),
        CoordinatorError::NotFound(m) => CoordinatorError::NotFound(m.clone()),
        other => CoordinatorError::Internal(other.to_string()),
    }
}

/// One `Embed` call to a group's worker.
async fn call_worker(
    client: &mut WorkerClient<Channel>,
    group: &str,
    inputs: Vec<Vec<u32>>,
    timeout: Duration,
) -> Result<Vec<Vec<f32>>, CoordinatorError> {
    let request =
        wpb::EmbedRequest { group_id: group.to_string(), inputs: inputs.into_iter().map(|ids| wpb::EmbedInput { ids }).collect() };
    let answer = tokio::time::timeout(timeout, client.embed(request))
        .await
        .map_err(|_| CoordinatorError::Unavailable(format!("group {group} did not embed in time; retry")))?;
    match answer {
        Ok(r) => Ok(r.into_inner().embeddings.into_iter().map(|e| e.values).collect()),
        Err(status) if status.code() == tonic::Code::InvalidArgument => Err(invalid(status.message())),
        Err(status) => Err(CoordinatorError::Unavailable(format!("group {group} failed to embed: {}; retry", status.message()))),
    }
}

/// The batcher of a serving encoder group, counted busy while this lives.
pub(crate) struct EmbedTarget {
    batcher: EmbedBatcher,
    active: Arc<AtomicUsize>,
}

impl EmbedTarget {
    pub(crate) fn new(batcher: EmbedBatcher, active: Arc<AtomicUsize>) -> Self {
        active.fetch_add(1, Ordering::Relaxed);
        Self { batcher, active }
    }
}

impl Drop for EmbedTarget {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs `prepared` on a serving group of its model, batched with whatever else is waiting there.
pub(crate) async fn embed(cluster: &Cluster, prepared: PreparedEmbed) -> Result<pb::EmbedResponse, CoordinatorError> {
    let target = cluster.embed_target(&prepared.model)?;
    let tokens: Vec<u32> = prepared.inputs.iter().map(|i| i.len() as u32).collect();
    let vectors = target.batcher.embed(prepared.inputs).await?;
    let embeddings = vectors
        .into_iter()
        .zip(tokens)
        .zip(prepared.truncated)
        .map(|((values, tokens), truncated)| pb::Embedding { values, tokens, truncated })
        .collect();
    Ok(pb::EmbedResponse { embeddings })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    type Answer = Result<Vec<Vec<f32>>, CoordinatorError>;

    /// A stand-in for the worker: each input's vector is its first id; inputs holding id 0 are
    /// refused as the worker refuses bad input. Records the size of every call.
    fn fake(calls: Arc<Mutex<Vec<usize>>>) -> impl FnMut(Vec<Vec<u32>>) -> std::future::Ready<Answer> {
        move |inputs: Vec<Vec<u32>>| {
            calls.lock().unwrap().push(inputs.len());
            std::future::ready(if inputs.iter().any(|i| i[0] == 0) {
                Err(invalid("id 0 is refused"))
            } else {
                Ok(inputs.iter().map(|i| vec![i[0] as f32]).collect())
            })
        }
    }

    /// Queues jobs of the given inputs, closes the queue, drains it, and returns the answers.
    async fn run(jobs: Vec<Vec<Vec<u32>>>) -> (Vec<Answer>, Vec<usize>) {
        let (tx, queue) = mpsc::unbounded_channel();
        let mut answers = Vec::new();
        for inputs in jobs {
            let (reply, answer) = oneshot::channel();
            tx.send(EmbedJob { inputs, reply }).unwrap();
            answers.push(answer);
        }
        drop(tx);
        let calls = Arc::new(Mutex::new(Vec::new()));
        drain(queue, fake(calls.clone())).await;
        let mut out = Vec::new();
        for a in answers {
            out.push(a.await.unwrap());
        }
        let calls = calls.lock().unwrap().clone();
        (out, calls)
    }

    #[test]
    fn max_seq_length_is_read_when_set_and_checked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sentence_bert_config.json");
        assert_eq!(read_max_seq_length(&path), Ok(None), "no file");
        let gguf = dir.path().join("model.gguf");
        std::fs::write(&gguf, b"GGUF").expect("write");
        assert_eq!(read_max_seq_length(&gguf.join("sentence_bert_config.json")), Ok(None), "a model file, not a directory");
        for (text, want) in
            [(r#"{"max_seq_length": 256}"#, Some(256)), (r#"{"do_lower_case": false}"#, None), (r#"{"max_seq_length": null}"#, None)]
        {
            std::fs::write(&path, text).expect("write");
            assert_eq!(read_max_seq_length(&path), Ok(want), "{text}");
        }
        for bad in [r#"{"max_seq_length": 0}"#, r#"{"max_seq_length": -3}"#, r#"{"max_seq_length": "256"}"#, "{"] {
            std::fs::write(&path, bad).expect("write");
            assert!(read_max_seq_length(&path).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn waiting_requests_share_one_call_and_get_their_own_vectors() {
        let (answers, calls) = run(vec![vec![vec![1]], vec![vec![2], vec![3]], vec![vec![4]]]).await;
        assert_eq!(calls, vec![4], "one call for everything that was waiting");
        let got: Vec<Vec<Vec<f32>>> = answers.into_iter().map(Result::unwrap).collect();
        assert_eq!(got, vec![vec![vec![1.0]], vec![vec![2.0], vec![3.0]], vec![vec![4.0]]]);
    }

    #[tokio::test]
    async fn a_batch_stops_at_the_input_cap_without_splitting_a_request() {
        let big = |id: u32| vec![vec![id]; 200];
        let (answers, calls) = run(vec![big(1), big(2), vec![vec![3]]]).await;
        assert_eq!(calls, vec![200, 201]);
        assert!(answers.iter().all(Result::is_ok));
    }

    #[tokio::test]
    async fn one_refused_request_does_not_fail_the_others() {
        let (answers, calls) = run(vec![vec![vec![5]], vec![vec![0]], vec![vec![6]]]).await;
        assert_eq!(calls, vec![3, 1, 1, 1], "the batch is refused, then each request runs alone");
        assert_eq!(answers[0].as_ref().unwrap(), &vec![vec![5.0]]);
        assert!(matches!(answers[1], Err(CoordinatorError::InvalidArgument(_))));
        assert_eq!(answers[2].as_ref().unwrap(), &vec![vec![6.0]]);
    }
}
