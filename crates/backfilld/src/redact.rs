//! Keeps passwords out of everything we print, panics included.

use std::sync::atomic::{AtomicBool, Ordering};

use url::Url;

/// Parses a `postgres://` URL; the error never repeats the URL (it may hold a password).
pub fn parse_database_url(raw: &str) -> Result<Url, String> {
    let url = Url::parse(raw).map_err(|e| format!("database URL is not valid ({e})"))?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return Err(format!(
            "database URL must start with postgres:// or postgresql://, not {}://",
            url.scheme()
        ));
    }
    Ok(url)
}

/// The URL with any password replaced by `***`, for logs and status output.
pub fn redacted(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("***"));
            }
            // Only a query holding a password is rewritten: re-encoding would turn an
            // sslrootcert=/path into %2Fpath for nothing.
            if url.query_pairs().any(|(k, _)| k == "password") {
                let pairs: Vec<(String, String)> = url
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k == "password" {
                            "***".to_string()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            url.to_string()
        }
        Err(_) => "<unparseable database URL>".to_string(),
    }
}

/// The passwords in `values` (a URL's user info or `password=` parameter, as written and
/// percent-decoded; a keyword connection string's `password=`), for [`scrub`].
pub fn passwords<'a>(values: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let mut secrets = Vec::new();
    for value in values {
        let Ok(url) = Url::parse(value) else {
            secrets.extend(unparsed_passwords(value));
            continue;
        };
        if let Some(password) = url.password() {
            secrets.push(password.to_string());
            if let Ok(decoded) = percent_encoding::percent_decode_str(password).decode_utf8() {
                secrets.push(decoded.into_owned());
            }
        }
        for (key, value) in url.query_pairs() {
            if key == "password" {
                secrets.push(value.into_owned());
            }
        }
    }
    secrets.retain(|secret| !secret.is_empty());
    // Longest first, so a password containing another is replaced whole.
    secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
    secrets.dedup();
    secrets
}

/// Passwords in a value that is no URL: what sits between `://user:` and `@` (a URL
/// the parser refused), or follows `password=` (libpq's `key=value` form, maybe quoted).
fn unparsed_passwords(value: &str) -> Vec<String> {
    let mut secrets = Vec::new();
    if let Some((_, rest)) = value.split_once("://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if let Some((user_info, _)) = authority.rsplit_once('@') {
            if let Some((_, password)) = user_info.split_once(':') {
                secrets.push(password.to_string());
            }
        }
    }
    let lower = value.to_ascii_lowercase();
    for (at, _) in lower.match_indices("password") {
        let after = value[at + "password".len()..].trim_start();
        let Some(after) = after.strip_prefix('=') else {
            continue;
        };
        let after = after.trim_start();
        let password = match after.strip_prefix('\'') {
            Some(quoted) => quoted.split('\'').next().unwrap_or_default(),
            None => after.split(char::is_whitespace).next().unwrap_or_default(),
        };
        secrets.push(password.to_string());
    }
    secrets
}

/// `text` with every one of `secrets` replaced by `***`.
pub fn scrub(text: &str, secrets: &[String]) -> String {
    secrets.iter().fold(text.to_string(), |text, secret| {
        text.replace(secret.as_str(), "***")
    })
}

/// Exit code of a process ended by a panic (what Rust uses for a panic on the main thread).
pub const PANIC_EXIT_CODE: i32 = 101;

