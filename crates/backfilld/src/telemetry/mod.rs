//! Logs, Prometheus metrics and the HTTP endpoints (`/metrics`, `/healthz`, `/readyz`).
//!
//! Rooms: [`exporter`] (the Prometheus recorder and every metric's description), [`job`]
//! (one job's series), [`daemon`] (the daemon-wide series: replicas, canary, impact
//! budget, the queue), [`gauges`] (the task refreshing the daemon-wide gauges from the
//! queue), [`http`] (the endpoints, the final scrape, peak memory).

mod daemon;
mod exporter;
pub mod gauges;
mod http;
mod job;

pub use daemon::{
    record_canary, record_daemon_info, record_failed_jobs, record_impact, record_job_states,
    record_job_steering, record_replication_lag,
};
pub use exporter::install_metrics;
pub use http::{await_final_scrape, peak_rss_bytes, serve_http};
pub use job::JobMetrics;

use crate::settings::{LogFormat, LogSettings};

/// Installs the tracing subscriber: JSON for production, readable text for terminals.
pub fn init_logging(settings: &LogSettings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // The drivers log every server NOTICE at info; keep them to warnings.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!(
                "sqlx=warn,tokio_postgres=warn,{}",
                settings.level
            ))
        });
    // Colours only for a terminal: log files and pipelines get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder
            .with_target(false)
            // JSON escapes control characters; text must too, or a job name forges lines.
            .fmt_fields(crate::log_escape::EscapedFields::default())
            .try_init(),
    };
}
