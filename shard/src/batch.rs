//! Cached batches: the shard-side state behind a `CachedBatch` id.
//!
//! The router refers to running work only by batch id and request ids; this registry maps them
//! to sequences. Concatenating batches for a decode or dropping finished requests is a matter of
//! moving `Sequence`s between vectors.

use std::collections::HashMap;

use tessera_proto::CachedBatch;

use crate::error::{Result, ShardError};
use crate::sequence::Sequence;

pub struct Batch {
    pub id: u64,
    pub seqs: Vec<Sequence>,
}

impl Batch {
    /// The protocol summary of this batch, or `None` when nothing in it can run any more.
    pub fn summary(&self) -> Option<CachedBatch> {
        let active = self.seqs.iter().filter(|s| s.finished.is_none());
        // As in TGI: the tokens the next forward pass takes (prompt chunks count in full).
        let current: usize = active.map(|s| s.chunk).sum();
        if current == 0 {
            return None;
        }
        Some(CachedBatch {
            id: self.id,
            request_ids: self.seqs.iter().map(|s| s.id).collect(),
            size: self.seqs.len() as u32,
            max_tokens: self.seqs.iter().map(|s| s.max_tokens() as u32).sum(),
            current_tokens: current as u32,
        })
    }

    /// Names the batch's next step identically on every tensor-parallel rank that runs it:
    /// the batch id, and each sequence's id, cached length and chunk. A rank that ran a step
    /// its peers never got has other lengths, so its collectives carry another tag and fail
    /// rather than mix with theirs (`comm::shm`).
    pub fn step_tag(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        // SipHash with fixed keys: the same on every rank, as they all run this binary.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.id.hash(&mut h);
        for s in &self.seqs {
            (s.id, s.cached, s.chunk, s.finished.is_some()).hash(&mut h);
        }
        h.finish()
    }
}

#[derive(Default)]
pub struct BatchRegistry {
    batches: HashMap<u64, Batch>,
}

impl BatchRegistry {
    pub fn take(&mut self, id: u64) -> Result<Batch> {
        self.batches
            .remove(&id)
            .ok_or(ShardError::BatchNotFound(id))
    }

    /// Takes several batches and joins them under the first one's id.
    pub fn take_concat(&mut self, ids: &[u64]) -> Result<Batch> {
        if let Some(missing) = ids.iter().find(|id| !self.batches.contains_key(id)) {
            return Err(ShardError::BatchNotFound(*missing));
        }
        let first = ids
            .first()
            .copied()
            .ok_or_else(|| ShardError::Request("no batches given".into()))?;
        let mut seqs = Vec::new();
        for id in ids {
            seqs.extend(self.take(*id)?.seqs);
        }
        Ok(Batch { id: first, seqs })
    }

    /// Keeps the batch if anything in it can still run; returns its summary.
    pub fn store(&mut self, batch: Batch) -> Option<CachedBatch> {
        let summary = batch.summary();
        if summary.is_some() {
            self.batches.insert(batch.id, batch);
        }
        summary
    }

    /// Keeps only `request_ids` in batch `id`.
    pub fn filter(&mut self, id: u64, request_ids: &[u64]) -> Result<Option<CachedBatch>> {
        let mut batch = self.take(id)?;
        batch.seqs.retain(|s| request_ids.contains(&s.id));
        Ok(self.store(batch))
    }

    pub fn clear(&mut self, id: Option<u64>) {
        match id {
            Some(id) => {
                self.batches.remove(&id);
            }
            None => self.batches.clear(),
        }
    }

    pub fn cached_tokens(&self) -> usize {
        self.batches
            .values()
            .flat_map(|b| &b.seqs)
            .map(|s| s.max_tokens())
            .sum()
    }
}
