//! gRPC client for the shards, over Unix sockets.
//!
//! The router talks to rank 0's socket first, asks it for every rank's socket
//! (ServiceDiscovery), and from then on sends each call to all ranks at once: tensor-parallel
//! ranks must run the same batches in lockstep. Results are read from rank 0.

use std::path::PathBuf;

use futures::future::try_join_all;
use hyper_util::rt::TokioIo;
use tessera_proto as pb;
use tessera_proto::text_generation_service_client::TextGenerationServiceClient;
use thiserror::Error;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("Could not connect to Text Generation server: {0}")]
    Connection(String),
    #[error("Server error: {0}")]
    Generation(String),
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Generation(s.message().to_string())
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

async fn connect_uds(path: PathBuf) -> Result<TextGenerationServiceClient<Channel>> {
    // The URI is required by tonic but unused: the connector below always dials the socket.
    let endpoint = Endpoint::try_from("http://[::]:50051")
        .map_err(|e| ClientError::Connection(e.to_string()))?;
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| ClientError::Connection(e.to_string()))?;
    Ok(TextGenerationServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// One client per rank; calls fan out to all of them.
#[derive(Clone)]
pub struct ShardedClient {
    clients: Vec<TextGenerationServiceClient<Channel>>,
}

/// Results of a Prefill or Decode, with the shard's timings.
pub struct StepResult {
    pub generations: Vec<pb::Generation>,
    pub batch: Option<pb::CachedBatch>,
    pub forward_ns: u64,
}

impl ShardedClient {
    /// Connects to rank 0 at `master_uds_path`, then to every rank it lists.
    pub async fn connect(master_uds_path: &str) -> Result<Self> {
        let mut master = connect_uds(PathBuf::from(master_uds_path)).await?;
        let urls = master
            .service_discovery(pb::ServiceDiscoveryRequest {})
            .await?
            .into_inner()
            .urls;
        let mut clients = Vec::with_capacity(urls.len());
        for url in urls {
            let path = url.strip_prefix("unix://").unwrap_or(&url).to_string();
            clients.push(connect_uds(PathBuf::from(path)).await?);
        }
        if clients.is_empty() {
            return Err(ClientError::Connection(
                "ServiceDiscovery returned no shards".into(),
            ));
        }
        Ok(Self { clients })
    }

    pub fn world_size(&self) -> usize {
        self.clients.len()
    }

    async fn all<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(TextGenerationServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let results = try_join_all(self.clients.iter().cloned().map(f)).await?;
        results
            .into_iter()
            .next()
            .map(|r| r.into_inner())
            .ok_or_else(|| ClientError::Connection("no shards".into()))
    }

    pub async fn info(&self) -> Result<pb::InfoResponse> {
        self.all(|mut c| async move { c.info(pb::InfoRequest {}).await })
            .await
    }

    pub async fn health(&self) -> Result<()> {
        self.all(|mut c| async move { c.health(pb::HealthRequest {}).await })
            .await
            .map(|_| ())
    }

    pub async fn clear_cache(&self, id: Option<u64>) -> Result<()> {
        self.all(|mut c| async move { c.clear_cache(pb::ClearCacheRequest { id }).await })
            .await
            .map(|_| ())
    }

    pub async fn filter_batch(
        &self,
        batch_id: u64,
        request_ids: Vec<u64>,
    ) -> Result<Option<pb::CachedBatch>> {
        self.all(|mut c| {
            let request_ids = request_ids.clone();
            async move {
                c.filter_batch(pb::FilterBatchRequest {
                    batch_id,
                    request_ids,
                })
                .await
            }
        })
        .await
        .map(|r| r.batch)
    }

    pub async fn warmup(&self, req: pb::WarmupRequest) -> Result<pb::WarmupResponse> {
        self.all(|mut c| {
            let req = req.clone();
            async move { c.warmup(req).await }
        })
        .await
    }

    pub async fn prefill(
        &self,
        batch: pb::Batch,
        cached_batch: Option<pb::CachedBatch>,
    ) -> Result<StepResult> {
        let r = self
            .all(|mut c| {
                let req = pb::PrefillRequest {
                    batch: Some(batch.clone()),
                    cached_batch: cached_batch.clone(),
                };
                async move { c.prefill(req).await }
            })
            .await?;
        Ok(StepResult {
            generations: r.generations,
            batch: r.batch,
            forward_ns: r.forward_ns,
        })
    }

    pub async fn decode(&self, batches: Vec<pb::CachedBatch>) -> Result<StepResult> {
        let r = self
            .all(|mut c| {
                let req = pb::DecodeRequest {
                    batches: batches.clone(),
                };
                async move { c.decode(req).await }
            })
            .await?;
        Ok(StepResult {
            generations: r.generations,
            batch: r.batch,
            forward_ns: r.forward_ns,
        })
    }
}
