//! Speed of one quantized projection on the shapes of the SmolLM-135M benchmark model, against
//! the memory-bandwidth roofline: decode (1 and 8 activation rows) and a 512-row prefill.
//! Columns: candle's `QMatMul`; for q8_0 decode our `qmatvec` kernel, for q4_0, q4_1, q5_0 and
//! q5_1 decode our `q4matvec` kernel, for q8_0 prefill our int8 GEMM (`q8_gemm`, on CPUs with
//! AVX-512 VNNI); f32 GEMM on the float weights for scale.
//!
//! usage: cargo bench -p tessera-model --bench qmatmul -- [q8_0|q4_k|q4_0|q4_1|q5_0|q5_1] [ITERS]
//! Prints, per shape and row count, µs per product and the weight bytes streamed per second
//! (for the int8 GEMM, multiply-adds per second).

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use tessera_model::q4matvec::q4_matvec_t;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let name = args.first().map_or("q8_0", String::as_str);
    let quant = match name {
        "q8_0" => GgmlDType::Q8_0,
        "q4_k" => GgmlDType::Q4K,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        _ => anyhow::bail!("unknown format {name}"),
    };
    let iters: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(200);
    println!("{name}, {} threads", candle_core::utils::get_num_threads());
    // (name, out, in) of SmolLM-135M's projections; q4_k needs `in` to be a multiple of 256,
    // which 576 is not, so q4_k runs on 768-wide stand-ins of the same size class.
    let shapes: &[(&str, usize, usize)] = match quant {
        GgmlDType::Q4K => &[("gate_up", 3072, 768), ("down", 768, 1536), ("lm_head", 49152, 768)],
        _ => &[("qkv", 960, 576), ("gate_up", 3072, 576), ("down", 576, 1536), ("lm_head", 49152, 576)],
    };
    for &(name, out, inp) in shapes {
        let w = Tensor::randn(0f32, 0.05, (out, inp), &Device::Cpu)?;
        let q = QTensor::quantize(&w, quant)?;
        let bytes = q.storage_size_in_bytes() as f64;
        let q_data = q.data()?.to_vec();
        let mm = QMatMul::from_qtensor(q)?;
        for rows in [1usize, 8, 512] {
            let x = Tensor::randn(0f32, 1.0, (rows, inp), &Device::Cpu)?;
            let n = if rows == 512 { iters / 20 + 1 } else { iters };
            mm.forward(&x)?; // warm-up (and repacking, if the kernel does it)
            let start = Instant::now();
            for _ in 0..n {
                std::hint::black_box(mm.forward(&x)?);
            }
            let secs = start.elapsed().as_secs_f64() / n as f64;
            let ours = if tessera_model::q4matvec::supports(quant) && rows <= 16 {
                let data = q_data.as_slice();
                q4_matvec_t(&x, data, quant, out, inp)?;
                let start = Instant::now();
                for _ in 0..n {
                    std::hint::black_box(q4_matvec_t(&x, data, quant, out, inp)?);
                }
                let secs = start.elapsed().as_secs_f64() / n as f64;
                format!("ours {:>8.1} µs {:>5.1} GB/s", secs * 1e6, bytes / secs / 1e9)
            } else if quant == GgmlDType::Q8_0 && rows <= 16 {
                let data = q_data.as_slice();
                tessera_model::qmatvec::q8_0_matvec_t(&x, data, out, inp)?;
                let start = Instant::now();
                for _ in 0..n {
                    std::hint::black_box(tessera_model::qmatvec::q8_0_matvec_t(&x, data, out, inp)?);
                }
                let secs = start.elapsed().as_secs_f64() / n as f64;
                format!("ours {:>8.1} µs {:>5.1} GB/s", secs * 1e6, bytes / secs / 1e9)
            } else if quant == GgmlDType::Q8_0 && tessera_model::q8_gemm::available() {
                let data = q_data.as_slice();
                tessera_model::q8_gemm::q8_0_gemm_t(&x, data, out, inp)?;
                let start = Instant::now();
                for _ in 0..n {
                    std::hint::black_box(tessera_model::q8_gemm::q8_0_gemm_t(&x, data, out, inp)?);
                }
                let secs = start.elapsed().as_secs_f64() / n as f64;
                format!("ours {:>8.1} µs {:>5.1} Gmac/s", secs * 1e6, (rows * out * inp) as f64 / secs / 1e9)
            } else {
                String::new()
            };
            // f32 for comparison: GEMM on the float weights.
            let f_start = Instant::now();
            for _ in 0..n {
                std::hint::black_box(x.matmul(&w.t()?)?);
            }
            let f_secs = f_start.elapsed().as_secs_f64() / n as f64;
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
