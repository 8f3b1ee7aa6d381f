//! Warmup: prove the largest prefill the router will send fits, then size the KV pool.
//!
//! The warmup batch runs in a scratch pool just large enough for it (the router has no blocks
//! to give before it knows how many exist). Then the real pool is sized from a memory budget:
//! a fraction of what the kernel reports as available on CPU, of the free device memory on
//! CUDA. On CPU the pool is reserved, not touched, so pages are only committed as blocks are
//! used. `max_supported_total_tokens` is the pool's token capacity, minus block 0, which the
//! router keeps for health checks.

use tch::Device;
use tessera_proto as pb;

use crate::admission::{slots_needed, tokenize};
use crate::error::{Result, ShardError};
use crate::runner::{Runner, BLOCK_SIZE};

/// Memory this process may still use, in bytes: `MemAvailable` from /proc/meminfo, capped by
/// the cgroup's limit (a container's or a Kubernetes pod's), where one is set. Inside a
/// container /proc/meminfo describes the whole host, so the cap is what keeps a pool sized
/// from it clear of the OOM killer.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let host = mem_available(&meminfo)?;
    Some(match cgroup_headroom() {
        Some(room) => host.min(room),
        None => host,
    })
}

fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Limit minus usage of this process's memory cgroup (v2, then v1); `None` when unlimited.
fn cgroup_headroom() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let (limit, usage) = match read("/sys/fs/cgroup/memory.max") {
        Some(limit) => (limit, read("/sys/fs/cgroup/memory.current")?),
        None => (
            read("/sys/fs/cgroup/memory/memory.limit_in_bytes")?,
            read("/sys/fs/cgroup/memory/memory.usage_in_bytes")?,
        ),
    };
    headroom(&limit, &usage)
}

fn headroom(limit: &str, usage: &str) -> Option<u64> {
    // v2 writes "max" when unlimited; v1 writes a huge page-aligned number.
    let limit: u64 = limit.trim().parse().ok()?;
    if limit >= 1 << 60 {
        return None;
    }
    let usage: u64 = usage.trim().parse().ok()?;
    Some(limit.saturating_sub(usage))
}

/// Free memory of CUDA device `index`, from the CUDA runtime libtorch already loaded.
pub fn cuda_free_memory(index: usize) -> Option<u64> {
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
    type SetDevice = unsafe extern "C" fn(i32) -> i32;
    // SAFETY: dlsym on the global namespace only looks symbols up; each is called with its
    // documented C signature, and the pointers passed are valid locals.
    unsafe {
        let get = libc::dlsym(libc::RTLD_DEFAULT, c"cudaMemGetInfo".as_ptr());
        let set = libc::dlsym(libc::RTLD_DEFAULT, c"cudaSetDevice".as_ptr());
        if get.is_null() || set.is_null() {
            return None;
        }
        let set: SetDevice = std::mem::transmute(set);
        let get: MemGetInfo = std::mem::transmute(get);
        let (mut free, mut total) = (0usize, 0usize);
        if set(index as i32) != 0 || get(&mut free, &mut total) != 0 {
            return None;
        }
        Some(free as u64)
    }
}

/// Runs the warmup batch in a scratch pool, assigning blocks to requests that have none.
fn warm_prefill(runner: &mut Runner, batch: &pb::Batch) -> Result<()> {
    let mut batch = batch.clone();
    let mut next_block = 1u32;
    for r in &mut batch.requests {
        if r.blocks.is_empty() {
            let prompt = tokenize(&runner.tokenizer, r)?.len();
            let max_new = r
                .stopping_parameters
                .as_ref()
                .map_or(1, |s| s.max_new_tokens as usize);
            let blocks = slots_needed(prompt, max_new.max(1)).div_ceil(BLOCK_SIZE) as u32;
            r.blocks = (next_block..next_block + blocks).collect();
            r.slots.clear();
            next_block += blocks;
        }
    }
    let needed = batch
        .requests
        .iter()
        .flat_map(|r| r.blocks.iter())
        .max()
        .map_or(1, |&b| b as usize + 1);
    runner.allocate_pool(needed)?;
    let mut step = runner.prefill(&batch, None);
    if let Ok(out) = &step {
        if let Some(cached) = out.batch.clone() {
            step = runner.decode(&[cached]);
        }
    }
    runner.free_pool();
    step.map(|_| ())
}

