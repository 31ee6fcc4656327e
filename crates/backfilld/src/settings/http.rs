//! `[http]`: the `/metrics`, `/healthz` and `/readyz` listener.

use std::time::Duration;

use serde::Deserialize;

use super::SettingsError;

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: String,
    /// Series no update touched for this long leave /metrics (zero: never).
    #[serde(with = "humantime_serde")]
    pub metrics_idle_timeout: Duration,
    /// With `--exit-when-idle`: how long the last report waits for a scrape before exiting.
    #[serde(with = "humantime_serde")]
    pub final_scrape_wait: Duration,
}

impl HttpSettings {
    /// The exporter's idle timeout: `None` keeps every series for ever.
    pub fn metrics_idle_timeout(&self) -> Option<Duration> {
        Some(self.metrics_idle_timeout).filter(|timeout| !timeout.is_zero())
    }
}

impl HttpSettings {
    /// Checks `[http]`, naming the bad key; a running job's series must outlive its
    /// longest batch (`batch.statement_timeout`).
    pub(super) fn validate(&self, statement_timeout: Duration) -> Result<(), SettingsError> {
        let fail = |msg: String| Err(SettingsError(msg));
        if !self.listen.is_empty() && self.listen.parse::<std::net::SocketAddr>().is_err() {
            return fail(format!(
                "http.listen {:?} is not an address like 0.0.0.0:9187",
                self.listen
            ));
        }
        if let Some(timeout) = self.metrics_idle_timeout() {
            // A running job's series are refreshed between batches, so a shorter timeout
            // would make them blink out during every long batch.
            if timeout <= statement_timeout {
                return fail(format!(
                    "http.metrics_idle_timeout ({}) must be 0 (keep every series) or longer than batch.statement_timeout ({})",
                    humantime::format_duration(timeout),
                    humantime::format_duration(statement_timeout)
                ));
            }
        }
        Ok(())
    }
}
