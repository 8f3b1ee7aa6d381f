//! The paged KV cache: one preallocated pool of fixed-size blocks per layer.
//!
//! The router owns block *policy* (who gets which block, what is shared through the prefix
//! cache); the shard owns block *memory*. Each layer's keys and values are a single tensor of
//! `num_blocks * block_size` slots, `[slots, kv_heads, head_dim]`, so writing a step's new
//! tokens is one `index_copy_` per layer (on CPU decode steps, a store by the kernel that
//! rotates them: `rope_store`) and reading a sequence's context is one gather through its
//! block table, whatever the batch looks like. Slot `s` lives in block `s / block_size`.

use tch::{Device, Kind, Tensor};

use crate::error::{Result, ShardError};

/// Shape facts needed to size a pool.
#[derive(Clone, Copy, Debug)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub kind: Kind,
    pub device: Device,
}

impl KvLayout {
    /// Bytes one cached token costs across all layers (keys and values).
    pub fn bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kind.elt_size_in_bytes()
    }
}

pub struct KvPool {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    block_size: usize,
    num_blocks: usize,
    /// Blocks written since this pool was allocated: a cached prefix must point at these (a
    /// restarted shard's pool holds nothing the router may think it cached).
    written: Vec<bool>,
    /// The last CPU decode step's plan (`model::decode_plan`), which writes into this pool's
    /// tensors: it lives and goes with them.
    pub(crate) kept_step: Option<crate::model::KeptStep>,
}

impl KvPool {
    /// Allocates `num_blocks` blocks per layer. The memory is left uninitialised (so on CPU
    /// pages are only committed when blocks are first written), except block 0: padding points
    /// there, and even a masked-out NaN would poison a matmul.
    pub fn new(layout: KvLayout, block_size: usize, num_blocks: usize) -> Result<Self> {
        let slots = (num_blocks * block_size) as i64;
        let shape = [slots, layout.num_kv_heads as i64, layout.head_dim as i64];
        let alloc = || -> Result<Tensor> {
            let t = Tensor::f_empty(shape, (layout.kind, layout.device))?;
            let _ = t.narrow(0, 0, block_size as i64).fill_(0.0);
            Ok(t)
        };
        let mut keys = Vec::with_capacity(layout.num_layers);
        let mut values = Vec::with_capacity(layout.num_layers);
        for _ in 0..layout.num_layers {
            keys.push(alloc()?);
            values.push(alloc()?);
        }
        Ok(Self {
            keys,
            values,
            block_size,
            num_blocks,
            written: vec![false; num_blocks],
            kept_step: None,
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Layer `layer`'s whole key and value tensors, `[slots, kv_heads, head_dim]`.
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        (&self.keys[layer], &self.values[layer])
    }

    /// Stores the new tokens' `k`/`v` (`[T, kv_heads, head_dim]`) of `layer` at `slots` (`[T]`).
    pub fn write(&mut self, layer: usize, slots: &Tensor, k: &Tensor, v: &Tensor) {
        let pools = [&self.keys[layer], &self.values[layer]];
        // SAFETY: `&mut self` holds the pool's tensors exclusively for the call, and they are
        // the pool's own storage, never a view of `k` or `v`.
        if !unsafe { crate::kernels::store_rows(pools, slots, [k, v]) } {
            let _ = self.keys[layer].index_copy_(0, slots, k);
            let _ = self.values[layer].index_copy_(0, slots, v);
        }
    }

    /// Decode rows' fused `qkv` rotated, their keys and values stored at `slots` of `layer`,
    /// their queries returned (`kernels::rope_store`); `None` where the kernel does not apply
    /// and the caller should rotate and `write` instead.
    pub fn rope_store(
        &mut self,
        layer: usize,
        qkv: &Tensor,
        tables: (&Tensor, &Tensor),
        heads: usize,
        slots: &[i64],
    ) -> Option<Tensor> {
        let pool = (self.keys.get(layer)?, self.values.get(layer)?);
        // SAFETY: `&mut self` holds the pool's tensors exclusively for the call, and they
        // are the pool's own storage, never a view of `qkv`.
        unsafe { crate::kernels::rope_store(qkv, tables, heads, pool, slots) }
    }

    /// Keys and values at `slots` (any shape of slot ids), each `[..slots.shape, kv_heads, head_dim]`.
    /// Gathered as embedding lookups over `[slots, kv_heads * head_dim]` rows: libtorch's CPU
    /// `index_select` is several times slower on f32 rows of this size (0.42 vs 0.09 ms for a
    /// batch-32 decode context on the development VM).
    pub fn gather(&self, layer: usize, slots: &Tensor) -> (Tensor, Tensor) {
        let rows = |t: &Tensor| {
            let s = t.size();
            Tensor::embedding(&t.view([s[0], s[1] * s[2]]), slots, -1, false, false)
        };
        let mut shape = slots.size();
        let tail = &self.keys[layer].size()[1..];
        shape.extend_from_slice(tail);
        (
            rows(&self.keys[layer]).view(shape.as_slice()),
            rows(&self.values[layer]).view(shape.as_slice()),
        )
    }

    /// The slot of every token position `0..len` of a sequence whose block table is `blocks`.
    pub fn context_slots(&self, blocks: &[u32], len: usize) -> Result<Vec<i64>> {
        let bs = self.block_size;
        if blocks.len() * bs < len {
            return Err(ShardError::Request(format!(
                "{} blocks of {bs} tokens cannot hold {len} tokens",
                blocks.len()
            )));
        }
        Ok((0..len)
            .map(|i| blocks[i / bs] as i64 * bs as i64 + (i % bs) as i64)
            .collect())
    }

    /// Records that `slots` are about to hold K/V.
    pub fn mark_written(&mut self, slots: &[i64]) {
        for &s in slots {
            if let Some(w) = self.written.get_mut(s as usize / self.block_size) {
                *w = true;
            }
        }
    }

    /// Whether every one of `blocks` has been written since the pool was allocated.
    pub fn all_written(&self, blocks: &[u32]) -> bool {
        blocks
            .iter()
            .all(|&b| self.written.get(b as usize).copied().unwrap_or(false))
    }

    /// Checks that every block id of a request exists in the pool.
    pub fn check_blocks(&self, blocks: &[u32]) -> Result<()> {
        match blocks.iter().find(|&&b| b as usize >= self.num_blocks) {
            Some(b) => Err(ShardError::Request(format!(
                "block {b} is outside the KV pool of {} blocks",
                self.num_blocks
            ))),
            None => Ok(()),
        }
    }
}
