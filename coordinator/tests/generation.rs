//! `Generation` against the fixtures' byte-level BPE: every finishing rule, the streamed text,
//! and the token positions a client sees, without a model or a cluster.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_coordinator::generation::Generation;
use tessera_coordinator::request::Stopping;
use tessera_model::fixture::scripted::{fixture_tokenizer, CHINESE_IDS, CHINESE_TEXT, EOS};
use tessera_proto::v1 as pb;
use tokenizers::Tokenizer;

const PROMPT_TOKENS: u32 = 17;

fn tokenizer() -> Arc<Tokenizer> {
    Arc::new(fixture_tokenizer().unwrap())
}

fn encode(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, false).unwrap().get_ids().to_vec()
}

fn stopping(max_new_tokens: u32) -> Stopping {
    Stopping {
        max_new_tokens,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        eos: vec![EOS],
        loop_guard: None,
        remove_repeated_sentences: false,
    }
}

/// Distinct and exactly representable, so a test can tell which token a logprob came from.
fn logprob(position: usize) -> f32 {
    -(position as f32 + 1.0) / 8.0
}

/// Everything one sequence sent, as a client would collect it.
#[derive(Debug)]
struct Stream {
    chunks: Vec<pb::TokenChunk>,
    finished: Option<pb::Finished>,
    /// How many tokens were accepted, the finishing one included.
    accepted: usize,
    /// Text streamed after each accepted token.
    text_after: Vec<String>,
}

impl Stream {
    fn text(&self) -> String {
        self.chunks.iter().map(|c| c.text.as_str()).collect()
    }

    fn token_ids(&self) -> Vec<u32> {
        self.chunks.iter().flat_map(|c| c.tokens.iter().map(|t| t.id)).collect()
    }

    fn finished(&self) -> &pb::Finished {
        self.finished.as_ref().expect("the sequence did not finish")
    }
}

/// Feeds `ids` until the sequence finishes; a finished sequence gets no more tokens, as in the
/// serving loop.
fn run(tok: &Arc<Tokenizer>, stopping: Stopping, ids: &[u32]) -> Stream {
    let mut generation = Generation::new(tok.clone(), stopping, PROMPT_TOKENS, Instant::now());
    let mut stream = Stream { chunks: Vec::new(), finished: None, accepted: 0, text_after: Vec::new() };
    for (i, &id) in ids.iter().enumerate() {
        let emitted = generation.accept(id, logprob(i)).unwrap();
        stream.accepted += 1;
        assert_eq!(generation.generated() as usize, stream.accepted);
        stream.chunks.extend(emitted.chunk);
        stream.text_after.push(stream.text());
        if emitted.finished.is_some() {
            stream.finished = emitted.finished;
            break;
        }
    }
    stream
}

#[test]
fn max_new_tokens_finishes_with_length_after_exactly_n_tokens() {
    let tok = tokenizer();
    // Ends inside 风, so the last token's text is held back until the final flush.
    let all = encode(&tok, "the cat sat on the mat 风");
    let ids = &all[..all.len() - 1];
    let n = ids.len();
    assert!(n >= 4, "too few tokens to be a meaningful stream: {ids:?}");
    let expected = tok.decode(ids, true).unwrap();
    assert!(expected.ends_with('\u{FFFD}'), "the cut must leave an incomplete character: {expected:?}");

    // More ids than allowed: the rest must never be asked for.
    let s = run(&tok, stopping(n as u32), &all);
    assert_eq!(s.accepted, n, "finished after {} tokens, not {n}", s.accepted);
    let f = s.finished();
    assert_eq!(f.reason(), pb::FinishReason::Length);
    assert_eq!(f.matched_stop, "");
    let usage = f.usage.unwrap();
    assert_eq!(usage.completion_tokens, n as u32);
    assert_eq!(usage.prompt_tokens, PROMPT_TOKENS);
    // Half a character is never sent: the cut-off bytes are withheld, their ids reported.
    assert_eq!(s.text(), expected.trim_end_matches('\u{FFFD}'));
    assert!(!s.text().contains('\u{FFFD}'), "{:?}", s.text());
    assert_eq!(s.token_ids(), ids);
    // One chunk per token; the flush rides on the last one.
    assert_eq!(s.chunks.len(), n);
    for (i, c) in s.chunks.iter().enumerate() {
        assert_eq!(c.index, i as u64, "chunk {i}");
        assert_eq!(c.tokens, vec![pb::Token { id: ids[i], logprob: Some(logprob(i)), top: Vec::new() }], "chunk {i}");
    }
    assert!(!s.text_after[n - 2].contains('\u{FFFD}'), "an incomplete character was streamed before the end");
}

