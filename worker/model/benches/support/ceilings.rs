//! The machine's ceilings for a benchmark to be read against, measured in the same run: the
//! multiply-add peak of each kernel family (registers only, every thread busy) and the memory
//! read bandwidth. Shared by `bandwidth.rs`, `peak.rs` and `batch_decode.rs`, each of which uses
//! a part of it.
#![allow(dead_code)]

use std::time::Instant;

use rayon::prelude::*;

/// Multiply-adds one call of a kernel does per iteration, and the kernel.
type Kernel = (u64, fn(u64) -> f32);

/// Billions of multiply-adds per second over all threads, per kernel family (0 where the CPU
/// lacks it).
#[derive(Debug, Clone, Copy)]
pub struct Peaks {
    pub f32: f64,
    pub bf16: f64,
    pub int8: f64,
}

/// Each family's peak, about `millis` ms of work per pass.
pub fn peaks(millis: u64) -> Peaks {
    let threads = rayon::current_num_threads();
    let measure = |k: Option<Kernel>| k.map_or(0.0, |(macs, f)| rate(macs, f, millis, threads));
    Peaks { f32: measure(f32_kernel()), bf16: measure(bf16_kernel()), int8: measure(int8_kernel()) }
}

/// Read bandwidth in decimal GB/s: the best of `passes` parallel reads of `mib` MiB.
pub fn read_bandwidth(mib: usize, passes: usize) -> f64 {
    read_passes(mib, passes).into_iter().fold(0.0, f64::max)
}

/// Each of `passes` reads of a buffer of `mib` MiB, far larger than the caches, in parallel
/// chunks, in decimal GB/s.
pub fn read_passes(mib: usize, passes: usize) -> Vec<f64> {
    // `mib` MiB of u64 words, distinct values so that no page is shared or compressed away.
    let words = mib << 17;
    let buf: Vec<u64> = (0..words as u64).into_par_iter().map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect();
    (0..passes)
        .map(|_| {
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
            std::hint::black_box(sum);
            (words * 8) as f64 / start.elapsed().as_secs_f64() / 1e9
        })
        .collect()
}

/// Multiply-adds per second (billions) of `f` run by every thread for about `millis` ms; the
/// best of three passes.
fn rate(macs_per_iter: u64, f: fn(u64) -> f32, millis: u64, threads: usize) -> f64 {
    // Calibrate the iteration count to about a tenth of the time on one thread.
    let mut iters = 1u64 << 12;
    loop {
        let t = Instant::now();
        std::hint::black_box(f(iters));
        if t.elapsed().as_millis() as u64 >= millis / 10 || iters > 1 << 34 {
            break;
        }
        iters *= 2;
    }
    let iters = iters * 10;
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let s: f32 = (0..threads).into_par_iter().map(|_| f(iters)).sum();
        std::hint::black_box(s);
        best = best.max((threads as u64 * iters * macs_per_iter) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Independent accumulators per thread: enough to cover the multiply-add latency on two pipes.
const CHAINS: usize = 12;

fn f32_kernel() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return Some(((CHAINS * 16) as u64, |n| unsafe { f32_avx512(n) }));
        }
        if has!("avx2") && has!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return Some(((CHAINS * 8) as u64, |n| unsafe { f32_avx2(n) }));
        }
    }
    None
}

fn bf16_kernel() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512bf16") {
            // SAFETY: the CPU has AVX-512 F/BW/BF16 (checked just above).
            return Some(((CHAINS * 32) as u64, |n| unsafe { bf16_avx512(n) }));
        }
    }
    None
}

fn int8_kernel() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") {
            // SAFETY: the CPU has AVX-512 F/BW/VNNI (checked just above).
            return Some(((CHAINS * 64) as u64, |n| unsafe { int8_vnni(n) }));
        }
        if has!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return Some(((CHAINS * 32) as u64, |n| unsafe { int8_avx2(n) }));
        }
    }
    None
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn f32_avx512(n: u64) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut acc = [_mm512_set1_ps(1.0); CHAINS];
    for _ in 0..n {
        for c in &mut acc {
            *c = _mm512_fmadd_ps(*c, a, b);
        }
    }
    acc.iter().map(|&c| _mm512_reduce_add_ps(c)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn f32_avx2(n: u64) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut acc = [_mm256_set1_ps(1.0); CHAINS];
    for _ in 0..n {
        for c in &mut acc {
            *c = _mm256_fmadd_ps(*c, a, b);
        }
    }
    let mut out = [0f32; 8];
    let sum = acc.iter().fold(_mm256_setzero_ps(), |s, &c| _mm256_add_ps(s, c));
    // SAFETY: `out` holds eight floats.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
    out.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn bf16_avx512(n: u64) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: same-size bit casts between vector types.
    let (a, b) = unsafe {
        (
            std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi16(0x3f80)),
            std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi16(0x3380)),
        )
    };
    let mut acc = [_mm512_setzero_ps(); CHAINS];
    for _ in 0..n {
        for c in &mut acc {
            *c = _mm512_dpbf16_ps(*c, a, b);
        }
    }
    acc.iter().map(|&c| _mm512_reduce_add_ps(c)).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn int8_vnni(n: u64) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_epi8(1), _mm512_set1_epi8(1));
    let mut acc = [_mm512_setzero_si512(); CHAINS];
    for _ in 0..n {
        for c in &mut acc {
            *c = _mm512_dpbusd_epi32(*c, a, b);
        }
    }
    acc.iter().map(|&c| _mm512_reduce_add_epi32(c) as f32).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn int8_avx2(n: u64) -> f32 {
    use std::arch::x86_64::*;
    let (a, b, ones) = (_mm256_set1_epi8(1), _mm256_set1_epi8(1), _mm256_set1_epi16(1));
    let mut acc = [_mm256_setzero_si256(); CHAINS];
    for _ in 0..n {
        for c in &mut acc {
            *c = _mm256_add_epi32(*c, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
        }
    }
    let mut out = [0i32; 8];
    let sum = acc.iter().fold(_mm256_setzero_si256(), |s, &c| _mm256_add_epi32(s, c));
    // SAFETY: `out` holds eight i32.
    unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, sum) };
    out.iter().map(|&v| v as f32).sum()
}
