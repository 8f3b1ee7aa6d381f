//! The batching task: continuous batching over the shard protocol.
//!
//! One task owns the running batch. It prefills whatever the queue can give, then decodes the
//! running batch step by step; between steps it admits newly queued requests (a separate
//! prefill whose result joins the running batch) when enough of them fit, or when the queue has
//! waited `max_waiting_tokens` steps. Finished or abandoned requests are filtered out of the
//! shards' batch after every step, so their KV budget returns at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tessera_proto as pb;
use tracing::{Instrument, Span};

use crate::client::{ShardedClient, StepResult};
use crate::error::InferError;
use crate::infer::{GeneratedText, InferEvent};
use crate::queue::{BatchLimits, Entry, Queue};
use crate::server::types::{FinishReason, PrefillToken, Token};

#[derive(Debug, Clone)]
pub struct BatchingConfig {
    /// The shards can continue a prompt across calls and fold a prefill into a decode step.
    pub chunking: bool,
    pub max_batch_prefill_tokens: u32,
    pub max_batch_total_tokens: u32,
    pub max_batch_size: Option<usize>,
    pub max_waiting_tokens: usize,
    pub waiting_served_ratio: f32,
}

type Entries = HashMap<u64, Entry>;

pub async fn batching_task(
    client: ShardedClient,
    queue: Queue,
    config: BatchingConfig,
    healthy: Arc<AtomicBool>,
) {
    loop {
        queue.wait().await;
        let first = BatchLimits {
            min_size: None,
            max_size: config.max_batch_size,
            prefill_token_budget: config.max_batch_prefill_tokens,
            token_budget: config.max_batch_total_tokens,
            chunking: config.chunking,
        };
        while let Some((mut entries, batch)) = queue.next_batch(&first) {
            let mut running = prefill(&client, batch, None, &mut entries, &healthy, &queue).await;
            let mut waiting_tokens = 1;
            while let Some(batch) = running {
                running = if config.chunking {
                    chunked_step(&client, &queue, &config, batch, &mut entries, &healthy).await
                } else {
                    let (next, waited) = separate_step(
                        &client,
                        &queue,
                        &config,
                        batch,
                        waiting_tokens,
                        &mut entries,
                        &healthy,
                    )
                    .await;
                    waiting_tokens = waited;
                    next
                };
                let (size, max_tokens, tokens) = running
                    .as_ref()
                    .map_or((0, 0, 0), |b| (b.size, b.max_tokens, b.current_tokens));
                metrics::gauge!("tgi_batch_current_size").set(size as f64);
                metrics::gauge!("tgi_batch_current_max_tokens").set(max_tokens as f64);
                metrics::gauge!("tgi_batch_total_tokens").set(tokens as f64);
            }
        }
    }
}

/// With chunking (TGI v3's loop): new requests join whenever the prefill budget left by the
/// running batch's own next tokens allows, as one forward pass with the running decode; the
/// last one may bring only a chunk of its prompt. Running streams never stop for a prefill.
async fn chunked_step(
    client: &ShardedClient,
    queue: &Queue,
    config: &BatchingConfig,
    batch: pb::CachedBatch,
    entries: &mut Entries,
    healthy: &AtomicBool,
) -> Option<pb::CachedBatch> {
    let limits = BatchLimits {
        min_size: None,
        max_size: config
            .max_batch_size
            .map(|m| m.saturating_sub(batch.size as usize)),
        prefill_token_budget: config
            .max_batch_prefill_tokens
            .saturating_sub(batch.current_tokens),
        token_budget: config
            .max_batch_total_tokens
            .saturating_sub(batch.max_tokens),
        chunking: true,
    };
    match queue.next_batch(&limits) {
        Some((new_entries, new_batch)) => {
            metrics::counter!("tgi_batch_concat", "reason" => "chunking").increment(1);
            entries.extend(new_entries);
            prefill(client, new_batch, Some(batch), entries, healthy, queue).await
        }
        None => decode(client, vec![batch], entries, healthy, queue).await,
    }
}

