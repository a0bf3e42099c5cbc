//! A decoder layer's element-wise steps as single passes on the CPU.
//!
//! As tensor ops, splitting the fused `[q | k | v]` projection and rotating q and k is six
//! operations (narrows, two copies, two rotary ops) and SwiGLU is four (two narrows, SiLU, a
//! product), each allocating its output and some fanning out to the thread pool. In a decode
//! step the vectors are a few hundred elements and those fixed costs, 30 layers over, are a
//! visible share of the step next to the weight reads (BENCHMARKS.md). The residual adds go
//! with the norm that follows each of them. Here each is one pass
//! that reads its input once and writes only what the next step consumes, in f32 arithmetic
//! whatever the storage type.
//!
//! Each function returns `None` where it does not apply (not on the CPU, not contiguous, an
//! unexpected shape); the layer then runs the tensor ops, which compute the same values.

use candle_core::{DType, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::kernels::elem::{is_slice, output, with_slice, Dest, Elem};
use crate::kernels::exp::exp_in_place;

/// Rows below which a pass runs on the calling thread: waking the pool costs more than a few
/// rows' work (a decode step has one row per sequence).
const PARALLEL_ROWS: usize = 16;

/// Gate values whose exponentials are computed together (a 1 KiB stack buffer).
const SILU_BLOCK: usize = 256;

/// Head counts of one rank's attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Splits `qkv` (`[tokens, (heads + 2 kv_heads) · head_dim]`) into q `[tokens, heads, head_dim]`,
/// k and v `[tokens, kv_heads, head_dim]`, rotating q and k by the tables `cos`, `sin`
/// (`[tokens, head_dim / 2]`) as `candle_nn::rotary_emb::rope_thd` does: the first and second
/// halves of each head are the two coordinates of each rotated pair. q, k and v go into `dests`
/// where given (a decode step's workspace tensors).
pub(crate) fn split_rotate(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: Heads,
    dests: [Option<&Dest>; 3],
) -> candle_core::Result<Option<[Tensor; 3]>> {
    match qkv.dtype() {
        DType::F32 => split_rotate_as::<f32>(qkv, cos, sin, heads, dests),
        DType::BF16 => split_rotate_as::<bf16>(qkv, cos, sin, heads, dests),
        DType::F16 => split_rotate_as::<f16>(qkv, cos, sin, heads, dests),
        _ => Ok(None),
    }
}

fn split_rotate_as<T: Elem>(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    h: Heads,
    dests: [Option<&Dest>; 3],
) -> candle_core::Result<Option<[Tensor; 3]>> {
    let Heads { heads, kv_heads, head_dim: d } = h;
    let tokens = qkv.dim(0)?;
    let (q_width, kv_width) = (heads * d, kv_heads * d);
    let width = q_width + 2 * kv_width;
    let half = d / 2;
    if !d.is_multiple_of(2)
        || qkv.dims() != [tokens, width]
        || cos.dims() != [tokens, half]
        || sin.dims() != cos.dims()
        || ![qkv, cos, sin].into_iter().all(is_slice::<T>)
    {
        return Ok(None);
    }
    let [dq, dk, dv] = dests;
    let mut k = None;
    let mut v = None;
    let q = output::<T>(dq, &[tokens, heads, d], |q| {
        k = Some(output::<T>(dk, &[tokens, kv_heads, d], |k| {
            v = Some(output::<T>(dv, &[tokens, kv_heads, d], |v| {
                with_slice::<T, _>(qkv, |x| {
                    with_slice::<T, _>(cos, |cos| {
                        with_slice::<T, _>(sin, |sin| {
                            let rows = q.par_chunks_mut(q_width).zip(k.par_chunks_mut(kv_width)).zip(v.par_chunks_mut(kv_width));
                            rows.enumerate().with_min_len(PARALLEL_ROWS).for_each(|(t, ((qt, kt), vt))| {
                                let row = &x[t * width..(t + 1) * width];
                                let (c, s) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
                                for (src, dst) in row[..q_width].chunks_exact(d).zip(qt.chunks_exact_mut(d)) {
                                    rotate(src, c, s, dst);
                                }
                                for (src, dst) in row[q_width..q_width + kv_width].chunks_exact(d).zip(kt.chunks_exact_mut(d)) {
                                    rotate(src, c, s, dst);
                                }
                                vt.copy_from_slice(&row[q_width + kv_width..]);
                            });
                        })
                    })
                });
            }));
        }));
    })?;
    match (k, v) {
        (Some(k), Some(v)) => Ok(Some([q, k?, v?])),
        _ => Ok(None),
    }
}

/// One head rotated: pair `i` is `(x[i], x[i + d/2])`; same arithmetic, in the same order, as
/// candle's CPU rotary kernel, so f32 results are bit for bit the tensor path's.
#[inline]
fn rotate<T: Elem>(x: &[T], cos: &[T], sin: &[T], out: &mut [T]) {
    let half = cos.len();
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    for i in 0..half {
        let (a, b, c, s) = (x1[i].to_f32(), x2[i].to_f32(), cos[i].to_f32(), sin[i].to_f32());
        o1[i] = T::from_f32(a * c - b * s);
        o2[i] = T::from_f32(a * s + b * c);
    }
}

/// SwiGLU of a fused `[gate | up]` projection `[tokens, 2 · inter]`: `silu(gate) · up`,
/// `[tokens, inter]`. SiLU is `g / (1 + e^−g)`, as candle computes it, with the vectorised
/// exponential of `exp.rs` (a few ulp from libm's). Written into `dest` where given.
pub(crate) fn silu_mul(gate_up: &Tensor, inter: usize, dest: Option<&Dest>) -> candle_core::Result<Option<Tensor>> {
    match gate_up.dtype() {
        DType::F32 => silu_mul_as::<f32>(gate_up, inter, dest),
        DType::BF16 => silu_mul_as::<bf16>(gate_up, inter, dest),
        DType::F16 => silu_mul_as::<f16>(gate_up, inter, dest),
        _ => Ok(None),
    }
}

fn silu_mul_as<T: Elem>(gate_up: &Tensor, inter: usize, dest: Option<&Dest>) -> candle_core::Result<Option<Tensor>> {
    let tokens = gate_up.dim(0)?;
    if gate_up.dims() != [tokens, 2 * inter] || inter == 0 || !is_slice::<T>(gate_up) {
        return Ok(None);
    }
    let out = output::<T>(dest, &[tokens, inter], |out| {
        with_slice::<T, _>(gate_up, |x| silu_rows(x, inter, out));
    })?;
    Ok(Some(out))
}

/// `out[t] = silu(gate[t]) · up[t]` for each row `t` of `x` = `[gate | up]`.
fn silu_rows<T: Elem>(x: &[T], inter: usize, out: &mut [T]) {
    out.par_chunks_mut(inter).enumerate().with_min_len(PARALLEL_ROWS).for_each(|(t, o)| {
        let (gate, up) = x[t * 2 * inter..(t + 1) * 2 * inter].split_at(inter);
        // e^−g a stack block at a time, so the exponentials run vectorised.
        let mut e = [0f32; SILU_BLOCK];
        for ((o, g), u) in o.chunks_mut(SILU_BLOCK).zip(gate.chunks(SILU_BLOCK)).zip(up.chunks(SILU_BLOCK)) {
            let e = &mut e[..g.len()];
            for (e, g) in e.iter_mut().zip(g) {
                *e = -g.to_f32();
            }
            exp_in_place(e);
            for (((o, g), u), e) in o.iter_mut().zip(g).zip(u).zip(e.iter()) {
                *o = T::from_f32(g.to_f32() / (1.0 + e) * u.to_f32());
            }
        }
    });
}

/// The residual update and the norm that follows it, in one pass over each row: `sum = x + delta`
/// (rounded to the stream's type, as the tensor add would) and `sum / rms(sum) · weight` with
/// `rms = sqrt(mean(sum²) + eps)`, in the order candle's `rms_norm` computes it. Returns
/// `[sum, normed]`, into `dests` where given.
pub(crate) fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f64,
    dests: [Option<&Dest>; 2],
) -> candle_core::Result<Option<[Tensor; 2]>> {
    match x.dtype() {
        DType::F32 => add_rms_norm_as::<f32>(x, delta, weight, eps as f32, dests),
        DType::BF16 => add_rms_norm_as::<bf16>(x, delta, weight, eps as f32, dests),
        DType::F16 => add_rms_norm_as::<f16>(x, delta, weight, eps as f32, dests),
        _ => Ok(None),
    }
}