/// Makes any panic, on any thread, end the process with [`PANIC_EXIT_CODE`] once it is
/// logged, its message scrubbed of `secrets` (it may quote anything the code had at
/// hand, connection strings included). Tokio catches a panicking task's unwind, so
/// without this a claim loop could die and the daemon go on without it, or exit 0.
/// Exiting rather than aborting runs the atexit hooks (the demo's cluster teardown)
/// and leaves no core dump; the lease of a job in flight expires as after a kill -9.
/// Call it once logging is set up.
pub fn exit_on_panic(secrets: Vec<String>) {
    static EXITING: AtomicBool = AtomicBool::new(false);
    std::panic::set_hook(Box::new(move |info| {
        // A panic during exit (in an atexit hook) must not call exit() again.
        if EXITING.swap(true, Ordering::SeqCst) {
            return;
        }
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "Box<dyn Any>".to_string());
        let thread = std::thread::current();
        let location = info.location().map(ToString::to_string);
        let backtrace = std::backtrace::Backtrace::capture();
        let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
            .then(|| backtrace.to_string());
        tracing::error!(
            thread = thread.name().unwrap_or("<unnamed>"),
            location,
            backtrace,
            "panicked, exiting with code {PANIC_EXIT_CODE}: {}",
            scrub(&message, &secrets)
        );
        std::process::exit(PANIC_EXIT_CODE);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_replaced() {
        assert_eq!(
            redacted("postgres://app:s3cret@db:5432/x"),
            "postgres://app:***@db:5432/x"
        );
        assert_eq!(
            redacted("postgres://db/x?password=s3cret&sslmode=disable"),
            "postgres://db/x?password=***&sslmode=disable"
        );
        assert_eq!(redacted("not a url s3cret"), "<unparseable database URL>");
        assert_eq!(
            redacted("postgres://db/x?sslmode=verify-full&sslrootcert=/etc/ca.crt"),
            "postgres://db/x?sslmode=verify-full&sslrootcert=/etc/ca.crt"
        );
    }

    #[test]
    fn parse_errors_do_not_echo_the_url() {
        let err = parse_database_url("mysql://u:s3cret@h/db").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn passwords_are_found_as_written_and_decoded_and_scrubbed() {
        let urls = [
            "postgres://app:p%40ss%3Aw0rd@db/x".to_string(),
            "postgres://db/x?password=s3cret&sslmode=require".to_string(),
            "postgres://nopassword@db/x".to_string(),
            "not a url".to_string(),
        ];
        let secrets = passwords(&urls);
        assert_eq!(secrets, ["p%40ss%3Aw0rd", "p@ss:w0rd", "s3cret"]);
        let unparsed = [
            "host=db password=s3cret user=app".to_string(),
            "host=db PASSWORD = 'two words' user=app".to_string(),
            "postgres://app:pw0rd@[bad host/x".to_string(),
        ];
        assert_eq!(passwords(&unparsed), ["two words", "s3cret", "pw0rd"]);
        assert_eq!(
            scrub(
                "connect to postgres://app:p%40ss%3Aw0rd@db with p@ss:w0rd or s3cret",
                &secrets
            ),
            "connect to postgres://app:***@db with *** or ***"
        );
    }

    /// Set in the child process of [`a_panic_in_a_task_is_logged_scrubbed_and_exits_101`].
    const PANIC_CHILD: &str = "REDACT_TEST_PANIC_CHILD";

    /// In a child process (the test binary run again), a tokio task panics with a
    /// password in its message, as a claim loop could.
    #[test]
    fn a_panic_in_a_task_is_logged_scrubbed_and_exits_101() {
        if std::env::var_os(PANIC_CHILD).is_some() {
            crate::telemetry::init_logging(&crate::settings::LogSettings {
                format: crate::settings::LogFormat::Text,
                level: "info".to_string(),
            });
            exit_on_panic(passwords(&["postgres://app:s3cret@db/x".to_string()]));
            let runtime = tokio::runtime::Runtime::new().expect("runtime");
            // Without the hook tokio catches the panic, and the test passes: exit 0.
            let task = runtime.spawn(async {
                panic!("lost postgres://app:s3cret@db/x");
            });
            let _ = runtime.block_on(task);
            return;
        }
        let output = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "redact::tests::a_panic_in_a_task_is_logged_scrubbed_and_exits_101",
                "--nocapture",
            ])
            .env(PANIC_CHILD, "1")
            .output()
            .expect("run the test binary");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(PANIC_EXIT_CODE), "{stderr}");
        let logged: Vec<&str> = stderr.lines().filter(|l| l.contains("panicked")).collect();
        assert_eq!(logged.len(), 1, "{stderr}");
        assert!(
            logged[0].contains(
                "ERROR panicked, exiting with code 101: lost postgres://app:***@db/x thread=\"tokio-"
            ),
            "{stderr}"
        );
        assert!(!stderr.contains("s3cret"), "{stderr}");
    }
}
