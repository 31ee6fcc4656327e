//! Configuration: `config/default.toml` (compiled in), then `--config FILE`, then
//! `BACKFILLD_<SECTION>__<KEY>` environment variables, then `DATABASE_URL`.

use std::path::Path;
use std::time::Duration;

use backfill_core::throttle::ThrottleSettings;
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
    /// How long start-up keeps retrying an unreachable database before exiting 1.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
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
    #[serde(deserialize_with = "name_list")]
    pub expected_standbys: Vec<String>,
    #[serde(deserialize_with = "name_list")]
    pub replica_urls: Vec<String>,
    pub max_rows_per_second: f64,
    #[serde(with = "humantime_serde")]
    pub max_blocking: Duration,
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// A canary round trip this much over the quietest recent one counts as production
    /// being delayed; zero turns the canary off.
    #[serde(with = "humantime_serde")]
    pub max_probe_delay: Duration,
    /// How often the canary runs.
    #[serde(with = "humantime_serde")]
    pub canary_interval: Duration,
    /// While production is at work on the primary, the share of time a job's batches may
    /// run; 1 turns sharing off.
    pub busy_duty_cycle: f64,
    /// While production is at work, the batch duration steered towards.
    #[serde(with = "humantime_serde")]
    pub busy_batch_target: Duration,
    /// Run even when the role cannot see standby positions and other sessions' lock
    /// waits (no pg_monitor): the lag and lock probes are then blind.
    pub allow_blind: bool,
}

/// Reads a list from a TOML array or from one comma-separated string (how
/// `BACKFILLD_THROTTLE__EXPECTED_STANDBYS=a,b` arrives), trimming every entry and dropping
/// empty ones: an empty variable must mean "none", not one standby called "" that is
/// always missing and would hold every job forever.
fn name_list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    struct NameList;

    impl<'de> serde::de::Visitor<'de> for NameList {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of names or one comma-separated string")
        }

        fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Self::Value, E> {
            Ok(value
                .split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(str::to_owned)
                .collect())
        }

        // The environment source parses a lone "1" as a number; it is still a name.
        fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<Self::Value, E> {
            Ok(vec![value.to_string()])
        }

        fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<Self::Value, E> {
            Ok(vec![value.to_string()])
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut names = Vec::new();
            while let Some(name) = seq.next_element::<String>()? {
                let name = name.trim();
                if !name.is_empty() {
                    names.push(name.to_owned());
                }
            }
            Ok(names)
        }
    }

    deserializer.deserialize_any(NameList)
}

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

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum LogFormat {
    Text,
    Json,
}

impl TryFrom<String> for LogFormat {
    type Error = String;

    // serde's own enum error ("does not have variant constructor") names Rust, not the file.
    fn try_from(value: String) -> Result<Self, Self::Error> {
        match value.as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "log.format must be \"text\" or \"json\", not {other:?}"
            )),
        }
    }
}

/// Refuses a connection string either plane could not use (scheme, syntax, sslmode,
/// sslrootcert, options tokio-postgres does not know), naming the key but never
/// repeating the URL, which may hold a password.
fn check_database_url(key: &str, url: &str) -> Result<backfill_dataplane::Endpoint, SettingsError> {
    crate::redact::parse_database_url(url).map_err(|e| SettingsError(format!("{key}: {e}")))?;
    backfill_dataplane::Endpoint::parse(url).map_err(|e| SettingsError(format!("{key}: {e}")))
}

/// Refuses a chain-only check (verify-ca, or require with sslrootcert as in libpq) for
/// the main database: sqlx 0.8, which the control plane runs on, lets such a check fail
/// on the host name with rustls 0.23 (it expects rustls' older name-mismatch error), so
/// the daemon could not connect. Replicas are probed by the data plane alone and may.
fn check_control_plane_tls(endpoint: &backfill_dataplane::Endpoint) -> Result<(), SettingsError> {
    use backfill_dataplane::SslMode;
    let chain_only = match endpoint.ssl_mode() {
        SslMode::VerifyCa => "sslmode=verify-ca",
        SslMode::Require if endpoint.root_cert().is_some() => {
            "sslmode=require with sslrootcert (which verifies the chain only, as in libpq)"
        }
        _ => return Ok(()),
    };
    Err(SettingsError(format!(
        "database.url: {chain_only} is not supported for the main database (its control-plane \
         driver cannot check a certificate chain without the host name); use sslmode=verify-full"
    )))
}

