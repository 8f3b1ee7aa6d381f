//! Warmup: prove the largest prefill the router will send fits, then size the KV budget.
//!
//! On CPU the budget is a fraction of the memory the kernel reports as available after the
//! model is loaded and the warmup prefill has run; on CUDA the same fraction applies to the
//! device memory (read the same way until the paged pool lands). The number of tokens that fit
//! becomes `max_supported_total_tokens`, which the router uses as its batch token budget.

use tessera_proto as pb;

use crate::error::{Result, ShardError};
use crate::runner::Runner;

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn warmup(
    runner: &mut Runner,
    req: &pb::WarmupRequest,
    memory_fraction: f64,
) -> Result<pb::WarmupResponse> {
    if let Some(batch) = &req.batch {
        let tokens: usize = batch.requests.iter().map(|r| r.truncate as usize).sum();
        let result = runner.prefill(batch, None);
        runner.clear(Some(batch.id));
        if let Err(e) = result {
            return Err(ShardError::OutOfMemory(format!(
                "warmup prefill of {tokens} tokens failed ({e}). You need to decrease `--max-batch-prefill-tokens`"
            )));
        }
    }
    let per_token = runner.model.kv_layout().bytes_per_token() as u64;
    let available = available_memory().unwrap_or(0);
    let budget = (available as f64 * memory_fraction) as u64;
    let supported = (budget / per_token).min(u32::MAX as u64) as u32;
    let positions = runner.model.config.max_position_embeddings as u32;
    let max_total = req
        .max_total_tokens
        .unwrap_or_else(|| supported.min(positions));
    if max_total > supported {
        return Err(ShardError::OutOfMemory(format!(
            "not enough memory to handle `max_total_tokens={max_total}`: the KV cache budget holds {supported} tokens \
             ({} MiB at {per_token} bytes per token). Lower `--max-total-tokens` or raise the memory fraction",
            budget >> 20
        )));
    }
    if max_total > positions {
        return Err(ShardError::Request(format!(
            "`max_total_tokens={max_total}` exceeds the model's max_position_embeddings ({positions}). Lower `--max-total-tokens`"
        )));
    }
    let max_input = req.max_input_tokens.unwrap_or(max_total.saturating_sub(1));
    Ok(pb::WarmupResponse {
        max_supported_total_tokens: Some(supported),
        max_input_tokens: max_input,
        max_total_tokens: max_total,
    })
}
