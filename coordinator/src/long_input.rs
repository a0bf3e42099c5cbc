//! Text longer than any context (`GenerateRequest.long_input`): the prompt is a document, split
//! into overlapping chunks at token boundaries (preferring sentence ends), each chunk answered
//! with the request's instruction, and the partial answers combined until one remains, which
//! streams.
//!
//! Every call of a job is an ordinary `Generate` request placed through
//! [`InferenceService::start`], so the chunks of one stage spread over the serving groups and
//! queue like any other request. [`plan`] checks everything before the stream starts, so that a
//! configuration that cannot work (overlap not below the chunk, a chunk that cannot fit the
//! context beside the instruction and the answer) is `INVALID_ARGUMENT` naming the field, never
//! an error halfway through; each call is also checked again when it is placed.
//!
//! - `MAP_REDUCE`: stage 0 answers every chunk, at most [`CONCURRENT_CALLS`] at once; each later
//!   stage joins consecutive answers, as many as fit one chunk's budget, until one call remains.
//! - `REFINE`: one chunk after another, each call given the answer so far and the next chunk.
//!
//! The client sees `Started` (the document's exact token count), a `LongInputProgress` for
//! every finished call (its stage, its chunk's token range, its exact prompt and answer
//! counts), the last call's chunks, and a `Finished` whose `stages` hold every stage's counts
//! and whose `usage` is their sum.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use futures_util::stream::{self, StreamExt};
use tessera_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::CoordinatorError;
use crate::limits::Limits;
use crate::model::{ModelKind, ServedModel};
use crate::request::{find_model_and_adapter, prepare};
use crate::service::InferenceService;

/// Most chunks one document may make.
pub const MAX_CHUNKS: usize = 1024;
/// Bytes of the instruction.
pub const MAX_INSTRUCTION_BYTES: usize = 4096;
/// Calls of one stage running at once.
const CONCURRENT_CALLS: usize = 8;
/// Tokens a partial answer may take in a combining call beyond its own length: the blank line
/// that separates it from the next, and the joins the tokenizer may make at its edges.
const ANSWER_OVERHEAD: usize = 8;
/// A chunk's text tokenized again inside a prompt may take a few tokens more than its slice of
/// the document's ids (a word cut at the edge, merged with the text before it).
const RETOKENIZE_SLACK: usize = 16;
/// Where a cut prefers to fall: after a token ending with one of these.
const SENTENCE_ENDS: [char; 7] = ['.', '!', '?', '\n', '。', '！', '？'];

type Events = mpsc::UnboundedSender<Result<pb::GenerateResponse, Status>>;

/// One chunk of the document: tokens `tokens` of its ids, bytes `text` of its text.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub tokens: Range<usize>,
    pub text: Range<usize>,
}

/// A checked long-input request, split and ready to run.
pub struct Job {
    /// The request each call copies: model, adapter, sampling, stopping.
    template: pb::GenerateRequest,
    model: Arc<ServedModel>,
    strategy: pb::long_input::Strategy,
    instruction: String,
    document: String,
    document_tokens: usize,
    chunks: Vec<Chunk>,
    /// Answers one combining call joins.
    fan_in: usize,
    request_id: String,
    arrived: Instant,
    /// The client's deadline, which every call of the job keeps.
    deadline: Option<Instant>,
}

impl Job {
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }
}

fn invalid(message: impl Into<String>) -> CoordinatorError {
    CoordinatorError::InvalidArgument(message.into())
}

