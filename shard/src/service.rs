//! The gRPC face of the shard: `generate.v3.TextGenerationService` over a Unix socket.
//!
//! tonic handlers are async, libtorch work is blocking: every call takes the runner's lock on a
//! blocking thread, and any panic from libtorch is caught and returned as an INTERNAL status so
//! one bad batch cannot take the server down with a poisoned lock.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tessera_proto as pb;
use tessera_proto::telemetry;
use tessera_proto::text_generation_service_server::{
    TextGenerationService, TextGenerationServiceServer,
};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::error::{Result, ShardError};
use crate::runner::{kind_name, Runner};

pub struct ShardService {
    runner: Arc<Mutex<Runner>>,
    info: pb::InfoResponse,
    urls: Vec<String>,
    memory_fraction: f64,
    /// Where Warmup records the pool geometry for a restarted shard (see `warmup`).
    pool_record: Option<PathBuf>,
    /// Notified once a collective has failed: the process must exit (see `group_failure`).
    group_failed: Arc<tokio::sync::Notify>,
}

/// The socket of `rank` for the base path `uds_path` (TGI's `{path}-{rank}` convention).
pub fn socket_path(uds_path: &str, rank: usize) -> PathBuf {
    PathBuf::from(format!("{uds_path}-{rank}"))
}

impl ShardService {
    pub fn new(runner: Runner, uds_path: &str, world_size: usize, memory_fraction: f64) -> Self {
        let device = runner.model.device();
        let info = pb::InfoResponse {
            requires_padding: false,
            dtype: kind_name(runner.model.kind()).to_string(),
            device_type: if device.is_cuda() { "cuda" } else { "cpu" }.to_string(),
            window_size: runner.model.config.sliding_window().map(|w| w as u32),
            speculate: 0,
            // TGI's PREFILL_CHUNKING switch: 0 makes the router use its non-chunking loop.
            support_chunking: std::env::var("PREFILL_CHUNKING")
                .map_or(true, |v| v != "0" && v != "false"),
            use_prefix_caching: true,
            attention_impl: "paged".to_string(),
            block_size: crate::runner::BLOCK_SIZE as u32,
        };
        let urls = (0..world_size)
            .map(|r| format!("unix://{}", socket_path(uds_path, r).display()))
            .collect();
        Self {
            runner: Arc::new(Mutex::new(runner)),
            info,
            urls,
            memory_fraction,
            pool_record: None,
            group_failed: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Completes once this rank's tensor-parallel group has broken (a collective failed on a
    /// dead, hung or out-of-step peer). No call can succeed after that, so the binary exits
    /// and the launcher restarts the group, as for a crash.
    pub fn group_failure(&self) -> Arc<tokio::sync::Notify> {
        self.group_failed.clone()
    }

    pub fn with_pool_record(mut self, path: PathBuf) -> Self {
        self.pool_record = Some(path);
        self
    }

    pub fn into_server(self) -> TextGenerationServiceServer<Self> {
        TextGenerationServiceServer::new(self)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    async fn with_runner<T, F>(&self, f: F) -> std::result::Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut Runner) -> Result<T> + Send + 'static,
    {
        let runner = self.runner.clone();
        // The runner's own spans (forward, sample) belong under the RPC's span.
        let span = tracing::Span::current();
        let joined = tokio::task::spawn_blocking(move || {
            let _span = span.entered();
            let mut guard = runner
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let out = std::panic::catch_unwind(AssertUnwindSafe(|| f(&mut guard)));
            (out, guard.group_broken())
        })
        .await
        .map_err(|e| Status::internal(format!("worker thread failed: {e}")))?;
        let (joined, broken) = joined;
        if broken {
            self.group_failed.notify_one();
        }
        match joined {
            Ok(result) => result.map_err(|e| {
                tracing::error!("{e}");
                Status::from(e)
            }),
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!("model runner panicked: {msg}");
                Err(Status::internal(format!("model runner failed: {msg}")))
            }
        }
    }
}

/// The span of one Prefill or Decode, continuing the router's trace from the call's metadata.
fn rpc_span<T>(method: &'static str, request: &Request<T>) -> tracing::Span {
    let span = tracing::info_span!("shard", otel.name = method, otel.kind = "server");
    let headers = telemetry::metadata_headers(request.metadata());
    telemetry::set_remote_parent(&span, &headers);
    span
}

#[tonic::async_trait]
impl TextGenerationService for ShardService {
    async fn info(
        &self,
        _: Request<pb::InfoRequest>,
    ) -> std::result::Result<Response<pb::InfoResponse>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn service_discovery(
        &self,
        _: Request<pb::ServiceDiscoveryRequest>,
    ) -> std::result::Result<Response<pb::ServiceDiscoveryResponse>, Status> {
        Ok(Response::new(pb::ServiceDiscoveryResponse {
            urls: self.urls.clone(),
        }))
    }

