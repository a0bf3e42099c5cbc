//! The Llama-family causal LM, one implementation for every tensor-parallel size and for
//! sequence-parallel rings: `Model::forward` here and `Model::forward_ring` (in `ring.rs`) run
//! the same layers and differ only in the attention step they hand them.
//!
//! Its parts: what a call computes (`batch.rs`) and the checkpoint's shape (`config.rs`), how it
//! splits over ranks (`parallel.rs`, `sequence.rs`), how its weights load (`weights.rs`), the
//! layer and what it is built from (`layer.rs`, `attention.rs`, `rope.rs`, `linear.rs`,
//! `embedding.rs`), and the state a pass keeps (`kv_cache.rs`, `workspace.rs`). The arithmetic
//! they hand to the CPU lives in `crate::kernels`.

pub(crate) mod attention;
pub(crate) mod batch;
pub mod config;
pub(crate) mod embedding;
pub(crate) mod kv_cache;
pub(crate) mod kv_pool;
pub(crate) mod layer;
pub(crate) mod linear;
pub mod lora;
pub(crate) mod parallel;
pub(crate) mod prefix_cache;
pub(crate) mod ring;
pub(crate) mod rope;
pub(crate) mod sequence;
pub(crate) mod weights;
pub(crate) mod workspace;

use std::collections::HashSet;
use std::ops::Range;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::RmsNorm;
use tessera_collective::Collective;

use crate::error::{ModelError, Result};
use crate::kernels::elem::{output, Dest, Elem};
use crate::kernels::pool::ComputePool;
use crate::model::attention::{CacheAttention, ChunkMask};
use crate::model::batch::{Batch, LogitsMode};
use crate::model::config::ModelConfig;
use crate::model::embedding::Embedding;
use crate::model::kv_cache::{KvCache, KvCacheConfig, KvSpec};
use crate::model::layer::{AttentionStep, DecoderLayer, LayerStep};
use crate::model::linear::{Linear, Numerics, Quantization, Weight};
use crate::model::lora::{Adapter, LoraRows};
use crate::model::parallel::TpLayout;
use crate::model::rope::Rope;
use crate::model::weights::{Checkpoint, Shard};
use crate::model::workspace::{Scratch, Workspace};

/// How to load a model: where from, in which dtype, and which tensor-parallel rank this is.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Embeddings, norms, float weights, activations and the KV cache.
    pub dtype: DType,
    /// Block-quantize the linear projections (fused qkv, o, gate_up, down, lm_head) of this
    /// rank's shard after it is read; `None` keeps them in `dtype`. Projections a GGUF file
    /// stores quantized are used as stored whatever this says. Quantized products run in f32.
    pub quantization: Option<Quantization>,
    pub tp_rank: usize,
    pub tp_size: usize,
    pub device: Device,
    /// Dequantize the projections a GGUF file stores quantized into `dtype` on load, as
    /// transformers' GGUF loader does: the reference path for parity with it.
    pub dequantize: bool,
    /// Fast kernels, or one arithmetic per token whatever its batch ([`Numerics`]).
    pub numerics: Numerics,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            quantization: None,
            tp_rank: 0,
            tp_size: 1,
            device: Device::Cpu,
            dequantize: false,
            numerics: Numerics::Fast,
        }
    }
}