/// Without chunking (TGI's older loop): a separate prefill for newcomers when enough of them
/// fit (`waiting_served_ratio`) or they waited `max_waiting_tokens` steps, then one decode of
/// both batches. Returns the next batch and the updated waiting count.
async fn separate_step(
    client: &ShardedClient,
    queue: &Queue,
    config: &BatchingConfig,
    batch: pb::CachedBatch,
    mut waiting_tokens: usize,
    entries: &mut Entries,
    healthy: &AtomicBool,
) -> (Option<pb::CachedBatch>, usize) {
    let mut batches = vec![batch.clone()];
    let min_size = if waiting_tokens >= config.max_waiting_tokens {
        None
    } else {
        Some(((batch.size as f32) * config.waiting_served_ratio).floor() as usize)
    };
    let limits = BatchLimits {
        min_size,
        max_size: config
            .max_batch_size
            .map(|m| m.saturating_sub(batch.size as usize)),
        prefill_token_budget: config.max_batch_prefill_tokens,
        token_budget: config
            .max_batch_total_tokens
            .saturating_sub(batch.max_tokens),
        chunking: false,
    };
    if let Some((mut new_entries, new_batch)) = queue.next_batch(&limits) {
        let reason = if min_size.is_some() {
            "backpressure"
        } else {
            "wait_exceeded"
        };
        metrics::counter!("tgi_batch_concat", "reason" => reason).increment(1);
        if let Some(new_cached) =
            prefill(client, new_batch, None, &mut new_entries, healthy, queue).await
        {
            batches.push(new_cached);
        }
        entries.extend(new_entries);
        waiting_tokens = 1;
    }
    let next = decode(client, batches, entries, healthy, queue).await;
    (next, waiting_tokens + 1)
}

async fn prefill(
    client: &ShardedClient,
    batch: pb::Batch,
    running: Option<pb::CachedBatch>,
    entries: &mut Entries,
    healthy: &AtomicBool,
    queue: &Queue,
) -> Option<pb::CachedBatch> {
    let mut batch_ids = vec![batch.id];
    batch_ids.extend(running.as_ref().map(|b| b.id));
    let ids = batch.requests.iter().map(|r| r.id);
    let running_ids = running.iter().flat_map(|b| b.request_ids.iter().copied());
    let span = step_span("prefill", ids.chain(running_ids), entries);
    let start = Instant::now();
    let result = client.prefill(batch, running).instrument(span).await;
    let step = Step {
        method: "prefill",
        start,
        batch_ids,
    };
    after_step(client, step, result, entries, healthy, queue).await
}

async fn decode(
    client: &ShardedClient,
    batches: Vec<pb::CachedBatch>,
    entries: &mut Entries,
    healthy: &AtomicBool,
    queue: &Queue,
) -> Option<pb::CachedBatch> {
    let ids = batches.iter().map(|b| b.id).collect();
    let requests = batches.iter().flat_map(|b| b.request_ids.iter().copied());
    let span = step_span("decode", requests, entries);
    let start = Instant::now();
    let result = client.decode(batches).instrument(span).await;
    let step = Step {
        method: "decode",
        start,
        batch_ids: ids,
    };
    after_step(client, step, result, entries, healthy, queue).await
}

/// The span of one shard call. It is a child of the first request in the step, so a request's
/// trace shows the steps it leads (all of them, for a request alone); every other request in
/// the step is linked to it (OpenTelemetry links), as one span cannot have several parents.
fn step_span(method: &'static str, ids: impl Iterator<Item = u64>, entries: &Entries) -> Span {
    let mut spans = ids.filter_map(|id| entries.get(&id).map(|e| &e.span));
    let first = spans.next();
    let span = tracing::info_span!(parent: first.and_then(Span::id), "batch", otel.name = method, batch_size = tracing::field::Empty);
    let mut size = usize::from(first.is_some());
    for other in spans {
        span.follows_from(other);
        size += 1;
    }
    span.record("batch_size", size);
    span
}

/// Which call a result belongs to.
struct Step {
    method: &'static str,
    start: Instant,
    batch_ids: Vec<u64>,
}

