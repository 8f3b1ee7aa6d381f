//! Tensor parallelism: how a loaded model is cut into one rank's slice, and the collectives
//! its forward pass needs (Megatron-style, as TGI does).
//!
//! - q/k/v and gate/up are column-parallel: each rank keeps its heads and its share of the
//!   MLP's intermediate units, and computes them without talking to the others.
//! - o and down are row-parallel: each rank multiplies its share of the inputs, and the partial
//!   sums are all-reduced. Their biases stay on rank 0 only, so they are added once.
//! - The embedding is vocabulary-parallel: a rank looks up the ids in its block of rows, zeros
//!   the others, and the partial embeddings are all-reduced.
//! - The lm_head is vocabulary-parallel too: each rank computes its block of logits, and an
//!   all-gather puts the rows back together (every rank samples, from identical logits, so the
//!   ranks stay in lockstep).
//! - KV heads are split across ranks. With fewer KV heads than ranks, each KV head is
//!   replicated on the `world / kv_heads` ranks whose query heads use it.
//!
//! The vocabulary is cut into `ceil(vocab / world)` rows per rank, the last block padded with
//! zero rows; head counts and the intermediate size must divide evenly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tch::Tensor;

use super::transformer::{Layer, Linear, Mlp, Transformer};
use crate::comm::Communicator;
use crate::error::{Result, ShardError};

/// This rank's place in the group, and its communicator.
pub struct Parallel {
    pub rank: usize,
    pub world: usize,
    comm: Mutex<Box<dyn Communicator>>,
    /// Set by the first failed collective: from then on the ranks are out of step for good.
    broken: AtomicBool,
}

impl Parallel {
    pub fn new(comm: Box<dyn Communicator>) -> Self {
        Self {
            rank: comm.rank(),
            world: comm.world_size(),
            comm: Mutex::new(comm),
            broken: AtomicBool::new(false),
        }
    }

    /// Names the step whose collectives follow (see `Communicator::begin_step`).
    pub fn begin_step(&self, tag: u64) {
        let mut comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        comm.begin_step(tag);
    }

    /// Whether a collective has failed. The ranks can no longer be brought back in step (some
    /// finished a round the others never will), so the shard must exit and the launcher
    /// restart the whole group.
    pub fn broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// The sum over ranks. A failed collective (a dead, hung or out-of-step peer) leaves the
    /// group unusable, so it marks the group broken and panics; the gRPC service turns that
    /// into an error for the batch.
    pub fn all_reduce(&self, t: &Tensor) -> Tensor {
        self.collective("all-reduce", |comm| comm.all_reduce_sum(t))
    }

    pub fn all_gather(&self, t: &Tensor, dim: i64) -> Tensor {
        self.collective("all-gather", |comm| comm.all_gather(t, dim))
    }

    /// Runs one collective, unless an earlier one failed: a communicator is never called
    /// again after a failure (a half-done shared-memory round would wait for this rank
    /// itself; NCCL after an error may hang).
    fn collective(
        &self,
        op: &str,
        run: impl FnOnce(&mut dyn Communicator) -> crate::comm::Result<Tensor>,
    ) -> Tensor {
        if self.broken() {
            panic!("tensor-parallel {op} refused: an earlier collective failed");
        }
        let mut comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        match run(comm.as_mut()) {
            Ok(t) => t,
            Err(e) => {
                self.broken.store(true, Ordering::SeqCst);
                panic!("tensor-parallel {op} failed: {e}")
            }
        }
    }

    /// The smallest of each rank's `value` (e.g. how many KV blocks fit), so all agree.
    pub fn min(&self, value: i64) -> i64 {
        let all = self.all_gather(&Tensor::from_slice(&[value]), 0);
        i64::try_from(all.min()).unwrap_or(value)
    }

    /// Rows `block * rank ..` of `t` (dim 0), `block` of them, zero-padded past the end.
    fn vocab_block(&self, t: &Tensor, block: i64) -> Tensor {
        let rows = t.size()[0];
        let start = (block * self.rank as i64).min(rows);
        let len = (rows - start).min(block);
        let mine = t.narrow(0, start, len);
        if len == block {
            return mine.contiguous();
        }
        let mut shape = t.size();
        shape[0] = block - len;
        let pad = Tensor::zeros(shape.as_slice(), (t.kind(), t.device()));
        Tensor::cat(&[mine, pad], 0)
    }
}

/// Which heads of the full model a rank keeps.
struct Heads {
    q_start: i64,
    q_count: i64,
    kv_start: i64,
    kv_count: i64,
}

fn heads(nh: i64, nkv: i64, rank: i64, world: i64) -> Result<Heads> {
    let bad = |what: String| Err(ShardError::Config(what));
    if nh % world != 0 {
        return bad(format!(
            "the model has {nh} attention heads, which {world} shards cannot split evenly: use a --num-shard that divides {nh}"
        ));
    }
    if nkv % world != 0 && world % nkv != 0 {
        return bad(format!(
            "the model has {nkv} KV heads and {world} shards: one must divide the other"
        ));
    }
    let q_count = nh / world;
    let q_start = rank * q_count;
    let (kv_start, kv_count) = if nkv >= world {
        (rank * nkv / world, nkv / world)
    } else {
        // Replicated: the KV head of this rank's query heads.
        (q_start / (nh / nkv), 1)
    };
    Ok(Heads {
        q_start,
        q_count,
        kv_start,
        kv_count,
    })
}

