//! The `tessera.worker.v1.Worker` gRPC service: a thin async shell over the engine thread.
//!
//! [`Admission`] is the one switch the process around the service holds: it pauses new
//! assignments (the worker's registration was lost, so the coordinator already counts it as
//! gone) and resumes them once the worker is registered again. The service itself knows nothing
//! of registries.

use tessera_proto::worker as pb;
use tessera_proto::worker::worker_server::Worker;
use tonic::{Request, Response, Status};

use crate::engine::{EngineConfig, EngineHandle};
use crate::error::WorkerError;
use crate::wire;

/// Serves one worker's engine.
#[derive(Clone)]
pub struct WorkerService {
    id: String,
    engine: EngineHandle,
    config: EngineConfig,
}

impl WorkerService {
    pub fn new(id: String, engine: EngineHandle, config: EngineConfig) -> Self {
        Self { id, engine, config }
    }

    /// The switch that pauses and resumes new assignments for this worker.
    pub fn admission(&self) -> Admission {
        Admission { engine: self.engine.clone() }
    }

    pub fn into_server(self) -> pb::worker_server::WorkerServer<Self> {
        pb::worker_server::WorkerServer::new(self)
    }
}

/// Whether a worker takes new work. While paused, `Assign` fails with `UNAVAILABLE`;
/// `Step`, `Release`, `Reset` and `Status` keep working. Cheap to clone.
#[derive(Clone)]
pub struct Admission {
    engine: EngineHandle,
}

impl Admission {
    /// Stops taking assignments and resets the engine, dropping its group: a worker whose
    /// registration is gone has already been written off by the coordinator, and a group that
    /// kept this rank would wait on it forever.
    pub async fn pause(&self) -> Result<(), WorkerError> {
        self.engine.pause().await
    }

    /// Takes assignments again.
    pub fn resume(&self) {
        self.engine.resume();
    }

    /// Whether assignments are taken now.
    pub fn is_accepting(&self) -> bool {
        self.engine.is_accepting()
    }

    /// Sequences the engine holds now (a draining worker waits for none).
    pub async fn sequences(&self) -> Result<usize, WorkerError> {
        Ok(self.engine.status().await?.sequences)
    }
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn assign(&self, req: Request<pb::AssignRequest>) -> Result<Response<pb::AssignResponse>, Status> {
        let assignment = wire::assignment(req.into_inner())?;
        let addr = self.engine.assign(assignment).await?;
        Ok(Response::new(pb::AssignResponse { collective_address: addr.map(|a| a.to_string()).unwrap_or_default() }))
    }

    async fn rendezvous(&self, req: Request<pb::RendezvousRequest>) -> Result<Response<pb::RendezvousResponse>, Status> {
        let req = req.into_inner();
        let peers = wire::peers(&req.peers)?;
        self.engine.rendezvous(req.group_id, peers).await?;
        Ok(Response::new(pb::RendezvousResponse {}))
    }

    async fn step(&self, req: Request<pb::StepRequest>) -> Result<Response<pb::StepResponse>, Status> {
        let req = req.into_inner();
        let group = req.group_id.clone();
        let sampled = self.engine.step(group, wire::step_work(req)?).await?;
        Ok(Response::new(pb::StepResponse { tokens: sampled.into_iter().map(wire::sampled).collect() }))
    }

