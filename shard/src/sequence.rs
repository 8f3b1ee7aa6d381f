//! One request's life inside the shard: its tokens, sampler, stop conditions, detokenizer and
//! where its K/V lives in the pool. Everything a step needs for a request lives here, so
//! batches are plain vectors of sequences and joining or splitting them never copies model state.

use crate::detokenizer::{Finish, IncrementalDecoder, StoppingCriteria};
use crate::grammar::Constraint;
use crate::sampler::Sampler;

pub struct Sequence {
    pub id: u64,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub max_new_tokens: usize,
    pub sampler: Sampler,
    /// The grammar its output must follow (structured output), if any.
    pub constraint: Option<Constraint>,
    pub stopping: StoppingCriteria,
    pub decoder: IncrementalDecoder,
    pub top_n_tokens: usize,
    pub prefill_logprobs: bool,
    /// Log-probability of every prompt token so far (NaN for the first and for cached ones),
    /// gathered across prefill chunks and sent with the first generated token.
    pub prompt_logprobs: Vec<f32>,
    /// The KV pool slot of every position the sequence may ever write, from its block table.
    pub slots: Vec<i64>,
    /// Tokens whose K/V is already in the pool (starts at the router's `cache_len`).
    pub cached: usize,
    /// Tokens the next forward pass feeds: a prompt chunk, or 1 when decoding.
    pub chunk: usize,
    /// Set once the sequence stopped; it then takes no part in forward passes.
    pub finished: Option<Finish>,
}

impl Sequence {
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens this sequence feeds to the next forward pass.
    pub fn pending(&self) -> &[u32] {
        &self.tokens[self.cached..self.cached + self.chunk]
    }

    /// Whether the prompt still has tokens that were never run.
    pub fn prefilling(&self) -> bool {
        self.cached < self.prompt_len
    }

    /// Whether the next pass finishes the prompt (or decodes), so it yields a token.
    pub fn yields_token(&self) -> bool {
        self.cached + self.chunk >= self.prompt_len
    }

    /// Tokens it holds in the KV cache at most (prompt plus its generation budget).
    pub fn max_tokens(&self) -> usize {
        self.prompt_len + self.max_new_tokens
    }

    /// Tokens it may still generate, the next one included.
    pub fn budget(&self) -> u32 {
        self.max_new_tokens.saturating_sub(self.generated()) as u32
    }

    pub fn generated_ids(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }
}
