//! `backfilld demo`: the embedded default. A throwaway primary and streaming
//! standby, a `users` table of messy names, the split-name job from the design
//! enqueued by plain SQL, and this daemon backfilling it with a live progress line.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use backfill_queue::JobStatus;
use indicatif::{ProgressBar, ProgressStyle};
use pg_testkit::demo_data::{users_table_sql, SPLIT_NAME_JOB_SQL};
use pg_testkit::PgCluster;

use crate::cli::DemoArgs;
use crate::settings::Settings;

/// Runs the demo end to end and cleans up.
pub async fn run(mut settings: Settings, args: DemoArgs) -> anyhow::Result<()> {
    if args.rows < 1 {
        anyhow::bail!("--rows must be at least 1, got {}", args.rows);
    }
    println!("backfilld demo: starting a throwaway PostgreSQL primary and streaming standby…");
    let (primary, standby) =
        tokio::task::spawn_blocking(|| -> anyhow::Result<(PgCluster, PgCluster)> {
            let primary = PgCluster::start_primary()?;
            let standby = primary.start_standby("demo_standby")?;
            Ok((primary, standby))
        })
        .await??;
    println!(
        "  primary on 127.0.0.1:{}, standby 'demo_standby' on 127.0.0.1:{}\n  data under {}",
        primary.port(),
        standby.port(),
        primary.data_dir().display()
    );
    println!("creating public.users with {} messy names…", args.rows);
    primary
        .psql("postgres", &users_table_sql(args.rows))
        .context("creating the demo table")?;

    let metrics_port = free_port()?;
    settings.database.url = primary.url("postgres");
    settings.http.listen = format!("127.0.0.1:{metrics_port}");
    settings.http.final_scrape_wait = Duration::ZERO; // nobody scrapes the demo
    settings.throttle.expected_standbys = vec!["demo_standby".to_string()];
    settings.worker.id = "demo-worker".to_string();
    let url = settings.database.url.clone();

    // Schema first, then the job by plain SQL; a second task draws the progress line. Its
    // sessions are named like ours, so the throttle does not take them for production.
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    let control = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.application_name("backfilld-demo"))
        .await?;
    backfill_queue::migrate(&control).await?;
    sqlx::raw_sql(SPLIT_NAME_JOB_SQL)
        .execute(&control)
        .await
        .context("enqueueing the demo job")?;
    println!("enqueued by SQL:{SPLIT_NAME_JOB_SQL}");
    println!("metrics: http://127.0.0.1:{metrics_port}/metrics");
    println!("status:  SELECT * FROM backfill.job_status;\n");
    let started = Instant::now();
    let bar = progress_bar();
    let printer = tokio::spawn(watch_progress(control.clone(), bar.clone()));
    crate::run_daemon(settings, true)
        .await
        .context("the demo daemon failed")?;
    printer.abort();
    let elapsed = started.elapsed();
    let status = JobStatus::fetch(&control, Some("split_full_name"))
        .await?
        .into_iter()
        .next()
        .context("demo job vanished")?;
    let still_pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM public.users WHERE first_name IS NULL")
            .fetch_one(&control)
            .await?;
    show_progress(&bar, &status);
    bar.finish();
    println!(
        "\ndone: job {} is {}: {} rows in {:.1} s ({:.0} rows/s),\n      {} failed rows, {} rows still pending",
        status.name,
        status.state,
        status.rows_done,
        elapsed.as_secs_f64(),
        status.rows_done as f64 / elapsed.as_secs_f64().max(0.001),
        status.failed_rows,
        still_pending
    );
    let sample = sqlx::query_as::<_, (String, Option<String>, Option<String>)>(
        "SELECT full_name, first_name, last_name FROM public.users WHERE id IN (2, 3, 4, 10, 11) ORDER BY id",
    )
    .fetch_all(&control)
    .await?;
    for (full, first, last) in sample {
        println!("  {full:?} -> first_name {first:?}, last_name {last:?}");
    }
    control.close().await;
    println!("stopping the throwaway clusters and removing their data.");
    drop(standby);
    drop(primary);
    anyhow::ensure!(
        status.state == "succeeded",
        "the demo job ended {}",
        status.state
    );
    Ok(())
}

/// The live progress line, never wider than the terminal: indicatif cuts the message to
/// the width left after the name and the bar (and draws nothing when stdout is not a
/// terminal).
fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(100);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:16}] {wide_msg}")
            .expect("a valid progress template")
            .progress_chars("#> "),
    );
    bar
}

/// Redraws the live progress line every 250 ms.
async fn watch_progress(control: sqlx::PgPool, bar: ProgressBar) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    loop {
        ticker.tick().await;
        if let Some(status) = JobStatus::fetch(&control, Some("split_full_name"))
            .await?
            .into_iter()
            .next()
        {
            show_progress(&bar, &status);
        }
    }
}

/// Sets the bar to the job's progress; the message (percent, rows, the throttle's state
/// or the job's, rate, ETA, batch size) loses its least telling tail on a narrow terminal.
fn show_progress(bar: &ProgressBar, s: &JobStatus) {
    let percent = s.percent.unwrap_or(0.0);
    bar.set_prefix(s.name.clone());
    bar.set_position(percent.round().clamp(0.0, 100.0) as u64);
    bar.set_message(format!(
        "{percent:.1}% {} rows {} {}/s ETA {} batch {}",
        s.rows_done,
        match (&s.throttle_state, &s.throttle_reason) {
            (Some(state), Some(reason)) => format!("{state}: {reason}"),
            (Some(state), None) => state.clone(),
            _ => s.state.clone(),
        },
        s.rows_per_second.map_or("-".into(), |r| format!("{r:.0}")),
        s.eta_seconds.map_or("-".into(), |e| format!("{e:.0}s")),
        s.batch_size.map_or("-".into(), |b| b.to_string()),
    ));
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}