/// Rows `[start, start + len)` of each of the stacked blocks `sizes` of dim 0, concatenated.
fn rows_of(t: &Tensor, parts: &[(i64, i64, i64)]) -> Tensor {
    let mut offset = 0;
    let mut pieces = Vec::with_capacity(parts.len());
    for &(size, start, len) in parts {
        pieces.push(t.narrow(0, offset + start, len));
        offset += size;
    }
    Tensor::cat(&pieces, 0)
}

fn column_parallel(l: &Linear, parts: &[(i64, i64, i64)]) -> Linear {
    Linear::new(
        rows_of(&l.weight, parts),
        l.bias.as_ref().map(|b| rows_of(b, parts)),
    )
}

fn row_parallel(l: &Linear, start: i64, len: i64, rank: usize) -> Linear {
    Linear::new(
        l.weight.narrow(1, start, len).contiguous(),
        l.bias
            .as_ref()
            .filter(|_| rank == 0)
            .map(|b| b.shallow_clone()),
    )
}

impl Transformer {
    /// Cuts this (lazily mapped) model down to rank `par.rank`'s slice. Only the slices are
    /// copied; the full tensors are views of the checkpoint files and go away with them.
    pub fn shard(mut self, par: Parallel) -> Result<Self> {
        let (rank, world) = (par.rank as i64, par.world as i64);
        let a = &self.attention;
        let (nh, nkv, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
        let h = heads(nh, nkv, rank, world)?;
        let ffn = self.config.intermediate_size as i64;
        if ffn % world != 0 {
            return Err(ShardError::Config(format!(
                "the MLP has {ffn} intermediate units, which {world} shards cannot split evenly"
            )));
        }
        let f = ffn / world;
        let qkv_parts = [
            (nh * hd, h.q_start * hd, h.q_count * hd),
            (nkv * hd, h.kv_start * hd, h.kv_count * hd),
            (nkv * hd, h.kv_start * hd, h.kv_count * hd),
        ];
        let layers = std::mem::take(&mut self.layers);
        self.layers = layers
            .into_iter()
            .map(|l| {
                let mlp = match &l.mlp {
                    Mlp::Gated { gate_up, down } => Mlp::Gated {
                        gate_up: column_parallel(
                            gate_up,
                            &[(ffn, rank * f, f), (ffn, rank * f, f)],
                        ),
                        down: row_parallel(down, rank * f, f, par.rank),
                    },
                    Mlp::Plain { fc, proj } => Mlp::Plain {
                        fc: column_parallel(fc, &[(ffn, rank * f, f)]),
                        proj: row_parallel(proj, rank * f, f, par.rank),
                    },
                };
                Layer {
                    qkv: column_parallel(&l.qkv, &qkv_parts),
                    o: row_parallel(&l.o, h.q_start * hd, h.q_count * hd, par.rank),
                    mlp,
                    ..l
                }
            })
            .collect();
        let vocab = self.config.vocab_size as i64;
        let block = (vocab + world - 1) / world;
        let tied = self.lm_head.weight.data_ptr() == self.embed.data_ptr();
        self.embed = par.vocab_block(&self.embed, block);
        self.lm_head = if tied {
            Linear::new(self.embed.shallow_clone(), None)
        } else {
            Linear::new(par.vocab_block(&self.lm_head.weight, block), None)
        };
        self.attention.num_heads = h.q_count;
        self.attention.num_kv_heads = h.kv_count;
        self.vocab_block = block;
        self.parallel = Some(par);
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_split_or_replicate() {
        let h = heads(8, 4, 1, 2).expect("even");
        assert_eq!((h.q_start, h.q_count, h.kv_start, h.kv_count), (4, 4, 2, 2));
        // One KV head, two ranks: both keep it.
        let h = heads(4, 1, 1, 2).expect("replicated");
        assert_eq!((h.q_start, h.q_count, h.kv_start, h.kv_count), (2, 2, 0, 1));
        // Two KV heads, four ranks: ranks 0-1 share head 0, ranks 2-3 head 1.
        let h = heads(8, 2, 2, 4).expect("replicated");
        assert_eq!((h.kv_start, h.kv_count), (1, 1));
        let e = heads(6, 2, 0, 4)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("6 attention heads") && e.contains("4 shards"),
            "{e}"
        );
        assert!(heads(8, 3, 0, 2).is_err());
    }

    #[test]
    fn rows_of_stacked_blocks() {
        let t = Tensor::arange(10, (tch::Kind::Float, tch::Device::Cpu));
        let r = rows_of(&t, &[(4, 2, 2), (6, 0, 3)]);
        assert_eq!(
            Vec::<f32>::try_from(r).unwrap_or_default(),
            vec![2.0, 3.0, 4.0, 5.0, 6.0]
        );
    }
}
