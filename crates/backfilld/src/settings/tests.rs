//! Loading and checking the settings: defaults, the environment, refusals.

use std::ffi::OsString;
use std::time::Duration;

use super::log::check_log_filter;
use super::*;

#[test]
fn built_in_defaults_load_and_validate() {
    let settings = Settings::load(None).expect("default.toml must be valid");
    assert_eq!(settings.batch.size, 1000);
    assert_eq!(settings.throttle.max_lag, Duration::from_secs(2));
    assert_eq!(settings.throttle.max_lag_bytes, 64 * 1024 * 1024);
    assert_eq!(settings.log.format, LogFormat::Text);
    assert_eq!(settings.throttle.max_blocking, Duration::from_millis(200));
    assert!(settings.throttle.expected_standbys.is_empty());
    let throttle = settings.throttle.job_defaults(&settings.batch);
    assert_eq!(throttle.max_rows_per_second, None, "0 means no limit");
    assert_eq!(throttle.hold_recheck, settings.throttle.probe_interval);
}

/// The defaults overridden by `vars` as if they were the whole process environment.
fn with_env(vars: &[(&str, &str)]) -> Result<Settings, SettingsError> {
    Settings::load_from(
        None,
        vars.iter()
            .map(|(name, value)| (OsString::from(name), OsString::from(value))),
    )
}

#[test]
fn undo_retention_is_off_by_default_and_never_shorter_than_a_minute() {
    assert_eq!(
        Settings::load(None).expect("defaults").undo.retention(),
        None
    );
    let retention = |value: &str| with_env(&[("BACKFILLD_UNDO__RETENTION", value)]);
    assert_eq!(
        retention("14 days").expect("valid").undo.retention(),
        Some(Duration::from_secs(14 * 86_400))
    );
    let refused = retention("30s").expect_err("too short").to_string();
    assert!(refused.contains("undo.retention (30s)"), "{refused}");
}

#[test]
fn standby_lists_come_from_comma_separated_variables() {
    let standbys = |value: &str| {
        with_env(&[("BACKFILLD_THROTTLE__EXPECTED_STANDBYS", value)])
            .expect("valid")
            .throttle
            .expected_standbys
    };
    assert_eq!(standbys("standby1"), ["standby1"]);
    assert_eq!(standbys("a, b ,c"), ["a", "b", "c"]);
    assert_eq!(standbys("7"), ["7"], "a numeric name stays a name");
    assert!(
        standbys("").is_empty(),
        "empty means none, not one named \"\""
    );
    assert!(standbys(" , ").is_empty());
    let settings = with_env(&[(
        "BACKFILLD_THROTTLE__REPLICA_URLS",
        "postgres://r1/app,postgres://r2/app",
    )])
    .expect("valid");
    assert_eq!(
        settings.throttle.replica_urls,
        ["postgres://r1/app", "postgres://r2/app"]
    );
    // Other keys are not split on commas.
    let settings = with_env(&[("BACKFILLD_LOG__LEVEL", "info,backfilld=debug")]).unwrap();
    assert_eq!(settings.log.level, "info,backfilld=debug");
}

#[test]
fn nonsense_throttle_values_are_refused() {
    for (key, value, mentions) in [
        (
            "BACKFILLD_THROTTLE__MAX_ROWS_PER_SECOND",
            "0.5",
            "max_rows_per_second",
        ),
        ("BACKFILLD_THROTTLE__MAX_LAG", "0s", "max_lag"),
        ("BACKFILLD_THROTTLE__MAX_LAG_BYTES", "0", "max_lag_bytes"),
        ("BACKFILLD_THROTTLE__PROBE_INTERVAL", "0s", "probe_interval"),
        ("BACKFILLD_BATCH__TARGET", "0s", "batch.target"),
        (
            "BACKFILLD_THROTTLE__MAX_DEAD_TUPLE_RATIO",
            "1.5",
            "throttle.max_dead_tuple_ratio",
        ),
        (
            "BACKFILLD_THROTTLE__MAX_WAL_BYTES_PER_SECOND",
            "-1",
            "max_wal_bytes_per_second",
        ),
        (
            "BACKFILLD_THROTTLE__PROMETHEUS_URL",
            "http://prometheus:9090",
            "throttle.prometheus_url and throttle.prometheus_query go together",
        ),
        (
            "BACKFILLD_THROTTLE__PROMETHEUS_RESUME",
            "1",
            "throttle.prometheus_resume (1) must be a number at or below throttle.prometheus_max (0)",
        ),
    ] {
        let error = with_env(&[(key, value)]).expect_err(key).to_string();
        assert!(error.contains(mentions), "{key}={value}: {error}");
    }
}

