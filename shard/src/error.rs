//! The shard's error type. Every failure a request or a model file can cause ends up here, so the
//! gRPC layer can turn it into a status with a readable message instead of a panic.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ShardError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config.json: {0}")]
    Config(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("invalid weights: {0}")]
    Weights(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("torch error: {0}")]
    Torch(#[from] tch::TchError),
    #[error("invalid request: {0}")]
    Request(String),
    #[error("batch {0} not found")]
    BatchNotFound(u64),
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error("{0}")]
    Device(String),
}

pub type Result<T> = std::result::Result<T, ShardError>;

impl From<ShardError> for tonic::Status {
    fn from(e: ShardError) -> Self {
        match e {
            ShardError::Request(_) | ShardError::Tokenizer(_) => {
                tonic::Status::invalid_argument(e.to_string())
            }
            ShardError::BatchNotFound(_) => tonic::Status::not_found(e.to_string()),
            ShardError::OutOfMemory(_) => tonic::Status::resource_exhausted(e.to_string()),
            _ => tonic::Status::internal(e.to_string()),
        }
    }
}
