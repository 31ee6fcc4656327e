//! The frontier: rows per second against production's p99 latency, for backfilld and the
//! alternatives, next to pgbench at several intensities, over several rounds.
//!
//! The table is `orders`-like (10 columns, a 200-byte payload, a secondary index) and the
//! load is pgbench at a fixed rate (`-R`) reading and updating single random orders. Each
//! competitor runs on a fresh copy of the table for a fixed window after a warm-up, so a
//! round costs the same whatever the competitor's speed: pgbench alone (the baseline of
//! its round), backfilld's default (the impact budget), backfilld's old default (the fixed
//! duty cycle: `impact_budget_ratio = 0`), a naive batch-then-sleep loop at several sleeps,
//! and backfilld at fixed rates with sharing off. Rows per second are counted in the window
//! (rows done at its close minus at its open); the p99 ratio is pgbench's p99 in the window
//! over the same round's p99 alone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;

use crate::daemon::Daemon;
use crate::fixture::Fixture;
use crate::pgbench::{epoch_micros, LatencySummary, Load};
use crate::stats::percentile;

mod step;

use step::{run_step, STEP_TEMPLATE};
pub use step::{step_to_markdown, LoadStep, StepTimeline};

/// The orders table; `label` is what the backfill fills in.
const ORDERS_SQL: &str = "
CREATE TABLE public.orders (
    id bigint PRIMARY KEY,
    customer_id bigint NOT NULL,
    status text NOT NULL,
    amount numeric(12, 2) NOT NULL,
    currency text NOT NULL,
    region text NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    payload text NOT NULL,
    label text
);
INSERT INTO public.orders
SELECT g, g % 50000, (ARRAY['new', 'paid', 'shipped'])[1 + g % 3], (g % 100000) / 7.0, 'EUR',
       (ARRAY['eu', 'us', 'ap'])[1 + g % 3], now() - g * interval '1 second', now(),
       left(repeat(md5(g::text), 7), 200), NULL
  FROM generate_series(1, {rows}) AS g;
CREATE INDEX orders_customer_id ON public.orders (customer_id);
VACUUM (FREEZE, ANALYZE) public.orders;
CREATE EXTENSION pg_prewarm;";

/// Run on each fresh copy before anything else: the copy's pages are in no cache, and
/// pgbench's first random reads from disk raised its p99 to 30–100 ms for tens of seconds
/// (seen on a 2,000,000-row copy), whoever ran next to it.
const PREWARM_SQL: &str = "SELECT pg_prewarm('public.orders'), pg_prewarm('public.orders_pkey'), \
                           pg_prewarm('public.orders_customer_id')";

/// The backfill, as the README teaches it: a key range that says itself which rows still
/// need work.
const ORDERS_JOB_SQL: &str = "
INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate)
VALUES ('label_orders', 'public.orders', 'id',
        $$UPDATE public.orders SET label = status || '/' || region || '/' || currency
           WHERE id BETWEEN :first_key AND :last_key AND label IS NULL$$,
        'label IS NULL')";

/// The naive loop's statement: the next `$2` ids above `$1`.
const NAIVE_SQL: &str =
    "UPDATE public.orders SET label = status || '/' || region || '/' || currency \
     WHERE id > $1 AND id <= $1 + $2 AND label IS NULL";

/// Production: read an order, touch it.
const ORDERS_SCRIPT: &str = "\
\\set id random(1, :orders_rows)
BEGIN;
SELECT status, amount, payload FROM public.orders WHERE id = :id;
UPDATE public.orders SET updated_at = now() WHERE id = :id;
END;
";

/// Keys per statement of the naive loop.
const NAIVE_BATCH: i64 = 1_000;

/// What competes for the primary next to pgbench.
#[derive(Debug, Clone, PartialEq)]
pub enum Competitor {
    Alone,
    /// backfilld with `config/default.toml` plus these settings.
    Backfilld(String, Vec<(String, String)>),
    /// UPDATE [`NAIVE_BATCH`] keys, commit, sleep this long, repeat.
    Naive(Duration),
}