#[test]
fn chinese_streams_whole_characters_as_they_complete() {
    let tok = tokenizer();
    let s = run(&tok, stopping(CHINESE_IDS.len() as u32 + 1), &CHINESE_IDS);
    assert!(s.finished.is_none(), "finished early: {:?}", s.finished);
    for c in &s.chunks {
        assert!(!c.text.contains('\u{FFFD}'), "chunk {} holds a replacement character: {:?}", c.index, c.text);
    }
    assert_eq!(s.text(), CHINESE_TEXT);
    let pieces: Vec<&str> = s.chunks.iter().map(|c| c.text.as_str()).filter(|t| !t.is_empty()).collect();
    assert_eq!(pieces, ["风", "和", "日", "丽"]);
    // Each character is released by the token that completes it (ids 3, 6, 9, 11).
    let released_at: Vec<u64> = s.chunks.iter().filter(|c| !c.text.is_empty()).map(|c| c.index).collect();
    assert_eq!(released_at, [2, 5, 8, 10]);
}

#[test]
fn eos_finishes_unstreamed_and_flushes_held_back_text() {
    let tok = tokenizer();
    let text_ids = encode(&tok, "hello world");
    let mut ids = text_ids.clone();
    ids.push(EOS);
    // "world" may still begin "world!", so it is held back until EOS ends the sequence.
    let s = run(&tok, Stopping { stop: vec!["world!".into()], ..stopping(100) }, &ids);
    assert_eq!(s.accepted, ids.len());
    let f = s.finished();
    assert_eq!(f.reason(), pb::FinishReason::Eos);
    assert_eq!(f.matched_stop, "");
    assert_eq!(f.usage.unwrap().completion_tokens, ids.len() as u32);
    assert_eq!(s.text_after[text_ids.len() - 1], "hello ");
    let last = s.chunks.last().unwrap();
    assert_eq!(last.text, "world");
    assert!(last.tokens.is_empty(), "the flush carries no tokens: {:?}", last.tokens);
    assert_eq!(last.index, text_ids.len() as u64, "the flush sits after every streamed token");
    assert_eq!(s.token_ids(), text_ids, "EOS must not be streamed");
    assert_eq!(s.text(), "hello world");

    // An incomplete character at the end is withheld: no U+FFFD, the ids still reported.
    let partial = [CHINESE_IDS[0], CHINESE_IDS[1], EOS];
    assert!(tok.decode(&partial[..2], true).unwrap().ends_with('\u{FFFD}'));
    let s = run(&tok, stopping(100), &partial);
    assert_eq!(s.finished().reason(), pb::FinishReason::Eos);
    assert_eq!(s.text(), "");
    assert_eq!(s.token_ids(), &partial[..2]);
}

#[test]
fn ignored_eos_is_an_ordinary_token() {
    let tok = tokenizer();
    let mut ids = encode(&tok, "one");
    ids.push(EOS);
    ids.extend(encode(&tok, " two"));
    let n = ids.len();
    let s = run(&tok, Stopping { eos: Vec::new(), ..stopping(n as u32) }, &ids);
    assert_eq!(s.accepted, n);
    assert_eq!(s.finished().reason(), pb::FinishReason::Length);
    assert_eq!(s.token_ids(), ids, "EOS must be streamed like any token");
    // Special tokens are not completion text.
    assert_eq!(s.text(), "one two");
    assert_eq!(s.text(), tok.decode(&ids, true).unwrap());
}