/// Checks `request` (which has `long_input` set) and splits its document.
pub fn plan(mut request: pb::GenerateRequest, models: &[Arc<ServedModel>], limits: &Limits) -> Result<Job, CoordinatorError> {
    let arrived = Instant::now();
    let long = request.long_input.take().ok_or_else(|| invalid("long_input is not set"))?;
    let (model, _) = find_model_and_adapter(models, &request.model, &request.adapter)?;
    if model.kind == ModelKind::Encoder {
        return Err(invalid(format!("model {:?} is an encoder: it serves Embed, not Generate", model.name())));
    }
    let strategy = pb::long_input::Strategy::try_from(long.strategy)
        .map_err(|_| invalid(format!("long_input.strategy {} is not a known value", long.strategy)))?;
    let document = match request.input.take() {
        Some(pb::generate_request::Input::Prompt(text)) if !text.is_empty() => text,
        _ => return Err(invalid("long_input needs the document as prompt text (not chat or token ids)")),
    };
    if document.len() > limits.max_prompt_bytes {
        return Err(invalid(format!("prompt is {} bytes; the limit is {}", document.len(), limits.max_prompt_bytes)));
    }
    if long.instruction.trim().is_empty() {
        return Err(invalid("long_input.instruction is empty: say what to do with each chunk"));
    }
    if long.instruction.len() > MAX_INSTRUCTION_BYTES {
        return Err(invalid(format!("long_input.instruction is {} bytes; the limit is {MAX_INSTRUCTION_BYTES}", long.instruction.len())));
    }
    if request.sampling.as_ref().and_then(|s| s.beam_search.as_ref()).is_some_and(|b| b.num_beams >= 2) {
        return Err(invalid("beam_search cannot be combined with long_input"));
    }
    let mut stopping = request.stopping.take().unwrap_or_default();
    if stopping.max_new_tokens == 0 {
        stopping.max_new_tokens = limits.default_max_new_tokens;
    }
    if stopping.max_new_tokens > limits.max_new_tokens {
        return Err(invalid(format!("max_new_tokens is {}; the limit is {}", stopping.max_new_tokens, limits.max_new_tokens)));
    }
    let answer = stopping.max_new_tokens as usize;
    let (chunk_tokens, overlap) = (long.chunk_tokens as usize, long.overlap_tokens as usize);
    if overlap >= chunk_tokens {
        return Err(invalid(format!("long_input.overlap_tokens ({overlap}) must be below long_input.chunk_tokens ({chunk_tokens})")));
    }
    let fan_in = chunk_tokens / (answer + ANSWER_OVERHEAD);
    if strategy == pb::long_input::Strategy::MapReduce && fan_in < 2 {
        return Err(invalid(format!(
            "long_input.chunk_tokens ({chunk_tokens}) must hold two partial answers to combine them: at least 2 x (max_new_tokens + {ANSWER_OVERHEAD}) = {}",
            2 * (answer + ANSWER_OVERHEAD)
        )));
    }
    request.stopping = Some(stopping);
    if request.request_id.len() > limits.max_request_id_bytes {
        return Err(invalid(format!("request_id is {} bytes; the limit is {}", request.request_id.len(), limits.max_request_id_bytes)));
    }

    // What a call adds around its text (template, instruction, framing), measured by preparing
    // it with no text; a refining call also carries the answer so far.
    let mut job = Job {
        template: request,
        model: model.clone(),
        strategy,
        instruction: long.instruction,
        document: String::new(),
        document_tokens: 0,
        chunks: Vec::new(),
        fan_in,
        request_id: String::new(),
        arrived,
        deadline: None,
    };
    let wrapper = prepare(job.call(job.content(None, ""), 0), models, limits)?.prompt.len();
    let carried = if strategy == pb::long_input::Strategy::Refine { answer + ANSWER_OVERHEAD } else { 0 };
    let fits = model.max_context.saturating_sub(wrapper + carried + answer + RETOKENIZE_SLACK);
    if chunk_tokens > fits {
        return Err(invalid(format!(
            "long_input.chunk_tokens ({chunk_tokens}) does not fit the model's context of {} tokens beside the instruction and template ({wrapper} tokens){} and max_new_tokens ({answer}): at most {fits}",
            model.max_context,
            if carried > 0 { format!(", the answer so far ({carried})") } else { String::new() },
        )));
    }

    let encoding = model
        .tokenizer
        .encode(document.as_str(), false)
        .map_err(|e| CoordinatorError::Internal(format!("tokenizing the document: {e}")))?;
    let offsets = encoding.get_offsets();
    let chunks = split(&document, offsets, chunk_tokens, overlap);
    if chunks.len() > MAX_CHUNKS {
        return Err(invalid(format!(
            "the document ({} tokens) makes {} chunks of long_input.chunk_tokens ({chunk_tokens}); the limit is {MAX_CHUNKS}",
            offsets.len(),
            chunks.len()
        )));
    }
    job.document_tokens = offsets.len();
    job.chunks = chunks;
    job.document = document;
    job.request_id = if job.template.request_id.is_empty() {
        static JOBS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        format!("long-{}", JOBS.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    } else {
        job.template.request_id.clone()
    };
    Ok(job)
}

/// Cuts a document of `offsets.len()` tokens (byte spans into `text`) into chunks of at most
/// `chunk` tokens, each starting `overlap` tokens before the last one ended. A cut falls after
/// the last token ending a sentence in the chunk's final quarter, where there is one.
pub fn split(text: &str, offsets: &[(usize, usize)], chunk: usize, overlap: usize) -> Vec<Chunk> {
    let n = offsets.len();
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < n {
        let mut end = (start + chunk).min(n);
        if end < n {
            // Past the overlap, so the next chunk starts after this one does.
            let earliest = (start + overlap + 1).max(end - (chunk - overlap) / 4);
            if let Some(cut) = (earliest..=end).rev().find(|&e| ends_sentence(text, offsets[e - 1])) {
                end = cut;
            }
        }
        let from = floor_boundary(text, offsets[start].0);
        let to = ceil_boundary(text, offsets[end - 1].1.max(offsets[start].0));
        chunks.push(Chunk { tokens: start..end, text: from..to });
        if end == n {
            break;
        }
        start = end - overlap;
    }
    chunks
}

fn ends_sentence(text: &str, (from, to): (usize, usize)) -> bool {
    let span = text.get(floor_boundary(text, from)..ceil_boundary(text, to)).unwrap_or_default();
    span.trim_end_matches(' ').ends_with(SENTENCE_ENDS)
}

/// Byte-level tokens may end inside a character: widen to whole characters.
fn floor_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i += 1;
    }
    i
}

