//! The compute ceiling of this machine with the worker's thread count, for each multiply-add a
//! kernel here uses: f32 FMA (AVX-512 or AVX2), bf16 pair dot products (`vdpbf16ps`) and int8
//! dot products (`vpdpbusd`, or AVX2's `maddubs` + `madd`). Each thread runs long chains of
//! independent multiply-adds on registers only, so the result is what the execution units
//! give, not the memory. Batched decode is read against these numbers (`batch_decode.rs`).
//!
//! usage: cargo bench -p tessera-model --bench peak [-- MILLISECONDS]
//! Prints one `RESULT peak ...` line: billions of multiply-adds per second over all threads
//! (`f32_gmacs`, `bf16_gmacs`, `int8_gmacs`; a kernel the CPU lacks reads 0) and the read
//! bandwidth (`read_gbs`).

#[path = "support/ceilings.rs"]
mod ceilings;

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let p = ceilings::peaks(args.first().copied().unwrap_or(300));
    let threads = rayon::current_num_threads();
    for (name, v) in [("f32", p.f32), ("bf16", p.bf16), ("int8", p.int8)] {
        println!("{name:>5}: {v:8.1} G multiply-adds/s ({threads} threads)");
    }
    let gbs = ceilings::read_bandwidth(1024, 5);
    println!("read bandwidth: {gbs:.1} GB/s");
    println!("RESULT peak threads={threads} f32_gmacs={:.1} bf16_gmacs={:.1} int8_gmacs={:.1} read_gbs={gbs:.1}", p.f32, p.bf16, p.int8);
}
