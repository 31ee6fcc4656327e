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
//! over the mean of the same round's p99 alone, taken first and again last at each rate.
//! Next to every competitor a second pgbench times backfilld's canary transaction, so the
//! impact budget's signal can be set beside the p99 it stands for.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;

use crate::daemon::Daemon;
use crate::fixture::Fixture;
use crate::pgbench::{epoch_micros, LatencySummary, Load};
use crate::stats::median;
use crate::walwaits::{WalWaitSampler, WalWaits};

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
/// need work; cut into `slices` (one per pod when several run).
fn orders_job_sql(slices: u32) -> String {
    format!(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate,
                                    parallelism)
         VALUES ('label_orders', 'public.orders', 'id',
                 $$UPDATE public.orders SET label = status || '/' || region || '/' || currency
                    WHERE id BETWEEN :first_key AND :last_key AND label IS NULL$$,
                 'label IS NULL', {slices})"
    )
}

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

/// What the bench times next to every competitor: backfilld's committing canary (the very
/// statement `LatencyCanary` runs), so the signal the impact budget reads can be set beside
/// the p99 it stands for.
fn canary_script() -> String {
    format!("{};\n", backfill_dataplane::CANARY_SQL)
}

/// The bench's canary runs at backfilld's default `throttle.canary_interval` (50 ms).
const CANARY_RATE: u32 = 20;

/// The bench canary's `application_name`: not `pgbench`, which is production's.
const CANARY_APPLICATION: &str = "backfill-bench-canary";

/// Keys per statement of the naive loop.
const NAIVE_BATCH: i64 = 1_000;

/// What competes for the primary next to pgbench.
#[derive(Debug, Clone, PartialEq)]
pub enum Competitor {
    Alone,
    /// backfilld with `config/default.toml` plus `settings`, run from `binary` when set
    /// (another build, e.g. the parent commit's: a code change compared in the same run).
    Backfilld {
        label: String,
        settings: Vec<(String, String)>,
        binary: Option<PathBuf>,
    },
    /// UPDATE [`NAIVE_BATCH`] keys, commit, sleep this long, repeat.
    Naive(Duration),
}

impl Competitor {
    /// backfilld from the bench's own binary.
    pub fn backfilld(label: String, settings: Vec<(String, String)>) -> Self {
        Competitor::Backfilld {
            label,
            settings,
            binary: None,
        }
    }

    fn label(&self) -> String {
        match self {
            Competitor::Alone => ALONE_LABEL.to_string(),
            Competitor::Backfilld { label, .. } => label.clone(),
            Competitor::Naive(sleep) => {
                format!(
                    "naive loop, {NAIVE_BATCH} keys then sleep {} ms",
                    sleep.as_millis()
                )
            }
        }
    }
}

/// pgbench with no competitor: the baseline of every ratio.
const ALONE_LABEL: &str = "pgbench alone";

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
    /// baseline, then its pace climbs from 1,000 rows/s (the load step shows the
    /// climb; the frontier compares steady states).
    pub climb: Duration,
    pub window: Duration,
    /// The window is stretched to hold at least this many pgbench transactions: at 20 tx/s
    /// a 6 s window's p99 is its second-slowest transaction, and two runs of pgbench alone
    /// differ by 2× (seen in issue 19's runs).
    pub min_transactions: u32,
    pub competitors: Vec<Competitor>,
    /// backfilld daemons per backfilld run (the pods of one Job), the job cut into as many
    /// slices; each daemon's pace, fixed rates included, is its own.
    pub pods: u32,
    /// Each pod after the first starts this long after the one before (a Job's pods
    /// start apart: scheduling, image pulls).
    pub pod_stagger: Duration,
    /// The load step, once per round (none: no step).
    pub step: Option<LoadStep>,
    /// pgbench's latencies are tailed into the bench's SLI histogram (see [`crate::sli`]).
    pub sli: bool,
}

impl FrontierPlan {
    /// The measured window next to pgbench at `rate` tx/s.
    pub fn window_at(&self, rate: u32) -> Duration {
        match rate {
            UNLOADED_RATE => self.window,
            rate => self.window.max(Duration::from_secs_f64(
                f64::from(self.min_transactions) / f64::from(rate),
            )),
        }
    }
}

/// One competitor at one intensity, over the rounds.
#[derive(Debug, Clone)]
pub struct FrontierRow {
    pub rate: u32,
    pub competitor: String,
    pub rows_per_second: Vec<f64>,
    pub p99_ms: Vec<f64>,
    pub p99_ratio: Vec<f64>,
    /// The bench canary's p90 and p99 over the same round's alone.
    pub canary_p90_ratio: Vec<f64>,
    pub canary_p99_ratio: Vec<f64>,
    /// Share of pgbench's transactions in the window slower than the budget's line
    /// ([`BUDGET`] × the round's p99 alone), and the share of those that one of the
    /// competitor's batches overlapped: what the p99 ratio cannot say, whether the slow
    /// transactions are the competitor's doing or the machine's own.
    pub over_line_share: Vec<f64>,
    pub over_line_in_batch: Vec<f64>,
}

