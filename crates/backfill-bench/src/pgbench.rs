//! The production stand-in: pgbench running a steady mixed workload at a fixed rate,
//! logging every transaction (`-l`), so latencies can be cut to any time window.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};

use crate::stats::percentile;

/// Reads a user, then touches it: the load that meets the backfill's row locks.
const USERS_SCRIPT: &str = "\
\\set id random(1, :users_rows)
BEGIN;
SELECT full_name, first_name, last_name FROM public.users WHERE id = :id;
UPDATE public.users SET last_seen_at = now() WHERE id = :id;
END;
";

/// Longest a load may run; it is stopped long before, when its window ends.
const MAX_LOAD_SECONDS: u32 = 36_000;

/// The shape of the load.
#[derive(Debug, Clone, Copy)]
pub struct LoadShape {
    /// Transactions per second offered (`-R`), whatever the latency.
    pub rate: u32,
    /// Client sessions (`-c`).
    pub clients: u32,
    /// Rows of `public.users`, for the script's random ids.
    pub users_rows: i64,
}

impl LoadShape {
    /// The load in one line, for the report.
    pub fn describe(&self) -> String {
        format!(
            "pgbench -M prepared -c {} -j 2 -R {}: half `simple-update` (pgbench_accounts), \
             half read-then-update of a random `public.users` row",
            self.clients, self.rate
        )
    }
}

/// One completed pgbench transaction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transaction {
    /// Which script ran: 0 `simple-update`, 1 the users script.
    pub script: u32,
    /// When it completed, in microseconds since the Unix epoch.
    pub completed_at_us: i64,
    /// Latency from its scheduled start (so time queued behind a slow one counts), in ms.
    pub latency_ms: f64,
}

/// A running pgbench; [`Load::stop`] ends it and reads its transaction logs.
pub struct Load {
    child: Child,
    dir: tempfile::TempDir,
}

impl Load {
    /// Starts `pgbench` (from `binary`) against `conninfo` with `shape`.
    pub fn start(binary: &Path, conninfo: &str, shape: LoadShape) -> anyhow::Result<Load> {
        Load::spawn(
            binary,
            conninfo,
            "users.sql",
            USERS_SCRIPT,
            shape.clients,
            shape.rate,
            |script| {
                vec![
                    format!("-Dusers_rows={}", shape.users_rows),
                    "-b".to_string(),
                    "simple-update@1".to_string(),
                    "-f".to_string(),
                    format!("{}@1", script.display()),
                ]
            },
        )
    }

    /// Starts `pgbench` running only `script` (with `-D` variables `vars`) from `clients`
    /// sessions at `rate` transactions per second: the frontier's load (see
    /// [`crate::frontier`]).
    pub fn start_script(
        binary: &Path,
        conninfo: &str,
        script: &str,
        vars: &[(&str, String)],
        clients: u32,
        rate: u32,
    ) -> anyhow::Result<Load> {
        Load::spawn(
            binary,
            conninfo,
            "script.sql",
            script,
            clients,
            rate,
            |path| {
                let mut args: Vec<String> =
                    vars.iter().map(|(k, v)| format!("-D{k}={v}")).collect();
                args.push("-f".to_string());
                args.push(path.display().to_string());
                args
            },
        )
    }

    /// Writes `script` as `script_name` into a fresh log dir and starts `pgbench` with the
    /// options every load shares (prepared statements, per-transaction log, `clients` at
    /// `rate`, at most [`MAX_LOAD_SECONDS`]) and the workload's own, which `workload` builds
    /// from the script's path.
    fn spawn(
        binary: &Path,
        conninfo: &str,
        script_name: &str,
        script: &str,
        clients: u32,
        rate: u32,
        workload: impl FnOnce(&Path) -> Vec<String>,
    ) -> anyhow::Result<Load> {
        let dir = tempfile::Builder::new()
            .prefix("backfill-bench-pgbench-")
            .tempdir()
            .context("creating pgbench's log dir")?;
        let path = dir.path().join(script_name);
        std::fs::write(&path, script).context("writing the pgbench script")?;
        let mut command = Command::new(binary);
        command
            .args(["-n", "-M", "prepared", "-l"])
            .arg(format!("-j{}", clients.clamp(1, 2)))
            .arg(format!("--log-prefix={}", dir.path().join("txn").display()))
            .arg(format!("-c{clients}"))
            .arg(format!("-R{rate}"))
            .arg(format!("-T{MAX_LOAD_SECONDS}"))
            .args(workload(&path))
            .arg(conninfo)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Dies with the benchmark, like the clusters it loads.
        let child = pg_testkit::spawn_tied_to_process(command, libc::SIGKILL)
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Load { child, dir })
    }

    /// The directory pgbench writes its per-transaction logs (`txn.*`) into.
    pub fn log_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Ends the run as its `-T` timer would (SIGALRM: pgbench finishes the transactions
    /// in flight and flushes its logs) and returns every transaction it logged.
    pub fn stop(self) -> anyhow::Result<Vec<Transaction>> {
        let pid = libc::pid_t::try_from(self.child.id()).context("pgbench pid out of range")?;
        // SAFETY: signalling our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGALRM) };
        let output = self
            .child
            .wait_with_output()
            .context("waiting for pgbench")?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() || stderr.contains("aborted") {
            bail!("pgbench failed ({}): {}", output.status, stderr.trim());
        }
        let mut transactions = Vec::new();
        for log in log_files(self.dir.path())? {
            let text = std::fs::read_to_string(&log)
                .with_context(|| format!("reading {}", log.display()))?;
            transactions.extend(text.lines().filter_map(parse_log_line));
        }
        Ok(transactions)
    }
}

