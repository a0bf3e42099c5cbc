//! Conversions between `tessera.worker.v1` messages and engine types: the only place the
//! worker sees generated protobuf types besides the service itself.

use std::net::SocketAddr;
use std::path::PathBuf;

use tessera_model::sampler::{DryParams, SamplingParams};
use tessera_model::{Numerics, PrefixCaching};
use tessera_proto::worker as pb;

use crate::engine::{AdapterSpec, Assignment, Sampled, SeqWork, StepWork};
use crate::error::WorkerError;

pub mod ring;

/// Largest tensor-parallel group a worker accepts.
const MAX_TP: u32 = 256;

pub fn assignment(req: pb::AssignRequest) -> Result<Assignment, WorkerError> {
    // A quantized format names how the projections are stored; everything else (embeddings,
    // norms, activations, KV cache) stays f32.
    let name = if req.dtype.is_empty() { "f32" } else { req.dtype.as_str() };
    let (dtype, quantization) =
        tessera_model::weight_format(name).ok_or_else(|| WorkerError::InvalidArgument(format!("unknown dtype {:?}", req.dtype)))?;
    if req.tp_size == 0 || req.tp_size > MAX_TP || req.tp_rank >= req.tp_size {
        return Err(WorkerError::InvalidArgument(format!("rank {} of tp {} (max {MAX_TP})", req.tp_rank, req.tp_size)));
    }
    Ok(Assignment {
        group_id: req.group_id,
        model_dir: PathBuf::from(req.model_dir),
        dtype,
        quantization,
        tp_rank: req.tp_rank as usize,
        tp_size: req.tp_size as usize,
        numerics: if req.batch_invariant { Numerics::BatchInvariant } else { Numerics::Fast },
    })
}

pub fn peers(list: &[String]) -> Result<Vec<SocketAddr>, WorkerError> {
    list.iter().map(|p| p.parse().map_err(|_| WorkerError::InvalidArgument(format!("bad peer address {p:?}")))).collect()
}

/// Most alternatives a token may carry (as OpenAI's API).
const MAX_TOP_LOGPROBS: u32 = 20;

/// Most next-token candidates a beam-search step may ask for per sequence.
const MAX_BEAM_CANDIDATES: u32 = 64;
/// Most forks one step may carry (a few per beam of every batched beam search).
const MAX_FORKS: usize = 4096;

pub fn step_work(req: pb::StepRequest) -> Result<StepWork, WorkerError> {
    if req.forks.len() > MAX_FORKS {
        return Err(WorkerError::InvalidArgument(format!("{} forks in one step; the limit is {MAX_FORKS}", req.forks.len())));
    }
    let seqs = req.seqs.into_iter().map(seq_work).collect::<Result<Vec<_>, _>>()?;
    Ok(StepWork { forks: req.forks.iter().map(|f| (f.from, f.to)).collect(), seqs })
}

fn seq_work(s: pb::SeqStep) -> Result<SeqWork, WorkerError> {
    let top_logprobs = s.sampling.as_ref().map_or(0, |p| p.top_logprobs);
    if top_logprobs > MAX_TOP_LOGPROBS {
        return Err(WorkerError::InvalidArgument(format!("top_logprobs is {top_logprobs}; the limit is {MAX_TOP_LOGPROBS}")));
    }
    let beam_candidates = s.sampling.as_ref().map_or(0, |p| p.beam_candidates);
    if beam_candidates > MAX_BEAM_CANDIDATES {
        return Err(WorkerError::InvalidArgument(format!("beam_candidates is {beam_candidates}; the limit is {MAX_BEAM_CANDIDATES}")));
    }
    let resume = s.sampling.as_ref().and_then(|p| p.resume.as_ref()).map(|r| (r.prompt_len as usize, r.rng_draws));
    let sampling = match s.sampling {
        None => None,
        Some(p) => {
            let params = SamplingParams {
                temperature: p.temperature,
                top_k: (p.top_k > 0).then_some(p.top_k as usize),
                top_p: p.top_p,
                seed: p.seed,
                min_p: p.min_p,
                // Unset (0) means off, as 1 does.
                repetition_penalty: if p.repetition_penalty == 0.0 { 1.0 } else { p.repetition_penalty },
                presence_penalty: p.presence_penalty,
                frequency_penalty: p.frequency_penalty,
                no_repeat_ngram_size: p.no_repeat_ngram_size as usize,
                dry: DryParams {
                    multiplier: p.dry_multiplier,
                    base: p.dry_base,
                    allowed_length: p.dry_allowed_length as usize,
                    // 0 on the wire means the whole context.
                    penalty_last_n: (p.dry_penalty_last_n > 0).then_some(p.dry_penalty_last_n as usize),
                    sequence_breakers: p.dry_breakers.into_iter().map(|t| vec![t]).collect(),
                },
                logit_bias: p.logit_bias.into_iter().map(|b| (b.token, b.bias)).collect(),
            };
            params.validate().map_err(|e| WorkerError::InvalidArgument(e.to_string()))?;
            Some(params)
        }
    };
    Ok(SeqWork {
        prefix_caching: if s.no_prefix_cache { PrefixCaching::Off } else { PrefixCaching::On },
        adapter: adapter(s.adapter)?,
        seq: s.seq_id,
        start: s.start as usize,
        tokens: s.tokens,
        sampling,
        top_logprobs: top_logprobs as usize,
        beam_candidates: beam_candidates as usize,
        resume,
        sample: s.sample,
    })
}

