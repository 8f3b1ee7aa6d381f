//! Collectives between the tensor-parallel ranks of one model.
//!
//! A rank holds a slice of every sharded weight; after a row-parallel matmul the partial sums
//! are added up across ranks (all-reduce), and the vocabulary-parallel logits are put back
//! together (all-gather). `Communicator` is that contract. `shm::ShmComm` implements it
//! between processes on one host through a POSIX shared-memory segment, for CPU shards;
//! `nccl::NcclComm` between GPU ranks; a single rank needs no communication at all.
//!
//! Every rank must call the same collectives in the same order with tensors of the same shape
//! and dtype, as the router drives all ranks through the same batches. Results are identical
//! on every rank, bit for bit: each rank adds the contributions in rank order, so sampling on
//! every rank picks the same tokens.

pub mod nccl;
pub mod shm;

use tch::Tensor;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CommError {
    #[error("rank {rank} (pid {pid}) exited during {op} #{seq}")]
    PeerDied {
        rank: usize,
        pid: u64,
        op: &'static str,
        seq: u64,
    },
    #[error("rank {rank} did not reach {op} #{seq} within {timeout_s} s (hung or stopped)")]
    Timeout {
        rank: usize,
        op: &'static str,
        seq: u64,
        timeout_s: f64,
    },
    #[error(
        "rank {rank} is in another collective ({theirs}) than this rank ({ours}): the group is \
         out of step (a call reached some ranks and not others)"
    )]
    OutOfStep {
        rank: usize,
        ours: String,
        theirs: String,
    },
    #[error("an earlier collective failed, so this rank is out of step for good: {0}")]
    Broken(String),
    #[error("cannot set up the shared-memory segment {path}: {reason}")]
    Setup { path: String, reason: String },
    #[error("unsupported tensor for a collective: {0}")]
    Tensor(String),
    #[error("{op} failed: {message} (NCCL error {code})")]
    Nccl {
        op: &'static str,
        code: i32,
        message: String,
    },
}

pub type Result<T> = std::result::Result<T, CommError>;

pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The elementwise sum of `t` over all ranks (same shape and dtype everywhere).
    fn all_reduce_sum(&mut self, t: &Tensor) -> Result<Tensor>;
    /// Every rank's `t` (same shape everywhere), concatenated in rank order along `dim`.
    fn all_gather(&mut self, t: &Tensor, dim: i64) -> Result<Tensor>;
    /// Names the step whose collectives follow (equal on every rank for the same call), so
    /// that a rank can tell a peer in a different call from one in the same call. Only a
    /// communicator that can compare them cheaply does; the default ignores it.
    fn begin_step(&mut self, _tag: u64) {}
}

/// Pins the calling thread, and every thread it starts afterwards, to cores `first..=last`.
/// Ranks that spin while waiting for each other need cores of their own: two of them
/// time-sliced on one core wait out each other's slices (docs/benchmarks.md).
pub fn pin_to_cores(first: usize, last: usize) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the call only changes this thread.
    let ok = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in first..=last {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
