//! Admission and the per-request event stream.
//!
//! `Infer` is what HTTP handlers call: it applies the concurrency limit (429 beyond it),
//! validates, queues the request for the batching task and hands back a stream of events
//! (prompt tokens, each new token, the end). Non-streaming routes simply collect that stream.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{StreamExt, StreamMap};

use crate::client::ShardedClient;
use crate::error::InferError;
use crate::queue::{Entry, Queue};
use crate::server::types::{FinishReason, PrefillToken, Token};
use crate::validation::{ValidRequest, Validation};

#[derive(Debug, Clone)]
pub struct GeneratedText {
    pub text: String,
    pub generated_tokens: u32,
    pub finish_reason: FinishReason,
    pub seed: Option<u64>,
}

#[derive(Debug)]
pub enum InferEvent {
    Prefill(Vec<PrefillToken>),
    Token {
        token: Token,
        top_tokens: Vec<Token>,
    },
    End {
        token: Token,
        top_tokens: Vec<Token>,
        generated_text: GeneratedText,
        queued: Instant,
        start: Instant,
    },
}

pub type InferStream = UnboundedReceiverStream<Result<InferEvent, InferError>>;

/// A finished generation, collected from the stream.
#[derive(Debug)]
pub struct InferResponse {
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
    pub top_tokens: Vec<Vec<Token>>,
    pub generated_text: GeneratedText,
    pub queued: Instant,
    pub start: Instant,
}

#[derive(Clone)]
pub struct Infer {
    pub validation: Validation,
    queue: Queue,
    limit: Arc<Semaphore>,
    client: ShardedClient,
    healthy: Arc<AtomicBool>,
}

impl Infer {
    pub fn new(
        validation: Validation,
        queue: Queue,
        client: ShardedClient,
        max_concurrent_requests: usize,
        healthy: Arc<AtomicBool>,
    ) -> Self {
        Self {
            validation,
            queue,
            limit: Arc::new(Semaphore::new(max_concurrent_requests)),
            client,
            healthy,
        }
    }

    /// Takes a concurrency slot, or fails with 429 at once.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, InferError> {
        self.admit_many(1)
    }

    /// Takes `n` slots at once (one per sequence of an `n` > 1 request), or none.
    pub fn admit_many(&self, n: u32) -> Result<OwnedSemaphorePermit, InferError> {
        metrics::counter!("tgi_request_count").increment(1);
        self.limit
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| InferError::Overloaded)
    }

    /// Queues several requests together (so they share prefills and decodes) and merges their
    /// event streams, each event tagged with its request's position in `requests`.
    pub fn schedule_all(&self, requests: Vec<ValidRequest>) -> StreamMap<usize, InferStream> {
        let mut streams = StreamMap::with_capacity(requests.len());
        for (i, r) in requests.into_iter().enumerate() {
            streams.insert(i, self.schedule(r));
        }
        streams
    }

    /// Queues a validated request; the permit must be held until the stream is consumed.
    pub fn schedule(&self, request: ValidRequest) -> InferStream {
        let (tx, rx) = mpsc::unbounded_channel();
        self.queue.append(Entry::new(request, tx));
        UnboundedReceiverStream::new(rx)
    }

    pub async fn generate(&self, request: ValidRequest) -> Result<InferResponse, InferError> {
        let mut stream = self.schedule(request);
        let (mut prefill, mut tokens, mut top_tokens) = (Vec::new(), Vec::new(), Vec::new());
        while let Some(event) = stream.next().await {
            match event? {
                InferEvent::Prefill(p) => prefill = p,
                InferEvent::Token {
                    token,
                    top_tokens: top,
                } => {
                    tokens.push(token);
                    top_tokens.push(top);
                }
                InferEvent::End {
                    token,
                    top_tokens: top,
                    generated_text,
                    queued,
                    start,
                } => {
                    tokens.push(token);
                    top_tokens.push(top);
                    if top_tokens.iter().all(|t| t.is_empty()) {
                        top_tokens.clear();
                    }
                    return Ok(InferResponse {
                        prefill,
                        tokens,
                        top_tokens,
                        generated_text,
                        queued,
                        start,
                    });
                }
            }
        }
        Err(InferError::IncompleteGeneration)
    }

    /// Cheap health check when the last generation went well, a real one-token generation
    /// through the queue when it did not (as TGI does).
    pub async fn health(&self) -> bool {
        let ok = if self.healthy.load(Ordering::SeqCst) {
            self.client.health().await.is_ok()
        } else {
            let probe = self
                .validation
                .validate(
                    "liveness".into(),
                    crate::server::types::GenerateParameters {
                        max_new_tokens: Some(1),
                        ..Default::default()
                    },
                    true,
                )
                .await;
            match probe {
                Ok(req) => self.generate(req).await.is_ok(),
                Err(_) => false,
            }
        };
        self.healthy.store(ok, Ordering::SeqCst);
        ok
    }
}
