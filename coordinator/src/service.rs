//! The public `tessera.v1.Inference` service: validation, placement, and the response stream.
//!
//! A `Generate` call is checked and tokenized ([`request::prepare`](crate::request::prepare)),
//! placed on the least busy serving group, and answered with a stream that the group's loop
//! feeds: `Started` at once, then chunks, then `Finished` (or an error status). Dropping the
//! stream — a cancelled or disconnected client — is how the loop learns to release the sequence.

use std::sync::Arc;
use std::time::Instant;

use tessera_proto::v1 as pb;
use tessera_proto::v1::inference_server::Inference;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::{ApiKeys, MeteredStream, Ticket};
use crate::cluster::{Ask, Cluster, Route};
use crate::embed::{embed, prepare_embed};
use crate::error::CoordinatorError;
use crate::generation::Generation;
use crate::limits::Limits;
use crate::long_input;
use crate::model::ModelKind;
use crate::output::SequenceOutput;
use crate::request::prepare;
use crate::ring::{self, RingRequest};
use crate::scheduler::{NewSequence, Resumed};

/// Serves `tessera.v1.Inference`.
#[derive(Clone)]
pub struct InferenceService {
    cluster: Arc<Cluster>,
    limits: Limits,
    /// The keys every call must present one of; `None` checks none.
    keys: Option<Arc<ApiKeys>>,
}

impl InferenceService {
    pub(crate) fn new(cluster: Arc<Cluster>, limits: Limits, keys: Option<Arc<ApiKeys>>) -> Self {
        Self { cluster, limits, keys }
    }

    /// Refuses a call without an accepted key before its body is read (the HTTP API asks this
    /// first, so a stranger learns nothing from how the body would have been judged).
    pub(crate) fn authenticate<T>(&self, req: &Request<T>) -> Result<(), Status> {
        self.admit(req).map(drop).map_err(Status::from)
    }

    /// Checks the call's API key (when keys are configured) before anything else is read.
    fn admit<T>(&self, req: &Request<T>) -> Result<Option<Ticket>, CoordinatorError> {
        self.keys.as_ref().map(|keys| keys.admit(req.metadata())).transpose()
    }
}

impl InferenceService {
    /// The served decoder `name` names (empty: the only model).
    fn decoder(&self, name: &str) -> Result<Arc<crate::model::ServedModel>, CoordinatorError> {
        let model = crate::request::find_model(&self.cluster.models, name)?;
        if model.kind != ModelKind::Decoder {
            return Err(CoordinatorError::InvalidArgument(format!("model {:?} is an encoder: adapters are for decoders", model.name())));
        }
        Ok(model)
    }

    /// Run-time adapter changes are the operator's choice (`--allow-adapter-loading`).
    fn adapter_changes_allowed(&self, what: &str) -> Result<(), CoordinatorError> {
        if self.limits.allow_adapter_loading {
            return Ok(());
        }
        Err(CoordinatorError::FailedPrecondition(format!(
            "{what} adapters at run time is switched off on this coordinator (start it with --allow-adapter-loading)"
        )))
    }

    fn model_index(&self, model: &Arc<crate::model::ServedModel>) -> Result<usize, CoordinatorError> {
        self.cluster
            .models
            .iter()
            .position(|m| Arc::ptr_eq(m, model))
            .ok_or_else(|| CoordinatorError::Internal(format!("model {:?} is not in the cluster", model.name())))
    }

    /// Places one checked `Generate` request and returns the stream its group (or ring) feeds:
    /// the whole of a `Generate` call after admission, and each call of a long-input job. While
    /// rings hold every group that could take it, the stream opens at once and the request waits
    /// for a group in a task of its own, as it would in a busy group's queue.
    pub(crate) async fn start(
        &self,
        request: pb::GenerateRequest,
        arrived: Instant,
        deadline: Option<Instant>,
        key: &str,
    ) -> Result<mpsc::UnboundedReceiver<Result<pb::GenerateResponse, Status>>, Status> {
        let models = self.cluster.models.clone();
        let limits = self.limits.clone();
        // Tokenizing a prompt of megabytes takes long enough to stall the runtime's threads.
        let prepared = tokio::task::spawn_blocking(move || prepare(request, &models, &limits))
            .await
            .map_err(|e| CoordinatorError::Internal(format!("request preparation failed: {e}")))??;
        let (events, stream) = mpsc::unbounded_channel();
        match self.cluster.try_place(&ask(&prepared)) {
            Ok((route, needs)) => self.launch(prepared, route, needs, Call { arrived, deadline, key }, events).await?,
            Err(refused) if refused.held().is_some() => {
                let (service, key) = (self.clone(), key.to_string());
                tokio::spawn(async move {
                    let waited = async {
                        let (route, needs) = service.cluster.place_or_wait(&ask(&prepared), deadline).await?;
                        service.launch(prepared, route, needs, Call { arrived, deadline, key: &key }, events.clone()).await
                    };
                    // A client that leaves while the request waits takes the wait with it.
                    tokio::select! {
                        result = waited => {
                            if let Err(status) = result {
                                let _ = events.send(Err(status));
                            }
                        }
                        () = events.closed() => {}
                    }
                });
            }
            Err(refused) => return Err(refused.into_error().into()),
        }
        Ok(stream)
    }

