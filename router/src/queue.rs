//! The waiting room between admission and the shards.
//!
//! A queue of validated requests, ordered by priority (higher first; a Tessera extension,
//! 0 by default) and FIFO within a priority. The batching task drains it into prefill batches under two
//! budgets: the prompt tokens one prefill may process, and the KV tokens the whole running
//! batch may hold. As in TGI, the first request that does not fit stops batch building (no
//! overtaking), so a large request cannot be starved by a stream of small ones.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tessera_proto as pb;
use tokio::sync::{mpsc, Notify};

use crate::block_allocator::{BlockAllocation, BlockAllocator};
use crate::error::InferError;
use crate::infer::InferEvent;
use crate::validation::ValidRequest;

pub type ResponseSender = mpsc::UnboundedSender<Result<InferEvent, InferError>>;

pub struct Entry {
    pub request: ValidRequest,
    pub response_tx: ResponseSender,
    pub queued: Instant,
    pub batched: Option<Instant>,
    /// The KV blocks it holds once batched; freed when the entry is dropped.
    pub blocks: Option<BlockAllocation>,
    /// Prompt tokens its first prefill computes, when the budget takes only part of it.
    pub chunk_len: Option<u32>,
    /// When the last token went to the client (for time to first token and inter-token latency).
    pub last_token: Option<Instant>,
    /// The request's `infer` span: the parent of its queue wait and of the steps it heads.
    pub span: tracing::Span,
    /// Open while the request waits; closed when it is batched.
    pub queue_span: Option<tracing::Span>,
}

impl Entry {
    pub fn new(request: ValidRequest, response_tx: ResponseSender) -> Self {
        let span = tracing::info_span!(
            "infer",
            input_tokens = request.input_length,
            max_new_tokens = request.stopping.max_new_tokens,
            generated_tokens = tracing::field::Empty,
            finish_reason = tracing::field::Empty,
        );
        let queue_span = tracing::info_span!(parent: &span, "queue");
        Self {
            request,
            response_tx,
            queued: Instant::now(),
            batched: None,
            blocks: None,
            chunk_len: None,
            last_token: None,
            span,
            queue_span: Some(queue_span),
        }
    }
}

#[derive(Default)]
struct State {
    entries: VecDeque<(u64, Entry)>,
    next_id: u64,
    next_batch_id: u64,
}

#[derive(Clone)]
pub struct Queue {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
    blocks: BlockAllocator,
}

/// Budgets for one batch. `None` sizes mean "no constraint".
pub struct BatchLimits {
    pub min_size: Option<usize>,
    pub max_size: Option<usize>,
    pub prefill_token_budget: u32,
    pub token_budget: u32,
    /// The last request may bring only the part of its prompt that fits (`chunk_len`).
    pub chunking: bool,
}

impl Queue {
    pub fn new(blocks: BlockAllocator) -> Self {
        Self {
            state: Arc::default(),
            notify: Arc::default(),
            blocks,
        }
    }

    pub fn block_allocator(&self) -> &BlockAllocator {
        &self.blocks
    }

    pub fn append(&self, entry: Entry) {
        {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let id = s.next_id;
            s.next_id += 1;
            // Behind every entry of the same or a higher priority: FIFO within a priority.
            let priority = entry.request.priority;
            let at = s
                .entries
                .iter()
                .rposition(|(_, e)| e.request.priority >= priority)
                .map_or(0, |i| i + 1);
            s.entries.insert(at, (id, entry));
            metrics::gauge!("tgi_queue_size").set(s.entries.len() as f64);
        }
        self.notify.notify_one();
    }