#[test]
fn stop_token_finishes_with_its_text_unstreamed() {
    let tok = tokenizer();
    let text_ids = encode(&tok, "stop here.");
    let dot = *encode(&tok, ".").last().unwrap();
    assert_eq!(*text_ids.last().unwrap(), dot, "'.' must be its own token for this test");
    // Tokens after the stop token must never be asked for.
    let mut ids = text_ids.clone();
    ids.extend(encode(&tok, " more"));
    let s = run(&tok, Stopping { stop_token_ids: vec![dot], ..stopping(100) }, &ids);
    assert_eq!(s.accepted, text_ids.len());
    let f = s.finished();
    assert_eq!(f.reason(), pb::FinishReason::Stop);
    assert_eq!(f.matched_stop, ".");
    assert_eq!(f.usage.unwrap().completion_tokens, text_ids.len() as u32);
    assert_eq!(s.token_ids(), &text_ids[..text_ids.len() - 1]);
    assert_eq!(s.text(), "stop here");

    // A stop token that is also EOS reports STOP with the token's literal text.
    let s = run(&tok, Stopping { stop_token_ids: vec![EOS], ..stopping(100) }, &[text_ids[0], EOS]);
    assert_eq!(s.finished().reason(), pb::FinishReason::Stop);
    assert_eq!(s.finished().matched_stop, "<|im_end|>");
    assert_eq!(s.token_ids(), [text_ids[0]]);
}

#[test]
fn stop_string_ends_before_the_match() {
    let tok = tokenizer();
    let ids = encode(&tok, "hello world, and then more");
    let upto = (1..=ids.len()).find(|&k| tok.decode(&ids[..k], true).unwrap().contains("world")).unwrap();
    assert!(upto < ids.len(), "text must continue after the stop string");
    let s = run(&tok, Stopping { stop: vec!["world".into()], ..stopping(100) }, &ids);
    assert_eq!(s.accepted, upto, "must finish on the token that completes the stop string");
    let f = s.finished();
    assert_eq!(f.reason(), pb::FinishReason::Stop);
    assert_eq!(f.matched_stop, "world");
    assert_eq!(s.text(), "hello ");
    assert_eq!(s.token_ids(), &ids[..upto]);
}

#[test]
fn stop_string_split_over_many_tokens_is_found() {
    let tok = tokenizer();
    // 和日 is six byte-level tokens, and neither character is final until its third.
    let s = run(&tok, Stopping { stop: vec!["和日".into()], ..stopping(100) }, &CHINESE_IDS);
    assert_eq!(s.accepted, 9);
    assert_eq!(s.finished().reason(), pb::FinishReason::Stop);
    assert_eq!(s.finished().matched_stop, "和日");
    assert_eq!(s.text(), "风");

    let ids = encode(&tok, "abc ENDING tail");
    let upto = (1..=ids.len()).find(|&k| tok.decode(&ids[..k], true).unwrap().contains("ENDING")).unwrap();
    let first = (1..=ids.len()).find(|&k| tok.decode(&ids[..k], true).unwrap().contains(" E")).unwrap();
    assert!(upto - first >= 2, "ENDING must span several tokens: {ids:?}");
    let s = run(&tok, Stopping { stop: vec!["ENDING".into()], ..stopping(100) }, &ids);
    assert_eq!(s.accepted, upto);
    assert_eq!(s.finished().matched_stop, "ENDING");
    assert_eq!(s.text(), "abc ");
}

#[test]
fn text_that_only_looks_like_a_stop_string_is_released() {
    let tok = tokenizer();
    let full = "hello worlds apart";
    let ids = encode(&tok, full);
    let at = (1..=ids.len()).find(|&k| tok.decode(&ids[..k], true).unwrap().ends_with("world")).unwrap();
    let s = run(&tok, Stopping { stop: vec!["world!".into()], ..stopping(ids.len() as u32) }, &ids);
    assert_eq!(s.text_after[at - 1], "hello ", "a possible stop string must be held back");
    let released = (at..ids.len()).find(|&k| s.text_after[k].contains("world")).unwrap();
    assert!(released < ids.len() - 1, "released only by the final flush, not once it could no longer match");
    assert_eq!(s.finished().reason(), pb::FinishReason::Length);
    assert_eq!(s.finished().matched_stop, "");
    assert_eq!(s.text(), full);
}

