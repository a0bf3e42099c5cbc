//! Assembles a running coordinator: served models, the membership follower, and the gRPC
//! server with `tessera.v1.Inference`, `grpc.health.v1` and server reflection (v1 and v1alpha,
//! so both grpcurl and grpcio's reflection client work without our `.proto` files).
//!
//! Health says `SERVING` only while at least one group is loaded; before that, whenever every
//! group is lost, and on a standby coordinator (which forms none, see [`crate::leadership`]), it
//! says `NOT_SERVING`.

use std::future::Future;
use std::sync::Arc;

use tessera_proto::v1::inference_server::InferenceServer;
use tessera_registry::Registry;
use tokio::sync::{oneshot, watch};
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::auth::ApiKeys;
use crate::cluster::{Cluster, ClusterConfig};
use crate::error::CoordinatorError;
use crate::limits::Limits;
use crate::model::{ModelSpec, ServedModel};
use crate::service::InferenceService;
use crate::tls::ApiTls;
use tessera_tls::accept::AcceptConfig;

/// The name health checks use for the inference service.
pub const INFERENCE_SERVICE: &str = "tessera.v1.Inference";

/// Everything a coordinator is started with.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub models: Vec<ModelSpec>,
    pub limits: Limits,
    pub cluster: ClusterConfig,
    /// The name this coordinator campaigns under for the leadership (like a worker id:
    /// letters, digits and `-_.:`); unique among the coordinators of one registry.
    pub candidate: String,
    /// TLS on the client API (gRPC and HTTP); `None` serves plaintext.
    pub api_tls: Option<tessera_tls::TlsFiles>,
    /// API keys the client API requires; `None` requires none.
    pub api_keys: Option<Arc<ApiKeys>>,
    /// LoRA adapters served from the start (`--lora`).
    pub adapters: Vec<AdapterArg>,
}

/// A LoRA adapter to serve from the start: `name` read from `dir`, for `model` (empty: the only
/// decoder, or the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterArg {
    pub model: String,
    pub name: String,
    pub dir: std::path::PathBuf,
}

/// A coordinator following the registry, not yet serving gRPC.
pub struct Coordinator {
    cluster: Arc<Cluster>,
    limits: Limits,
    /// Campaigns, then leads; ends with an error if the leadership is lost.
    leader: tokio::task::JoinHandle<Result<(), CoordinatorError>>,
    resign: oneshot::Sender<()>,
    tls: Option<ApiTls>,
    keys: Option<Arc<ApiKeys>>,
}

impl Coordinator {
    /// Reads every model's text-side files and campaigns for the leadership; once elected it
    /// follows the registry and groups form as workers appear.
    pub async fn start(config: CoordinatorConfig, registry: Arc<dyn Registry>) -> Result<Self, CoordinatorError> {
        if config.models.is_empty() {
            return Err(CoordinatorError::Config("no model to serve".into()));
        }
        for (i, m) in config.models.iter().enumerate() {
            if config.models[..i].iter().any(|other| other.name == m.name) {
                return Err(CoordinatorError::Config(format!("model name {:?} is used twice", m.name)));
            }
        }
        let tls = config.api_tls.as_ref().map(ApiTls::new).transpose()?;
        let models = config.models.into_iter().map(|spec| ServedModel::load(spec).map(Arc::new)).collect::<Result<Vec<_>, _>>()?;
        for a in &config.adapters {
            let model = models
                .iter()
                .find(|m| if a.model.is_empty() { m.kind == crate::model::ModelKind::Decoder } else { m.name() == a.model })
                .ok_or_else(|| CoordinatorError::Config(format!("adapter {:?}: no served decoder {:?}", a.name, a.model)))?;
            model.adapters.register(&a.name, a.dir.clone()).map_err(|e| CoordinatorError::Config(format!("--lora {}: {e}", a.name)))?;
            tracing::info!(model = model.name(), adapter = %a.name, dir = %a.dir.display(), "adapter served");
        }
        tessera_registry::keys::validate_worker_id(&config.candidate)
            .map_err(|e| CoordinatorError::Config(format!("coordinator id: {e}")))?;
        let cluster = Cluster::new(models, config.cluster);
        let (resign, resigned) = oneshot::channel();
        let leader = tokio::spawn(crate::leadership::lead(cluster.clone(), registry, config.candidate, resigned));
        Ok(Self { cluster, limits: config.limits, leader, resign, tls, keys: config.api_keys })
    }

