//! Logs and traces for the router and the shards, and the trace context on the wire.
//!
//! It lives here because this is the one crate both processes link: a trace that starts in an
//! HTTP request continues in the shard only if both sides agree on how the W3C `traceparent`
//! travels in gRPC metadata, which makes it part of the protocol. Only spans from Tessera's own
//! crates are exported, so the exporter's own gRPC calls can never feed back into the traces.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use thiserror::Error;
use tonic::codegen::http::{HeaderMap, HeaderName, HeaderValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{filter, EnvFilter, Layer};

#[derive(Debug, Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("cannot install the log subscriber: {0}")]
    Subscriber(String),
}

/// How a process logs and traces.
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    /// One JSON object per line instead of compact text.
    pub json: bool,
    /// Log to stderr (the shards, whose stdout the launcher does not parse) or stdout.
    pub stderr: bool,
    /// OTLP/gRPC collector, e.g. `http://127.0.0.1:4317`; no traces are exported without it.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Extra resource attributes (the shard's rank, for instance).
    pub resource: Vec<(&'static str, String)>,
}

/// Flushes and stops the trace exporter when dropped, so the last spans are not lost on exit.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("OTLP exporter shutdown: {e}");
            }
        }
    }
}

/// The log filter: `LOG_LEVEL` (TGI's variable), else `RUST_LOG`, else `info`.
fn env_filter() -> EnvFilter {
    EnvFilter::try_from_env("LOG_LEVEL")
        .or_else(|_| EnvFilter::try_from_env("RUST_LOG"))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber: formatted logs and, with an endpoint, the OTLP exporter.
/// Must be called inside a Tokio runtime when an endpoint is given (the gRPC exporter runs on it).
pub fn init(config: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    let ansi = if config.stderr {
        std::io::IsTerminal::is_terminal(&std::io::stderr())
    } else {
        std::io::IsTerminal::is_terminal(&std::io::stdout())
    };
    let writer = if config.stderr {
        tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr)
    } else {
        tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stdout)
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    let fmt = if config.json {
        fmt.json().flatten_event(true).boxed()
    } else {
        fmt.compact().boxed()
    };

    let (otel, provider) = match &config.otlp_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| TelemetryError::Exporter {
                    endpoint: endpoint.clone(),
                    reason: e.to_string(),
                })?;
            let resource = Resource::builder()
                .with_service_name(config.service_name.clone())
                .with_attributes(
                    config
                        .resource
                        .iter()
                        .map(|(k, v)| KeyValue::new(*k, v.clone())),
                )
                .build();
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build();
            let tracer = provider.tracer("tessera");
            let layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(filter::filter_fn(|meta| {
                    meta.target().starts_with("tessera")
                }));
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };

    tracing_subscriber::registry()
        .with(env_filter())
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    Ok(TelemetryGuard { provider })
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The remote parent carried by W3C `traceparent`/`tracestate` headers (HTTP or gRPC metadata,
/// which are the same header map on the wire). Empty when there is none or it is malformed.
pub fn extract(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// Makes `span` a child of the remote context in `headers`, if there is a valid one.
pub fn set_remote_parent(span: &tracing::Span, headers: &HeaderMap) {
    let parent = extract(headers);
    use opentelemetry::trace::TraceContextExt;
    if parent.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed, and then there is nothing to link.
        let _ = span.set_parent(parent);
    }
}

/// Writes the trace context of `span` into outgoing gRPC metadata, so the shard's spans join
/// the same trace. Writes nothing when tracing is off.
pub fn inject<T>(span: &tracing::Span, request: &mut tonic::Request<T>) {
    let mut headers = HeaderMap::new();
    TraceContextPropagator::new()
        .inject_context(&span.context(), &mut HeaderInjector(&mut headers));
    for (name, value) in headers.iter() {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(name.as_str().as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_bytes()),
        ) {
            request.metadata_mut().insert(key, value);
        }
    }
}

/// The W3C headers of a gRPC request's metadata, for [`set_remote_parent`].
pub fn metadata_headers(metadata: &tonic::metadata::MetadataMap) -> HeaderMap {
    metadata.clone().into_headers()
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn traceparent_round_trips_through_metadata() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let cx = extract(&headers);
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");

        let mut out = HeaderMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(&mut out));
        assert_eq!(out.get("traceparent"), headers.get("traceparent"));
    }

    #[test]
    fn malformed_or_reserved_traceparent_is_ignored() {
        for bad in [
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "garbage",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("traceparent", HeaderValue::from_static(bad));
            assert!(!extract(&headers).span().span_context().is_valid(), "{bad}");
        }
    }
}
