//! Speed of one quantized projection on the shapes of a benchmark model, against the
//! memory-bandwidth roofline: decode (1 and 8 activation rows) and a 512-row prefill.
//! Columns: candle's `QMatMul`; for q8_0 decode our `qmatvec` kernel, for q4_0, q4_1, q5_0 and
//! q5_1 decode our `q4matvec` kernel, for q4_k, q5_k and q6_k decode our `kquant` kernel, for
//! q8_0 prefill our int8 GEMM (`gemm::q8`, on CPUs with AVX-512 VNNI), for the other formats'
//! prefill their row kernels 16 rows per call (`qrows`); f32 GEMM on the float
//! weights for scale. The 32-block formats run SmolLM-135M's shapes; the K-quants, the
//! formats of the Q4_K_M and Q6_K files users download, run the 2048-wide Llama model's.
//!
//! usage: cargo bench -p tessera-model --bench qmatmul -- [q8_0|q4_0|q4_1|q5_0|q5_1|q4_k|q5_k|q6_k] [ITERS]
//! Prints, per shape and row count, µs per product and the weight bytes streamed per second
//! (for the int8 GEMM, multiply-adds per second), each the best of up to three passes.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use tessera_model::kernels::gemm::q8::q8_0_gemm_t;
use tessera_model::kernels::kquant::kquant_matvec_t;
use tessera_model::kernels::q4matvec::q4_matvec_t;
use tessera_model::kernels::qmatvec::q8_0_matvec_t;
use tessera_model::kernels::qrows::quantized_rows_t;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let name = args.first().map_or("q8_0", String::as_str);
    let quant = match name {
        "q8_0" => GgmlDType::Q8_0,
        "q4_k" => GgmlDType::Q4K,
        "q5_k" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        _ => anyhow::bail!("unknown format {name}"),
    };
    let iters: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(200);
    println!("{name}, {} threads", candle_core::utils::get_num_threads());
    // (name, out, in) of the projections: SmolLM-135M's for the 32-block formats; for the
    // K-quants (whose `in` must be a multiple of 256, which 576 is not) the 2048-wide Llama's
    // (32 query heads and 4 key-value heads of 64, an MLP of 5632, a 49152-token vocabulary).
    let shapes: &[(&str, usize, usize)] = if tessera_model::kernels::kquant::supports(quant) {
        &[("qkv", 2048 + 2 * 256, 2048), ("gate_up", 2 * 5632, 2048), ("down", 2048, 5632), ("lm_head", 49152, 2048)]
    } else {
        &[("qkv", 960, 576), ("gate_up", 3072, 576), ("down", 576, 1536), ("lm_head", 49152, 576)]
    };
    // The model calls every product from one of its compute pool's threads (`ComputePool::run`),
    // so the products are timed from one too: from outside the pool, each of our calls would
    // also wait for a pool thread to wake up and take the job.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(candle_core::utils::get_num_threads()).build()?;
    pool.install(|| measure(quant, iters, shapes))
}

/// Times each of `shapes` (name, out, in) in format `quant`: see the module comment.
fn measure(quant: GgmlDType, iters: usize, shapes: &[(&str, usize, usize)]) -> anyhow::Result<()> {
    for &(name, out, inp) in shapes {
        let w = Tensor::randn(0f32, 0.05, (out, inp), &Device::Cpu)?;
        let q = QTensor::quantize(&w, quant)?;
        let bytes = q.storage_size_in_bytes() as f64;
        let q_data = q.data()?.to_vec();
        let mm = QMatMul::from_qtensor(q)?;
        for rows in [1usize, 8, 16, 32, 512] {
            let x = Tensor::randn(0f32, 1.0, (rows, inp), &Device::Cpu)?;
            let n = if rows == 512 { iters / 20 + 1 } else { iters };
            let secs = per_product(n, || mm.forward(&x).map(drop))?;
            let data = q_data.as_slice();
            let gbs = |secs: f64| format!("ours {:>8.1} µs {:>5.1} GB/s", secs * 1e6, bytes / secs / 1e9);
            let ours = if tessera_model::kernels::q4matvec::supports(quant) && rows <= 16 {
                gbs(per_product(n, || q4_matvec_t(&x, data, quant, out, inp).map(drop))?)
            } else if tessera_model::kernels::kquant::supports(quant) && rows <= 16 {
                gbs(per_product(n, || kquant_matvec_t(&x, data, quant, out, inp).map(drop))?)
            } else if rows > 16 && quant != GgmlDType::Q8_0 && tessera_model::kernels::qrows::supports(quant) {
                // Prefill of the 4- and 5-bit and K-quant formats: the row kernels, 16 rows per call.
                let secs = per_product(n, || quantized_rows_t(&x, data, quant, out, inp).map(drop))?;
                let macs = (rows * out * inp) as f64;
                format!("ours {:>8.1} µs {:>5.1} Gmac/s", secs * 1e6, macs / secs / 1e9)
            } else if quant == GgmlDType::Q8_0 && rows <= 16 {
                gbs(per_product(n, || q8_0_matvec_t(&x, data, out, inp).map(drop))?)
            } else if quant == GgmlDType::Q8_0 && tessera_model::kernels::gemm::q8::available() {
                // Rows past 16 (a decode batch) take the GEMM, as in a decode step.
                let secs = per_product(n, || q8_0_gemm_t(&x, data, out, inp, 16).map(drop))?;
                let macs = (rows * out * inp) as f64;
                format!("ours {:>8.1} µs {:>5.1} Gmac/s", secs * 1e6, macs / secs / 1e9)
            } else {
                String::new()
            };
            // f32 for comparison: GEMM on the float weights.
            let f_secs = per_product(n, || x.matmul(&w.t()?).map(drop))?;
            if quant == GgmlDType::Q8_0 && (2..=32).contains(&rows) && tessera_model::kernels::gemm::q8::available() {
                let secs = per_product(n, || q8_0_gemm_t(&x, data, out, inp, 0).map(drop))?;
                println!("   gemm at {rows} rows: {:>8.1} µs", secs * 1e6);
            }
            println!(
                "{name:8} {out:>6}x{inp:<5} rows {rows:>3}: candle {:>9.1} µs {:>5.1} GB/s | {ours:31} | f32 GEMM {:>9.1} µs",
                secs * 1e6,
                bytes / secs / 1e9,
                f_secs * 1e6
            );
        }
    }
    Ok(())
}

/// Seconds per call of `product` (after one warm-up call, which also lets a kernel repack): the
/// best of up to three passes sharing `n` calls, as the bandwidth bench takes its best pass, so
/// that other work on a shared machine slows a pass rather than the result.
fn per_product(n: usize, mut product: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    product()?;
    let passes = n.clamp(1, 3);
    let calls = n.div_ceil(passes).max(1);
    let mut best = f64::MAX;
    for _ in 0..passes {
        let start = Instant::now();
        for _ in 0..calls {
            std::hint::black_box(product()?);
        }
        best = best.min(start.elapsed().as_secs_f64() / calls as f64);
    }
    Ok(best)
}
