//! Prometheus metrics with TGI's names, types, labels and buckets (`tgi_*`), so existing TGI
//! dashboards work, plus Tessera's own (`tessera_*`) for what TGI leaves to derivation:
//! time to first token, inter-token latency and queue time as direct histograms, the KV pool
//! and prefix cache, each shard's forward time, and build info. The recorder is installed
//! once at startup; `/metrics` (and `--prometheus-port`) render it.
//!
//! TGI's metric bugs are fixed: each HTTP request is counted once in `tgi_request_count` (TGI
//! counts chat and completions twice), `tgi_batch_concat_duration` carries the method that
//! concatenated (TGI always says `decode`), and `tgi_batch_total_tokens`, which TGI describes
//! but never sets, holds the running batch's tokens.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::layers::FanoutBuilder;

use crate::live::LiveStats;
use crate::queue::Entry;

/// TGI's latency buckets: 35 geometric steps from 150 µs.
fn duration_buckets() -> Vec<f64> {
    (0..35).map(|k| 0.00015 * 1.5f64.powi(k)).collect()
}

/// 100 linear buckets up to `max` (TGI's token-count buckets).
fn linear_buckets(max: usize) -> Vec<f64> {
    let step = (max as f64 / 100.0).max(1.0);
    (1..=100).map(|i| i as f64 * step).collect()
}

/// What `tessera_build_info` reports.
pub struct BuildInfo<'a> {
    pub model_id: &'a str,
    pub dtype: &'a str,
    pub device: &'a str,
    pub world_size: usize,
}

/// Installs the global recorder: Prometheus's, and the dashboard's live statistics beside it.
/// Must be called within the tokio runtime (it starts the recorder's upkeep task).
pub fn install(
    max_input_tokens: usize,
    max_total_tokens: usize,
) -> anyhow::Result<(PrometheusHandle, LiveStats)> {
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("duration".into()), &duration_buckets())?
        .set_buckets_for_metric(Matcher::Suffix("seconds".into()), &duration_buckets())?
        .set_buckets_for_metric(
            Matcher::Full("tgi_request_input_length".into()),
            &linear_buckets(max_input_tokens),
        )?
        .set_buckets_for_metric(
            Matcher::Full("tgi_request_generated_tokens".into()),
            &linear_buckets(max_total_tokens),
        )?
        .set_buckets_for_metric(
            Matcher::Full("tgi_request_max_new_tokens".into()),
            &linear_buckets(max_total_tokens),
        )?
        .set_buckets_for_metric(
            Matcher::Full("tgi_batch_next_size".into()),
            &(1..=1024).map(f64::from).collect::<Vec<_>>(),
        )?
        .set_buckets_for_metric(
            Matcher::Full("tgi_request_skipped_tokens".into()),
            &(0..=10).map(f64::from).collect::<Vec<_>>(),
        )?
        .build_recorder();
    let handle = prometheus.handle();
    // Histogram samples wait in a buffer until a scrape (or upkeep) folds them into buckets;
    // with nobody scraping, that buffer grows by every request. Fold them regularly.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let live = LiveStats::default();
    let fanout = FanoutBuilder::default()
        .add_recorder(prometheus)
        .add_recorder(live.clone())
        .build();
    metrics::set_global_recorder(fanout)
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    describe();
    zero_counters();
    Ok((handle, live))
}

