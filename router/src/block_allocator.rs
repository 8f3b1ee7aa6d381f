//! KV block ownership: which request holds which blocks of the shards' paged KV pool.
//!
//! The router owns this policy (as in TGI v3); the shards own only the memory. A request gets
//! every block it may need when it is batched (prompt plus `max_new_tokens`, minus the last
//! token, which is returned but never written): reserving up front means a running batch can
//! never run out of blocks mid-generation, so nothing is ever preempted or recomputed, at the
//! price of holding blocks for tokens a request may stop before using. `max_total_tokens`
//! bounds that waste per request.
//!
//! Freeing is tied to ownership: a `BlockAllocation` returns its blocks when dropped, so a
//! request that finishes, fails or is cancelled frees them exactly once, wherever it ends.
//! Block 0 is never handed out; it is the shards' padding block. The free list is a stack, so
//! recently used (already resident) blocks are reused first.

use std::sync::{Arc, Mutex};

struct Pool {
    free: Vec<u32>,
    block_size: u32,
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
    pool: Arc<Mutex<Pool>>,
}

impl Drop for BlockAllocation {
    fn drop(&mut self) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.free.extend(self.blocks.drain(..).rev());
        metrics::gauge!("tessera_kv_free_blocks").set(pool.free.len() as f64);
    }
}

impl BlockAllocator {
    /// Manages the blocks of a pool holding `max_batch_total_tokens` tokens (plus block 0).
    /// Rounded up, so that a request of `max_total_tokens <= max_batch_total_tokens` always
    /// fits an idle pool; the shards size their pool in whole blocks, so the block exists.
    pub fn new(max_batch_total_tokens: u32, block_size: u32) -> Self {
        let block_size = block_size.max(1);
        let blocks = max_batch_total_tokens.div_ceil(block_size);
        // Reversed so that pops hand out low ids first.
        let free: Vec<u32> = (1..=blocks).rev().collect();
        let total = free.len();
        metrics::gauge!("tessera_kv_free_blocks").set(total as f64);
        Self {
            pool: Arc::new(Mutex::new(Pool { free, block_size })),
            total,
        }
    }

    /// Blocks for `tokens` token positions, or `None` when not enough are free.
    pub fn allocate(&self, tokens: u32) -> Option<BlockAllocation> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let bs = pool.block_size;
        let needed = tokens.div_ceil(bs) as usize;
        if needed > pool.free.len() {
            return None;
        }
        let at = pool.free.len() - needed;
        let mut blocks = pool.free.split_off(at);
        blocks.reverse();
        metrics::gauge!("tessera_kv_free_blocks").set(pool.free.len() as f64);
        let slots = blocks
            .iter()
            .flat_map(|&b| b * bs..(b + 1) * bs)
            .take(tokens as usize)
            .collect();
        Some(BlockAllocation {
            blocks,
            slots,
            pool: self.pool.clone(),
        })
    }

    pub fn free_blocks(&self) -> usize {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .free
            .len()
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
mod tests {
    use super::*;

    #[test]
    fn allocates_whole_blocks_never_block_zero_and_frees_on_drop() {
        let a = BlockAllocator::new(64, 16);
        assert_eq!(a.total_blocks(), 4);
        let x = a.allocate(17).unwrap();
        assert_eq!(x.blocks, vec![1, 2]);
        assert_eq!(x.slots.len(), 17);
        assert_eq!(x.slots[16], 32);
        let y = a.allocate(32).unwrap();
        assert!(!y.blocks.contains(&0));
        assert!(a.allocate(1).is_none());
        drop(x);
        assert_eq!(a.free_blocks(), 2);
        let z = a.allocate(20).unwrap();
        assert_eq!(
            z.blocks,
            vec![1, 2],
            "recently freed blocks are reused first"
        );
        drop((y, z));
        assert_eq!(a.free_blocks(), 4);
    }
}
