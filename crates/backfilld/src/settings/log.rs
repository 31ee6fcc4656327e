//! `[log]`: the log lines' format and filter.

use serde::Deserialize;

use super::SettingsError;

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

/// The levels a log filter may name.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Refuses a log filter that is not a list of `level` and `target=level` directives.
/// tracing's own parser takes any bare word ("verbose!!") for a target name and enables
/// that target alone, which silences every line the daemon writes.
pub(super) fn check_log_filter(key: &str, filter: &str) -> Result<(), SettingsError> {
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