/// Every label value of the failure and concatenation counters, and the queue and batch gauges,
/// exist from the start at 0, so `rate()`, alerts and autoscalers see a series before the first
/// request or failure (TGI creates them lazily).
fn zero_counters() {
    for name in [
        "tgi_queue_size",
        "tgi_batch_current_size",
        "tgi_batch_current_max_tokens",
        "tgi_batch_total_tokens",
        "tessera_prefix_cache_hit_ratio",
    ] {
        metrics::gauge!(name).set(0.0);
    }
    for err in [
        "validation",
        "overloaded",
        "template",
        "tool",
        "incomplete",
        "generation",
        "dropped",
    ] {
        metrics::counter!("tgi_request_failure", "err" => err).absolute(0);
    }
    for result in ["hit", "miss"] {
        metrics::counter!("tessera_grammar_requests_total", "result" => result).absolute(0);
    }
    for method in ["prefill", "decode"] {
        for name in [
            "tgi_batch_inference_count",
            "tgi_batch_inference_success",
            "tgi_batch_inference_failure",
        ] {
            metrics::counter!(name, "method" => method).absolute(0);
        }
    }
    for reason in ["backpressure", "chunking", "wait_exceeded"] {
        metrics::counter!("tgi_batch_concat", "reason" => reason).absolute(0);
    }
    for name in [
        "tgi_request_count",
        "tgi_request_success",
        "tessera_prefix_cache_prompt_tokens_total",
        "tessera_prefix_cache_hit_tokens_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
}

/// Sets `tessera_build_info` (always 1; the facts are labels, as Prometheus convention has it).
pub fn build_info(info: &BuildInfo) {
    metrics::gauge!(
        "tessera_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "git_sha" => option_env!("GIT_SHA").unwrap_or("unknown"),
        "model_id" => info.model_id.to_string(),
        "dtype" => info.dtype.to_string(),
        "device" => info.device.to_string(),
        "world_size" => info.world_size.to_string(),
    )
    .set(1.0);
}

static PROMPT_TOKENS: AtomicU64 = AtomicU64::new(0);
static CACHED_TOKENS: AtomicU64 = AtomicU64::new(0);

/// A request left the queue for a batch: its queue time and what the prefix cache gave it.
pub fn record_batched(entry: &Entry, now: Instant) {
    metrics::histogram!("tessera_request_queue_time_seconds")
        .record(now.saturating_duration_since(entry.queued).as_secs_f64());
    let prompt = u64::from(entry.request.input_length);
    let cached = entry.blocks.as_ref().map_or(0, |b| u64::from(b.cache_len));
    metrics::counter!("tessera_prefix_cache_prompt_tokens_total").increment(prompt);
    metrics::counter!("tessera_prefix_cache_hit_tokens_total").increment(cached);
    let prompt_total = PROMPT_TOKENS.fetch_add(prompt, Ordering::Relaxed) + prompt;
    let cached_total = CACHED_TOKENS.fetch_add(cached, Ordering::Relaxed) + cached;
    if prompt_total > 0 {
        metrics::gauge!("tessera_prefix_cache_hit_ratio")
            .set(cached_total as f64 / prompt_total as f64);
    }
}

/// A token went to the client: the first one gives the time to first token (from arrival,
/// validation included, as a client sees it), later ones the inter-token latency.
pub fn record_token(entry: &mut Entry, now: Instant) {
    match entry.last_token {
        None => metrics::histogram!("tessera_request_time_to_first_token_seconds").record(
            now.saturating_duration_since(entry.request.received)
                .as_secs_f64(),
        ),
        Some(last) => metrics::histogram!("tessera_request_inter_token_latency_seconds")
            .record(now.saturating_duration_since(last).as_secs_f64()),
    }
    entry.last_token = Some(now);
}

/// HELP lines, so scrapers and `promtool` see what each series means.
fn describe() {
    use Unit::{Count, Seconds};
    let histograms: &[(&'static str, Unit, &'static str)] = &[
        (
            "tgi_request_duration",
            Seconds,
            "End-to-end request latency",
        ),
        (
            "tgi_request_validation_duration",
            Seconds,
            "Request validation time",
        ),
        (
            "tgi_request_queue_duration",
            Seconds,
            "Queue time of successful requests",
        ),
        (
            "tgi_request_inference_duration",
            Seconds,
            "Inference time of successful requests",
        ),
        (
            "tgi_request_mean_time_per_token_duration",
            Seconds,
            "Mean time per generated token",
        ),
        (
            "tgi_request_generated_tokens",
            Count,
            "Tokens generated per request",
        ),
        (
            "tgi_request_input_length",
            Count,
            "Prompt tokens per request",
        ),
        (
            "tgi_request_max_new_tokens",
            Count,
            "max_new_tokens per request",
        ),
        (
            "tgi_request_skipped_tokens",
            Count,
            "Extra tokens per step (speculation; always 0)",
        ),
        (
            "tgi_batch_inference_duration",
            Seconds,
            "Shard call plus filtering, per batch step",
        ),
        (
            "tgi_batch_forward_duration",
            Seconds,
            "Model forward time, per batch step",
        ),
        (
            "tgi_batch_decode_duration",
            Seconds,
            "Token selection and detokenization time, per batch step",
        ),
        (
            "tgi_batch_filter_duration",
            Seconds,
            "Delivering tokens and filtering the batch",
        ),
        (
            "tgi_batch_concat_duration",
            Seconds,
            "Shard time spent merging batches",
        ),
        ("tgi_batch_next_size", Count, "Size of each new batch"),
        (
            "tessera_request_time_to_first_token_seconds",
            Seconds,
            "Time from arrival to the first generated token",
        ),
        (
            "tessera_request_inter_token_latency_seconds",
            Seconds,
            "Time between consecutive tokens of a request",
        ),
        (
            "tessera_request_queue_time_seconds",
            Seconds,
            "Time from queueing to batching, every request",
        ),
        (
            "tessera_shard_forward_duration_seconds",
            Seconds,
            "Model forward time reported by each shard",
        ),
        (
            "tessera_grammar_check_seconds",
            Seconds,
            "Converting and checking a grammar not in the cache (structured output)",
        ),
    ];
    for (name, unit, help) in histograms {
        describe_histogram!(*name, unit.clone(), *help);
    }
    let counters: &[(&'static str, &'static str)] = &[
        ("tgi_request_count", "HTTP generation requests received"),
        ("tgi_request_success", "Requests that finished generating"),
        ("tgi_request_failure", "Failed requests, by error kind"),
        (
            "tgi_batch_inference_count",
            "Prefill and decode calls to the shards",
        ),
        ("tgi_batch_inference_success", "Successful shard calls"),
        ("tgi_batch_inference_failure", "Failed shard calls"),
        (
            "tgi_batch_concat",
            "New requests added to a running batch, by reason",
        ),
        (
            "tessera_prefix_cache_prompt_tokens_total",
            "Prompt tokens of batched requests",
        ),
        (
            "tessera_prefix_cache_hit_tokens_total",
            "Prompt tokens served from the prefix cache",
        ),
        (
            "tessera_grammar_requests_total",
            "Requests with a grammar, by whether it was cached (hit) or checked (miss)",
        ),
    ];
    for (name, help) in counters {
        describe_counter!(*name, *help);
    }
    let gauges: &[(&'static str, &'static str)] = &[
        ("tgi_queue_size", "Requests waiting"),
        ("tgi_batch_current_size", "Requests in the running batch"),
        (
            "tgi_batch_current_max_tokens",
            "KV tokens reserved by the running batch",
        ),
        (
            "tgi_batch_total_tokens",
            "Tokens the running batch holds in the KV cache",
        ),
        (
            "tgi_batch_max_total_tokens",
            "KV token capacity from warmup",
        ),
        ("tessera_kv_total_blocks", "KV blocks in the pool"),
        ("tessera_kv_free_blocks", "KV blocks free"),
        (
            "tessera_kv_cached_blocks",
            "KV blocks held by the prefix cache",
        ),
        (
            "tessera_prefix_cache_hit_ratio",
            "Share of prompt tokens served from the prefix cache since start",
        ),
        ("tessera_build_info", "Version, model and device (value 1)"),
    ];
    for (name, help) in gauges {
        describe_gauge!(*name, *help);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_tgi() {
        let d = duration_buckets();
        assert_eq!(d.len(), 35);
        assert!((d[0] - 0.00015).abs() < 1e-12 && (d[1] - 0.000225).abs() < 1e-12);
        let l = linear_buckets(1000);
        assert_eq!((l.len(), l[0], l[99]), (100, 10.0, 1000.0));
    }
}
