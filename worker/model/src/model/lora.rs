//! LoRA adapters (PEFT's `adapter_config.json` + `adapter_model.safetensors`) and the low-rank
//! update they add to a layer's products.
//!
//! An adapter changes a projection `y = x Wᵀ` to `y = x Wᵀ + s · (x Aᵀ) Bᵀ` with `A` `[r, in]`,
//! `B` `[out, r]` and `s = alpha / r` (`alpha / √r` with rsLoRA). The base product runs once for
//! a whole batch whatever adapters its rows use; each row then adds its own adapter's update
//! (`apply`), so requests for different adapters, and for none, share one step (as Punica and
//! S-LoRA batch them).
//!
//! Tensor parallelism splits an adapter like its base layer: for the column-parallel products
//! (q, k, v, gate, up) `B` is split by the rows of the output and `A` is whole; for the
//! row-parallel ones (o, down) `A` is split by the input columns and `B` is whole, so each rank's
//! update is a partial sum that the layer's one all-reduce adds up with the base product's.
//!
//! Adapters are small (a few MB per rank in f32 for a 135M model at rank 16), so they are kept in
//! f32 whatever the model's dtype, `B` pre-scaled by `s` and transposed so that the update is a
//! few `axpy`s over the output row.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
pub use tessera_model_files::adapter::{read_adapter_config, AdapterConfig, LORA_TARGETS, MAX_LORA_RANK};

use crate::error::{ModelError, Result};
use crate::kernels::elem::{is_slice, with_dest_mut, with_slice, with_slice_mut, Dest, Elem};
use crate::kernels::pool::with_reused;
use crate::model::config::ModelConfig;
use crate::model::parallel::TpLayout;
use crate::model::weights::{Checkpoint, Shard};

fn bad(dir: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::InvalidAdapter { dir: dir.to_path_buf(), reason: reason.into() }
}

/// One projection's update on this rank, into output columns `offset..offset + out` of the
/// layer's (possibly fused) product.
#[derive(Debug, Clone)]
struct LoraPart {
    /// `A`, `[r, in]` (this rank's input columns for a row-parallel product).
    a: Vec<f32>,
    /// `s · Bᵀ`, `[r, out]` (this rank's output rows for a column-parallel product).
    bt: Vec<f32>,
    rank: usize,
    inner: usize,
    offset: usize,
    out: usize,
}

/// An adapter's updates of one of a layer's four products (`Proj`); the fused ones have a part
/// per projection the adapter targets.
#[derive(Debug, Clone, Default)]
struct ProjLora {
    parts: Vec<LoraPart>,
}

/// A layer's four products, as [`crate::model::layer::DecoderLayer`] runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proj {
    Qkv = 0,
    O = 1,
    GateUp = 2,
    Down = 3,
}

/// One rank's share of a loaded adapter.
#[derive(Debug)]
pub struct Adapter {
    name: String,
    dir: PathBuf,
    config: AdapterConfig,
    /// Per layer, per [`Proj`].
    layers: Vec<[ProjLora; 4]>,
    /// Targeted projections, in [`LORA_TARGETS`] order.
    targets: Vec<&'static str>,
    /// Names the adapter's weights for the prefix cache: blocks computed with one adapter are
    /// never reused by another (or by the base).
    identity: u64,
    bytes: usize,
}

/// Where a projection sits in a layer: its module path, fused product, whether it is
/// row-parallel, its full `[out, in]`, and this rank's slice of the fused output.
struct Site {
    module: &'static str,
    proj: Proj,
    row_parallel: bool,
    full: [usize; 2],
    /// How this rank reads `B` (column-parallel) or `A` (row-parallel).
    shard: Shard,
    offset: usize,
    out: usize,
}

