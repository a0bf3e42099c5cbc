//! Sharded reads from safetensors checkpoints, or from a single llama.cpp GGUF file
//! (`gguf.rs`), always under Hugging Face tensor names.
//!
//! Each rank memory-maps the checkpoint files and copies out only its own slice of each tensor,
//! so a rank touches roughly `1 / tp` of the weight bytes. Shapes are checked against the config
//! before slicing, so a wrong checkpoint fails with the tensor's name instead of garbage.
//! Projection weights may be quantized: shard first, then quantize, so every rank's blocks are
//! whole rows of its own shard (`get_weight`).

pub(crate) mod gguf;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use candle_core::quantized::QTensor;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::model::linear::{Quantization, Weight};
use gguf::GgufFile;

/// Which part of a tensor a rank reads: block `index` of `parts` equal blocks along `dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub dim: usize,
    pub index: usize,
    pub parts: usize,
}

impl Shard {
    /// The whole tensor.
    pub const FULL: Shard = Shard { dim: 0, index: 0, parts: 1 };

    pub fn rows(index: usize, parts: usize) -> Self {
        Self { dim: 0, index, parts }
    }

    pub fn cols(index: usize, parts: usize) -> Self {
        Self { dim: 1, index, parts }
    }
}

/// The memory-mapped weight files of one model directory.
pub struct Checkpoint {
    source: Source,
    dir: PathBuf,
    dtype: DType,
    device: Device,
    /// Read quantized GGUF projections as float tensors (`LoadConfig::dequantize`).
    dequantize: bool,
}

enum Source {
    Safetensors {
        files: MmapedSafetensors,
        /// Every tensor name, to tell a missing tensor from a broken file.
        names: HashSet<String>,
    },
    Gguf(GgufFile),
}

#[derive(Deserialize)]
struct SafetensorsIndex {
    weight_map: HashMap<String, String>,
}

impl Checkpoint {
    /// Opens `model.safetensors`, or every file listed by `model.safetensors.index.json`, or
    /// else the directory's only `*.gguf` file. Float tensors are converted to `dtype` as they
    /// are read.
    /// `dir` may also be a GGUF file itself.
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if dir.is_file() {
            let file = GgufFile::open(dir)?;
            let parent = dir.parent().map(Path::to_path_buf).unwrap_or_default();
            return Ok(Self { source: Source::Gguf(file), dir: parent, dtype, device: device.clone(), dequantize: false });
        }
        let has_safetensors = dir.join("model.safetensors").exists() || dir.join("model.safetensors.index.json").exists();
        if !has_safetensors {
            if let Some(path) = tessera_model_files::find_gguf(dir)? {
                let file = GgufFile::open(&path)?;
                return Ok(Self { source: Source::Gguf(file), dir: dir.to_path_buf(), dtype, device: device.clone(), dequantize: false });
            }
        }
        let index_path = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index_path.exists() {
            let bytes = std::fs::read(&index_path).map_err(|source| ModelError::Io { path: index_path.clone(), source })?;
            let index: SafetensorsIndex =
                serde_json::from_slice(&bytes).map_err(|source| ModelError::ConfigJson { path: index_path.clone(), source })?;
            let mut files: Vec<&String> = index.weight_map.values().collect();
            files.sort();
            files.dedup();
            for f in &files {
                if f.contains('/') || f.contains("..") {
                    return Err(ModelError::InvalidConfig(format!("index names a file outside the model directory: {f:?}")));
                }
            }
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        for p in &paths {
            if !p.exists() {
                return Err(ModelError::Io {
                    path: p.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "safetensors file not found"),
                });
            }
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader we assume nobody
        // truncates them while the model is loading.
        let files =
            unsafe { MmapedSafetensors::multi(&paths) }.map_err(|source| ModelError::Safetensors { path: dir.to_path_buf(), source })?;
        let names = files.tensors().into_iter().map(|(name, _)| name).collect();
        Ok(Self { source: Source::Safetensors { files, names }, dir: dir.to_path_buf(), dtype, device: device.clone(), dequantize: false })
    }

    /// Opens one safetensors file (a LoRA adapter's `adapter_model.safetensors`).
    pub fn open_file(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        // SAFETY: as in `open`: mapped read-only, and nobody truncates it while it is read.
        let files =
            unsafe { MmapedSafetensors::new(path) }.map_err(|source| ModelError::Safetensors { path: path.to_path_buf(), source })?;
        let names = files.tensors().into_iter().map(|(name, _)| name).collect();
        let dir = path.to_path_buf();
        Ok(Self { source: Source::Safetensors { files, names }, dir, dtype, device: device.clone(), dequantize: false })
    }

    /// Every tensor name of a safetensors checkpoint (none for GGUF).
    pub fn names(&self) -> Vec<String> {
        match &self.source {
            Source::Safetensors { names, .. } => names.iter().cloned().collect(),
            Source::Gguf(_) => Vec::new(),
        }
    }

