//! Model architectures. A model turns a flattened batch of new tokens, plus the paged KV pool,
//! into logits for the rows the caller asked for.
//!
//! Batches are "varlen": the new tokens of all sequences are concatenated into one `[T]` tensor,
//! so every projection and MLP runs as one matmul over the whole batch. Only attention looks at
//! sequences: prompt chunks one by one (they are long, and fused SDPA kernels want them whole),
//! single decode tokens all together in one padded, masked batched attention.
//!
//! Every supported family is the same pre-norm decoder with different parts (`transformer`);
//! the per-family files only know where the weights are and which parts to pick. `parallel`
//! cuts a loaded model into one tensor-parallel rank's slice.

pub mod attention;
mod decode_plan;
mod gemma2;
mod gpt2;
mod llama;
pub mod parallel;
pub mod rope;
pub mod transformer;

use tch::{Device, Kind, Tensor};

use crate::config::{Arch, ModelConfig};
use crate::error::Result;
use crate::weights::Weights;

pub(crate) use decode_plan::KeptStep;
pub use transformer::Transformer;

/// A prompt (or prompt chunk) of one sequence: rows `start..start + len` of the batch.
pub struct PrefillSpan {
    pub start: i64,
    pub len: i64,
    /// Tokens of this sequence already in the KV pool before this chunk.
    pub past: i64,
    /// Slots of positions `0..past + len`, read through the block table; `None` when
    /// `past == 0`, since a fresh prompt attends to its own new keys directly.
    pub context: Option<Tensor>,
}

/// The single-token decodes of the batch: rows `start..start + lens.len()`, after every prefill.
pub struct DecodeSpan {
    pub start: i64,
    /// Per sequence: its context length including the new token.
    pub lens: Vec<i64>,
    /// `[B, max(lens)]` slot ids, padded with slot 0 (block 0 is reserved and always finite).
    pub context: Tensor,
    /// The same slot ids on the CPU, row-major, for the CPU decode kernels.
    pub context_cpu: Vec<i64>,
}

impl DecodeSpan {
    /// Sequence `i`'s context slots, in position order.
    pub fn slots(&self, i: usize) -> &[i64] {
        let width = self.context_cpu.len() / self.lens.len().max(1);
        &self.context_cpu[i * width..i * width + self.lens[i] as usize]
    }
}

/// One forward pass over several sequences.
pub struct ForwardInput {
    /// New token ids of all sequences, concatenated: `[T]` int64.
    pub input_ids: Tensor,
    /// Absolute position of every new token: `[T]` int64.
    pub positions: Tensor,
    /// KV pool slot of every new token: `[T]` int64.
    pub slots: Tensor,
    pub prefills: Vec<PrefillSpan>,
    pub decode: Option<DecodeSpan>,
    /// Row indices into `T` whose logits are wanted (usually each sequence's last token).
    pub logit_rows: Tensor,
}

/// Loads the network `config.arch` names from `weights`.
pub fn load(
    config: ModelConfig,
    weights: &Weights,
    kind: Kind,
    device: Device,
) -> Result<Transformer> {
    match config.arch {
        Arch::Llama => llama::load(config, weights, kind, device),
        Arch::Gemma2 => gemma2::load(config, weights, kind, device),
        Arch::Gpt2 => gpt2::load(config, weights, kind, device),
    }
}
