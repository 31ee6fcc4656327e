//! Operations end to end: the daemon exports every metric DESIGN.md names and every name
//! the dashboard and alerts use, with sane values; finished jobs' series expire; JSON logs
//! carry the job's span; `plan` changes nothing; `status --watch` follows a job to its end;
//! the README's configuration reference matches config/default.toml.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use backfilld_e2e::{
    backfilld_at, backfilld_bin, env_refs, quick_worker, wait_until, Daemon, TestDb,
};
use pg_testkit::demo_data::{users_table_sql, SPLIT_NAME_JOB_SQL};
use pg_testkit::PgCluster;
use serde_json::Value;

const JOB: &str = "split_full_name";
const RUN_LIMIT: Duration = Duration::from_secs(60);

/// The metrics DESIGN.md promises ("Metrics (Prometheus, base units)").
const DESIGN_METRICS: &[&str] = &[
    "backfill_rows_processed_total",
    "backfill_batches_total",
    "backfill_batch_duration_seconds",
    "backfill_batch_size",
    "backfill_failed_rows_total",
    "backfill_throttle_sleep_seconds_total",
    "backfill_throttled",
    "backfill_replication_lag_seconds",
    "backfill_replication_lag_bytes",
    "backfill_lock_waits",
    "backfill_job_rows_remaining",
    "backfill_job_progress_ratio",
    "backfill_job_eta_seconds",
    "backfill_jobs",
    "backfill_build_info",
];

/// Throttle reasons exported per job: the code's own list, so a new reason is checked here
/// (and in the dashboard and runbook tests) the day it is added.
fn throttle_reasons() -> Vec<&'static str> {
    backfill_core::throttle::ThrottleReason::ALL
        .iter()
        .map(|reason| reason.as_str())
        .collect()
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

// ------------------------------------------------------------------ scraping

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed `/metrics` page.
#[derive(Debug)]
struct Scrape {
    samples: Vec<Sample>,
    /// Names with a `# HELP` line.
    described: BTreeSet<String>,
    text: String,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        let mut described = BTreeSet::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                described.insert(rest.split(' ').next().unwrap_or_default().to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample line has a value");
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
        Scrape {
            samples,
            described,
            text: text.to_string(),
        }
    }

    fn names(&self) -> BTreeSet<String> {
        self.samples.iter().map(|s| s.name.clone()).collect()
    }