    /// Starts a placed request: its sequence goes to its group's queue, or its ring is served in
    /// a task; `events` is its client's stream.
    async fn launch(
        &self,
        prepared: crate::request::Prepared,
        route: Route,
        needs: crate::placement::PlacementRequest,
        call: Call<'_>,
        events: mpsc::UnboundedSender<Result<pb::GenerateResponse, Status>>,
    ) -> Result<(), Status> {
        let Call { arrived, deadline, key } = call;
        if let Some(adapter) = &prepared.adapter {
            match &route {
                Route::Ring(_) => {
                    return Err(CoordinatorError::InvalidArgument(format!(
                        "adapter {:?}: a prompt this long runs on a sequence-parallel ring, which serves the base model only",
                        adapter.name
                    ))
                    .into())
                }
                // Checked against the model by the group's workers before its first request.
                Route::Group(p) => self.cluster.load_adapter_on(self.model_index(&prepared.model)?, &p.group, adapter).await?,
            }
        }
        let beams = prepared.beam.map_or(1, |b| b.num_beams);
        let seq = self.cluster.next_seqs(beams as u64);
        let request_id = if prepared.request_id.is_empty() { format!("req-{seq}") } else { prepared.request_id };
        let mut sampling = prepared.sampling;
        if !prepared.seed_given {
            sampling.seed = fresh_seed(seq);
        }
        let prompt_tokens = prepared.prompt.len() as u32;
        let max_new_tokens = prepared.stopping.max_new_tokens;
        let generation = Generation::new(prepared.model.tokenizer.clone(), prepared.stopping, prompt_tokens, arrived);
        let output = SequenceOutput::new(generation, events, sampling);
        match route {
            Route::Ring(plan) => {
                let progress = Resumed::start(output.base_sampling());
                let request = RingRequest {
                    seq,
                    prompt: prepared.prompt,
                    output,
                    deadline,
                    request_id: request_id.clone(),
                    model: prepared.model.clone(),
                    max_new_tokens,
                    no_prefix_cache: prepared.no_prefix_cache,
                    progress,
                };
                tracing::info!(%request_id, seq, ring = plan.size, prompt_tokens, key, "generate on a ring");
                tokio::spawn(ring::serve(self.cluster.clone(), plan, request));
            }
            Route::Group(placement) => {
                let where_ = pb::Placement { tp: placement.tp, sp: 1, workers: placement.workers.clone() };
                output.started(request_id.clone(), prompt_tokens, where_);
                let (prompt, reserve, beam) = (prepared.prompt, needs.kv_tokens, prepared.beam);
                let no_prefix_cache = prepared.no_prefix_cache;
                let adapter_name = prepared.adapter.as_ref().map_or("-", |a| a.name.as_str()).to_string();
                let adapter = prepared.adapter.as_ref().map(|a| a.wire());
                placement.submit(NewSequence { seq, prompt, reserve, deadline, output, beam, resume: None, no_prefix_cache, adapter })?;
                tracing::info!(%request_id, seq, group = %placement.group, prompt_tokens, adapter = %adapter_name, key, "generate");
            }
        }
        Ok(())
    }
}

/// When a call arrived, its deadline, and the name of its API key (for logs).
struct Call<'a> {
    arrived: Instant,
    deadline: Option<Instant>,
    key: &'a str,
}

/// What placement needs of a prepared request.
fn ask(prepared: &crate::request::Prepared) -> Ask<'_> {
    Ask {
        model: &prepared.model,
        adapter: prepared.adapter.as_ref().map(|a| a.name.as_str()),
        prompt: &prepared.prompt,
        max_new_tokens: prepared.stopping.max_new_tokens,
        num_beams: prepared.beam.map_or(1, |b| b.num_beams),
    }
}

