//! The scheduling policy without sockets, threads or a clock: requests go in through an inbox,
//! steps come out as plans, and the test plays rank 0.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;

use super::*;
use crate::loop_guard::{LoopGuardConfig, Remedy};
use crate::testing::{answer, beam_answer, Client, Req, END};

const TOKEN: u32 = 120;

fn config(max_batch: usize, step_tokens: usize) -> LoopConfig {
    LoopConfig { max_batch, step_tokens, step_timeout: Duration::from_secs(1), static_batching: false }
}

fn scheduler(kv_tokens: u64, max_batch: usize, step_tokens: usize) -> Scheduler {
    Scheduler::new("g1".into(), config(max_batch, step_tokens), kv_tokens, Arc::new(Metrics::default()))
}

/// A queue of requests, and the plan of the next iteration taking from it.
#[derive(Default)]
struct Inbox(VecDeque<NewSequence>);

impl Inbox {
    fn push(&mut self, r: Req) -> Client {
        let (s, client) = r.build();
        self.0.push_back(s);
        client
    }

    fn plan(&mut self, s: &mut Scheduler) -> Plan {
        self.plan_at(s, Instant::now())
    }

    fn plan_at(&mut self, s: &mut Scheduler, now: Instant) -> Plan {
        s.plan(now, &mut || self.0.pop_front())
    }
}

fn step_of(plan: &Plan) -> &Step {
    plan.step.as_ref().expect("a step is planned")
}

/// Sequence ids the step carries, in order.
fn seq_ids(step: &Step) -> Vec<u64> {
    step.seqs.iter().map(|s| s.seq_id).collect()
}

/// Answers `step` with `token` everywhere and sends what ended, as the shell would.
fn run_step(s: &mut Scheduler, step: &Step, token: u32) -> Effects {
    s.on_step_result(answer(step, token, 3), Instant::now()).expect("the answer fits the step")
}

fn send(effects: Effects, s: &Scheduler) {
    for e in effects.ended {
        e.send(&s.metrics);
    }
}

fn ended_kinds(effects: &Effects) -> Vec<&'static str> {
    effects
        .ended
        .iter()
        .map(|e| match &e.end {
            End::Finished(_) => "finished",
            End::Failed(_) => "failed",
            End::Cancelled => "cancelled",
        })
        .collect()
}

// --- Admission ---

#[test]
fn an_idle_scheduler_plans_nothing() {
    let mut s = scheduler(1024, 4, 64);
    assert!(s.is_idle());
    let plan = Inbox::default().plan(&mut s);
    assert!(plan.step.is_none() && plan.effects.is_empty());
}

#[test]
fn an_offered_request_is_prefilled_whole_and_sampled_with_its_sampling() {
    let mut s = scheduler(1024, 4, 64);
    let (seq, _client) = Req::new(1, 10, 8).build();
    s.offer(seq);
    assert!(!s.is_idle());
    let plan = Inbox::default().plan(&mut s);
    let step = step_of(&plan);
    assert_eq!(step.seqs.len(), 1);
    let first = &step.seqs[0];
    assert_eq!((first.seq_id, first.start, first.tokens.len(), first.sample), (1, 0, 10, true));
    assert_eq!(first.tokens, Req::new(1, 10, 8).prompt());
    assert_eq!(first.sampling.as_ref().map(|s| (s.temperature, s.seed)), Some((0.7, 7)));
}

#[test]
fn after_its_prefill_a_sequence_decodes_one_token_per_step_without_resending_sampling() {
    let mut s = scheduler(1024, 4, 64);
    let mut inbox = Inbox::default();
    let _client = inbox.push(Req::new(1, 10, 8));
    let plan = inbox.plan(&mut s);
    run_step(&mut s, step_of(&plan), TOKEN);
    let plan = inbox.plan(&mut s);
    let step = step_of(&plan);
    assert_eq!(step.seqs.len(), 1);
    assert_eq!((step.seqs[0].start, step.seqs[0].tokens.clone(), step.seqs[0].sample), (10, vec![TOKEN], true));
    assert!(step.seqs[0].sampling.is_none());
}

