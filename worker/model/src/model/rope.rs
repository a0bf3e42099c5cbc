//! Rotary position embedding frequencies, including the scaled variants.
//!
//! The arithmetic follows transformers' `modeling_rope_utils` step by step, in f32 where it
//! computes in f32, so TP=1 logits match the Hugging Face reference to float tolerance.

use std::f64::consts::PI;

use crate::model::config::{ModelConfig, RopeScaling};

/// Rotary frequencies of one model.
#[derive(Debug, Clone)]
pub struct Rope {
    dim: usize,
    theta: f64,
    scaling: RopeScaling,
    /// Frequencies for sequences that do not trigger dynamic scaling.
    inv_freq: Vec<f32>,
    /// Multiplier of cos and sin (YaRN's attention factor; 1 otherwise).
    attention_scaling: f32,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        let dim = cfg.head_dim;
        let theta = cfg.rope_theta;
        let (inv_freq, attention_scaling) = match &cfg.rope_scaling {
            RopeScaling::None | RopeScaling::Dynamic { .. } => (default_inv_freq(theta, dim), 1.0),
            RopeScaling::Linear { factor } => {
                let f = *factor as f32;
                (default_inv_freq(theta, dim).into_iter().map(|x| x / f).collect(), 1.0)
            }
            RopeScaling::Yarn { .. } => yarn_inv_freq(theta, dim, &cfg.rope_scaling),
            RopeScaling::Llama3 { .. } => (llama3_inv_freq(theta, dim, &cfg.rope_scaling), 1.0),
        };
        Self { dim, theta, scaling: cfg.rope_scaling.clone(), inv_freq, attention_scaling }
    }

    /// Half the head dimension: the width of the cos/sin tables.
    pub fn half_dim(&self) -> usize {
        self.dim / 2
    }

    /// Appends the cos and sin rows (each `dim / 2` wide) of `positions` to `cos` and `sin`.
    /// `seq_len` is the sequence's length after this forward call; only dynamic NTK scaling
    /// depends on it, recomputing the base once the sequence outgrows the original context.
    pub fn extend_tables(&self, positions: std::ops::Range<usize>, seq_len: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        let dynamic;
        let inv_freq = match &self.scaling {
            RopeScaling::Dynamic { factor, original_max_position_embeddings } if seq_len > *original_max_position_embeddings => {
                let d = self.dim as f64;
                let growth = factor * seq_len as f64 / *original_max_position_embeddings as f64 - (factor - 1.0);
                let base = self.theta * growth.powf(d / (d - 2.0));
                dynamic = default_inv_freq(base, self.dim);
                &dynamic
            }
            _ => &self.inv_freq,
        };
        for p in positions {
            let p = p as f32;
            for &f in inv_freq {
                let angle = f * p;
                cos.push(angle.cos() * self.attention_scaling);
                sin.push(angle.sin() * self.attention_scaling);
            }
        }
    }
}

/// `1 / base^(2i/dim)` computed in f32 as transformers does.
fn default_inv_freq(base: f64, dim: usize) -> Vec<f32> {
    let base = base as f32;
    (0..dim).step_by(2).map(|i| 1.0 / base.powf(i as f32 / dim as f32)).collect()
}

fn yarn_inv_freq(theta: f64, dim: usize, scaling: &RopeScaling) -> (Vec<f32>, f32) {
    let RopeScaling::Yarn { factor, original_max_position_embeddings, attention_factor, beta_fast, beta_slow, truncate } = *scaling else {
        unreachable!("yarn_inv_freq is only called for yarn scaling")
    };
    let d = dim as f64;
    let correction_dim = |rotations: f64| d * (original_max_position_embeddings as f64 / (rotations * 2.0 * PI)).ln() / (2.0 * theta.ln());
    let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
    if truncate {
        low = low.floor();
        high = high.ceil();
    }
    let low = low.max(0.0);
    let high = high.min(d - 1.0);
    // transformers nudges a degenerate ramp to avoid dividing by zero.
    let high = if low == high { high + 0.001 } else { high };

    let base = theta as f32;
    let factor32 = factor as f32;
    let inv_freq = (0..dim / 2)
        .map(|i| {
            let pos_freq = base.powf((2 * i) as f32 / dim as f32);
            let extrapolation = 1.0 / pos_freq;
            let interpolation = 1.0 / (factor32 * pos_freq);
            let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
            let extrapolation_weight = 1.0 - ramp;
            interpolation * (1.0 - extrapolation_weight) + extrapolation * extrapolation_weight
        })
        .collect();
    (inv_freq, attention_factor as f32)
}

fn llama3_inv_freq(theta: f64, dim: usize, scaling: &RopeScaling) -> Vec<f32> {
    let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } = *scaling else {
        unreachable!("llama3_inv_freq is only called for llama3 scaling")
    };
    let old_len = original_max_position_embeddings as f32;
    let (factor, low, high) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32);
    let low_freq_wavelen = old_len / low;
    let high_freq_wavelen = old_len / high;
    default_inv_freq(theta, dim)
        .into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            if wavelen < high_freq_wavelen {
                f
            } else if wavelen > low_freq_wavelen {
                f / factor
            } else {
                let smooth = (old_len / wavelen - low) / (high - low);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect()
}