impl Competitor {
    fn label(&self) -> String {
        match self {
            Competitor::Alone => "pgbench alone".to_string(),
            Competitor::Backfilld(label, _) => label.clone(),
            Competitor::Naive(sleep) => {
                format!(
                    "naive loop, {NAIVE_BATCH} keys then sleep {} ms",
                    sleep.as_millis()
                )
            }
        }
    }
}

/// backfilld with `config/default.toml`: the impact budget next to production.
const DEFAULT_LABEL: &str = "backfilld default (impact budget 1.3)";

/// The frontier row of backfilld's default with no production at all ("pgbench tx/s" 0):
/// the unloaded rows/s the light load is measured against.
pub const UNLOADED_RATE: u32 = 0;

/// How the frontier runs.
#[derive(Debug, Clone)]
pub struct FrontierPlan {
    pub rows: i64,
    /// pgbench rates, transactions per second.
    pub rates: Vec<u32>,
    pub clients: u32,
    pub rounds: u32,
    /// Each competitor runs this long before its window opens.
    pub settle: Duration,
    /// backfilld's default settles this much longer: it rests ~2 s to learn production's
    /// baseline, then its pace climbs from a few hundred rows/s (the load step shows the
    /// climb; the frontier compares steady states).
    pub climb: Duration,
    pub window: Duration,
    pub competitors: Vec<Competitor>,
    /// The load step, once per round (none: no step).
    pub step: Option<LoadStep>,
}

/// One competitor at one intensity, over the rounds.
#[derive(Debug, Clone)]
pub struct FrontierRow {
    pub rate: u32,
    pub competitor: String,
    pub rows_per_second: Vec<f64>,
    pub p99_ms: Vec<f64>,
    pub p99_ratio: Vec<f64>,
}

/// The default competitors: `variants` of backfilld's default (one setting each),
/// `fixed_rates` for backfilld with sharing off, `sleeps` for the naive loop (zeros
/// skipped: `0` runs none of either).
pub fn default_competitors(
    base: &[(String, String)],
    fixed_rates: &[u32],
    sleeps: &[u64],
    variants: &[(String, String)],
) -> Vec<Competitor> {
    let with = |extra: &[(&str, String)]| {
        let mut settings = base.to_vec();
        settings.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        settings
    };
    let mut competitors = vec![
        Competitor::Alone,
        Competitor::Backfilld(DEFAULT_LABEL.to_string(), with(&[])),
        Competitor::Backfilld(
            "backfilld old default (duty cycle 5 %)".to_string(),
            with(&[("BACKFILLD_THROTTLE__IMPACT_BUDGET_RATIO", "0".to_string())]),
        ),
    ];
    competitors.extend(variants.iter().map(|(key, value)| {
        Competitor::Backfilld(
            format!("backfilld default, {key}={value}"),
            with(&[(key.as_str(), value.clone())]),
        )
    }));
    competitors.extend(
        sleeps
            .iter()
            .filter(|ms| **ms > 0)
            .map(|ms| Competitor::Naive(Duration::from_millis(*ms))),
    );
    for rate in fixed_rates.iter().filter(|rate| **rate > 0) {
        competitors.push(Competitor::Backfilld(
            format!("backfilld fixed {rate} rows/s, sharing off"),
            with(&[
                ("BACKFILLD_THROTTLE__IMPACT_BUDGET_RATIO", "0".to_string()),
                ("BACKFILLD_THROTTLE__BUSY_DUTY_CYCLE", "1".to_string()),
                ("BACKFILLD_THROTTLE__MAX_ROWS_PER_SECOND", rate.to_string()),
            ]),
        ));
    }
    competitors
}