#[test]
fn step_ids_count_up_from_one() {
    let mut s = scheduler(1024, 4, 64);
    let mut inbox = Inbox::default();
    let _client = inbox.push(Req::new(1, 4, 8));
    let mut ids = Vec::new();
    for _ in 0..3 {
        let plan = inbox.plan(&mut s);
        ids.push(step_of(&plan).id);
        run_step(&mut s, step_of(&plan), TOKEN);
    }
    assert_eq!(ids, [1, 2, 3]);
}

#[test]
fn no_more_than_max_batch_run_and_the_rest_stay_queued() {
    let mut s = scheduler(4096, 2, 256);
    let mut inbox = Inbox::default();
    let _clients: Vec<Client> = (1..=3).map(|i| inbox.push(Req::new(i, 4, 8))).collect();
    let plan = inbox.plan(&mut s);
    assert_eq!(seq_ids(step_of(&plan)), [1, 2]);
    assert_eq!(inbox.0.len(), 1, "the third request is left in the queue, whose bound refuses more");
}

#[test]
fn a_request_waits_while_its_prompt_blocks_do_not_fit_then_runs_when_blocks_free() {
    // 4 blocks of 16 tokens: a 40-token prompt takes 3, a 20-token one needs 2 more.
    let mut s = scheduler(64, 4, 256);
    let mut inbox = Inbox::default();
    let _a = inbox.push(Req::new(1, 40, 1));
    let _b = inbox.push(Req::new(2, 20, 1));
    let plan = inbox.plan(&mut s);
    assert_eq!(seq_ids(step_of(&plan)), [1], "only the first fits");
    let effects = run_step(&mut s, step_of(&plan), TOKEN);
    assert_eq!(ended_kinds(&effects), ["finished"], "max_new_tokens 1 ends the first");
    assert_eq!(effects.release, [1]);
    let plan = inbox.plan(&mut s);
    assert_eq!(seq_ids(step_of(&plan)), [2], "its blocks are free now");
}

#[test]
fn an_idle_group_admits_its_first_request_whatever_its_size() {
    let mut s = scheduler(32, 4, 256);
    let mut inbox = Inbox::default();
    let _a = inbox.push(Req::new(1, 100, 1));
    let plan = inbox.plan(&mut s);
    assert_eq!(seq_ids(step_of(&plan)), [1]);
}

#[test]
fn static_batching_admits_only_into_an_empty_group() {
    let mut s = Scheduler::new("g1".into(), LoopConfig { static_batching: true, ..config(4, 256) }, 4096, Arc::new(Metrics::default()));
    let mut inbox = Inbox::default();
    let _a = inbox.push(Req::new(1, 4, 2));
    let plan = inbox.plan(&mut s);
    let _b = inbox.push(Req::new(2, 4, 2));
    run_step(&mut s, step_of(&plan), TOKEN);
    let plan = inbox.plan(&mut s);
    assert_eq!(seq_ids(step_of(&plan)), [1], "the second waits for the batch to finish");
    let effects = run_step(&mut s, step_of(&plan), TOKEN);
    assert_eq!(ended_kinds(&effects), ["finished"]);
    let plan = inbox.plan(&mut s);
    assert_eq!(seq_ids(step_of(&plan)), [2]);
}

// --- Chunked prefill ---

#[test]
fn a_long_prompt_is_prefilled_in_chunks_within_the_step_budget_and_sampled_after_the_last() {
    let mut s = scheduler(4096, 4, 32);
    let mut inbox = Inbox::default();
    let _a = inbox.push(Req::new(1, 100, 4));
    let mut fed = Vec::new();
    let mut starts = Vec::new();
    loop {
        let plan = inbox.plan(&mut s);
        let step = step_of(&plan);
        let chunk = &step.seqs[0];
        assert!(chunk.tokens.len() <= 32, "a chunk of {} tokens", chunk.tokens.len());
        starts.push(chunk.start);
        fed.extend_from_slice(&chunk.tokens);
        if chunk.sample {
            break;
        }
        assert!(s.on_step_result(Vec::new(), Instant::now()).expect("nothing was due").is_empty());
    }
    assert_eq!(fed, Req::new(1, 100, 4).prompt());
    assert_eq!(starts, [0, 32, 64, 96]);
}

