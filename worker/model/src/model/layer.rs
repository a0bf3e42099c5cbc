//! One decoder layer: attention and SwiGLU MLP, each ending in an all-reduce.
//!
//! The layer is the same for a rank alone, a tensor-parallel group and a sequence-parallel
//! ring: everything in it is per token except the step that reads other tokens' keys and
//! values, which the caller passes in as an [`AttentionStep`].

use candle_core::{DType, Module, Tensor, D};
use candle_nn::RmsNorm;
use tessera_collective::{all_reduce_tensor, Collective};

use crate::error::Result;
use crate::kernels::elem::{with_dest_mut, Dest, Elem};
use crate::kernels::fused::{self, Heads};
use crate::kernels::pool::with_reused;
use crate::model::config::ModelConfig;
use crate::model::linear::{Linear, Numerics, Quantization, StepRows, Weight};
use crate::model::lora::{LoraRows, Proj};
use crate::model::parallel::TpLayout;
use crate::model::weights::{Checkpoint, Shard};
use crate::model::workspace::{Scratch, Workspace};

pub struct DecoderLayer {
    index: usize,
    input_norm: RmsNorm,
    post_attention_norm: RmsNorm,
    /// Fused `[q | k | v]` projection of this rank's heads (column-parallel).
    qkv: Linear,
    /// Row-parallel output projection.
    o: Linear,
    /// Fused `[gate | up]` projection of this rank's features (column-parallel).
    gate_up: Linear,
    /// Row-parallel down projection.
    down: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    /// Sliding attention window of this layer.
    pub window: Option<usize>,
}

/// What every layer of one forward pass works with besides its input rows.
pub struct LayerStep<'a> {
    /// cos and sin tables `[tokens, head_dim / 2]` of the tokens' positions.
    pub rope: [&'a Tensor; 2],
    /// How this pass reaches other tokens' keys and values.
    pub attention: &'a mut dyn AttentionStep,
    /// The tensor-parallel group's collective.
    pub comm: &'a mut dyn Collective,
    /// Where the intermediates go (`workspace.rs`).
    pub ws: &'a mut Workspace,
    /// Which LoRA adapter each row adds to the products (`lora.rs`); `None` when no row uses one.
    pub lora: Option<&'a LoraRows<'a>>,
    /// Whether the step holds a prefill chunk, which picks the products' kernels.
    pub rows: StepRows,
}

/// Which layer an attention step is serving: where its cache lives and which mask it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerSlot {
    pub index: usize,
    pub window: Option<usize>,
}

/// The part of a layer that sees other tokens: store this call's keys and values where the
/// cache keeps them, and attend the queries to every key they may see.
pub trait AttentionStep {
    /// `q`: `[tokens, heads, head_dim]`; `k`, `v`: `[tokens, kv_heads, head_dim]`; q and k
    /// already rotated. Returns `[tokens, heads * head_dim]`, written into `dest` (a decode
    /// step's workspace tensor) where the step can.
    fn attend(&mut self, layer: LayerSlot, q: &Tensor, k: &Tensor, v: &Tensor, dest: Option<&Dest>) -> Result<Tensor>;

    /// What rows the step carries: a prefill chunk among them makes every product a GEMM.
    fn rows(&self) -> StepRows;
}

fn norm(ckpt: &Checkpoint, name: &str, size: usize, eps: f64) -> Result<RmsNorm> {
    Ok(RmsNorm::new(ckpt.get(name, &[size], Shard::FULL)?, eps))
}

fn optional_bias(ckpt: &Checkpoint, present: bool, name: &str, size: usize, shard: Shard) -> Result<Option<Tensor>> {
    if present {
        Ok(Some(ckpt.get(name, &[size], shard)?))
    } else {
        Ok(None)
    }
}