/// One rank's shard of a model.
pub struct Model {
    config: ModelConfig,
    layout: TpLayout,
    embed: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[vocab, hidden]`; the embedding matrix itself when tied and not quantized on load.
    lm_head: Linear,
    /// Whether `lm_head` is the embedding's own storage (not counted twice).
    head_shares_embedding: bool,
    rope: Rope,
    dtype: DType,
    device: Device,
    /// Distinct sliding windows over layers, so masks are built once per forward, not per layer.
    windows: Vec<Option<usize>>,
    /// Where CPU forward passes run (`pool.rs`); `None` on GPUs.
    pool: Option<ComputePool>,
    /// Decode steps' reused intermediates (`workspace.rs`).
    workspace: Mutex<Workspace>,
    numerics: Numerics,
}

impl Model {
    /// Loads this rank's shard of the model in `dir`: config.json plus safetensors, or plus one
    /// llama.cpp GGUF file. The tokenizer is not read here.
    pub fn load(dir: &Path, load: &LoadConfig) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        Self::load_with_config(dir, config, load)
    }

    /// Loads weights from `dir` for an already parsed `config`.
    pub fn load_with_config(dir: &Path, config: ModelConfig, load: &LoadConfig) -> Result<Self> {
        let start = Instant::now();
        if !matches!(load.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(ModelError::InvalidConfig(format!("models run in f32, bf16 or f16, not {:?}", load.dtype)));
        }
        crate::kernels::heap::keep_freed_buffers();
        let layout = TpLayout::new(&config, load.tp_rank, load.tp_size)?;
        let (rank, n_layers) = (load.tp_rank, config.num_hidden_layers);
        tracing::info!(
            dir = %dir.display(),
            rank,
            size = load.tp_size,
            dtype = load.dtype.as_str(),
            quantization = load.quantization.map(Quantization::name),
            layers = n_layers,
            "loading model shard"
        );
        let ckpt = Checkpoint::open(dir, load.dtype, &load.device)?.dequantizing(load.dequantize);
        if let Some((heads, kv)) = ckpt.permuted_heads() {
            if (heads, kv) != (config.num_attention_heads, config.num_key_value_heads) {
                return Err(ModelError::InvalidConfig(format!(
                    "the GGUF file was written for {heads} query / {kv} KV heads, config.json says {} / {}",
                    config.num_attention_heads, config.num_key_value_heads
                )));
            }
        }
        let (h, v) = (config.hidden_size, config.vocab_size);
        let embed_name = "model.embed_tokens.weight";
        // Kept quantized when the file stores it so (`embedding.rs`).
        let embed = Embedding::from_weight(ckpt.get_weight(embed_name, [v, h], Shard::FULL, None)?)
            .ok_or_else(|| ModelError::InvalidConfig(format!("{embed_name} is not one tensor")))?;
        let head_name = if config.tie_word_embeddings { embed_name } else { "lm_head.weight" };
        // Tied weights share the embedding's storage instead of a second copy, unless they are
        // to be quantized on load.
        let (lm_head, head_shares_embedding) = match (&embed, config.tie_word_embeddings, load.quantization) {
            (Embedding::Float(t), true, None) => (Weight::Float(t.clone()), true),
            (Embedding::Quantized(q), true, _) => (Weight::Quantized(q.clone()), true),
            _ => (ckpt.get_weight(head_name, [v, h], Shard::FULL, load.quantization)?, false),
        };
        let lm_head = Linear::new(lm_head, None).with_numerics(load.numerics);
        // A quarter of the layers between progress lines: a 70B shard takes minutes, and one
        // line per layer would bury everything else in the log.
        let every = n_layers.div_ceil(4).max(1);
        let layers = (0..n_layers)
            .map(|i| {
                let layer = DecoderLayer::load(&ckpt, &config, &layout, i, load.quantization)?.with_numerics(load.numerics);
                let done = i + 1;
                if done % every == 0 && done < n_layers {
                    tracing::info!(rank, secs = start.elapsed().as_secs_f64(), "loaded layers {done}/{n_layers}");
                }
                Ok(layer)
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(ckpt.get("model.norm.weight", &[h], Shard::FULL)?, config.rms_norm_eps);
        let mut windows: Vec<Option<usize>> = config.sliding_window.clone();
        windows.sort();
        windows.dedup();
        let secs = start.elapsed().as_secs_f64();
        let head_bytes = if head_shares_embedding { 0 } else { lm_head.bytes() };
        let held = (embed.bytes() + layers.iter().map(DecoderLayer::bytes).sum::<usize>() + head_bytes) as f64 / 1e6;
        tracing::info!(rank, layers = n_layers, secs, mb = held, mb_per_s = held / secs, "model shard loaded");
        Ok(Self {
            rope: Rope::new(&config),
            config,
            layout,
            embed,
            layers,
            norm,
            lm_head,
            head_shares_embedding,
            dtype: load.dtype,
            device: load.device.clone(),
            windows,
            pool: if load.device.is_cpu() { Some(ComputePool::new()?) } else { None },
            workspace: Mutex::new(Workspace::new(&load.device)),
            numerics: load.numerics,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Bytes of weights this rank holds: what the load log reports, and about the file's size
    /// for a quantized GGUF (its blocks are kept as stored).
    pub fn weight_bytes(&self) -> usize {
        let head = if self.head_shares_embedding { 0 } else { self.lm_head.bytes() };
        let norm = self.norm.weight().elem_count() * self.norm.weight().dtype().size_in_bytes();
        self.embed.bytes() + self.layers.iter().map(DecoderLayer::bytes).sum::<usize>() + head + norm
    }

    pub fn layout(&self) -> &TpLayout {
        &self.layout
    }

    /// An empty KV cache shaped for this rank, with an unbounded pool.
    pub fn new_kv_cache(&self) -> KvCache {
        self.new_kv_cache_with(KvCacheConfig::default())
    }

    /// An empty KV cache shaped for this rank, sized and shared as `config` says.
    pub fn new_kv_cache_with(&self, config: KvCacheConfig) -> KvCache {
        let spec = KvSpec {
            layers: self.config.num_hidden_layers,
            kv_heads: self.layout.kv_heads,
            head_dim: self.config.head_dim,
            dtype: self.dtype,
            device: self.device.clone(),
        };
        KvCache::with_config(spec, config)
    }

    /// Runs `batch` through the model, appending its keys and values to `kv`, and returns f32
    /// logits `[rows, vocab]` as chosen by `mode`. Every rank of the group must make the same
    /// call; all ranks return the same logits.
    pub fn forward(&self, batch: &Batch, kv: &mut KvCache, comm: &mut dyn Collective, mode: LogitsMode) -> Result<Tensor> {
        self.forward_adapted(batch, &[], kv, comm, mode)
    }

    /// [`Model::forward`] with LoRA adapters: chunk `i` of `batch` adds `adapters[i]`'s update
    /// to every product (`None`, or a shorter slice: the base alone). The base products still
    /// run once for the whole batch.
    pub fn forward_adapted(
        &self,
        batch: &Batch,
        adapters: &[Option<&Adapter>],
        kv: &mut KvCache,
        comm: &mut dyn Collective,
        mode: LogitsMode,
    ) -> Result<Tensor> {
        // A CPU pass runs on the model's pool (`pool.rs`) when the collective may be used from
        // another thread meanwhile, as every host backend may.
        if let (Some(pool), Some(comm)) = (&self.pool, comm.as_send()) {
            return pool.run(|| self.forward_here(batch, adapters, kv, comm, mode));
        }
        self.forward_here(batch, adapters, kv, comm, mode)
    }

    /// Loads this rank's share of the PEFT LoRA adapter in `dir` (`lora.rs`), checked against
    /// this model's shapes.
    pub fn load_adapter(&self, name: &str, dir: &Path) -> Result<Adapter> {
        Adapter::load(name, dir, &self.config, &self.layout)
    }

    fn forward_here(
        &self,
        batch: &Batch,
        adapters: &[Option<&Adapter>],
        kv: &mut KvCache,
        comm: &mut dyn Collective,
        mode: LogitsMode,
    ) -> Result<Tensor> {
        self.validate(batch)?;
        if adapters.len() > batch.chunks.len() {
            return Err(ModelError::InvalidBatch(format!("{} adapters for {} chunks", adapters.len(), batch.chunks.len())));
        }
        let lora = LoraRows::new(adapters, batch.chunks.iter().map(|c| c.len));
        for (i, c) in batch.chunks.iter().enumerate() {
            let namespace = adapters.get(i).copied().flatten().map_or(0, Adapter::identity);
            kv.prepare(c.seq, c.start, c.start + c.len, namespace)?;
        }

        let mut ws = self.workspace();
        let runs = batch.chunks.iter().map(|c| (c.start..c.start + c.len, c.start + c.len));
        let (cos, sin) = self.rope_tables(runs, &mut ws)?;
        // Kept in the workspace between steps; taken out while the layers borrow both.
        let mut masks = std::mem::take(&mut ws.masks);
        masks.resize_with(self.windows.len(), Default::default);
        for ((w, chunk_masks), window) in masks.iter_mut().zip(&self.windows) {
            *w = *window;
            chunk_masks.clear();
            for c in batch.chunks {
                chunk_masks.push(ChunkMask::new(c.start, c.len, *window));
            }
        }

        let mut attention = CacheAttention { batch, kv, masks: &masks, numerics: self.numerics };
        let h = self.run_layers(batch.tokens, [&cos, &sin], &mut attention, comm, &mut ws, lora.as_ref());
        ws.masks = masks;
        let h = h?;
        let mut offset = 0;
        for c in batch.chunks {
            kv.commit_tokens(c.seq, c.start, &batch.tokens[offset..offset + c.len])?;
            offset += c.len;
        }

        let h = match mode {
            // A step of one token per sequence has only last rows.
            LogitsMode::LastPerChunk if batch.tokens.len() > batch.chunks.len() => {
                let mut last = Vec::with_capacity(batch.chunks.len());
                let mut end = 0u32;
                for c in batch.chunks {
                    end += c.len as u32;
                    last.push(end - 1);
                }
                h.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?
            }
            _ => h,
        };
        self.head(&h)
    }

    /// The model's workspace for this forward pass, held until the pass has its logits (the
    /// layers' result may be one of its tensors); a private, empty one while another pass holds
    /// it (on another thread, or further up this one: a pool thread that took other work while
    /// waiting).
    pub(crate) fn workspace(&self) -> HeldWorkspace<'_> {
        match self.workspace.try_lock() {
            Ok(ws) => HeldWorkspace::Shared(ws),
            // A pass that failed part-way leaves nothing in the workspace that the next one reads.
            Err(TryLockError::Poisoned(poisoned)) => HeldWorkspace::Shared(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) => HeldWorkspace::Own(Box::new(Workspace::new(&self.device))),
        }
    }

    /// Rotary tables `[tokens, head_dim / 2]` for runs of positions, each with the length its
    /// sequence has after this call (which only dynamic NTK scaling reads).
    pub(crate) fn rope_tables(&self, runs: impl Iterator<Item = (Range<usize>, usize)>, ws: &mut Workspace) -> Result<(Tensor, Tensor)> {
        let half = self.rope.half_dim();
        let (mut cos, mut sin) = std::mem::take(&mut ws.rope);
        cos.clear();
        sin.clear();
        for (positions, seq_len) in runs {
            self.rope.extend_tables(positions, seq_len, &mut cos, &mut sin);
        }
        let shape = [cos.len() / half.max(1), half];
        let tables = (|| -> Result<_> {
            let [dc, ds] = ws.get_pair([Scratch::Cos, Scratch::Sin], &shape, self.dtype)?;
            Ok((table(&cos, &shape, self.dtype, dc.as_ref())?, table(&sin, &shape, self.dtype, ds.as_ref())?))
        })();
        ws.rope = (cos, sin);
        let (cos, sin) = tables?;
        Ok((cos.to_device(&self.device)?, sin.to_device(&self.device)?))
    }

    /// Embeds `tokens` and runs every layer over them; returns the final residual stream normed
    /// by the model's last norm (`[tokens, hidden]`), ready for [`Model::head`]. How attention
    /// reaches the cache is `attention`'s business; `lora` says which rows add which adapter.
    /// Intermediates live in `ws`, and so may the result: it is valid until the workspace's next
    /// pass.
    pub(crate) fn run_layers(
        &self,
        tokens: &[u32],
        rope: [&Tensor; 2],
        attention: &mut dyn AttentionStep,
        comm: &mut dyn Collective,
        ws: &mut Workspace,
        lora: Option<&LoraRows>,
    ) -> Result<Tensor> {
        let (n, hidden) = (tokens.len(), self.config.hidden_size);
        let stream = [n, hidden];
        let x = self.embed.lookup(tokens, self.dtype, ws.get(Scratch::X0, &stream, self.dtype)?.as_ref())?;
        // Each layer hands the next its input norm, computed with its last residual add; the
        // last layer's is the model's final norm.
        let first_norm = self.layers.first().map_or(&self.norm, DecoderLayer::input_norm);
        let mut h = match crate::kernels::fused::rms_norm(
            &x,
            first_norm.weight(),
            first_norm.eps(),
            ws.get(Scratch::H0, &stream, self.dtype)?.as_ref(),
        )? {
            Some(h) => h,
            None => first_norm.forward(&x)?,
        };
        let mut x = x;
        let rows = attention.rows();
        let mut step = LayerStep { rope, attention, comm, ws, lora, rows };
        for (i, layer) in self.layers.iter().enumerate() {
            let next_norm = self.layers.get(i + 1).map_or(&self.norm, DecoderLayer::input_norm);
            (x, h) = layer.forward(&x, &h, next_norm, &mut step)?;
        }
        Ok(h)
    }

    /// f32 logits `[rows, vocab]` of final-normed rows `h` ([`Model::run_layers`]'s result).
    pub(crate) fn head(&self, h: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward_no_bias(h)?.to_dtype(DType::F32)?)
    }

    pub(crate) fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// Distinct sliding windows over layers (`None`: full causal attention).
    pub(crate) fn windows(&self) -> &[Option<usize>] {
        &self.windows
    }

    pub(crate) fn dtype(&self) -> DType {
        self.dtype
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// Refuses token ids outside the vocabulary: they would index past the embedding.
    pub(crate) fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.config.vocab_size;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::InvalidBatch(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        Ok(())
    }

    fn validate(&self, batch: &Batch) -> Result<()> {
        if batch.chunks.is_empty() {
            return Err(ModelError::InvalidBatch("a batch needs at least one chunk".into()));
        }
        let total: usize = batch.chunks.iter().map(|c| c.len).sum();
        if total != batch.tokens.len() {
            return Err(ModelError::InvalidBatch(format!("chunks cover {total} tokens but the batch has {}", batch.tokens.len())));
        }
        for c in batch.chunks {
            if c.len == 0 {
                return Err(ModelError::InvalidBatch(format!("empty chunk for sequence {}", c.seq)));
            }
        }
        let repeated = if batch.chunks.len() <= 64 {
            // A step's few sequences: pairs, without building a set each step.
            let c = batch.chunks;
            (0..c.len()).find_map(|i| c[i + 1..].iter().find(|d| d.seq == c[i].seq).map(|d| d.seq))
        } else {
            let mut seen = HashSet::with_capacity(batch.chunks.len());
            batch.chunks.iter().find(|c| !seen.insert(c.seq)).map(|c| c.seq)
        };
        if let Some(seq) = repeated {
            return Err(ModelError::InvalidBatch(format!("sequence {seq} appears twice in one batch")));
        }
        self.check_tokens(batch.tokens)
    }
}

/// A forward pass's hold on a workspace: the model's own, or a private one.
pub(crate) enum HeldWorkspace<'a> {
    Shared(MutexGuard<'a, Workspace>),
    Own(Box<Workspace>),
}

impl std::ops::Deref for HeldWorkspace<'_> {
    type Target = Workspace;
    fn deref(&self) -> &Workspace {
        match self {
            Self::Shared(ws) => ws,
            Self::Own(ws) => ws,
        }
    }
}

impl std::ops::DerefMut for HeldWorkspace<'_> {
    fn deref_mut(&mut self) -> &mut Workspace {
        match self {
            Self::Shared(ws) => ws,
            Self::Own(ws) => ws,
        }
    }
}

/// A rotary table in `dtype`, from its f32 values, into `dest` where given.
fn table(values: &[f32], shape: &[usize; 2], dtype: DType, dest: Option<&Dest>) -> Result<Tensor> {
    fn convert<T: Elem>(out: &mut [T], values: &[f32]) {
        out.iter_mut().zip(values).for_each(|(o, v)| *o = T::from_f32(*v));
    }
    Ok(match dtype {
        DType::F32 => output::<f32>(dest, shape, |out| convert(out, values))?,
        DType::BF16 => output::<half::bf16>(dest, shape, |out| convert(out, values))?,
        DType::F16 => output::<half::f16>(dest, shape, |out| convert(out, values))?,
        other => Tensor::from_slice(values, shape, &Device::Cpu)?.to_dtype(other)?,
    })
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{test_fixtures, write_fixture, WriteOptions};

    /// At tp=1 in the file's own dtype a shard is the whole checkpoint, so the bytes held
    /// equal the tensor bytes in the file; every fixture shape (biases, tying, GQA) is covered.
    #[test]
    fn weight_bytes_match_the_checkpoint_at_tp1() {
        let root = std::env::temp_dir().join(format!("tessera-weight-bytes-{}", std::process::id()));
        for spec in test_fixtures() {
            let dir = write_fixture(&spec, &root, &WriteOptions::default()).unwrap();
            let file = std::fs::read(dir.join("model.safetensors")).unwrap();
            let tensors = safetensors::SafeTensors::deserialize(&file).unwrap();
            let in_file: usize = tensors.tensors().iter().map(|(_, t)| t.data().len()).sum();
            let model = Model::load(&dir, &LoadConfig::default()).unwrap();
            assert_eq!(model.weight_bytes(), in_file, "{}", spec.name);
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Quantized projections count their blocks' bytes (q8_0: 34 bytes per 32 weights), the
    /// rest stays f32; a tied lm_head becomes a second, quantized matrix.
    #[test]
    fn weight_bytes_count_quantized_blocks() {
        let root = std::env::temp_dir().join(format!("tessera-weight-bytes-q8-{}", std::process::id()));
        let spec = test_fixtures().into_iter().find(|s| s.name == "qwen2-tied").unwrap();
        let dir = write_fixture(&spec, &root, &WriteOptions::default()).unwrap();
        let load = LoadConfig { quantization: Some(Quantization::Q8_0), ..LoadConfig::default() };
        let q8 = Model::load(&dir, &load).unwrap().weight_bytes();
        // Per layer: qkv 96×64, o 64×64, gate/up/down 3 × 128×64 weights; q/k/v biases (96)
        // and two norms (128). Then the 320×64 embedding and the final norm (64).
        let matrices = 2 * (96 * 64 + 64 * 64 + 3 * 128 * 64) + 320 * 64;
        let floats = 2 * (96 + 128) + 320 * 64 + 64;
        assert_eq!(q8, floats * 4 + matrices / 32 * 34);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A quantized GGUF is held as stored: SmolLM2-135M's Q4_1 file, embedding included, takes
    /// about the file's size (the file adds its tokenizer and metadata), not the 540 MB its
    /// weights take in f32.
    #[test]
    fn a_q4_1_gguf_is_held_at_about_its_file_size() {
        let path = crate::fixture::smollm2_gguf();
        let file = std::fs::metadata(&path).unwrap().len() as usize;
        let held = Model::load(&path, &LoadConfig::default()).unwrap().weight_bytes();
        println!("SmolLM2 Q4_1: file {file} bytes, weights held {held} bytes");
        assert!(held <= file && held * 100 >= file * 95, "held {held} bytes for a {file}-byte file");
    }
}