#[test]
fn decodes_go_first_and_prompts_share_the_rest_of_the_budget() {
    let mut s = scheduler(4096, 4, 32);
    let mut inbox = Inbox::default();
    let _a = inbox.push(Req::new(1, 4, 8));
    let plan = inbox.plan(&mut s);
    run_step(&mut s, step_of(&plan), TOKEN);
    let _b = inbox.push(Req::new(2, 100, 8));
    let plan = inbox.plan(&mut s);
    let step = step_of(&plan);
    assert_eq!(seq_ids(step), [1, 2], "the decode comes first");
    assert_eq!(step.seqs[0].tokens.len(), 1);
    assert_eq!(step.seqs[1].tokens.len(), 16, "the prompt takes what the decode left (31), to its last block boundary");
}

#[test]
fn prompt_chunks_end_on_block_boundaries_unless_they_finish_the_prompt() {
    // Three decoders leave 47 of a 50-token budget: a 100-token prompt goes 32 + 32 + 36 (the
    // last chunk finishes it), where unaligned grants would have cut it at 47 and 94.
    let mut s = scheduler(4096, 8, 50);
    let mut inbox = Inbox::default();
    let _decoders: Vec<Client> = (1..=3).map(|i| inbox.push(Req::new(i, 2, 50))).collect();
    for _ in 0..2 {
        let plan = inbox.plan(&mut s);
        run_step(&mut s, step_of(&plan), TOKEN);
    }
    let _long = inbox.push(Req::new(9, 100, 4));
    let mut chunks = Vec::new();
    let mut fed = Vec::new();
    loop {
        let plan = inbox.plan(&mut s);
        let step = step_of(&plan);
        let chunk = step.seqs.iter().find(|c| c.seq_id == 9).expect("the prompt moves every step");
        chunks.push((chunk.start, chunk.tokens.len()));
        fed.extend_from_slice(&chunk.tokens);
        let done = chunk.sample;
        run_step(&mut s, step, TOKEN);
        if done {
            break;
        }
    }
    assert_eq!(fed, Req::new(9, 100, 4).prompt());
    assert_eq!(chunks, [(0, 32), (32, 32), (64, 36)]);
}

#[test]
fn a_prompt_moves_by_a_minimum_chunk_even_when_decodes_fill_the_budget() {
    let mut s = scheduler(4096, 8, 4);
    let mut inbox = Inbox::default();
    let _decoders: Vec<Client> = (1..=6).map(|i| inbox.push(Req::new(i, 2, 50))).collect();
    for _ in 0..2 {
        let plan = inbox.plan(&mut s);
        run_step(&mut s, step_of(&plan), TOKEN);
    }
    let _long = inbox.push(Req::new(7, 40, 8));
    let plan = inbox.plan(&mut s);
    let step = step_of(&plan);
    let prefill = step.seqs.iter().find(|c| c.seq_id == 7).expect("the prompt moves");
    assert_eq!(prefill.tokens.len(), MIN_PREFILL_CHUNK);
}

#[test]
fn the_oldest_prompt_keeps_a_quarter_and_short_prompts_finish_first() {
    let mut s = scheduler(4096, 4, 64);
    let mut inbox = Inbox::default();
    let _long = inbox.push(Req::new(1, 200, 8));
    let _short = inbox.push(Req::new(2, 10, 8));
    let plan = inbox.plan(&mut s);
    let step = step_of(&plan);
    let chunk = |id| step.seqs.iter().find(|c| c.seq_id == id).expect("both prompts move");
    assert_eq!((chunk(2).tokens.len(), chunk(2).sample), (10, true), "the short prompt is prefilled whole");
    assert_eq!(chunk(1).tokens.len(), 48, "the long one has its quarter (16) and what is left (38), to a block boundary");
    assert_eq!(step.seqs.iter().map(|c| c.tokens.len()).sum::<usize>(), 58);
}

// --- Preemption ---

/// Two 15-token prompts in a budget of 2 blocks, the first generating at most `a_max_new`
/// tokens: after two tokens each would need 2 blocks.
fn crowded(a_max_new: u32) -> (Scheduler, Inbox, Client, Client) {
    let mut s = scheduler(32, 4, 256);
    let mut inbox = Inbox::default();
    let a = inbox.push(Req::new(1, 15, a_max_new));
    let b = inbox.push(Req::new(2, 15, 20));
    let plan = inbox.plan(&mut s);
    assert_eq!(seq_ids(step_of(&plan)), [1, 2]);
    run_step(&mut s, step_of(&plan), TOKEN);
    let plan = inbox.plan(&mut s);
    assert_eq!(seq_ids(step_of(&plan)), [1, 2], "16 tokens each: one block each");
    run_step(&mut s, step_of(&plan), TOKEN + 1);
    (s, inbox, a, b)
}