#[test]
fn nonsense_combinations_are_refused_naming_the_keys() {
    for (vars, mentions) in [
        (
            &[("BACKFILLD_BATCH__RETRY_BACKOFF", "2m")][..],
            "batch.retry_backoff (2m) must be positive and not above batch.retry_backoff_max (1m)",
        ),
        (
            &[("BACKFILLD_BATCH__RETRY_BACKOFF", "0s")],
            "batch.retry_backoff (0s)",
        ),
        (
            &[("BACKFILLD_BATCH__TARGET", "30s")],
            "batch.target (30s) must be shorter than batch.statement_timeout (30s)",
        ),
        (
            &[("BACKFILLD_DATABASE__CONNECT_TIMEOUT", "0s")],
            "database.connect_timeout must be positive",
        ),
        (
            &[("BACKFILLD_WORKER__MAX_VERIFY_SWEEPS", "-2")],
            "worker.max_verify_sweeps must be 0 or more, got -2",
        ),
        (
            &[
                ("BACKFILLD_BATCH__MIN_SIZE", "50"),
                ("BACKFILLD_BATCH__MAX_SIZE", "20"),
            ],
            "batch.min_size (50) must be positive and not above batch.max_size (20)",
        ),
        (
            &[("BACKFILLD_THROTTLE__MAX_ROWS_PER_SECOND", "NaN")],
            "throttle.max_rows_per_second must be 0 (no limit) or positive, got NaN",
        ),
        (
            &[("BACKFILLD_THROTTLE__MAX_ROWS_PER_SECOND", "-Infinity")],
            "throttle.max_rows_per_second must be 0 (no limit) or positive, got -inf",
        ),
        (
            &[("BACKFILLD_THROTTLE__IMPACT_BUDGET_RATIO", "0.9")],
            "throttle.impact_budget_ratio must be 0 (off) or a number above 1",
        ),
        (
            &[("BACKFILLD_THROTTLE__IMPACT_EXCESS_SHARE", "0.02")],
            "throttle.impact_excess_share must be 0 (off) or a share under 0.01",
        ),
        (
            &[("BACKFILLD_THROTTLE__IMPACT_EXCESS_SHARE", "-0.001")],
            "throttle.impact_excess_share must be 0 (off) or a share under 0.01",
        ),
        (
            &[("BACKFILLD_THROTTLE__IMPACT_WAL_RISE", "0.9")],
            "throttle.impact_wal_rise must be 0 (off) or a ratio above 1 and at most 2",
        ),
        (
            &[("BACKFILLD_THROTTLE__IMPACT_WAL_RISE", "NaN")],
            "throttle.impact_wal_rise must be 0 (off) or a ratio above 1 and at most 2",
        ),
        (
            &[("BACKFILLD_THROTTLE__RATE_WINDOW", "5ms")],
            "throttle.rate_window must be between 10ms and 10s (each batch carries this much of a rate budget), got 5ms",
        ),
        (
            &[("BACKFILLD_THROTTLE__RATE_WINDOW", "1m")],
            "throttle.rate_window must be between 10ms and 10s (each batch carries this much of a rate budget), got 1m",
        ),
        (
            &[("BACKFILLD_THROTTLE__IMPACT_RELEARN_EVERY", "1s")],
            "throttle.impact_relearn_every must be at least 5s",
        ),
        (
            &[("BACKFILLD_THROTTLE__IMPACT_SLI_QUERY", "max(app_p99)")],
            "throttle.impact_sli_query is read from throttle.prometheus_url, which is empty",
        ),
        (
            &[
                ("BACKFILLD_THROTTLE__IMPACT_SLI_QUERY", "max(app_p99)"),
                ("BACKFILLD_THROTTLE__PROMETHEUS_URL", "http://prometheus:9090"),
                ("BACKFILLD_THROTTLE__IMPACT_BUDGET_RATIO", "0"),
            ],
            "throttle.impact_sli_query bounds the impact budget, which is off",
        ),
        (
            &[
                ("BACKFILLD_THROTTLE__IMPACT_SLI_QUERY", "max(app_p99)"),
                ("BACKFILLD_THROTTLE__PROMETHEUS_URL", "prometheus:9090"),
            ],
            "throttle.prometheus_url: \"prometheus:9090\"",
        ),
        (
            &[("BACKFILLD_THROTTLE__IMPACT_SLI_WINDOW", "1s")],
            "throttle.impact_sli_window must be between 2s and 2m (the query's range plus the scrape interval; a long rest lasts it and 2s more), got 1s",
        ),
        (
            &[("BACKFILLD_THROTTLE__BUSY_DUTY_CYCLE", "nan")],
            "busy_duty_cycle must be in (0, 1], got NaN",
        ),
        (
            &[("BACKFILLD_THROTTLE__QUERY_RESUME", "5")],
            "throttle.query_resume (5) must be a number at or below throttle.query_max (0)",
        ),
    ] {
        let error = with_env(vars).expect_err(mentions).to_string();
        assert!(error.contains(mentions), "{vars:?}: {error}");
    }
}