/// The `BACKFILLD_<SECTION>__<KEY>` source; list keys take comma-separated values.
fn environment() -> config::Environment {
    config::Environment::with_prefix("BACKFILLD")
        .prefix_separator("_")
        .separator("__")
        .list_separator(",")
        .with_list_parse_key("throttle.expected_standbys")
        .with_list_parse_key("throttle.replica_urls")
        .try_parsing(true)
}

/// A configuration that cannot be used; the message names the file, key or value, on
/// one line (it is what `backfilld` prints before exiting 2).
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct SettingsError(String);

impl From<config::ConfigError> for SettingsError {
    fn from(e: config::ConfigError) -> Self {
        let mut message = one_line(&e.to_string());
        if message.contains("expected a duration") {
            message.push_str(" (write a number with a unit, e.g. \"500ms\", \"2s\", \"1m\")");
        }
        SettingsError(message)
    }
}

/// A type error naming `file` as the operator wrote it: config names it relative to the
/// working directory (`../../../etc/backfilld.toml`).
fn named_as_given(e: config::ConfigError, file: Option<&Path>) -> config::ConfigError {
    match (e, file) {
        (
            config::ConfigError::Type {
                origin: Some(origin),
                unexpected,
                expected,
                key,
            },
            Some(path),
        ) if origin != ENVIRONMENT_ORIGIN => config::ConfigError::Type {
            origin: Some(path.display().to_string()),
            unexpected,
            expected,
            key,
        },
        (e, _) => e,
    }
}

/// How config names the environment as the origin of a value.
const ENVIRONMENT_ORIGIN: &str = "the environment";

