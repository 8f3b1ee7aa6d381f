//! The HTTP server: the route table, shared state, and the operational endpoints (`/health`,
//! `/ping`, `/info`, `/metrics`, `/invocations`). Generation routes live in `generate` (TGI),
//! `openai` (chat) and `completions`; `tokenize` shows what the model sees; `access` holds the
//! API key and CORS; `json` the body extractor; `docs` the OpenAPI document; `trace` the
//! request span that continues a caller's W3C trace; `ui` the built-in playground and dashboard.

pub mod access;
pub mod completions;
pub mod docs;
pub mod generate;
pub mod json;
pub mod openai;
pub mod openai_types;
pub mod sse;
pub mod tokenize;
pub mod tools;
pub mod trace;
pub mod types;
pub mod ui;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::chat_template::ChatTemplate;
use crate::error::ErrorResponse;
use crate::infer::Infer;
use json::JsonBody;
use types::Info;

pub struct AppState {
    pub infer: Infer,
    pub info: Info,
    pub chat_template: Option<ChatTemplate>,
    pub compute_type: String,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    pub live: crate::live::LiveStats,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    pub fn system_fingerprint(&self) -> String {
        format!("{}-native", self.info.version)
    }
}

/// HTTP settings that shape the router but are not per-request state.
pub struct HttpConfig {
    pub payload_limit: usize,
    pub api_key: Option<String>,
    pub cors_allow_origin: Vec<String>,
    /// Serve the web UI at `/ui` (`--disable-ui` turns it off).
    pub ui: bool,
}

pub fn app(state: SharedState, http: HttpConfig) -> Router {
    let ui = if http.ui { ui::routes() } else { Router::new() };
    Router::new()
        .merge(ui)
        .route("/", get(root_health).post(generate::compat_generate))
        .route("/generate", post(generate::generate))
        .route("/generate_stream", post(generate::generate_stream))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(openai::models))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/chat_tokenize", post(tokenize::chat_tokenize))
        .route("/invocations", post(invocations))
        .route("/health", get(health))
        .route("/ping", get(ping))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(http.payload_limit))
        .layer(axum::middleware::from_fn_with_state(
            http.api_key,
            access::require_api_key,
        ))
        .layer(access::cors(&http.cors_allow_origin))
        .layer(axum::middleware::from_fn(trace::request_span))
        .with_state(state)
        .merge(docs::routes())
}

/// 200 when the shards answer (a real one-token generation after any failure), else 503.
#[utoipa::path(get, path = "/health", tag = "Text Generation Inference",
    responses((status = 200, description = "Healthy"), (status = 503, description = "Unhealthy", body = ErrorResponse)))]
async fn health(State(state): State<SharedState>) -> Response {
    if state.infer.health().await {
        StatusCode::OK.into_response()
    } else {
        let body = ErrorResponse {
            error: "unhealthy".into(),
            error_type: "healthcheck".into(),
        };
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

#[utoipa::path(post, path = "/invocations", tag = "Text Generation Inference",
    request_body(content = Object, description = "A `GenerateRequest`, `ChatRequest` or `CompletionRequest`"),
    responses((status = 200, description = "As the route the request belongs to"), (status = 422, description = "Invalid request", body = ErrorResponse)))]
/// SageMaker's single route: a generate, chat or completions request, told apart by its
/// fields (`inputs`, `messages`, `prompt`, in TGI's order).
async fn invocations(
    State(state): State<SharedState>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> Response {
    fn parse<T: serde::de::DeserializeOwned>(body: serde_json::Value) -> Result<T, Response> {
        serde_json::from_value(body).map_err(|e| {
            let body = ErrorResponse {
                error: format!("Failed to deserialize the JSON body into the target type: {e}"),
                error_type: "validation".into(),
            };
            (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
        })
    }
    if body.get("inputs").is_some() {
        match parse(body) {
            Ok(r) => generate::compat_generate(State(state), JsonBody(r)).await,
            Err(resp) => resp,
        }
    } else if body.get("messages").is_some() {
        match parse(body) {
            Ok(r) => openai::chat_completions(State(state), JsonBody(r))
                .await
                .unwrap_or_else(|e| e.into_response()),
            Err(resp) => resp,
        }
    } else if body.get("prompt").is_some() {
        match parse(body) {
            Ok(r) => completions::completions(State(state), JsonBody(r)).await,
            Err(resp) => resp,
        }
    } else {
        let body = ErrorResponse {
            error: "expected one of `inputs`, `messages` or `prompt`".into(),
            error_type: "validation".into(),
        };
        (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
    }
}

/// The same as `/health` (TGI serves health here too).
#[utoipa::path(get, path = "/ping", tag = "Text Generation Inference",
    responses((status = 200, description = "Healthy"), (status = 503, description = "Unhealthy", body = ErrorResponse)))]
async fn ping(state: State<SharedState>) -> Response {
    health(state).await
}

/// The same as `/health`.
#[utoipa::path(get, path = "/", tag = "Text Generation Inference",
    responses((status = 200, description = "Healthy"), (status = 503, description = "Unhealthy", body = ErrorResponse)))]
async fn root_health(state: State<SharedState>) -> Response {
    health(state).await
}

/// Prometheus metrics (TGI's `tgi_*` names), in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "Text Generation Inference",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
async fn metrics(State(state): State<SharedState>) -> String {
    state.metrics.render()
}

/// Model and server facts.
#[utoipa::path(get, path = "/info", tag = "Text Generation Inference", responses((status = 200, description = "Model and server facts", body = Info)))]
async fn info(State(state): State<SharedState>) -> Json<Info> {
    Json(state.info.clone())
}

/// The `--prometheus-port` listener: `/metrics` alone.
pub fn metrics_app(handle: metrics_exporter_prometheus::PrometheusHandle) -> Router {
    Router::new().route("/metrics", get(move || std::future::ready(handle.render())))
}

/// How long a client may take to send a request's headers. Without a limit, a client that
/// trickles a header byte now and then (slowloris) holds its connection, and with enough of
/// them, every connection the process may open.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `app` until SIGINT or SIGTERM, then lets in-flight requests finish.
///
/// hyper's own connection loop rather than `axum::serve`, which has no header timeout.
pub async fn serve(addr: SocketAddr, app: Router) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    tracing::info!("listening on http://{addr}");
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(shutdown_signal());
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to close.
                    tracing::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let service = TowerToHyperService::new(app.clone());
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("connection ended: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("signal received, starting graceful shutdown");
}
