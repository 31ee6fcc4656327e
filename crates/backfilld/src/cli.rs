//! The command line: `backfilld [--config FILE] <verb>`.

use std::path::PathBuf;
use std::time::Duration;

use backfill_core::job_spec::{JobSpec, JobTunables};
use clap::{Args, Parser, Subcommand};

/// Safe, throttled, resumable data backfills on live PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "backfilld", version, about)]
pub struct Cli {
    /// Configuration file overriding config/default.toml (then BACKFILLD_* variables apply).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub verb: Verb,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Claim and run backfill jobs until SIGTERM (or until idle).
    Run {
        /// Exit 0 once no unfinished job is left (the Kubernetes Job mode).
        #[arg(long)]
        exit_when_idle: bool,
    },
    /// Install or upgrade schema `backfill` (idempotent).
    Migrate,
    /// Enqueue a job, exactly as an INSERT into backfill.jobs would.
    Enqueue(EnqueueArgs),
    /// Show jobs: state, progress, rate, ETA, throttle, failures.
    Status {
        /// Only this job.
        name: Option<String>,
        /// Machine-readable output (with --watch: one JSON array per line and refresh).
        #[arg(long)]
        json: bool,
        /// Refresh every --interval until every job shown has finished (or Ctrl-C).
        #[arg(long)]
        watch: bool,
        /// Time between refreshes with --watch, e.g. 500ms, 2s.
        #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = positive_duration, requires = "watch")]
        interval: Duration,
    },
    /// Dry run: estimated pending rows, batches, a timed trial batch (rolled back) and the
    /// expected duration; changes nothing.
    Plan {
        /// The job to plan.
        name: String,
        /// Also count the pending rows exactly (reads every pending row once).
        #[arg(long)]
        exact: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Pause a job; workers let go of it within about a second.
    Pause { name: String },
    /// Resume a paused job.
    Resume { name: String },
    /// Cancel a job for good.
    Cancel { name: String },
    /// Re-run a finished job's failed rows (after the data was fixed).
    Retry { name: String },
    /// Enqueue a job that restores the values a finished job with keep_undo changed
    /// (backfill.revert); rows changed since by someone else are left alone and listed.
    Revert {
        /// The job to revert.
        name: String,
        /// First key to revert (inclusive).
        #[arg(long, value_name = "KEY")]
        from: Option<String>,
        /// Last key to revert (inclusive).
        #[arg(long, value_name = "KEY")]
        to: Option<String>,
        /// Overwrite rows changed since the job wrote them, too.
        #[arg(long)]
        force: bool,
    },
    /// Wait for a job to finish: exit 0 if it succeeded, 1 if it failed or was cancelled,
    /// 3 if --timeout passed first.
    Wait {
        /// The job to wait for.
        name: String,
        /// Give up after this long (exit 3), e.g. 90s, 2h; without it, wait for ever.
        #[arg(long, value_name = "DURATION", value_parser = positive_duration)]
        timeout: Option<Duration>,
    },
    /// Run the embedded demo: a throwaway PostgreSQL, a messy users table, a live backfill.
    Demo(DemoArgs),
}

/// A duration above zero: a zero refresh interval would redraw in a busy loop (and
/// tokio's interval panics on it).
fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(duration) if duration.is_zero() => Err("must be more than 0s, e.g. 500ms or 2s".into()),
        Ok(duration) => Ok(duration),
        Err(e) => Err(e.to_string()),
    }
}

/// The job's definition, as columns of backfill.jobs.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    #[command(flatten)]
    pub spec: JobSpec,
    #[command(flatten)]
    pub tunables: JobTunables,
    /// Higher runs first among jobs waiting (default 0).
    #[arg(long, value_name = "N")]
    pub priority: Option<i32>,
    /// Cut the job into this many key-range slices that workers run side by side.
    #[arg(long, value_name = "N")]
    pub parallelism: Option<i32>,
    /// No worker starts the job before this time (RFC 3339, e.g. 2030-01-31T22:00:00Z).
    #[arg(long, value_name = "TIME", value_parser = rfc3339)]
    pub not_before: Option<chrono::DateTime<chrono::Utc>>,
    /// Enqueue the job paused: `backfilld plan` it first, then `backfilld resume` it.
    #[arg(long)]
    pub paused: bool,
}

/// An RFC 3339 timestamp with its offset, e.g. 2030-01-31T22:00:00Z or 2030-02-01T00:00:00+02:00.
fn rfc3339(text: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{e}: expected an RFC 3339 time such as 2030-01-31T22:00:00Z"))
}

/// Options of the demo.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Rows in the demo users table.
    #[arg(long, default_value_t = 300_000)]
    pub rows: i64,
}