    async fn release(&self, req: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        let req = req.into_inner();
        self.engine.release(req.group_id, req.seq_ids).await?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    async fn reset(&self, _req: Request<pb::ResetRequest>) -> Result<Response<pb::ResetResponse>, Status> {
        self.engine.reset().await?;
        Ok(Response::new(pb::ResetResponse {}))
    }

    async fn status(&self, _req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let s = self.engine.status().await?;
        Ok(Response::new(status_report(&self.id, s, self.config.kv_capacity_tokens)))
    }

    async fn prepare_ring(&self, req: Request<pb::PrepareRingRequest>) -> Result<Response<pb::PrepareRingResponse>, Status> {
        let (group, membership) = wire::ring::membership(req.into_inner())?;
        let addr = self.engine.prepare_ring(group, membership).await?;
        Ok(Response::new(pb::PrepareRingResponse { ring_address: addr.to_string() }))
    }

    async fn join_ring(&self, req: Request<pb::JoinRingRequest>) -> Result<Response<pb::JoinRingResponse>, Status> {
        let req = req.into_inner();
        let peers = wire::peers(&req.peers)?;
        self.engine.join_ring(req.group_id, req.ring_id, peers).await?;
        Ok(Response::new(pb::JoinRingResponse {}))
    }

    async fn leave_ring(&self, req: Request<pb::LeaveRingRequest>) -> Result<Response<pb::LeaveRingResponse>, Status> {
        let req = req.into_inner();
        let released = self.engine.leave_ring(req.group_id, req.ring_id).await?;
        Ok(Response::new(pb::LeaveRingResponse { released_seq_ids: released }))
    }

    async fn ring_step(&self, req: Request<pb::RingStepRequest>) -> Result<Response<pb::RingStepResponse>, Status> {
        let (group, step) = wire::ring::ring_step(req.into_inner())?;
        let sampled = self.engine.ring_step(group, step).await?;
        Ok(Response::new(wire::ring::ring_sampled(sampled)))
    }

    async fn embed(&self, req: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        let req = req.into_inner();
        let group = req.group_id.clone();
        let vectors = self.engine.embed(group, wire::embed_inputs(req)).await?;
        Ok(Response::new(wire::embeddings(vectors)))
    }

    async fn load_adapter(&self, req: Request<pb::LoadAdapterRequest>) -> Result<Response<pb::LoadAdapterResponse>, Status> {
        let req = req.into_inner();
        let adapter = wire::adapter(req.adapter)?.ok_or_else(|| WorkerError::InvalidArgument("LoadAdapter needs an adapter".into()))?;
        let bytes = self.engine.load_adapter(req.group_id, adapter).await?;
        Ok(Response::new(pb::LoadAdapterResponse { bytes }))
    }

    async fn unload_adapter(&self, req: Request<pb::UnloadAdapterRequest>) -> Result<Response<pb::UnloadAdapterResponse>, Status> {
        let req = req.into_inner();
        self.engine.unload_adapter(req.group_id, req.name).await?;
        Ok(Response::new(pb::UnloadAdapterResponse {}))
    }
}

/// What a worker reports of itself (`Status`, and its own metrics): the engine's state with the
/// worker's id and KV capacity.
pub fn status_report(id: &str, s: crate::engine::EngineStatus, kv_capacity_tokens: u64) -> pb::StatusResponse {
    pb::StatusResponse {
        worker_id: id.to_string(),
        state: s.state.to_string(),
        group_id: s.group_id,
        tp_rank: s.tp_rank as u32,
        sequences: s.sequences as u32,
        kv_tokens: s.kv_tokens,
        kv_blocks: s.kv_blocks,
        kv_capacity_blocks: kv_capacity_tokens / tessera_proto::KV_BLOCK_TOKENS,
        kv_capacity_tokens,
        error: s.error,
        prefix_cached_blocks: s.prefix.cached_blocks as u64,
        prefix_unused_blocks: s.prefix.unused_blocks as u64,
        prefix_hits: s.prefix.hits,
        prefix_hit_tokens: s.prefix.hit_tokens,
        prefix_evictions: s.prefix.evictions,
        adapters: s.adapters,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn service() -> WorkerService {
        let config = EngineConfig { collective_host: "127.0.0.1".into(), kv_capacity_tokens: 1024, collective_tls: None, max_adapters: 8 };
        let engine = EngineHandle::spawn(config.clone()).expect("spawn the engine thread");
        WorkerService::new("w-test".into(), engine, config)
    }

    fn assign_request() -> Request<pb::AssignRequest> {
        // tp_size 1: assigning binds nothing and loads nothing, so no model is needed.
        Request::new(pb::AssignRequest {
            group_id: "g".into(),
            model_dir: "/nonexistent".into(),
            dtype: "f32".into(),
            tp_rank: 0,
            tp_size: 1,
            batch_invariant: false,
        })
    }

    async fn state(service: &WorkerService) -> String {
        let status = service.status(Request::new(pb::StatusRequest {})).await.expect("status");
        status.into_inner().state
    }

    #[tokio::test]
    async fn paused_worker_refuses_assign_and_drops_its_group_until_resumed() {
        let service = service();
        let admission = service.admission();
        assert!(admission.is_accepting());
        service.assign(assign_request()).await.expect("assign while accepting");
        assert_eq!(state(&service).await, "assigned");

        admission.pause().await.expect("pause");
        assert!(!admission.is_accepting());
        assert_eq!(state(&service).await, "idle", "pausing drops the group");
        let refused = service.assign(assign_request()).await.expect_err("assign while paused");
        assert_eq!(refused.code(), Code::Unavailable);
        assert!(refused.message().contains("not taking new work"), "{}", refused.message());
        assert_eq!(state(&service).await, "idle");

        admission.resume();
        service.assign(assign_request()).await.expect("assign after resume");
        assert_eq!(state(&service).await, "assigned");
    }
}