    /// Number of loaded groups; changes as groups form and are lost.
    pub fn serving_groups(&self) -> watch::Receiver<usize> {
        self.cluster.serving_groups()
    }

    /// Models whose workers refused them for good, by name with the reason; empty while every
    /// model loads or serves.
    pub fn failed_models(&self) -> watch::Receiver<Vec<(String, String)>> {
        self.cluster.failed_models()
    }

    /// Serves `GET /metrics` (Prometheus text format) on `listener` until the returned task is
    /// aborted.
    pub fn serve_metrics(&self, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        tokio::spawn(crate::prometheus::serve(listener, self.cluster.clone(), self.keys.clone()))
    }

    /// Serves the OpenAI-compatible HTTP API (`crate::http`) on `listener`, beside gRPC and
    /// onto the same service, until the returned task is aborted.
    pub fn serve_http(&self, listener: tokio::net::TcpListener, config: crate::http::HttpConfig) -> tokio::task::JoinHandle<()> {
        let config = crate::http::HttpConfig { tls: self.tls.as_ref().map(|t| t.http.clone()), api_keys: self.keys.clone(), ..config };
        tokio::spawn(crate::http::serve(listener, self.cluster.clone(), self.limits.clone(), config))
    }

    /// Serves gRPC on `listener` until `shutdown` resolves, then resigns the leadership; fails
    /// with [`CoordinatorError::LeadershipLost`] as soon as a leadership is lost.
    pub async fn serve(self, listener: tokio::net::TcpListener, shutdown: impl Future<Output = ()> + Send) -> Result<(), CoordinatorError> {
        let (reporter, health) = tonic_health::server::health_reporter();
        let health_task = tokio::spawn(report_health(reporter, self.cluster.serving_groups()));
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tessera_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| CoordinatorError::Internal(format!("reflection: {e}")))?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(tessera_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| CoordinatorError::Internal(format!("reflection: {e}")))?;
        let inference = InferenceServer::new(InferenceService::new(self.cluster.clone(), self.limits.clone(), self.keys.clone()));
        let router = crate::connection::grpc_server()
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(inference);
        let server: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send + '_>> = match &self.tls {
            // Accepted sockets need TCP_NODELAY set here (the builder's setting applies only to
            // sockets it binds itself); without it a streamed token can wait on Nagle's
            // algorithm and a delayed ACK. The TLS accept loop sets it too.
            None => Box::pin(router.serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown)),
            Some(tls) => {
                let incoming = tessera_tls::accept::incoming(listener, tls.grpc.clone(), AcceptConfig::new("client API (gRPC)"));
                Box::pin(router.serve_with_incoming_shutdown(incoming, shutdown))
            }
        };
        let mut leader = self.leader;
        let result = tokio::select! {
            served = server => served.map_err(CoordinatorError::from),
            // Dropping the server ends every stream with UNAVAILABLE: a successor may already
            // drive the workers they ran on.
            ended = &mut leader => return Err(leader_ended(ended)),
        };
        health_task.abort();
        // Hand over now rather than after a lease TTL.
        let _ = self.resign.send(());
        match leader.await {
            Ok(Ok(())) => result,
            ended => result.and(Err(leader_ended(ended))),
        }
    }
}

/// What the leadership task's end means for the server.
fn leader_ended(ended: Result<Result<(), CoordinatorError>, tokio::task::JoinError>) -> CoordinatorError {
    match ended {
        Ok(Err(error)) => error,
        Ok(Ok(())) => CoordinatorError::Internal("the leadership task stopped".into()),
        Err(join) => CoordinatorError::Internal(format!("the leadership task failed: {join}")),
    }
}

/// Mirrors "is any group serving" into the health service, for the whole server ("") and for
/// the inference service by name.
async fn report_health(reporter: tonic_health::server::HealthReporter, mut serving: watch::Receiver<usize>) {
    // "" is the process itself (liveness: a coordinator waiting for workers is alive and must
    // not be restarted); the inference service is ready only while a group serves.
    reporter.set_service_status("", ServingStatus::Serving).await;
    loop {
        let status = if *serving.borrow_and_update() > 0 { ServingStatus::Serving } else { ServingStatus::NotServing };
        reporter.set_service_status(INFERENCE_SERVICE, status).await;
        if serving.changed().await.is_err() {
            return;
        }
    }
}
