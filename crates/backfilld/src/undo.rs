//! Undo data housekeeping in the daemon: the retention (`undo.retention`) and the
//! `backfill_undo_rows` / `backfill_undo_bytes` gauges.

use std::time::Duration;

use metrics::gauge;
use sqlx::PgPool;

/// How often the undo data is measured and the retention applied: measuring reads every
/// undo row, so less often than the queue gauges.
pub const UNDO_REPORT_INTERVAL: Duration = Duration::from_secs(30);

/// Drops undo data past `retention` (if any), then exports each job's undo size.
pub async fn report_undo(control: &PgPool, retention: Option<Duration>) {
    if let Some(retention) = retention {
        match backfill_queue::purge_expired_undo(control, retention).await {
            Ok(0) => {}
            Ok(dropped) => tracing::info!(
                rows = dropped,
                retention = %humantime::format_duration(retention),
                "dropped undo data of jobs finished longer ago than undo.retention"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot apply undo.retention"),
        }
    }
    match backfill_queue::undo_sizes(control).await {
        Ok(sizes) => {
            for (job, rows, bytes) in sizes {
                gauge!("backfill_undo_rows", "backfill_job" => job.clone()).set(rows as f64);
                gauge!("backfill_undo_bytes", "backfill_job" => job).set(bytes as f64);
            }
        }
        Err(e) => tracing::debug!(error = %e, "cannot measure undo data"),
    }
}