impl DecoderLayer {
    /// Loads layer `index` of this rank; projections are quantized to `quant` if given.
    pub fn load(ckpt: &Checkpoint, cfg: &ModelConfig, layout: &TpLayout, index: usize, quant: Option<Quantization>) -> Result<Self> {
        let p = format!("model.layers.{index}");
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
        let inter = cfg.intermediate_size;
        let (col, row, kv) = (layout.column(), layout.row(), layout.kv_shard);

        let proj = |name: &str, shape: [usize; 2], shard: Shard| ckpt.get_weight(&format!("{p}.{name}.weight"), shape, shard, quant);
        let bias =
            |name: &str, present: bool, size: usize, shard: Shard| optional_bias(ckpt, present, &format!("{p}.{name}.bias"), size, shard);

        let qkv_w = Weight::cat_rows(vec![
            proj("self_attn.q_proj", [q_out, h], col)?,
            proj("self_attn.k_proj", [kv_out, h], kv)?,
            proj("self_attn.v_proj", [kv_out, h], kv)?,
        ])?;
        let qkv_b = match (
            bias("self_attn.q_proj", cfg.qkv_bias, q_out, col)?,
            bias("self_attn.k_proj", cfg.qkv_bias, kv_out, kv)?,
            bias("self_attn.v_proj", cfg.qkv_bias, kv_out, kv)?,
        ) {
            (Some(q), Some(k), Some(v)) => Some(Tensor::cat(&[q, k, v], 0)?),
            _ => None,
        };
        let o = Linear::new(proj("self_attn.o_proj", [h, q_out], row)?, bias("self_attn.o_proj", cfg.o_bias, h, Shard::FULL)?);
        let gate_up_w = Weight::cat_rows(vec![proj("mlp.gate_proj", [inter, h], col)?, proj("mlp.up_proj", [inter, h], col)?])?;
        let gate_up_b = match (bias("mlp.gate_proj", cfg.mlp_bias, inter, col)?, bias("mlp.up_proj", cfg.mlp_bias, inter, col)?) {
            (Some(g), Some(u)) => Some(Tensor::cat(&[g, u], 0)?),
            _ => None,
        };
        let down = Linear::new(proj("mlp.down_proj", [h, inter], row)?, bias("mlp.down_proj", cfg.mlp_bias, h, Shard::FULL)?);

        Ok(Self {
            index,
            input_norm: norm(ckpt, &format!("{p}.input_layernorm.weight"), h, cfg.rms_norm_eps)?,
            post_attention_norm: norm(ckpt, &format!("{p}.post_attention_layernorm.weight"), h, cfg.rms_norm_eps)?,
            qkv: Linear::new(qkv_w, qkv_b),
            o,
            gate_up: Linear::new(gate_up_w, gate_up_b),
            down,
            heads: layout.heads,
            kv_heads: layout.kv_heads,
            head_dim: d,
            intermediate: layout.intermediate,
            window: cfg.sliding_window[index],
        })
    }

    /// Where this layer's attention step reads and writes.
    pub fn slot(&self) -> LayerSlot {
        LayerSlot { index: self.index, window: self.window }
    }

    /// The norm this layer applies to its input; the layer before computes it (`forward`'s
    /// `next_norm`) in the pass that finishes its residual stream.
    pub fn input_norm(&self) -> &RmsNorm {
        &self.input_norm
    }

    /// The same layer with its projections computed with `numerics`.
    pub fn with_numerics(self, numerics: Numerics) -> Self {
        Self {
            qkv: self.qkv.with_numerics(numerics),
            o: self.o.with_numerics(numerics),
            gate_up: self.gate_up.with_numerics(numerics),
            down: self.down.with_numerics(numerics),
            ..self
        }
    }

    /// Bytes held by this layer's weights.
    pub fn bytes(&self) -> usize {
        let norms = [&self.input_norm, &self.post_attention_norm].map(|n| n.weight().elem_count() * n.weight().dtype().size_in_bytes());
        norms.iter().sum::<usize>() + [&self.qkv, &self.o, &self.gate_up, &self.down].iter().map(|l| l.bytes()).sum::<usize>()
    }

