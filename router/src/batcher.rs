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

use crate::client::{ShardedClient, StepResult};
use crate::error::InferError;
use crate::infer::{GeneratedText, InferEvent};
use crate::queue::{BatchLimits, Entry, Queue};
use crate::server::types::{FinishReason, PrefillToken, Token};

#[derive(Debug, Clone)]
pub struct BatchingConfig {
    pub max_batch_prefill_tokens: u32,
    pub max_batch_total_tokens: u32,
    pub max_batch_size: Option<usize>,
    pub max_waiting_tokens: usize,
    pub waiting_served_ratio: f32,
}

type Entries = HashMap<u64, Entry>;

pub async fn batching_task(client: ShardedClient, queue: Queue, config: BatchingConfig, healthy: Arc<AtomicBool>) {
    loop {
        queue.wait().await;
        let first = BatchLimits {
            min_size: None,
            max_size: config.max_batch_size,
            prefill_token_budget: config.max_batch_prefill_tokens,
            token_budget: config.max_batch_total_tokens,
        };
        while let Some((mut entries, batch)) = queue.next_batch(&first) {
            let mut running = prefill(&client, batch, &mut entries, &healthy).await;
            let mut waiting_tokens = 1;
            while let Some(batch) = running {
                let mut batches = vec![batch.clone()];
                let min_size = if waiting_tokens >= config.max_waiting_tokens {
                    None
                } else {
                    Some(((batch.size as f32) * config.waiting_served_ratio).floor() as usize)
                };
                let limits = BatchLimits {
                    min_size,
                    max_size: config.max_batch_size.map(|m| m.saturating_sub(batch.size as usize)),
                    prefill_token_budget: config.max_batch_prefill_tokens,
                    token_budget: config.max_batch_total_tokens.saturating_sub(batch.max_tokens),
                };
                if let Some((mut new_entries, new_batch)) = queue.next_batch(&limits) {
                    if let Some(new_cached) = prefill(&client, new_batch, &mut new_entries, &healthy).await {
                        batches.push(new_cached);
                    }
                    entries.extend(new_entries);
                    waiting_tokens = 1;
                }
                running = decode(&client, batches, &mut entries, &healthy).await;
                waiting_tokens += 1;
            }
        }
    }
}

async fn prefill(client: &ShardedClient, batch: pb::Batch, entries: &mut Entries, healthy: &AtomicBool) -> Option<pb::CachedBatch> {
    let id = batch.id;
    let result = client.prefill(batch, None).await;
    after_step(client, result, vec![id], entries, healthy).await
}

async fn decode(client: &ShardedClient, batches: Vec<pb::CachedBatch>, entries: &mut Entries, healthy: &AtomicBool) -> Option<pb::CachedBatch> {
    let ids = batches.iter().map(|b| b.id).collect();
    let result = client.decode(batches).await;
    after_step(client, result, ids, entries, healthy).await
}

/// Delivers a step's tokens, then shrinks the shards' batch to the requests still wanted.
async fn after_step(
    client: &ShardedClient,
    result: crate::client::Result<StepResult>,
    batch_ids: Vec<u64>,
    entries: &mut Entries,
    healthy: &AtomicBool,
) -> Option<pb::CachedBatch> {
    let step = match result {
        Ok(step) => step,
        Err(e) => {
            tracing::error!("shard step failed: {e}");
            healthy.store(false, Ordering::SeqCst);
            for id in batch_ids {
                let _ = client.clear_cache(Some(id)).await;
            }
            for (_, entry) in entries.drain() {
                let _ = entry.response_tx.send(Err(InferError::GenerationError(e.to_string())));
            }
            return None;
        }
    };
    healthy.store(true, Ordering::SeqCst);
    tracing::trace!(forward_ns = step.forward_ns, generations = step.generations.len(), "step");
    for generation in step.generations {
        let id = generation.request_id;
        let keep = match entries.get(&id) {
            Some(entry) => send_generation(entry, generation),
            None => true,
        };
        if !keep {
            entries.remove(&id);
        }
    }
    let batch = step.batch?;
    let kept: Vec<u64> = batch.request_ids.iter().copied().filter(|id| entries.contains_key(id)).collect();
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
            for (_, entry) in entries.drain() {
                let _ = entry.response_tx.send(Err(InferError::GenerationError(e.to_string())));
            }
            None
        }
    }
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

/// Sends one generation to its client; false when the request is done (finished or the client
/// disconnected) and should leave the batch.
fn send_generation(entry: &Entry, g: pb::Generation) -> bool {
    let tx = &entry.response_tx;
    if let Some(p) = &g.prefill_tokens {
        let prefill = tokens(p).into_iter().map(|t| PrefillToken { id: t.id, text: t.text, logprob: t.logprob }).collect();
        if tx.send(Ok(InferEvent::Prefill(prefill))).is_err() {
            return false;
        }
    }
    let new = g.tokens.as_ref().map(tokens).unwrap_or_default();
    let top: Vec<Vec<Token>> = g.top_tokens.iter().map(tokens).collect();
    let n = new.len();
    for (i, token) in new.into_iter().enumerate() {
        let top_tokens = top.get(i).cloned().unwrap_or_default();
        let event = match (&g.generated_text, i + 1 == n) {
            (Some(done), true) => InferEvent::End {
                token,
                top_tokens,
                generated_text: GeneratedText {
                    text: done.text.clone(),
                    generated_tokens: done.generated_tokens,
                    finish_reason: match pb::FinishReason::try_from(done.finish_reason) {
                        Ok(pb::FinishReason::EosToken) => FinishReason::EosToken,
                        Ok(pb::FinishReason::StopSequence) => FinishReason::StopSequence,
                        _ => FinishReason::Length,
                    },
                    seed: done.seed,
                },
                queued: entry.queued,
                start: entry.batched.unwrap_or_else(Instant::now),
            },
            _ => InferEvent::Token { token, top_tokens },
        };
        if tx.send(Ok(event)).is_err() {
            return false;
        }
    }
    g.generated_text.is_none()
}
