//! One request's output: the client's event stream and the [`Generation`] that turns sampled
//! tokens into chunks. Groups and rings both deliver through it, so `Started`, chunks, the loop
//! guard's change of sampling, token metrics and the final event are written once.

use std::time::Instant;

use tessera_proto::v1 as pb;
use tessera_proto::worker as wpb;
use tokio::sync::mpsc;
use tonic::Status;

use crate::beam::Hypothesis;
use crate::generation::{Generation, Resample};
use crate::metrics::Metrics;

/// Stream of events for one client.
pub(crate) type Events = mpsc::UnboundedSender<Result<pb::GenerateResponse, Status>>;

/// What a sampled token did to its request.
#[derive(Debug, Default)]
pub(crate) struct Accepted {
    /// Set when the request is done: send it once the workers have freed the sequence.
    pub finished: Option<pb::Finished>,
    /// The sampling to send with the next step, when the loop guard changed it.
    pub sampling: Option<wpb::Sampling>,
}

/// The output side of one request.
pub(crate) struct SequenceOutput {
    generation: Generation,
    events: Events,
    /// The request's own sampling, to return to after a loop-guard remedy.
    base: wpb::Sampling,
    /// When the last sampled token arrived, for the inter-token-latency metric.
    last_token: Option<Instant>,
    /// Times the request moved to another group.
    migrations: u32,
}

impl SequenceOutput {
    pub(crate) fn new(generation: Generation, events: Events, base: wpb::Sampling) -> Self {
        Self { generation, events, base, last_token: None, migrations: 0 }
    }

    pub(crate) fn generation(&self) -> &Generation {
        &self.generation
    }

    /// Tokens accepted so far.
    pub(crate) fn generated(&self) -> usize {
        self.generation.generated() as usize
    }

    /// Times the request has moved to another group.
    pub(crate) fn migrations(&self) -> u32 {
        self.migrations
    }

    /// Counts a move to another group.
    pub(crate) fn migrated(&mut self) {
        self.migrations += 1;
    }

    /// The client went away (cancelled, disconnected, or its stream was dropped).
    pub(crate) fn is_closed(&self) -> bool {
        self.events.is_closed()
    }

    /// Resolves when the client goes away.
    pub(crate) async fn closed(&self) {
        self.events.closed().await
    }

    /// The request's sampling with `beam_candidates` set, for beam searches.
    pub(crate) fn set_beam_candidates(&mut self, n: u32) {
        self.base.beam_candidates = n;
    }

    pub(crate) fn base_sampling(&self) -> &wpb::Sampling {
        &self.base
    }

    /// Tells the client where its request runs.
    pub(crate) fn started(&self, request_id: String, prompt_tokens: u32, placement: pb::Placement) {
        let started = pb::Started { request_id, prompt_tokens, placement: Some(placement) };
        self.send(pb::generate_response::Event::Started(started));
    }

    /// Takes one sampled token: streams what it completes and counts it. An error (a token the
    /// tokenizer cannot decode) ends the request.
    pub(crate) fn accept(
        &mut self,
        token: u32,
        logprob: f32,
        top: &[wpb::TopToken],
        metrics: &Metrics,
        now: Instant,
    ) -> Result<Accepted, Status> {
        self.last_token = Some(metrics.token(self.generation.arrived(), self.last_token, now));
        let top = top.iter().map(|a| pb::TopLogprob { id: a.token, logprob: a.logprob }).collect();
        let emitted = self.generation.accept_with_top(token, logprob, top).map_err(|e| Status::internal(e.to_string()))?;
        if let Some(chunk) = emitted.chunk {
            self.send(pb::generate_response::Event::Chunk(chunk));
        }
        let sampling = emitted.resample.map(|r| match r {
            Resample::Raise { temperature } => wpb::Sampling { temperature, ..self.base.clone() },
            Resample::Restore => self.base.clone(),
        });
        Ok(Accepted { finished: emitted.finished, sampling })
    }

    /// Ends a beam search with its best hypotheses (best first): streams the text of the best.
    pub(crate) fn accept_hypotheses(&mut self, best: &[Hypothesis]) -> Result<pb::Finished, Status> {
        let emitted = self.generation.accept_hypotheses(best).map_err(|e| Status::internal(e.to_string()))?;
        if let Some(chunk) = emitted.chunk {
            self.send(pb::generate_response::Event::Chunk(chunk));
        }
        emitted.finished.ok_or_else(|| Status::internal("a finished beam search produced no Finished event"))
    }

    /// The request's last event: `Finished`, counted in the metrics, or an error status.
    pub(crate) fn end(&self, end: Result<pb::Finished, Status>, metrics: &Metrics) {
        match end {
            Ok(mut finished) => {
                finished.migrations = self.migrations;
                metrics.finished(&finished);
                self.send(pb::generate_response::Event::Finished(finished));
            }
            // A closed stream has nobody to tell.
            Err(status) => {
                let _ = self.events.send(Err(status));
            }
        }
    }

    fn send(&self, event: pb::generate_response::Event) {
        // A closed stream is noticed before the next step; nothing to do here.
        let _ = self.events.send(Ok(pb::GenerateResponse { event: Some(event) }));
    }
}
