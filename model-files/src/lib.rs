//! What a model path holds, read the way current tools write it: Hugging Face directories
//! (`config.json`, `tokenizer.json`, the chat template in any of its three homes,
//! `generation_config.json`) and llama.cpp GGUF files, whose metadata carries the same
//! information. Only headers and small files are read, never tensors: the coordinator uses this
//! crate to validate and tokenize without a tensor library, the workers to find their weights.

pub mod adapter;
mod error;
mod family;
mod files;
pub mod gguf;
pub mod tokenizer;

pub use error::{FilesError, Result};
pub use family::{decoder_architecture, DECODERS};
pub use files::{find_gguf, ChatTemplateText, ModelFiles, SamplingDefaults};
pub use gguf::GgufHeader;