#[test]
fn when_decodes_outgrow_the_blocks_the_newest_sequence_is_preempted_and_released() {
    let (mut s, mut inbox, _a, _b) = crowded(3);
    let plan = inbox.plan(&mut s);
    assert_eq!(plan.effects.release, [2], "the newest frees its blocks on every rank");
    assert!(plan.effects.ended.is_empty(), "a preempted request has not ended");
    assert_eq!(seq_ids(step_of(&plan)), [1]);
    assert_eq!(s.metrics.snapshot().preemptions, 1);
}

#[test]
fn a_preempted_sequence_is_recomputed_from_prompt_and_outputs_with_its_sampler_resumed() {
    let (mut s, mut inbox, mut a, mut b) = crowded(3);
    let plan = inbox.plan(&mut s);
    let effects = run_step(&mut s, step_of(&plan), TOKEN + 2);
    assert_eq!(ended_kinds(&effects), ["finished"], "the first reached max_new_tokens");
    send(effects, &s);
    assert_eq!(a.tokens_and_end().0, [TOKEN, TOKEN + 1, TOKEN + 2]);
    let plan = inbox.plan(&mut s);
    let step = step_of(&plan);
    assert_eq!(seq_ids(step), [2]);
    let recompute = &step.seqs[0];
    let mut expected = Req::new(2, 15, 20).prompt();
    expected.extend([TOKEN, TOKEN + 1]);
    assert_eq!((recompute.start, &recompute.tokens, recompute.sample), (0, &expected, true));
    let resume = recompute.sampling.as_ref().and_then(|s| s.resume);
    assert_eq!(resume, Some(wpb::Resume { prompt_len: 15, rng_draws: 3 }));
    assert_eq!(b.tokens_and_end().0, [TOKEN, TOKEN + 1], "the client saw every token once");
}

#[test]
fn a_lone_sequence_is_never_preempted_even_past_the_budget() {
    let mut s = scheduler(16, 4, 256);
    let mut inbox = Inbox::default();
    let _a = inbox.push(Req::new(1, 15, 20));
    for _ in 0..4 {
        let plan = inbox.plan(&mut s);
        assert!(plan.effects.release.is_empty());
        run_step(&mut s, step_of(&plan), TOKEN);
    }
    assert_eq!(s.metrics.snapshot().preemptions, 0);
}

#[test]
fn beam_searches_are_never_preempted_the_sampled_sequence_beside_them_is() {
    // The beam search (2 lanes, 2 blocks each) is admitted first; the sampled one squeezes in.
    let mut s = scheduler(16 * 3, 4, 256);
    let mut inbox = Inbox::default();
    let _beam = inbox.push(Req::new(1, 10, 6).beams(2));
    let _sampled = inbox.push(Req::new(3, 15, 20));
    let plan = inbox.plan(&mut s);
    assert_eq!(seq_ids(step_of(&plan)), [1, 3]);
    let answers: Vec<wpb::SampledToken> = beam_answer(step_of(&plan), &[(TOKEN, -0.1), (TOKEN + 1, -0.2), (TOKEN + 2, -0.3)]);
    s.on_step_result(answers, Instant::now()).expect("answers fit");
    let plan = inbox.plan(&mut s);
    assert_eq!(step_of(&plan).seqs.iter().filter(|c| c.seq_id == 3).count(), 1, "16 tokens: still one block");
    let answers = beam_answer(step_of(&plan), &[(TOKEN, -0.1), (TOKEN + 1, -0.2), (TOKEN + 2, -0.3)]);
    s.on_step_result(answers, Instant::now()).expect("answers fit");
    let plan = inbox.plan(&mut s);
    assert_eq!(plan.effects.release, [3], "the sampled sequence gives way");
    assert!(seq_ids(step_of(&plan)).iter().all(|&id| id == 1 || id == 2), "the beams go on");
}

// --- Cancellation and deadlines ---

