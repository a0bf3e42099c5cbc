//! The `tessera.worker.v1.Worker` gRPC service: a thin async shell over the engine thread.

use tessera_proto::worker as pb;
use tessera_proto::worker::worker_server::Worker;
use tonic::{Request, Response, Status};

use crate::engine::{EngineConfig, EngineHandle};
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

    pub fn into_server(self) -> pb::worker_server::WorkerServer<Self> {
        pb::worker_server::WorkerServer::new(self)
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
        let work = req.seqs.into_iter().map(wire::seq_work).collect();
        let sampled = self.engine.step(req.group_id, work).await?;
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
        Ok(Response::new(pb::StatusResponse {
            worker_id: self.id.clone(),
            state: s.state.to_string(),
            group_id: s.group_id,
            tp_rank: s.tp_rank as u32,
            sequences: s.sequences as u32,
            kv_tokens: s.kv_tokens,
            kv_capacity_tokens: self.config.kv_capacity_tokens,
            error: s.error,
        }))
    }
}