#[test]
fn stop_strings_at_the_end_of_a_sequence() {
    let tok = tokenizer();
    // The flush withholds a character cut off at the end, so a stop string cannot be completed
    // by half a character: "风" then the first bytes of 和 end by length, as "风".
    let ids = &CHINESE_IDS[..4];
    assert_eq!(tok.decode(ids, true).unwrap(), "风\u{FFFD}");
    let s = run(&tok, Stopping { stop: vec!["风\u{FFFD}".into()], ..stopping(4) }, ids);
    assert_eq!(s.accepted, 4);
    let f = s.finished();
    assert_eq!(f.reason(), pb::FinishReason::Length);
    assert_eq!(f.matched_stop, "");
    assert_eq!(s.text(), "风");
    assert_eq!(s.token_ids(), ids);

    // A stop string completed by the last allowed token is a stop too, not a length finish.
    let s = run(&tok, Stopping { stop: vec!["和".into()], ..stopping(6) }, &CHINESE_IDS);
    assert_eq!(s.accepted, 6);
    assert_eq!(s.finished().reason(), pb::FinishReason::Stop);
    assert_eq!(s.text(), "风");
}

#[test]
fn timing_is_measured_from_arrival() {
    let tok = tokenizer();
    // Backdating the arrival stands in for queueing time, so the bounds are not vacuous.
    let queued = Duration::from_millis(50);
    let arrived = Instant::now().checked_sub(queued).unwrap();
    let mut generation = Generation::new(tok.clone(), stopping(2), PROMPT_TOKENS, arrived);
    assert!(generation.accept(CHINESE_IDS[0], 0.0).unwrap().finished.is_none());
    let f = generation.accept(CHINESE_IDS[1], 0.0).unwrap().finished.unwrap();
    let timing = f.timing.unwrap();
    let floor = queued.as_secs_f64() * 1e3;
    assert!(timing.time_to_first_token_ms >= floor, "{timing:?}");
    assert!(timing.time_to_first_token_ms <= timing.total_ms, "{timing:?}");

    // A sequence whose first token ends it still has a first token.
    let mut generation = Generation::new(tok, stopping(10), PROMPT_TOKENS, Instant::now());
    let timing = generation.accept(EOS, 0.0).unwrap().finished.unwrap().timing.unwrap();
    assert!(timing.time_to_first_token_ms >= 0.0 && timing.time_to_first_token_ms <= timing.total_ms, "{timing:?}");
}

mod loop_guard {
    use super::*;
    use tessera_coordinator::generation::Resample;
    use tessera_coordinator::loop_guard::{LoopGuardConfig, Remedy};

    fn guarded(remedy: Option<Remedy>) -> Stopping {
        let config = LoopGuardConfig { max_period: 8, min_repeats: 3, sentences: false, remedy };
        Stopping { loop_guard: Some(config), ..stopping(1000) }
    }

    /// Accepts `ids` one by one, returning each token's resample event and the finish, if any.
    fn feed(generation: &mut Generation, ids: &[u32]) -> (Vec<Option<Resample>>, Option<pb::Finished>) {
        let mut events = Vec::new();
        for &id in ids {
            let emitted = generation.accept(id, -1.0).unwrap();
            events.push(emitted.resample);
            if emitted.finished.is_some() {
                return (events, emitted.finished);
            }
        }
        (events, None)
    }