#[test]
fn a_cancelled_running_sequence_is_released_and_counted() {
    let mut s = scheduler(1024, 4, 64);
    let mut inbox = Inbox::default();
    let a = inbox.push(Req::new(1, 4, 8));
    let plan = inbox.plan(&mut s);
    run_step(&mut s, step_of(&plan), TOKEN);
    a.hang_up();
    let plan = inbox.plan(&mut s);
    assert_eq!(plan.effects.release, [1]);
    assert_eq!(ended_kinds(&plan.effects), ["cancelled"]);
    assert!(plan.step.is_none());
    assert_eq!(s.metrics.snapshot().finished.get("CANCELLED"), Some(&1));
    assert!(s.is_idle());
}

#[test]
fn a_request_cancelled_before_its_first_step_frees_nothing_on_the_workers() {
    let mut s = scheduler(1024, 4, 64);
    let mut inbox = Inbox::default();
    inbox.push(Req::new(1, 4, 8)).hang_up();
    let plan = inbox.plan(&mut s);
    assert!(plan.effects.release.is_empty());
    assert_eq!(ended_kinds(&plan.effects), ["cancelled"]);
}

#[test]
fn a_cancelled_preempted_sequence_leaves_without_a_release() {
    let (mut s, mut inbox, _a, b) = crowded(20);
    let plan = inbox.plan(&mut s);
    assert_eq!(plan.effects.release, [2]);
    run_step(&mut s, step_of(&plan), TOKEN);
    b.hang_up();
    let plan = inbox.plan(&mut s);
    assert!(plan.effects.release.is_empty(), "it holds nothing after its preemption");
    assert_eq!(ended_kinds(&plan.effects), ["cancelled"]);
}

#[test]
fn a_running_sequence_past_its_deadline_is_released_then_ends_deadline_exceeded() {
    let mut s = scheduler(1024, 4, 64);
    let mut inbox = Inbox::default();
    let start = Instant::now();
    let mut a = inbox.push(Req::new(1, 4, 8).deadline(start + Duration::from_secs(10)));
    let plan = inbox.plan_at(&mut s, start);
    run_step(&mut s, step_of(&plan), TOKEN);
    let plan = inbox.plan_at(&mut s, start + Duration::from_secs(10));
    assert_eq!(plan.effects.release, [1]);
    assert_eq!(ended_kinds(&plan.effects), ["failed"]);
    send(plan.effects, &s);
    let (tokens, end) = a.tokens_and_end();
    assert_eq!(tokens, [TOKEN]);
    let status = end.and_then(Result::err).expect("an error ends the stream");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
    assert!(status.message().contains("after 1 generated tokens"), "{}", status.message());
    assert_eq!(s.metrics.snapshot().deadlines_exceeded, 1);
}

#[test]
fn a_deadline_not_yet_passed_changes_nothing() {
    let mut s = scheduler(1024, 4, 64);
    let mut inbox = Inbox::default();
    let start = Instant::now();
    let _a = inbox.push(Req::new(1, 4, 8).deadline(start + Duration::from_secs(10)));
    let plan = inbox.plan_at(&mut s, start + Duration::from_secs(9));
    assert!(plan.effects.is_empty());
    assert_eq!(seq_ids(step_of(&plan)), [1]);
}

#[test]
fn a_waiting_request_past_its_deadline_ends_with_zero_tokens() {
    let mut s = scheduler(1024, 4, 64);
    let start = Instant::now();
    let (seq, mut client) = Req::new(1, 4, 8).deadline(start).build();
    s.offer(seq);
    let plan = Inbox::default().plan_at(&mut s, start);
    assert!(plan.step.is_none());
    send(plan.effects, &s);
    let status = client.tokens_and_end().1.and_then(Result::err).expect("ended");
    assert!(status.message().contains("after 0 generated tokens"), "{}", status.message());
}

#[test]
fn a_preempted_sequence_past_its_deadline_ends_without_a_release() {
    let (mut s, mut inbox, _a, mut b) = crowded(20);
    let plan = inbox.plan(&mut s);
    run_step(&mut s, step_of(&plan), TOKEN);
    let later = Instant::now() + Duration::from_secs(3600);
    // Sequence 2 is preempted while the first runs on; its deadline passes now.
    let Some(r) = s.preempted.front_mut() else { panic!("sequence 2 is preempted") };
    r.deadline = Some(later);
    let plan = inbox.plan_at(&mut s, later);
    assert!(plan.effects.release.is_empty());
    send(plan.effects, &s);
    let status = b.tokens_and_end().1.and_then(Result::err).expect("ended");
    assert!(status.message().contains("after 2 generated tokens"), "{}", status.message());
}

