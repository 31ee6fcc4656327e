//! The load step: backfilld's default next to pgbench whose rate steps up mid-run and back
//! down, to show how fast the impact budget's loop converges (see [`LoadStep`]).

use std::time::{Duration, SystemTime};

use anyhow::Context as _;

use super::{median_range, orders_job_sql, stop_daemon, FrontierPlan, ORDERS_SCRIPT, PREWARM_SQL};
use crate::daemon::Daemon;
use crate::fixture::Fixture;
use crate::pgbench::{epoch_micros, LatencySummary, Load};
use crate::stats::{median, percentile};

/// A load step mid-run: backfilld's default next to pgbench at `from` tx/s, then at `to`
/// (a second pgbench adds the difference), then at `from` again, each for `phase`: how
/// fast the loop converges after production's load changes under it.
#[derive(Debug, Clone, Copy)]
pub struct LoadStep {
    pub from: u32,
    pub to: u32,
    pub phase: Duration,
    /// Rows of the step's own orders table: enough that the job never ends within the
    /// step (at light load the pace climbs past 40,000 rows/s).
    pub rows: i64,
}

/// The load step's template database.
pub(super) const STEP_TEMPLATE: &str = "frontier_step_template";

/// Width of the load step's timeline buckets.
const STEP_BUCKET: Duration = Duration::from_secs(2);

/// The load step of one round: per [`STEP_BUCKET`] since backfilld started, the offered
/// rate, backfilld's rows per second and pgbench's p99.
#[derive(Debug, Clone, Default)]
pub struct StepTimeline {
    pub offered: Vec<u32>,
    pub rows_per_second: Vec<f64>,
    pub p99_ms: Vec<f64>,
}

/// The load step of one round (see [`LoadStep`]).
pub(super) async fn run_step(
    fixture: &Fixture,
    daemon: &Daemon,
    plan: &FrontierPlan,
    step: LoadStep,
    settings: &[(String, String)],
    work_dir: &std::path::Path,
    round: u32,
) -> anyhow::Result<StepTimeline> {
    let db = "frontier_step";
    fixture.fresh_copy(STEP_TEMPLATE, db)?;
    fixture.psql(db, PREWARM_SQL)?;
    let url = fixture.primary.url(db);
    let conninfo = fixture.primary.conninfo(db);
    let pgbench = fixture.primary.binaries().path("pgbench");
    let start_load = |rate: u32| {
        Load::start_script(
            &pgbench,
            &conninfo,
            ORDERS_SCRIPT,
            &[("orders_rows", step.rows.to_string())],
            plan.clients,
            rate,
        )
    };
    let base = start_load(step.from)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    daemon.migrate(&url)?;
    fixture.psql(db, &orders_job_sql(1))?;
    let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .context("connecting the load step's sampler")?;
    tokio::spawn(connection);
    let log = work_dir.join(format!("frontier-{round}-step.log"));
    let mut child = daemon.spawn(&url, settings, &log)?;
    let started = SystemTime::now();
    let buckets = (3 * step.phase.as_secs()).div_ceil(STEP_BUCKET.as_secs()) as usize;
    let mut done = Vec::with_capacity(buckets + 1);
    let mut extra = None;
    let mut extra_transactions = Vec::new();
    let mut tick = tokio::time::interval(STEP_BUCKET);
    for bucket in 0..=buckets {
        tick.tick().await;
        let at = Duration::from_secs(bucket as u64 * STEP_BUCKET.as_secs());
        if at == step.phase {
            extra = Some(start_load(step.to.saturating_sub(step.from))?);
        }
        if at == 2 * step.phase {
            if let Some(load) = extra.take() {
                extra_transactions = load.stop()?;
            }
        }
        // The job's own counter: one row read, no scan of the table.
        let rows: i64 = client
            .query_opt(
                "SELECT rows_done FROM backfill.jobs WHERE name = 'label_orders'",
                &[],
            )
            .await
            .context("reading the job's rows_done")?
            .map_or(0, |row| row.get(0));
        done.push(rows);
    }
    stop_daemon(&mut child);
    let mut transactions = base.stop()?;
    if let Some(load) = extra {
        extra_transactions = load.stop()?;
    }
    transactions.extend(extra_transactions);
    fixture.drop_database(db)?;
    let origin = epoch_micros(started);
    let width = i64::try_from(STEP_BUCKET.as_micros()).unwrap_or(i64::MAX);
    let mut timeline = StepTimeline::default();
    for (bucket, pair) in done.windows(2).enumerate() {
        let from = Duration::from_secs(bucket as u64 * STEP_BUCKET.as_secs());
        let phase = from.as_secs() / step.phase.as_secs().max(1);
        timeline
            .offered
            .push(if phase == 1 { step.to } else { step.from });
        timeline
            .rows_per_second
            .push((pair[1] - pair[0]) as f64 / STEP_BUCKET.as_secs_f64());
        let window = (
            origin + bucket as i64 * width,
            origin + (bucket as i64 + 1) * width,
        );
        timeline
            .p99_ms
            .push(LatencySummary::over(&transactions, window).map_or(f64::NAN, |s| s.p99_ms));
    }
    Ok(timeline)
}