fn add_rms_norm_as<T: Elem>(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f32,
    dests: [Option<&Dest>; 2],
) -> candle_core::Result<Option<[Tensor; 2]>> {
    let (tokens, hidden) = x.dims2()?;
    if delta.dims() != x.dims() || weight.dims() != [hidden] || hidden == 0 || ![x, delta, weight].into_iter().all(is_slice::<T>) {
        return Ok(None);
    }
    let [d_sum, d_normed] = dests;
    let mut normed = None;
    let sum = output::<T>(d_sum, &[tokens, hidden], |sum| {
        normed = Some(output::<T>(d_normed, &[tokens, hidden], |normed| {
            with_slice::<T, _>(x, |x| {
                with_slice::<T, _>(delta, |delta| {
                    with_slice::<T, _>(weight, |weight| {
                        add_norm_rows(x, delta, weight, eps, sum, normed);
                    })
                })
            });
        }));
    })?;
    Ok(normed.transpose()?.map(|normed| [sum, normed]))
}

/// The rows of [`add_rms_norm`].
fn add_norm_rows<T: Elem>(x: &[T], delta: &[T], weight: &[T], eps: f32, sum: &mut [T], normed: &mut [T]) {
    let hidden = weight.len();
    let rows = sum.par_chunks_mut(hidden).zip(normed.par_chunks_mut(hidden));
    rows.enumerate().with_min_len(PARALLEL_ROWS).for_each(|(t, (s, n))| {
        let (xr, dr) = (&x[t * hidden..(t + 1) * hidden], &delta[t * hidden..(t + 1) * hidden]);
        for ((s, a), b) in s.iter_mut().zip(xr).zip(dr) {
            *s = T::from_f32(a.to_f32() + b.to_f32());
        }
        norm_row(s, weight, eps, n);
    });
}

