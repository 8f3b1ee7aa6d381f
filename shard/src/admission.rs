//! Turning a protocol `Request` into a `Sequence`: tokenization, truncation, and the checks
//! that keep a bad request from corrupting someone else's KV blocks.
//!
//! The router decides which blocks a request uses and how much of its prompt is already
//! cached; the shard trusts those decisions only after checking that they are consistent (every
//! block exists, the blocks cover prompt plus budget, the slots agree with the block table, at
//! least one prompt token is left to compute). A request that fails gets an INVALID_ARGUMENT
//! naming it, never a panic or a silent overwrite.

use tessera_proto as pb;
use tokenizers::Tokenizer;

use crate::detokenizer::{IncrementalDecoder, StoppingCriteria};
use crate::error::{Result, ShardError};
use crate::grammar::Grammars;
use crate::kv_cache::KvPool;
use crate::sampler::{Sampler, SamplingParams};
use crate::sequence::Sequence;

fn prompt_text(r: &pb::Request) -> Result<String> {
    match &r.input_chunks {
        Some(input) if !input.chunks.is_empty() => {
            let mut text = String::new();
            for chunk in &input.chunks {
                match &chunk.chunk {
                    Some(pb::input_chunk::Chunk::Text(t)) => text.push_str(t),
                    Some(pb::input_chunk::Chunk::Image(_)) => {
                        return Err(ShardError::Request(
                            "this model does not take image inputs".into(),
                        ))
                    }
                    None => {}
                }
            }
            Ok(text)
        }
        _ => Ok(r.inputs.clone()),
    }
}

pub fn tokenize(tokenizer: &Tokenizer, r: &pb::Request) -> Result<Vec<u32>> {
    let text = prompt_text(r)?;
    let enc = tokenizer
        .encode(text.as_str(), r.add_special_tokens)
        .map_err(|e| ShardError::Tokenizer(e.to_string()))?;
    let mut ids = enc.get_ids().to_vec();
    let truncate = r.truncate as usize;
    if truncate > 0 && ids.len() > truncate {
        ids.drain(..ids.len() - truncate);
    }
    Ok(ids)
}

/// Slot ids a request may write: prompt plus budget, minus the last generated token (which
/// is returned but never fed back).
pub fn slots_needed(prompt_len: usize, max_new_tokens: usize) -> usize {
    (prompt_len + max_new_tokens)
        .saturating_sub(1)
        .max(prompt_len)
}

pub fn sampling_params(p: &pb::NextTokenChooserParameters) -> SamplingParams {
    SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        typical_p: p.typical_p,
        do_sample: p.do_sample,
        seed: p.seed,
        repetition_penalty: p.repetition_penalty,
        frequency_penalty: p.frequency_penalty,
        presence_penalty: p.presence_penalty,
        watermark: p.watermark,
    }
}

pub fn new_sequence(
    tokenizer: &Tokenizer,
    grammars: &Grammars,
    pool: &KvPool,
    max_positions: usize,
    r: &pb::Request,
) -> Result<Sequence> {
    let bad = |msg: String| ShardError::Request(format!("request {}: {msg}", r.id));
    let ids = tokenize(tokenizer, r)?;
    if ids.is_empty() {
        return Err(bad("the prompt is empty after tokenization".into()));
    }
    let prompt_len = ids.len();
    let stop = r.stopping_parameters.clone().unwrap_or_default();
    let max_new = (stop.max_new_tokens as usize).max(1);
    if prompt_len + max_new > max_positions {
        return Err(bad(format!(
            "{prompt_len} prompt tokens + {max_new} new tokens exceed the model's {max_positions} positions"
        )));
    }
    let mut cached = r.cache_len as usize;
    if cached >= prompt_len {
        return Err(bad(format!(
            "cache_len {cached} leaves none of the {prompt_len} prompt tokens to compute"
        )));
    }
    if r.blocks.is_empty() {
        return Err(bad(
            "no KV blocks were allocated to it (the router must send `blocks`)".into(),
        ));
    }
    pool.check_blocks(&r.blocks)
        .map_err(|e| bad(e.to_string()))?;
    let prefix_blocks = cached.div_ceil(pool.block_size()).min(r.blocks.len());
    if cached > 0 && !pool.all_written(&r.blocks[..prefix_blocks]) {
        // The router believes these blocks hold this prefix, but this pool never wrote them
        // (the shard restarted): compute the whole prompt instead of reading garbage.
        tracing::warn!(
            "request {}: cached prefix blocks were never written by this shard; recomputing {cached} tokens",
            r.id
        );
        cached = 0;
    }
    let slots = pool
        .context_slots(&r.blocks, slots_needed(prompt_len, max_new))
        .map_err(|e| bad(e.to_string()))?;
    if let Some(i) = r
        .slots
        .iter()
        .zip(&slots)
        .position(|(&given, &derived)| given as i64 != derived)
    {
        return Err(bad(format!(
            "slot {} of position {i} does not match its block table (expected {})",
            r.slots[i], slots[i]
        )));
    }
    let remaining = prompt_len - cached;
    let chunk = match r.chunk_len {
        Some(0) => return Err(bad("chunk_len must be at least 1".into())),
        Some(c) => (c as usize).min(remaining),
        None => remaining,
    };
    let parameters = r.parameters.clone().unwrap_or_default();
    let constraint = grammars
        .constraint(&parameters)
        .map_err(|e| bad(e.to_string()))?;
    let params = sampling_params(&parameters);
    Ok(Sequence {
        id: r.id,
        prompt_len,
        max_new_tokens: max_new,
        decoder: IncrementalDecoder::new(prompt_len),
        tokens: ids,
        sampler: Sampler::new(params),
        constraint,
        stopping: StoppingCriteria::new(max_new, stop.stop_sequences, stop.ignore_eos_token),
        top_n_tokens: r.top_n_tokens as usize,
        prefill_logprobs: r.prefill_logprobs,
        prompt_logprobs: vec![f32::NAN; cached + 1],
        slots,
        cached,
        chunk,
        finished: None,
    })
}
