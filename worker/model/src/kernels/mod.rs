//! The CPU kernels the model hands its arithmetic to, and the threads and heap they run on.
//!
//! Products: `matvec.rs` (float weights, decode), `qmatvec.rs` (q8_0, decode), `q4matvec.rs`
//! (the 32-block 4- and 5-bit formats, decode), `kquant.rs` (q4_k, q5_k, q6_k, decode),
//! `qrows.rs` (those row kernels for prefill) and `gemm/` (prefill: bf16, q8_0). Element-wise passes: `fused.rs`, `decode_attention.rs`,
//! `exp.rs`; `elem.rs` is the one trait (`Elem`) for the float element types they read and
//! write and `matvec.rs` widens. `pool.rs` and `heap.rs` are the threads the kernels fan out on
//! and how the process heap keeps their buffers. Each kernel declines (`None`) what it cannot do, and the model then takes candle's
//! tensor ops; the quantized ones are public for the `qmatmul` bench.

pub(crate) mod blocked_attention;
pub(crate) mod decode_attention;
pub(crate) mod elem;
pub(crate) mod exp;
pub(crate) mod fused;
pub mod gemm;
pub(crate) mod heap;
#[cfg(test)]
pub(crate) mod kernel_paths;
pub mod kquant;
pub(crate) mod matvec;
pub(crate) mod pool;
pub mod q4matvec;
pub mod qmatvec;
pub mod qrows;
