//! Configuration: `config/default.toml` (compiled in), then `--config FILE`, then
//! `BACKFILLD_<SECTION>__<KEY>` environment variables, then `DATABASE_URL`.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use backfill_core::signals::SignalLimits;
use backfill_core::throttle::{QueryLimits, ThrottleSettings};
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
    pub events: EventSettings,
    pub undo: UndoSettings,
    /// `BACKFILLD_*` variables ignored because they name no `<SECTION>__<KEY>` (e.g. a
    /// test harness' `BACKFILLD_BIN`), for a warning once logging is up.
    #[serde(skip)]
    pub ignored_variables: Vec<String>,
}

/// `[undo]` (issue 17)
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UndoSettings {
    /// Undo data of jobs finished longer ago than this is dropped; zero keeps it until
    /// `backfill.purge_undo(name)`.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl UndoSettings {
    /// The retention in force, if any.
    pub fn retention(&self) -> Option<Duration> {
        Some(self.retention).filter(|r| !r.is_zero())
    }
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
    /// A job failing every batch this long, without a commit, rests (see default.toml).
    #[serde(with = "humantime_serde")]
    pub stuck_after: Duration,
    /// How long a stuck job rests before it is claimed again.
    #[serde(with = "humantime_serde")]
    pub stuck_rest: Duration,
    /// The wall time a job's recent rate is measured over for its finish forecast.
    #[serde(with = "humantime_serde")]
    pub forecast_window: Duration,
}

/// `[events]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    /// A job throttled this long without a break gets a `throttled` event (zero: never).
    #[serde(with = "humantime_serde")]
    pub throttled_after: Duration,
    /// Every event is POSTed here as JSON (empty: no webhook). A secret: never logged.
    pub webhook_url: String,
    /// One POST may take this long before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub webhook_timeout: Duration,
    /// Attempts per event (with doubling backoff) before it is given up and counted.
    pub webhook_attempts: u32,
    /// Events waiting for the webhook; past this, new ones are dropped and counted.
    pub webhook_queue: usize,
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
    /// The circuit breaker: rows processed before the failed share is judged.
    pub breaker_min_rows: u64,
    /// Pause a job when more than this share of its processed rows failed.
    pub breaker_failed_share: f64,
    /// Pause a job when more than this many of its rows failed (0: no such limit).
    pub breaker_failed_rows: u64,
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
    /// Impact budget: production's latency (the canary's) may rise to this many times its
    /// own baseline; 0 turns the budget off (the duty cycle then shares the primary).
    pub impact_budget_ratio: f64,
    /// A rise in production's latency smaller than this never counts against the budget.
    #[serde(with = "humantime_serde")]
    pub impact_floor: Duration,
    /// How often the impact budget rests briefly to re-learn production's baseline.
    #[serde(with = "humantime_serde")]
    pub impact_relearn_every: Duration,
    /// While production is at work on the primary, the share of time a job's batches may
    /// run; 1 turns sharing off.
    pub busy_duty_cycle: f64,
    /// While production is at work, the batch duration steered towards.
    #[serde(with = "humantime_serde")]
    pub busy_batch_target: Duration,
    /// Run even when the role cannot see standby positions and other sessions' lock
    /// waits (no pg_monitor): the lag and lock probes are then blind.
    pub allow_blind: bool,
    /// Hold while a replication slot retains this many bytes of WAL; 0 turns it off.
    pub max_slot_retained_bytes: u64,
    /// SQL returning one number or boolean, run on the primary every probe interval;
    /// empty: none.
    pub query: String,
    /// Hold while the query's value is above this.
    pub query_max: f64,
    /// After a hold, run again once the value is at or below this.
    pub query_resume: f64,
    /// A failing query lets jobs run instead of holding them.
    pub query_fail_open: bool,
    /// Hold a job while a vacuum works on its table (wraparound-prevention ones always hold).
    pub hold_while_vacuumed: bool,
    /// Hold while the primary writes this many bytes of WAL per second; 0 turns it off.
    pub max_wal_bytes_per_second: u64,
    /// Hold while this many completed WAL segments await archiving; 0 turns it off.
    pub max_archive_pending_segments: u64,
    /// Hold while WAL archiving is failing.
    pub hold_while_archive_failing: bool,
    /// Hold a job while dead rows are this share of its table; 0 turns it off.
    pub max_dead_tuple_ratio: f64,
    /// Prometheus server the query is sent to (`http://host:port`); empty: no query.
    pub prometheus_url: String,
    /// PromQL expression giving one number (the largest series counts).
    pub prometheus_query: String,
    /// Hold while the expression's value is above this.
    pub prometheus_max: f64,
    /// After a hold, run again once the value is at or below this.
    pub prometheus_resume: f64,
    /// An unreachable Prometheus or unreadable answer lets jobs run instead of holding them.
    pub prometheus_fail_open: bool,
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