/// `x / rms(x) · weight` of one row, in the order candle's `rms_norm` computes it.
#[inline]
fn norm_row<T: Elem>(x: &[T], weight: &[T], eps: f32, out: &mut [T]) {
    let sum2 = x.iter().fold(0f32, |acc, v| {
        let v = v.to_f32();
        acc + v * v
    });
    let m = T::from_f32((sum2 / x.len() as f32 + eps).sqrt()).to_f32();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = T::from_f32(v.to_f32() / m * w.to_f32());
    }
}

/// RMSNorm of each row of `x` (`[tokens, hidden]`), into `dest` where given: the model's first
/// layer's input norm, which no residual add precedes.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, dest: Option<&Dest>) -> candle_core::Result<Option<Tensor>> {
    match x.dtype() {
        DType::F32 => rms_norm_as::<f32>(x, weight, eps as f32, dest),
        DType::BF16 => rms_norm_as::<bf16>(x, weight, eps as f32, dest),
        DType::F16 => rms_norm_as::<f16>(x, weight, eps as f32, dest),
        _ => Ok(None),
    }
}

fn rms_norm_as<T: Elem>(x: &Tensor, weight: &Tensor, eps: f32, dest: Option<&Dest>) -> candle_core::Result<Option<Tensor>> {
    let (tokens, hidden) = x.dims2()?;
    if weight.dims() != [hidden] || hidden == 0 || ![x, weight].into_iter().all(is_slice::<T>) {
        return Ok(None);
    }
    let normed = output::<T>(dest, &[tokens, hidden], |out| {
        with_slice::<T, _>(x, |x| {
            with_slice::<T, _>(weight, |w| {
                out.par_chunks_mut(hidden).zip(x.par_chunks(hidden)).with_min_len(PARALLEL_ROWS).for_each(|(o, x)| norm_row(x, w, eps, o));
            })
        });
    })?;
    Ok(Some(normed))
}

/// Rows `ids` of `table` (`[vocab, hidden]`, contiguous on the CPU), into `dest` where given:
/// the embedding lookup. `None` where it does not apply; ids are checked against the vocabulary
/// before a forward pass starts.
pub(crate) fn gather_rows(table: &Tensor, ids: &[u32], dest: Option<&Dest>) -> candle_core::Result<Option<Tensor>> {
    match table.dtype() {
        DType::F32 => gather_rows_as::<f32>(table, ids, dest),
        DType::BF16 => gather_rows_as::<bf16>(table, ids, dest),
        DType::F16 => gather_rows_as::<f16>(table, ids, dest),
        _ => Ok(None),
    }
}