impl Job {
    /// The text of one call: the instruction, then the answer so far (refining), then `text`.
    fn content(&self, previous: Option<&str>, text: &str) -> String {
        match previous {
            Some(answer) => format!("{}\n\nAnswer so far:\n{answer}\n\nNext part of the text:\n{text}", self.instruction),
            None => format!("{}\n\n{text}", self.instruction),
        }
    }

    /// The `Generate` request of call number `index` with `content`: a user message where the
    /// model has a chat template, else plain text. A seeded request gives call `i` seed `seed + i`.
    fn call(&self, content: String, index: u64) -> pb::GenerateRequest {
        let input = match self.model.chat {
            Some(_) => {
                pb::generate_request::Input::Chat(pb::ChatInput { messages: vec![pb::ChatMessage { role: "user".into(), content }] })
            }
            None => pb::generate_request::Input::Prompt(content),
        };
        let mut sampling = self.template.sampling.clone();
        if let Some(s) = sampling.as_mut() {
            s.seed = s.seed.map(|seed| seed.wrapping_add(index));
        }
        pb::GenerateRequest { input: Some(input), sampling, request_id: String::new(), long_input: None, ..self.template.clone() }
    }

    fn chunk_text(&self, i: usize) -> &str {
        &self.document[self.chunks[i].text.clone()]
    }
}

/// What one finished call gave.
struct Answer {
    text: String,
    prompt_tokens: u32,
    completion_tokens: u32,
}

/// Counts of the stages so far.
#[derive(Default)]
struct Accounts {
    stages: Vec<pb::StageUsage>,
}

impl Accounts {
    /// Calls finished so far, in every stage.
    fn calls(&self) -> u64 {
        self.stages.iter().map(|s| u64::from(s.calls)).sum()
    }

    fn add(&mut self, stage: u32, answer: &Answer) {
        if self.stages.last().is_none_or(|s| s.stage != stage) {
            self.stages.push(pb::StageUsage { stage, ..Default::default() });
        }
        if let Some(s) = self.stages.last_mut() {
            s.calls += 1;
            s.prompt_tokens += u64::from(answer.prompt_tokens);
            s.completion_tokens += u64::from(answer.completion_tokens);
        }
    }
}

fn event(e: pb::generate_response::Event) -> Result<pb::GenerateResponse, Status> {
    Ok(pb::GenerateResponse { event: Some(e) })
}