/// Runs the frontier and returns one row per intensity and competitor (with backfilld's
/// default unloaded first), and the load step's timeline of each round.
pub async fn run(
    fixture: &Fixture,
    daemon: &Daemon,
    plan: &FrontierPlan,
    work_dir: &std::path::Path,
) -> anyhow::Result<(Vec<FrontierRow>, Vec<StepTimeline>)> {
    let template = "frontier_template";
    seed_orders(fixture, template, plan.rows)?;
    if let Some(step) = plan.step {
        seed_orders(fixture, STEP_TEMPLATE, step.rows)?;
    }
    let mut rows: Vec<FrontierRow> = Vec::new();
    let mut steps = Vec::new();
    let default = plan
        .competitors
        .iter()
        .find(|c| c.label() == DEFAULT_LABEL)
        .cloned();
    for round in 1..=plan.rounds {
        // Unloaded first: backfilld's default with no production, flat out.
        let unloaded = default.iter().map(|c| (UNLOADED_RATE, c));
        let loaded = plan
            .rates
            .iter()
            .flat_map(|&rate| plan.competitors.iter().map(move |c| (rate, c)));
        let mut alone_p99 = None;
        for (rate, competitor) in unloaded.chain(loaded) {
            let label = competitor.label();
            eprintln!(
                "backfill-bench: frontier round {round}, pgbench {rate} tx/s: {label} (load {})",
                crate::load_average()
            );
            let (done, p99) =
                run_one(fixture, daemon, plan, rate, competitor, work_dir, round).await?;
            if *competitor == Competitor::Alone {
                alone_p99 = Some(p99);
            }
            let ratio = match alone_p99 {
                Some(alone) if rate != UNLOADED_RATE => p99 / alone,
                _ => f64::NAN,
            };
            eprintln!(
                "backfill-bench:   {:.0} rows/s, p99 {p99:.2} ms ({ratio:.2}× alone)",
                done
            );
            let row = match rows
                .iter_mut()
                .find(|r| r.rate == rate && r.competitor == label)
            {
                Some(row) => row,
                None => {
                    rows.push(FrontierRow {
                        rate,
                        competitor: label,
                        rows_per_second: Vec::new(),
                        p99_ms: Vec::new(),
                        p99_ratio: Vec::new(),
                    });
                    rows.last_mut().expect("just pushed")
                }
            };
            row.rows_per_second.push(done);
            row.p99_ms.push(p99);
            row.p99_ratio.push(ratio);
        }
        if let (Some(step), Some(Competitor::Backfilld(_, settings))) = (plan.step, &default) {
            eprintln!(
                "backfill-bench: frontier round {round}, load step {} → {} → {} tx/s (load {})",
                step.from,
                step.to,
                step.from,
                crate::load_average()
            );
            steps.push(run_step(fixture, daemon, plan, step, settings, work_dir, round).await?);
        }
    }
    fixture.drop_database(template)?;
    if plan.step.is_some() {
        fixture.drop_database(STEP_TEMPLATE)?;
    }
    Ok((rows, steps))
}

/// Creates database `db` (afresh) holding the orders table with `rows` rows.
fn seed_orders(fixture: &Fixture, db: &str, rows: i64) -> anyhow::Result<()> {
    fixture.drop_database(db)?;
    fixture.psql("postgres", &format!("CREATE DATABASE {db}"))?;
    fixture
        .psql(db, &ORDERS_SQL.replace("{rows}", &rows.to_string()))
        .with_context(|| format!("seeding {rows} orders rows in {db}"))?;
    Ok(())
}

/// Stops a daemon the way a deployment does (SIGTERM) and waits for it.
fn stop_daemon(child: &mut std::process::Child) {
    let pid = libc::pid_t::try_from(child.id()).unwrap_or(0);
    // SAFETY: signalling our own child, not reaped yet.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let _ = child.wait();
}

