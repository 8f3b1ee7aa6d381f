//! Who may call what: the `--api-key` bearer check and CORS.
//!
//! Unlike TGI, the key protects every route that generates or reveals the model (chat
//! templates and tokenization included), is compared in constant time and case-sensitively,
//! and CORS allows the `Authorization` header so browsers can send it. Health probes and
//! `/metrics` stay open for orchestrators and scrapers, and the web UI's static page too.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// Routes that stay reachable without the key. The web UI's page and `/ui/stats` (the same
/// figures as `/metrics`) are open; the page asks for the key and sends it with its API calls.
fn is_open(method: &Method, path: &str) -> bool {
    matches!(path, "/health" | "/ping" | "/metrics")
        || (method == Method::GET && (path == "/ui" || path.starts_with("/ui/")))
        || (path == "/" && method == Method::GET)
        || method == Method::OPTIONS
}

pub async fn require_api_key(
    State(key): State<Option<String>>,
    request: Request<Body>,
    next: Next,
) -> Response {
    let Some(key) = key else {
        return next.run(request).await;
    };
    if is_open(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
        next.run(request).await
    } else {
        StatusCode::UNAUTHORIZED.into_response()
    }
}

/// CORS for `origins` (any origin when empty), for GET and POST with JSON bodies and a bearer key.
pub fn cors(origins: &[String]) -> CorsLayer {
    let allow = if origins.is_empty() {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION])
}
