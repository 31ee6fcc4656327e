//! Names and quoting: settings and standby names checked against a safe alphabet, unique
//! database names, and values quoted for conninfo strings and URLs.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::TestkitError;

/// PostgreSQL identifiers longer than this are truncated by the server.
const MAX_IDENTIFIER_LEN: usize = 63;

pub(super) fn validate_setting_name(name: &str) -> Result<(), TestkitError> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if valid {
        Ok(())
    } else {
        Err(TestkitError::InvalidArgument {
            what: "setting name",
            value: name.to_owned(),
            reason: "expected ASCII letters, digits, '_' and '.'",
        })
    }
}

/// Standby names end up inside SQL literals and conninfo strings unquoted, so only a safe
/// alphabet is accepted.
pub(super) fn validate_standby_name(name: &str) -> Result<(), TestkitError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_IDENTIFIER_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err(TestkitError::InvalidArgument {
            what: "standby name",
            value: name.to_owned(),
            reason: "expected 1 to 63 ASCII letters, digits, '_' or '-'",
        })
    }
}

/// `prefix` reduced to a lowercase identifier, plus the process id and a process-wide
/// counter, kept within PostgreSQL's 63-byte identifier limit.
pub(super) fn unique_database_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let suffix = format!(
        "_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let mut stem: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if !stem.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
        stem.insert_str(0, "db_");
    }
    stem.truncate(MAX_IDENTIFIER_LEN - suffix.len());
    stem + &suffix
}

/// Quotes a conninfo value: single quotes, with `\` and `'` backslash-escaped.
pub(super) fn conninfo_quote(value: &str) -> String {
    let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
    format!("'{escaped}'")
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub(crate) fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_unique_valid_identifiers() {
        let a = unique_database_name("My Test-DB");
        let b = unique_database_name("My Test-DB");
        assert_ne!(a, b);
        assert!(a.starts_with("my_test_db_"), "{a}");
        let long = unique_database_name(&"x".repeat(200));
        assert!(long.len() <= MAX_IDENTIFIER_LEN, "{long}");
        assert!(unique_database_name("9lives").starts_with("db_9lives_"));
        assert!(unique_database_name("").starts_with("db__"));
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_standby_name("replica-1_a").is_ok());
        assert!(validate_standby_name("").is_err());
        assert!(validate_standby_name("x'; drop").is_err());
        assert!(validate_standby_name(&"a".repeat(64)).is_err());
        assert!(validate_setting_name("auto_explain.log_min_duration").is_ok());
        assert!(validate_setting_name("work_mem = 1; x").is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(conninfo_quote(r"a'b\c"), r"'a\'b\\c'");
        assert_eq!(percent_encode("db 1/ä"), "db%201%2F%C3%A4");
    }
}
