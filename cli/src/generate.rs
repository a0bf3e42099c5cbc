//! `tessera generate`: streams one completion from a coordinator to the terminal.

use std::io::Write;

use anyhow::bail;
use clap::Args;
use tessera_proto::v1 as pb;

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Coordinator address (`https://` for a coordinator serving TLS).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    #[command(flatten)]
    auth: crate::client::ClientAuthArgs,
    /// Served model name (may be omitted when the coordinator serves one model).
    #[arg(long, default_value = "")]
    model: String,
    /// A LoRA adapter of the model to generate with (ListModels shows them).
    #[arg(long, default_value = "")]
    adapter: String,
    /// 0 = the server's default.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: u32,
    /// 0 = greedy. Unset: the model's default (its generation_config.json), else greedy; the
    /// same for --top-k, --top-p and --repetition-penalty.
    #[arg(long)]
    temperature: Option<f32>,
    /// 0 = no top-k cut.
    #[arg(long)]
    top_k: Option<u32>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Hugging Face semantics; 1 = off.
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// OpenAI semantics, in [-2, 2].
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// OpenAI semantics, in [-2, 2].
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// No n-gram of this size repeats; 0 = off.
    #[arg(long, default_value_t = 0)]
    no_repeat_ngram_size: u32,
    /// DRY ("don't repeat yourself", llama.cpp) penalty scale; 0 = off (llama.cpp suggests 0.8).
    #[arg(long, default_value_t = 0.0)]
    dry_multiplier: f32,
    /// DRY growth per token past --dry-allowed-length.
    #[arg(long, default_value_t = 1.75)]
    dry_base: f32,
    /// DRY: repeats up to this many tokens long are not penalised.
    #[arg(long, default_value_t = 2)]
    dry_allowed_length: u32,
    /// DRY: how many recent tokens to search for repeats; 0 = the whole context.
    #[arg(long, default_value_t = 0)]
    dry_penalty_last_n: u32,
    /// DRY: a string that breaks a repeated sequence (repeatable; default newline, ":", "\"", "*").
    #[arg(long)]
    dry_sequence_breaker: Vec<String>,
    /// Stop with REPETITION when the output repeats a unit of up to 32 tokens 3 times, or a
    /// sentence 3 times.
    #[arg(long)]
    loop_guard: bool,
    /// With --loop-guard: instead of stopping at once, first sample at this temperature for
    /// --loop-guard-remedy-tokens tokens to leave the loop (stopping if it comes back).
    #[arg(long)]
    loop_guard_remedy_temperature: Option<f32>,
    /// Tokens each remedy lasts.
    #[arg(long, default_value_t = 32)]
    loop_guard_remedy_tokens: u32,
    /// Print each token with its log-probability and this many most likely alternatives
    /// (0..=20) after the text.
    #[arg(long)]
    logprobs: Option<u32>,
    /// Drop sentences already streamed from the text.
    #[arg(long)]
    remove_repeated_sentences: bool,
    /// Beam search with this many beams (>= 2); prints the best hypotheses at the end.
    #[arg(long, default_value_t = 0)]
    num_beams: u32,
    /// Hypotheses to print with --num-beams.
    #[arg(long, default_value_t = 1)]
    num_return_sequences: u32,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Stop at this token id (repeatable).
    #[arg(long)]
    stop_token_id: Vec<u32>,
    /// Keep generating past the model's end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Compute the whole prompt instead of reusing the workers' cached blocks of its prefix.
    #[arg(long)]
    no_prefix_cache: bool,
    /// With --chat: a system message before the prompt.
    #[arg(long)]
    system: Option<String>,
    /// Send the prompt as one user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    /// The prompt.
    prompt: String,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(generate(args))
}

async fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let mut client = args.auth.connect(&args.addr).await?;
    let input = if args.chat {
        let system = args.system.iter().map(|s| pb::ChatMessage { role: "system".into(), content: s.clone() });
        let user = pb::ChatMessage { role: "user".into(), content: args.prompt.clone() };
        pb::generate_request::Input::Chat(pb::ChatInput { messages: system.chain([user]).collect() })
    } else {
        pb::generate_request::Input::Prompt(args.prompt.clone())
    };
    let request = pb::GenerateRequest {
        model: args.model.clone(),
        input: Some(input),
        sampling: Some(pb::SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
            min_p: args.min_p,
            repetition_penalty: args.repetition_penalty,
            presence_penalty: args.presence_penalty,
            frequency_penalty: args.frequency_penalty,
            no_repeat_ngram_size: args.no_repeat_ngram_size,
            dry: (args.dry_multiplier != 0.0).then(|| pb::Dry {
                multiplier: args.dry_multiplier,
                base: args.dry_base,
                allowed_length: args.dry_allowed_length,
                penalty_last_n: args.dry_penalty_last_n,
                sequence_breakers: if args.dry_sequence_breaker.is_empty() {
                    ["\n", ":", "\"", "*"].map(String::from).to_vec()
                } else {
                    args.dry_sequence_breaker.clone()
                },
            }),
            logprobs: args.logprobs.unwrap_or(0),
            logit_bias: Vec::new(),
            loop_guard: args.loop_guard.then(|| {
                let (action, remedy_temperature) = match args.loop_guard_remedy_temperature {
                    Some(t) => (pb::LoopAction::RaiseTemperature, t),
                    None => (pb::LoopAction::Stop, 0.0),
                };
                pb::LoopGuard {
                    max_period: 32,
                    min_repeats: 3,
                    sentences: true,
                    action: action as i32,
                    remedy_temperature,
                    remedy_tokens: args.loop_guard_remedy_tokens,
                }
            }),
            beam_search: (args.num_beams >= 2).then_some(pb::BeamSearch {
                num_beams: args.num_beams,
                num_return_sequences: args.num_return_sequences,
                ..Default::default()
            }),
            remove_repeated_sentences: args.remove_repeated_sentences,
        }),
        stopping: Some(pb::StoppingCriteria {
            max_new_tokens: args.max_new_tokens,
            stop: args.stop.clone(),
            stop_token_ids: args.stop_token_id.clone(),
            ignore_eos: args.ignore_eos,
        }),
        request_id: String::new(),
        no_prefix_cache: args.no_prefix_cache,
        adapter: args.adapter.clone(),
        long_input: None,
    };
    let mut stream = match client.generate(request).await {
        Ok(r) => r.into_inner(),
        Err(status) => bail!("{:?}: {}", status.code(), status.message()),
    };
    let mut out = std::io::stdout().lock();
    let mut tokens: Vec<pb::Token> = Vec::new();
    loop {
        let event = match stream.message().await {
            Ok(Some(r)) => r.event,
            Ok(None) => bail!("the stream ended without a Finished message"),
            Err(status) => {
                writeln!(out)?;
                bail!("{:?}: {}", status.code(), status.message());
            }
        };
        match event {
            Some(pb::generate_response::Event::Started(s)) => {
                let placement = s.placement.unwrap_or_default();
                eprintln!(
                    "[{} | {} prompt tokens | tp={} on {}]",
                    s.request_id,
                    s.prompt_tokens,
                    placement.tp,
                    placement.workers.join(", ")
                );
            }
            Some(pb::generate_response::Event::Progress(p)) => {
                eprintln!(
                    "[long input: stage {} call {}/{} done, {} prompt + {} answer tokens]",
                    p.stage, p.done, p.total, p.prompt_tokens, p.completion_tokens
                );
            }
            Some(pb::generate_response::Event::Chunk(c)) => {
                write!(out, "{}", c.text)?;
                out.flush()?;
                if args.logprobs.is_some() {
                    tokens.extend(c.tokens);
                }
            }
            Some(pb::generate_response::Event::Finished(f)) => {
                writeln!(out)?;
                let usage = f.usage.unwrap_or_default();
                let timing = f.timing.unwrap_or_default();
                let reason = pb::FinishReason::try_from(f.reason).map(|r| r.as_str_name()).unwrap_or("UNKNOWN");
                let decode_s = (timing.total_ms - timing.time_to_first_token_ms) / 1e3;
                let rate = if decode_s > 0.0 { usage.completion_tokens.saturating_sub(1) as f64 / decode_s } else { 0.0 };
                eprintln!(
                    "[{reason} | {} tokens | first token {:.0} ms | {rate:.1} tok/s]",
                    usage.completion_tokens, timing.time_to_first_token_ms
                );
                if let Some(report) = f.r#loop {
                    eprintln!("[loop guard: {:?} repeated {} times]", report.text, report.repeats);
                }
                if f.removed_sentences > 0 {
                    eprintln!("[{} repeated sentences removed]", f.removed_sentences);
                }
                for (i, h) in f.hypotheses.iter().enumerate().skip(1) {
                    eprintln!("[hypothesis {} | score {:.4}] {}", i + 1, h.score, h.text);
                }
                for t in &tokens {
                    let top: Vec<String> = t.top.iter().map(|a| format!("{} {:.3}", a.id, a.logprob)).collect();
                    eprintln!(
                        "[token {} logprob {:.4}{}{}]",
                        t.id,
                        t.logprob.unwrap_or(f32::NAN),
                        if top.is_empty() { "" } else { " | top " },
                        top.join(", ")
                    );
                }
                return Ok(());
            }
            None => {}
        }
    }
}
