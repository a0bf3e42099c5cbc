//! Worker errors and their one mapping to gRPC status codes.

use tessera_collective::CollectiveError;
use tessera_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("worker is not in group {0:?}")]
    WrongGroup(String),
    #[error("worker is {state}, cannot {action}")]
    BadState { state: &'static str, action: &'static str },
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("KV memory exhausted: {needed} blocks of {block} tokens needed, capacity {capacity} blocks", block = tessera_model::KV_BLOCK_TOKENS)]
    KvExhausted { needed: u64, capacity: u64 },
    #[error("group collective failed: {0}")]
    Collective(#[from] CollectiveError),
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The model's files cannot be served as they are (bad config, unknown architecture,
    /// missing or misshapen tensor, unsupported tensor type): retrying cannot help.
    /// Boxed: a second inline `ModelError` would double the size of every `Result` here.
    #[error("cannot load the model: {0}")]
    Load(Box<ModelError>),
    #[error("cannot bind the collective endpoint: {0}")]
    Bind(std::io::Error),
    #[error("worker engine has stopped")]
    EngineGone,
    /// Assignments are paused (see `Admission`): the worker lost its registration and the
    /// coordinator already counts it as gone, so it must not join a group until it is back.
    #[error("worker is re-registering after losing its lease; not taking new work")]
    NotAccepting,
    /// A ring call named a ring this worker does not hold (or it holds none).
    #[error("worker is not in ring {0:?}")]
    WrongRing(String),
    /// The worker's ring is in the wrong phase for the call (e.g. stepped before it was joined).
    #[error("worker's ring {ring:?} is {state}, cannot {action}")]
    RingState { ring: String, state: &'static str, action: &'static str },
    /// Another rank of the ring refused a ring step; every rank refused it, nothing changed.
    #[error("ring step refused by member(s) {members:?} of the ring; nothing was computed")]
    RingRefused { members: Vec<usize> },
    /// A LoRA adapter that cannot be read or does not fit the model; the group is unaffected.
    #[error("{0}")]
    Adapter(Box<ModelError>),
    /// A decoder call on an encoder group or the reverse (e.g. `Step` on a BERT encoder).
    #[error("group {group:?} serves {loaded}, which cannot {action}")]
    WrongModelKind { group: String, loaded: &'static str, action: &'static str },
}

impl WorkerError {
    /// Sorts a model-loading error: file-system and collective errors may pass (a mount not
    /// ready yet, a peer restarting), anything about the files' content will not.
    pub fn loading(e: ModelError) -> Self {
        match e {
            ModelError::Io { .. } | ModelError::Collective(_) | ModelError::ThreadPool(_) => Self::Model(e),
            e => Self::Load(Box::new(e)),
        }
    }

    /// An adapter's loading error: the client's to fix, whatever it is.
    pub fn adapter(e: ModelError) -> Self {
        Self::Adapter(Box::new(e))
    }
}

impl From<WorkerError> for tonic::Status {
    fn from(e: WorkerError) -> Self {
        use tonic::Code;
        let code = match &e {
            WorkerError::WrongGroup(_) | WorkerError::BadState { .. } | WorkerError::WrongRing(_) | WorkerError::RingState { .. } => {
                Code::FailedPrecondition
            }
            WorkerError::RingRefused { .. } => Code::Aborted,
            WorkerError::InvalidArgument(_) | WorkerError::WrongModelKind { .. } | WorkerError::Adapter(_) => Code::InvalidArgument,
            WorkerError::KvExhausted { .. } => Code::ResourceExhausted,
            WorkerError::Collective(_) | WorkerError::EngineGone | WorkerError::NotAccepting => Code::Unavailable,
            WorkerError::Model(ModelError::InvalidBatch(_) | ModelError::UnknownSequence(_) | ModelError::SequenceTooLong { .. }) => {
                Code::InvalidArgument
            }
            WorkerError::Model(ModelError::Collective(_)) => Code::Unavailable,
            WorkerError::Model(_) | WorkerError::Bind(_) => Code::Internal,
            WorkerError::Load(_) => Code::FailedPrecondition,
        };
        let permanent = matches!(e, WorkerError::Load(_));
        let mut status = tonic::Status::new(code, e.to_string());
        if permanent {
            status.metadata_mut().insert(tessera_proto::PERMANENT_ERROR_KEY, tonic::metadata::MetadataValue::from_static("1"));
        }
        status
    }
}