/// The configuration's view of the process environment.
struct EnvVars {
    /// `BACKFILLD_<SECTION>__<KEY>` variables, as named.
    settings: config::Map<String, String>,
    /// `DATABASE_URL`.
    database_url: Option<String>,
    /// `BACKFILLD_*` variables without a section separator.
    ignored: Vec<String>,
}

/// How every variable of ours begins (config matches it in any case).
const PREFIX: &str = "backfilld_";

impl EnvVars {
    /// Sorts `vars` into settings, `DATABASE_URL` and ignored names. A value that is not
    /// UTF-8 is refused naming the variable only (config's own error would print it).
    fn read(vars: impl IntoIterator<Item = (OsString, OsString)>) -> Result<Self, SettingsError> {
        let mut env = EnvVars {
            settings: config::Map::new(),
            database_url: None,
            ignored: Vec::new(),
        };
        for (name, value) in vars {
            let Ok(name) = name.into_string() else {
                continue;
            };
            if name == "DATABASE_URL" {
                env.database_url = Some(utf8(&name, value)?);
                continue;
            }
            let lower = name.to_ascii_lowercase();
            let Some(key) = lower.strip_prefix(PREFIX) else {
                continue;
            };
            // Harnesses and wrappers set BACKFILLD_BIN, BACKFILLD_HOME…: not ours to
            // refuse. A section with an unknown key still reaches serde and is refused.
            if !key.contains("__") {
                env.ignored.push(name);
                continue;
            }
            let value = utf8(&name, value)?;
            env.settings.insert(name, value);
        }
        env.ignored.sort();
        Ok(env)
    }

    /// Every value a password could hide in.
    fn values(&self) -> impl Iterator<Item = &String> {
        self.settings.values().chain(&self.database_url)
    }
}

/// `value` of variable `name`, refused without repeating it if it is not UTF-8.
fn utf8(name: &str, value: OsString) -> Result<String, SettingsError> {
    value
        .into_string()
        .map_err(|_| SettingsError(format!("environment variable {name} is not valid UTF-8")))
}

/// The levels a log filter may name.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Refuses a log filter that is not a list of `level` and `target=level` directives.
/// tracing's own parser takes any bare word ("verbose!!") for a target name and enables
/// that target alone, which silences every line the daemon writes.
fn check_log_filter(key: &str, filter: &str) -> Result<(), SettingsError> {
    let is_level = |word: &str| LEVELS.iter().any(|level| word.eq_ignore_ascii_case(level));
    let is_target = |word: &str| {
        !word.is_empty()
            && word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-'))
    };
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let valid = match directive.rsplit_once('=') {
            // A span filter (`target[span{field=value}]=level`) is left to tracing.
            Some((target, level)) => {
                is_level(level.trim()) && (is_target(target.trim()) || target.contains('['))
            }
            None => is_level(directive),
        };
        if !valid {
            return Err(SettingsError(format!(
                "{key} {filter:?}: {directive:?} is not a level ({}) nor target=level",
                LEVELS.join(", ")
            )));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map_err(|e| SettingsError(format!("{key} {filter:?} is not a valid filter: {e}")))?;
    Ok(())
}

/// The `BACKFILLD_<SECTION>__<KEY>` source over `vars`; list keys take comma-separated
/// values.
fn environment(vars: config::Map<String, String>) -> config::Environment {
    config::Environment::with_prefix("BACKFILLD")
        .prefix_separator("_")
        .separator("__")
        .list_separator(",")
        .with_list_parse_key("throttle.expected_standbys")
        .with_list_parse_key("throttle.replica_urls")
        .try_parsing(true)
        .source(Some(vars))
}

/// A configuration that cannot be used; the message names the file, key or value, on
/// one line (it is what `backfilld` prints before exiting 2).
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct SettingsError(String);

impl SettingsError {
    /// The error with every one of `secrets` replaced by `***`: config quotes the value
    /// it could not use, and a URL pasted into the wrong key carries its password.
    fn scrubbed(self, secrets: &[String]) -> Self {
        SettingsError(crate::redact::scrub(&self.0, secrets))
    }
}

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

/// Reads a config file, refusing one that is not TOML with one line naming the place,
/// instead of the multi-line snippet the parser draws.
fn read_toml(path: &Path) -> Result<toml::Table, SettingsError> {
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
    })
}