/// Delivers a step's tokens, then shrinks the shards' batch to the requests still wanted.
async fn after_step(
    client: &ShardedClient,
    Step {
        method,
        start,
        batch_ids,
    }: Step,
    result: crate::client::Result<StepResult>,
    entries: &mut Entries,
    healthy: &AtomicBool,
    queue: &Queue,
) -> Option<pb::CachedBatch> {
    metrics::counter!("tgi_batch_inference_count", "method" => method).increment(1);
    let step = match result {
        Ok(step) => step,
        Err(e) => {
            metrics::counter!("tgi_batch_inference_failure", "method" => method).increment(1);
            tracing::error!("shard step failed: {e}");
            healthy.store(false, Ordering::SeqCst);
            for id in batch_ids {
                let _ = client.clear_cache(Some(id)).await;
            }
            fail_all(entries, &e.to_string());
            // The shard may have restarted with a fresh pool: cached prefixes are gone.
            queue.block_allocator().invalidate_cache();
            return None;
        }
    };
    metrics::counter!("tgi_batch_inference_success", "method" => method).increment(1);
    metrics::histogram!("tgi_batch_forward_duration", "method" => method)
        .record(step.forward_ns as f64 / 1e9);
    metrics::histogram!("tgi_batch_decode_duration", "method" => method)
        .record(step.decode_ns as f64 / 1e9);
    if let Some(ns) = step.concat_ns {
        metrics::histogram!("tgi_batch_concat_duration", "method" => method)
            .record(ns as f64 / 1e9);
    }
    let filter_start = Instant::now();
    healthy.store(true, Ordering::SeqCst);
    tracing::trace!(
        forward_ns = step.forward_ns,
        generations = step.generations.len(),
        "step"
    );
    for generation in step.generations {
        let id = generation.request_id;
        let keep = match entries.get_mut(&id) {
            Some(entry) => {
                // A token means the whole prompt's K/V is in the pool.
                if let Some(blocks) = &entry.blocks {
                    blocks.mark_prefilled();
                }
                send_generation(entry, generation)
            }
            None => true,
        };
        if !keep {
            entries.remove(&id);
        }
    }
    let batch = filter(client, step.batch, entries, healthy, queue).await;
    metrics::histogram!("tgi_batch_filter_duration", "method" => method)
        .record(filter_start.elapsed().as_secs_f64());
    metrics::histogram!("tgi_batch_inference_duration", "method" => method)
        .record(start.elapsed().as_secs_f64());
    batch
}

/// Shrinks the shards' batch to the requests still wanted (all gone: the batch is dropped).
async fn filter(
    client: &ShardedClient,
    batch: Option<pb::CachedBatch>,
    entries: &mut Entries,
    healthy: &AtomicBool,
    queue: &Queue,
) -> Option<pb::CachedBatch> {
    let batch = batch?;
    let kept: Vec<u64> = batch
        .request_ids
        .iter()
        .copied()
        .filter(|id| entries.contains_key(id))
        .collect();
    if kept.is_empty() {
        let _ = client.clear_cache(Some(batch.id)).await;
        return None;
    }
    if kept.len() == batch.request_ids.len() {
        return Some(batch);
    }
    match client.filter_batch(batch.id, kept).await {
        Ok(filtered) => filtered,
        Err(e) => {
            tracing::error!("FilterBatch failed: {e}");
            healthy.store(false, Ordering::SeqCst);
            fail_all(entries, &e.to_string());
            queue.block_allocator().invalidate_cache();
            None
        }
    }
}

/// Fails every request of a lost batch with TGI's generation error (HTTP 424).
fn fail_all(entries: &mut Entries, message: &str) {
    for (id, entry) in entries.drain() {
        let e = InferError::GenerationError(message.to_string());
        e.record();
        entry.span.in_scope(|| {
            tracing::warn!(request_id = id, error = message, "request failed");
        });
        let _ = entry.response_tx.send(Err(e));
    }
}