fn gather_rows_as<T: Elem>(table: &Tensor, ids: &[u32], dest: Option<&Dest>) -> candle_core::Result<Option<Tensor>> {
    let (vocab, hidden) = table.dims2()?;
    if !is_slice::<T>(table) || ids.iter().any(|&id| id as usize >= vocab) {
        return Ok(None);
    }
    let rows = output::<T>(dest, &[ids.len(), hidden], |out| {
        with_slice::<T, _>(table, |t| {
            for (o, &id) in out.chunks_exact_mut(hidden).zip(ids) {
                let id = id as usize;
                o.copy_from_slice(&t[id * hidden..(id + 1) * hidden]);
            }
        });
    })?;
    Ok(Some(rows))
}

/// Attention probabilities from f32 `scores` `[kv_heads, group · len, kv_len]` (query rows of
/// one KV head stacked by head, then position): adds the additive `mask` `[len, kv_len]` (0 or
/// −∞) to each head's rows, takes the softmax along the keys with the vectorised exponential,
/// and writes the result in `dtype`. A row that sees no key at all comes out NaN, as candle's
/// softmax gives it; a causal mask always shows a row its own key.
pub(crate) fn masked_softmax(scores: &Tensor, mask: Option<&Tensor>, dtype: DType) -> candle_core::Result<Option<Tensor>> {
    match dtype {
        DType::F32 => masked_softmax_as::<f32>(scores, mask),
        DType::BF16 => masked_softmax_as::<bf16>(scores, mask),
        DType::F16 => masked_softmax_as::<f16>(scores, mask),
        _ => Ok(None),
    }
}