/// The load step over the rounds as a Markdown table: per bucket, the offered load,
/// backfilld's rows/s and pgbench's p99 (median and range over the rounds); then, per
/// phase, how long rows/s took to settle.
pub fn step_to_markdown(timelines: &[StepTimeline], step: &LoadStep) -> String {
    let mut out = format!(
        "Load step: backfilld's default on a fresh copy of {rows} orders rows next to pgbench at \
         {from} tx/s, then \
         {to} tx/s (a second pgbench adds {extra}), then {from} tx/s again, {phase} s each; \
         per {bucket} s since the daemon started, median (min–max) over {rounds} rounds.\n\n\
         | s | pgbench tx/s | rows/s | pgbench p99 ms |\n|---:|---:|---:|---:|\n",
        rows = step.rows,
        from = step.from,
        to = step.to,
        extra = step.to.saturating_sub(step.from),
        phase = step.phase.as_secs(),
        bucket = STEP_BUCKET.as_secs(),
        rounds = timelines.len(),
    );
    let buckets = timelines
        .iter()
        .map(|t| t.rows_per_second.len())
        .min()
        .unwrap_or(0);
    let column = |of: fn(&StepTimeline) -> &Vec<f64>, bucket: usize| -> Vec<f64> {
        timelines.iter().map(|t| of(t)[bucket]).collect()
    };
    let mut medians = Vec::with_capacity(buckets);
    for bucket in 0..buckets {
        let rows = column(|t| &t.rows_per_second, bucket);
        medians.push(median(&rows).unwrap_or(f64::NAN));
        out.push_str(&format!(
            "| {}–{} | {} | {} | {} |\n",
            bucket as u64 * STEP_BUCKET.as_secs(),
            (bucket as u64 + 1) * STEP_BUCKET.as_secs(),
            timelines[0].offered[bucket],
            median_range(&rows, 0),
            median_range(&column(|t| &t.p99_ms, bucket), 2),
        ));
    }
    let per_phase = (step.phase.as_secs() / STEP_BUCKET.as_secs()).max(1) as usize;
    for (phase, chunk) in medians.chunks(per_phase).enumerate() {
        if let Some(settled) = settling(chunk) {
            out.push_str(&format!(
                "\nPhase {} ({} tx/s): rows/s settled at {:.0} (median of the phase's second \
                 half), within 30 % of it from {} s into the phase.",
                phase + 1,
                if phase == 1 { step.to } else { step.from },
                settled.0,
                settled.1 as u64 * STEP_BUCKET.as_secs(),
            ));
        }
    }
    out.push('\n');
    out
}

/// The settled value of a phase's rows/s (the median of its second half) and the first
/// bucket from which every later one is within 30 % of it.
fn settling(rows_per_second: &[f64]) -> Option<(f64, usize)> {
    let settled = percentile(&rows_per_second[rows_per_second.len() / 2..], 50.0)?;
    let near = |v: f64| (v - settled).abs() <= 0.3 * settled.abs();
    let from = (0..rows_per_second.len())
        .find(|&i| rows_per_second[i..].iter().all(|v| near(*v)))
        .unwrap_or(rows_per_second.len());
    Some((settled, from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_settles_where_it_stays_within_thirty_percent() {
        assert_eq!(
            settling(&[100.0, 500.0, 900.0, 1_000.0, 1_100.0, 1_000.0]),
            Some((1_000.0, 2))
        );
        assert_eq!(settling(&[5.0, 5.0]), Some((5.0, 0)));
        assert_eq!(settling(&[]), None);
    }
}