/// The name of the key a call came with, for logs.
fn key_name(ticket: &Option<Ticket>) -> &str {
    ticket.as_ref().map_or("-", Ticket::name)
}

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = MeteredStream;

    async fn generate(&self, req: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let arrived = Instant::now();
        let ticket = self.admit(&req)?;
        let deadline = crate::deadline::grpc_timeout(req.metadata()).and_then(|t| arrived.checked_add(t));
        let request = req.into_inner();
        let stream = if request.long_input.is_some() {
            let (models, limits) = (self.cluster.models.clone(), self.limits.clone());
            // Tokenizing the document takes long enough to stall the runtime's threads.
            let job = tokio::task::spawn_blocking(move || long_input::plan(request, &models, &limits))
                .await
                .map_err(|e| CoordinatorError::Internal(format!("request preparation failed: {e}")))??;
            let (events, stream) = mpsc::unbounded_channel();
            tracing::info!(request_id = %job.request_id(), chunks = job.chunks(), key = key_name(&ticket), "generate over a long input");
            tokio::spawn(long_input::run(self.clone(), job, events, deadline));
            stream
        } else {
            self.start(request, arrived, deadline, key_name(&ticket)).await?
        };
        Ok(Response::new(MeteredStream::new(UnboundedReceiverStream::new(stream), ticket)))
    }
    async fn list_models(&self, req: Request<pb::ListModelsRequest>) -> Result<Response<pb::ListModelsResponse>, Status> {
        self.admit(&req)?;
        let models = self
            .cluster
            .models
            .iter()
            .enumerate()
            .map(|(i, m)| pb::ModelInfo {
                name: m.name().to_string(),
                kind: match m.kind {
                    ModelKind::Decoder => pb::ModelKind::Decoder,
                    ModelKind::Encoder => pb::ModelKind::Encoder,
                } as i32,
                max_context: m.max_context as u32,
                tp: m.spec.tp as u32,
                serving_groups: self.cluster.serving_groups_of(i),
                default_sampling: Some(pb::SamplingParams {
                    temperature: m.sampling_defaults.temperature,
                    top_k: m.sampling_defaults.top_k,
                    top_p: m.sampling_defaults.top_p,
                    repetition_penalty: m.sampling_defaults.repetition_penalty,
                    ..Default::default()
                }),
                adapters: m.adapters.list().iter().map(|a| a.info(m.name())).collect(),
            })
            .collect();
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn embed(&self, req: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        let ticket = self.admit(&req)?;
        let models = self.cluster.models.clone();
        let limits = self.limits.clone();
        // Tokenizing up to a megabyte of text would stall the runtime's threads.
        let prepared = tokio::task::spawn_blocking(move || prepare_embed(req.into_inner(), &models, &limits))
            .await
            .map_err(|e| CoordinatorError::Internal(format!("request preparation failed: {e}")))??;
        let response = embed(&self.cluster, prepared).await?;
        if let Some(ticket) = &ticket {
            ticket.charge(response.embeddings.iter().map(|e| u64::from(e.tokens)).sum());
            tracing::info!(key = ticket.name(), inputs = response.embeddings.len(), "embed");
        }
        Ok(Response::new(response))
    }

    async fn load_adapter(&self, req: Request<pb::LoadAdapterRequest>) -> Result<Response<pb::LoadAdapterResponse>, Status> {
        let ticket = self.admit(&req)?;
        let req = req.into_inner();
        self.adapter_changes_allowed("loading")?;
        let model = self.decoder(&req.model)?;
        let index = self.model_index(&model)?;
        let fresh = model.adapters.get(&req.name).is_none();
        let adapter = model.adapters.register(&req.name, req.dir.into())?;
        // Every serving group checks it against the model now, so a misfit is refused here
        // rather than on a request; a group formed later reads it when first asked.
        if let Err(e) = self.cluster.load_adapter_everywhere(index, &adapter).await {
            if fresh {
                model.adapters.remove(&adapter.name);
                self.cluster.unload_adapter_everywhere(index, &adapter.name).await;
            }
            return Err(e.into());
        }
        tracing::info!(model = model.name(), adapter = %adapter.name, dir = %adapter.dir.display(), key = key_name(&ticket), "adapter loaded");
        Ok(Response::new(pb::LoadAdapterResponse { adapter: Some(adapter.info(model.name())) }))
    }

    async fn unload_adapter(&self, req: Request<pb::UnloadAdapterRequest>) -> Result<Response<pb::UnloadAdapterResponse>, Status> {
        let ticket = self.admit(&req)?;
        let req = req.into_inner();
        self.adapter_changes_allowed("unloading")?;
        let model = self.decoder(&req.model)?;
        let index = self.model_index(&model)?;
        model.adapters.find(&req.name, model.name())?;
        model.adapters.remove(&req.name);
        // Requests running with it keep it on the workers until they end.
        self.cluster.unload_adapter_everywhere(index, &req.name).await;
        tracing::info!(model = model.name(), adapter = %req.name, key = key_name(&ticket), "adapter unloaded");
        Ok(Response::new(pb::UnloadAdapterResponse {}))
    }

    async fn cluster_status(&self, req: Request<pb::ClusterStatusRequest>) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.admit(&req)?;
        Ok(Response::new(self.cluster.status().await))
    }
}

/// A seed for a request that gave none: different per request and per coordinator start.
fn fresh_seed(seq: u64) -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    // SplitMix64 finaliser: nearby inputs give unrelated seeds.
    let mut z = nanos ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
