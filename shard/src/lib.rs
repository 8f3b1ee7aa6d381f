//! Tessera's model worker.
//!
//! A shard loads one checkpoint, keeps the KV state of running requests, and serves the v3
//! shard protocol. The pieces, from the wire inwards: `service` (gRPC), `runner` (batches to
//! forward passes), `batch`/`sequence` (request state), `model` (the network), `kv_cache`,
//! `sampler`, `grammar` and `detokenizer` (per-token work), `weights`/`config` (the checkpoint), `device`, `comm`
//! (collectives between tensor-parallel ranks), `allocator` (the C heap's policy for libtorch's
//! buffers, and 2 MiB pages under the weights).

pub mod admission;
pub mod allocator;
pub mod batch;
pub mod comm;
pub mod config;
pub mod detokenizer;
pub mod device;
pub mod error;
pub mod grammar;
pub mod kernels;
pub mod kv_cache;
pub mod model;
pub mod runner;
pub mod sampler;
pub mod sequence;
pub mod service;
pub mod warmup;
pub mod weights;

pub use error::{Result, ShardError};
pub use runner::Runner;
