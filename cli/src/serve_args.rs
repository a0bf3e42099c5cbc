//! Options shared by `tessera coordinator` and `tessera up`: what to serve and the limits.

use std::path::Path;

use clap::Args;
use tessera_coordinator::{ClusterConfig, CoordinatorConfig, Limits, LoopConfig, ModelSpec};

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Name clients use for the model (default: the model directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Weight dtype on the workers: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Sequences one group runs at once.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Tokens one step may carry; longer prompts are prefilled in chunks so running streams
    /// keep decoding meanwhile.
    #[arg(long, default_value_t = 256)]
    pub step_tokens: usize,
    /// Seconds a step may take before its group is declared lost (a hung worker).
    #[arg(long, default_value_t = 300)]
    pub step_timeout_secs: u64,
    /// Requests waiting per group before new ones are refused.
    #[arg(long, default_value_t = 256)]
    pub queue_depth: usize,
    /// Accept sequences up to this many tokens instead of the model's own context limit
    /// (positions past it are extrapolated; quality may drop).
    #[arg(long)]
    pub max_context: Option<usize>,
    /// Largest max_new_tokens a request may ask for.
    #[arg(long, default_value_t = Limits::default().max_new_tokens)]
    pub max_new_tokens_limit: u32,
    /// Spread a prompt of at least this many tokens over a sequence-parallel ring of
    /// ceil(prompt / N) groups even when one group could hold it, to cut its prefill time
    /// (0: only when no group can hold it).
    #[arg(long, default_value_t = 0)]
    pub ring_prefill_tokens: usize,
}

/// Largest values the flags accept: a typo must not allocate the machine away.
const MAX_BATCH: usize = 4096;
const MAX_QUEUE: usize = 1 << 16;
const MAX_STEP_TOKENS: usize = 1 << 20;

impl ServeArgs {
    /// The coordinator's configuration for serving `dir` with groups of `tp` ranks.
    pub fn config(&self, dir: &Path, tp: usize) -> anyhow::Result<CoordinatorConfig> {
        anyhow::ensure!((1..=MAX_BATCH).contains(&self.max_batch), "--max-batch must be in 1..={MAX_BATCH}");
        anyhow::ensure!((1..=MAX_QUEUE).contains(&self.queue_depth), "--queue-depth must be in 1..={MAX_QUEUE}");
        anyhow::ensure!(self.max_new_tokens_limit > 0, "--max-new-tokens-limit must be at least 1");
        anyhow::ensure!((1..=MAX_STEP_TOKENS).contains(&self.step_tokens), "--step-tokens must be in 1..={MAX_STEP_TOKENS}");
        anyhow::ensure!((1..=86_400).contains(&self.step_timeout_secs), "--step-timeout-secs must be in 1..=86400");
        let name = match &self.name {
            Some(n) => n.clone(),
            None => model_name(dir),
        };
        let limits = Limits {
            max_new_tokens: self.max_new_tokens_limit,
            default_max_new_tokens: Limits::default().default_max_new_tokens.min(self.max_new_tokens_limit),
            ..Limits::default()
        };
        let cluster = ClusterConfig {
            queue_depth: self.queue_depth,
            group_loop: LoopConfig {
                max_batch: self.max_batch,
                step_tokens: self.step_tokens,
                step_timeout: std::time::Duration::from_secs(self.step_timeout_secs),
            },
            ring_prefill_tokens: self.ring_prefill_tokens,
            ..ClusterConfig::default()
        };
        // Workers may run in another directory: give them an absolute path.
        let spec = ModelSpec { name, dir: std::path::absolute(dir)?, tp, dtype: self.dtype.clone(), max_context: self.max_context };
        Ok(CoordinatorConfig { models: vec![spec], limits, cluster })
    }
}

fn model_name(dir: &Path) -> String {
    dir.file_name().and_then(|n| n.to_str()).filter(|n| !n.is_empty()).unwrap_or("model").to_string()
}