    /// Samples of `name` whose labels include all of `labels`.
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The value of the one sample of `name` with `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.find(name, labels).as_slice() {
            [sample] => sample.value,
            other => panic!(
                "expected one sample of {name} with {labels:?}, found {}:\n{}",
                other.len(),
                self.text
            ),
        }
    }

    fn has_series_of_job(&self, job: &str) -> bool {
        self.samples
            .iter()
            .any(|s| s.labels.get("backfill_job").map(String::as_str) == Some(job))
    }
}

/// `promtool check metrics` (Prometheus' own linter) on a scraped page; promtool comes with
/// Debian's `prometheus` package (scripts/test installs it).
fn promtool_check_metrics(page: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: apt-get install prometheus (scripts/test does)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(page.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => value.extend(chars.next().map(|(_, c)| c)),
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_string(), value);
        rest = &after[end..];
    }
    labels
}

/// GET `path` from the daemon's HTTP server: status code and body.
fn http_get(address: SocketAddr, path: &str) -> (u16, String) {
    let mut stream =
        TcpStream::connect_timeout(&address, Duration::from_secs(5)).expect("connect to backfilld");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    (status, body.to_string())
}

fn scrape(address: SocketAddr) -> Scrape {
    let (status, body) = http_get(address, "/metrics");
    assert_eq!(status, 200, "/metrics answered {status}: {body}");
    Scrape::parse(&body)
}

// ------------------------------------------------------------------ the daemon

/// Env for a daemon writing JSON logs, serving HTTP on a port of its choosing.
fn ops_env(worker: &str, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut env = quick_worker(worker);
    env.push(("BACKFILLD_LOG__FORMAT", "json".to_string()));
    env.push(("BACKFILLD_HTTP__LISTEN", "127.0.0.1:0".to_string()));
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    env
}

/// The daemon's JSON log lines so far.
fn json_lines(daemon: &Daemon) -> Vec<Value> {
    daemon
        .log_text()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// The address the daemon's HTTP server bound (it logs it once listening).
fn http_address(daemon: &Daemon) -> SocketAddr {
    let mut address = None;
    wait_until("the daemon to serve /metrics", RUN_LIMIT, || {
        address = json_lines(daemon).iter().find_map(|line| {
            (line["message"] == "serving /metrics, /healthz, /readyz")
                .then(|| line["address"].as_str()?.parse().ok())
                .flatten()
        });
        address.is_some()
    });
    address.expect("address")
}

/// `backfilld <args>` against `url` with `env` (and no HTTP server unless `env` says so).
fn backfilld_command(url: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(backfilld_bin());
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", url)
        .env("BACKFILLD_HTTP__LISTEN", "");
    for (key, value) in env {
        command.env(key, value);
    }
    command.args(args);
    command
}

/// Waits for `child` to exit, at most `timeout`; kills it and panics otherwise.
fn wait_for_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("backfilld did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn psql(cluster: &PgCluster, sql: &str) -> String {
    cluster
        .psql("postgres", sql)
        .unwrap_or_else(|e| panic!("SQL failed: {e}\n{sql}"))
}

// ------------------------------------------------------------------ tests

#[test]
fn a_demo_job_exports_every_design_and_deploy_metric_with_sane_values() {
    let rows = 30_000;
    let primary = PgCluster::start_primary().expect("primary");
    let _standby = primary.start_standby("ops_standby").expect("standby");
    let url = primary.url("postgres");
    psql(&primary, &users_table_sql(rows));
    let migrate = backfilld_command(&url, &["migrate"], &[])
        .output()
        .expect("run backfilld migrate");
    assert!(
        migrate.status.success(),
        "migrate failed: {}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    psql(&primary, SPLIT_NAME_JOB_SQL);

    let env = ops_env(
        "ops-metrics",
        &[
            ("BACKFILLD_THROTTLE__EXPECTED_STANDBYS", "ops_standby"),
            // The canary on (so its series are exported too), too lenient to ever pace.
            ("BACKFILLD_THROTTLE__MAX_PROBE_DELAY", "10s"),
            // The impact budget on, as by default, so its series are exported too.
            ("BACKFILLD_THROTTLE__IMPACT_BUDGET_RATIO", "1.3"),
        ],
    );
    let mut daemon = Daemon::start(&url, &[], &env_refs(&env));
    let address = http_address(&daemon);
    assert_eq!(http_get(address, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(http_get(address, "/readyz"), (200, "ready\n".to_string()));

    let state = || {
        psql(
            &primary,
            &format!("SELECT state FROM backfill.jobs WHERE name = '{JOB}'"),
        )
    };
    wait_until("the job to succeed", RUN_LIMIT, || {
        let state = state();
        assert!(state != "failed", "job failed:\n{}", daemon.log_text());
        state == "succeeded"
    });
    // The queue gauges and the standby's lag refresh on their own cadence.
    let mut metrics = scrape(address);
    wait_until("queue and lag gauges to catch up", RUN_LIMIT, || {
        metrics = scrape(address);
        !metrics
            .find("backfill_jobs", &[("state", "succeeded")])
            .is_empty()
            && metrics.value("backfill_jobs", &[("state", "succeeded")]) == 1.0
            && !metrics
                .find(
                    "backfill_replication_lag_seconds",
                    &[("replica", "ops_standby")],
                )
                .is_empty()
    });

    // Every name DESIGN.md promises, described, histograms by their three series.
    let names = metrics.names();
    for name in DESIGN_METRICS {
        let series: Vec<String> = if name.ends_with("_duration_seconds") {
            ["_bucket", "_sum", "_count"]
                .iter()
                .map(|suffix| format!("{name}{suffix}"))
                .collect()
        } else {
            vec![name.to_string()]
        };
        for series in series {
            assert!(
                names.contains(&series),
                "{series} is not exported:\n{}",
                metrics.text
            );
        }
        assert!(metrics.described.contains(*name), "{name} has no HELP text");
    }
    // deploy/metric-names.txt (which the dashboard and alerts are checked against) is
    // exactly what the daemon exports: neither can drift from the other.
    let listed: BTreeSet<String> = std::fs::read_to_string(repo_file("deploy/metric-names.txt"))
        .expect("deploy/metric-names.txt")
        .lines()
        .map(str::to_string)
        .collect();
    let exported: BTreeSet<String> = names
        .iter()
        .filter(|n| n.starts_with("backfill_"))
        .cloned()
        .collect();
    // backfill_job_failed exists only while a job is failed, which this one is not; the
    // deadline series only for a job with a finish_by or a forecast, the webhook's only
    // with events.webhook_url set (tests/tests/steering.rs scrapes those).
    let only_sometimes: BTreeSet<String> = [
        "backfill_job_failed",
        "backfill_job_deadline_margin_seconds",
        "backfill_job_forecast_seconds",
        "backfill_job_late",
        "backfill_webhook_events_total",
    ]
    .map(str::to_string)
    .into();
    assert_eq!(
        exported,
        &listed - &only_sometimes,
        "the daemon's backfill_* series differ from deploy/metric-names.txt"
    );
    // No target label (job, instance, namespace, pod) is ours: the series are the same under
    // honor_labels true or false.
    for sample in &metrics.samples {
        for target_label in [
            "job",
            "instance",
            "namespace",
            "pod",
            "container",
            "endpoint",
        ] {
            assert!(
                !sample.labels.contains_key(target_label),
                "{} carries the target label {target_label}",
                sample.name
            );
        }
    }
    // The standard process metrics, and a page promtool accepts (counters typed as such).
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(names.contains(name), "{name} is not exported");
    }
    assert!(
        metrics
            .text
            .contains("# TYPE backfill_throttle_sleep_seconds_total counter\n"),
        "{}",
        metrics.text
    );
    promtool_check_metrics(&metrics.text);

    // Sane values.
    let excess = metrics.value("backfill_probe_delay_seconds", &[]);
    assert!((0.0..10.0).contains(&excess), "canary excess {excess} s");
    assert_eq!(metrics.value("backfill_probe_delays_total", &[]), 0.0);
    let job = [("backfill_job", JOB)];
    let db_int = |sql: &str| -> f64 { psql(&primary, sql).parse().expect("number") };
    let rows_done = db_int("SELECT rows_done FROM backfill.jobs");
    assert_eq!(rows_done, rows as f64);
    assert_eq!(
        metrics.value("backfill_rows_processed_total", &job),
        rows_done
    );
    assert_eq!(metrics.value("backfill_job_progress_ratio", &job), 1.0);
    assert_eq!(metrics.value("backfill_job_rows_remaining", &job), 0.0);
    assert_eq!(metrics.value("backfill_job_eta_seconds", &job), 0.0);
    assert_eq!(metrics.value("backfill_failed_rows_total", &job), 0.0);
    let batches = db_int("SELECT batches_done FROM backfill.jobs");
    let committed = [("backfill_job", JOB), ("outcome", "committed")];
    assert_eq!(metrics.value("backfill_batches_total", &committed), batches);
    assert_eq!(
        metrics.value("backfill_batch_duration_seconds_count", &job),
        batches
    );
    assert!(metrics.value("backfill_batch_duration_seconds_sum", &job) > 0.0);
    let infinite_bucket = [("backfill_job", JOB), ("le", "+Inf")];
    assert_eq!(
        metrics.value("backfill_batch_duration_seconds_bucket", &infinite_bucket),
        batches
    );
    let batch_size = metrics.value("backfill_batch_size", &job);
    assert!(
        (10.0..=10_000.0).contains(&batch_size),
        "batch size {batch_size}"
    );
    for reason in throttle_reasons() {
        let labels = [("backfill_job", JOB), ("reason", reason)];
        assert_eq!(
            metrics.value("backfill_throttled", &labels),
            0.0,
            "the job has ended: no reason is active"
        );
        assert!(metrics.value("backfill_throttle_sleep_seconds_total", &labels) >= 0.0);
    }
    assert_eq!(metrics.value("backfill_lock_waits", &job), 0.0);
    let lag = metrics.value(
        "backfill_replication_lag_seconds",
        &[("replica", "ops_standby")],
    );
    assert!(lag.is_finite() && lag >= 0.0, "lag {lag}");
    assert!(
        metrics.value(
            "backfill_replication_lag_bytes",
            &[("replica", "ops_standby")]
        ) >= 0.0
    );
    for state in ["pending", "running", "paused", "failed", "cancelled"] {
        assert_eq!(
            metrics.value("backfill_jobs", &[("state", state)]),
            0.0,
            "{state}"
        );
    }
    let version = [("version", env!("CARGO_PKG_VERSION"))];
    assert_eq!(metrics.value("backfill_build_info", &version), 1.0);
    assert_eq!(metrics.value("backfill_throttle_max_lag_seconds", &[]), 2.0);
    assert_eq!(
        metrics.value("backfill_throttle_max_lag_bytes", &[]),
        67_108_864.0
    );

    daemon.signal(libc::SIGTERM);
    daemon.expect_success(Duration::from_secs(15));

    // JSON logs: every line about the job carries its span (name and id).
    let lines = json_lines(&daemon);
    for message in [
        "claimed job",
        "sized the job",
        "verification pass",
        "job finished",
    ] {
        let line = lines
            .iter()
            .find(|line| line["message"] == message)
            .unwrap_or_else(|| panic!("no {message:?} line in:\n{}", daemon.log_text()));
        assert_eq!(line["span"]["job"], JOB, "{line}");
        assert!(line["span"]["job_id"].is_i64(), "{line}");
    }
    let throttle_lines: Vec<&Value> = lines
        .iter()
        .filter(|line| {
            line["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("throttle: "))
        })
        .collect();
    assert!(
        !throttle_lines.is_empty(),
        "no throttle decision was logged"
    );
    assert!(throttle_lines.iter().all(|line| line["span"]["job"] == JOB));
    let finished = lines
        .iter()
        .find(|line| line["message"] == "job finished")
        .expect("job finished line");
    assert_eq!(finished["state"], "succeeded");
}

#[test]
fn a_finished_jobs_series_expire_but_the_daemons_stay() {
    // The idle timeout must outlast the longest batch.
    let refused = backfilld_command(
        "postgres://nobody@127.0.0.1:1/none",
        &["run", "--exit-when-idle"],
        &[("BACKFILLD_HTTP__METRICS_IDLE_TIMEOUT", "10s")],
    )
    .output()
    .expect("run backfilld");
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("http.metrics_idle_timeout") && stderr.contains("batch.statement_timeout"),
        "{stderr}"
    );

    let db = TestDb::new("ops_expiry");
    db.sql(&users_table_sql(2_000));
    db.migrate();
    db.sql(SPLIT_NAME_JOB_SQL);
    let env = ops_env(
        "ops-expiry",
        &[
            ("BACKFILLD_HTTP__METRICS_IDLE_TIMEOUT", "5s"),
            ("BACKFILLD_BATCH__STATEMENT_TIMEOUT", "4s"),
        ],
    );
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    let address = http_address(&daemon);
    wait_until("the job to succeed", RUN_LIMIT, || {
        db.job_state(JOB) == "succeeded"
    });
    // Set once when the job ended, never again: exported until the idle timeout.
    let metrics = scrape(address);
    assert_eq!(
        metrics.value("backfill_job_progress_ratio", &[("backfill_job", JOB)]),
        1.0
    );
    let ended = Instant::now();
    let gone_after = wait_until("the finished job's series to expire", RUN_LIMIT, || {
        !scrape(address).has_series_of_job(JOB)
    });
    eprintln!("the finished job's series left /metrics {gone_after:?} after its end");
    assert!(
        ended.elapsed() >= Duration::from_secs(4),
        "series expired before the idle timeout"
    );
    // The daemon's own series are refreshed and stay.
    let metrics = scrape(address);
    let version = [("version", env!("CARGO_PKG_VERSION"))];
    assert_eq!(metrics.value("backfill_build_info", &version), 1.0);
    assert_eq!(metrics.value("backfill_throttle_max_lag_seconds", &[]), 2.0);
    assert_eq!(
        metrics.value("backfill_jobs", &[("state", "succeeded")]),
        1.0
    );
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(Duration::from_secs(15));
}

#[test]
fn a_held_jobs_series_stay_while_it_is_held() {
    let db = TestDb::new("ops_held");
    db.sql(&users_table_sql(1_000));
    db.migrate();
    db.sql(SPLIT_NAME_JOB_SQL);
    // A declared standby that does not exist holds every job for good (fail safe).
    let env = ops_env(
        "ops-held",
        &[
            ("BACKFILLD_THROTTLE__EXPECTED_STANDBYS", "ghost_standby"),
            ("BACKFILLD_HTTP__METRICS_IDLE_TIMEOUT", "5s"),
            ("BACKFILLD_BATCH__STATEMENT_TIMEOUT", "4s"),
        ],
    );
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    let address = http_address(&daemon);
    let held = [("backfill_job", JOB), ("reason", "standby_missing")];
    wait_until("the job to be held", RUN_LIMIT, || {
        let metrics = scrape(address);
        !metrics.find("backfill_throttled", &held).is_empty()
            && metrics.value("backfill_throttled", &held) == 1.0
    });
    let first = scrape(address);
    // Twice the idle timeout without a batch: nothing the job exports may expire.
    let quiet_until = Instant::now() + Duration::from_secs(10);
    wait_until("two idle timeouts to pass", RUN_LIMIT, || {
        let metrics = scrape(address);
        for sample in first
            .samples
            .iter()
            .filter(|s| s.labels.contains_key("backfill_job"))
        {
            let labels: Vec<(&str, &str)> = sample
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert!(
                !metrics.find(&sample.name, &labels).is_empty(),
                "{} {labels:?} expired while the job was held",
                sample.name
            );
        }
        Instant::now() >= quiet_until
    });
    let metrics = scrape(address);
    assert_eq!(metrics.value("backfill_throttled", &held), 1.0);
    assert_eq!(
        metrics.value("backfill_rows_processed_total", &[("backfill_job", JOB)]),
        0.0
    );
    assert_eq!(
        metrics.value("backfill_job_rows_remaining", &[("backfill_job", JOB)]),
        1_000.0
    );
    assert_eq!(db.job_state(JOB), "running");
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(Duration::from_secs(15));
}

#[test]
fn plan_on_a_million_rows_estimates_and_changes_nothing() {
    let rows: i64 = 1_000_000;
    let db = TestDb::new("ops_plan");
    db.sql(&users_table_sql(rows));
    db.migrate();
    db.sql(SPLIT_NAME_JOB_SQL);
    let table_hash = || {
        db.sql(
            "SELECT md5(string_agg(concat_ws('|', id, full_name, first_name, last_name), E'\\n' ORDER BY id)) FROM users",
        )
    };
    let job_row = || db.sql("SELECT md5(j::text) FROM backfill.jobs j");
    let (table_before, job_before) = (table_hash(), job_row());

    let started = Instant::now();
    let text = db.backfilld(&["plan", JOB]);
    let text_took = started.elapsed();
    assert!(text.status.success(), "plan failed: {}", text.stderr);
    eprintln!(
        "backfilld plan {JOB} on {rows} rows took {text_took:?}:\n{}",
        text.stdout
    );
    for part in [
        "pending rows",
        "batches",
        "trial batch",
        "expected",
        "nothing was changed",
    ] {
        assert!(
            text.stdout.contains(part),
            "no {part:?} in:\n{}",
            text.stdout
        );
    }

    let started = Instant::now();
    let json = db.backfilld(&["plan", JOB, "--exact", "--json"]);
    let json_took = started.elapsed();
    assert!(
        json.status.success(),
        "plan --exact failed: {}",
        json.stderr
    );
    eprintln!("backfilld plan {JOB} --exact --json took {json_took:?}");
    let report: Value = serde_json::from_str(&json.stdout).expect("plan --json is JSON");
    assert_eq!(report["exact_pending_rows"], rows);
    let estimate = report["estimated_pending_rows"].as_i64().expect("estimate");
    assert!(
        (rows * 9 / 10..=rows * 11 / 10).contains(&estimate),
        "planner estimate {estimate} for {rows} pending rows"
    );
    assert_eq!(report["batch_size"], 1000);
    assert_eq!(report["batches"], rows / 1000);
    // The trial batch really ran the statement on the first 1000 keys...
    assert_eq!(report["trial_keys"], 1000);
    assert_eq!(report["trial_first_key"], "1");
    assert_eq!(report["trial_last_key"], "1000");
    assert_eq!(report["trial_rows_written"], 1000);
    assert!(report["trial_error"].is_null());
    assert!(
        report["expected_seconds"]
            .as_f64()
            .expect("expected_seconds")
            > 0.0
    );
    // Next to production, plan also says the least the job takes. By default (the suite
    // turns only the duty cycle off) the impact budget shares the primary: at best the
    // trial's speed after a first rest to learn production's baseline (5.3 s), a climb
    // from START_RATE (doubling each time the canaries show calm: 194 of them at 50 ms,
    // 9.7 s) and a rest every 30 s.
    assert_eq!(report["next_to_production_by"], "impact_budget");
    let expected = report["expected_seconds"]
        .as_f64()
        .expect("expected_seconds");
    let at_best = report["min_seconds_next_to_production"]
        .as_f64()
        .expect("min_seconds_next_to_production");
    let doublings = (rows as f64 / expected / backfill_core::impact::START_RATE)
        .log2()
        .ceil()
        .max(0.0);
    assert!(
        at_best >= expected + 5.3 && at_best <= expected * 32.3 / 30.0 + 5.3 + 9.7 * doublings,
        "{at_best} s next to production for {expected} s alone"
    );
    let impact_text = backfilld_at(&db.url(), &["plan", JOB], &[]);
    assert!(
        impact_text.stdout.contains("by the impact budget"),
        "{}",
        impact_text.stdout
    );
    // Without the impact budget, the duty cycle: the expected time over it.
    let duty_cycle = [
        ("BACKFILLD_THROTTLE__IMPACT_BUDGET_RATIO", "0"),
        ("BACKFILLD_THROTTLE__BUSY_DUTY_CYCLE", "0.05"),
    ];
    let shared = backfilld_at(&db.url(), &["plan", JOB, "--json"], &duty_cycle);
    assert!(shared.status.success(), "plan failed: {}", shared.stderr);
    let shared: Value = serde_json::from_str(&shared.stdout).expect("plan --json is JSON");
    assert_eq!(shared["next_to_production_by"], "duty_cycle");
    let expected = shared["expected_seconds"]
        .as_f64()
        .expect("expected_seconds");
    let at_least = shared["min_seconds_next_to_production"]
        .as_f64()
        .expect("min_seconds_next_to_production");
    assert!(
        (at_least - expected / 0.05).abs() <= 1e-9 * at_least,
        "{at_least} s next to production for {expected} s alone"
    );
    let shared_text = backfilld_at(&db.url(), &["plan", JOB], &duty_cycle);
    assert!(
        shared_text
            .stdout
            .contains("next to production  at least ~"),
        "{}",
        shared_text.stdout
    );
    // Sharing off: nothing to say.
    let unshared = backfilld_at(
        &db.url(),
        &["plan", JOB, "--json"],
        &[("BACKFILLD_THROTTLE__IMPACT_BUDGET_RATIO", "0")],
    );
    let unshared: Value = serde_json::from_str(&unshared.stdout).expect("plan --json is JSON");
    assert!(unshared["min_seconds_next_to_production"].is_null());
    assert!(unshared["next_to_production_by"].is_null());

    // ...and rolled it back: the table and the job are exactly as before.
    assert_eq!(table_hash(), table_before, "plan changed the table");
    assert_eq!(job_row(), job_before, "plan changed the job");
    assert_eq!(db.int("SELECT count(*) FROM backfill.failed_rows"), 0);

    let missing = db.backfilld(&["plan", "no_such_job"]);
    assert_eq!(missing.status.code(), Some(2), "{}", missing.stderr);
    assert!(missing
        .stderr
        .contains("no backfill job named 'no_such_job'"));
}

#[test]
fn plan_reports_a_failing_trial_batch_and_rolls_it_back() {
    let db = TestDb::new("ops_plan_fails");
    db.sql(
        "CREATE TABLE numbers (id int PRIMARY KEY, raw text NOT NULL, n int);
         INSERT INTO numbers SELECT g, CASE WHEN g = 7 THEN 'seven' ELSE g::text END FROM generate_series(1, 50) g;",
    );
    db.migrate();
    db.sql(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate)
         VALUES ('parse_numbers', 'numbers', 'id',
                 $$UPDATE numbers SET n = raw::int WHERE id = ANY(:keys)$$, 'n IS NULL')",
    );
    let out = db.backfilld(&["plan", "parse_numbers"]);
    eprintln!("{}{}", out.stdout, out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("trial batch    FAILED (rolled back)")
            && out.stdout.contains("invalid input syntax for type integer")
            && out
                .stdout
                .contains("sets those aside in backfill.failed_rows"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr
            .contains("the trial batch of job parse_numbers failed"),
        "{}",
        out.stderr
    );
    assert_eq!(
        db.int("SELECT count(*) FROM numbers WHERE n IS NOT NULL"),
        0
    );
    assert_eq!(db.int("SELECT count(*) FROM backfill.failed_rows"), 0);
}

#[test]
fn status_watch_follows_a_job_until_it_ends() {
    let db = TestDb::new("ops_watch");
    db.sql(&users_table_sql(3_000));
    db.migrate();
    db.sql(SPLIT_NAME_JOB_SQL);
    db.sql("UPDATE backfill.jobs SET max_rows_per_second = 3000, batch_size = 300");
    let out = tempfile::NamedTempFile::new().expect("temp file");
    let mut watch = backfilld_command(
        &db.url(),
        &["status", JOB, "--watch", "--interval", "100ms"],
        &[],
    )
    .stdout(Stdio::from(out.reopen().expect("reopen temp file")))
    .spawn()
    .expect("spawn backfilld status --watch");
    let output = || std::fs::read_to_string(out.path()).unwrap_or_default();
    // The first frame shows the job before any worker runs it.
    wait_until("the first frame", RUN_LIMIT, || {
        if let Some(status) = watch.try_wait().expect("try_wait") {
            panic!("status --watch exited early with {status}:\n{}", output());
        }
        output().contains("pending")
    });
    let env = quick_worker("ops-watch");
    let mut daemon = Daemon::start(&db.url(), &["--exit-when-idle"], &env_refs(&env));
    let status = wait_for_exit(&mut watch, RUN_LIMIT);
    assert!(status.success(), "status --watch exited with {status}");
    daemon.expect_success(RUN_LIMIT);

    let text = output();
    let frames: Vec<&str> = text
        .split("backfilld status at ")
        .filter(|frame| !frame.is_empty())
        .collect();
    assert!(frames.len() >= 2, "one frame only:\n{text}");
    assert!(frames[0].contains(" pending "), "{}", frames[0]);
    let last = frames[frames.len() - 1];
    assert!(
        last.contains(" succeeded ") && last.contains("100.0%"),
        "the last frame does not show the job done:\n{last}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "no terminal escapes when not on a terminal"
    );
}

// ------------------------------------------------------------------ docs

/// One key of config/default.toml: `section.key`, its default as written, its comment.
struct ConfigKey {
    key: String,
    default: String,
    doc: String,
}

fn default_config_keys() -> Vec<ConfigKey> {
    let text = std::fs::read_to_string(repo_file("config/default.toml")).expect("default.toml");
    let mut keys = Vec::new();
    let mut section = String::new();
    let mut comment: Vec<&str> = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            comment.clear();
        } else if let Some(doc) = line.strip_prefix('#') {
            comment.push(doc.trim());
        } else if let Some((key, value)) = line.split_once('=') {
            // A key right under another one shares its comment (retry_backoff_max).
            let doc = match keys.last() {
                Some(ConfigKey { key, .. })
                    if comment.is_empty() && key.starts_with(&format!("{section}.")) =>
                {
                    format!("See `{key}`.")
                }
                _ => comment.join(" "),
            };
            keys.push(ConfigKey {
                key: format!("{section}.{}", key.trim()),
                default: value.trim().to_string(),
                doc,
            });
            comment.clear();
        } else {
            comment.clear();
        }
    }
    keys
}

/// The README's configuration reference table, generated from config/default.toml.
fn config_reference_table() -> String {
    let mut table = "| key | default | what it does |\n|---|---|---|\n".to_string();
    for ConfigKey { key, default, doc } in default_config_keys() {
        // Markdown: `|` would end the cell, `<…>` would be taken for HTML.
        let escape = |text: &str| {
            text.replace('|', "\\|")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        };
        let (default, doc) = (default.replace('|', "\\|"), escape(&doc));
        table.push_str(&format!("| `{key}` | `{default}` | {doc} |\n"));
    }
    table
}

#[test]
fn the_readme_config_reference_is_config_default_toml() {
    let readme = std::fs::read_to_string(repo_file("README.md")).expect("README.md");
    let (begin, end) = (
        "<!-- config-reference:begin: generated from config/default.toml, do not edit; regenerate with UPDATE_README=1 cargo test -p backfilld-e2e --test ops the_readme -->\n",
        "<!-- config-reference:end -->",
    );
    let table = readme
        .split_once(begin)
        .and_then(|(_, rest)| rest.split_once(end))
        .map(|(table, _)| table)
        .unwrap_or_else(|| panic!("README.md has no {begin:?} … {end:?} section"));
    let expected = config_reference_table();
    if table != expected && std::env::var_os("UPDATE_README").is_some() {
        let updated = readme.replacen(table, &expected, 1);
        std::fs::write(repo_file("README.md"), updated).expect("write README.md");
        return;
    }
    assert!(
        table == expected,
        "README.md's configuration reference is out of date: run this test with UPDATE_README=1, \
         or replace the table with:\n\n{expected}"
    );
    assert!(
        default_config_keys().len() > 30,
        "default.toml was not parsed"
    );
}

/// The reasons BackfillThrottledTooLong leaves out, from its `reason!~"…"` matcher
/// (alternatives are names, or `.*word.*` for names containing a word).
fn reasons_the_throttled_alert_ignores() -> BTreeSet<&'static str> {
    let alerts =
        std::fs::read_to_string(repo_file("deploy/prometheus/alerts.yaml")).expect("alerts.yaml");
    let rule = alerts
        .split("- alert: BackfillThrottledTooLong")
        .nth(1)
        .and_then(|rest| rest.split("- alert:").next())
        .expect("the BackfillThrottledTooLong rule");
    let matchers: BTreeSet<&str> = rule
        .split("reason!~\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert_eq!(
        matchers.len(),
        1,
        "one reason matcher, the same in both halves: {matchers:?}"
    );
    let pattern = matchers.into_iter().next().expect("a matcher");
    throttle_reasons()
        .into_iter()
        .filter(|reason| {
            pattern.split('|').any(|alternative| {
                match alternative
                    .strip_prefix(".*")
                    .and_then(|a| a.strip_suffix(".*"))
                {
                    Some(word) => reason.contains(word),
                    None => alternative == *reason,
                }
            })
        })
        .collect()
}

#[test]
fn every_throttle_reason_has_a_runbook_entry_a_dashboard_series_and_its_alerting_rule() {
    let runbook = std::fs::read_to_string(repo_file("deploy/RUNBOOK.md")).expect("RUNBOOK.md");
    let section = runbook
        .split("## BackfillThrottledTooLong")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("the runbook's BackfillThrottledTooLong section");
    for reason in throttle_reasons() {
        assert!(
            section.contains(&format!("`{reason}`")),
            "deploy/RUNBOOK.md's BackfillThrottledTooLong section says nothing about `{reason}`"
        );
    }
    // The dashboard shows every reason there is: its throttle queries group by reason and
    // never pick reasons from a list that a new one would be missing from.
    let dashboard =
        std::fs::read_to_string(repo_file("deploy/grafana/backfilld.json")).expect("dashboard");
    let throttle_queries: Vec<&str> = dashboard
        .lines()
        .filter(|line| line.contains("\"expr\"") && line.contains("backfill_throttle"))
        .collect();
    assert!(throttle_queries
        .iter()
        .any(|q| q.contains("by (namespace, backfill_job, reason)")));
    assert!(throttle_queries
        .iter()
        .any(|q| q.contains("sum by (reason)")));
    for query in &throttle_queries {
        assert!(
            !query.contains("reason="),
            "the dashboard filters reasons: {query}"
        );
        assert!(
            !query.contains("reason!"),
            "the dashboard filters reasons: {query}"
        );
    }
    // The alert counts every reason but the deliberate or steady-state ones.
    // Those are the steady-state reasons (ThrottleReason::is_steady_state, which the
    // "throttled for long" event also leaves alone) and the operator's own holds.
    use backfill_core::throttle::ThrottleReason;
    let mut expected: BTreeSet<&str> = ThrottleReason::ALL
        .into_iter()
        .filter(|reason| reason.is_steady_state())
        .map(ThrottleReason::as_str)
        .collect();
    expected.insert("operator");
    assert_eq!(reasons_the_throttled_alert_ignores(), expected);
}