// --- Output ---

#[test]
fn tokens_are_streamed_as_they_arrive_and_the_end_comes_after_the_release() {
    let mut s = scheduler(1024, 4, 64);
    let mut inbox = Inbox::default();
    let mut a = inbox.push(Req::new(1, 4, 8));
    let plan = inbox.plan(&mut s);
    run_step(&mut s, step_of(&plan), TOKEN);
    let (tokens, end) = a.tokens_and_end();
    assert_eq!((tokens, end.is_none()), (vec![TOKEN], true));
    let plan = inbox.plan(&mut s);
    let effects = run_step(&mut s, step_of(&plan), END);
    assert_eq!(effects.release, [1]);
    let (tokens, end) = a.tokens_and_end();
    assert!(tokens.is_empty() && end.is_none(), "nothing is sent before the shell releases");
    send(effects, &s);
    let finished = a.tokens_and_end().1.and_then(Result::ok).expect("finished");
    assert_eq!(finished.reason, pb::FinishReason::Eos as i32);
    assert_eq!(s.metrics.snapshot().finished.get("EOS"), Some(&1));
    assert!(s.is_idle());
}

#[test]
fn max_new_tokens_ends_with_length() {
    let mut s = scheduler(1024, 4, 64);
    let mut inbox = Inbox::default();
    let mut a = inbox.push(Req::new(1, 4, 2));
    let plan = inbox.plan(&mut s);
    assert!(run_step(&mut s, step_of(&plan), TOKEN).is_empty());
    let plan = inbox.plan(&mut s);
    let effects = run_step(&mut s, step_of(&plan), TOKEN);
    send(effects, &s);
    let (tokens, end) = a.tokens_and_end();
    assert_eq!(tokens, [TOKEN, TOKEN]);
    assert_eq!(end.and_then(Result::ok).map(|f| f.reason), Some(pb::FinishReason::Length as i32));
}

#[test]
fn a_loop_guard_remedy_changes_the_sampling_sent_with_the_next_step() {
    let mut s = scheduler(1024, 4, 64);
    let mut inbox = Inbox::default();
    let guard = LoopGuardConfig { max_period: 1, min_repeats: 3, sentences: false, remedy: Some(Remedy { temperature: 1.5, tokens: 2 }) };
    let _a = inbox.push(Req::new(1, 4, 50).loop_guard(guard));
    let mut sent = Vec::new();
    for _ in 0..6 {
        let plan = inbox.plan(&mut s);
        sent.push(step_of(&plan).seqs[0].sampling.as_ref().map(|s| s.temperature));
        run_step(&mut s, step_of(&plan), TOKEN);
    }
    // The prompt's step carries the request's sampling; the third repeat raises the
    // temperature for two tokens, then the request's own comes back.
    assert_eq!(sent, [Some(0.7), None, None, Some(1.5), None, Some(0.7)]);
}

#[test]
fn an_answer_with_the_wrong_number_of_tokens_fails_the_group() {
    let mut s = scheduler(1024, 4, 64);
    let mut inbox = Inbox::default();
    let _a = inbox.push(Req::new(1, 4, 8));
    let _plan = inbox.plan(&mut s);
    let err = s.on_step_result(Vec::new(), Instant::now()).err().expect("a token was due");
    assert!(err.contains("0 tokens where 1 were due"), "{err}");
}

#[test]
fn an_answer_for_a_sequence_that_expected_none_fails_the_group() {
    let mut s = scheduler(1024, 4, 64);
    let mut inbox = Inbox::default();
    let _a = inbox.push(Req::new(1, 4, 8));
    let plan = inbox.plan(&mut s);
    let mut wrong = answer(step_of(&plan), TOKEN, 0);
    wrong[0].seq_id = 9;
    let err = s.on_step_result(wrong, Instant::now()).err().expect("sequence 9 is not running");
    assert!(err.contains("sequence 9"), "{err}");
}

// --- Beam search ---

