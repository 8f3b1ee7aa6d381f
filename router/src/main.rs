//! `tessera-router`: connects to the shards, warms them up, and serves the HTTP APIs.
//! The launcher normally starts it; its flags and env vars mirror TGI's router.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;
use tessera_proto::telemetry::TelemetryConfig;
use tessera_router::batcher::{batching_task, BatchingConfig};
use tessera_router::block_allocator::BlockAllocator;
use tessera_router::chat_template::ChatTemplate;
use tessera_router::client::ShardedClient;
use tessera_router::infer::Infer;
use tessera_router::model_files::ModelFiles;
use tessera_router::queue::Queue;
use tessera_router::server::types::Info;
use tessera_router::server::{app, serve, AppState, HttpConfig};
use tessera_router::validation::{Limits, Validation};
use tessera_router::warmup::{warmup, Requested};

#[derive(Parser, Debug)]
#[command(
    name = "tessera-router",
    version,
    about = "Tessera HTTP router (TGI and OpenAI APIs)"
)]
struct Args {
    #[arg(long, env, default_value_t = 128)]
    max_concurrent_requests: usize,
    #[arg(long, env, default_value_t = 2)]
    max_best_of: usize,
    #[arg(long, env, default_value_t = 4)]
    max_stop_sequences: usize,
    #[arg(long, env, default_value_t = 5)]
    max_top_n_tokens: u32,
    #[arg(long, env)]
    max_input_tokens: Option<usize>,
    #[arg(long, env)]
    max_total_tokens: Option<usize>,
    #[arg(long, env, default_value_t = 1.2)]
    waiting_served_ratio: f32,
    #[arg(long, env, default_value_t = 4096)]
    max_batch_prefill_tokens: u32,
    #[arg(long, env)]
    max_batch_total_tokens: Option<u32>,
    #[arg(long, env, default_value_t = 20)]
    max_waiting_tokens: usize,
    /// Reuse the KV blocks of prompts that share a prefix (needs a shard that supports it).
    #[arg(long, env, default_value_t = true, action = clap::ArgAction::Set)]
    prefix_caching: bool,
    #[arg(long, env)]
    max_batch_size: Option<usize>,
    #[arg(long, env, default_value = "0.0.0.0")]
    hostname: String,
    #[arg(short, long, env, default_value_t = 3000)]
    port: u16,
    #[arg(long, env, default_value = "/tmp/tessera-server-0")]
    master_shard_uds_path: String,
    /// The model folder (tokenizer.json, tokenizer_config.json, config.json).
    #[arg(long, env)]
    tokenizer_name: PathBuf,
    #[arg(long, env)]
    tokenizer_config_path: Option<PathBuf>,
    /// Name reported as `model_id` (defaults to the tokenizer folder).
    #[arg(long, env)]
    model_id: Option<String>,
    #[arg(long, env, default_value_t = 2)]
    validation_workers: usize,
    #[arg(long, env, default_value_t = 4)]
    max_client_batch_size: usize,
    #[arg(long, env, default_value_t = 2_000_000)]
    payload_limit: usize,
    #[arg(long, env)]
    json_output: bool,
    /// Require `Authorization: Bearer <key>` on every route but health probes and metrics.
    #[arg(long, env)]
    api_key: Option<String>,
    /// Also serve /metrics on this port.
    #[arg(long, env)]
    prometheus_port: Option<u16>,
    /// Do not serve the web playground and dashboard at /ui.
    #[arg(long, env)]
    disable_ui: bool,
    /// Refuse grammars, `response_format` and tools (422 "grammar is not supported").
    #[arg(long, env)]
    disable_grammar_support: bool,
    /// Export traces over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317).
    #[arg(long, env)]
    otlp_endpoint: Option<String>,
    /// `service.name` of the router's spans.
    #[arg(long, env, default_value = "text-generation-inference.router")]
    otlp_service_name: String,
    /// Allowed CORS origins (repeat the flag); any origin when unset.
    #[arg(long, env, value_delimiter = ',')]
    cors_allow_origin: Vec<String>,
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.validation_workers == 0 {
        anyhow::bail!("`validation_workers` must be > 0");
    }
    if args.max_batch_size == Some(0) {
        anyhow::bail!("`max_batch_size` must be > 0");
    }
    let hostname: IpAddr = args.hostname.parse().unwrap_or_else(|_| {
        tracing::warn!("Invalid hostname, defaulting to 0.0.0.0");
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    });
    let addr = SocketAddr::new(hostname, args.port);
    // Fail on a busy port before the (slow) warmup, not after it.
    drop(
        std::net::TcpListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?,
    );

