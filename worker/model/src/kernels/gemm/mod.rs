//! Matrix–matrix products for prefill (more than `MAX_ROWS` activation rows) on CPUs whose
//! instructions beat candle's f32 GEMM: bf16 × bf16 with AVX-512 BF16 (`bf16.rs`) and q8_0
//! weights with AVX-512 VNNI (`q8.rs`).

pub(crate) mod bf16;
pub mod q8;