    /// `x`: `[tokens, hidden]` residual stream and `h` its [`input_norm`](Self::input_norm).
    /// Returns the updated stream and the stream normed by `next_norm` (the next layer's input
    /// norm, or the model's final norm after the last layer). Intermediates go into the step's
    /// workspace where the kernels can write them (`workspace.rs`); the results are its `X0` and
    /// `H0` slots then, valid until the next layer runs.
    pub fn forward(&self, x: &Tensor, h: &Tensor, next_norm: &RmsNorm, step: &mut LayerStep) -> Result<(Tensor, Tensor)> {
        let LayerStep { rope: [cos, sin], attention, comm, ws, lora, rows } = step;
        let rows = *rows;
        let lora = *lora;
        // Each row's adapter update goes on its product before the all-reduce of a row-parallel
        // one (a partial sum like the base's) and before anything reads the product.
        let adapt = |proj: Proj, x: &Tensor, y: &Tensor, dest: Option<&Dest>| match lora {
            Some(rows) => rows.apply(self.index, proj, x, y, dest),
            None => Ok(()),
        };
        let (cos, sin) = (*cos, *sin);
        let (tokens, hidden) = x.dims2()?;
        let (nh, nkv, d) = (self.heads, self.kv_heads, self.head_dim);
        let dt = x.dtype();

        let qkv_dest = ws.get(Scratch::Qkv, &[tokens, (nh + 2 * nkv) * d], dt)?;
        let qkv = self.qkv.forward_step(h, qkv_dest.as_ref(), rows)?;
        adapt(Proj::Qkv, h, &qkv, qkv_dest.as_ref())?;
        let heads = Heads { heads: nh, kv_heads: nkv, head_dim: d };
        let dests = [
            ws.get(Scratch::Q, &[tokens, nh, d], dt)?,
            ws.get(Scratch::K, &[tokens, nkv, d], dt)?,
            ws.get(Scratch::V, &[tokens, nkv, d], dt)?,
        ];
        let [q, k, v] = match fused::split_rotate(&qkv, cos, sin, heads, dests.each_ref().map(Option::as_ref))? {
            Some(qkv) => qkv,
            None => {
                let q = qkv.narrow(1, 0, nh * d)?.reshape((1, tokens, nh, d))?.contiguous()?;
                let k = qkv.narrow(1, nh * d, nkv * d)?.reshape((1, tokens, nkv, d))?.contiguous()?;
                let v = qkv.narrow(1, (nh + nkv) * d, nkv * d)?.reshape((tokens, nkv, d))?;
                let q = candle_nn::rotary_emb::rope_thd(&q, cos, sin)?.squeeze(0)?;
                let k = candle_nn::rotary_emb::rope_thd(&k, cos, sin)?.squeeze(0)?;
                [q, k, v]
            }
        };

        let attn = attention.attend(self.slot(), &q, &k, &v, ws.get(Scratch::Attn, &[tokens, nh * d], dt)?.as_ref())?;
        let attn_out = ws.get(Scratch::AttnOut, &[tokens, hidden], dt)?;
        let heads_out = attn;
        let attn = self.o.forward_no_bias_step(&heads_out, attn_out.as_ref(), rows)?;
        adapt(Proj::O, &heads_out, &attn, attn_out.as_ref())?;
        let attn = self.o.add_bias_in_place(all_reduce(&mut **comm, attn, attn_out.as_ref())?, attn_out.as_ref())?;
        let (x, h) = add_norm(x, &attn, &self.post_attention_norm, ws.get_pair([Scratch::X1, Scratch::H1], &[tokens, hidden], dt)?)?;
        let inter = self.intermediate;
        let gate_up_dest = ws.get(Scratch::GateUp, &[tokens, 2 * inter], dt)?;
        let gate_up = self.gate_up.forward_step(&h, gate_up_dest.as_ref(), rows)?;
        adapt(Proj::GateUp, &h, &gate_up, gate_up_dest.as_ref())?;
        let mlp = match fused::silu_mul(&gate_up, inter, ws.get(Scratch::Mlp, &[tokens, inter], dt)?.as_ref())? {
            Some(mlp) => mlp,
            None => {
                let gate = gate_up.narrow(D::Minus1, 0, self.intermediate)?;
                let up = gate_up.narrow(D::Minus1, self.intermediate, self.intermediate)?;
                (candle_nn::ops::silu(&gate)? * up)?
            }
        };
        let mlp_out = ws.get(Scratch::MlpOut, &[tokens, hidden], dt)?;
        let features = mlp;
        let mlp = self.down.forward_no_bias_step(&features, mlp_out.as_ref(), rows)?;
        adapt(Proj::Down, &features, &mlp, mlp_out.as_ref())?;
        let mlp = self.down.add_bias_in_place(all_reduce(&mut **comm, mlp, mlp_out.as_ref())?, mlp_out.as_ref())?;
        add_norm(&x, &mlp, next_norm, ws.get_pair([Scratch::X0, Scratch::H0], &[tokens, hidden], dt)?)
    }
}

/// The all-reduce (sum) of a row-parallel projection's output `y` over the group. When `y` is
/// `dest`'s tensor (a decode step's workspace output, on the CPU) it is summed in place through
/// the collective's host all-reduce, in f32 as `all_reduce_tensor` sums (half types widened into
/// a reused buffer and rounded once); otherwise through `all_reduce_tensor`.
fn all_reduce(comm: &mut dyn Collective, y: Tensor, dest: Option<&Dest>) -> Result<Tensor> {
    if comm.world_size() == 1 {
        return Ok(y);
    }
    let Some(dest) = dest.filter(|d| d.holds(&y)) else {
        return Ok(all_reduce_tensor(comm, &y)?);
    };
    fn widened<T: Elem>(comm: &mut dyn Collective, y: &mut [T]) -> tessera_collective::Result<()> {
        with_reused(&WIDE_SUM, |wide| {
            wide.clear();
            wide.extend(y.iter().map(|v| v.to_f32()));
            comm.all_reduce_sum(wide)?;
            y.iter_mut().zip(wide.iter()).for_each(|(v, s)| *v = T::from_f32(*s));
            Ok(())
        })
    }
    let summed = match y.dtype() {
        DType::F32 => with_dest_mut::<f32, _>(dest, |y| comm.all_reduce_sum(y))?,
        DType::BF16 => with_dest_mut::<half::bf16, _>(dest, |y| widened(comm, y))?,
        DType::F16 => with_dest_mut::<half::f16, _>(dest, |y| widened(comm, y))?,
        _ => None,
    };
    match summed {
        Some(done) => {
            done?;
            Ok(y)
        }
        None => Ok(all_reduce_tensor(comm, &y)?),
    }
}

thread_local! {
    /// A half-precision all-reduce's f32 sums, kept between layers.
    static WIDE_SUM: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `x + delta` and its norm, in one pass where `fused.rs` applies, into `dests` where given.
fn add_norm(x: &Tensor, delta: &Tensor, norm: &RmsNorm, dests: [Option<Dest>; 2]) -> Result<(Tensor, Tensor)> {
    if let Some([x, h]) = fused::add_rms_norm(x, delta, norm.weight(), norm.eps(), dests.each_ref().map(Option::as_ref))? {
        return Ok((x, h));
    }
    let x = (x + delta)?;
    let h = norm.forward(&x)?;
    Ok((x, h))
}
