//! Tessera's router: the HTTP front end and the scheduler.
//!
//! Requests enter through `server` (TGI and OpenAI routes), are checked and measured by
//! `validation` (with `chat_template` for chat and `grammar` for structured output), admitted by `infer`, wait in `queue`, and are
//! run by the continuous-batching loop in `batcher`, which drives the shards through `client`.
//! `block_allocator` decides which KV blocks of the shards' pool each request owns.
//! The router owns policy (what runs when); the shards own memory and compute. `metrics` and
//! `live` record what happens, for Prometheus and for the built-in dashboard.

pub mod batcher;
pub mod block_allocator;
pub mod chat_template;
pub mod client;
pub mod error;
pub mod grammar;
pub mod infer;
pub mod json_schema;
pub mod live;
pub mod metrics;
pub mod model_files;
pub mod queue;
pub mod radix;
pub mod server;
pub mod validation;
pub mod warmup;
