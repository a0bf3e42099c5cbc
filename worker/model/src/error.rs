//! Errors of the model crate: one enum callers can branch on.

use std::path::PathBuf;

use tessera_collective::CollectiveError;

/// Why loading or running a model failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the model's compute threads: {0}")]
    ThreadPool(#[from] rayon::ThreadPoolBuildError),
    #[error("{path} is not a valid model config: {source}")]
    ConfigJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("unsupported architecture {0:?}: expected LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM")]
    UnsupportedArchitecture(String),
    #[error("unsupported rope type {0:?}: expected default, linear, dynamic, yarn or llama3")]
    UnsupportedRopeType(String),
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    #[error("checkpoint has no tensor {name:?}")]
    MissingTensor { name: String },
    #[error("tensor {name:?} has shape {actual:?}, expected {expected:?}")]
    TensorShape { name: String, expected: Vec<usize>, actual: Vec<usize> },
    #[error("tensor {name:?} has unsupported dtype {dtype}")]
    TensorDtype { name: String, dtype: String },
    #[error("cannot split {what} = {size} evenly over tensor-parallel size {tp}")]
    UnevenSplit { what: &'static str, size: usize, tp: usize },
    #[error("invalid safetensors checkpoint {path}: {source}")]
    Safetensors {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    /// A quantized projection whose rows (this rank's shard of them) do not fill whole blocks.
    #[error("tensor {name:?}: its input length {len} on this rank is not a multiple of the {format} block of {block}")]
    QuantBlock { name: String, len: usize, block: usize, format: String },
    #[error("invalid GGUF file {path}: {source}")]
    Gguf {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    /// A LoRA adapter that does not fit the model, or uses what Tessera does not implement.
    #[error("adapter {dir} refused: {reason}")]
    InvalidAdapter { dir: PathBuf, reason: String },
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// Every block of the KV pool is in use; the caller's room check should have refused the
    /// step first.
    #[error("the KV pool is full: all {blocks} blocks are in use")]
    KvFull { blocks: usize },
    /// An encoder input longer than the model's positions; nothing is cut silently.
    #[error("input {index} has {len} tokens, more than the model's {max}")]
    SequenceTooLong { index: usize, len: usize, max: usize },
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result of model operations.
pub type Result<T> = std::result::Result<T, ModelError>;

impl From<tessera_model_files::FilesError> for ModelError {
    fn from(e: tessera_model_files::FilesError) -> Self {
        use tessera_model_files::FilesError as F;
        match e {
            F::Io { path, source } => Self::Io { path, source },
            F::Json { path, source } => Self::ConfigJson { path, source },
            F::UnsupportedArchitecture(a) => Self::UnsupportedArchitecture(a),
            F::UnsupportedRopeType(r) => Self::UnsupportedRopeType(r),
            F::InvalidAdapter { dir, reason } => Self::InvalidAdapter { dir, reason },
            other => Self::InvalidConfig(other.to_string()),
        }
    }
}
