//! Prometheus metrics with TGI's names, types, labels and buckets (`tgi_*`), so existing TGI
//! dashboards work. The recorder is installed once at startup; `/metrics` renders it.
//!
//! Unlike TGI, each HTTP request is counted once in `tgi_request_count` (TGI counts chat and
//! completions twice).

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// TGI's latency buckets: 35 geometric steps from 150 µs.
fn duration_buckets() -> Vec<f64> {
    (0..35).map(|k| 0.00015 * 1.5f64.powi(k)).collect()
}

/// 100 linear buckets up to `max` (TGI's token-count buckets).
fn linear_buckets(max: usize) -> Vec<f64> {
    let step = (max as f64 / 100.0).max(1.0);
    (1..=100).map(|i| i as f64 * step).collect()
}

pub fn install(
    max_input_tokens: usize,
    max_total_tokens: usize,
) -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("duration".into()), &duration_buckets())?
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
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    Ok(handle)
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