/// The metrics and the one log line of a finished request.
fn record_success(id: u64, entry: &Entry, generated_tokens: u32, finish_reason: FinishReason) {
    let now = Instant::now();
    let batched = entry.batched.unwrap_or(now);
    let total = now.saturating_duration_since(entry.request.received);
    let queue = batched.saturating_duration_since(entry.queued);
    let inference = now.saturating_duration_since(batched);
    let per_token = inference / generated_tokens.max(1);
    metrics::counter!("tgi_request_success").increment(1);
    metrics::histogram!("tgi_request_duration").record(total.as_secs_f64());
    metrics::histogram!("tgi_request_queue_duration").record(queue.as_secs_f64());
    metrics::histogram!("tgi_request_inference_duration").record(inference.as_secs_f64());
    metrics::histogram!("tgi_request_mean_time_per_token_duration").record(per_token.as_secs_f64());
    metrics::histogram!("tgi_request_generated_tokens").record(generated_tokens as f64);
    entry.span.record("generated_tokens", generated_tokens);
    entry.span.record("finish_reason", finish_reason.as_str());
    entry.span.in_scope(|| {
        tracing::info!(
            request_id = id,
            input_tokens = entry.request.input_length,
            generated_tokens,
            finish_reason = finish_reason.as_str(),
            total_ms = total.as_secs_f64() * 1e3,
            queue_ms = queue.as_secs_f64() * 1e3,
            inference_ms = inference.as_secs_f64() * 1e3,
            time_per_token_ms = per_token.as_secs_f64() * 1e3,
            "request finished"
        );
    });
}

fn tokens(t: &pb::Tokens) -> Vec<Token> {
    (0..t.ids.len())
        .map(|i| Token {
            id: t.ids[i],
            text: t.texts.get(i).cloned().unwrap_or_default(),
            logprob: t.logprobs.get(i).copied().unwrap_or(f32::NAN),
            special: t.is_special.get(i).copied().unwrap_or(false),
        })
        .collect()
}

fn finish_reason(done: &pb::GeneratedText) -> FinishReason {
    match pb::FinishReason::try_from(done.finish_reason) {
        Ok(pb::FinishReason::EosToken) => FinishReason::EosToken,
        Ok(pb::FinishReason::StopSequence) => FinishReason::StopSequence,
        _ => FinishReason::Length,
    }
}

/// The client went away: the request leaves the batch.
fn dropped(id: u64, entry: &Entry) -> bool {
    metrics::counter!("tgi_request_failure", "err" => "dropped").increment(1);
    entry
        .span
        .in_scope(|| tracing::info!(request_id = id, "request cancelled by the client"));
    false
}

/// Sends one generation to its client; false when the request is done (finished or the client
/// disconnected) and should leave the batch.
fn send_generation(entry: &mut Entry, g: pb::Generation) -> bool {
    let id = g.request_id;
    if let Some(p) = &g.prefill_tokens {
        let prefill = tokens(p)
            .into_iter()
            .map(|t| PrefillToken {
                id: t.id,
                text: t.text,
                logprob: t.logprob,
            })
            .collect();
        if entry
            .response_tx
            .send(Ok(InferEvent::Prefill(prefill)))
            .is_err()
        {
            return dropped(id, entry);
        }
    }
    let new = g.tokens.as_ref().map(tokens).unwrap_or_default();
    // Tokens beyond one per step would come from speculation, which Tessera does not do.
    metrics::histogram!("tgi_request_skipped_tokens").record(new.len().saturating_sub(1) as f64);
    let top: Vec<Vec<Token>> = g.top_tokens.iter().map(tokens).collect();
    let n = new.len();
    let now = Instant::now();
    for (i, token) in new.into_iter().enumerate() {
        let top_tokens = top.get(i).cloned().unwrap_or_default();
        let event = match (&g.generated_text, i + 1 == n) {
            (Some(done), true) => InferEvent::End {
                token,
                top_tokens,
                generated_text: GeneratedText {
                    text: done.text.clone(),
                    generated_tokens: done.generated_tokens,
                    finish_reason: finish_reason(done),
                    seed: done.seed,
                },
                queued: entry.queued,
                start: entry.batched.unwrap_or(now),
            },
            _ => InferEvent::Token { token, top_tokens },
        };
        if entry.response_tx.send(Ok(event)).is_err() {
            return dropped(id, entry);
        }
        crate::metrics::record_token(entry, now);
    }
    if let Some(done) = &g.generated_text {
        record_success(id, entry, done.generated_tokens, finish_reason(done));
    }
    g.generated_text.is_none()
}
