//! KV block ownership: which request holds which blocks of the shards' paged KV pool, and
//! which blocks stay cached for prompts that share a prefix.
//!
//! The router owns this policy (as in TGI v3); the shards own only the memory. A request gets
//! every block it may need when it is batched (prompt plus `max_new_tokens`, minus the last
//! token, which is returned but never written): reserving up front means a running batch can
//! never run out of blocks mid-generation, so nothing is ever preempted or recomputed, at the
//! price of holding blocks for tokens a request may stop before using. `max_total_tokens`
//! bounds that waste per request. (Growing allocations step by step would admit more
//! requests, but a batch could then run dry mid-generation and need preemption; reserving is
//! the simpler contract, and TGI v3 makes the same choice.)
//!
//! With prefix caching, the first blocks may come from the `PrefixCache`: shared, read-only
//! blocks holding an earlier request's K/V for the same leading tokens. When a request ends
//! after a successful prefill, its whole prompt blocks join the cache instead of the free list;
//! the cache gives blocks back, least recently used first, when the free list runs dry.
//!
//! Freeing is tied to ownership: a `BlockAllocation` returns its blocks when dropped, so a
//! request that finishes, fails or is cancelled frees them exactly once, wherever it ends.
//! Block 0 is never handed out; it is the shards' padding block. The free list is a stack, so
//! recently used (already resident) blocks are reused first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::radix::{Match, PrefixCache};

struct Pool {
    free: Vec<u32>,
    block_size: u32,
    cache: Option<PrefixCache>,
}

impl Pool {
    fn publish(&self) {
        metrics::gauge!("tessera_kv_free_blocks").set(self.free.len() as f64);
        let cached = self.cache.as_ref().map_or(0, PrefixCache::cached_blocks);
        metrics::gauge!("tessera_kv_cached_blocks").set(cached as f64);
    }
}

#[derive(Clone)]
pub struct BlockAllocator {
    pool: Arc<Mutex<Pool>>,
    total: usize,
}

/// The blocks of one request, and the slot of every token position they cover.
pub struct BlockAllocation {
    pub blocks: Vec<u32>,
    pub slots: Vec<u32>,
    /// Prompt tokens whose K/V the cached blocks already hold.
    pub cache_len: u32,
    /// The prompt, kept to file its blocks in the cache at the end (empty: no caching).
    prompt: Vec<u32>,
    matched: Match,
    prefilled: AtomicBool,
    pool: Arc<Mutex<Pool>>,
}

impl BlockAllocation {
    /// Marks the prompt's K/V as fully computed: its blocks may be cached when this ends.
    pub fn mark_prefilled(&self) {
        self.prefilled.store(true, Ordering::Relaxed);
    }
}

impl Drop for BlockAllocation {
    fn drop(&mut self) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let bs = pool.block_size as usize;
        let shared = self.matched.blocks.len();
        let mut give_back: Vec<u32> = self.blocks.drain(..).skip(shared).collect();
        if let Some(cache) = pool.cache.as_mut() {
            if self.prefilled.load(Ordering::Relaxed) && !self.prompt.is_empty() {
                // The prompt's whole blocks past the shared prefix hold finished K/V. They
                // go in under the matched prefix while this allocation still holds it.
                let chunks: Vec<&[u32]> = self.prompt.chunks_exact(bs).skip(shared).collect();
                let n = chunks.len().min(give_back.len());
                let filed: Vec<u32> = give_back.drain(..n).collect();
                let last = self.matched.nodes.last().copied();
                let rejected = cache.insert(last, &chunks[..n], &filed);
                give_back.extend(rejected);
            }
            give_back.extend(cache.release(&self.matched.nodes));
        }
        pool.free.extend(give_back.into_iter().rev());
        pool.publish();
    }
}

impl BlockAllocator {
    /// Manages the blocks of a pool holding `max_batch_total_tokens` tokens (plus block 0).
    /// Rounded up, so that a request of `max_total_tokens <= max_batch_total_tokens` always
    /// fits an idle pool; the shards size their pool in whole blocks, so the block exists.
    pub fn new(max_batch_total_tokens: u32, block_size: u32, prefix_caching: bool) -> Self {
        let block_size = block_size.max(1);
        let blocks = max_batch_total_tokens.div_ceil(block_size);
        // Reversed so that pops hand out low ids first.
        let free: Vec<u32> = (1..=blocks).rev().collect();
        let total = free.len();
        let pool = Pool {
            free,
            block_size,
            cache: prefix_caching.then(|| PrefixCache::new(block_size as usize)),
        };
        metrics::gauge!("tessera_kv_total_blocks").set(total as f64);
        pool.publish();
        Self {
            pool: Arc::new(Mutex::new(pool)),
            total,
        }
    }

    /// Blocks for `positions` token positions, the first of them from the prefix cache when
    /// `prompt` (the request's token ids) starts with cached chunks. `None` when not enough
    /// blocks are free even after evicting every unused cached one.
    pub fn allocate(&self, prompt: Option<&[u32]>, positions: u32) -> Option<BlockAllocation> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let bs = pool.block_size;
        let needed = positions.div_ceil(bs) as usize;
        let (matched, prompt) = match (pool.cache.as_mut(), prompt) {
            (Some(cache), Some(ids)) if !ids.is_empty() => {
                // At least one prompt token must be left to compute.
                let most = (ids.len() - 1) / bs as usize;
                (cache.lookup(ids, most.min(needed)), ids.to_vec())
            }
            _ => (Match::default(), Vec::new()),
        };
        let fresh = needed - matched.blocks.len();
        if fresh > pool.free.len() {
            let short = fresh - pool.free.len();
            let evicted = pool
                .cache
                .as_mut()
                .map(|c| c.evict(short))
                .unwrap_or_default();
            pool.free.extend(evicted);
        }
        if fresh > pool.free.len() {
            let freed = pool
                .cache
                .as_mut()
                .map(|c| c.release(&matched.nodes))
                .unwrap_or_default();
            pool.free.extend(freed);
            pool.publish();
            return None;
        }
        let at = pool.free.len() - fresh;
        let mut new_blocks = pool.free.split_off(at);
        new_blocks.reverse();
        pool.publish();
        let blocks: Vec<u32> = matched.blocks.iter().copied().chain(new_blocks).collect();
        let slots = blocks
            .iter()
            .flat_map(|&b| b * bs..(b + 1) * bs)
            .take(positions as usize)
            .collect();
        Some(BlockAllocation {
            cache_len: matched.blocks.len() as u32 * bs,
            blocks,
            slots,
            prompt,
            matched,
            prefilled: AtomicBool::new(false),
            pool: self.pool.clone(),
        })
    }

    /// Forgets every cached prefix: after a shard failed, its KV memory cannot be trusted.
    pub fn invalidate_cache(&self) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cache) = pool.cache.as_mut() {
            let freed = cache.invalidate();
            pool.free.extend(freed);
        }
        pool.publish();
    }

    pub fn free_blocks(&self) -> usize {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .free
            .len()
    }

    /// Blocks held only by the prefix cache or in use, i.e. not on the free list.
    pub fn cached_blocks(&self) -> usize {
        let pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.cache.as_ref().map_or(0, PrefixCache::cached_blocks)
    }

    pub fn total_blocks(&self) -> usize {
        self.total
    }

    pub fn block_size(&self) -> u32 {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .block_size
    }
}

#[cfg(test)]
#[path = "block_allocator_tests.rs"]
mod tests;