/// `text` on one line: line breaks and the indentation after them become one space.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Refuses a config file that is not TOML with one line naming the place, instead of the
/// multi-line snippet the parser draws.
fn check_toml(path: &Path) -> Result<(), SettingsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SettingsError(format!("cannot read config file {}: {e}", path.display())))?;
    toml::from_str::<toml::Table>(&text).map_err(|e| {
        let place = e.span().map_or(String::new(), |span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" at line {line}, column {column}")
        });
        SettingsError(format!(
            "config file {} is not valid TOML{place}: {}",
            path.display(),
            one_line(e.message())
        ))
    })?;
    Ok(())
}

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
            check_toml(path)?;
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(environment());
        if let Ok(url) = std::env::var("DATABASE_URL") {
            builder = builder.set_override("database.url", url)?;
        }
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| named_as_given(e, file))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let fail = |msg: String| Err(SettingsError(msg));
        check_control_plane_tls(&check_database_url("database.url", &self.database.url)?)?;
        if self.worker.concurrency == 0 {
            return fail("worker.concurrency must be at least 1".to_string());
        }
        // Each job holds a connection for its batch; the health probe needs one
        // more, or it starves and every job holds on a failed probe.
        if self.database.pool_size <= self.worker.concurrency {
            return fail(format!(
                "database.pool_size ({}) must be greater than worker.concurrency ({}): one connection per job plus one for the health probes",
                self.database.pool_size, self.worker.concurrency
            ));
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
        if self.throttle.canary_interval.is_zero() {
            return fail("throttle.canary_interval must be positive".to_string());
        }
        self.throttle_defaults().validate().map_err(|e| {
            SettingsError(format!(
                "[batch]/[throttle]: {e} (the throttle cannot work with these values)"
            ))
        })?;
        for (i, replica) in self.throttle.replica_urls.iter().enumerate() {
            check_database_url(&format!("throttle.replica_urls[{i}]"), replica)?;
        }
        if !self.http.listen.is_empty() && self.http.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return fail(format!(
                "http.listen {:?} is not an address like 0.0.0.0:9187",
                self.http.listen
            ));
        }
        if let Some(timeout) = self.http.metrics_idle_timeout() {
            // A running job's series are refreshed between batches, so a shorter timeout
            // would make them blink out during every long batch.
            if timeout <= self.batch.statement_timeout {
                return fail(format!(
                    "http.metrics_idle_timeout ({}) must be 0 (keep every series) or longer than batch.statement_timeout ({})",
                    humantime::format_duration(timeout),
                    humantime::format_duration(self.batch.statement_timeout)
                ));
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            SettingsError(format!(
                "log.level {:?} is not a valid filter: {e}",
                self.log.level
            ))
        })?;
        Ok(())
    }

    /// The throttle controller's settings for a job that overrides nothing: `[batch]` sizes
    /// and target, `[throttle]` limits; health-driven holds are re-checked at the probe cadence,
    /// so a hold ends as soon as a fresh sample allows it.
    pub fn throttle_defaults(&self) -> ThrottleSettings {
        ThrottleSettings {
            min_batch_size: self.batch.min_size,
            max_batch_size: self.batch.max_size,
            start_batch_size: self.batch.size,
            target_batch: self.batch.target,
            max_lag: self.throttle.max_lag,
            max_lag_bytes: self.throttle.max_lag_bytes,
            // 0 in the config means no limit.
            max_rows_per_second: Some(self.throttle.max_rows_per_second).filter(|rate| *rate > 0.0),
            hold_recheck: self.throttle.probe_interval,
            busy_duty_cycle: self.throttle.busy_duty_cycle,
            busy_batch_target: self.throttle.busy_batch_target,
            ..ThrottleSettings::default()
        }
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
        assert_eq!(settings.throttle.max_blocking, Duration::from_millis(200));
        assert!(settings.throttle.expected_standbys.is_empty());
        let throttle = settings.throttle_defaults();
        assert_eq!(throttle.max_rows_per_second, None, "0 means no limit");
        assert_eq!(throttle.hold_recheck, settings.throttle.probe_interval);
    }

    /// The defaults overridden by `vars` as if they were the process environment.
    fn with_env(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let vars = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let settings: Settings = config::Config::builder()
            .add_source(config::File::from_str(
                DEFAULT_TOML,
                config::FileFormat::Toml,
            ))
            .add_source(environment().source(Some(vars)))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(SettingsError::from)?;
        settings.validate()?;
        Ok(settings)
    }

    #[test]
    fn standby_lists_come_from_comma_separated_variables() {
        let standbys = |value: &str| {
            with_env(&[("BACKFILLD_THROTTLE__EXPECTED_STANDBYS", value)])
                .expect("valid")
                .throttle
                .expected_standbys
        };
        assert_eq!(standbys("standby1"), ["standby1"]);
        assert_eq!(standbys("a, b ,c"), ["a", "b", "c"]);
        assert_eq!(standbys("7"), ["7"], "a numeric name stays a name");
        assert!(
            standbys("").is_empty(),
            "empty means none, not one named \"\""
        );
        assert!(standbys(" , ").is_empty());
        let settings = with_env(&[(
            "BACKFILLD_THROTTLE__REPLICA_URLS",
            "postgres://r1/app,postgres://r2/app",
        )])
        .expect("valid");
        assert_eq!(
            settings.throttle.replica_urls,
            ["postgres://r1/app", "postgres://r2/app"]
        );
        // Other keys are not split on commas.
        let settings = with_env(&[("BACKFILLD_LOG__LEVEL", "info,backfilld=debug")]).unwrap();
        assert_eq!(settings.log.level, "info,backfilld=debug");
    }

    #[test]
    fn nonsense_throttle_values_are_refused() {
        for (key, value, mentions) in [
            (
                "BACKFILLD_THROTTLE__MAX_ROWS_PER_SECOND",
                "0.5",
                "max_rows_per_second",
            ),
            ("BACKFILLD_THROTTLE__MAX_LAG", "0s", "max_lag"),
            ("BACKFILLD_THROTTLE__MAX_LAG_BYTES", "0", "max_lag_bytes"),
            ("BACKFILLD_THROTTLE__PROBE_INTERVAL", "0s", "probe_interval"),
            ("BACKFILLD_BATCH__TARGET", "0s", "batch.target"),
        ] {
            let error = with_env(&[(key, value)]).expect_err(key).to_string();
            assert!(error.contains(mentions), "{key}={value}: {error}");
        }
    }
}
