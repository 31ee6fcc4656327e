//! The health probe as `[throttle]` configures it.

use std::time::Duration;

use anyhow::Context as _;
use backfill_dataplane::{HealthProbe, PrometheusQuery, Signals};

use crate::database::{data_plane_application_name, probe_pool, Database};
use crate::redact::redacted;
use crate::settings::Settings;

/// The health probe `throttle` configures: production sessions counted within
/// `activity_window` (`None`: not counted), and job `also_job` read as if running (0: none).
pub(crate) fn health_probe(
    settings: &Settings,
    db: &Database,
    activity_window: Option<Duration>,
    also_job: i64,
) -> anyhow::Result<HealthProbe> {
    let mut replicas = Vec::new();
    for (i, url) in settings.throttle.replica_urls.iter().enumerate() {
        let pool = probe_pool(url, settings)
            .with_context(|| format!("throttle.replica_urls[{i}] ({})", redacted(url)))?;
        replicas.push((format!("replica{i}"), pool));
    }
    Ok(HealthProbe::new(
        db.data.clone(),
        replicas,
        settings.throttle.expected_standbys.clone(),
        data_plane_application_name(settings),
        settings.throttle.probe_timeout,
        activity_window,
    )
    .with_signals(Signals {
        slots: settings.throttle.max_slot_retained_bytes > 0,
        operator_throttles: true,
        throttle_query: Some(settings.throttle.query.trim().to_owned()).filter(|q| !q.is_empty()),
        wal_rate: settings.throttle.max_wal_bytes_per_second > 0,
        archive: settings.throttle.max_archive_pending_segments > 0
            || settings.throttle.hold_while_archive_failing,
        dead_tuples: settings.throttle.max_dead_tuple_ratio > 0.0,
        job_queries: true,
        also_job,
        prometheus: prometheus_query(settings)?,
    }))
}

/// The configured Prometheus query, if any (settings validation checked the URL).
fn prometheus_query(settings: &Settings) -> anyhow::Result<Option<PrometheusQuery>> {
    let (url, query) = (
        settings.throttle.prometheus_url.trim(),
        settings.throttle.prometheus_query.trim(),
    );
    if url.is_empty() || query.is_empty() {
        return Ok(None);
    }
    PrometheusQuery::new(url, query, settings.throttle.probe_timeout)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("throttle.prometheus_url: {e}"))
}