#[test]
fn a_beam_search_prefills_lane_zero_asking_for_candidates() {
    let mut s = scheduler(4096, 4, 64);
    let mut inbox = Inbox::default();
    let _a = inbox.push(Req::new(1, 10, 6).beams(3));
    let plan = inbox.plan(&mut s);
    let step = step_of(&plan);
    assert_eq!(seq_ids(step), [1]);
    let candidates = step.seqs[0].sampling.as_ref().map(|s| s.beam_candidates);
    assert!(candidates.is_some_and(|n| n >= 3), "{candidates:?}");
}

#[test]
fn a_beam_search_forks_lane_zero_and_feeds_every_live_lane() {
    let mut s = scheduler(4096, 4, 64);
    let mut inbox = Inbox::default();
    let _a = inbox.push(Req::new(1, 10, 6).beams(2));
    let plan = inbox.plan(&mut s);
    s.on_step_result(beam_answer(step_of(&plan), &[(TOKEN, -0.1), (TOKEN + 1, -0.2), (TOKEN + 2, -0.3)]), Instant::now())
        .expect("answers fit");
    let plan = inbox.plan(&mut s);
    let step = step_of(&plan);
    assert_eq!(step.forks, [wpb::Fork { from: 1, to: 2 }], "lane 1 starts as a copy of lane 0");
    assert_eq!(seq_ids(step), [1, 2]);
    assert!(step.seqs.iter().all(|c| c.start == 10 && c.tokens.len() == 1 && c.sample));
    let mut fed: Vec<u32> = step.seqs.iter().map(|c| c.tokens[0]).collect();
    fed.sort_unstable();
    assert_eq!(fed, [TOKEN, TOKEN + 1], "the two best continuations");
}

#[test]
fn a_finished_beam_search_releases_every_lane_it_used_and_streams_the_best() {
    let mut s = scheduler(4096, 4, 64);
    let mut inbox = Inbox::default();
    let mut a = inbox.push(Req::new(1, 10, 2).beams(2));
    let top = [(TOKEN, -0.1), (TOKEN + 1, -0.2), (TOKEN + 2, -0.3)];
    let mut effects = Effects::default();
    for _ in 0..3 {
        let plan = inbox.plan(&mut s);
        let Some(step) = &plan.step else { break };
        effects = s.on_step_result(beam_answer(step, &top), Instant::now()).expect("answers fit");
        if !effects.ended.is_empty() {
            break;
        }
    }
    assert_eq!(ended_kinds(&effects), ["finished"]);
    let mut released = effects.release.clone();
    released.sort_unstable();
    assert_eq!(released, [1, 2]);
    send(effects, &s);
    let (tokens, end) = a.tokens_and_end();
    assert_eq!(tokens, [TOKEN, TOKEN], "the best hypothesis, max_new_tokens long");
    assert!(end.is_some_and(|e| e.is_ok()));
}

#[test]
fn a_beam_search_holds_its_worst_case_from_admission() {
    // 2 lanes of 16 + 4 tokens: 2 blocks each, 4 in all, the whole budget.
    let mut s = scheduler(64, 4, 256);
    let mut inbox = Inbox::default();
    let _beam = inbox.push(Req::new(1, 16, 4).beams(2));
    let _other = inbox.push(Req::new(3, 4, 4));
    let plan = inbox.plan(&mut s);
    assert_eq!(seq_ids(step_of(&plan)), [1], "nothing else fits beside the beams' reservation");
}

// --- A group that stops: its requests move on ---

#[test]
fn a_stopping_group_hands_back_every_request_it_holds() {
    let (mut s, mut inbox, _a, _b) = crowded(20);
    let plan = inbox.plan(&mut s);
    run_step(&mut s, step_of(&plan), TOKEN);
    let (waiting, _c) = Req::new(5, 4, 4).build();
    s.waiting = Some(waiting);
    let mut held: Vec<u64> = s.evacuate().iter().map(|n| n.seq).collect();
    held.sort_unstable();
    assert_eq!(held, [1, 2, 5], "one running, one preempted, one waiting");
    assert!(s.is_idle());
}

