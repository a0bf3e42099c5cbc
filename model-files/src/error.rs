//! Why a model path cannot be read.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("invalid GGUF file {path}: {reason}")]
    InvalidGguf { path: PathBuf, reason: String },
    /// A GGUF problem before the path is known (`GgufHeader::from_reader`).
    #[error("{0}")]
    Gguf(String),
    /// The model's family is not one Tessera implements.
    #[error("unsupported architecture {0}")]
    UnsupportedArchitecture(String),
    #[error("unsupported rope type {0}")]
    UnsupportedRopeType(String),
    /// Anything else wrong with the files' content; the message names the file and the key.
    #[error("{0}")]
    Invalid(String),
    /// A LoRA adapter whose configuration Tessera cannot serve.
    #[error("adapter {dir} refused: {reason}")]
    InvalidAdapter { dir: PathBuf, reason: String },
}

pub type Result<T> = std::result::Result<T, FilesError>;
