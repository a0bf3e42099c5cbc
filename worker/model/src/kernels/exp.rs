//! `e^x` over slices of f32, vectorised.
//!
//! libm's `expf` is one call per element; SiLU over a 1,536-wide MLP and the softmax of decode
//! attention make tens of thousands of such calls per token. This is the Cephes polynomial
//! (round `x / ln 2` to `n`, a degree-6 polynomial for `e^r` on the remainder, scale by `2^n`),
//! written without branches so the compiler vectorises the loop, and compiled once per
//! instruction set that is picked at run time. Relative error stays within a few units in the
//! last place of `f32::exp` over the range used (tested below).

/// Inputs are clamped to this range: below it `e^x` underflows to 0 (the `2^n` factor's
/// exponent field reaches 0), above it the result stays finite (`e^88 ≈ 1.7·10³⁸`).
const LOW: f32 = -88.0;
const HIGH: f32 = 88.0;

#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, so `x − n ln 2` loses nothing to rounding.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding then subtracting 1.5 · 2²³ rounds to the nearest integer without a branch or a
    // call (SSE2 has no vector round).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(LOW, HIGH);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Replaces every `x` in `xs` by `e^x`.
pub(crate) fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { exp_avx512(xs) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { exp_avx2(xs) };
        }
    }
    exp_portable(xs);
}

fn exp_portable(xs: &mut [f32]) {
    for x in xs {
        *x = exp(*x);
    }
}

/// [`exp_portable`] compiled for AVX-512.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_avx512(xs: &mut [f32]) {
    exp_portable(xs);
}

/// [`exp_portable`] compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_avx2(xs: &mut [f32]) {
    exp_portable(xs);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against libm over the range SiLU and softmax feed it, on every instruction set this CPU
    /// has; the ends of the range behave as documented.
    #[test]
    fn matches_libm_within_a_few_ulp() {
        let xs: Vec<f32> = (0..=200_000).map(|i| -87.0 + 175.0 * i as f32 / 200_000.0).collect();
        let mut runs: Vec<(&str, Vec<f32>)> = vec![("portable", xs.clone()), ("dispatched", xs.clone())];
        exp_portable(&mut runs[0].1);
        exp_in_place(&mut runs[1].1);
        // Each vector path this CPU has, not only the one dispatch picks.
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") {
                let mut y = xs.clone();
                // SAFETY: the CPU has AVX-512F.
                unsafe { exp_avx512(&mut y) };
                runs.push(("avx512", y));
            } else {
                crate::kernels::kernel_paths::not_exercised("exp avx512");
            }
            if has!("avx2") && has!("fma") {
                let mut y = xs.clone();
                // SAFETY: the CPU has AVX2 and FMA.
                unsafe { exp_avx2(&mut y) };
                runs.push(("avx2", y));
            } else {
                crate::kernels::kernel_paths::not_exercised("exp avx2");
            }
        }
        for (name, got) in &runs {
            for (x, y) in xs.iter().zip(got) {
                let want = x.exp();
                assert!((y - want).abs() <= 4.0 * f32::EPSILON * want, "{name}: e^{x} = {y}, libm {want}");
            }
        }
        let mut ends = [f32::NEG_INFINITY, -1000.0, 0.0, 1000.0, f32::INFINITY];
        exp_in_place(&mut ends);
        assert_eq!(ends[..3], [0.0, 0.0, 1.0]);
        assert!(ends[3..].iter().all(|v| v.is_finite() && *v > 1e38));
    }
}
