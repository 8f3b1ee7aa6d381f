//! The built-in playground and live dashboard at `/ui` (sources in `router/ui`, built by
//! `build.rs` and embedded in the binary: the machines that run Tessera may be offline, so
//! nothing comes from a CDN), and `/ui/stats`, the JSON the dashboard polls every second.
//!
//! The page is static and open; it asks for the API key itself and sends it with each call.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use super::SharedState;

mod assets {
    include!(concat!(env!("OUT_DIR"), "/ui_assets.rs"));
}

fn content_type(path: &str) -> &'static str {
    match path.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

fn asset(path: &str) -> Response {
    match assets::ASSETS.iter().find(|(name, _)| *name == path) {
        Some((name, bytes)) => {
            // Hashed asset names never change content; the page itself must be revalidated.
            let cache = if name.starts_with("assets/") {
                "public, max-age=31536000, immutable"
            } else {
                "no-cache"
            };
            (
                [
                    (header::CONTENT_TYPE, content_type(name)),
                    (header::CACHE_CONTROL, cache),
                ],
                *bytes,
            )
                .into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn index() -> Response {
    asset("index.html")
}

async fn file(Path(path): Path<String>) -> Response {
    asset(&path)
}

async fn stats(State(state): State<SharedState>) -> Json<crate::live::Snapshot> {
    Json(state.live.snapshot())
}

pub fn routes() -> Router<SharedState> {
    Router::new()
        .route("/ui", get(index))
        .route("/ui/", get(index))
        .route("/ui/stats", get(stats))
        .route("/ui/{*path}", get(file))
        .layer(tower_http::compression::CompressionLayer::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_every_asset_it_names_are_embedded() {
        let (first, page) = assets::ASSETS[0];
        assert_eq!(first, "index.html");
        let page = String::from_utf8_lossy(page);
        for name in page
            .split("/ui/")
            .skip(1)
            .filter_map(|s| s.split('"').next())
        {
            assert!(
                assets::ASSETS.iter().any(|(n, _)| *n == name),
                "{name} is not embedded"
            );
        }
        assert_eq!(
            content_type("assets/x.js"),
            "text/javascript; charset=utf-8"
        );
    }
}
