//! Memory read bandwidth of this machine with the worker's thread count: the ceiling of decode,
//! which reads every weight once per step. Reads a buffer far larger than the caches in
//! parallel chunks, several times, and reports the best pass.
//!
//! usage: cargo bench -p tessera-model --bench bandwidth [-- MIB PASSES]
//! Prints `RESULT bandwidth read_gbs=…` (decimal GB/s).

use std::time::Instant;

use rayon::prelude::*;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let mib = args.first().copied().unwrap_or(1024);
    let passes = args.get(1).copied().unwrap_or(5);
    let words = mib << 17; // u64 words in `mib` MiB
                           // Distinct values, so no page is shared or compressed away.
    let buf: Vec<u64> = (0..words as u64).into_par_iter().map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    let mut best = 0f64;
    for pass in 0..passes {
        let start = Instant::now();
        // Eight independent lanes per chunk so the sum is not a latency chain.
        let sum: u64 = buf
            .par_chunks(1 << 16)
            .map(|c| {
                let mut lanes = [0u64; 8];
                for w in c.chunks_exact(8) {
                    for k in 0..8 {
                        lanes[k] = lanes[k].wrapping_add(w[k]);
                    }
                }
                lanes.iter().fold(0u64, |a, b| a.wrapping_add(*b))
            })
            .reduce(|| 0, u64::wrapping_add);
        let gbs = (words * 8) as f64 / start.elapsed().as_secs_f64() / 1e9;
        println!("pass {pass}: {gbs:.1} GB/s (checksum {sum:x})");
        best = best.max(gbs);
    }
    println!("threads {}", rayon::current_num_threads());
    println!("RESULT bandwidth read_gbs={best:.1}");
}
