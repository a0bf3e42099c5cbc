//! BERT-family encoders for sentence embeddings, following Hugging Face transformers'
//! `BertModel` (post-LN layers, exact GELU) and sentence-transformers' `Pooling` / `Normalize`.
//!
//! Tensor-parallel size 1 only: an encoder this size runs whole on one worker. A batch of
//! token-id sequences is padded on the right to its longest member and masked, so padding never
//! changes a vector. A sequence longer than sentence-transformers' `max_seq_length` (else
//! `max_position_embeddings`) is refused ([`ModelError::SequenceTooLong`]); callers that want
//! truncation cut the ids themselves and say so.

mod config;

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::LayerNorm;

pub use config::{is_bert_dir, max_seq_length, Activation, BertConfig, Pooling, SentenceHead};

use crate::error::{ModelError, Result};
use crate::model::linear::Linear;
use crate::model::weights::{Checkpoint, Shard};

/// Tensor-name lookups that tolerate the `bert.` prefix (`BertForMaskedLM`-style checkpoints)
/// and TF-era `gamma`/`beta` LayerNorm names.
struct Names<'a> {
    ckpt: &'a Checkpoint,
    prefix: &'static str,
}

impl Names<'_> {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.ckpt.get(&format!("{}{name}", self.prefix), shape, Shard::FULL)
    }

    fn linear(&self, name: &str, out: usize, inp: usize) -> Result<Linear> {
        let w = self.tensor(&format!("{name}.weight"), &[out, inp])?;
        let b = self.tensor(&format!("{name}.bias"), &[out])?;
        Ok(Linear::new(w, Some(b)))
    }

    fn layer_norm(&self, name: &str, size: usize, eps: f64) -> Result<LayerNorm> {
        let (w, b) = if self.ckpt.contains(&format!("{}{name}.gamma", self.prefix)) { ("gamma", "beta") } else { ("weight", "bias") };
        let weight = self.tensor(&format!("{name}.{w}"), &[size])?;
        let bias = self.tensor(&format!("{name}.{b}"), &[size])?;
        Ok(LayerNorm::new(weight, bias, eps))
    }
}

struct EncoderLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

impl EncoderLayer {
    fn load(n: &Names, cfg: &BertConfig, i: usize) -> Result<Self> {
        let (h, m, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let p = format!("encoder.layer.{i}");
        Ok(Self {
            query: n.linear(&format!("{p}.attention.self.query"), h, h)?,
            key: n.linear(&format!("{p}.attention.self.key"), h, h)?,
            value: n.linear(&format!("{p}.attention.self.value"), h, h)?,
            attn_out: n.linear(&format!("{p}.attention.output.dense"), h, h)?,
            attn_norm: n.layer_norm(&format!("{p}.attention.output.LayerNorm"), h, eps)?,
            intermediate: n.linear(&format!("{p}.intermediate.dense"), m, h)?,
            output: n.linear(&format!("{p}.output.dense"), h, m)?,
            out_norm: n.layer_norm(&format!("{p}.output.LayerNorm"), h, eps)?,
        })
    }

    /// `x`: `[batch * len, hidden]`; `mask`: additive `[batch, 1, 1, len]`.
    fn forward(&self, x: &Tensor, mask: &Tensor, cfg: &BertConfig, batch: usize, len: usize) -> Result<Tensor> {
        let (heads, d) = (cfg.num_attention_heads, cfg.head_dim());
        let split = |t: Tensor| -> candle_core::Result<Tensor> { t.reshape((batch, len, heads, d))?.transpose(1, 2)?.contiguous() };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((batch * len, cfg.hidden_size))?;
        let x = self.attn_norm.forward(&(self.attn_out.forward(&ctx)? + x)?)?;
        let mid = self.intermediate.forward(&x)?;
        let mid = match cfg.activation {
            Activation::Gelu => mid.gelu_erf()?,
            Activation::GeluTanh => mid.gelu()?,
        };
        Ok(self.out_norm.forward(&(self.output.forward(&mid)? + x)?)?)
    }
}

/// A BERT encoder with its sentence-transformers head, in f32.
pub struct BertModel {
    cfg: BertConfig,
    head: SentenceHead,
    /// The longest input: sentence-transformers' `max_seq_length`, at most the positions.
    max_tokens: usize,
    word: Tensor,
    position: Tensor,
    token_type0: Tensor,
    embed_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    device: Device,
}

impl BertModel {
    /// Loads `config.json`, `model.safetensors` (or its index) and the sentence-transformers
    /// pooling files from a Hugging Face directory.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg = BertConfig::from_dir(dir)?;
        let head = SentenceHead::from_dir(dir)?;
        // The vectors sentence-transformers gives are of inputs cut to max_seq_length; a longer
        // input would give a vector no reference matches, so it is refused instead.
        let max_tokens = max_seq_length(dir)?.map_or(cfg.max_position_embeddings, |n| n.min(cfg.max_position_embeddings));
        let ckpt = Checkpoint::open(dir, DType::F32, device)?;
        let prefix = if ckpt.contains("bert.embeddings.word_embeddings.weight") { "bert." } else { "" };
        let n = Names { ckpt: &ckpt, prefix };
        let h = cfg.hidden_size;
        let word = n.tensor("embeddings.word_embeddings.weight", &[cfg.vocab_size, h])?;
        let position = n.tensor("embeddings.position_embeddings.weight", &[cfg.max_position_embeddings, h])?;
        let token_type0 = n.tensor("embeddings.token_type_embeddings.weight", &[cfg.type_vocab_size, h])?.narrow(0, 0, 1)?;
        let embed_norm = n.layer_norm("embeddings.LayerNorm", h, cfg.layer_norm_eps)?;
        let layers = (0..cfg.num_hidden_layers).map(|i| EncoderLayer::load(&n, &cfg, i)).collect::<Result<_>>()?;
        Ok(Self { cfg, head, max_tokens, word, position, token_type0, embed_norm, layers, device: device.clone() })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    pub fn head(&self) -> SentenceHead {
        self.head
    }

