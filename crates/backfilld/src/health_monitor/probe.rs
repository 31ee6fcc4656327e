//! The health probe as `[throttle]` configures it.

use std::time::Duration;

use anyhow::Context as _;
use backfill_dataplane::{HealthProbe, PrometheusQuery, Signals};

use crate::database::Database;
use crate::redact::redacted;
use crate::settings::ThrottleConfig;

/// The health probe `[throttle]` configures: production sessions counted within
/// `activity_window` (`None`: not counted), and job `also_job` read as if running (0: none).
pub(crate) fn health_probe(
    throttle: &ThrottleConfig,
    db: &Database,
    activity_window: Option<Duration>,
    also_job: i64,
) -> anyhow::Result<HealthProbe> {
    let mut replicas = Vec::new();
    for (i, url) in throttle.replica_urls.iter().enumerate() {
        let pool = db
            .probe_pool(url)
            .with_context(|| format!("throttle.replica_urls[{i}] ({})", redacted(url)))?;
        replicas.push((format!("replica{i}"), pool));
    }
    Ok(HealthProbe::new(
        db.data.clone(),
        replicas,
        throttle.expected_standbys.clone(),
        db.data_plane_application_name().to_owned(),
        throttle.probe_timeout,
        activity_window,
    )
    .with_signals(Signals {
        slots: throttle.max_slot_retained_bytes > 0,
        operator_throttles: true,
        throttle_query: Some(throttle.query.trim().to_owned()).filter(|q| !q.is_empty()),
        wal_rate: throttle.max_wal_bytes_per_second > 0,
        archive: throttle.max_archive_pending_segments > 0 || throttle.hold_while_archive_failing,
        dead_tuples: throttle.max_dead_tuple_ratio > 0.0,
        job_queries: true,
        also_job,
        prometheus: prometheus_query(throttle)?,
    }))
}

/// The configured Prometheus query, if any (settings validation checked the URL).
fn prometheus_query(throttle: &ThrottleConfig) -> anyhow::Result<Option<PrometheusQuery>> {
    let (url, query) = (
        throttle.prometheus_url.trim(),
        throttle.prometheus_query.trim(),
    );
    if url.is_empty() || query.is_empty() {
        return Ok(None);
    }
    PrometheusQuery::new(url, query, throttle.probe_timeout)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("throttle.prometheus_url: {e}"))
}
