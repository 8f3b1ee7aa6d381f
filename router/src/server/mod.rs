//! The HTTP server: routes, shared state, and the operational endpoints (`/health`, `/info`).
//! Generation routes live in `generate` (TGI) and `openai` (OpenAI-compatible).

pub mod generate;
pub mod openai;
pub mod types;

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
use types::Info;

pub struct AppState {
    pub infer: Infer,
    pub info: Info,
    pub chat_template: Option<ChatTemplate>,
    pub compute_type: String,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    pub fn system_fingerprint(&self) -> String {
        format!("{}-native", self.info.version)
    }
}

pub fn app(state: SharedState, payload_limit: usize) -> Router {
    Router::new()
        .route("/", get(health).post(generate::compat_generate))
        .route("/generate", post(generate::generate))
        .route("/generate_stream", post(generate::generate_stream))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route("/health", get(health))
        .route("/ping", get(health))
        .route("/info", get(info))
        .layer(DefaultBodyLimit::max(payload_limit))
        .with_state(state)
}

async fn health(State(state): State<SharedState>) -> Response {
    if state.infer.health().await {
        StatusCode::OK.into_response()
    } else {
        let body = ErrorResponse { error: "unhealthy".into(), error_type: "healthcheck".into() };
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

async fn info(State(state): State<SharedState>) -> Json<Info> {
    Json(state.info.clone())
}

/// Serves `app` until SIGINT or SIGTERM, then lets in-flight requests finish.
pub async fn serve(addr: SocketAddr, app: Router) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
    tracing::info!("listening on http://{addr}");
    axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("signal received, starting graceful shutdown");
}
