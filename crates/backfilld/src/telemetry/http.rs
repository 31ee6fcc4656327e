//! The HTTP endpoints (`/metrics`, `/healthz`, `/readyz`), the final scrape, and the
//! process's peak memory.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

/// How long a rendered `/metrics` page takes to reach the scraper, at most, on a live pod.
const RESPONSE_GRACE: Duration = Duration::from_millis(250);

/// Woken by every `/metrics` scrape; see [`await_final_scrape`].
static SCRAPED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Waits for the next scrape of `/metrics`, at most `bound`: a worker leaving because the
/// queue is done lets Prometheus see the final queue state first.
pub async fn await_final_scrape(bound: Duration) {
    if bound.is_zero() {
        return;
    }
    match tokio::time::timeout(bound, SCRAPED.notified()).await {
        Ok(()) => {
            // The page is rendered when we are woken; give its response a moment on the wire.
            tokio::time::sleep(RESPONSE_GRACE).await;
            tracing::info!("final metrics scraped");
        }
        Err(_) => tracing::info!(
            waited = %humantime::format_duration(bound),
            "no scrape of the final metrics within http.final_scrape_wait"
        ),
    }
}

/// How long `/readyz` waits for the database before answering "not ready".
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves `/metrics`, `/healthz` and `/readyz` on `listen` until the process ends.
pub async fn serve_http(
    listen: &str,
    metrics: PrometheusHandle,
    control: PgPool,
) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on http.listen {listen}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    // process_* (CPU, memory, file descriptors, start time) are read from /proc per scrape.
    let process = metrics_process::Collector::default();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                process.collect();
                let page = metrics.render();
                SCRAPED.notify_waiters();
                std::future::ready(page)
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let control = control.clone();
                async move {
                    // A probe must answer quickly even while the database hangs.
                    let check = backfill_queue::schema_is_current(&control);
                    let answer = match tokio::time::timeout(READINESS_TIMEOUT, check).await {
                        Ok(result) => result.map_err(|e| e.to_string()),
                        Err(_) => Err(format!("no answer within {READINESS_TIMEOUT:?}")),
                    };
                    match answer {
                        Ok(true) => (StatusCode::OK, "ready\n".to_string()),
                        Ok(false) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "schema backfill is not current\n".to_string(),
                        ),
                        Err(e) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("database unreachable: {e}\n"),
                        ),
                    }
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok(bound)
}

/// This process's peak resident set size (`VmHWM`), where `/proc` tells. Not getrusage's
/// `ru_maxrss`: the kernel folds the parent's resident size at our exec into that.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}