impl FrontierRow {
    /// A competitor judged against the budget: not pgbench alone (the baseline) and not
    /// the unloaded run (no production to harm).
    fn is_judged(&self) -> bool {
        self.competitor != ALONE_LABEL && self.rate != UNLOADED_RATE
    }
}

/// The budget the frontier measures against: backfilld's default `impact_budget_ratio`.
pub const BUDGET: f64 = 1.3;

/// The default competitors: backfilld's default from `other_binaries` too, `variants` of
/// backfilld's default (each one or more settings), `fixed_rates` for backfilld with
/// sharing off, `sleeps` for the naive loop (zeros skipped: `0` runs none of either).
pub fn default_competitors(
    base: &[(String, String)],
    fixed_rates: &[u32],
    sleeps: &[u64],
    variants: &[Vec<(String, String)>],
    other_binaries: &[PathBuf],
) -> Vec<Competitor> {
    let with = |extra: &[(&str, String)]| {
        let mut settings = base.to_vec();
        settings.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
        settings
    };
    let mut competitors = vec![
        Competitor::Alone,
        Competitor::backfilld(DEFAULT_LABEL.to_string(), with(&[])),
        Competitor::backfilld(
            "backfilld old default (duty cycle 5 %)".to_string(),
            with(&[("BACKFILLD_THROTTLE__IMPACT_BUDGET_RATIO", "0".to_string())]),
        ),
    ];
    competitors.extend(other_binaries.iter().map(|binary| Competitor::Backfilld {
        label: format!("backfilld default, binary {}", binary.display()),
        settings: with(&[]),
        binary: Some(binary.clone()),
    }));
    competitors.extend(variants.iter().map(|variant| {
        let settings: Vec<(&str, String)> = variant
            .iter()
            .map(|(key, value)| (key.as_str(), value.clone()))
            .collect();
        let named: Vec<String> = variant.iter().map(|(k, v)| format!("{k}={v}")).collect();
        Competitor::backfilld(
            format!("backfilld default, {}", named.join(" ")),
            with(&settings),
        )
    }));
    competitors.extend(
        sleeps
            .iter()
            .filter(|ms| **ms > 0)
            .map(|ms| Competitor::Naive(Duration::from_millis(*ms))),
    );
    for rate in fixed_rates.iter().filter(|rate| **rate > 0) {
        competitors.push(Competitor::backfilld(
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
        // pgbench alone runs first and again last at each rate: its p99 differs from one
        // window to the next by tens of percent, and the ratio of every competitor is over
        // the mean of the two (the alone row's own spread shows that noise).
        let loaded = plan.rates.iter().flat_map(|&rate| {
            plan.competitors
                .iter()
                .chain(std::iter::once(&Competitor::Alone))
                .map(move |c| (rate, c))
        });
        let mut measured_at_rate: Vec<(&Competitor, Measured)> = Vec::new();
        let mut at_rate = None;
        for (rate, competitor) in unloaded.chain(loaded) {
            if at_rate != Some(rate) {
                record(&mut rows, at_rate, &measured_at_rate);
                measured_at_rate.clear();
                at_rate = Some(rate);
            }
            eprintln!(
                "backfill-bench: frontier round {round}, pgbench {rate} tx/s: {} (load {})",
                competitor.label(),
                crate::load_average()
            );
            let measured =
                run_one(fixture, daemon, plan, rate, competitor, work_dir, round).await?;
            let first_alone = *competitor == Competitor::Alone
                && !measured_at_rate
                    .iter()
                    .any(|(c, _)| **c == Competitor::Alone);
            if first_alone {
                keep_first_alone_timeline(rate, round, work_dir)?;
            }
            eprintln!(
                "backfill-bench:   {:.0} rows/s, p99 {:.2} ms; canary p90 {:.2} ms, p99 {:.2} ms",
                measured.rows_per_second,
                measured.p99_ms,
                measured.canary_ms.0,
                measured.canary_ms.1
            );
            measured_at_rate.push((competitor, measured));
        }
        record(&mut rows, at_rate, &measured_at_rate);
        if let (Some(step), Some(Competitor::Backfilld { settings, .. })) = (plan.step, &default) {
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

/// Adds one round's measurements at `rate` to `rows`, with their ratios over the mean of
/// that round's pgbench-alone runs at the rate.
fn record(rows: &mut Vec<FrontierRow>, rate: Option<u32>, measured: &[(&Competitor, Measured)]) {
    let Some(rate) = rate else {
        return;
    };
    let alone: Vec<&Measured> = measured
        .iter()
        .filter(|(competitor, _)| **competitor == Competitor::Alone)
        .map(|(_, m)| m)
        .collect();
    let mean_alone = |of: fn(&Measured) -> f64| {
        let values: Vec<f64> = alone
            .iter()
            .map(|m| of(m))
            .filter(|v| v.is_finite())
            .collect();
        values.iter().sum::<f64>() / values.len() as f64
    };
    let baseline = (
        mean_alone(|m| m.p99_ms),
        mean_alone(|m| m.canary_ms.0),
        mean_alone(|m| m.canary_ms.1),
    );
    for (competitor, m) in measured {
        let label = competitor.label();
        let over = |value: f64, alone: f64| match rate {
            UNLOADED_RATE => f64::NAN,
            _ => value / alone,
        };
        let row = match rows
            .iter_mut()
            .position(|r| r.rate == rate && r.competitor == label)
        {
            Some(at) => &mut rows[at],
            None => {
                rows.push(FrontierRow {
                    rate,
                    competitor: label,
                    rows_per_second: Vec::new(),
                    p99_ms: Vec::new(),
                    p99_ratio: Vec::new(),
                    canary_p90_ratio: Vec::new(),
                    canary_p99_ratio: Vec::new(),
                    over_line_share: Vec::new(),
                    over_line_in_batch: Vec::new(),
                });
                rows.last_mut().expect("just pushed")
            }
        };
        row.rows_per_second.push(m.rows_per_second);
        row.p99_ms.push(m.p99_ms);
        row.p99_ratio.push(over(m.p99_ms, baseline.0));
        row.canary_p90_ratio.push(over(m.canary_ms.0, baseline.1));
        row.canary_p99_ratio.push(over(m.canary_ms.1, baseline.2));
        let (share, in_batch) = over_line(&m.latencies, BUDGET * baseline.0);
        row.over_line_share.push(share);
        row.over_line_in_batch.push(in_batch);
    }
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
pub fn stop_daemon(child: &mut std::process::Child) {
    let pid = libc::pid_t::try_from(child.id()).unwrap_or(0);
    // SAFETY: signalling our own child, not reaped yet.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let _ = child.wait();
}

/// What one competitor run measured in its window.
#[derive(Debug, Clone)]
struct Measured {
    rows_per_second: f64,
    /// pgbench's p99, ms.
    p99_ms: f64,
    /// The bench's canary: p90 and p99 of its round trips, ms.
    canary_ms: (f64, f64),
    /// pgbench's transactions in the window: latency (ms), and whether one of the
    /// competitor's batches overlapped it.
    latencies: Vec<(f64, bool)>,
}

/// The share of `latencies` over `line` (ms), and the share of those overlapped by a
/// batch (NaN when none was over).
fn over_line(latencies: &[(f64, bool)], line: f64) -> (f64, f64) {
    let over: Vec<bool> = latencies
        .iter()
        .filter(|(latency, _)| *latency > line)
        .map(|(_, in_batch)| *in_batch)
        .collect();
    let share = over.len() as f64 / latencies.len().max(1) as f64;
    let in_batch = over.iter().filter(|b| **b).count() as f64 / over.len() as f64;
    (share, in_batch)
}

/// For each transaction (start, end), whether one of `batches` (start, end; sorted by
/// start, epoch microseconds) overlapped it.
fn overlapped_by(transactions: &[(i64, i64)], batches: &[(i64, i64)]) -> Vec<bool> {
    let longest = batches.iter().map(|(s, e)| e - s).max().unwrap_or(0);
    transactions
        .iter()
        .map(|&(start, end)| {
            // Batches starting after the transaction ended cannot overlap it; of the
            // earlier ones, only those starting within the longest batch of its start can.
            let before_end = batches.partition_point(|&(s, _)| s <= end);
            batches[..before_end]
                .iter()
                .rev()
                .take_while(|&&(s, _)| s >= start - longest)
                .any(|&(_, e)| e >= start)
        })
        .collect()
}

/// The batches backfilld logged committing (`batch committed`, at debug level: its time
/// is the commit's, `duration_ms` the batch's), as (start, end) epoch microseconds.
fn logged_batches(log: &std::path::Path) -> anyhow::Result<Vec<(i64, i64)>> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let mut batches: Vec<(i64, i64)> = text
        .lines()
        .filter(|line| line.contains("\"batch committed\""))
        .filter_map(|line| {
            let entry: serde_json::Value = serde_json::from_str(line).ok()?;
            let at = humantime::parse_rfc3339(entry["timestamp"].as_str()?).ok()?;
            let end = epoch_micros(at);
            let took = (entry["duration_ms"].as_f64()? * 1000.0) as i64;
            Some((end - took, end))
        })
        .collect();
    batches.sort_unstable();
    Ok(batches)
}

/// One competitor next to pgbench at `rate`: rows per second in the window, pgbench's
/// p99 in it and the canary's tail.
async fn run_one(
    fixture: &Fixture,
    daemon: &Daemon,
    plan: &FrontierPlan,
    rate: u32,
    competitor: &Competitor,
    work_dir: &std::path::Path,
    round: u32,
) -> anyhow::Result<Measured> {
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
    let sli_tail = match &load {
        Some(load) if plan.sli => Some(crate::sli::LogTail::start(load.log_dir())),
        _ => None,
    };
    // Named apart from production, so production's WAL waits are production's own.
    let canary_conninfo = format!("{conninfo} application_name={CANARY_APPLICATION}");
    let canary = (rate != UNLOADED_RATE)
        .then(|| {
            Load::start_script(
                &pgbench,
                &canary_conninfo,
                &canary_script(),
                &[],
                1,
                CANARY_RATE,
            )
        })
        .transpose()?;
    let wal_waits = match rate {
        UNLOADED_RATE => None,
        _ => Some(WalWaitSampler::start(&conninfo).await?),
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let naive_rows = Arc::new(AtomicI64::new(0));
    let mut children = Vec::new();
    let mut naive = None;
    match competitor {
        Competitor::Alone => {}
        Competitor::Backfilld {
            settings, binary, ..
        } => {
            let daemon = match binary {
                Some(binary) => &Daemon {
                    binary: binary.clone(),
                },
                None => daemon,
            };
            daemon.migrate(&url)?;
            fixture.psql(db, &orders_job_sql(plan.pods))?;
            for pod in 1..=plan.pods {
                if pod > 1 {
                    tokio::time::sleep(plan.pod_stagger).await;
                }
                let mut settings = settings.clone();
                if plan.pods > 1 {
                    settings.push(("BACKFILLD_WORKER__ID".to_string(), format!("bench-{pod}")));
                }
                let log = pod_log(competitor, rate, round, work_dir, pod);
                children.push(daemon.spawn(&url, &settings, &log)?);
            }
        }
        Competitor::Naive(sleep) => {
            let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .context("connecting the naive loop")?;
            tokio::spawn(connection);
            let (stop, sleep, rows) = (stop.clone(), *sleep, naive_rows.clone());
            naive = Some(tokio::spawn(async move {
                let mut after = 0i64;
                let mut batches = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = epoch_micros(SystemTime::now());
                    let Ok(updated) = client.execute(NAIVE_SQL, &[&after, &NAIVE_BATCH]).await
                    else {
                        break;
                    };
                    batches.push((started, epoch_micros(SystemTime::now())));
                    rows.fetch_add(i64::try_from(updated).unwrap_or(0), Ordering::Relaxed);
                    after += NAIVE_BATCH;
                    tokio::time::sleep(sleep).await;
                }
                batches
            }));
        }
    }
    if rate == UNLOADED_RATE {
        // Flat out, the job ends within seconds: its own start to its end, verification
        // included.
        let done = until_finished(fixture, db, &mut children).await?;
        fixture.drop_database(db)?;
        return Ok(Measured {
            rows_per_second: done,
            p99_ms: f64::NAN,
            canary_ms: (f64::NAN, f64::NAN),
            latencies: Vec::new(),
        });
    }
    // The default and its variants climb.
    let settle = if competitor.label().starts_with("backfilld default") {
        plan.settle + plan.climb
    } else {
        plan.settle
    };
    tokio::time::sleep(settle).await;
    // Rows done so far, without scanning the table: a count(*) of the labelled rows at each
    // edge of the window stalled pgbench there (at 600 tx/s, 5–58 transactions over the
    // budget's line in the second of each count; more after the default's longer climb,
    // whose count met more rows to prune and hint), which a p99 of 6,000 transactions
    // cannot ignore.
    let (progress, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .context("connecting the bench's progress reader")?;
    tokio::spawn(connection);
    let done = || async {
        anyhow::Ok(match competitor {
            Competitor::Alone => 0,
            Competitor::Naive(_) => naive_rows.load(Ordering::Relaxed),
            Competitor::Backfilld { .. } => progress
                // The slices' rows, not their parent's sum of them too.
                .query_one(
                    "SELECT coalesce(sum(rows_done), 0)::bigint FROM backfill.jobs AS job \
                      WHERE NOT EXISTS \
                            (SELECT FROM backfill.jobs AS slice WHERE slice.parent_id = job.id)",
                    &[],
                )
                .await
                .context("reading the jobs' rows_done")?
                .get(0),
        })
    };
    let (opened, done_before) = (SystemTime::now(), done().await?);
    let window = plan.window_at(rate);
    tokio::time::sleep(window).await;
    let (done_after, closed) = (done().await?, SystemTime::now());
    stop.store(true, Ordering::Relaxed);
    let mut batches = match naive {
        Some(task) => task.await.unwrap_or_default(),
        None => Vec::new(),
    };
    for (pod, child) in (1..).zip(children.iter_mut()) {
        stop_daemon(child);
        batches.extend(logged_batches(&pod_log(
            competitor, rate, round, work_dir, pod,
        ))?);
    }
    batches.sort_unstable();
    drop(sli_tail);
    let transactions = load.map(Load::stop).transpose()?.unwrap_or_default();
    let canaries = canary.map(Load::stop).transpose()?.unwrap_or_default();
    let wal_waits = match wal_waits {
        Some(sampler) => sampler.finish().await?,
        None => WalWaits::default(),
    };
    let span = (epoch_micros(opened), epoch_micros(closed));
    if rate != UNLOADED_RATE {
        let timeline = run_file(competitor, rate, round, work_dir, "transactions.tsv");
        write_timeline(&timeline, span, &transactions, &canaries, &wal_waits)?;
    }
    let p99 = LatencySummary::over(&transactions, span).map_or(f64::NAN, |s| s.p99_ms);
    let canary_ms = LatencySummary::over(&canaries, span)
        .map_or((f64::NAN, f64::NAN), |s| (s.p90_ms, s.p99_ms));
    let in_window = crate::pgbench::within(&transactions, span);
    let intervals: Vec<(i64, i64)> = in_window
        .iter()
        .map(|t| {
            let took = (t.latency_ms * 1000.0) as i64;
            (t.completed_at_us - took, t.completed_at_us)
        })
        .collect();
    let latencies = in_window
        .iter()
        .map(|t| t.latency_ms)
        .zip(overlapped_by(&intervals, &batches))
        .collect();
    let seconds = closed
        .duration_since(opened)
        .unwrap_or(window)
        .as_secs_f64();
    fixture.drop_database(db)?;
    Ok(Measured {
        rows_per_second: (done_after - done_before) as f64 / seconds,
        p99_ms: p99,
        canary_ms,
        latencies,
    })
}

/// Writes every transaction of a run, pgbench's and the canary's, one per line (`kind
/// completed_at_us latency_ms`, the window's bounds first), then the WAL-wait samples
/// (`wal at_us waiting active took_us`) and their cost (`sampler backend_cpu_us wall_us`):
/// with the daemon's log beside it, the slow transactions can be matched with the pace
/// and the rests that were in force.
fn write_timeline(
    path: &std::path::Path,
    window: (i64, i64),
    transactions: &[crate::pgbench::Transaction],
    canaries: &[crate::pgbench::Transaction],
    wal_waits: &WalWaits,
) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let mut text = format!("window\t{}\t{}\n", window.0, window.1);
    for (kind, list) in [("pgbench", transactions), ("canary", canaries)] {
        for t in list {
            let _ = writeln!(text, "{kind}\t{}\t{:.3}", t.completed_at_us, t.latency_ms);
        }
    }
    for s in &wal_waits.samples {
        let _ = writeln!(
            text,
            "wal\t{}\t{}\t{}\t{}",
            s.at_us, s.waiting, s.active, s.took_us
        );
    }
    if !wal_waits.samples.is_empty() {
        let _ = writeln!(
            text,
            "sampler\t{:.0}\t{:.0}",
            wal_waits.backend_cpu_seconds * 1e6,
            wal_waits.wall_seconds * 1e6
        );
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Waits for the frontier's job in `db` to end (at most [`UNLOADED_LIMIT`]), stops the
/// daemon, and returns the job's rows per second from its start to its end.
async fn until_finished(
    fixture: &Fixture,
    db: &str,
    children: &mut [std::process::Child],
) -> anyhow::Result<f64> {
    // Its slices' rows (their parent's are not counted again), from the first start to
    // the last finish; nothing until the job (the parent, when sliced) has succeeded.
    let query = "SELECT coalesce(extract(epoch FROM max(job.finished_at) - min(job.started_at)), 0) \
                        || ' ' || sum(job.rows_done) FILTER (WHERE NOT EXISTS \
                               (SELECT FROM backfill.jobs AS slice WHERE slice.parent_id = job.id)) \
                   FROM backfill.jobs AS job \
                  WHERE EXISTS (SELECT FROM backfill.jobs \
                                 WHERE name = 'label_orders' AND state = 'succeeded')";
    let deadline = std::time::Instant::now() + UNLOADED_LIMIT;
    let answer = loop {
        let answer = fixture.psql(db, query)?;
        if !answer.is_empty() || std::time::Instant::now() >= deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for child in children {
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

/// Moves the timeline of the first pgbench-alone window at `rate` in `round` aside
/// (`first.transactions.tsv`): the last window at the rate, which the ratios also stand
/// on, would write over it, and a replay of the canary's line needs both.
fn keep_first_alone_timeline(rate: u32, round: u32, dir: &std::path::Path) -> anyhow::Result<()> {
    let (from, to) = (
        run_file(&Competitor::Alone, rate, round, dir, "transactions.tsv"),
        run_file(
            &Competitor::Alone,
            rate,
            round,
            dir,
            "first.transactions.tsv",
        ),
    );
    std::fs::rename(&from, &to)
        .with_context(|| format!("keeping {} as {}", from.display(), to.display()))
}

/// A file of `competitor`'s run at `rate` in `round`: its daemon's `log`, its
/// `transactions.tsv`.
fn run_file(
    competitor: &Competitor,
    rate: u32,
    round: u32,
    dir: &std::path::Path,
    extension: &str,
) -> std::path::PathBuf {
    dir.join(format!(
        "frontier-{round}-{rate}-{}.{extension}",
        child_name(competitor)
    ))
}

/// The log of `competitor`'s daemon `pod` (1 for the first, or only one).
fn pod_log(
    competitor: &Competitor,
    rate: u32,
    round: u32,
    dir: &std::path::Path,
    pod: u32,
) -> std::path::PathBuf {
    match pod {
        1 => run_file(competitor, rate, round, dir, "log"),
        pod => run_file(competitor, rate, round, dir, &format!("pod{pod}.log")),
    }
}

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
    match median(&finite) {
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
    let pods = match plan.pods {
        0 | 1 => String::new(),
        pods => format!(
            "{pods} backfilld daemons in each backfilld run (the pods of one Job, the job cut \
             into {pods} slices; a fixed rate is each daemon's), each started {} s after the \
             one before. ",
            plan.pod_stagger.as_secs_f64()
        ),
    };
    let mut out = format!(
        "Frontier: {pods}{} orders rows (10 columns, 200-byte payload, index on customer_id); \
         pgbench -M prepared -c {} -j 2 -R <rate> reading and updating one random order per \
         transaction; each competitor on a fresh copy, {} s settling ({} s for backfilld's \
         default, whose pace climbs) then a window of {} s or {} pgbench transactions, whichever is longer; {} rounds; median (min–max) over the rounds. p99 ratio: pgbench's p99 in the window over \
         the mean of its p99 alone in the same round, run first and again last at each rate (the alone row's ratios show that baseline's own noise). Canary: backfilld's canary transaction (`{}`) every 50 ms on a session of its own, as backfilld's \
         canary runs it, timed by a second pgbench; its p90 and p99 in the window over the same round's alone, likewise. Over the line: \
         the share of pgbench's transactions in the window slower than {budget}× the round's p99 alone (a p99 within budget \
         leaves at most 1 %), and how many of those one of the competitor's batches overlapped (its statement's \
         start to its commit, from backfilld's log or the loop's own clock): slow transactions no batch overlapped are the \
         machine's own, or the competitor's indirect cost (its canary, its WAL written ahead).\n\n\
         | pgbench tx/s | competitor | rows/s | pgbench p99 ms | p99 ratio | within {budget}× | canary p90 ratio | canary p99 ratio | over the line % | of them in a batch % |\n\
         |---:|---|---:|---:|---:|:---:|---:|---:|---:|---:|\n",
        plan.rows,
        plan.clients,
        plan.settle.as_secs(),
        (plan.settle + plan.climb).as_secs(),
        plan.window.as_secs(),
        plan.min_transactions,
        plan.rounds,
        backfill_dataplane::CANARY_SQL
    );
    for row in rows {
        let ratio = {
            let finite: Vec<f64> = row
                .p99_ratio
                .iter()
                .copied()
                .filter(|v| v.is_finite())
                .collect();
            median(&finite)
        };
        let within = if row.is_judged() {
            within_cell(ratio, budget)
        } else {
            String::new()
        };
        let rate = match row.rate {
            UNLOADED_RATE => "none (unloaded)".to_string(),
            rate => rate.to_string(),
        };
        out.push_str(&format!(
            "| {rate} | {} | {} | {} | {} | {within} | {} | {} | {} | {} |\n",
            row.competitor,
            median_range(&row.rows_per_second, 0),
            median_range(&row.p99_ms, 2),
            median_range(&row.p99_ratio, 2),
            median_range(&row.canary_p90_ratio, 2),
            median_range(&row.canary_p99_ratio, 2),
            median_range(&percent(&row.over_line_share), 1),
            median_range(&percent(&row.over_line_in_batch), 0),
        ));
    }
    out.push('\n');
    out.push_str(&alone_disagreement(rows));
    out.push('\n');
    out.push_str(&round_by_round(rows, plan.rounds));
    out
}

/// Whether a median p99 ratio kept `budget`, for the table: a "no" whose ratio prints
/// as the budget itself (1.30 over 1.3, issue 19's twenty-sixth round) shows three
/// decimals, so the cell does not contradict the figure beside it.
fn within_cell(ratio: Option<f64>, budget: f64) -> String {
    match ratio {
        Some(r) if r <= budget => "yes".to_string(),
        Some(r) if format!("{r:.2}") == format!("{budget:.2}") => format!("no ({r:.3}×)"),
        Some(_) => "no".to_string(),
        None => "?".to_string(),
    }
}

/// Every competitor's rows/s and p99 ratio round by round: where a median sits at the
/// budget, the rounds show whether it kept it in most of them or broke it in some by
/// far (issue 19's eighth round read them off the bench's log).
fn round_by_round(rows: &[FrontierRow], rounds: u32) -> String {
    let mut out =
        String::from("Round by round (rows/s at p99 ratio):\n\n| pgbench tx/s | competitor |");
    for round in 1..=rounds {
        out.push_str(&format!(" round {round} |"));
    }
    out.push_str("\n|---:|---|");
    out.push_str(&"---:|".repeat(rounds as usize));
    out.push('\n');
    for row in rows.iter().filter(|row| row.is_judged()) {
        out.push_str(&format!("| {} | {} |", row.rate, row.competitor));
        for (rows_per_second, ratio) in row.rows_per_second.iter().zip(&row.p99_ratio) {
            out.push_str(&format!(" {rows_per_second:.0} at {ratio:.2}× |"));
        }
        out.push('\n');
    }
    out.push('\n');
    out
}

/// Shares as percentages.
fn percent(shares: &[f64]) -> Vec<f64> {
    shares.iter().map(|share| share * 100.0).collect()
}

/// Two pgbench-alone windows of one round and rate whose p99s differ by more than this
/// factor measured the machine's own stalls: the ratios over their mean say little
/// (issue 19's fourth round: 4.0 against 189.8 ms at 20 tx/s).
const ALONE_DISAGREEMENT: f64 = 2.0;

/// A sentence naming every round and rate whose two alone windows disagree by more than
/// [`ALONE_DISAGREEMENT`], or saying that none did.
fn alone_disagreement(rows: &[FrontierRow]) -> String {
    let mut disagreeing = Vec::new();
    for row in rows.iter().filter(|row| row.competitor == ALONE_LABEL) {
        // Each round ran pgbench alone first and again last at the rate: two values.
        for (round, pair) in row.p99_ms.chunks_exact(2).enumerate() {
            let (low, high) = (pair[0].min(pair[1]), pair[0].max(pair[1]));
            if high > low * ALONE_DISAGREEMENT {
                disagreeing.push(format!(
                    "{} tx/s round {} ({:.2} and {:.2} ms)",
                    row.rate,
                    round + 1,
                    pair[0],
                    pair[1]
                ));
            }
        }
    }
    if disagreeing.is_empty() {
        format!("The two pgbench-alone windows of every round agree within {ALONE_DISAGREEMENT}×.")
    } else {
        format!(
            "Alone windows more than {ALONE_DISAGREEMENT}× apart, the machine's own stalls (the \
             ratios of that round and rate measure them more than the competitors): {}.",
            disagreeing.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_ranges_skip_what_was_not_measured() {
        assert_eq!(median_range(&[3.0, 1.0, 2.0], 1), "2.0 (1.0–3.0)");
        assert_eq!(median_range(&[f64::NAN], 1), "–");
    }

    /// A row of `values.len()` measurements, each ratio 1, share 0 and rows/s 0.
    fn row_of(rate: u32, competitor: &str, values: usize) -> FrontierRow {
        FrontierRow {
            rate,
            competitor: competitor.to_string(),
            rows_per_second: vec![0.0; values],
            p99_ms: vec![1.0; values],
            p99_ratio: vec![1.0; values],
            canary_p90_ratio: vec![1.0; values],
            canary_p99_ratio: vec![1.0; values],
            over_line_share: vec![0.0; values],
            over_line_in_batch: vec![0.0; values],
        }
    }

    #[test]
    fn each_round_of_a_competitor_is_shown_beside_the_median() {
        let row = |rate: u32, competitor: &str, rows: Vec<f64>, ratios: Vec<f64>| {
            let values = rows.len();
            FrontierRow {
                rows_per_second: rows,
                p99_ratio: ratios,
                ..row_of(rate, competitor, values)
            }
        };
        let table = round_by_round(
            &[
                row(
                    UNLOADED_RATE,
                    "backfilld default",
                    vec![50_000.0],
                    vec![f64::NAN],
                ),
                row(200, ALONE_LABEL, vec![0.0; 4], vec![1.0, 0.9, 1.1, 1.0]),
                row(
                    200,
                    "backfilld default",
                    vec![1660.0, 759.4, 1670.0],
                    vec![1.23, 0.99, 1.544],
                ),
            ],
            3,
        );
        assert!(
            table.contains(
                "| 200 | backfilld default | 1660 at 1.23× | 759 at 0.99× | 1670 at 1.54× |"
            ),
            "{table}"
        );
        assert!(table.contains("| round 1 | round 2 | round 3 |"), "{table}");
        assert!(
            !table.contains(ALONE_LABEL) && !table.contains("50000"),
            "{table}"
        );
    }

    #[test]
    fn a_median_over_the_budget_that_prints_as_the_budget_shows_why_it_is_over() {
        assert_eq!(within_cell(Some(1.3), 1.3), "yes");
        assert_eq!(within_cell(Some(1.3017), 1.3), "no (1.302×)");
        assert_eq!(within_cell(Some(1.31), 1.3), "no");
        assert_eq!(within_cell(None, 1.3), "?");
    }

    #[test]
    fn alone_windows_far_apart_are_named_by_round_and_rate() {
        let row = |rate: u32, competitor: &str, p99_ms: Vec<f64>| {
            let values = p99_ms.len();
            FrontierRow {
                p99_ms,
                ..row_of(rate, competitor, values)
            }
        };
        let calm = vec![
            row(20, ALONE_LABEL, vec![4.0, 5.0, 4.5, 8.9]),
            row(20, "backfilld default", vec![500.0, 600.0]),
        ];
        assert!(alone_disagreement(&calm).contains("agree within 2×"));
        let stalled = vec![
            row(20, ALONE_LABEL, vec![4.0, 5.0, 4.02, 189.8]),
            row(200, ALONE_LABEL, vec![146.57, 13.27, 3.0, 3.1]),
        ];
        let sentence = alone_disagreement(&stalled);
        assert!(
            sentence.contains("20 tx/s round 2 (4.02 and 189.80 ms)")
                && sentence.contains("200 tx/s round 1 (146.57 and 13.27 ms)")
                && !sentence.contains("round 1 (4.00"),
            "{sentence}"
        );
    }

    #[test]
    fn a_transaction_is_in_a_batch_when_any_batch_overlaps_it() {
        // Batches at 100–110, 200–260 and 300–301. A transaction inside a batch, or
        // spanning one, is in it; one between batches, or after the last, is not.
        let batches = [(100, 110), (200, 260), (300, 301)];
        let transactions = [
            (0, 99),
            (105, 106),
            (111, 199),
            (250, 400),
            (255, 270),
            (302, 320),
        ];
        assert_eq!(
            overlapped_by(&transactions, &batches),
            [false, true, false, true, true, false]
        );
        assert_eq!(overlapped_by(&transactions, &[]), [false; 6]);
    }

    #[test]
    fn over_the_line_counts_the_slow_and_those_a_batch_overlapped() {
        let latencies = [(1.0, true), (5.0, true), (6.0, false), (2.0, false)];
        assert_eq!(over_line(&latencies, 4.0), (0.5, 0.5));
        let (share, in_batch) = over_line(&latencies, 10.0);
        assert_eq!(share, 0.0);
        assert!(in_batch.is_nan());
    }

    #[test]
    fn the_competitors_include_the_baseline_both_defaults_and_the_alternatives() {
        let competitors =
            default_competitors(&[], &[1000], &[50], &[], &[PathBuf::from("/tmp/parent")]);
        let labels: Vec<String> = competitors.iter().map(Competitor::label).collect();
        assert_eq!(labels[0], "pgbench alone");
        assert!(labels.iter().any(|l| l.starts_with("backfilld default")));
        assert!(labels
            .iter()
            .any(|l| l.starts_with("backfilld old default")));
        assert!(labels.iter().any(|l| l.contains("sleep 50 ms")));
        assert!(labels.iter().any(|l| l.contains("fixed 1000")));
        let compared = competitors.iter().find_map(|c| match c {
            Competitor::Backfilld {
                binary: Some(binary),
                label,
                ..
            } => Some((binary.clone(), label.clone())),
            _ => None,
        });
        assert_eq!(
            compared,
            Some((
                PathBuf::from("/tmp/parent"),
                "backfilld default, binary /tmp/parent".to_string()
            )),
            "the other binary's default must climb as the default does (its label)"
        );
    }

    #[test]
    fn a_variant_of_several_settings_sets_them_all_and_names_them_all() {
        let variant = vec![
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "2s".to_string()),
        ];
        let competitors = default_competitors(&[], &[], &[], &[variant], &[]);
        let Some(Competitor::Backfilld {
            label, settings, ..
        }) = competitors.last()
        else {
            panic!("the variant is not the last competitor: {competitors:?}");
        };
        assert_eq!(label, "backfilld default, A=1 B=2s");
        assert!(settings.contains(&("A".to_string(), "1".to_string())));
        assert!(settings.contains(&("B".to_string(), "2s".to_string())));
    }
}
