//! `tessera run`: an in-process engine that streams a completion to the terminal.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use tessera_collective::{Collective, InProcessGroup, SingleRank};
use tessera_model::fixture::{self, WriteOptions};
use tessera_model::sampler::{Sampler, SamplingParams};
use tessera_model::{Batch, LoadConfig, LogitsMode, Model, SeqChunk};
use tokenizers::Tokenizer;

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub compute: crate::ComputeArgs,
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer.json). Without it a
    /// small demo model with random weights is written and used.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tensor-parallel degree: the model is sharded over this many ranks (threads here).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The prompt.
    prompt: String,
}

/// Largest accepted values: a typo must not allocate the machine away.
const MAX_NEW_TOKENS: usize = 1 << 16;
const MAX_TP: usize = 64;

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.tp == 0 || args.tp > MAX_TP {
        bail!("--tp must be between 1 and {MAX_TP}");
    }
    if args.max_new_tokens > MAX_NEW_TOKENS {
        bail!("--max-new-tokens must be at most {MAX_NEW_TOKENS}");
    }
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        bail!("--temperature must be a finite number >= 0");
    }
    if let Some(p) = args.top_p {
        if !(p > 0.0 && p <= 1.0) {
            bail!("--top-p must be in (0, 1]");
        }
    }
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => demo_model_dir()?,
    };
    let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", dir.join("tokenizer.json").display()))?;
    let prompt: Vec<u32> =
        tokenizer.encode(args.prompt.as_str(), false).map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?.get_ids().to_vec();
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        ..SamplingParams::default()
    };
    let start = Instant::now();

    // Every rank runs the same loop; all-reduces are bit-identical across ranks, so each rank's
    // sampler (same seed) picks the same token and the ranks stay in lockstep without talking.
    let rank_main = |rank: usize, comm: &mut dyn Collective| -> anyhow::Result<Vec<u32>> {
        let load = LoadConfig { tp_rank: rank, tp_size: args.tp, ..LoadConfig::default() };
        let model = Model::load(&dir, &load).with_context(|| format!("loading rank {rank} of {}", args.tp))?;
        let mut stream = tokenizer.decode_stream(false);
        let on_token = |id: u32| {
            // Rank 0 speaks for the group; the others compute the same tokens silently.
            if rank == 0 {
                if let Ok(Some(text)) = stream.step(id) {
                    let mut out = std::io::stdout().lock();
                    let _ = write!(out, "{text}");
                    let _ = out.flush();
                }
            }
        };
        generate(&model, comm, &prompt, Sampler::new(params.clone()), args.max_new_tokens, on_token)
    };
    let generated = if args.tp == 1 {
        rank_main(0, &mut SingleRank)?
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = InProcessGroup::new(args.tp)
                .into_iter()
                .enumerate()
                .map(|(rank, mut comm)| {
                    let rank_main = &rank_main;
                    s.spawn(move || rank_main(rank, &mut comm))
                })
                .collect();
            let mut first = None;
            for h in handles {
                let r = h.join().map_err(|_| anyhow::anyhow!("a rank thread panicked"))??;
                first.get_or_insert(r);
            }
            first.context("no ranks ran")
        })?
    };
    let secs = start.elapsed().as_secs_f64();
    println!();
    eprintln!("[{} prompt tokens, {} generated, tp={}, {:.2} s incl. loading]", prompt.len(), generated.len(), args.tp, secs);
    Ok(())
}

/// Writes (or reuses) the demo model and says plainly that its weights are random.
pub fn demo_model_dir() -> anyhow::Result<PathBuf> {
    let root = std::env::temp_dir().join("tessera-demo");
    let dir = fixture::write_fixture(&fixture::demo(), &root, &WriteOptions::default())?;
    eprintln!("note: no --model given; using a demo model with RANDOM weights at {} (its text is noise)", dir.display());
    Ok(dir)
}

/// Prefill, then sample until an end-of-sequence token or `max_new` tokens.
fn generate(
    model: &Model,
    comm: &mut dyn Collective,
    prompt: &[u32],
    mut sampler: Sampler,
    max_new: usize,
    mut on_token: impl FnMut(u32),
) -> anyhow::Result<Vec<u32>> {
    let eos = &model.config().eos_token_ids;
    let mut kv = model.new_kv_cache();
    let mut out = Vec::with_capacity(max_new);
    let (mut tokens, mut start) = (prompt.to_vec(), 0usize);
    while out.len() < max_new {
        let chunk = [SeqChunk { seq: 0, start, len: tokens.len() }];
        let logits = model.forward(&Batch { tokens: &tokens, chunks: &chunk }, &mut kv, comm, LogitsMode::LastPerChunk)?;
        let row = logits.squeeze(0)?.to_vec1::<f32>()?;
        let next = sampler.sample(&row);
        if eos.contains(&next) {
            break;
        }
        on_token(next);
        out.push(next);
        start += tokens.len();
        tokens.clear();
        tokens.push(next);
    }
    Ok(out)
}
