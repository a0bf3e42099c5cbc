//! Memory read bandwidth of this machine with the worker's thread count: the ceiling of decode,
//! which reads every weight once per step. Reads a buffer far larger than the caches in
//! parallel chunks, several times, and reports the best pass.
//!
//! usage: cargo bench -p tessera-model --bench bandwidth [-- MIB PASSES]
//! Prints `RESULT bandwidth read_gbs=…` (decimal GB/s).

#[path = "support/ceilings.rs"]
mod ceilings;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let mib = args.first().copied().unwrap_or(1024);
    let passes = args.get(1).copied().unwrap_or(5);
    let mut best = 0f64;
    for (pass, gbs) in ceilings::read_passes(mib, passes).into_iter().enumerate() {
        println!("pass {pass}: {gbs:.1} GB/s");
        best = best.max(gbs);
    }
    println!("threads {}", rayon::current_num_threads());
    println!("RESULT bandwidth read_gbs={best:.1}");
}