    pub async fn wait(&self) {
        self.notify.notified().await
    }

    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pops the longest prefix of the queue that fits `limits` and turns it into a batch.
    pub fn next_batch(&self, limits: &BatchLimits) -> Option<(HashMap<u64, Entry>, pb::Batch)> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.entries.is_empty()
            || limits.max_size == Some(0)
            || limits.prefill_token_budget == 0
            || limits.token_budget == 0
        {
            return None;
        }
        let now = Instant::now();
        let (mut prefill_tokens, mut total_tokens) = (0u32, 0u32);
        let mut taken: Vec<(u64, Entry)> = Vec::new();
        while let Some((id, mut entry)) = s.entries.pop_front() {
            if entry.response_tx.is_closed() {
                metrics::counter!("tgi_request_failure", "err" => "dropped").increment(1);
                continue; // the client went away while waiting
            }
            let r = &entry.request;
            // Every position but the last generated token gets written to the KV cache.
            let positions = (r.max_tokens() - 1).max(r.input_length);
            if total_tokens + r.max_tokens() > limits.token_budget {
                s.entries.push_front((id, entry));
                break;
            }
            // Prompt logprobs need every prompt position computed: no prefix reuse (as TGI).
            let prompt = (!r.decoder_input_details).then_some(r.input_ids.as_slice());
            let Some(blocks) = self.blocks.allocate(prompt, positions) else {
                s.entries.push_front((id, entry));
                break;
            };
            let to_compute = r.input_length - blocks.cache_len;
            let room = limits.prefill_token_budget.saturating_sub(prefill_tokens);
            let chunk = if to_compute <= room {
                None
            } else if limits.chunking && room > 0 {
                Some(room)
            } else {
                s.entries.push_front((id, entry));
                break; // dropping `blocks` gives them back
            };
            entry.blocks = Some(blocks);
            entry.chunk_len = chunk;
            prefill_tokens += chunk.unwrap_or(to_compute);
            total_tokens += r.max_tokens();
            entry.batched = Some(now);
            let chunked = entry.chunk_len.is_some();
            taken.push((id, entry));
            if chunked || limits.max_size == Some(taken.len()) {
                break;
            }
        }
        if taken.is_empty() || limits.min_size.is_some_and(|m| taken.len() < m) {
            for (id, mut e) in taken.into_iter().rev() {
                e.blocks = None;
                e.chunk_len = None;
                e.batched = None;
                s.entries.push_front((id, e));
            }
            return None;
        }
        for (_, e) in taken.iter_mut() {
            e.queue_span = None; // the wait is over
            crate::metrics::record_batched(e, now);
        }
        let requests = taken
            .iter()
            .map(|(id, e)| {
                let r = &e.request;
                let (blocks, slots, cache_len) = e
                    .blocks
                    .as_ref()
                    .map(|b| (b.blocks.clone(), b.slots.clone(), b.cache_len))
                    .unwrap_or_default();
                pb::Request {
                    blocks,
                    slots,
                    cache_len,
                    chunk_len: e.chunk_len,
                    id: *id,
                    inputs: r.inputs.clone(),
                    input_chunks: Some(pb::Input {
                        chunks: vec![pb::InputChunk {
                            chunk: Some(pb::input_chunk::Chunk::Text(r.inputs.clone())),
                        }],
                    }),
                    truncate: r.truncate,
                    parameters: Some(r.parameters.clone()),
                    stopping_parameters: Some(r.stopping.clone()),
                    prefill_logprobs: r.decoder_input_details,
                    top_n_tokens: r.top_n_tokens,
                    add_special_tokens: r.add_special_tokens,
                    ..Default::default()
                }
            })
            .collect::<Vec<_>>();
        let id = s.next_batch_id;
        s.next_batch_id += 1;
        metrics::gauge!("tgi_queue_size").set(s.entries.len() as f64);
        metrics::histogram!("tgi_batch_next_size").record(requests.len() as f64);
        let batch = pb::Batch {
            id,
            size: requests.len() as u32,
            max_tokens: total_tokens,
            requests,
            max_blocks: 0,
        };
        Some((taken.into_iter().collect(), batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(priority: i32) -> Entry {
        let (tx, rx) = mpsc::unbounded_channel();
        std::mem::forget(rx); // keep the channel open: closed ones are dropped from the queue
        Entry::new(
            ValidRequest {
                received: Instant::now(),
                inputs: "x".into(),
                input_ids: vec![1, 2, 3],
                input_length: 3,
                add_special_tokens: true,
                truncate: 0,
                parameters: Default::default(),
                stopping: pb::StoppingCriteriaParameters {
                    max_new_tokens: 4,
                    ..Default::default()
                },
                top_n_tokens: 0,
                decoder_input_details: false,
                priority,
            },
            tx,
        )
    }

    #[test]
    fn higher_priority_first_fifo_within_a_priority() {
        let q = Queue::new(BlockAllocator::new(1 << 16, 16, true));
        for p in [0, 5, 0, 5, -1, 9] {
            q.append(entry(p));
        }
        let limits = BatchLimits {
            min_size: None,
            max_size: None,
            prefill_token_budget: 1 << 20,
            token_budget: 1 << 20,
            chunking: false,
        };
        let (_, batch) = q.next_batch(&limits).expect("batch");
        let order: Vec<u64> = batch.requests.iter().map(|r| r.id).collect();
        assert_eq!(order, vec![5, 1, 3, 0, 2, 4]);
    }
}