fn sites(cfg: &ModelConfig, layout: &TpLayout) -> [Site; 7] {
    let (h, d, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q_out, kv_out) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
    let (q_rank, kv_rank, i_rank) = (layout.heads * d, layout.kv_heads * d, layout.intermediate);
    let (col, row, kv) = (layout.column(), layout.row(), layout.kv_shard);
    let site = |module, proj, row_parallel, full, shard, offset, out| Site { module, proj, row_parallel, full, shard, offset, out };
    [
        site("self_attn.q_proj", Proj::Qkv, false, [q_out, h], col, 0, q_rank),
        site("self_attn.k_proj", Proj::Qkv, false, [kv_out, h], kv, q_rank, kv_rank),
        site("self_attn.v_proj", Proj::Qkv, false, [kv_out, h], kv, q_rank + kv_rank, kv_rank),
        site("self_attn.o_proj", Proj::O, true, [h, q_out], row, 0, h),
        site("mlp.gate_proj", Proj::GateUp, false, [inter, h], col, 0, i_rank),
        site("mlp.up_proj", Proj::GateUp, false, [inter, h], col, i_rank, i_rank),
        site("mlp.down_proj", Proj::Down, true, [h, inter], row, 0, h),
    ]
}

/// `base_model.model.model.layers.{i}.{module}.lora_{A|B}[.adapter].weight` → (layer, module, A?).
fn parse_name(name: &str) -> Option<(usize, &str, bool)> {
    let rest = name.strip_prefix("base_model.model.model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer = layer.parse().ok()?;
    let rest = rest.strip_suffix(".weight")?;
    let (module, which) = rest.rsplit_once(".lora_")?;
    // PEFT saves without the adapter's name; some tools keep `.default`.
    let which = which.strip_suffix(".default").unwrap_or(which);
    match which {
        "A" => Some((layer, module, true)),
        "B" => Some((layer, module, false)),
        _ => None,
    }
}

impl Adapter {
    /// Loads this rank's share of the PEFT adapter in `dir` for a model of `cfg` split as
    /// `layout`, refusing with the reason an adapter that does not fit it.
    pub fn load(name: &str, dir: &Path, cfg: &ModelConfig, layout: &TpLayout) -> Result<Self> {
        let config = read_adapter_config(dir)?;
        let file = dir.join("adapter_model.safetensors");
        if !file.exists() {
            return Err(bad(dir, "adapter_model.safetensors not found (adapter_model.bin, a pickle, is not read)"));
        }
        let ckpt = Checkpoint::open_file(&file, DType::F32, &Device::Cpu)?;
        let sites = sites(cfg, layout);
        let mut layers: Vec<[ProjLora; 4]> = (0..cfg.num_hidden_layers).map(|_| Default::default()).collect();
        let mut targets = BTreeSet::new();
        let mut names = ckpt.names();
        names.sort();
        let mut pairs = 0;
        for tensor in &names {
            let Some((layer, module, is_a)) = parse_name(tensor) else {
                return Err(bad(dir, format!("tensor {tensor:?} is not a LoRA A or B of a decoder layer's projection")));
            };
            let Some((index, site)) = sites.iter().enumerate().find(|(_, s)| s.module == module) else {
                return Err(bad(dir, format!("tensor {tensor:?} targets {module:?}, not one of {}", LORA_TARGETS.join(", "))));
            };
            if layer >= cfg.num_hidden_layers {
                return Err(bad(dir, format!("tensor {tensor:?} is for layer {layer}, the model has {}", cfg.num_hidden_layers)));
            }
            if !is_a {
                continue;
            }
            let b_name = tensor.replacen(".lora_A", ".lora_B", 1);
            if !ckpt.contains(&b_name) {
                return Err(bad(dir, format!("{tensor:?} has no matching {b_name:?}")));
            }
            let r = config.rank;
            let [out, inner] = site.full;
            let shape_error = |name: &str, expected: Vec<usize>, actual: Vec<usize>| {
                bad(dir, format!("tensor {name:?} has shape {actual:?}, expected {expected:?} (rank r = {r}; the base's {module} is [{out}, {inner}])"))
            };
            let (a_shape, b_shape) = (ckpt.shape(tensor).unwrap_or_default(), ckpt.shape(&b_name).unwrap_or_default());
            if a_shape != [r, inner] {
                return Err(shape_error(tensor, vec![r, inner], a_shape));
            }
            if b_shape != [out, r] {
                return Err(shape_error(&b_name, vec![out, r], b_shape));
            }
            let (a_shard, b_shard) =
                if site.row_parallel { (Shard::cols(site.shard.index, site.shard.parts), Shard::FULL) } else { (Shard::FULL, site.shard) };
            let a = ckpt.get(tensor, &[r, inner], a_shard)?;
            let b = ckpt.get(&b_name, &[out, r], b_shard)?;
            let scale = config.scale();
            let bt = (b.t()?.contiguous()? * scale)?;
            let part = LoraPart {
                inner: a.dim(1)?,
                a: a.flatten_all()?.to_vec1()?,
                out: bt.dim(1)?,
                bt: bt.flatten_all()?.to_vec1()?,
                rank: r,
                offset: site.offset,
            };
            if part.out != site.out {
                return Err(bad(dir, format!("{b_name:?}: {} output rows on this rank, expected {}", part.out, site.out)));
            }
            layers[layer][site.proj as usize].parts.push(part);
            targets.insert(index);
            pairs += 1;
        }
        if pairs == 0 {
            return Err(bad(dir, "adapter_model.safetensors holds no LoRA weights"));
        }
        let identity = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            let weights = std::fs::read(&file).map_err(|source| ModelError::Io { path: file.clone(), source })?;
            (weights, config.rank, config.alpha.to_bits(), config.use_rslora).hash(&mut h);
            h.finish()
        };
        let bytes = layers.iter().flatten().flat_map(|p| &p.parts).map(|p| (p.a.len() + p.bt.len()) * 4).sum();
        Ok(Self {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            config,
            layers,
            targets: targets.into_iter().map(|i| LORA_TARGETS[i]).collect(),
            identity,
            bytes,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    /// The projections the adapter updates.
    pub fn targets(&self) -> &[&'static str] {
        &self.targets
    }

    /// Names the adapter's weights; see [`crate::KvCache::reuse_prefix_for`].
    pub fn identity(&self) -> u64 {
        self.identity
    }

    /// Bytes this rank holds for the adapter.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Which adapter each row of a forward pass uses (`None`: the base alone).
pub(crate) struct LoraRows<'a> {
    rows: Vec<Option<&'a Adapter>>,
}

impl<'a> LoraRows<'a> {
    /// Rows of chunks of `lens` tokens, chunk `i` using `adapters[i]`; `None` when no row uses
    /// an adapter, so a pass without adapters does no work for them.
    pub fn new(adapters: &[Option<&'a Adapter>], lens: impl Iterator<Item = usize>) -> Option<Self> {
        if adapters.iter().all(Option::is_none) {
            return None;
        }
        let mut rows = Vec::new();
        for (a, len) in adapters.iter().zip(lens) {
            rows.extend(std::iter::repeat_n(*a, len));
        }
        Some(Self { rows })
    }

    /// Adds each row's update of `layer`'s product `proj` to `y` (`[rows, out]`, the product of
    /// `x`, `[rows, in]`), in place: through `dest` when it holds `y`, else in `y`'s own storage.
    /// The update is summed in f32 and rounded into `y` once per element.
    pub fn apply(&self, layer: usize, proj: Proj, x: &Tensor, y: &Tensor, dest: Option<&Dest>) -> Result<()> {
        let done = match y.dtype() {
            DType::F32 => self.apply_typed::<f32>(layer, proj, x, y, dest)?,
            DType::BF16 => self.apply_typed::<half::bf16>(layer, proj, x, y, dest)?,
            DType::F16 => self.apply_typed::<half::f16>(layer, proj, x, y, dest)?,
            _ => false,
        };
        if !done {
            return Err(ModelError::InvalidBatch(format!("LoRA needs contiguous CPU f32, bf16 or f16 rows, got {:?}", y.dtype())));
        }
        Ok(())
    }

    fn apply_typed<T: Elem>(&self, layer: usize, proj: Proj, x: &Tensor, y: &Tensor, dest: Option<&Dest>) -> Result<bool> {
        let (rows, width) = y.dims2()?;
        if rows != self.rows.len() || !is_slice::<T>(x) {
            return Ok(false);
        }
        let inner = x.dim(1)?;
        let update = |y: &mut [T], x: &[T]| {
            y.par_chunks_mut(width).zip(x.par_chunks(inner)).zip(&self.rows).for_each(|((y, x), adapter)| {
                if let Some(adapter) = adapter {
                    for part in &adapter.layers[layer][proj as usize].parts {
                        add_update(part, x, &mut y[part.offset..part.offset + part.out]);
                    }
                }
            })
        };
        let dest = dest.filter(|d| d.holds(y));
        let done = with_slice::<T, _>(x, |x| match dest {
            Some(dest) => with_dest_mut::<T, _>(dest, |y| update(y, x)),
            None => with_slice_mut::<T, _>(y, |y| update(y, x)),
        });
        Ok(done.transpose()?.flatten().is_some())
    }
}

thread_local! {
    /// A row's `A x` and its f32 update, kept between calls.
    static ROW: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `y += (s Bᵀ)ᵀ (A x)` for one row.
fn add_update<T: Elem>(part: &LoraPart, x: &[T], y: &mut [T]) {
    let dot = T::dot_kernel();
    with_reused(&ROW, |(t, acc)| {
        t.clear();
        t.extend(part.a.chunks_exact(part.inner).map(|a| dot(x, a)));
        acc.clear();
        acc.resize(part.out, 0.0);
        for (k, &tk) in t.iter().enumerate().take(part.rank) {
            let b = &part.bt[k * part.out..(k + 1) * part.out];
            acc.iter_mut().zip(b).for_each(|(acc, b)| *acc += tk * b);
        }
        y.iter_mut().zip(acc.iter()).for_each(|(y, d)| *y = T::from_f32(y.to_f32() + d));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_as_peft_writes_them() {
        assert_eq!(parse_name("base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"), Some((3, "self_attn.q_proj", true)));
        assert_eq!(parse_name("base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight"), Some((0, "mlp.down_proj", false)));
        assert_eq!(parse_name("base_model.model.lm_head.lora_A.weight"), None);
        assert_eq!(parse_name("base_model.model.model.layers.x.mlp.up_proj.lora_A.weight"), None);
        assert_eq!(parse_name("base_model.model.model.layers.1.mlp.up_proj.lora_embedding_A"), None);
    }

    #[test]
    fn rslora_scales_by_the_square_root_of_the_rank() {
        let c = AdapterConfig { rank: 16, alpha: 32.0, use_rslora: false, base_model: None };
        assert_eq!(c.scale(), 2.0);
        assert_eq!(AdapterConfig { use_rslora: true, ..c }.scale(), 8.0);
    }

    /// One row's update against the plain sum, in f32 and through bf16 rounding.
    #[test]
    fn a_rows_update_is_the_low_rank_product() {
        let (rank, inner, out) = (3, 5, 4);
        let a: Vec<f32> = (0..rank * inner).map(|i| (i as f32 * 0.37).sin()).collect();
        let bt: Vec<f32> = (0..rank * out).map(|i| (i as f32 * 0.91).cos()).collect();
        let part = LoraPart { a: a.clone(), bt: bt.clone(), rank, inner, offset: 0, out };
        let x: Vec<f32> = (0..inner).map(|i| i as f32 - 2.0).collect();
        let mut y = vec![1.0f32; out];
        add_update(&part, &x, &mut y);
        for (o, y) in y.iter().enumerate() {
            let t = |k: usize| (0..inner).map(|i| a[k * inner + i] * x[i]).sum::<f32>();
            let want = 1.0 + (0..rank).map(|k| t(k) * bt[k * out + o]).sum::<f32>();
            assert!((y - want).abs() < 1e-5, "column {o}: {y} vs {want}");
        }
        let xb: Vec<half::bf16> = x.iter().map(|v| half::bf16::from_f32(*v)).collect();
        let mut yb = vec![half::bf16::ONE; out];
        add_update(&part, &xb, &mut yb);
        for (b, f) in yb.iter().zip(&y) {
            assert!((b.to_f32() - f).abs() <= f.abs() / 128.0 + 1e-6, "{b} vs {f}");
        }
    }
}