/// Longest adapter name and directory accepted (the coordinator's own limits are lower).
const MAX_ADAPTER_NAME: usize = 256;
const MAX_ADAPTER_DIR: usize = 4096;

/// An adapter reference, checked; `None` when absent.
pub fn adapter(a: Option<pb::AdapterRef>) -> Result<Option<AdapterSpec>, WorkerError> {
    let Some(a) = a else { return Ok(None) };
    if a.name.is_empty() || a.name.len() > MAX_ADAPTER_NAME || a.dir.is_empty() || a.dir.len() > MAX_ADAPTER_DIR {
        return Err(WorkerError::InvalidArgument(format!(
            "an adapter needs a name of 1 to {MAX_ADAPTER_NAME} bytes and a directory of 1 to {MAX_ADAPTER_DIR} bytes"
        )));
    }
    Ok(Some(AdapterSpec { name: a.name, dir: a.dir.into() }))
}

pub fn sampled(s: Sampled) -> pb::SampledToken {
    let top = s.top.into_iter().map(|(token, logprob)| pb::TopToken { token, logprob }).collect();
    pb::SampledToken { seq_id: s.seq, token: s.token, logprob: s.logprob, top, rng_draws: s.rng_draws }
}

/// The inputs of an `Embed` call, as token-id lists.
pub fn embed_inputs(req: pb::EmbedRequest) -> Vec<Vec<u32>> {
    req.inputs.into_iter().map(|i| i.ids).collect()
}