/// One competitor next to pgbench at `rate`: rows per second in the window and pgbench's
/// p99 in it (ms).
async fn run_one(
    fixture: &Fixture,
    daemon: &Daemon,
    plan: &FrontierPlan,
    rate: u32,
    competitor: &Competitor,
    work_dir: &std::path::Path,
    round: u32,
) -> anyhow::Result<(f64, f64)> {
    let db = "frontier_run";
    fixture.fresh_copy("frontier_template", db)?;
    fixture.psql(db, PREWARM_SQL)?;
    let url = fixture.primary.url(db);
    let conninfo = fixture.primary.conninfo(db);
    let pgbench = fixture.primary.binaries().path("pgbench");
    // No production at all for the unloaded row.
    let load = (rate != UNLOADED_RATE)
        .then(|| {
            Load::start_script(
                &pgbench,
                &conninfo,
                ORDERS_SCRIPT,
                &[("orders_rows", plan.rows.to_string())],
                plan.clients,
                rate,
            )
        })
        .transpose()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut child = None;
    let mut naive = None;
    match competitor {
        Competitor::Alone => {}
        Competitor::Backfilld(_, settings) => {
            daemon.migrate(&url)?;
            fixture.psql(db, ORDERS_JOB_SQL)?;
            let log = work_dir.join(format!(
                "frontier-{round}-{rate}-{}.log",
                child_name(competitor)
            ));
            child = Some(daemon.spawn(&url, settings, &log)?);
        }
        Competitor::Naive(sleep) => {
            let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .context("connecting the naive loop")?;
            tokio::spawn(connection);
            let (stop, sleep) = (stop.clone(), *sleep);
            naive = Some(tokio::spawn(async move {
                let mut after = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    if client
                        .execute(NAIVE_SQL, &[&after, &NAIVE_BATCH])
                        .await
                        .is_err()
                    {
                        break;
                    }
                    after += NAIVE_BATCH;
                    tokio::time::sleep(sleep).await;
                }
            }));
        }
    }
    if rate == UNLOADED_RATE {
        // Flat out, the job ends within seconds: its own start to its end, verification
        // included.
        let done = until_finished(fixture, db, child.as_mut()).await?;
        fixture.drop_database(db)?;
        return Ok((done, f64::NAN));
    }
    // The default and its variants climb.
    let settle = if competitor.label().starts_with("backfilld default") {
        plan.settle + plan.climb
    } else {
        plan.settle
    };
    tokio::time::sleep(settle).await;
    let count = || -> anyhow::Result<i64> {
        fixture
            .psql(
                db,
                "SELECT count(*) FROM public.orders WHERE label IS NOT NULL",
            )?
            .parse()
            .context("counting done rows")
    };
    let (opened, done_before) = (SystemTime::now(), count()?);
    tokio::time::sleep(plan.window).await;
    let (done_after, closed) = (count()?, SystemTime::now());
    stop.store(true, Ordering::Relaxed);
    if let Some(task) = naive {
        let _ = task.await;
    }
    if let Some(mut child) = child {
        stop_daemon(&mut child);
    }
    let transactions = load.map(Load::stop).transpose()?.unwrap_or_default();
    let window = (epoch_micros(opened), epoch_micros(closed));
    let p99 = LatencySummary::over(&transactions, window).map_or(f64::NAN, |s| s.p99_ms);
    let seconds = closed
        .duration_since(opened)
        .unwrap_or(plan.window)
        .as_secs_f64();
    fixture.drop_database(db)?;
    Ok(((done_after - done_before) as f64 / seconds, p99))
}

