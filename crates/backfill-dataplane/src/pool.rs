//! The data-plane connection pool and the session settings every connection gets.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::DataPlaneError;

/// Settings applied to every data-plane session at connect time.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// How long a batch waits for a row lock before giving up (transient, retried).
    pub lock_timeout: Duration,
    /// Upper bound for one statement; a batch hitting it is shrunk and retried.
    pub statement_timeout: Duration,
    /// Shown in `pg_stat_activity`, so DBAs can tell our sessions apart.
    pub application_name: String,
    /// Connections kept in the pool.
    pub pool_size: usize,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            lock_timeout: Duration::from_secs(1),
            statement_timeout: Duration::from_secs(30),
            application_name: "backfilld".to_string(),
            pool_size: 4,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Builds the data-plane pool for `database_url` with `settings` on every session.
pub fn connect_pool(
    database_url: &str,
    settings: &SessionSettings,
) -> Result<Pool, DataPlaneError> {
    let mut config: tokio_postgres::Config =
        database_url.parse().map_err(|e: tokio_postgres::Error| {
            DataPlaneError::Config(format!("database URL is not valid: {e}"))
        })?;
    // Startup options cost no round trip and survive pool recycling.
    config.options(format!(
        "-c lock_timeout={} -c statement_timeout={}",
        settings.lock_timeout.as_millis(),
        settings.statement_timeout.as_millis()
    ));
    config.application_name(&settings.application_name);
    config.connect_timeout(settings.connect_timeout);
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(settings.pool_size)
        .wait_timeout(Some(settings.connect_timeout))
        .create_timeout(Some(settings.connect_timeout))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| DataPlaneError::Config(format!("cannot build the data-plane pool: {e}")))
}
