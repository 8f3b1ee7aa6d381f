//! Live statistics for the built-in dashboard (`GET /ui/stats`).
//!
//! A second `metrics` recorder beside Prometheus's (both behind one fanout), so the dashboard
//! sees exactly the observations `/metrics` counts, without scraping and parsing our own text.
//! It keeps only what the dashboard draws: a few counters and gauges, and the last minute of
//! time-to-first-token and inter-token-latency samples, from which it computes percentiles.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use serde::Serialize;

/// Percentiles and token rates look back this far.
const WINDOW: Duration = Duration::from_secs(60);
/// Bound on the samples kept per histogram (the oldest go first).
const MAX_SAMPLES: usize = 50_000;

#[derive(Default)]
struct Value(AtomicU64);

impl CounterFn for Value {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

impl GaugeFn for Value {
    fn increment(&self, value: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some((f64::from_bits(b) + value).to_bits())
            });
    }
    fn decrement(&self, value: f64) {
        GaugeFn::increment(self, -value);
    }
    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
}

impl Value {
    fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    fn gauge(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Timestamped samples of one histogram, pruned to the window.
#[derive(Default)]
struct Window(Mutex<VecDeque<(Instant, f64)>>);

impl HistogramFn for Window {
    fn record(&self, value: f64) {
        let now = Instant::now();
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        while w.len() >= MAX_SAMPLES
            || w.front()
                .is_some_and(|(t, _)| now.duration_since(*t) > WINDOW)
        {
            w.pop_front();
        }
        w.push_back((now, value));
    }
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
}

impl Window {
    /// Percentiles over the window, and how many samples fell in the last `recent`.
    fn summary(&self, recent: Duration) -> (Percentiles, usize) {
        let now = Instant::now();
        let w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut values: Vec<f64> = w
            .iter()
            .filter(|(t, _)| now.duration_since(*t) <= WINDOW)
            .map(|(_, v)| *v)
            .collect();
        let last = w
            .iter()
            .rev()
            .take_while(|(t, _)| now.duration_since(*t) <= recent)
            .count();
        values.sort_by(f64::total_cmp);
        (percentiles(&values), last)
    }
}

/// Nearest-rank percentiles of sorted values.
fn percentiles(sorted: &[f64]) -> Percentiles {
    let at = |q: f64| -> Option<f64> {
        let n = sorted.len();
        (n > 0).then(|| sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1])
    };
    Percentiles {
        count: sorted.len(),
        p50: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
    }
}

/// What the dashboard shows, at one instant.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub requests: u64,
    pub successes: u64,
    pub failures: u64,
    pub running: f64,
    pub queued: f64,
    pub kv_total_blocks: f64,
    pub kv_free_blocks: f64,
    pub kv_cached_blocks: f64,
    pub prefix_cache_hit_ratio: f64,
    /// Tokens sent to clients over the last 5 seconds, per second.
    pub tokens_per_second: f64,
    pub time_to_first_token: Percentiles,
    pub inter_token_latency: Percentiles,
}

#[derive(Default)]
struct Series {
    requests: Arc<Value>,
    successes: Arc<Value>,
    failures: Arc<Value>,
    running: Arc<Value>,
    queued: Arc<Value>,
    kv_total: Arc<Value>,
    kv_free: Arc<Value>,
    kv_cached: Arc<Value>,
    hit_ratio: Arc<Value>,
    ttft: Arc<Window>,
    itl: Arc<Window>,
}

/// The recorder and its reader; clones share the same series.
#[derive(Clone, Default)]
pub struct LiveStats(Arc<Series>);

impl LiveStats {
    pub fn snapshot(&self) -> Snapshot {
        let s = &self.0;
        let recent = Duration::from_secs(5);
        let (ttft, first_tokens) = s.ttft.summary(recent);
        let (itl, later_tokens) = s.itl.summary(recent);
        Snapshot {
            requests: s.requests.count(),
            successes: s.successes.count(),
            failures: s.failures.count(),
            running: s.running.gauge(),
            queued: s.queued.gauge(),
            kv_total_blocks: s.kv_total.gauge(),
            kv_free_blocks: s.kv_free.gauge(),
            kv_cached_blocks: s.kv_cached.gauge(),
            prefix_cache_hit_ratio: s.hit_ratio.gauge(),
            tokens_per_second: (first_tokens + later_tokens) as f64 / recent.as_secs_f64(),
            time_to_first_token: ttft,
            inter_token_latency: itl,
        }
    }
}

impl Recorder for LiveStats {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let s = &self.0;
        match key.name() {
            "tgi_request_count" => Counter::from_arc(s.requests.clone()),
            "tgi_request_success" => Counter::from_arc(s.successes.clone()),
            // Every `err` label adds to the one total.
            "tgi_request_failure" => Counter::from_arc(s.failures.clone()),
            _ => Counter::noop(),
        }
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        let s = &self.0;
        match key.name() {
            "tgi_batch_current_size" => Gauge::from_arc(s.running.clone()),
            "tgi_queue_size" => Gauge::from_arc(s.queued.clone()),
            "tessera_kv_total_blocks" => Gauge::from_arc(s.kv_total.clone()),
            "tessera_kv_free_blocks" => Gauge::from_arc(s.kv_free.clone()),
            "tessera_kv_cached_blocks" => Gauge::from_arc(s.kv_cached.clone()),
            "tessera_prefix_cache_hit_ratio" => Gauge::from_arc(s.hit_ratio.clone()),
            _ => Gauge::noop(),
        }
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let s = &self.0;
        match key.name() {
            "tessera_request_time_to_first_token_seconds" => Histogram::from_arc(s.ttft.clone()),
            "tessera_request_inter_token_latency_seconds" => Histogram::from_arc(s.itl.clone()),
            _ => Histogram::noop(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = percentiles(&v);
        assert_eq!(
            (p.count, p.p50, p.p90, p.p99),
            (100, Some(50.0), Some(90.0), Some(99.0))
        );
        assert_eq!(percentiles(&[]).p50, None);
        assert_eq!(percentiles(&[7.0]).p99, Some(7.0));
    }

    #[test]
    fn records_through_the_metrics_api() {
        let live = LiveStats::default();
        metrics::with_local_recorder(&live, || {
            metrics::counter!("tgi_request_count").increment(3);
            metrics::counter!("tgi_request_failure", "err" => "validation").increment(1);
            metrics::counter!("tgi_request_failure", "err" => "dropped").increment(2);
            metrics::gauge!("tgi_queue_size").set(4.0);
            for v in [0.1, 0.2, 0.3] {
                metrics::histogram!("tessera_request_time_to_first_token_seconds").record(v);
            }
            metrics::histogram!("tessera_request_inter_token_latency_seconds").record(0.01);
            metrics::counter!("unrelated").increment(1);
        });
        let s = live.snapshot();
        assert_eq!((s.requests, s.failures, s.queued), (3, 3, 4.0));
        assert_eq!(s.time_to_first_token.count, 3);
        assert_eq!(s.time_to_first_token.p50, Some(0.2));
        assert_eq!(s.tokens_per_second, 4.0 / 5.0);
    }
}