    #[test]
    fn stop_ends_at_the_third_repeat_with_a_report() {
        let tok = tokenizer();
        let unit = encode(&tok, "ab");
        let ids: Vec<u32> = unit.iter().copied().cycle().take(unit.len() * 5).collect();
        let s = run(&tok, guarded(None), &ids);
        assert_eq!(s.accepted, unit.len() * 3);
        let f = s.finished();
        assert_eq!(f.reason, pb::FinishReason::Repetition as i32);
        let report = f.r#loop.as_ref().unwrap();
        assert_eq!((report.period as usize, report.repeats, report.remedies), (unit.len(), 3, 0));
        assert_eq!(report.action, pb::LoopAction::Stop as i32);
    }

    #[test]
    fn a_remedy_raises_the_temperature_then_restores_it_and_is_reported() {
        let tok = tokenizer();
        let remedy = Remedy { temperature: 1.5, tokens: 4 };
        let mut g = Generation::new(tok.clone(), guarded(Some(remedy)), PROMPT_TOKENS, Instant::now());
        // A 1-token loop: the third repeat triggers the remedy instead of stopping.
        let (events, finished) = feed(&mut g, &[40, 40, 40]);
        assert!(finished.is_none());
        assert_eq!(events, [None, None, Some(Resample::Raise { temperature: 1.5 })]);
        // Varied tokens while the remedy lasts; the fourth ends it.
        let (events, finished) = feed(&mut g, &[41, 42, 43, 44, 45]);
        assert!(finished.is_none());
        assert_eq!(events, [None, None, None, Some(Resample::Restore), None]);
        // The generation ends normally and reports the remedy it needed.
        let mut last = None;
        for id in 46..2000u32 {
            let emitted = g.accept(40 + id % 50, -1.0).unwrap();
            if emitted.finished.is_some() {
                last = emitted.finished;
                break;
            }
        }
        let f = last.expect("finishes at max_new_tokens");
        assert_eq!(f.reason, pb::FinishReason::Length as i32);
        let report = f.r#loop.expect("the remedy is reported");
        assert_eq!((report.period, report.remedies, report.action), (1, 1, pb::LoopAction::RaiseTemperature as i32));
    }

    #[test]
    fn a_loop_that_survives_every_remedy_is_stopped() {
        let tok = tokenizer();
        let remedy = Remedy { temperature: 2.0, tokens: 2 };
        let mut g = Generation::new(tok.clone(), guarded(Some(remedy)), PROMPT_TOKENS, Instant::now());
        let (events, finished) = feed(&mut g, &[7; 100]);
        let f = finished.expect("stopped");
        // Each loop takes 3 tokens to see again: remedies at 3, 6 and 9, the stop at 12.
        assert_eq!(events.len(), 12);
        assert_eq!(events.iter().filter(|e| matches!(e, Some(Resample::Raise { .. }))).count(), 3);
        assert_eq!(f.reason, pb::FinishReason::Repetition as i32);
        let report = f.r#loop.unwrap();
        assert_eq!((report.remedies, report.action), (3, pb::LoopAction::Stop as i32));
    }
}

#[test]
fn repeated_sentences_are_removed_from_the_text_but_every_token_is_reported() {
    let tok = tokenizer();
    let text = "The cat sat. The cat sat. 风和日丽。风和日丽。The dog ran. The cat sat. The end";
    let mut ids = encode(&tok, text);
    ids.push(EOS);
    let s = run(&tok, Stopping { remove_repeated_sentences: true, ..stopping(1000) }, &ids);
    assert_eq!(s.text(), "The cat sat. 风和日丽。The dog ran. The end");
    assert_eq!(s.finished().removed_sentences, 3);
    assert_eq!(s.token_ids(), &ids[..ids.len() - 1], "tokens are streamed whatever the text drops");
    assert_eq!(s.finished().reason(), pb::FinishReason::Eos);
    // Text waits for its sentence to end: nothing of "The cat sat." before its period.
    let period = ids.iter().position(|&i| tok.decode(&[i], false).unwrap().contains('.')).unwrap();
    assert!(s.text_after[..period].iter().all(String::is_empty), "{:?}", &s.text_after[..period]);
    // Off, the same tokens give the whole text.
    let plain = run(&tok, stopping(1000), &ids);
    assert_eq!(plain.text(), text);
    assert_eq!(plain.finished().removed_sentences, 0);
}
