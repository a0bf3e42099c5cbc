//! The `Generate` response stream with its key's ticket: the ticket's concurrent slot is held
//! until the stream ends or is dropped, and every token that passes (the prompt's, counted at
//! `Started`, then each chunk's) is charged to the key.

use std::pin::Pin;
use std::task::{Context, Poll};

use tessera_proto::v1 as pb;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::Stream;
use tonic::Status;

use super::Ticket;

pub struct MeteredStream {
    inner: UnboundedReceiverStream<Result<pb::GenerateResponse, Status>>,
    /// `None` when the coordinator checks no keys.
    ticket: Option<Ticket>,
}

impl MeteredStream {
    pub fn new(inner: UnboundedReceiverStream<Result<pb::GenerateResponse, Status>>, ticket: Option<Ticket>) -> Self {
        Self { inner, ticket }
    }
}

impl Stream for MeteredStream {
    type Item = Result<pb::GenerateResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = Pin::new(&mut self.inner).poll_next(cx);
        match &item {
            Poll::Ready(Some(Ok(response))) => {
                if let Some(ticket) = &self.ticket {
                    match &response.event {
                        Some(pb::generate_response::Event::Started(s)) => ticket.charge(u64::from(s.prompt_tokens)),
                        Some(pb::generate_response::Event::Chunk(c)) => ticket.charge(c.tokens.len() as u64),
                        _ => {}
                    }
                }
            }
            // The end: the slot is free before the client reads the last message.
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.ticket = None,
            Poll::Pending => {}
        }
        item
    }
}
