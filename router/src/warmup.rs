//! Startup handshake with the shards: clear stale state, read their facts, and warm them up
//! with the largest prefill the router will ever send, which also tells us the token limits.

use tessera_proto as pb;

use crate::client::ShardedClient;

/// The limits the router runs with, settled between flags and the shards' warmup answer.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_input_tokens: usize,
    pub max_total_tokens: usize,
    pub max_batch_prefill_tokens: u32,
    pub max_batch_total_tokens: u32,
}

pub struct Requested {
    /// The shards continue long prompts across steps, so one prompt need not fit one prefill.
    pub chunking: bool,
    pub max_input_tokens: Option<usize>,
    pub max_total_tokens: Option<usize>,
    pub max_batch_prefill_tokens: u32,
    pub max_batch_total_tokens: Option<u32>,
}

/// One prompt of exactly `tokens` tokens under any byte-level tokenizer is hard to write, so
/// the warmup prompt is long and `truncate` cuts it to size (the shard keeps the last tokens).
fn warmup_batch(tokens: u32) -> pb::Batch {
    let request = pb::Request {
        id: 0,
        inputs: "_test ".repeat(tokens as usize),
        truncate: tokens,
        parameters: Some(pb::NextTokenChooserParameters {
            temperature: 0.9,
            top_k: 10,
            top_p: 0.9,
            typical_p: 0.9,
            do_sample: false,
            seed: 0,
            repetition_penalty: 1.2,
            frequency_penalty: 0.1,
            ..Default::default()
        }),
        stopping_parameters: Some(pb::StoppingCriteriaParameters {
            max_new_tokens: 2,
            stop_sequences: vec![],
            ignore_eos_token: true,
        }),
        // Prompt logprobs would add a vocab-sized logits row per prompt token; like TGI's flash
        // models we only compute them for requests that ask (decoder_input_details).
        prefill_logprobs: false,
        top_n_tokens: 5,
        add_special_tokens: true,
        ..Default::default()
    };
    pb::Batch {
        id: 0,
        size: 1,
        max_tokens: tokens + 2,
        requests: vec![request],
        max_blocks: 0,
    }
}

pub async fn warmup(
    client: &ShardedClient,
    req: &Requested,
    max_position_embeddings: usize,
) -> anyhow::Result<Limits> {
    client.clear_cache(None).await?;
    let tokens = req
        .max_input_tokens
        .map(|m| m as u32)
        .unwrap_or(req.max_batch_prefill_tokens)
        .min(req.max_batch_prefill_tokens)
        .min(max_position_embeddings.saturating_sub(2) as u32)
        .max(1);
    let resp = client
        .warmup(pb::WarmupRequest {
            batch: Some(warmup_batch(tokens)),
            max_input_tokens: req.max_input_tokens.map(|m| m as u32),
            max_prefill_tokens: req.max_batch_prefill_tokens,
            max_total_tokens: req.max_total_tokens.map(|m| m as u32),
        })
        .await
        .map_err(|e| anyhow::anyhow!("Unable to warmup the model shards: {e}"))?;
    let max_total_tokens = resp.max_total_tokens as usize;
    // Without chunked prefill a prompt must fit in one prefill: cap the default accordingly.
    let max_input_tokens = match req.max_input_tokens {
        Some(m) => m,
        None if req.chunking => resp.max_input_tokens as usize,
        None => (resp.max_input_tokens as usize).min(req.max_batch_prefill_tokens as usize),
    };
    if max_input_tokens >= max_total_tokens {
        anyhow::bail!("`max_input_tokens` must be < `max_total_tokens`. Given: {max_input_tokens} and {max_total_tokens}");
    }
    if !req.chunking && (req.max_batch_prefill_tokens as usize) < max_input_tokens {
        anyhow::bail!(
            "`max_batch_prefill_tokens` must be >= `max_input_tokens`. Given: {} and {max_input_tokens}",
            req.max_batch_prefill_tokens
        );
    }
    let supported = resp.max_supported_total_tokens;
    let max_batch_total_tokens = match (supported, req.max_batch_total_tokens) {
        (Some(s), Some(user)) => user.min(s),
        (Some(s), None) => s,
        (None, Some(user)) => user,
        (None, None) => 16000u32
            .max(max_total_tokens as u32)
            .max(req.max_batch_prefill_tokens),
    };
    if max_total_tokens as u32 > max_batch_total_tokens {
        anyhow::bail!("`max_total_tokens` must be <= `max_batch_total_tokens`. Given: {max_total_tokens} and {max_batch_total_tokens}");
    }
    Ok(Limits {
        max_input_tokens,
        max_total_tokens,
        max_batch_prefill_tokens: req.max_batch_prefill_tokens,
        max_batch_total_tokens,
    })
}
