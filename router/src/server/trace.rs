//! One span per API request, the root of everything the request causes in the router and
//! the shards. It continues the caller's trace when the request carries a W3C `traceparent`
//! (a malformed one, or version `ff`, is ignored and a new trace starts).
//!
//! Probes, scrapes and the web UI's page and stats polling (`/health`, `/ping`, `/metrics`,
//! `GET /`, `GET /ui/...`) get no span: at one per second they would bury the traces people
//! look for.

use axum::extract::Request;
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use tessera_proto::telemetry;
use tracing::Instrument;

fn is_probe(method: &Method, path: &str) -> bool {
    matches!(path, "/health" | "/ping" | "/metrics")
        || (method == Method::GET && (path == "/" || path == "/ui" || path.starts_with("/ui/")))
}

pub async fn request_span(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    if is_probe(&method, &path) {
        return next.run(request).await;
    }
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {path}"),
        otel.kind = "server",
        http.request.method = %method,
        url.path = %path,
        http.response.status_code = tracing::field::Empty,
    );
    telemetry::set_remote_parent(&span, request.headers());
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_are_not_traced() {
        assert!(is_probe(&Method::GET, "/health"));
        assert!(is_probe(&Method::GET, "/metrics"));
        assert!(is_probe(&Method::GET, "/"));
        assert!(!is_probe(&Method::POST, "/"));
        assert!(!is_probe(&Method::POST, "/generate"));
    }
}
