//! Hardening of the daemon's own surfaces: configuration that would silently misbehave
//! is refused (exit 2, naming the key, never echoing a password), stray `BACKFILLD_*`
//! variables are ignored with a warning, text logs cannot be forged through a job name,
//! and a panic never ends the process with exit code 0.

use std::time::Duration;

use backfilld_e2e::{backfilld_at, env_refs, quick_worker, Daemon, TestDb};

const RUN_LIMIT: Duration = Duration::from_secs(120);

#[test]
fn nonsense_configuration_is_refused_naming_the_key() {
    let db = TestDb::new("hardening_config");
    let url = db.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let with_file = |text: &str| {
        let path = dir.path().join("backfilld.toml");
        std::fs::write(&path, text).expect("write config");
        let path = path.to_string_lossy().into_owned();
        backfilld_at(&url, &["--config", &path, "status"], &[])
            .usage_error()
            .to_string()
    };
    let with_env = |key: &str, value: &str| {
        backfilld_at(&url, &["status"], &[(key, value)])
            .usage_error()
            .to_string()
    };
    let cases = [
        (
            with_env("BACKFILLD_LOG__LEVEL", "verbose!!"),
            "backfilld: configuration error: log.level \"verbose!!\": \"verbose!!\" is not a level (trace, debug, info, warn, error, off) nor target=level",
        ),
        (
            with_env("BACKFILLD_LOG__LEVEL", "info,backfilld=loud"),
            "backfilld: configuration error: log.level \"info,backfilld=loud\": \"backfilld=loud\" is not a level (trace, debug, info, warn, error, off) nor target=level",
        ),
        (
            with_env("BACKFILLD_BATCH__RETRY_BACKOFF", "2m"),
            "backfilld: configuration error: batch.retry_backoff (2m) must be positive and not above batch.retry_backoff_max (1m)",
        ),
        (
            with_env("BACKFILLD_BATCH__RETRY_BACKOFF", "0s"),
            "backfilld: configuration error: batch.retry_backoff (0s) must be positive and not above batch.retry_backoff_max (1m)",
        ),
        (
            with_env("BACKFILLD_BATCH__TARGET", "1m"),
            "backfilld: configuration error: batch.target (1m) must be shorter than batch.statement_timeout (30s): batches steered to it would time out",
        ),
        (
            with_env("BACKFILLD_DATABASE__CONNECT_TIMEOUT", "0s"),
            "backfilld: configuration error: database.connect_timeout must be positive",
        ),
        (
            with_env("BACKFILLD_WORKER__MAX_VERIFY_SWEEPS", "-1"),
            "backfilld: configuration error: worker.max_verify_sweeps must be 0 or more, got -1",
        ),
        (
            with_file("[batch]\nmin_size = 500\nmax_size = 100\n"),
            "backfilld: configuration error: batch.min_size (500) must be positive and not above batch.max_size (100)",
        ),
        (
            with_file("[throttle]\nmax_rows_per_second = nan\n"),
            "backfilld: configuration error: throttle.max_rows_per_second must be 0 (no limit) or positive, got NaN",
        ),
        (
            with_env("BACKFILLD_THROTTLE__MAX_ROWS_PER_SECOND", "Infinity"),
            "backfilld: configuration error: throttle.max_rows_per_second must be 0 (no limit) or positive, got inf",
        ),
        (
            with_env("BACKFILLD_THROTTLE__BUSY_DUTY_CYCLE", "-inf"),
            "backfilld: configuration error: [batch]/[throttle]: busy_duty_cycle must be in (0, 1], got -inf (the throttle cannot work with these values)",
        ),
    ];
    for (got, expected) in &cases {
        assert_eq!(got, expected);
    }
}

