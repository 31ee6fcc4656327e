//! `[database]`: the one connection string both planes use, and how they connect.

use std::time::Duration;

use serde::Deserialize;

use super::SettingsError;

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

impl DatabaseSettings {
    /// Checks `[database]`, naming the bad key.
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        check_control_plane_tls(&check_database_url("database.url", &self.url)?)?;
        // tokio-postgres would time out every connection attempt at once.
        if self.connect_timeout.is_zero() {
            return Err(SettingsError(
                "database.connect_timeout must be positive".to_string(),
            ));
        }
        Ok(())
    }
}

/// Refuses a connection string either plane could not use (scheme, syntax, sslmode,
/// sslrootcert, options tokio-postgres does not know), naming the key but never
/// repeating the URL, which may hold a password.
pub(super) fn check_database_url(
    key: &str,
    url: &str,
) -> Result<backfill_dataplane::Endpoint, SettingsError> {
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
