//! `[events]`: the `throttled` event and the webhook every event is POSTed to.

use std::time::Duration;

use serde::Deserialize;

use super::SettingsError;

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

impl EventSettings {
    /// Checks `[events]`, naming the bad key.
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        let fail = |message: String| Err(SettingsError(message));
        if !self.webhook_url.is_empty() {
            if let Err(why) = crate::webhook::check_url(&self.webhook_url) {
                // The URL itself is a secret (a Slack webhook's path is its key).
                return fail(format!("events.webhook_url {why}"));
            }
        }
        if self.webhook_timeout.is_zero() {
            return fail("events.webhook_timeout must be positive".to_string());
        }
        if self.webhook_attempts == 0 {
            return fail("events.webhook_attempts must be at least 1".to_string());
        }
        if self.webhook_queue == 0 {
            return fail("events.webhook_queue must be at least 1".to_string());
        }
        Ok(())
    }
}