fn masked_softmax_as<T: Elem>(scores: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Option<Tensor>> {
    let (kv_heads, rows, kv_len) = scores.dims3()?;
    let len = match mask {
        Some(m) => match m.dims() {
            [len, k] if *k == kv_len && *len > 0 && rows.is_multiple_of(*len) => *len,
            _ => return Ok(None),
        },
        None => 1,
    };
    if kv_len == 0 {
        return Ok(None);
    }
    let mut out = vec![T::from_f32(0.0); kv_heads * rows * kv_len];
    let mut run = |s: &[f32], m: Option<&[f32]>| {
        out.par_chunks_mut(kv_len).enumerate().with_min_len(PARALLEL_ROWS).for_each_init(
            || vec![0f32; kv_len],
            |e, (r, o)| {
                let row = &s[r * kv_len..(r + 1) * kv_len];
                match m {
                    Some(m) => {
                        let q = r % len;
                        for ((e, s), m) in e.iter_mut().zip(row).zip(&m[q * kv_len..(q + 1) * kv_len]) {
                            *e = s + m;
                        }
                    }
                    None => e.copy_from_slice(row),
                }
                let max = e.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                for v in e.iter_mut() {
                    *v -= max;
                }
                exp_in_place(e);
                let inv = 1.0 / e.iter().sum::<f32>();
                for (o, v) in o.iter_mut().zip(e.iter()) {
                    *o = T::from_f32(v * inv);
                }
            },
        );
    };
    let done = with_slice::<f32, _>(scores, |s| match mask {
        Some(m) => with_slice::<f32, _>(m, |m| run(s, Some(m))),
        None => {
            run(s, None);
            Some(())
        }
    });
    if done.flatten().is_none() {
        return Ok(None);
    }
    Ok(Some(T::tensor(out, &[kv_heads, rows, kv_len])?))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, D};

    use super::*;

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::sampling::sampler::SeededRng::new(seed);
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32 * 4.0 - 2.0).collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// The tensor ops the layer runs where the fused pass does not apply.
    fn reference_split_rotate(qkv: &Tensor, cos: &Tensor, sin: &Tensor, h: Heads) -> [Tensor; 3] {
        let (tokens, d) = (qkv.dim(0).unwrap(), h.head_dim);
        let part =
            |start: usize, n: usize| qkv.narrow(1, start * d, n * d).unwrap().reshape((1, tokens, n, d)).unwrap().contiguous().unwrap();
        let q = candle_nn::rotary_emb::rope_thd(&part(0, h.heads), cos, sin).unwrap().squeeze(0).unwrap();
        let k = candle_nn::rotary_emb::rope_thd(&part(h.heads, h.kv_heads), cos, sin).unwrap().squeeze(0).unwrap();
        let v = part(h.heads + h.kv_heads, h.kv_heads).squeeze(0).unwrap();
        [q, k, v]
    }

    /// One decode row and a prefill long enough to run in parallel; f32 is bit for bit the
    /// tensor path, bf16 and f16 within their rounding (the tensor path rounds after every op).
    #[test]
    fn split_rotate_equals_the_tensor_ops() {
        let h = Heads { heads: 6, kv_heads: 2, head_dim: 10 };
        for tokens in [1usize, 3 * PARALLEL_ROWS + 5] {
            let qkv = random(&[tokens, 10 * 10], tokens as u64);
            let (cos, sin) = (random(&[tokens, 5], 1), random(&[tokens, 5], 2));
            for (dtype, tolerance) in [(DType::F32, 0.0), (DType::BF16, 0.07), (DType::F16, 0.01)] {
                let [qkv, cos, sin] = [&qkv, &cos, &sin].map(|t| t.to_dtype(dtype).unwrap());
                let fused = split_rotate(&qkv, &cos, &sin, h, [None; 3]).unwrap().expect("fused pass applies");
                let reference = reference_split_rotate(&qkv, &cos, &sin, h);
                for (f, r) in fused.iter().zip(&reference) {
                    assert_eq!(f.dims(), r.dims());
                    assert_eq!(f.dtype(), dtype);
                    assert!(max_diff(f, r) <= tolerance, "{dtype:?}, {tokens} tokens: {}", max_diff(f, r));
                }
            }
        }
    }

    #[test]
    fn silu_mul_equals_the_tensor_ops() {
        // Wider than one exponential block, with a tail.
        let inter = SILU_BLOCK + 37;
        for tokens in [1usize, 3 * PARALLEL_ROWS + 5] {
            let gate_up = random(&[tokens, 2 * inter], 7 + tokens as u64);
            for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::BF16, 0.05), (DType::F16, 0.01)] {
                let gate_up = gate_up.to_dtype(dtype).unwrap();
                let fused = silu_mul(&gate_up, inter, None).unwrap().expect("fused pass applies");
                let gate = gate_up.narrow(D::Minus1, 0, inter).unwrap();
                let up = gate_up.narrow(D::Minus1, inter, inter).unwrap();
                let reference = (candle_nn::ops::silu(&gate).unwrap() * up).unwrap();
                assert_eq!(fused.dims(), reference.dims());
                assert!(max_diff(&fused, &reference) <= tolerance, "{dtype:?}, {tokens} tokens: {}", max_diff(&fused, &reference));
            }
        }
    }

    /// f32 is bit for bit candle's add and `rms_norm`; half types within their rounding.
    #[test]
    fn add_rms_norm_equals_the_tensor_ops() {
        let hidden = 40;
        for tokens in [1usize, 3 * PARALLEL_ROWS + 5] {
            let (x, delta, weight) = (random(&[tokens, hidden], 3), random(&[tokens, hidden], 4), random(&[hidden], 5));
            for (dtype, tolerance) in [(DType::F32, 0.0), (DType::BF16, 0.1), (DType::F16, 0.02)] {
                let [x, delta, weight] = [&x, &delta, &weight].map(|t| t.to_dtype(dtype).unwrap());
                let [sum, normed] = add_rms_norm(&x, &delta, &weight, 1e-5, [None; 2]).unwrap().expect("fused pass applies");
                let want_sum = (&x + &delta).unwrap();
                let want_normed = candle_nn::ops::rms_norm(&want_sum, &weight, 1e-5).unwrap();
                assert_eq!(max_diff(&sum, &want_sum), 0.0, "{dtype:?}: the sum is rounded as the tensor add rounds it");
                assert!(max_diff(&normed, &want_normed) <= tolerance, "{dtype:?}, {tokens} tokens: {}", max_diff(&normed, &want_normed));
            }
        }
    }

    /// The first layer's norm: f32 bit for bit candle's `rms_norm`, half types within rounding;
    /// written into a workspace tensor when one is given.
    #[test]
    fn rms_norm_equals_the_tensor_op() {
        let hidden = 40;
        for tokens in [1usize, 3 * PARALLEL_ROWS + 5] {
            let (x, weight) = (random(&[tokens, hidden], 8), random(&[hidden], 9));
            for (dtype, tolerance) in [(DType::F32, 0.0), (DType::BF16, 0.1), (DType::F16, 0.02)] {
                let [x, weight] = [&x, &weight].map(|t| t.to_dtype(dtype).unwrap());
                let want = candle_nn::ops::rms_norm(&x, &weight, 1e-5).unwrap();
                let mut ws = crate::model::workspace::Workspace::new(&Device::Cpu);
                let dest = ws.get(crate::model::workspace::Scratch::H0, &[tokens, hidden], dtype).unwrap();
                for dest in [None, dest.as_ref()] {
                    let got = rms_norm(&x, &weight, 1e-5, dest).unwrap().expect("fused pass applies");
                    assert!(max_diff(&got, &want) <= tolerance, "{dtype:?}, {tokens} tokens: {}", max_diff(&got, &want));
                    if let Some(d) = dest {
                        assert_eq!(got.id(), d.tensor().id());
                    }
                }
            }
        }
    }

    #[test]
    fn gather_rows_equals_index_select() {
        let table = random(&[10, 6], 1);
        let ids = [3u32, 0, 9, 3];
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let table = table.to_dtype(dtype).unwrap();
            let want = table.index_select(&Tensor::new(&ids[..], &Device::Cpu).unwrap(), 0).unwrap();
            let got = gather_rows(&table, &ids, None).unwrap().expect("applies");
            assert_eq!(max_diff(&got, &want), 0.0, "{dtype:?}");
        }
        assert!(gather_rows(&table, &[10], None).unwrap().is_none(), "an id past the table");
    }

    /// Against the tensor path of `attention::attend_block`: broadcast mask add, candle's
    /// softmax, conversion to the output type.
    #[test]
    fn masked_softmax_equals_the_tensor_ops() {
        let (kv_heads, group, len, kv_len) = (2, 3, 7, 20);
        let scores = random(&[kv_heads, group * len, kv_len], 11);
        let mask = crate::model::attention::ChunkMask::new(kv_len - len, len, Some(9));
        let mask = mask.tensor(len, kv_len, &Device::Cpu).unwrap().expect("a prefill chunk has a mask");
        for with_mask in [true, false] {
            let m = with_mask.then_some(&mask);
            let masked = match m {
                Some(m) => scores
                    .reshape((kv_heads, group, len, kv_len))
                    .unwrap()
                    .broadcast_add(m)
                    .unwrap()
                    .reshape((kv_heads, group * len, kv_len))
                    .unwrap(),
                None => scores.clone(),
            };
            let want = candle_nn::ops::softmax_last_dim(&masked).unwrap();
            for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::BF16, 4e-3), (DType::F16, 5e-4)] {
                let got = masked_softmax(&scores, m, dtype).unwrap().expect("fused pass applies");
                assert_eq!(got.dtype(), dtype);
                assert!(max_diff(&got, &want) <= tolerance, "{dtype:?}, mask {with_mask}: {}", max_diff(&got, &want));
            }
        }
    }

    #[test]
    fn declines_shapes_it_does_not_know() {
        let h = Heads { heads: 2, kv_heads: 1, head_dim: 4 };
        let (cos, sin) = (random(&[3, 2], 1), random(&[3, 2], 2));
        assert!(split_rotate(&random(&[3, 15], 0), &cos, &sin, h, [None; 3]).unwrap().is_none(), "wrong width");
        assert!(split_rotate(&random(&[3, 16], 0), &cos.narrow(0, 0, 2).unwrap(), &sin, h, [None; 3]).unwrap().is_none(), "short tables");
        let strided = random(&[16, 3], 0).t().unwrap();
        assert!(split_rotate(&strided, &cos, &sin, h, [None; 3]).unwrap().is_none(), "not contiguous");
        assert!(silu_mul(&random(&[3, 9], 0), 4, None).unwrap().is_none(), "odd width");
        assert!(silu_mul(&random(&[8, 3], 0).t().unwrap(), 4, None).unwrap().is_none(), "not contiguous");
        let x = random(&[3, 4], 0);
        assert!(add_rms_norm(&x, &random(&[3, 5], 0), &random(&[4], 0), 1e-5, [None; 2]).unwrap().is_none(), "delta's shape");
        assert!(add_rms_norm(&x, &x, &random(&[5], 0), 1e-5, [None; 2]).unwrap().is_none(), "weight's shape");
        let scores = random(&[2, 6, 5], 0);
        assert!(masked_softmax(&scores, Some(&random(&[4, 5], 0)), DType::F32).unwrap().is_none(), "rows not a multiple of the mask's");
        assert!(masked_softmax(&scores, Some(&random(&[3, 4], 0)), DType::F32).unwrap().is_none(), "mask width");
    }
}
