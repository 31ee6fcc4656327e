//! `[undo]`: how long undo data is kept.

use std::time::Duration;

use serde::Deserialize;

use super::SettingsError;

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

impl UndoSettings {
    /// Checks `[undo]`, naming the bad key.
    pub(super) fn validate(&self) -> Result<(), SettingsError> {
        if self
            .retention()
            .is_some_and(|r| r < Duration::from_secs(60))
        {
            return Err(SettingsError(format!(
                "undo.retention ({}) must be \"0s\" (keep undo data until purged) or at least 1m: \
                 shorter would drop a job's undo data before anyone could revert it",
                humantime::format_duration(self.retention)
            )));
        }
        Ok(())
    }
}
