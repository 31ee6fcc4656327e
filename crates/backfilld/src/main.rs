//! backfilld: runs large data backfills against live PostgreSQL safely.
//!
//! `main` reads the command line and configuration, then hands over to the
//! verb. `run_daemon` below is the daemon's whole life in one screen.

mod batches_in_flight;
mod cli;
mod commands;
mod database;
#[cfg(feature = "demo")]
mod demo;
mod health_monitor;
mod log_escape;
mod redact;
mod settings;
mod shutdown;

mod telemetry;
mod undo;
mod webhook;
mod worker;

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;

use crate::batches_in_flight::BatchesInFlight;
use crate::cli::{Cli, Verb};
use crate::commands::CliFailure;
use crate::database::Database;
use crate::health_monitor::HealthMonitor;
use crate::settings::{LogFormat, Settings};
use crate::shutdown::Shutdown;
use crate::telemetry::gauges::DaemonGauges;
use crate::worker::Worker;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print to stdout and exit 0.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprintln!("backfilld: {}", usage_error_line(&e));
            return ExitCode::from(2);
        }
    };
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("backfilld: {e}");
            return ExitCode::from(2);
        }
    };
    let format = settings.log.format;
    let mut log = settings.log.clone();
    if matches!(cli.verb, Verb::Demo(_)) {
        // The demo draws a progress line instead, on a throwaway cluster it runs as the
        // superuser: only errors may interrupt it.
        log.level = "error".to_string();
    }
    telemetry::init_logging(&log);
    redact::exit_on_panic(redact::passwords(
        std::iter::once(&settings.database.url).chain(&settings.throttle.replica_urls),
    ));
    for name in &settings.ignored_variables {
        tracing::warn!(
            variable = %name,
            "ignoring the environment variable: it is not BACKFILLD_<SECTION>__<KEY>"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            report_exit(format, &format!("cannot start the async runtime: {e}"), 1);
            return ExitCode::from(1);
        }
    };
    let outcome = runtime.block_on(async move {
        match cli.verb {
            Verb::Run { exit_when_idle } => run_daemon(settings, exit_when_idle)
                .await
                .map_err(CliFailure::from_daemon),
            #[cfg(feature = "demo")]
            Verb::Demo(args) => demo::run(settings, args)
                .await
                .map_err(CliFailure::from_daemon),
            #[cfg(not(feature = "demo"))]
            Verb::Demo(_) => Err(CliFailure::Usage(
                "this backfilld was built without the demo (cargo feature `demo`, on by default; \
                 container images leave it out): run `cargo run --release -p backfilld -- demo` \
                 from a source checkout"
                    .to_string(),
            )),
            verb => commands::run(verb, settings).await,
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliFailure::Usage(message)) => {
            report_exit(format, &message, 2);
            ExitCode::from(2)
        }
        Err(CliFailure::TimedOut(message)) => {
            eprintln!("backfilld: {message}");
            ExitCode::from(3)
        }
        Err(CliFailure::Fatal(e)) => {
            // Each cause once: many errors already quote their source in their own text.
            report_exit(format, &backfill_dataplane::error_chain(e.as_ref()), 1);
            ExitCode::from(1)
        }
    }
}

/// Prints the error a verb exits with on stderr: `backfilld: <message>` for text logs, one
/// JSON object like the log lines' (timestamp, level, target, message, exit_code) for JSON
/// logs, so a log pipeline parses the reason a pod died like every other line.
fn report_exit(format: LogFormat, message: &str, exit_code: u8) {
    match format {
        LogFormat::Text => eprintln!("backfilld: {message}"),
        LogFormat::Json => eprintln!(
            "{}",
            serde_json::json!({
                "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                "level": "ERROR",
                "target": "backfilld",
                "message": message,
                "exit_code": exit_code,
            })
        ),
    }
}

/// clap's usage error on one line, like every other error exiting 2: its message
/// without the usage block clap draws under it.
fn usage_error_line(e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let message: Vec<&str> = rendered
        .lines()
        .take_while(|line| !line.starts_with("Usage:"))
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("For more information"))
        .collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    format!("{message} (see backfilld --help)")
}

/// The daemon: connect, migrate, serve metrics, probe health, work the queue
/// until SIGTERM (or idle), let go of everything, exit 0.
async fn run_daemon(settings: Settings, exit_when_idle: bool) -> anyhow::Result<()> {
    let shutdown = Shutdown::on_signals().context("installing signal handlers")?;
    let metrics = telemetry::install_metrics(settings.http.metrics_idle_timeout())
        .map_err(anyhow::Error::msg)?;
    let db = Database::connect(&settings.database, &settings.data_plane_session()).await?;
    db.check_probes_can_see(settings.throttle.allow_blind)
        .await?;
    backfill_queue::migrate(&db.control)
        .await
        .context("applying the backfill schema")?;
    if !settings.http.listen.is_empty() {
        let address = telemetry::serve_http(&settings.http.listen, metrics, db.control.clone())
            .await
            .map_err(anyhow::Error::msg)?;
        tracing::info!(%address, "serving /metrics, /healthz, /readyz");
    }
    let batches = Arc::new(BatchesInFlight::default());
    let (health, monitor) =
        HealthMonitor::spawn(&settings.throttle, &db, &batches, shutdown.clone())?;
    let gauges = DaemonGauges {
        control: db.control.clone(),
        interval: settings.throttle.probe_interval,
        max_lag: settings.throttle.max_lag,
        max_lag_bytes: settings.throttle.max_lag_bytes,
        undo_retention: settings.undo.retention(),
    }
    .spawn(shutdown.clone());
    let worker = Arc::new(Worker {
        queue: backfill_queue::Queue::new(db.control.clone()),
        runner: db.batch_runner(&settings.batch),
        worker_id: settings.worker.worker_id(),
        instance: uuid::Uuid::new_v4(),
        settings: Arc::new(settings.worker_sections()),
        health,
        batches,
        driving: Default::default(),
        work_signal: Default::default(),
    });
    tracing::info!(worker = %worker.worker_id, database = %db.redacted_url, "worker started");
    let webhook = webhook::spawn(&settings.events, db.control.clone());
    worker.run(shutdown.clone(), exit_when_idle).await;
    if let Some(webhook) = webhook {
        // Inside Kubernetes' grace period after SIGTERM; a whole attempt otherwise.
        let bound = if shutdown.is_triggered() {
            std::time::Duration::from_secs(2)
        } else {
            settings.events.webhook_timeout + std::time::Duration::from_secs(1)
        };
        webhook.finish(bound).await;
    }
    if exit_when_idle && !shutdown.is_triggered() && !settings.http.listen.is_empty() {
        telemetry::gauges::report_queue_state(&db.control).await;
        telemetry::await_final_scrape(settings.http.final_scrape_wait).await;
    }
    // Stop probing before the pools close under it.
    for task in [monitor, gauges] {
        task.abort();
        let _ = task.await;
    }
    db.data.close();
    db.control.close().await;
    tracing::info!(
        peak_rss_bytes = telemetry::peak_rss_bytes(),
        "worker stopped"
    );
    Ok(())
}
