//! gRPC client for the shards, over Unix sockets.
//!
//! The router talks to rank 0's socket first, asks it for every rank's socket
//! (ServiceDiscovery), and from then on sends each call to all ranks at once: tensor-parallel
//! ranks must run the same batches in lockstep. Results are read from rank 0.
//!
//! A call that reaches some ranks but not others throws the group out of step: the ranks that
//! got it wait in their collectives for a peer that never joins, then pair their collectives
//! with the peer's *next* call. That happens when the launcher restarts the group and one new
//! rank is serving before another. So a Prefill (the only call that can start a forward in a
//! fresh group: Decode needs a batch the shard already holds) first checks with Info, which
//! does not wait for the model, that every rank answers, and is not sent to any if one does
//! not.

use std::path::PathBuf;
use std::time::Duration;

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

/// How long a rank may take to answer Info before a Prefill: long enough for a busy host,
/// short enough that a stopped rank fails the request rather than hanging it.
const REACH_TIMEOUT: Duration = Duration::from_secs(5);

/// One client per rank; calls fan out to all of them.
#[derive(Clone)]
pub struct ShardedClient {
    clients: Vec<TextGenerationServiceClient<Channel>>,
}

/// Results of a Prefill or Decode, with rank 0's timings.
pub struct StepResult {
    pub generations: Vec<pb::Generation>,
    pub batch: Option<pb::CachedBatch>,
    pub forward_ns: u64,
    pub decode_ns: u64,
    pub concat_ns: Option<u64>,
}

/// A request carrying the current span's trace context, so the shard's spans join its trace.
fn traced<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    tessera_proto::telemetry::inject(&tracing::Span::current(), &mut request);
    request
}

/// Each rank's forward time, so a straggling rank shows up.
fn record_forward(method: &'static str, forward_ns: impl Iterator<Item = u64>) {
    for (rank, ns) in forward_ns.enumerate() {
        metrics::histogram!(
            "tessera_shard_forward_duration_seconds",
            "rank" => rank.to_string(),
            "method" => method
        )
        .record(ns as f64 / 1e9);
    }
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

    /// Every rank answers Info within `REACH_TIMEOUT`; otherwise which one did not, and why.
    async fn reach_all(&self) -> Result<()> {
        if self.clients.len() < 2 {
            return Ok(()); // a single rank has no peer to fall out of step with
        }
        let calls = self
            .clients
            .iter()
            .cloned()
            .enumerate()
            .map(|(rank, mut c)| async move {
                match tokio::time::timeout(REACH_TIMEOUT, c.info(pb::InfoRequest {})).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(ClientError::Connection(format!(
                        "shard {rank} is not serving: {}",
                        e.message()
                    ))),
                    Err(_) => Err(ClientError::Connection(format!(
                        "shard {rank} did not answer within {REACH_TIMEOUT:?}"
                    ))),
                }
            });
        try_join_all(calls).await.map(|_| ())
    }

    /// Sends a call to every rank at once; the results in rank order.
    async fn every<T, F, Fut>(&self, f: F) -> Result<Vec<T>>
    where
        F: Fn(TextGenerationServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let results = try_join_all(self.clients.iter().cloned().map(f)).await?;
        if results.is_empty() {
            return Err(ClientError::Connection("no shards".into()));
        }
        Ok(results.into_iter().map(|r| r.into_inner()).collect())
    }

    /// Sends a call to every rank; rank 0's result.
    async fn all<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(TextGenerationServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.every(f)
            .await?
            .into_iter()
            .next()
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
        self.reach_all().await?;
        let ranks = self
            .every(|mut c| {
                let req = traced(pb::PrefillRequest {
                    batch: Some(batch.clone()),
                    cached_batch: cached_batch.clone(),
                });
                async move { c.prefill(req).await }
            })
            .await?;
        record_forward("prefill", ranks.iter().map(|r| r.forward_ns));
        let r = ranks
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Connection("no shards".into()))?;
        Ok(StepResult {
            generations: r.generations,
            batch: r.batch,
            forward_ns: r.forward_ns,
            decode_ns: r.decode_ns,
            concat_ns: r.concat_ns,
        })
    }

    pub async fn decode(&self, batches: Vec<pb::CachedBatch>) -> Result<StepResult> {
        let ranks = self
            .every(|mut c| {
                let req = traced(pb::DecodeRequest {
                    batches: batches.clone(),
                });
                async move { c.decode(req).await }
            })
            .await?;
        record_forward("decode", ranks.iter().map(|r| r.forward_ns));
        let r = ranks
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Connection("no shards".into()))?;
        Ok(StepResult {
            generations: r.generations,
            batch: r.batch,
            forward_ns: r.forward_ns,
            decode_ns: r.decode_ns,
            concat_ns: r.concat_ns,
        })
    }
}
