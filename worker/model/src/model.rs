//! The Llama-family causal LM, one implementation for every tensor-parallel size and for
//! sequence-parallel rings: `Model::forward` here and `Model::forward_ring` (in `ring.rs`) run
//! the same layers and differ only in the attention step they hand them.

use std::collections::HashSet;
use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::RmsNorm;
use tessera_collective::Collective;

use crate::attention::{CacheAttention, ChunkMask};
use crate::batch::{Batch, LogitsMode};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kv_cache::{KvCache, KvSpec};
use crate::layer::{AttentionStep, DecoderLayer};
use crate::linear::{Linear, Quantization, Weight};
use crate::parallel::TpLayout;
use crate::pool::ComputePool;
use crate::rope::Rope;
use crate::weights::{Checkpoint, Shard};

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
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self { dtype: DType::F32, quantization: None, tp_rank: 0, tp_size: 1, device: Device::Cpu }
    }
}

/// One rank's shard of a model.
pub struct Model {
    config: ModelConfig,
    layout: TpLayout,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[vocab, hidden]`; the embedding matrix itself when tied and not quantized.
    lm_head: Linear,
    rope: Rope,
    dtype: DType,
    device: Device,
    /// Distinct sliding windows over layers, so masks are built once per forward, not per layer.
    windows: Vec<Option<usize>>,
    /// Where CPU forward passes run (`pool.rs`); `None` on GPUs.
    pool: Option<ComputePool>,
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
        crate::heap::keep_freed_buffers();
        let layout = TpLayout::new(&config, load.tp_rank, load.tp_size)?;
        let (rank, n_layers) = (load.tp_rank, config.num_hidden_layers);
        let mb = shard_bytes(&config, &layout, load.dtype, load.quantization) as f64 / 1e6;
        tracing::info!(
            dir = %dir.display(),
            rank,
            size = load.tp_size,
            dtype = load.dtype.as_str(),
            quantization = load.quantization.map(Quantization::name),
            layers = n_layers,
            mb,
            "loading model shard"
        );
        let ckpt = Checkpoint::open(dir, load.dtype, &load.device)?;
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
        let embed = ckpt.get(embed_name, &[v, h], Shard::FULL)?;
        let head_name = if config.tie_word_embeddings { embed_name } else { "lm_head.weight" };
        let lm_head = match ckpt.get_weight(head_name, [v, h], Shard::FULL, load.quantization)? {
            // Tied float weights share the embedding's storage instead of a second copy.
            Weight::Float(_) if config.tie_word_embeddings => Weight::Float(embed.clone()),
            w => w,
        };
        let lm_head = Linear::new(lm_head, None);
        // A quarter of the layers between progress lines: a 70B shard takes minutes, and one
        // line per layer would bury everything else in the log.
        let every = n_layers.div_ceil(4).max(1);
        let layers = (0..n_layers)
            .map(|i| {
                let layer = DecoderLayer::load(&ckpt, &config, &layout, i, load.quantization)?;
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
        tracing::info!(rank, layers = n_layers, secs, mb_per_s = mb / secs, "model shard loaded");
        Ok(Self {
            rope: Rope::new(&config),
            config,
            layout,
            embed,
            layers,
            norm,
            lm_head,
            dtype: load.dtype,
            device: load.device.clone(),
            windows,
            pool: if load.device.is_cpu() { Some(ComputePool::new()?) } else { None },
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn layout(&self) -> &TpLayout {
        &self.layout
    }

    /// An empty KV cache shaped for this rank.
    pub fn new_kv_cache(&self) -> KvCache {
        KvCache::new(KvSpec {
            layers: self.config.num_hidden_layers,
            kv_heads: self.layout.kv_heads,
            head_dim: self.config.head_dim,
            dtype: self.dtype,
            device: self.device.clone(),
        })
    }

    /// Runs `batch` through the model, appending its keys and values to `kv`, and returns f32
    /// logits `[rows, vocab]` as chosen by `mode`. Every rank of the group must make the same
    /// call; all ranks return the same logits.
    pub fn forward(
        &self,
        batch: &Batch,
        kv: &mut KvCache,
        comm: &mut dyn Collective,
        mode: LogitsMode,
    ) -> Result<Tensor> {
        match &self.pool {
            Some(pool) => pool.run(|| self.forward_here(batch, kv, comm, mode)),
            None => self.forward_here(batch, kv, comm, mode),
        }
    }

    fn forward_here(&self, batch: &Batch, kv: &mut KvCache, comm: &mut dyn Collective, mode: LogitsMode) -> Result<Tensor> {
        self.validate(batch)?;
        for c in batch.chunks {
            kv.prepare(c.seq, c.start, c.start + c.len)?;
        }

        let runs: Vec<(Range<usize>, usize)> =
            batch.chunks.iter().map(|c| (c.start..c.start + c.len, c.start + c.len)).collect();
        let (cos, sin) = self.rope_tables(&runs)?;
        let masks: Vec<(Option<usize>, Vec<ChunkMask>)> = self
            .windows
            .iter()
            .map(|w| {
                let masks = batch.chunks.iter().map(|c| ChunkMask::new(c.start, c.len, *w, &self.device));
                Ok((*w, masks.collect::<Result<_>>()?))
            })
            .collect::<Result<_>>()?;

        let mut attention = CacheAttention { batch, kv, masks: &masks };
        let x = self.run_layers(batch.tokens, &cos, &sin, &mut attention, comm)?;
        for c in batch.chunks {
            kv.commit(c.seq, c.start + c.len)?;
        }

        let x = match mode {
            LogitsMode::All => x,
            LogitsMode::LastPerChunk => {
                let mut last = Vec::with_capacity(batch.chunks.len());
                let mut end = 0u32;
                for c in batch.chunks {
                    end += c.len as u32;
                    last.push(end - 1);
                }
                x.index_select(&Tensor::new(last.as_slice(), &self.device)?, 0)?
            }
        };
        self.logits(&x)
    }

    /// Rotary tables `[tokens, head_dim / 2]` for runs of positions, each with the length its
    /// sequence has after this call (which only dynamic NTK scaling reads).
    pub(crate) fn rope_tables(&self, runs: &[(Range<usize>, usize)]) -> Result<(Tensor, Tensor)> {
        let half = self.rope.half_dim();
        let tokens: usize = runs.iter().map(|(r, _)| r.len()).sum();
        let mut cos = Vec::with_capacity(tokens * half);
        let mut sin = Vec::with_capacity(tokens * half);
        for (positions, seq_len) in runs {
            self.rope.extend_tables(positions.clone(), *seq_len, &mut cos, &mut sin);
        }
        let cos = Tensor::from_vec(cos, (tokens, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (tokens, half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// Embeds `tokens` and runs every layer over them; returns the final residual stream
    /// `[tokens, hidden]`. How attention reaches the cache is `attention`'s business.
    pub(crate) fn run_layers(
        &self,
        tokens: &[u32],
        cos: &Tensor,
        sin: &Tensor,
        attention: &mut dyn AttentionStep,
        comm: &mut dyn Collective,
    ) -> Result<Tensor> {
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let Some(first) = self.layers.first() else {
            return Ok(x);
        };
        // Each layer hands the next its input norm, computed with its last residual add.
        let mut h = first.input_norm().forward(&x)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let next_norm = self.layers.get(i + 1).map(DecoderLayer::input_norm);
            let (x_next, h_next) = layer.forward(&x, &h, next_norm, [cos, sin], attention, comm)?;
            x = x_next;
            if let Some(h_next) = h_next {
                h = h_next;
            }
        }
        Ok(x)
    }

    /// f32 logits `[rows, vocab]` of final residual-stream rows `x`.
    pub(crate) fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(x)?;
        Ok(self.lm_head.forward_no_bias(&x)?.to_dtype(DType::F32)?)
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
            return Err(ModelError::InvalidBatch(format!(
                "chunks cover {total} tokens but the batch has {}",
                batch.tokens.len()
            )));
        }
        let mut seen = HashSet::with_capacity(batch.chunks.len());
        for c in batch.chunks {
            if c.len == 0 {
                return Err(ModelError::InvalidBatch(format!("empty chunk for sequence {}", c.seq)));
            }
            if !seen.insert(c.seq) {
                return Err(ModelError::InvalidBatch(format!("sequence {} appears twice in one batch", c.seq)));
            }
        }
        self.check_tokens(batch.tokens)
    }
}

/// Bytes of `layout`'s weights once loaded in `dtype` (projections in `quant`, if given), from
/// the shapes alone, so the first progress line can say how much is coming before any of it is
/// read. A GGUF file's own quantization is not seen here, so its shards count as `dtype`.
fn shard_bytes(cfg: &ModelConfig, layout: &TpLayout, dtype: DType, quant: Option<Quantization>) -> u64 {
    let n = |x: usize| x as u64;
    let (h, v, d) = (n(cfg.hidden_size), n(cfg.vocab_size), n(cfg.head_dim));
    let (q, kv, inter) = (n(layout.heads) * d, n(layout.kv_heads) * d, n(layout.intermediate));
    let matrices = (q + 2 * kv) * h + h * q + 3 * inter * h;
    let biases = [(cfg.qkv_bias, q + 2 * kv), (cfg.o_bias, h), (cfg.mlp_bias, 2 * inter + h)]
        .iter()
        .filter(|(present, _)| *present)
        .map(|(_, size)| size)
        .sum::<u64>();
    let layers = n(cfg.num_hidden_layers);
    let lm_head = if cfg.tie_word_embeddings && quant.is_none() { 0 } else { v * h };
    let float_params = layers * (biases + 2 * h) + v * h + h;
    let elem = n(dtype.size_in_bytes());
    match quant {
        None => (float_params + layers * matrices + lm_head) * elem,
        Some(q) => float_params * elem + q.bytes(layers * matrices + lm_head),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{test_fixtures, write_fixture, WriteOptions};

    /// At tp=1 in the file's own dtype a shard is the whole checkpoint, so the estimate must
    /// equal the tensor bytes in the file; every fixture shape (biases, tying, GQA) is covered.
    #[test]
    fn shard_bytes_match_the_checkpoint_at_tp1() {
        let root = std::env::temp_dir().join(format!("tessera-shard-bytes-{}", std::process::id()));
        for spec in test_fixtures() {
            let dir = write_fixture(&spec, &root, &WriteOptions::default()).unwrap();
            let file = std::fs::read(dir.join("model.safetensors")).unwrap();
            let tensors = safetensors::SafeTensors::deserialize(&file).unwrap();
            let in_file: u64 = tensors.tensors().iter().map(|(_, t)| t.data().len() as u64).sum();
            let config = ModelConfig::from_dir(&dir).unwrap();
            let layout = TpLayout::new(&config, 0, 1).unwrap();
            assert_eq!(shard_bytes(&config, &layout, DType::F32, None), in_file, "{}", spec.name);
            assert_eq!(shard_bytes(&config, &layout, DType::BF16, None) * 2, in_file, "{}", spec.name);
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Quantized projections count their blocks' bytes (q8_0: 34 bytes per 32 weights), the
    /// rest stays in `dtype`; a tied lm_head becomes a second, quantized matrix.
    #[test]
    fn shard_bytes_count_quantized_blocks() {
        let spec = test_fixtures().into_iter().find(|s| s.name == "qwen2-tied").unwrap();
        let config = ModelConfig::from_json_bytes(spec.config.to_string().as_bytes()).unwrap();
        let layout = TpLayout::new(&config, 0, 1).unwrap();
        let float = shard_bytes(&config, &layout, DType::F32, None);
        let q8 = shard_bytes(&config, &layout, DType::F32, Some(Quantization::Q8_0));
        // Per layer: qkv 96×64, o 64×64, gate/up/down 3 × 128×64 weights; q/k/v biases (96)
        // and two norms (128). Then the 320×64 embedding and the final norm (64).
        let matrices = 2 * (96 * 64 + 64 * 64 + 3 * 128 * 64) + 320 * 64;
        let floats = 2 * (96 + 128) + 320 * 64 + 64;
        assert_eq!(float, (floats + matrices - 320 * 64) * 4);
        assert_eq!(q8, floats * 4 + matrices / 32 * 34);
    }
}
