//! backfilld as production runs it: the real release binary as a child process,
//! configured by environment, measured by the kernel's accounting when it exits.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::procfs::{wait_with_usage, ChildUsage};

/// A committed batch, from the daemon's `backfilld::batch` debug line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Batch {
    /// Keys the batch settled.
    pub keys: u64,
    pub duration_ms: f64,
}

/// One `backfilld run --exit-when-idle` from start to exit.
#[derive(Debug, Clone)]
pub struct DaemonRun {
    pub wall: Duration,
    pub usage: ChildUsage,
    pub batches: Vec<Batch>,
}

impl DaemonRun {
    /// The longest committed batch.
    pub fn longest_batch(&self) -> Duration {
        let ms = self
            .batches
            .iter()
            .map(|b| b.duration_ms)
            .fold(0.0, f64::max);
        Duration::from_secs_f64(ms / 1000.0)
    }

    /// The largest committed batch, in keys.
    pub fn largest_batch(&self) -> u64 {
        self.batches.iter().map(|b| b.keys).max().unwrap_or(0)
    }
}

/// The backfilld binary under test.
#[derive(Debug, Clone)]
pub struct Daemon {
    pub binary: PathBuf,
}

impl Daemon {
    /// Installs the `backfill` schema in the database at `url` (`backfilld migrate`).
    pub fn migrate(&self, url: &str) -> anyhow::Result<()> {
        let output = self
            .command(url, &[])
            .arg("migrate")
            .output()
            .with_context(|| format!("running {} migrate", self.binary.display()))?;
        if !output.status.success() {
            bail!(
                "backfilld migrate failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// Runs `backfilld run --exit-when-idle` on `url` with `settings`
    /// (`BACKFILLD_<SECTION>__<KEY>` pairs) until it exits; its log goes to `log`.
    pub fn run(
        &self,
        url: &str,
        settings: &[(String, String)],
        log: &Path,
    ) -> anyhow::Result<DaemonRun> {
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("creating the daemon log {}", log.display()))?;
        let started = Instant::now();
        let mut command = self.command(url, settings);
        command
            .args(["run", "--exit-when-idle"])
            .stdout(log_file.try_clone().context("sharing the daemon log")?)
            .stderr(log_file);
        let child = self.spawn_tied(command)?;
        let usage = wait_with_usage(child)?;
        let wall = started.elapsed();
        let text = std::fs::read_to_string(log)
            .with_context(|| format!("reading the daemon log {}", log.display()))?;
        if !usage.status.success() {
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            bail!(
                "backfilld exited with {}; last log lines:\n{}",
                usage.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        // wait4's ru_maxrss is at least this benchmark's own resident size when it
        // spawned the daemon (the kernel folds the old address space's peak into it at
        // exec); the daemon's own VmHWM, logged as it stops, is its peak alone.
        let own_peak = text.lines().find_map(parse_peak_rss_line);
        Ok(DaemonRun {
            wall,
            usage: ChildUsage {
                peak_rss_bytes: own_peak.unwrap_or(usage.peak_rss_bytes),
                ..usage
            },
            batches: text.lines().filter_map(parse_batch_line).collect(),
        })
    }

    /// Starts `backfilld run` on `url` with `settings` and leaves it running (the caller
    /// stops it with SIGTERM); its log goes to `log`.
    pub fn spawn(
        &self,
        url: &str,
        settings: &[(String, String)],
        log: &Path,
    ) -> anyhow::Result<std::process::Child> {
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("creating the daemon log {}", log.display()))?;
        let mut command = self.command(url, settings);
        command
            .arg("run")
            .stdout(log_file.try_clone().context("sharing the daemon log")?)
            .stderr(log_file);
        self.spawn_tied(command)
    }

    /// Starts the daemon so that it dies with the benchmark: a benchmark stopped by a
    /// signal would otherwise leave it running against a cluster that is gone.
    fn spawn_tied(&self, command: Command) -> anyhow::Result<std::process::Child> {
        pg_testkit::spawn_tied_to_process(command, libc::SIGKILL)
            .with_context(|| format!("starting {}", self.binary.display()))
    }

    /// The daemon's command with a clean environment: only what the benchmark sets.
    fn command(&self, url: &str, settings: &[(String, String)]) -> Command {
        let mut command = Command::new(&self.binary);
        for (key, _) in std::env::vars() {
            if key.starts_with("BACKFILLD_") || key.starts_with("PG") || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        command
            .env("DATABASE_URL", url)
            .env("BACKFILLD_HTTP__LISTEN", "")
            .env("BACKFILLD_WORKER__ID", "bench")
            .env("BACKFILLD_LOG__FORMAT", "json")
            // One line per committed batch: sizes and durations for the report.
            .env(
                "BACKFILLD_LOG__LEVEL",
                "info,backfilld::batch=debug,backfilld::impact=debug",
            )
            .envs(settings.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        command
    }
}

/// The peak RSS the daemon logs as it stops, `None` for any other line.
fn parse_peak_rss_line(line: &str) -> Option<u64> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    if value.get("message")?.as_str()? != "worker stopped" {
        return None;
    }
    value.get("peak_rss_bytes")?.as_u64()
}

/// A `backfilld::batch` JSON log line, `None` for any other line.
fn parse_batch_line(line: &str) -> Option<Batch> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    if value.get("target")?.as_str()? != "backfilld::batch" {
        return None;
    }
    Some(Batch {
        keys: value.get("keys")?.as_u64()?,
        duration_ms: value.get("duration_ms")?.as_f64()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_batch_lines_and_skips_the_rest() {
        let line = r#"{"timestamp":"t","level":"DEBUG","message":"batch committed","batch_size":1000,"keys":1000,"applied":1000,"failed":0,"statements":1,"duration_ms":41.5,"target":"backfilld::batch"}"#;
        assert_eq!(
            parse_batch_line(line),
            Some(Batch {
                keys: 1000,
                duration_ms: 41.5
            })
        );
        assert_eq!(
            parse_batch_line(
                r#"{"level":"INFO","message":"claimed job","target":"backfilld::worker"}"#
            ),
            None
        );
        assert_eq!(parse_batch_line("not json"), None);
    }

    #[test]
    fn reads_the_peak_rss_the_daemon_logs_as_it_stops() {
        let line = r#"{"timestamp":"t","level":"INFO","message":"worker stopped","peak_rss_bytes":10551296,"target":"backfilld"}"#;
        assert_eq!(parse_peak_rss_line(line), Some(10_551_296));
        assert_eq!(
            parse_peak_rss_line(
                r#"{"level":"INFO","message":"worker stopped","target":"backfilld"}"#
            ),
            None
        );
        assert_eq!(
            parse_peak_rss_line(line.replace("worker stopped", "claimed job").as_str()),
            None
        );
    }
}