#[test]
fn a_url_typed_into_another_key_is_refused_without_its_password() {
    let db = TestDb::new("hardening_secret");
    let url = db.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("backfilld.toml");
    std::fs::write(
        &path,
        "[log]\nformat = \"postgresql://app:t0p%2Fs3cret@db/x\"\n",
    )
    .expect("write config");
    let path = path.to_string_lossy().into_owned();
    let cases = [
        (
            backfilld_at(
                &url,
                &["status"],
                &[("BACKFILLD_WORKER__LEASE", "postgres://u:s3cret@h/db")],
            ),
            "backfilld: configuration error: invalid value: string \"postgres://u:***@h/db\", expected a duration for key `worker.lease` (write a number with a unit, e.g. \"500ms\", \"2s\", \"1m\")",
        ),
        (
            backfilld_at(
                &url,
                &["status"],
                &[("BACKFILLD_DATABASE__POOL_SIZE", "host=db password=s3cret")],
            ),
            "backfilld: configuration error: invalid type: string \"host=db password=***\", expected an integer for key `database.pool_size` in the environment",
        ),
        (
            backfilld_at(&url, &["--config", &path, "status"], &[]),
            "backfilld: configuration error: log.format must be \"text\" or \"json\", not \"postgresql://app:***@db/x\" for key `log.format`",
        ),
    ];
    for (output, expected) in &cases {
        assert_eq!(output.usage_error(), *expected);
        assert!(!output.stderr.contains("s3cret"), "{output:?}");
    }
}

#[test]
fn stray_backfilld_variables_are_ignored_with_a_warning_but_unknown_keys_are_not() {
    let db = TestDb::new("hardening_stray");
    db.migrate();
    let url = db.url();
    let stray = [
        ("BACKFILLD_BIN", "/opt/backfilld"),
        ("BACKFILLD_FOO", "foo-value"),
    ];
    let output = backfilld_at(&url, &["status"], &stray);
    assert!(output.status.success(), "{output:?}");
    for (name, value) in stray {
        let warnings: Vec<&str> = output
            .stderr
            .lines()
            .filter(|line| line.contains(name))
            .collect();
        assert_eq!(warnings.len(), 1, "one warning for {name}: {output:?}");
        assert!(
            warnings[0].contains("WARN") && warnings[0].contains("BACKFILLD_<SECTION>__<KEY>"),
            "{output:?}"
        );
        assert!(!warnings[0].contains(value), "{output:?}");
    }

    let typo = backfilld_at(&url, &["status"], &[("BACKFILLD_BATCH__SIZ", "10")]);
    assert_eq!(
        typo.usage_error(),
        "backfilld: configuration error: unknown field `siz`, expected one of `size`, `min_size`, `max_size`, `target`, `lock_timeout`, `statement_timeout`, `max_attempts`, `retry_backoff`, `retry_backoff_max`, `breaker_min_rows`, `breaker_failed_share`, `breaker_failed_rows` for key `batch`"
    );
}

#[test]
fn a_job_name_cannot_forge_text_log_lines_or_drive_the_terminal() {
    let db = TestDb::new("hardening_log");
    db.sql(
        "CREATE TABLE items (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO items (k) SELECT g FROM generate_series(1, 100) g;",
    );
    db.migrate();
    db.sql(
        r"INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate)
          VALUES (E'evil\n2030-01-01T00:00:00Z  INFO forged: all good\r\u001b[2J', 'items', 'k',
                  $$UPDATE items SET v = 1 WHERE k = ANY(:keys)$$, 'v = 0')",
    );
    let env = quick_worker("hardening_log");
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    daemon.expect_success(RUN_LIMIT);
    let log = daemon.log_text();
    assert_eq!(db.int("SELECT count(*) FROM items WHERE v = 1"), 100);
    assert!(
        log.contains(r"evil\n2030-01-01T00:00:00Z  INFO forged: all good\r\u{1b}[2J"),
        "{log}"
    );
    for line in log.lines() {
        assert!(!line.starts_with("2030-01-01"), "forged line: {line:?}");
        assert!(
            !line.chars().any(|c| c.is_control()),
            "control character in {line:?}"
        );
    }
}
