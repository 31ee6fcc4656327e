//! Production's latency as its monitoring would see it, for the frontier's competitor that
//! reads it (`throttle.impact_sli_query`): pgbench's per-transaction log, tailed as
//! pgbench writes it, into a histogram this process serves on `/metrics`, scraped every
//! second by a Prometheus the bench starts (Debian's `prometheus` package).
//!
//! pgbench writes its log through stdio, so a line reaches the file with the next 4 KB
//! (about 115 lines): each of its two threads logs half the transactions, so about every
//! 1.2 s at 200 tx/s and 0.4 s at 600, which the window the daemon is given covers, but
//! only every 12 s at 20 tx/s, where the SLI shows a pace late and in bursts.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use backfill_core::throttle::QueryReading;
use backfill_dataplane::PrometheusQuery;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The histogram of production's (pgbench's) transaction latencies.
const METRIC: &str = "bench_production_latency_seconds";

/// How often the log is tailed: well under the scrape interval.
const TAIL_EVERY: Duration = Duration::from_millis(100);

/// Prometheus scrapes the bench this often.
const SCRAPE_EVERY: &str = "1s";

/// Buckets 8 % apart from 0.2 ms to 1 s: `histogram_quantile` interpolates within a
/// bucket, and a 30 % budget must not hide in one.
fn buckets() -> Vec<f64> {
    std::iter::successors(Some(0.0002_f64), |b| Some(b * 1.08))
        .take_while(|b| *b <= 1.0)
        .collect()
}

/// The exporter and the Prometheus scraping it, while the frontier runs.
pub struct SliServer {
    prometheus: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl SliServer {
    /// Serves the histogram on a free loopback port and starts a Prometheus scraping it,
    /// waiting until Prometheus answers queries.
    pub async fn start() -> anyhow::Result<SliServer> {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(METRIC.into()), &buckets())
            .context("the SLI histogram's buckets")?
            .install_recorder()
            .context("installing the bench's metrics recorder")?;
        let exporter = serve_metrics(handle).await?;
        let dir = tempfile::Builder::new()
            .prefix("backfill-bench-prometheus-")
            .tempdir()
            .context("creating Prometheus's dir")?;
        let config = format!(
            "global:\n  scrape_interval: {SCRAPE_EVERY}\n  evaluation_interval: {SCRAPE_EVERY}\n\
             scrape_configs:\n  - job_name: pgbench\n    static_configs:\n      - targets: ['127.0.0.1:{exporter}']\n"
        );
        let (prometheus, port) = pg_testkit::spawn_prometheus(&config, dir.path())?;
        let mut server = SliServer {
            prometheus,
            port,
            _dir: dir,
        };
        server.wait_until_it_scrapes().await?;
        Ok(server)
    }

    /// Prometheus's URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// PromQL for production's p99 over the last `range`.
    pub fn p99_query(range: Duration) -> String {
        format!(
            "histogram_quantile(0.99, sum by (le) (rate({METRIC}_bucket[{}s])))",
            range.as_secs()
        )
    }

    /// Waits until Prometheus has scraped the exporter once (its `up` is 1).
    async fn wait_until_it_scrapes(&mut self) -> anyhow::Result<()> {
        let up = PrometheusQuery::new(
            &self.url(),
            "up{job=\"pgbench\"} == 1",
            Duration::from_secs(2),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Some(status) = self.prometheus.try_wait()? {
                bail!("prometheus exited with {status}");
            }
            if let QueryReading::Value(_) = up.read().await {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!(
            "Prometheus at {} did not scrape the bench within 60 s",
            self.url()
        )
    }
}

impl Drop for SliServer {
    fn drop(&mut self) {
        let _ = self.prometheus.kill();
        let _ = self.prometheus.wait();
    }
}

/// Serves `handle`'s rendering on `/metrics` at a free loopback port, returned.
async fn serve_metrics(handle: PrometheusHandle) -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("binding the bench's /metrics")?;
    let port = listener.local_addr()?.port();
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("backfill-bench: the SLI's /metrics stopped: {e}");
        }
    });
    Ok(port)
}

/// Tails pgbench's per-transaction logs in `dir` into the histogram until stopped.
pub struct LogTail {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LogTail {
    /// Starts tailing every `txn.*` file in `dir`, from its start.
    pub fn start(dir: &Path) -> LogTail {
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, stopping) = (dir.to_path_buf(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut offsets: HashMap<PathBuf, (u64, String)> = HashMap::new();
            while !stopping.load(Ordering::Relaxed) {
                tail_once(&dir, &mut offsets);
                std::thread::sleep(TAIL_EVERY);
            }
        });
        LogTail {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for LogTail {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads what each log gained since `offsets` (the offset read to, and a line not yet
/// complete) and records each completed transaction's latency.
fn tail_once(dir: &Path, offsets: &mut HashMap<PathBuf, (u64, String)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
        let is_log = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("txn."));
        if !is_log {
            continue;
        }
        let (offset, partial) = offsets.entry(path.clone()).or_default();
        let Ok(mut file) = std::fs::File::open(&path) else {
            continue;
        };
        let mut added = String::new();
        if file.seek(SeekFrom::Start(*offset)).is_err() || file.read_to_string(&mut added).is_err()
        {
            continue;
        }
        *offset += added.len() as u64;
        partial.push_str(&added);
        let Some(last_newline) = partial.rfind('\n') else {
            continue;
        };
        let complete: String = partial.drain(..=last_newline).collect();
        for transaction in complete.lines().filter_map(crate::pgbench::parse_log_line) {
            metrics::histogram!(METRIC).record(transaction.latency_ms / 1000.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_fine_where_a_p99_lies() {
        let buckets = buckets();
        assert!(buckets.windows(2).all(|w| w[1] / w[0] < 1.09));
        assert!(buckets[0] <= 0.0002 && *buckets.last().unwrap() > 0.9);
    }
}