    let files = ModelFiles::load(&args.tokenizer_name, args.tokenizer_config_path.as_deref())?;
    let chat_template = match &files.chat_template {
        Some(src) => Some(
            ChatTemplate::new(src, files.bos_token.clone(), files.eos_token.clone())
                .map_err(|e| anyhow::anyhow!("invalid chat template: {e}"))?,
        ),
        None => None,
    };
    let client = ShardedClient::connect(&args.master_shard_uds_path).await?;
    let shard_info = client.info().await?;
    tracing::info!(
        ?shard_info,
        world_size = client.world_size(),
        "connected to shards"
    );
    let chunking = shard_info.support_chunking;
    if chunking {
        tracing::warn!("Model supports prefill chunking. `waiting_served_ratio` and `max_waiting_tokens` will be ignored.");
    }
    let requested = Requested {
        chunking,
        max_input_tokens: args.max_input_tokens,
        max_total_tokens: args.max_total_tokens,
        max_batch_prefill_tokens: args.max_batch_prefill_tokens,
        max_batch_total_tokens: args.max_batch_total_tokens,
    };
    let positions = files.max_position_embeddings.unwrap_or(usize::MAX);
    let limits = warmup(&client, &requested, positions).await?;
    tracing::info!(
        ?limits,
        "warmup done; setting max batch total tokens to {}",
        limits.max_batch_total_tokens
    );

    let (metrics, live) =
        tessera_router::metrics::install(limits.max_input_tokens, limits.max_total_tokens)?;
    ::metrics::gauge!("tgi_batch_max_total_tokens").set(limits.max_batch_total_tokens as f64);
    let model_name = args
        .model_id
        .clone()
        .unwrap_or_else(|| args.tokenizer_name.display().to_string());
    tessera_router::metrics::build_info(&tessera_router::metrics::BuildInfo {
        model_id: &model_name,
        dtype: &shard_info.dtype,
        device: &shard_info.device_type,
        world_size: client.world_size(),
    });
    let validation = Validation::new(
        Arc::new(files.tokenizer),
        Limits {
            max_best_of: args.max_best_of,
            max_stop_sequences: args.max_stop_sequences,
            max_top_n_tokens: args.max_top_n_tokens,
            max_input_tokens: limits.max_input_tokens,
            max_total_tokens: limits.max_total_tokens,
        },
        tessera_router::grammar::Grammars::new(!args.disable_grammar_support),
    );
    let prefix_caching = args.prefix_caching && shard_info.use_prefix_caching;
    tracing::info!(
        "prefix caching {}",
        if prefix_caching { "on" } else { "off" }
    );
    let queue = Queue::new(BlockAllocator::new(
        limits.max_batch_total_tokens,
        shard_info.block_size,
        prefix_caching,
    ));
    let healthy = Arc::new(AtomicBool::new(true));
    let batching = BatchingConfig {
        chunking,
        max_batch_prefill_tokens: limits.max_batch_prefill_tokens,
        max_batch_total_tokens: limits.max_batch_total_tokens,
        max_batch_size: args.max_batch_size,
        max_waiting_tokens: args.max_waiting_tokens,
        waiting_served_ratio: args.waiting_served_ratio,
    };
    tokio::spawn(batching_task(
        client.clone(),
        queue.clone(),
        batching,
        healthy.clone(),
    ));
    let infer = Infer::new(
        validation,
        queue,
        client,
        args.max_concurrent_requests,
        healthy,
    );
    let info = Info {
        model_id: model_name,
        model_sha: None,
        model_pipeline_tag: None,
        max_concurrent_requests: args.max_concurrent_requests,
        max_best_of: args.max_best_of,
        max_stop_sequences: args.max_stop_sequences,
        max_input_tokens: limits.max_input_tokens,
        max_total_tokens: limits.max_total_tokens,
        dtype: shard_info.dtype.clone(),
        device_type: shard_info.device_type.clone(),
        max_batch_prefill_tokens: limits.max_batch_prefill_tokens,
        max_batch_total_tokens: limits.max_batch_total_tokens,
        validation_workers: args.validation_workers,
        max_client_batch_size: args.max_client_batch_size,
        router: "tessera-router",
        version: env!("CARGO_PKG_VERSION"),
        sha: option_env!("GIT_SHA"),
        docker_label: option_env!("DOCKER_LABEL"),
    };
    let compute_type =
        std::env::var("COMPUTE_TYPE").unwrap_or_else(|_| shard_info.device_type.clone());
    if let Some(port) = args.prometheus_port {
        let metrics_addr = SocketAddr::new(hostname, port);
        let listener = tokio::net::TcpListener::bind(metrics_addr)
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot listen on {metrics_addr} (--prometheus-port): {e}")
            })?;
        let app = tessera_router::server::metrics_app(metrics.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        tracing::info!("metrics on http://{metrics_addr}/metrics");
    }
    let state = Arc::new(AppState {
        infer,
        info,
        chat_template,
        compute_type,
        metrics,
        live,
    });
    let http = HttpConfig {
        payload_limit: args.payload_limit,
        api_key: args.api_key,
        cors_allow_origin: args.cors_allow_origin,
        ui: !args.disable_ui,
    };
    serve(addr, app(state, http)).await
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: Tokio runtime failed to start: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The OTLP exporter runs on this runtime; the guard flushes it before the runtime stops.
    let telemetry = {
        let _runtime = rt.enter();
        tessera_proto::telemetry::init(&TelemetryConfig {
            json: args.json_output,
            stderr: false,
            otlp_endpoint: args.otlp_endpoint.clone(),
            service_name: args.otlp_service_name.clone(),
            resource: vec![],
        })
    };
    let _telemetry = match telemetry {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("Error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
