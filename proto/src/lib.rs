//! The shard protocol, generated from `generate.proto`.
//!
//! Both sides of the router/shard boundary use these types, so the wire format is defined in
//! exactly one place. The package name stays `generate.v3` for compatibility with TGI.

#[allow(clippy::all, missing_docs)]
pub mod v3 {
    tonic::include_proto!("generate.v3");
}

pub use v3::*;

pub mod telemetry;