#[test]
fn log_filters_must_name_levels() {
    for good in [
        "info",
        "WARN",
        "info,backfilld=debug",
        "backfilld::batch=debug, info",
        "sqlx=off",
        "backfilld[job{job=x}]=debug",
    ] {
        check_log_filter("log.level", good).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    for (bad, directive) in [
        ("verbose!!", "verbose!!"),
        ("backfilld", "backfilld"),
        ("info,backfilld=loud", "backfilld=loud"),
        ("=debug", "=debug"),
        ("bad target=info", "bad target=info"),
    ] {
        let error = check_log_filter("log.level", bad).unwrap_err().to_string();
        assert_eq!(
            error,
            format!("configuration error: log.level {bad:?}: {directive:?} is not a level (trace, debug, info, warn, error, off) nor target=level")
        );
    }
    let error = with_env(&[("BACKFILLD_LOG__LEVEL", "verbose!!")]).unwrap_err();
    assert!(error.to_string().contains("log.level"), "{error}");
}

#[test]
fn passwords_typed_into_any_key_are_not_repeated() {
    for (name, value, shown) in [
        (
            "BACKFILLD_WORKER__LEASE",
            "postgres://u:s3cret@h/db",
            "\"postgres://u:***@h/db\"",
        ),
        (
            "BACKFILLD_HTTP__LISTEN",
            "postgres://h/db?password=s3cret",
            "\"postgres://h/db?password=***\"",
        ),
        (
            "BACKFILLD_LOG__LEVEL",
            "user=u password=s3cret",
            "password=***",
        ),
    ] {
        let error = with_env(&[(name, value)]).unwrap_err().to_string();
        assert!(error.contains(shown), "{name}: {error}");
        assert!(!error.contains("s3cret"), "{name}: {error}");
    }
}

#[test]
fn stray_variables_are_ignored_but_unknown_keys_refused() {
    let settings = with_env(&[
        ("BACKFILLD_BIN", "/usr/local/bin/backfilld"),
        ("BACKFILLD_FOO", "1"),
        ("BACKFILLD_WORKER__ID", "w1"),
        ("HOME", "/root"),
    ])
    .expect("stray variables are not configuration");
    assert_eq!(
        settings.ignored_variables,
        ["BACKFILLD_BIN", "BACKFILLD_FOO"]
    );
    assert_eq!(settings.worker.id, "w1");
    let error = with_env(&[("BACKFILLD_WORKER__IDD", "w1")])
        .unwrap_err()
        .to_string();
    assert!(error.contains("unknown field `idd`"), "{error}");
}

#[test]
fn database_url_is_honoured() {
    let settings = with_env(&[("DATABASE_URL", "postgres://elsewhere/app")]).unwrap();
    assert_eq!(settings.database.url, "postgres://elsewhere/app");
}

#[test]
fn the_impact_sli_needs_only_the_prometheus_url_and_sets_its_window() {
    let defaults = Settings::load(None).expect("defaults");
    let window = |settings: &Settings| {
        settings
            .throttle
            .impact_settings()
            .expect("the impact budget is on")
            .sli_window
    };
    assert_eq!(window(&defaults), Duration::ZERO, "not read by default");
    let reading = with_env(&[
        (
            "BACKFILLD_THROTTLE__PROMETHEUS_URL",
            "http://prometheus:9090",
        ),
        ("BACKFILLD_THROTTLE__IMPACT_SLI_QUERY", "max(app_p99)"),
        ("BACKFILLD_THROTTLE__IMPACT_SLI_WINDOW", "20s"),
    ])
    .expect("the SLI alone on the URL");
    assert_eq!(window(&reading), Duration::from_secs(20));
    assert_eq!(
        reading.throttle.impact_sli(),
        Some(("http://prometheus:9090", "max(app_p99)"))
    );
}
