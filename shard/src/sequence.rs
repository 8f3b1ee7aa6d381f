//! One request's life inside the shard: its tokens, sampler, stop conditions, detokenizer and
//! KV cache. Everything a decode step needs for a request lives here, so batches are plain
//! vectors of sequences and joining or splitting them never copies model state.

use crate::detokenizer::{Finish, IncrementalDecoder, StoppingCriteria};
use crate::kv_cache::SeqKvCache;
use crate::sampler::Sampler;

pub struct Sequence {
    pub id: u64,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub sampler: Sampler,
    pub stopping: StoppingCriteria,
    pub decoder: IncrementalDecoder,
    pub cache: SeqKvCache,
    pub top_n_tokens: usize,
    pub prefill_logprobs: bool,
    /// Set once the sequence stopped; it then takes no part in forward passes.
    pub finished: Option<Finish>,
}

impl Sequence {
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens this sequence feeds to the next forward pass: the uncached suffix.
    pub fn pending(&self) -> &[u32] {
        &self.tokens[self.cache.len()..]
    }

    /// Tokens it holds in the KV cache at most (prompt plus its generation budget).
    pub fn max_tokens(&self) -> usize {
        self.cache.capacity()
    }

    pub fn generated_ids(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }
}