    async fn clear_cache(
        &self,
        r: Request<pb::ClearCacheRequest>,
    ) -> std::result::Result<Response<pb::ClearCacheResponse>, Status> {
        let id = r.into_inner().id;
        self.with_runner(move |run| {
            run.clear(id);
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::ClearCacheResponse {}))
    }

    async fn filter_batch(
        &self,
        r: Request<pb::FilterBatchRequest>,
    ) -> std::result::Result<Response<pb::FilterBatchResponse>, Status> {
        let r = r.into_inner();
        let batch = self
            .with_runner(move |run| run.filter(r.batch_id, &r.request_ids))
            .await?;
        Ok(Response::new(pb::FilterBatchResponse { batch }))
    }

    async fn warmup(
        &self,
        r: Request<pb::WarmupRequest>,
    ) -> std::result::Result<Response<pb::WarmupResponse>, Status> {
        let span = rpc_span("warmup", &r);
        let r = r.into_inner();
        let fraction = self.memory_fraction;
        let record = self.pool_record.clone();
        let resp = self
            .with_runner(move |run| {
                let resp = crate::warmup::warmup(run, &r, fraction)?;
                if let Some(path) = &record {
                    crate::warmup::save_pool_record(path, run, r.max_prefill_tokens);
                }
                Ok(resp)
            })
            .instrument(span)
            .await?;
        Ok(Response::new(resp))
    }

    async fn prefill(
        &self,
        r: Request<pb::PrefillRequest>,
    ) -> std::result::Result<Response<pb::PrefillResponse>, Status> {
        let start = std::time::Instant::now();
        let span = rpc_span("prefill", &r);
        let r = r.into_inner();
        let out = self
            .with_runner(move |run| {
                let batch = r
                    .batch
                    .ok_or_else(|| ShardError::Request("Prefill without a batch".into()))?;
                run.prefill(&batch, r.cached_batch.as_ref())
            })
            .instrument(span)
            .await?;
        Ok(Response::new(pb::PrefillResponse {
            generations: out.generations,
            batch: out.batch,
            forward_ns: out.forward_ns,
            decode_ns: out.decode_ns,
            total_ns: start.elapsed().as_nanos() as u64,
            concat_ns: out.concat_ns,
        }))
    }

    async fn decode(
        &self,
        r: Request<pb::DecodeRequest>,
    ) -> std::result::Result<Response<pb::DecodeResponse>, Status> {
        let start = std::time::Instant::now();
        let span = rpc_span("decode", &r);
        let batches = r.into_inner().batches;
        let out = self
            .with_runner(move |run| run.decode(&batches))
            .instrument(span)
            .await?;
        Ok(Response::new(pb::DecodeResponse {
            generations: out.generations,
            batch: out.batch,
            forward_ns: out.forward_ns,
            decode_ns: out.decode_ns,
            total_ns: start.elapsed().as_nanos() as u64,
            concat_ns: out.concat_ns,
        }))
    }

    async fn health(
        &self,
        _: Request<pb::HealthRequest>,
    ) -> std::result::Result<Response<pb::HealthResponse>, Status> {
        self.with_runner(|run| {
            let device = run.model.device();
            let t = tch::Tensor::ones([2], (tch::Kind::Float, device));
            let sum = f64::try_from(t.sum(tch::Kind::Float))?;
            if sum == 2.0 {
                Ok(())
            } else {
                Err(ShardError::Request("device returned a wrong result".into()))
            }
        })
        .await?;
        Ok(Response::new(pb::HealthResponse {}))
    }
}