/// Runs `job`, sending its events to `events`; ends early when the client goes away (dropping
/// a call's stream cancels it) or a call fails (its status ends the stream).
pub async fn run(service: InferenceService, mut job: Job, events: Events, deadline: Option<Instant>) {
    job.deadline = deadline;
    let started = pb::Started { request_id: job.request_id.clone(), prompt_tokens: job.document_tokens as u32, placement: None };
    if events.send(event(pb::generate_response::Event::Started(started))).is_err() {
        return;
    }
    let result = match job.strategy {
        pb::long_input::Strategy::MapReduce => map_reduce(&service, &job, &events).await,
        pb::long_input::Strategy::Refine => refine(&service, &job, &events).await,
    };
    if let Err(status) = result {
        let _ = events.send(Err(status));
    }
}

/// A progress event for call `index` (counted from 0) of `total` in `stage`.
fn progress(stage: u32, done: usize, total: usize, tokens: Option<&Range<usize>>, answer: &Answer) -> pb::generate_response::Event {
    pb::generate_response::Event::Progress(pb::LongInputProgress {
        stage,
        done: done as u32,
        total: total as u32,
        first_token: tokens.map_or(0, |t| t.start as u32),
        end_token: tokens.map_or(0, |t| t.end as u32),
        prompt_tokens: answer.prompt_tokens,
        completion_tokens: answer.completion_tokens,
    })
}

async fn map_reduce(service: &InferenceService, job: &Job, events: &Events) -> Result<(), Status> {
    let mut accounts = Accounts::default();
    let mut stage = 0u32;
    // Stage 0's calls carry chunks; later stages' carry joined answers.
    let mut inputs: Vec<(String, Option<Range<usize>>)> =
        (0..job.chunks.len()).map(|i| (job.content(None, job.chunk_text(i)), Some(job.chunks[i].tokens.clone()))).collect();
    loop {
        if inputs.len() == 1 {
            let (content, tokens) = inputs.remove(0);
            let request = job.call(content, accounts.calls());
            return stream_last(service, job, request, stage, tokens, accounts, events).await;
        }
        let total = inputs.len();
        let first_call = accounts.calls();
        let mut calls = stream::iter(inputs.into_iter().enumerate())
            .map(|(i, (content, tokens))| {
                let request = job.call(content, first_call + i as u64);
                async move { (i, tokens, collect(service, job, request).await) }
            })
            .buffer_unordered(CONCURRENT_CALLS);
        let mut answers: Vec<Option<Answer>> = (0..total).map(|_| None).collect();
        let mut done = 0;
        while let Some((i, tokens, answer)) = calls.next().await {
            let answer = answer?;
            done += 1;
            if events.send(event(progress(stage, done, total, tokens.as_ref(), &answer))).is_err() {
                return Ok(());
            }
            answers[i] = Some(answer);
        }
        drop(calls);
        let answers: Vec<Answer> = answers.into_iter().flatten().collect();
        for a in &answers {
            accounts.add(stage, a);
        }
        inputs = answers
            .chunks(job.fan_in)
            .map(|group| {
                let joined: Vec<&str> = group.iter().map(|a| a.text.trim()).collect();
                (job.content(None, &joined.join("\n\n")), None)
            })
            .collect();
        stage += 1;
    }
}

async fn refine(service: &InferenceService, job: &Job, events: &Events) -> Result<(), Status> {
    let mut accounts = Accounts::default();
    let mut answer: Option<String> = None;
    let total = job.chunks.len();
    for i in 0..total {
        let content = job.content(answer.as_deref(), job.chunk_text(i));
        let request = job.call(content, i as u64);
        let tokens = Some(job.chunks[i].tokens.clone());
        if i + 1 == total {
            return stream_last(service, job, request, 0, tokens, accounts, events).await;
        }
        let got = collect(service, job, request).await?;
        accounts.add(0, &got);
        if events.send(event(progress(0, i + 1, total, tokens.as_ref(), &got))).is_err() {
            return Ok(());
        }
        answer = Some(got.text.trim().to_string());
    }
    Ok(())
}

/// Runs one call to its end and returns its text and counts.
async fn collect(service: &InferenceService, job: &Job, request: pb::GenerateRequest) -> Result<Answer, Status> {
    use pb::generate_response::Event;
    let mut stream = service.start(request, Instant::now(), job.deadline, "-").await?;
    let mut answer = Answer { text: String::new(), prompt_tokens: 0, completion_tokens: 0 };
    while let Some(e) = stream.recv().await {
        match e?.event {
            Some(Event::Started(s)) => answer.prompt_tokens = s.prompt_tokens,
            Some(Event::Chunk(c)) => answer.text.push_str(&c.text),
            Some(Event::Finished(f)) => {
                answer.completion_tokens = f.usage.map_or(0, |u| u.completion_tokens);
                return Ok(answer);
            }
            Some(Event::Progress(_)) | None => {}
        }
    }
    Err(Status::internal("a long-input call ended without finishing"))
}