/// Waits for the frontier's job in `db` to end (at most [`UNLOADED_LIMIT`]), stops the
/// daemon, and returns the job's rows per second from its start to its end.
async fn until_finished(
    fixture: &Fixture,
    db: &str,
    child: Option<&mut std::process::Child>,
) -> anyhow::Result<f64> {
    let query =
        "SELECT coalesce(extract(epoch FROM finished_at - started_at), 0) || ' ' || rows_done \
                 FROM backfill.jobs WHERE name = 'label_orders' AND state = 'succeeded'";
    let deadline = std::time::Instant::now() + UNLOADED_LIMIT;
    let answer = loop {
        let answer = fixture.psql(db, query)?;
        if !answer.is_empty() || std::time::Instant::now() >= deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if let Some(child) = child {
        stop_daemon(child);
    }
    let (seconds, rows) = answer
        .split_once(' ')
        .with_context(|| format!("the unloaded job did not succeed within {UNLOADED_LIMIT:?}"))?;
    let (seconds, rows): (f64, f64) = (seconds.parse()?, rows.parse()?);
    Ok(if seconds > 0.0 {
        rows / seconds
    } else {
        f64::NAN
    })
}

/// The unloaded job must end within this long.
const UNLOADED_LIMIT: Duration = Duration::from_secs(300);

fn child_name(competitor: &Competitor) -> String {
    competitor
        .label()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Median, and the range as `min–max`.
fn median_range(values: &[f64], digits: usize) -> String {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    match percentile(&finite, 50.0) {
        None => "–".to_string(),
        Some(median) => {
            let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
            let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!("{median:.digits$} ({min:.digits$}–{max:.digits$})")
        }
    }
}

/// The frontier as a Markdown table; `budget` is the p99 ratio the default must keep.
pub fn to_markdown(rows: &[FrontierRow], plan: &FrontierPlan, budget: f64) -> String {
    let mut out = format!(
        "Frontier: {} orders rows (10 columns, 200-byte payload, index on customer_id); \
         pgbench -M prepared -c {} -j 2 -R <rate> reading and updating one random order per \
         transaction; each competitor on a fresh copy, {} s settling ({} s for backfilld's \
         default, whose pace climbs) then a {} s window; {} rounds; median (min–max) over the rounds. p99 ratio: pgbench's p99 in the window over \
         its p99 alone in the same round.\n\n\
         | pgbench tx/s | competitor | rows/s | pgbench p99 ms | p99 ratio | within {budget}× |\n\
         |---:|---|---:|---:|---:|:---:|\n",
        plan.rows,
        plan.clients,
        plan.settle.as_secs(),
        (plan.settle + plan.climb).as_secs(),
        plan.window.as_secs(),
        plan.rounds
    );
    for row in rows {
        let ratio = {
            let finite: Vec<f64> = row
                .p99_ratio
                .iter()
                .copied()
                .filter(|v| v.is_finite())
                .collect();
            percentile(&finite, 50.0)
        };
        let within = match ratio {
            _ if row.competitor == "pgbench alone" || row.rate == UNLOADED_RATE => "",
            Some(r) if r <= budget => "yes",
            Some(_) => "no",
            None => "?",
        };
        let rate = match row.rate {
            UNLOADED_RATE => "none (unloaded)".to_string(),
            rate => rate.to_string(),
        };
        out.push_str(&format!(
            "| {rate} | {} | {} | {} | {} | {within} |\n",
            row.competitor,
            median_range(&row.rows_per_second, 0),
            median_range(&row.p99_ms, 2),
            median_range(&row.p99_ratio, 2),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ranges_skip_what_was_not_measured() {
        assert_eq!(median_range(&[3.0, 1.0, 2.0], 1), "2.0 (1.0–3.0)");
        assert_eq!(median_range(&[f64::NAN], 1), "–");
    }

    #[test]
    fn the_competitors_include_the_baseline_both_defaults_and_the_alternatives() {
        let competitors = default_competitors(&[], &[1000], &[50], &[]);
        let labels: Vec<String> = competitors.iter().map(Competitor::label).collect();
        assert_eq!(labels[0], "pgbench alone");
        assert!(labels.iter().any(|l| l.starts_with("backfilld default")));
        assert!(labels
            .iter()
            .any(|l| l.starts_with("backfilld old default")));
        assert!(labels.iter().any(|l| l.contains("sleep 50 ms")));
        assert!(labels.iter().any(|l| l.contains("fixed 1000")));
    }
}
