//! Every query of deploy/grafana/backfilld.json runs against a real Prometheus scraping a
//! real daemon that works a sliced job and a plain one, under `honor_labels: true` and
//! `false`: none may fail (e.g. HTTP 422 "vector cannot contain metrics with the same
//! labelset"), the sliced-job panels return one series per job, and the per-job panels
//! keep the job's name. Needs the `prometheus` server binary (Debian package
//! `prometheus`; scripts/test installs it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use backfilld_e2e::{
    env_refs, free_port, http_get, quick_worker, wait_until, Daemon, Prometheus, TestDb,
};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(30);
/// The target label every series gets from the scrape config, as in Kubernetes.
const NAMESPACE: &str = "backfill-e2e";
/// The dashboard's `$scrape_job` (the PodMonitor's job label).
const SCRAPE_JOB: &str = "backfilld";

/// A Prometheus scraping 127.0.0.1:`target` every second, as a PodMonitor would (the
/// `namespace` target label), with `honor_labels` as given.
fn scraping(target: u16, honor_labels: bool) -> Prometheus {
    Prometheus::start(
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: {SCRAPE_JOB}\n    honor_labels: {honor_labels}\n\
             \x20   static_configs:\n      - targets: ['127.0.0.1:{target}']\n\
             \x20       labels: {{namespace: {NAMESPACE}}}\n"
        ),
        LIMIT,
    )
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Every panel's title and queries (rows' nested panels included).
fn dashboard_queries() -> Vec<(String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or_default().to_string();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.clone(), expr.to_string()));
                }
            }
            walk(panel["panels"].as_array().map_or(&[], Vec::as_slice), out);
        }
    }
    let text = std::fs::read_to_string(repo_file("deploy/grafana/backfilld.json"))
        .expect("deploy/grafana/backfilld.json");
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut queries = Vec::new();
    walk(
        dashboard["panels"].as_array().expect("panels"),
        &mut queries,
    );
    queries
}

/// `expr` with the dashboard's variables as Grafana substitutes them: `namespace` and
/// `backfill_job` as regexes (All is `.*`, several values `a|b`), a rate interval of a few
/// scrapes, a range covering the test.
fn substitute(expr: &str, namespace: &str, backfill_job: &str) -> String {
    let mut expr = expr.to_string();
    for (name, value) in [
        ("__rate_interval", "30s"),
        ("__range", "5m"),
        ("namespace", namespace),
        ("backfill_job", backfill_job),
        ("scrape_job", SCRAPE_JOB),
    ] {
        expr = expr
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    assert!(
        !expr.contains('$') || expr.contains("\"$1\""),
        "a dashboard variable this test does not know: {expr}"
    );
    expr
}

/// The values of `label` in a result vector.
fn label_values(result: &[Value], label: &str) -> Vec<String> {
    let mut values: Vec<String> = result
        .iter()
        .filter_map(|series| series["metric"][label].as_str().map(str::to_string))
        .collect();
    values.sort();
    values
}

#[test]
fn every_dashboard_query_runs_on_a_real_prometheus_under_both_honor_labels() {
    let db = TestDb::new("dashboard");
    db.migrate();
    // Two jobs that keep running through several scrapes (rate-limited), one in slices.
    db.sql(
        "CREATE TABLE plain_items (k int PRIMARY KEY, v int NOT NULL DEFAULT 0);
         CREATE TABLE sliced_items (k int PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO plain_items (k) SELECT generate_series(1, 20000);
         INSERT INTO sliced_items (k) SELECT generate_series(1, 20000);
         INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate,
                                    batch_size, max_rows_per_second, parallelism)
         VALUES ('plain', 'public.plain_items', 'k',
                 $$UPDATE plain_items SET v = 1 WHERE k = ANY(:keys)$$, 'v = 0', 100, 1000, 1),
                ('sliced', 'public.sliced_items', 'k',
                 $$UPDATE sliced_items SET v = 1 WHERE k = ANY(:keys)$$, 'v = 0', 100, 1000, 2);",
    );
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut env = quick_worker("dashboard");
    env.push(("BACKFILLD_HTTP__LISTEN", listen));
    // Both slices and the plain job at once, in one process.
    env.push(("BACKFILLD_WORKER__CONCURRENCY", "3".to_string()));
    let daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    wait_until("the daemon to serve /metrics", LIMIT, || {
        http_get(port, "/metrics").is_some_and(|(status, _)| status == 200)
    });
    let honoring = scraping(port, true);
    let overriding = scraping(port, false);

    // Both jobs' series (each slice's too) in at least three scrapes of each Prometheus.
    let scraped = "count(count_over_time(backfill_rows_processed_total{backfill_job=~\"plain|sliced#.+\"}[1m]) >= 3) >= 3";
    for prometheus in [&honoring, &overriding] {
        let started = std::time::Instant::now();
        while prometheus.vector(scraped).is_empty() {
            assert_eq!(
                db.int("SELECT count(*) FROM backfill.jobs WHERE state = 'failed'"),
                0,
                "a job failed:\n{}",
                daemon.log_text()
            );
            assert!(
                started.elapsed() < LIMIT,
                "three scrapes of both jobs' series never came: {:?}\n{}",
                prometheus.vector("count_over_time(backfill_rows_processed_total[1m])"),
                prometheus.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    let queries = dashboard_queries();
    assert!(
        queries.len() >= 20,
        "only {} dashboard queries",
        queries.len()
    );
    let mut failures = Vec::new();
    for (setting, prometheus) in [("true", &honoring), ("false", &overriding)] {
        for namespace in [".*", NAMESPACE] {
            for backfill_job in [".*", "sliced", "plain|sliced"] {
                for (title, expr) in &queries {
                    let expr = substitute(expr, namespace, backfill_job);
                    let (status, answer) = prometheus.query(&expr);
                    if status != 200 || answer["status"] != "success" {
                        failures.push(format!(
                            "honor_labels {setting}, panel {title:?}: HTTP {status} {}\n    {expr}",
                            answer["error"]
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "dashboard queries failed:\n{}",
        failures.join("\n")
    );

    for prometheus in [&honoring, &overriding] {
        // The sliced-job panels: one series per job, named without the slice.
        let sliced_panels: Vec<&(String, String)> = queries
            .iter()
            .filter(|(title, _)| title.starts_with("Sliced jobs"))
            .collect();
        assert_eq!(sliced_panels.len(), 2, "the two sliced-job panels");
        for (title, expr) in sliced_panels {
            for backfill_job in [".*", "sliced"] {
                let result = prometheus.vector(&substitute(expr, NAMESPACE, backfill_job));
                let names = label_values(&result, "backfill_job_name");
                let expected: Vec<String> = match backfill_job {
                    ".*" => vec!["plain".into(), "sliced".into()],
                    _ => vec!["sliced".into()],
                };
                assert_eq!(
                    names, expected,
                    "panel {title:?} with $backfill_job={backfill_job}: {result:?}"
                );
            }
        }
        // A per-job panel keeps the job's name (and its slices') whatever honor_labels says.
        let (_, progress) = queries
            .iter()
            .find(|(title, _)| title == "Progress")
            .expect("the Progress panel");
        let result = prometheus.vector(&substitute(progress, NAMESPACE, ".*"));
        let jobs = label_values(&result, "backfill_job");
        for job in ["plain", "sliced#1", "sliced#2"] {
            assert!(
                jobs.iter().any(|j| j == job),
                "Progress lacks {job}: {jobs:?}"
            );
        }
        assert!(
            label_values(&result, "namespace")
                .iter()
                .all(|n| n == NAMESPACE),
            "{result:?}"
        );
    }
}