pub fn warmup(
    runner: &mut Runner,
    req: &pb::WarmupRequest,
    memory_fraction: f64,
) -> Result<pb::WarmupResponse> {
    runner.set_max_prefill_tokens(req.max_prefill_tokens as usize);
    if let Some(batch) = &req.batch {
        let tokens: usize = batch.requests.iter().map(|r| r.truncate as usize).sum();
        if let Err(e) = warm_prefill(runner, batch) {
            return Err(ShardError::OutOfMemory(format!(
                "Not enough memory to handle {tokens} prefill tokens ({e}). You need to decrease `--max-batch-prefill-tokens`"
            )));
        }
    }
    let per_token = runner.model.kv_layout().bytes_per_token() as u64;
    let available = match runner.model.device() {
        Device::Cuda(i) => cuda_free_memory(i),
        _ => available_memory(),
    }
    .unwrap_or(0);
    let mut budget = (available as f64 * memory_fraction) as u64;
    let parallel = runner.model.parallel.as_ref();
    if let (Some(p), Device::Cpu) = (parallel, runner.model.device()) {
        // CPU ranks share one host's memory; each sees all of it as available.
        budget /= p.world as u64;
    }
    let mut num_blocks =
        (budget / per_token / BLOCK_SIZE as u64).min((u32::MAX / 2) as u64 / BLOCK_SIZE as u64);
    if let Some(p) = parallel {
        // The router sizes its block table from rank 0's answer: every rank needs that many.
        num_blocks = p.min(num_blocks as i64).max(0) as u64;
    }
    if num_blocks < 2 {
        return Err(ShardError::OutOfMemory(format!(
            "the KV cache budget ({} MiB) holds no blocks of {BLOCK_SIZE} tokens at {per_token} bytes per token. \
             Raise `--cuda-memory-fraction`/MEMORY_FRACTION or free memory",
            budget >> 20
        )));
    }
    runner.allocate_pool(num_blocks as usize).map_err(|e| {
        ShardError::OutOfMemory(format!(
            "cannot allocate a KV cache of {num_blocks} blocks ({e}). Lower MEMORY_FRACTION"
        ))
    })?;
    let supported = ((num_blocks - 1) * BLOCK_SIZE as u64) as u32;
    let positions = runner.model.config.max_position_embeddings as u32;
    let max_total = req
        .max_total_tokens
        .unwrap_or_else(|| supported.min(positions));
    if max_total > supported {
        return Err(ShardError::OutOfMemory(format!(
            "Not enough memory to handle `max_total_tokens={max_total}`: the KV cache holds {supported} tokens \
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

/// Where a shard records its pool geometry, next to its socket: a shard the launcher restarts
/// after a crash rebuilds the same pool without a new Warmup, because the router's block
/// allocator still hands out blocks of the old one.
pub fn pool_record_path(uds_path: &str, rank: usize) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("{uds_path}-{rank}.pool"))
}

pub fn save_pool_record(path: &std::path::Path, runner: &Runner, max_prefill_tokens: u32) {
    if let Some(pool) = runner.pool() {
        let record = serde_json::json!({
            "num_blocks": pool.num_blocks(),
            "max_prefill_tokens": max_prefill_tokens,
        });
        if let Err(e) = std::fs::write(path, record.to_string()) {
            tracing::warn!("cannot record the KV pool in {}: {e}", path.display());
        }
    }
}

/// Rebuilds the pool a previous incarnation of this shard recorded, if any.
pub fn restore_pool(path: &std::path::Path, runner: &mut Runner) -> Result<bool> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(false);
    };
    let record: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ShardError::Config(format!("{}: {e}", path.display())))?;
    let blocks = record["num_blocks"].as_u64().unwrap_or(0) as usize;
    if blocks == 0 {
        return Ok(false);
    }
    runner.set_max_prefill_tokens(record["max_prefill_tokens"].as_u64().unwrap_or(4096) as usize);
    runner.allocate_pool(blocks)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_budget_respects_the_cgroup_limit() {
        let meminfo = "MemTotal: 24000000 kB\nMemAvailable: 20000000 kB\n";
        assert_eq!(mem_available(meminfo), Some(20_000_000 * 1024));
        assert_eq!(headroom("max\n", "123\n"), None);
        assert_eq!(headroom("9223372036854771712\n", "5\n"), None); // v1 "unlimited"
        assert_eq!(headroom("8589934592\n", "1073741824\n"), Some(7 << 30));
        assert_eq!(headroom("100\n", "200\n"), Some(0));
    }
}