pub fn embeddings(vectors: Vec<Vec<f32>>) -> pb::EmbedResponse {
    pb::EmbedResponse { embeddings: vectors.into_iter().map(|values| pb::Embedding { values }).collect() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use tessera_model::Quantization;

    fn assign(dtype: &str) -> Result<Assignment, WorkerError> {
        assignment(pb::AssignRequest { dtype: dtype.into(), tp_size: 1, ..Default::default() })
    }

    /// A quantized format keeps f32 for everything but the projections; unknown names are
    /// refused rather than loaded as f32.
    #[test]
    fn quantized_dtypes_name_a_quantization_over_f32() {
        let a = assign("q8_0").expect("q8_0");
        assert_eq!((a.dtype, a.quantization), (DType::F32, Some(Quantization::Q8_0)));
        let a = assign("q4_k").expect("q4_k");
        assert_eq!((a.dtype, a.quantization), (DType::F32, Some(Quantization::Q4K)));
        let a = assign("bf16").expect("bf16");
        assert_eq!((a.dtype, a.quantization), (DType::BF16, None));
        assert!(matches!(assign("q5_0"), Err(WorkerError::InvalidArgument(_))));
    }

    /// Seeded mutation fuzzing of every conversion a coordinator's bytes reach on a worker:
    /// protobuf decoding, then these checks, 100,000 inputs per message (see `tessera_mutate`).
    /// Each ends in a value or `InvalidArgument`, never a panic.
    #[test]
    fn hostile_worker_requests_are_refused_or_converted() {
        use prost::Message;
        use tessera_mutate::Campaign;

        fn run<M: Message + Default>(name: &'static str, valid: &[M], convert: impl Fn(M) -> bool) {
            let corpus: Vec<Vec<u8>> = valid.iter().map(|m| m.encode_to_vec()).collect();
            let accepted = Campaign::new(name).run(&corpus, |bytes| M::decode(bytes).is_ok_and(&convert));
            assert!(accepted > 100, "{name}: mutations must reach past decoding and checks ({accepted} accepted)");
        }

        let sampling = pb::Sampling {
            temperature: 0.8,
            top_k: 40,
            top_p: Some(0.9),
            seed: 7,
            repetition_penalty: 1.1,
            dry_multiplier: 0.8,
            dry_base: 1.75,
            dry_allowed_length: 2,
            dry_breakers: vec![13],
            top_logprobs: 2,
            resume: Some(pb::Resume { prompt_len: 3, rng_draws: 4 }),
            logit_bias: vec![pb::TokenBias { token: 5, bias: -1.0 }],
            ..Default::default()
        };
        let seq = |seq_id, start, tokens: Vec<u32>, sampling| pb::SeqStep {
            seq_id,
            start,
            tokens,
            sampling,
            sample: true,
            no_prefix_cache: false,
            adapter: None,
        };
        let steps = [
            pb::StepRequest {
                group_id: "g1".into(),
                step: 3,
                seqs: vec![seq(1, 0, vec![1, 2, 3], Some(sampling.clone())), seq(2, 5, vec![9], None)],
                forks: vec![pb::Fork { from: 1, to: 4 }],
            },
            pb::StepRequest {
                group_id: "g1".into(),
                step: 4,
                seqs: vec![seq(7, 0, vec![4; 40], Some(pb::Sampling::default()))],
                forks: Vec::new(),
            },
            pb::StepRequest {
                group_id: "g1".into(),
                step: 5,
                seqs: vec![pb::SeqStep {
                    adapter: Some(pb::AdapterRef { name: "sql".into(), dir: "/adapters/sql".into() }),
                    ..seq(8, 0, vec![5; 20], Some(pb::Sampling::default()))
                }],
                forks: Vec::new(),
            },
        ];
        run("step request", &steps, |req| step_work(req).is_ok());
        let loads = [pb::LoadAdapterRequest {
            group_id: "g1".into(),
            adapter: Some(pb::AdapterRef { name: "legal-v2".into(), dir: "/adapters/legal".into() }),
        }];
        run("load adapter request", &loads, |req| adapter(req.adapter).is_ok_and(|a| a.is_some()));
        let assigns = [
            pb::AssignRequest {
                group_id: "g1".into(),
                model_dir: "/models/m".into(),
                dtype: "q8_0".into(),
                tp_rank: 1,
                tp_size: 2,
                ..Default::default()
            },
            pb::AssignRequest {
                group_id: "g2".into(),
                model_dir: "/m".into(),
                dtype: "bf16".into(),
                tp_size: 1,
                batch_invariant: true,
                ..Default::default()
            },
        ];
        run("assign request", &assigns, |req| assignment(req).is_ok());
        let rings = [pb::PrepareRingRequest { group_id: "g1".into(), ring_id: "r-1".into(), member: 1, members: 3 }];
        run("prepare ring request", &rings, |req| ring::membership(req).is_ok());
        let ring_steps = [
            pb::RingStepRequest {
                group_id: "g1".into(),
                ring_id: "r-1".into(),
                seq_id: 9,
                step: Some(pb::ring_step_request::Step::Prefill(pb::RingPrefill {
                    prompt_len: 8,
                    tokens: vec![1, 2, 7, 8],
                    sampling: Some(sampling),
                    ..Default::default()
                })),
            },
            pb::RingStepRequest {
                group_id: "g1".into(),
                ring_id: "r-1".into(),
                seq_id: 9,
                step: Some(pb::ring_step_request::Step::Decode(pb::RingDecode {
                    token: 5,
                    position: 8,
                    append_member: Some(1),
                    sampling: None,
                })),
            },
        ];
        run("ring step request", &ring_steps, |req| ring::ring_step(req).is_ok());
        let peer_lists = [pb::JoinRingRequest { peers: vec!["127.0.0.1:4000".into(), "[::1]:4001".into()], ..Default::default() }];
        run("peer list", &peer_lists, |req| peers(&req.peers).is_ok());
    }
}
