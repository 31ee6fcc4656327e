//! The Prometheus recorder, and every metric described (help text, units).

use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

/// Batch durations span milliseconds (tiny batches) to the statement timeout.
const BATCH_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
];

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder and describes every metric (help text, units).
///
/// A series that no update touched for `idle_timeout` leaves `/metrics` (`None`: never):
/// that is how finished jobs stop being exported. Must be called inside the Tokio runtime,
/// which runs the exporter's upkeep.
pub fn install_metrics(idle_timeout: Option<Duration>) -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .idle_timeout(MetricKindMask::ALL, idle_timeout)
        .set_buckets_for_metric(
            Matcher::Full("backfill_batch_duration_seconds".into()),
            BATCH_DURATION_BUCKETS,
        )
        .map_err(|e| format!("metrics buckets: {e}"))?
        .install_recorder()
        .map_err(|e| format!("installing the metrics recorder: {e}"))?;
    // Samples of the batch histogram pile up in memory until folded into buckets; a
    // scrape does that too, but a daemon nobody scrapes must not grow.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(UPKEEP_INTERVAL);
        loop {
            ticker.tick().await;
            upkeep.run_upkeep();
        }
    });
    metrics_process::Collector::default().describe();
    describe_counter!(
        "backfill_rows_processed_total",
        "Rows whose batch statement committed."
    );
    describe_counter!(
        "backfill_batches_total",
        "Batches by outcome (committed, row_failures, transient_error, fenced, job_error)."
    );
    describe_histogram!(
        "backfill_batch_duration_seconds",
        Unit::Seconds,
        "Wall time of committed batches."
    );
    describe_gauge!("backfill_batch_size", "Keys in the job's current batch.");
    describe_counter!(
        "backfill_failed_rows_total",
        "Rows newly set aside in backfill.failed_rows (a row failing again on retry counts once)."
    );
    describe_counter!(
        "backfill_throttle_sleep_seconds_total",
        Unit::Seconds,
        "Time spent waiting because of the throttle, by reason (whole seconds)."
    );
    describe_gauge!(
        "backfill_throttled",
        "1 while the job is throttled for this reason."
    );
    describe_gauge!(
        "backfill_replication_lag_seconds",
        Unit::Seconds,
        "Replay lag of a standby."
    );
    describe_gauge!(
        "backfill_replication_lag_bytes",
        Unit::Bytes,
        "WAL bytes a standby has not replayed yet."
    );
    describe_gauge!(
        "backfill_lock_waits",
        "Sessions currently waiting on a lock held by the backfill."
    );
    describe_gauge!(
        "backfill_job_rows_remaining",
        "Rows the job still has to process (estimate)."
    );
    describe_gauge!(
        "backfill_job_progress_ratio",
        "Fraction of the job done, 0 to 1."
    );
    describe_gauge!(
        "backfill_job_eta_seconds",
        Unit::Seconds,
        "Estimated time to finish the job at the current rate."
    );
    describe_gauge!("backfill_jobs", "Jobs in the queue by state.");
    describe_gauge!(
        "backfill_job_forecast_seconds",
        Unit::Seconds,
        "Time to the job's forecast finish: rows remaining over its rate across worker.forecast_window, throttled time included."
    );
    describe_gauge!(
        "backfill_job_deadline_margin_seconds",
        Unit::Seconds,
        "The job's finish_by minus its forecast finish (or now, once later); negative: it will be late."
    );
    describe_gauge!(
        "backfill_job_late",
        "1 while the job's forecast (or the clock) is past its finish_by, else 0."
    );
    describe_gauge!(
        "backfill_undo_rows",
        "Rows of undo data a job keeps in backfill.undo (keep_undo), for backfill.revert."
    );
    describe_gauge!(
        "backfill_undo_bytes",
        "Bytes of the keys and old values of a job's undo data."
    );
    describe_gauge!(
        "backfill_job_failed",
        "1 for each job in state failed (it stays failed until retried or cancelled), 0 once it is not."
    );
    describe_gauge!(
        "backfill_build_info",
        "Always 1; the version label says which backfilld runs."
    );
    describe_gauge!(
        "backfill_throttle_max_lag_seconds",
        Unit::Seconds,
        "Configured replication lag limit."
    );
    describe_gauge!(
        "backfill_throttle_max_lag_bytes",
        Unit::Bytes,
        "Configured replication lag limit in bytes."
    );
    describe_gauge!(
        "backfill_probe_delay_seconds",
        Unit::Seconds,
        "How much longer the last canary round trip (a committing transaction) took than the quickest of the last minute."
    );
    describe_gauge!(
        "backfill_impact_ratio",
        "Production's latency (the tail of the canary's round trips, their p98) over its baseline, as the impact budget last measured it."
    );
    describe_gauge!(
        "backfill_impact_budget_rows_per_second",
        "Rows per second the impact budget allows this daemon's running jobs in all; 0 while it rests to re-learn the baseline."
    );
    describe_counter!(
        "backfill_probe_delays_total",
        "Canary round trips over throttle.max_probe_delay: production waiting for the database."
    );
    Ok(handle)
}
