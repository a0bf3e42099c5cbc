//! Coordinator errors and their one mapping to gRPC status codes.
//!
//! Every message says what was wrong and, for limits, what the limit is: a client reading only
//! the status message must be able to fix its request.

/// Everything a request or the coordinator's start-up can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The client sent something out of range or malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request names a model this coordinator does not serve.
    #[error("{0}")]
    NotFound(String),
    /// No group can serve right now (none formed yet, or the group was lost mid-request).
    #[error("{0}")]
    Unavailable(String),
    /// No API key, or one this coordinator does not know (one message for both).
    #[error("{0}")]
    Unauthenticated(String),
    /// The client's deadline passed before the request could start.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The bounded queue is full, or an API key is over one of its limits; retry later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The name is taken (a LoRA adapter registered from another directory).
    #[error("{0}")]
    AlreadyExists(String),
    /// The call is switched off on this coordinator (run-time adapter loading without
    /// `--allow-adapter-loading`).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A served model's files cannot be used.
    #[error("model {name}: {reason}")]
    Model { name: String, reason: String },
    /// The model is configured but its workers could not load it (a permanent error, such as
    /// a tensor of an unsupported type); it serves nothing until the operator fixes it.
    #[error("{0}")]
    ModelFailed(String),
    /// Configuration the coordinator cannot start with.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// This coordinator led the cluster and lost its lease: a successor may drive the workers
    /// now, so it must stop serving.
    #[error("leadership lost ({0}); another coordinator may lead now")]
    LeadershipLost(String),
    /// A bug or an unexpected answer from a worker.
    #[error("internal error: {0}")]
    Internal(String),
    #[error("cannot serve: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Registry(#[from] tessera_registry::RegistryError),
    #[error(transparent)]
    Tls(#[from] tessera_tls::TlsError),
}

impl From<CoordinatorError> for tonic::Status {
    fn from(e: CoordinatorError) -> Self {
        use tonic::Code;
        let code = match &e {
            CoordinatorError::InvalidArgument(_) => Code::InvalidArgument,
            CoordinatorError::NotFound(_) => Code::NotFound,
            CoordinatorError::Unavailable(_) | CoordinatorError::LeadershipLost(_) => Code::Unavailable,
            CoordinatorError::ResourceExhausted(_) => Code::ResourceExhausted,
            CoordinatorError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            CoordinatorError::Unauthenticated(_) => Code::Unauthenticated,
            CoordinatorError::ModelFailed(_) | CoordinatorError::FailedPrecondition(_) => Code::FailedPrecondition,
            CoordinatorError::AlreadyExists(_) => Code::AlreadyExists,
            CoordinatorError::Model { .. }
            | CoordinatorError::Config(_)
            | CoordinatorError::Internal(_)
            | CoordinatorError::Transport(_)
            | CoordinatorError::Registry(_)
            | CoordinatorError::Tls(_) => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}

pub(crate) fn invalid(msg: impl Into<String>) -> CoordinatorError {
    CoordinatorError::InvalidArgument(msg.into())
}
