//! Where settings come from: the compiled-in defaults, the config file, the environment;
//! read, merged and refused with one line naming the place.

use std::ffi::OsString;
use std::path::Path;

use super::SettingsError;

/// The configuration's view of the process environment.
pub(super) struct EnvVars {
    /// `BACKFILLD_<SECTION>__<KEY>` variables, as named.
    pub(super) settings: config::Map<String, String>,
    /// `DATABASE_URL`.
    pub(super) database_url: Option<String>,
    /// `BACKFILLD_*` variables without a section separator.
    pub(super) ignored: Vec<String>,
}

/// How every variable of ours begins (config matches it in any case).
const PREFIX: &str = "backfilld_";

impl EnvVars {
    /// Sorts `vars` into settings, `DATABASE_URL` and ignored names. A value that is not
    /// UTF-8 is refused naming the variable only (config's own error would print it).
    pub(super) fn read(
        vars: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<Self, SettingsError> {
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
    pub(super) fn values(&self) -> impl Iterator<Item = &String> {
        self.settings.values().chain(&self.database_url)
    }
}

/// `value` of variable `name`, refused without repeating it if it is not UTF-8.
fn utf8(name: &str, value: OsString) -> Result<String, SettingsError> {
    value
        .into_string()
        .map_err(|_| SettingsError(format!("environment variable {name} is not valid UTF-8")))
}

/// The `BACKFILLD_<SECTION>__<KEY>` source over `vars`; list keys take comma-separated
/// values.
pub(super) fn environment(vars: config::Map<String, String>) -> config::Environment {
    config::Environment::with_prefix("BACKFILLD")
        .prefix_separator("_")
        .separator("__")
        .list_separator(",")
        .with_list_parse_key("throttle.expected_standbys")
        .with_list_parse_key("throttle.replica_urls")
        .try_parsing(true)
        .source(Some(vars))
}

/// A type error naming `file` as the operator wrote it: config names it relative to the
/// working directory (`../../../etc/backfilld.toml`).
pub(super) fn named_as_given(e: config::ConfigError, file: Option<&Path>) -> config::ConfigError {
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
pub(super) fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Reads a config file, refusing one that is not TOML with one line naming the place,
/// instead of the multi-line snippet the parser draws.
pub(super) fn read_toml(path: &Path) -> Result<toml::Table, SettingsError> {
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
pub(super) fn strings(value: &toml::Value) -> Vec<&String> {
    match value {
        toml::Value::String(text) => vec![text],
        toml::Value::Array(items) => items.iter().flat_map(strings).collect(),
        toml::Value::Table(table) => table.values().flat_map(strings).collect(),
        _ => Vec::new(),
    }
}
