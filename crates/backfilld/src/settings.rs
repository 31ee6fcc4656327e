//! Configuration: `config/default.toml` (compiled in), then `--config FILE`, then
//! `BACKFILLD_<SECTION>__<KEY>` environment variables, then `DATABASE_URL`.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// The built-in defaults: the same file operators read and copy.
pub const DEFAULT_TOML: &str = include_str!("../../../config/default.toml");

/// The daemon's whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub worker: WorkerSettings,
    pub batch: BatchSettings,
    pub throttle: ThrottleConfig,
    pub http: HttpSettings,
    pub log: LogSettings,
}

/// `[database]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: String,
    pub pool_size: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

/// `[worker]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub id: String,
    pub concurrency: usize,
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub max_verify_sweeps: i32,
}

/// `[batch]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchSettings {
    pub size: u32,
    pub min_size: u32,
    pub max_size: u32,
    #[serde(with = "humantime_serde")]
    pub target: Duration,
    #[serde(with = "humantime_serde")]
    pub lock_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    pub max_attempts: i32,
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
}

/// `[throttle]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThrottleConfig {
    #[serde(with = "humantime_serde")]
    pub max_lag: Duration,
    pub max_lag_bytes: u64,
    pub expected_standbys: Vec<String>,
    pub replica_urls: Vec<String>,
    pub max_rows_per_second: f64,
    #[serde(with = "humantime_serde")]
    pub max_blocking: Duration,
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: String,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// A configuration that cannot be used; the message names the file, key or value.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct SettingsError(String);

impl Settings {
    /// Loads defaults, then `file` if given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, SettingsError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(SettingsError(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("BACKFILLD")
                .prefix_separator("_")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("throttle.expected_standbys")
                .with_list_parse_key("throttle.replica_urls")
                .try_parsing(true),
        );
        if let Ok(url) = std::env::var("DATABASE_URL") {
            builder = builder
                .set_override("database.url", url)
                .map_err(|e| SettingsError(e.to_string()))?;
        }
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| SettingsError(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let fail = |msg: String| Err(SettingsError(msg));
        let url = crate::redact::parse_database_url(&self.database.url).map_err(SettingsError)?;
        if let Some(mode) = url
            .query_pairs()
            .find(|(k, _)| k == "sslmode")
            .map(|(_, v)| v.into_owned())
        {
            if !["disable", "prefer"].contains(&mode.as_str()) {
                return fail(format!(
                    "database.url: sslmode={mode} is not supported by this build (no TLS yet); use disable or prefer"
                ));
            }
        }
        if self.database.pool_size < 2 {
            return fail(format!(
                "database.pool_size must be at least 2 (batches and probes), got {}",
                self.database.pool_size
            ));
        }
        if self.worker.concurrency == 0 {
            return fail("worker.concurrency must be at least 1".to_string());
        }
        if self.worker.heartbeat.is_zero() || self.worker.heartbeat * 2 > self.worker.lease {
            return fail(format!(
                "worker.heartbeat ({}) must be positive and at most half of worker.lease ({})",
                humantime::format_duration(self.worker.heartbeat),
                humantime::format_duration(self.worker.lease)
            ));
        }
        if self.worker.poll_interval.is_zero() {
            return fail("worker.poll_interval must be positive".to_string());
        }
        if self.batch.min_size == 0 || self.batch.min_size > self.batch.max_size {
            return fail(format!(
                "batch.min_size ({}) must be positive and not above batch.max_size ({})",
                self.batch.min_size, self.batch.max_size
            ));
        }
        if self.batch.size < self.batch.min_size || self.batch.size > self.batch.max_size {
            return fail(format!(
                "batch.size ({}) must lie within batch.min_size..batch.max_size ({}..{})",
                self.batch.size, self.batch.min_size, self.batch.max_size
            ));
        }
        if self.batch.max_attempts < 1 {
            return fail(format!(
                "batch.max_attempts must be at least 1, got {}",
                self.batch.max_attempts
            ));
        }
        if self.batch.target.is_zero()
            || self.batch.lock_timeout.is_zero()
            || self.batch.statement_timeout.is_zero()
        {
            return fail(
                "batch.target, batch.lock_timeout and batch.statement_timeout must be positive"
                    .to_string(),
            );
        }
        if !(self.throttle.max_rows_per_second >= 0.0
            && self.throttle.max_rows_per_second.is_finite())
        {
            return fail(format!(
                "throttle.max_rows_per_second must be 0 (no limit) or positive, got {}",
                self.throttle.max_rows_per_second
            ));
        }
        if self.throttle.max_lag.is_zero() || self.throttle.max_lag_bytes == 0 {
            return fail(
                "throttle.max_lag and throttle.max_lag_bytes must be positive".to_string(),
            );
        }
        if self.throttle.probe_interval.is_zero() || self.throttle.probe_timeout.is_zero() {
            return fail(
                "throttle.probe_interval and throttle.probe_timeout must be positive".to_string(),
            );
        }
        for replica in &self.throttle.replica_urls {
            crate::redact::parse_database_url(replica)
                .map_err(|e| SettingsError(format!("throttle.replica_urls: {e}")))?;
        }
        if !self.http.listen.is_empty() && self.http.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return fail(format!(
                "http.listen {:?} is not an address like 0.0.0.0:9187",
                self.http.listen
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            SettingsError(format!(
                "log.level {:?} is not a valid filter: {e}",
                self.log.level
            ))
        })?;
        Ok(())
    }

    /// This worker's name in `job_status`.
    pub fn worker_id(&self) -> String {
        if !self.worker.id.is_empty() {
            return self.worker.id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "backfilld".to_string());
        format!("{host}-{}", std::process::id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_defaults_load_and_validate() {
        let settings = Settings::load(None).expect("default.toml must be valid");
        assert_eq!(settings.batch.size, 1000);
        assert_eq!(settings.throttle.max_lag, Duration::from_secs(2));
        assert_eq!(settings.throttle.max_lag_bytes, 64 * 1024 * 1024);
        assert_eq!(settings.log.format, LogFormat::Text);
    }
}