/// Every string in `value`, however deeply nested.
fn strings(value: &toml::Value) -> Vec<&String> {
    match value {
        toml::Value::String(text) => vec![text],
        toml::Value::Array(items) => items.iter().flat_map(strings).collect(),
        toml::Value::Table(table) => table.values().flat_map(strings).collect(),
        _ => Vec::new(),
    }
}

impl Settings {
    /// Loads defaults, then `file` if given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, SettingsError> {
        Self::load_from(file, std::env::vars_os())
    }

    /// [`Settings::load`] with `vars` standing for the process environment. No error
    /// repeats a password found in any value given, whichever key it was typed into.
    fn load_from(
        file: Option<&Path>,
        vars: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<Settings, SettingsError> {
        let env = EnvVars::read(vars)?;
        let table = match file {
            Some(path) if !path.is_file() => {
                return Err(SettingsError(format!(
                    "config file {} does not exist",
                    path.display()
                )))
            }
            Some(path) => Some(toml::Value::Table(read_toml(path)?)),
            None => None,
        };
        let secrets = crate::redact::passwords(env.values().chain(table.iter().flat_map(strings)));
        Self::build(file, env)
            .and_then(|settings| settings.validate().map(|()| settings))
            .map_err(|e| e.scrubbed(&secrets))
    }

    /// Merges the sources, refusing unknown keys and values of the wrong type.
    fn build(file: Option<&Path>, env: EnvVars) -> Result<Settings, SettingsError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(environment(env.settings));
        if let Some(url) = env.database_url {
            builder = builder.set_override("database.url", url)?;
        }
        let mut settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| named_as_given(e, file))?;
        settings.ignored_variables = env.ignored;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), SettingsError> {
        let fail = |msg: String| Err(SettingsError(msg));
        check_control_plane_tls(&check_database_url("database.url", &self.database.url)?)?;
        if self.worker.stuck_after.is_zero() || self.worker.stuck_rest.is_zero() {
            return fail(
                "worker.stuck_after and worker.stuck_rest must be longer than 0s".to_string(),
            );
        }
        if self
            .undo
            .retention()
            .is_some_and(|r| r < Duration::from_secs(60))
        {
            return fail(format!(
                "undo.retention ({}) must be \"0s\" (keep undo data until purged) or at least 1m: \
                 shorter would drop a job's undo data before anyone could revert it",
                humantime::format_duration(self.undo.retention)
            ));
        }
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
        if self.worker.max_verify_sweeps < 0 {
            return fail(format!(
                "worker.max_verify_sweeps must be 0 or more, got {}",
                self.worker.max_verify_sweeps
            ));
        }
        // tokio-postgres would time out every connection attempt at once.
        if self.database.connect_timeout.is_zero() {
            return fail("database.connect_timeout must be positive".to_string());
        }
        backfill_core::job_spec::BatchBounds {
            min: self.batch.min_size,
            max: self.batch.max_size,
            start: self.batch.size,
        }
        .check(backfill_core::job_spec::BatchBoundNames {
            min: "batch.min_size",
            max: "batch.max_size",
            start: "batch.size",
        })
        .map_err(|e| SettingsError(e.to_string()))?;
        self.breaker_limits().validate().map_err(SettingsError)?;
        self.check_events()?;
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
        // A batch steered to last as long as the statement may would time out, shrink,
        // grow back and time out again.
        if self.batch.target >= self.batch.statement_timeout {
            return fail(format!(
                "batch.target ({}) must be shorter than batch.statement_timeout ({}): batches steered to it would time out",
                humantime::format_duration(self.batch.target),
                humantime::format_duration(self.batch.statement_timeout)
            ));
        }
        // A zero backoff doubles to zero: a failing row would be retried in a tight loop.
        if self.batch.retry_backoff.is_zero()
            || self.batch.retry_backoff > self.batch.retry_backoff_max
        {
            return fail(format!(
                "batch.retry_backoff ({}) must be positive and not above batch.retry_backoff_max ({})",
                humantime::format_duration(self.batch.retry_backoff),
                humantime::format_duration(self.batch.retry_backoff_max)
            ));
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
        let ratio = self.throttle.impact_budget_ratio;
        if !(ratio == 0.0 || (ratio.is_finite() && ratio > 1.0)) {
            return fail(format!(
                "throttle.impact_budget_ratio must be 0 (off) or a number above 1 (1.3: production's latency may rise 30 %), got {ratio}"
            ));
        }
        if self.throttle.impact_relearn_every < Duration::from_secs(5) {
            return fail(format!(
                "throttle.impact_relearn_every must be at least 5s (each re-learning rests every job for about two seconds), got {}",
                humantime::format_duration(self.throttle.impact_relearn_every)
            ));
        }
        if !(self.throttle.query_max.is_finite()
            && self.throttle.query_resume.is_finite()
            && self.throttle.query_resume <= self.throttle.query_max)
        {
            return fail(format!(
                "throttle.query_resume ({}) must be a number at or below throttle.query_max ({})",
                self.throttle.query_resume, self.throttle.query_max
            ));
        }
        let (url, query) = (
            self.throttle.prometheus_url.trim(),
            self.throttle.prometheus_query.trim(),
        );
        if url.is_empty() != query.is_empty() {
            return fail(
                "throttle.prometheus_url and throttle.prometheus_query go together: set both or neither"
                    .to_string(),
            );
        }
        if !url.is_empty() {
            backfill_dataplane::PrometheusQuery::new(url, query, self.throttle.probe_timeout)
                .map_err(|e| SettingsError(format!("throttle.prometheus_url: {e}")))?;
        }
        if !(self.throttle.prometheus_max.is_finite()
            && self.throttle.prometheus_resume.is_finite()
            && self.throttle.prometheus_resume <= self.throttle.prometheus_max)
        {
            return fail(format!(
                "throttle.prometheus_resume ({}) must be a number at or below throttle.prometheus_max ({})",
                self.throttle.prometheus_resume, self.throttle.prometheus_max
            ));
        }
        if !(0.0..=1.0).contains(&self.throttle.max_dead_tuple_ratio) {
            return fail(format!(
                "throttle.max_dead_tuple_ratio must be 0 (off) or a share in (0, 1], got {}",
                self.throttle.max_dead_tuple_ratio
            ));
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
        check_log_filter("log.level", &self.log.level)?;
        Ok(())
    }

    /// Checks `[events]` and `worker.forecast_window`, naming the bad key.
    fn check_events(&self) -> Result<(), SettingsError> {
        let fail = |message: String| Err(SettingsError(message));
        if self.worker.forecast_window < Duration::from_secs(1) {
            return fail(format!(
                "worker.forecast_window must be at least 1s, got {}",
                humantime::format_duration(self.worker.forecast_window)
            ));
        }
        let events = &self.events;
        if !events.webhook_url.is_empty() {
            if let Err(why) = crate::webhook::check_url(&events.webhook_url) {
                // The URL itself is a secret (a Slack webhook's path is its key).
                return fail(format!("events.webhook_url {why}"));
            }
        }
        if events.webhook_timeout.is_zero() {
            return fail("events.webhook_timeout must be positive".to_string());
        }
        if events.webhook_attempts == 0 {
            return fail("events.webhook_attempts must be at least 1".to_string());
        }
        if events.webhook_queue == 0 {
            return fail("events.webhook_queue must be at least 1".to_string());
        }
        Ok(())
    }

    /// The circuit breaker's limits, from `[batch]`.
    pub fn breaker_limits(&self) -> backfill_core::breaker::BreakerLimits {
        backfill_core::breaker::BreakerLimits {
            min_rows: self.batch.breaker_min_rows,
            failed_share: self.batch.breaker_failed_share,
            failed_rows: self.batch.breaker_failed_rows,
            failed_share_of_job: false,
            failed_rows_of_job: false,
        }
    }

    /// The impact budget's settings (`[throttle]` impact_*), or `None` when it is off.
    pub fn impact_settings(&self) -> Option<backfill_core::impact::ImpactSettings> {
        (self.throttle.impact_budget_ratio > 0.0).then_some(backfill_core::impact::ImpactSettings {
            budget_ratio: self.throttle.impact_budget_ratio,
            floor: self.throttle.impact_floor,
            relearn_every: self.throttle.impact_relearn_every,
        })
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
            // 0 in the config means off.
            max_slot_retained_bytes: Some(self.throttle.max_slot_retained_bytes)
                .filter(|limit| *limit > 0),
            query_limits: QueryLimits {
                hold_above: self.throttle.query_max,
                resume_at_or_below: self.throttle.query_resume,
                fail_open: self.throttle.query_fail_open,
            },
            hold_while_vacuumed: self.throttle.hold_while_vacuumed,
            // 0 in the config means off.
            signal_limits: SignalLimits {
                max_wal_bytes_per_second: Some(self.throttle.max_wal_bytes_per_second)
                    .filter(|limit| *limit > 0),
                max_archive_pending_segments: Some(self.throttle.max_archive_pending_segments)
                    .filter(|limit| *limit > 0),
                hold_while_archive_failing: self.throttle.hold_while_archive_failing,
                max_dead_tuple_ratio: Some(self.throttle.max_dead_tuple_ratio)
                    .filter(|ratio| *ratio > 0.0),
                job_query_fail_open: self.throttle.query_fail_open,
                prometheus: QueryLimits {
                    hold_above: self.throttle.prometheus_max,
                    resume_at_or_below: self.throttle.prometheus_resume,
                    fail_open: self.throttle.prometheus_fail_open,
                },
            },
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

    /// The defaults overridden by `vars` as if they were the whole process environment.
    fn with_env(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        Settings::load_from(
            None,
            vars.iter()
                .map(|(name, value)| (OsString::from(name), OsString::from(value))),
        )
    }

    #[test]
    fn undo_retention_is_off_by_default_and_never_shorter_than_a_minute() {
        assert_eq!(
            Settings::load(None).expect("defaults").undo.retention(),
            None
        );
        let retention = |value: &str| with_env(&[("BACKFILLD_UNDO__RETENTION", value)]);
        assert_eq!(
            retention("14 days").expect("valid").undo.retention(),
            Some(Duration::from_secs(14 * 86_400))
        );
        let refused = retention("30s").expect_err("too short").to_string();
        assert!(refused.contains("undo.retention (30s)"), "{refused}");
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
            (
                "BACKFILLD_THROTTLE__MAX_DEAD_TUPLE_RATIO",
                "1.5",
                "throttle.max_dead_tuple_ratio",
            ),
            (
                "BACKFILLD_THROTTLE__MAX_WAL_BYTES_PER_SECOND",
                "-1",
                "max_wal_bytes_per_second",
            ),
            (
                "BACKFILLD_THROTTLE__PROMETHEUS_URL",
                "http://prometheus:9090",
                "throttle.prometheus_url and throttle.prometheus_query go together",
            ),
            (
                "BACKFILLD_THROTTLE__PROMETHEUS_RESUME",
                "1",
                "throttle.prometheus_resume (1) must be a number at or below throttle.prometheus_max (0)",
            ),
        ] {
            let error = with_env(&[(key, value)]).expect_err(key).to_string();
            assert!(error.contains(mentions), "{key}={value}: {error}");
        }
    }

    #[test]
    fn nonsense_combinations_are_refused_naming_the_keys() {
        for (vars, mentions) in [
            (
                &[("BACKFILLD_BATCH__RETRY_BACKOFF", "2m")][..],
                "batch.retry_backoff (2m) must be positive and not above batch.retry_backoff_max (1m)",
            ),
            (
                &[("BACKFILLD_BATCH__RETRY_BACKOFF", "0s")],
                "batch.retry_backoff (0s)",
            ),
            (
                &[("BACKFILLD_BATCH__TARGET", "30s")],
                "batch.target (30s) must be shorter than batch.statement_timeout (30s)",
            ),
            (
                &[("BACKFILLD_DATABASE__CONNECT_TIMEOUT", "0s")],
                "database.connect_timeout must be positive",
            ),
            (
                &[("BACKFILLD_WORKER__MAX_VERIFY_SWEEPS", "-2")],
                "worker.max_verify_sweeps must be 0 or more, got -2",
            ),
            (
                &[
                    ("BACKFILLD_BATCH__MIN_SIZE", "50"),
                    ("BACKFILLD_BATCH__MAX_SIZE", "20"),
                ],
                "batch.min_size (50) must be positive and not above batch.max_size (20)",
            ),
            (
                &[("BACKFILLD_THROTTLE__MAX_ROWS_PER_SECOND", "NaN")],
                "throttle.max_rows_per_second must be 0 (no limit) or positive, got NaN",
            ),
            (
                &[("BACKFILLD_THROTTLE__MAX_ROWS_PER_SECOND", "-Infinity")],
                "throttle.max_rows_per_second must be 0 (no limit) or positive, got -inf",
            ),
            (
                &[("BACKFILLD_THROTTLE__IMPACT_BUDGET_RATIO", "0.9")],
                "throttle.impact_budget_ratio must be 0 (off) or a number above 1",
            ),
            (
                &[("BACKFILLD_THROTTLE__IMPACT_RELEARN_EVERY", "1s")],
                "throttle.impact_relearn_every must be at least 5s",
            ),
            (
                &[("BACKFILLD_THROTTLE__BUSY_DUTY_CYCLE", "nan")],
                "busy_duty_cycle must be in (0, 1], got NaN",
            ),
            (
                &[("BACKFILLD_THROTTLE__QUERY_RESUME", "5")],
                "throttle.query_resume (5) must be a number at or below throttle.query_max (0)",
            ),
        ] {
            let error = with_env(vars).expect_err(mentions).to_string();
            assert!(error.contains(mentions), "{vars:?}: {error}");
        }
    }

    #[test]
    fn log_filters_must_name_levels() {
        for good in [
            "info",
            "WARN",
            "info,backfilld=debug",
            "backfilld::batch=debug, info",
            "sqlx=off",
            "backfilld[job{job=x}]=debug",
        ] {
            check_log_filter("log.level", good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for (bad, directive) in [
            ("verbose!!", "verbose!!"),
            ("backfilld", "backfilld"),
            ("info,backfilld=loud", "backfilld=loud"),
            ("=debug", "=debug"),
            ("bad target=info", "bad target=info"),
        ] {
            let error = check_log_filter("log.level", bad).unwrap_err().to_string();
            assert_eq!(
                error,
                format!("configuration error: log.level {bad:?}: {directive:?} is not a level (trace, debug, info, warn, error, off) nor target=level")
            );
        }
        let error = with_env(&[("BACKFILLD_LOG__LEVEL", "verbose!!")]).unwrap_err();
        assert!(error.to_string().contains("log.level"), "{error}");
    }

    #[test]
    fn passwords_typed_into_any_key_are_not_repeated() {
        for (name, value, shown) in [
            (
                "BACKFILLD_WORKER__LEASE",
                "postgres://u:s3cret@h/db",
                "\"postgres://u:***@h/db\"",
            ),
            (
                "BACKFILLD_HTTP__LISTEN",
                "postgres://h/db?password=s3cret",
                "\"postgres://h/db?password=***\"",
            ),
            (
                "BACKFILLD_LOG__LEVEL",
                "user=u password=s3cret",
                "password=***",
            ),
        ] {
            let error = with_env(&[(name, value)]).unwrap_err().to_string();
            assert!(error.contains(shown), "{name}: {error}");
            assert!(!error.contains("s3cret"), "{name}: {error}");
        }
    }

    #[test]
    fn stray_variables_are_ignored_but_unknown_keys_refused() {
        let settings = with_env(&[
            ("BACKFILLD_BIN", "/usr/local/bin/backfilld"),
            ("BACKFILLD_FOO", "1"),
            ("BACKFILLD_WORKER__ID", "w1"),
            ("HOME", "/root"),
        ])
        .expect("stray variables are not configuration");
        assert_eq!(
            settings.ignored_variables,
            ["BACKFILLD_BIN", "BACKFILLD_FOO"]
        );
        assert_eq!(settings.worker.id, "w1");
        let error = with_env(&[("BACKFILLD_WORKER__IDD", "w1")])
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `idd`"), "{error}");
    }

    #[test]
    fn database_url_is_honoured() {
        let settings = with_env(&[("DATABASE_URL", "postgres://elsewhere/app")]).unwrap();
        assert_eq!(settings.database.url, "postgres://elsewhere/app");
    }
}
