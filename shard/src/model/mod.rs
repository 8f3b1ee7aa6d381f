//! Model architectures. A model turns a flattened batch of new tokens, plus each sequence's KV
//! cache, into logits for the rows the caller asked for.
//!
//! Batches are "varlen": the new tokens of all sequences are concatenated into one `[T]` tensor,
//! so every projection and MLP runs as one matmul over the whole batch, and only attention is
//! done per sequence against that sequence's own cache.

pub mod llama;

use tch::Tensor;

pub use llama::Llama;

/// One forward pass over several sequences.
pub struct ForwardInput {
    /// New token ids of all sequences, concatenated: `[T]` int64.
    pub input_ids: Tensor,
    /// Absolute position of every new token: `[T]` int64.
    pub positions: Tensor,
    /// Per sequence: how many new tokens it contributes (in order).
    pub new_tokens: Vec<usize>,
    /// Row indices into `T` whose logits are wanted (usually each sequence's last token).
    pub logit_rows: Tensor,
}
