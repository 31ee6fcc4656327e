//! Configuration: `config/default.toml` (compiled in), then `--config FILE`, then
//! `BACKFILLD_<SECTION>__<KEY>` environment variables, then `DATABASE_URL`.
//!
//! One file per section, each with its own checks: [`database`], [`worker`], [`batch`],
//! [`throttle`], [`http`], [`log`], [`events`], [`undo`]; [`sources`] reads and merges
//! the file and the environment. Each room of the daemon receives only the sections it
//! reads (the worker's are [`WorkerSections`]).

mod batch;
mod database;
mod events;
mod http;
mod log;
mod sources;
mod throttle;
mod undo;
mod worker;

#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::path::Path;

use backfill_core::breaker::BreakerLimits;
use backfill_core::throttle::ThrottleSettings;
use backfill_dataplane::SessionSettings;
use serde::Deserialize;

pub use batch::BatchSettings;
pub use database::DatabaseSettings;
pub use events::EventSettings;
pub use http::HttpSettings;
pub use log::{LogFormat, LogSettings};
pub use throttle::ThrottleConfig;
pub use undo::UndoSettings;
pub use worker::WorkerSettings;

use sources::{environment, named_as_given, read_toml, strings, EnvVars};

/// The built-in defaults: the same file operators read and copy.
pub const DEFAULT_TOML: &str = include_str!("../../../../config/default.toml");

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

/// The sections the worker drives jobs by: `[worker]`, and the job defaults in `[batch]`,
/// `[throttle]` and `[events]`.
#[derive(Debug, Clone)]
pub struct WorkerSections {
    pub worker: WorkerSettings,
    pub batch: BatchSettings,
    pub throttle: ThrottleConfig,
    pub events: EventSettings,
}

impl WorkerSections {
    /// The throttle controller's settings for a job that overrides nothing.
    pub fn throttle_defaults(&self) -> ThrottleSettings {
        self.throttle.job_defaults(&self.batch)
    }

    /// The circuit breaker's limits, from `[batch]`.
    pub fn breaker_limits(&self) -> BreakerLimits {
        self.batch.breaker_limits()
    }
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
        let mut message = sources::one_line(&e.to_string());
        if message.contains("expected a duration") {
            message.push_str(" (write a number with a unit, e.g. \"500ms\", \"2s\", \"1m\")");
        }
        SettingsError(message)
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

    /// Checks every section, then what sections must agree on, naming the bad keys.
    fn validate(&self) -> Result<(), SettingsError> {
        self.database.validate()?;
        self.worker.validate()?;
        self.undo.validate()?;
        // Each job holds a connection for its batch; the health probe needs one
        // more, or it starves and every job holds on a failed probe.
        if self.database.pool_size <= self.worker.concurrency {
            return Err(SettingsError(format!(
                "database.pool_size ({}) must be greater than worker.concurrency ({}): one connection per job plus one for the health probes",
                self.database.pool_size, self.worker.concurrency
            )));
        }
        self.batch.validate()?;
        self.events.validate()?;
        self.throttle.validate()?;
        self.throttle
            .job_defaults(&self.batch)
            .validate()
            .map_err(|e| {
                SettingsError(format!(
                    "[batch]/[throttle]: {e} (the throttle cannot work with these values)"
                ))
            })?;
        self.http.validate(self.batch.statement_timeout)?;
        log::check_log_filter("log.level", &self.log.level)?;
        Ok(())
    }

    /// What every data-plane session is opened with: `[batch]` timeouts, `[database]`
    /// pool, and this worker's name, by which the probes recognise our sessions.
    pub fn data_plane_session(&self) -> SessionSettings {
        SessionSettings {
            lock_timeout: self.batch.lock_timeout,
            statement_timeout: self.batch.statement_timeout,
            application_name: format!("backfilld/{}", self.worker.worker_id()),
            pool_size: self.database.pool_size,
            connect_timeout: self.database.connect_timeout,
        }
    }

    /// The sections the worker reads.
    pub fn worker_sections(&self) -> WorkerSections {
        WorkerSections {
            worker: self.worker.clone(),
            batch: self.batch.clone(),
            throttle: self.throttle.clone(),
            events: self.events.clone(),
        }
    }
}