/// Runs the job's last call, streaming its chunks to the client, and ends the job's stream with
/// its `Finished`, whose usage and stages cover every call.
async fn stream_last(
    service: &InferenceService,
    job: &Job,
    request: pb::GenerateRequest,
    stage: u32,
    tokens: Option<Range<usize>>,
    mut accounts: Accounts,
    events: &Events,
) -> Result<(), Status> {
    use pb::generate_response::Event;
    let mut stream = service.start(request, Instant::now(), job.deadline, "-").await?;
    let mut prompt_tokens = 0;
    let total = if job.strategy == pb::long_input::Strategy::Refine { job.chunks.len() } else { 1 };
    while let Some(e) = stream.recv().await {
        match e?.event {
            Some(Event::Started(s)) => prompt_tokens = s.prompt_tokens,
            Some(Event::Chunk(c)) => {
                if events.send(event(Event::Chunk(c))).is_err() {
                    return Ok(());
                }
            }
            Some(Event::Finished(mut finished)) => {
                let answer =
                    Answer { text: String::new(), prompt_tokens, completion_tokens: finished.usage.map_or(0, |u| u.completion_tokens) };
                accounts.add(stage, &answer);
                let _ = events.send(event(progress(stage, total, total, tokens.as_ref(), &answer)));
                let sum = |f: fn(&pb::StageUsage) -> u64| accounts.stages.iter().map(f).sum::<u64>();
                finished.usage = Some(pb::Usage {
                    prompt_tokens: sum(|s| s.prompt_tokens).min(u64::from(u32::MAX)) as u32,
                    completion_tokens: sum(|s| s.completion_tokens).min(u64::from(u32::MAX)) as u32,
                });
                if let Some(timing) = finished.timing.as_mut() {
                    timing.total_ms = job.arrived.elapsed().as_secs_f64() * 1e3;
                }
                finished.stages = accounts.stages;
                let _ = events.send(event(Event::Finished(finished)));
                return Ok(());
            }
            Some(Event::Progress(_)) | None => {}
        }
    }
    Err(Status::internal("a long-input call ended without finishing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets of a document of `n` one-byte tokens, where every `period`-th token is a '.'.
    fn document(n: usize, period: usize) -> (String, Vec<(usize, usize)>) {
        let text: String = (0..n).map(|i| if (i + 1) % period == 0 { '.' } else { 'a' }).collect();
        (text, (0..n).map(|i| (i, i + 1)).collect())
    }

    #[test]
    fn chunks_overlap_as_asked_cover_the_document_and_prefer_sentence_ends() {
        for (n, chunk, overlap, period) in
            [(1000, 100, 20, 7), (1000, 100, 0, 1000), (57, 100, 10, 5), (5000, 512, 128, 37), (101, 100, 99, 3)]
        {
            let (text, offsets) = document(n, period);
            let chunks = split(&text, &offsets, chunk, overlap);
            assert_eq!(chunks[0].tokens.start, 0);
            assert_eq!(chunks.last().map(|c| c.tokens.end), Some(n), "the last chunk reaches the end");
            for c in &chunks {
                assert!(c.tokens.len() <= chunk && !c.tokens.is_empty(), "{c:?}");
                assert_eq!(c.text, c.tokens.clone(), "one byte per token");
            }
            for pair in chunks.windows(2) {
                assert_eq!(pair[0].tokens.end - pair[1].tokens.start, overlap, "{pair:?}");
                assert!(pair[1].tokens.start > pair[0].tokens.start);
                // A sentence end in the last quarter of the stride is where the cut falls.
                let stride = chunk - overlap;
                let window = (pair[0].tokens.start + chunk - stride / 4)..=(pair[0].tokens.start + chunk);
                if window.clone().any(|e| e <= n && text.as_bytes()[e - 1] == b'.') {
                    assert_eq!(text.as_bytes()[pair[0].tokens.end - 1], b'.', "{pair:?}");
                }
            }
        }
    }
}