    /// The shape of safetensors tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.source {
            Source::Safetensors { files, names } if names.contains(name) => files.get(name).ok().map(|v| v.shape().to_vec()),
            _ => None,
        }
    }

    /// Reads projections a GGUF file stores quantized as float tensors of the checkpoint's
    /// dtype instead of keeping their blocks.
    pub fn dequantizing(mut self, dequantize: bool) -> Self {
        self.dequantize = dequantize;
        self
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Safetensors { names, .. } => names.contains(name),
            Source::Gguf(g) => g.contains(name),
        }
    }

    /// Query and KV head counts a GGUF file's q/k rows were interleaved with (llama.cpp's
    /// converter), so the loader can check them against the config; `None` for other files.
    pub fn permuted_heads(&self) -> Option<(usize, usize)> {
        match &self.source {
            Source::Gguf(g) => g.permuted_heads(),
            Source::Safetensors { .. } => None,
        }
    }

    /// Reads this rank's `shard` of projection `name` (`[out, in]`, full shape `full_shape`).
    /// Quantized in the file: kept as stored. Float in the file: quantized to `quant` after
    /// sharding, if given. The shard's `in` length must fill whole quantization blocks.
    pub fn get_weight(&self, name: &str, full_shape: [usize; 2], shard: Shard, quant: Option<Quantization>) -> Result<Weight> {
        if let Source::Gguf(g) = &self.source {
            if g.is_quantized(name) && !self.dequantize {
                let q = g.get(name, &full_shape, shard)?.into_qtensor(&self.device)?;
                return Ok(Weight::Quantized(std::sync::Arc::new(q)));
            }
        }
        let t = self.get(name, &full_shape, shard)?;
        let Some(quant) = quant else { return Ok(Weight::Float(t)) };
        let len = t.dim(1)?;
        if !len.is_multiple_of(quant.block()) {
            return Err(ModelError::QuantBlock { name: name.into(), len, block: quant.block(), format: quant.name().into() });
        }
        let q = QTensor::quantize(&t.to_dtype(DType::F32)?, quant.ggml())?;
        Ok(Weight::Quantized(std::sync::Arc::new(q)))
    }

    /// Reads this rank's `shard` of tensor `name`, whose full shape must be `full_shape`.
    pub fn get(&self, name: &str, full_shape: &[usize], shard: Shard) -> Result<Tensor> {
        let files = match &self.source {
            Source::Safetensors { files, .. } => files,
            Source::Gguf(g) => {
                let t = g.get(name, full_shape, shard)?.into_tensor(&self.device)?;
                return Ok(if t.dtype() == self.dtype { t } else { t.to_dtype(self.dtype)? });
            }
        };
        if !self.contains(name) {
            return Err(ModelError::MissingTensor { name: name.to_string() });
        }
        let view = files.get(name).map_err(|source| ModelError::Safetensors { path: self.dir.clone(), source })?;
        let shape = view.shape().to_vec();
        if shape != full_shape {
            return Err(ModelError::TensorShape { name: name.into(), expected: full_shape.to_vec(), actual: shape });
        }
        let src_dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => return Err(ModelError::TensorDtype { name: name.into(), dtype: format!("{other:?}") }),
        };
        let elem = src_dtype.size_in_bytes();
        let data = view.data();

        let (bytes, out_shape) = if shard.parts == 1 {
            (std::borrow::Cow::Borrowed(data), shape)
        } else {
            let size = *shape
                .get(shard.dim)
                .ok_or_else(|| ModelError::InvalidConfig(format!("tensor {name:?} has no dimension {} to shard", shard.dim)))?;
            if size % shard.parts != 0 {
                return Err(ModelError::UnevenSplit { what: "tensor dimension", size, tp: shard.parts });
            }
            let block = size / shard.parts;
            let mut out_shape = shape.clone();
            out_shape[shard.dim] = block;
            // Bytes of one index step along `dim`, and how many independent runs there are.
            let inner: usize = shape[shard.dim + 1..].iter().product::<usize>() * elem;
            let outer: usize = shape[..shard.dim].iter().product();
            let run = block * inner;
            let stride = size * inner;
            let start = shard.index * run;
            let bytes = if outer == 1 {
                // Row blocks are contiguous: one slice of the mapping.
                std::borrow::Cow::Borrowed(&data[start..start + run])
            } else {
                let mut buf = Vec::with_capacity(outer * run);
                for o in 0..outer {
                    let s = o * stride + start;
                    buf.extend_from_slice(&data[s..s + run]);
                }
                std::borrow::Cow::Owned(buf)
            };
            (bytes, out_shape)
        };
        let t = Tensor::from_raw_buffer(&bytes, src_dtype, &out_shape, &self.device)?;
        Ok(if src_dtype == self.dtype { t } else { t.to_dtype(self.dtype)? })
    }
}