/// Runs `req` on a fresh scheduler for `steps` tokens of `TOKEN + i`, then evacuates it.
fn evacuated_after(req: Req, steps: usize) -> (NewSequence, Client) {
    let mut s = scheduler(4096, 4, 256);
    let beams = req.beams.is_some();
    let (seq, client) = req.build();
    s.offer(seq);
    for i in 0..steps {
        let plan = Inbox::default().plan(&mut s);
        let step = step_of(&plan);
        let answers = if beams {
            beam_answer(step, &[(TOKEN, -0.1), (TOKEN + 1, -0.2), (TOKEN + 2, -0.3)])
        } else {
            answer(step, TOKEN + i as u32, 10 + i as u64)
        };
        s.on_step_result(answers, Instant::now()).expect("answers fit");
    }
    let mut held = s.evacuate();
    assert_eq!(held.len(), 1);
    (held.remove(0), client)
}

#[test]
fn a_moved_sequence_is_prefilled_again_with_its_outputs_and_its_sampler_resumed() {
    let (moved, mut client) = evacuated_after(Req::new(1, 6, 20), 3);
    assert_eq!(client.tokens_and_end().0, [TOKEN, TOKEN + 1, TOKEN + 2]);
    let mut other = scheduler(4096, 4, 256);
    other.offer(moved);
    let plan = Inbox::default().plan(&mut other);
    let step = &step_of(&plan).seqs[0];
    let mut expected = Req::new(1, 6, 20).prompt();
    expected.extend([TOKEN, TOKEN + 1, TOKEN + 2]);
    assert_eq!((step.seq_id, step.start, &step.tokens, step.sample), (1, 0, &expected, true));
    let sampling = step.sampling.as_ref().expect("the sampling goes with the first step");
    assert_eq!(sampling.resume, Some(wpb::Resume { prompt_len: 6, rng_draws: 12 }));
    assert_eq!((sampling.temperature, sampling.seed), (0.7, 7));
    // It goes on where it stopped, streaming only new tokens, and finishes as one stream.
    other.on_step_result(answer(step_of(&plan), TOKEN + 3, 13), Instant::now()).expect("answers fit");
    assert_eq!(client.tokens_and_end().0, [TOKEN + 3]);
}

#[test]
fn a_sequence_lost_with_a_step_in_flight_resamples_that_token_from_the_same_draw() {
    let mut s = scheduler(4096, 4, 256);
    let (seq, _client) = Req::new(1, 6, 20).build();
    s.offer(seq);
    let plan = Inbox::default().plan(&mut s);
    s.on_step_result(answer(step_of(&plan), TOKEN, 5), Instant::now()).expect("answers fit");
    // A second step is sent and never answered: the group is lost.
    let _in_flight = Inbox::default().plan(&mut s);
    let moved = s.evacuate().remove(0);
    let resume = moved.resume.as_ref().expect("a sampled sequence carries its progress");
    assert_eq!((resume.outputs.clone(), resume.rng_draws), (vec![TOKEN], 5), "the unanswered token is not counted");
}

#[test]
fn a_moved_beam_search_starts_again_having_streamed_nothing() {
    let (moved, mut client) = evacuated_after(Req::new(1, 6, 20).beams(2), 2);
    assert!(client.tokens_and_end().0.is_empty());
    assert!(moved.resume.is_none() && moved.beam.is_some());
    assert_eq!(moved.prompt, Req::new(1, 6, 20).prompt());
    let mut other = scheduler(4096, 4, 256);
    other.offer(moved);
    let plan = Inbox::default().plan(&mut other);
    let step = step_of(&plan);
    assert_eq!((seq_ids(step), step.seqs[0].start, step.seqs[0].tokens.len()), (vec![1], 0, 6), "lane 0 prefills the prompt");
}

#[test]
fn a_moved_request_reports_its_moves_when_it_finishes() {
    let (mut moved, mut client) = evacuated_after(Req::new(1, 6, 4), 2);
    moved.output.migrated();
    let mut other = scheduler(4096, 4, 256);
    other.offer(moved);
    let mut effects = Effects::default();
    for _ in 0..2 {
        let plan = Inbox::default().plan(&mut other);
        effects = run_step(&mut other, step_of(&plan), TOKEN);
    }
    send(effects, &other);
    let finished = client.tokens_and_end().1.and_then(Result::ok).expect("finished");
    assert_eq!(finished.migrations, 1);
    assert_eq!(finished.usage.map(|u| u.completion_tokens), Some(4), "every token counted once");
}