fn log_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).context("listing pgbench's logs")? {
        let path = entry.context("listing pgbench's logs")?.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("txn."))
        {
            files.push(path);
        }
    }
    Ok(files)
}

/// Parses `client_id transaction_no time script_no time_epoch time_us [schedule_lag]`;
/// `None` for a transaction that did not complete (skipped or failed).
pub(crate) fn parse_log_line(line: &str) -> Option<Transaction> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let latency_us: f64 = fields.get(2)?.parse().ok()?;
    let script: u32 = fields.get(3)?.parse().ok()?;
    let epoch: i64 = fields.get(4)?.parse().ok()?;
    let micros: i64 = fields.get(5)?.parse().ok()?;
    Some(Transaction {
        script,
        completed_at_us: epoch * 1_000_000 + micros,
        latency_ms: latency_us / 1000.0,
    })
}

/// Microseconds since the Unix epoch, on the clock pgbench's logs use.
pub fn epoch_micros(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The transactions that completed within `window` (epoch microseconds, both ends in).
pub fn within(transactions: &[Transaction], window: (i64, i64)) -> Vec<&Transaction> {
    transactions
        .iter()
        .filter(|t| (window.0..=window.1).contains(&t.completed_at_us))
        .collect()
}

/// Latency and throughput of the transactions that completed within a window.
#[derive(Debug, Clone, Copy)]
pub struct LatencySummary {
    pub tps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// p99 of each script alone: `simple-update`, then the users script.
    pub p99_by_script_ms: [Option<f64>; 2],
}

impl LatencySummary {
    /// Summarizes `transactions` completed within `window` (epoch microseconds).
    pub fn over(transactions: &[Transaction], window: (i64, i64)) -> Option<LatencySummary> {
        let in_window = within(transactions, window);
        let latencies: Vec<f64> = in_window.iter().map(|t| t.latency_ms).collect();
        let p99_of_script = |script: u32| {
            let of_script: Vec<f64> = in_window
                .iter()
                .filter(|t| t.script == script)
                .map(|t| t.latency_ms)
                .collect();
            percentile(&of_script, 99.0)
        };
        let seconds = Duration::from_micros(u64::try_from(window.1 - window.0).ok()?).as_secs_f64();
        Some(LatencySummary {
            tps: latencies.len() as f64 / seconds.max(1e-6),
            p50_ms: percentile(&latencies, 50.0)?,
            p90_ms: percentile(&latencies, 90.0)?,
            p99_ms: percentile(&latencies, 99.0)?,
            max_ms: crate::stats::peak(&latencies)?,
            p99_by_script_ms: [p99_of_script(0), p99_of_script(1)],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rate_limited_log_lines() {
        let t = parse_log_line("3 17 2345 1 1700000000 123456 210").unwrap();
        assert_eq!(t.completed_at_us, 1_700_000_000_123_456);
        assert_eq!(t.script, 1);
        assert_eq!(t.latency_ms, 2.345);
        assert_eq!(parse_log_line("3 18 skipped 1 1700000000 123456 210"), None);
        assert_eq!(parse_log_line(""), None);
    }

    #[test]
    fn summary_counts_only_the_window() {
        let at = |s: i64, ms: f64| Transaction {
            script: 0,
            completed_at_us: s * 1_000_000,
            latency_ms: ms,
        };
        let txns = [
            at(1, 100.0),
            at(2, 1.0),
            at(3, 2.0),
            at(4, 3.0),
            at(9, 100.0),
        ];
        let summary = LatencySummary::over(&txns, (2_000_000, 4_000_000)).unwrap();
        assert_eq!(summary.tps, 1.5);
        assert_eq!(
            (summary.p50_ms, summary.p99_ms, summary.max_ms),
            (2.0, 3.0, 3.0)
        );
        assert!(LatencySummary::over(&txns, (5_000_000, 6_000_000)).is_none());
    }
}
