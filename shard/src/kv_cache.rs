//! A sequence's key/value cache.
//!
//! Each sequence owns one buffer per layer, preallocated for its whole life (prompt plus the
//! most tokens it may generate), so appending a token is a copy into place rather than a
//! re-allocation of the whole history.

use tch::{Device, Kind, Tensor};

pub struct SeqKvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: usize,
    capacity: usize,
}

/// Shape facts needed to size a cache.
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

impl SeqKvCache {
    pub fn new(layout: KvLayout, capacity: usize) -> Self {
        let shape = [
            layout.num_kv_heads as i64,
            capacity as i64,
            layout.head_dim as i64,
        ];
        // Uninitialised on purpose: only the first `len` positions are ever read.
        let alloc = || Tensor::empty(shape, (layout.kind, layout.device));
        Self {
            keys: (0..layout.num_layers).map(|_| alloc()).collect(),
            values: (0..layout.num_layers).map(|_| alloc()).collect(),
            len: 0,
            capacity,
        }
    }

    /// Tokens already cached (identical in every layer between forward passes).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Writes `k`/`v` (`[kv_heads, t, head_dim]`) for `layer` after the cached tokens and returns
    /// the full key and value history (`[kv_heads, len + t, head_dim]`).
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        let t = k.size()[1];
        let past = self.len as i64;
        self.keys[layer].narrow(1, past, t).copy_(k);
        self.values[layer].narrow(1, past, t).copy_(v);
        (
            self.keys[layer].narrow(1, 0, past + t),
            self.values[layer].narrow(1, 0, past + t),
        )
    }

    /// Marks `t` more tokens as cached, once every layer has appended them.
    pub fn advance(&mut self, t: usize) {
        self.len += t;
    }
}