    /// Length of every vector [`Self::embed`] returns.
    pub fn dim(&self) -> usize {
        self.cfg.hidden_size
    }

    /// The longest input, in tokens (special tokens included): `max_seq_length` from
    /// `sentence_bert_config.json` when set, at most `max_position_embeddings`.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// One vector per sequence of token ids (already tokenized, special tokens included;
    /// token type 0 throughout). Errors: an empty batch or sequence, or an id outside the
    /// vocabulary → [`ModelError::InvalidBatch`]; a sequence longer than [`Self::max_tokens`]
    /// → [`ModelError::SequenceTooLong`].
    pub fn embed<S: AsRef<[u32]>>(&self, seqs: &[S]) -> Result<Vec<Vec<f32>>> {
        if seqs.is_empty() {
            return Err(ModelError::InvalidBatch("no sequences to embed".into()));
        }
        for (index, s) in seqs.iter().enumerate() {
            let s = s.as_ref();
            if s.is_empty() {
                return Err(ModelError::InvalidBatch(format!("input {index} has no tokens")));
            }
            if s.len() > self.max_tokens() {
                return Err(ModelError::SequenceTooLong { index, len: s.len(), max: self.max_tokens() });
            }
            if let Some(&bad) = s.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
                return Err(ModelError::InvalidBatch(format!(
                    "input {index} has token id {bad}, outside the vocabulary of {}",
                    self.cfg.vocab_size
                )));
            }
        }
        let batch = seqs.len();
        let len = seqs.iter().map(|s| s.as_ref().len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(batch * len);
        let mut keep = Vec::with_capacity(batch * len);
        for s in seqs {
            let s = s.as_ref();
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(self.cfg.pad_token_id, len - s.len()));
            keep.extend(std::iter::repeat_n(1f32, s.len()));
            keep.extend(std::iter::repeat_n(0f32, len - s.len()));
        }
        let ids = Tensor::from_vec(ids, batch * len, &self.device)?;
        let keep = Tensor::from_vec(keep, (batch, len), &self.device)?;
        // transformers' extended mask: 0 where attended, the dtype's minimum where padded.
        let mask = ((keep.ones_like()? - &keep)? * f64::from(f32::MIN))?.reshape((batch, 1, 1, len))?;

        let h = self.cfg.hidden_size;
        let pos = self.position.narrow(0, 0, len)?;
        let x = self.word.index_select(&ids, 0)?.reshape((batch, len, h))?.broadcast_add(&pos)?.broadcast_add(&self.token_type0)?;
        let mut x = self.embed_norm.forward(&x)?.reshape((batch * len, h))?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask, &self.cfg, batch, len)?;
        }
        let x = x.reshape((batch, len, h))?;
        let pooled = match self.head.pooling {
            Pooling::Cls => x.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => {
                let summed = x.broadcast_mul(&keep.unsqueeze(2)?)?.sum(1)?;
                let counts = keep.sum_keepdim(1)?.clamp(1e-9, f64::MAX)?;
                summed.broadcast_div(&counts)?
            }
        };
        let pooled = if self.head.normalize {
            // torch.nn.functional.normalize: x / max(‖x‖₂, 1e-12).
            let norm = pooled.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
            pooled.broadcast_div(&norm)?
        } else {
            pooled
        };
        Ok(pooled.to_vec2()?)
    }
}
