//! What a daemon with nothing to backfill costs the primary: the CPU its sessions'
//! backends use while it only watches (the health probe, the canary, heartbeats, polling
//! for jobs), next to a light pgbench so that it shares the primary as in production.
//! Issue 19: whatever the impact budget reads must not itself load the primary.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context as _};

use crate::daemon::Daemon;
use crate::fixture::Fixture;
use crate::frontier::stop_daemon;
use crate::pgbench::{Load, LoadShape};
use crate::procfs::process_cpu_seconds;
use crate::scenarios::expected_standby_setting;
use crate::stats::{median, peak};

/// What to run: each binary, `rounds` times in turn, measured over `window` after
/// `warmup` (its start-up rest and first connections), next to `load`.
pub struct IdleCostPlan {
    pub binaries: Vec<PathBuf>,
    pub rounds: u32,
    pub warmup: Duration,
    pub window: Duration,
    pub load: LoadShape,
}

/// One binary's runs.
pub struct IdleCost {
    pub binary: PathBuf,
    /// The daemon's sessions on the primary, per round.
    pub backends: Vec<usize>,
    /// Their backends' CPU over the window, in shares of one CPU, per round.
    pub cpu_shares: Vec<f64>,
}

/// Runs the plan on a fresh copy of `template` per run (its users table is what pgbench
/// works on); the daemons log into `work_dir`.
pub async fn run(
    fixture: &Fixture,
    template: &str,
    plan: &IdleCostPlan,
    work_dir: &Path,
) -> anyhow::Result<Vec<IdleCost>> {
    let mut costs: Vec<IdleCost> = plan
        .binaries
        .iter()
        .map(|binary| IdleCost {
            binary: binary.clone(),
            backends: Vec::new(),
            cpu_shares: Vec::new(),
        })
        .collect();
    for round in 1..=plan.rounds {
        // Binaries alternate within a round, so a noisy minute touches them alike.
        for (index, cost) in costs.iter_mut().enumerate() {
            let log = work_dir.join(format!("idle-cost-{round}-{index}.log"));
            let (backends, share) = run_one(fixture, template, plan, &cost.binary, &log)
                .await
                .with_context(|| {
                    format!("idle cost of {}, round {round}", cost.binary.display())
                })?;
            eprintln!(
                "backfill-bench:   idle {} round {round}: {backends} sessions, {:.2} % of one CPU",
                cost.binary.display(),
                share * 100.0
            );
            cost.backends.push(backends);
            cost.cpu_shares.push(share);
        }
    }
    Ok(costs)
}

/// One idle daemon: its sessions on the primary and their backends' CPU share.
async fn run_one(
    fixture: &Fixture,
    template: &str,
    plan: &IdleCostPlan,
    binary: &Path,
    log: &Path,
) -> anyhow::Result<(usize, f64)> {
    let db = "idle_cost";
    fixture.fresh_copy(template, db)?;
    let url = fixture.primary.url(db);
    let daemon = Daemon {
        binary: binary.to_path_buf(),
    };
    daemon.migrate(&url)?;
    let pgbench = fixture.primary.binaries().path("pgbench");
    let load = Load::start(&pgbench, &fixture.primary.conninfo(db), plan.load)?;
    let mut child = daemon.spawn(&url, &[expected_standby_setting()], log)?;
    let measured = async {
        tokio::time::sleep(plan.warmup).await;
        let before = daemon_backends_cpu(fixture)?;
        tokio::time::sleep(plan.window).await;
        let after = daemon_backends_cpu(fixture)?;
        let pids = |cpu: &[(u32, f64)]| cpu.iter().map(|(pid, _)| *pid).collect::<Vec<_>>();
        ensure!(
            pids(&before) == pids(&after),
            "the daemon's sessions changed during the window ({:?}, then {:?}): \
             lengthen the warm-up",
            pids(&before),
            pids(&after)
        );
        let used: f64 =
            after.iter().map(|(_, s)| s).sum::<f64>() - before.iter().map(|(_, s)| s).sum::<f64>();
        Ok((after.len(), used / plan.window.as_secs_f64()))
    }
    .await;
    stop_daemon(&mut child);
    load.stop()?;
    fixture.drop_database(db)?;
    measured
}

/// The backends of the daemon's sessions (application_name backfilld…), sorted by pid,
/// with the CPU each has used so far.
fn daemon_backends_cpu(fixture: &Fixture) -> anyhow::Result<Vec<(u32, f64)>> {
    let pids = fixture.psql(
        "postgres",
        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'backfilld%' ORDER BY pid",
    )?;
    pids.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let pid: u32 = line
                .trim()
                .parse()
                .with_context(|| format!("a backend pid, not {line:?}"))?;
            let cpu = process_cpu_seconds(pid)
                .with_context(|| format!("backend {pid} went away while being read"))?;
            Ok((pid, cpu))
        })
        .collect()
}

/// The runs as a Markdown table: per binary, sessions and CPU share (median, range).
pub fn to_markdown(costs: &[IdleCost], plan: &IdleCostPlan) -> String {
    let mut out = format!(
        "An idle daemon (nothing to backfill) next to {}; its sessions' backends' CPU over \
         {} s after {} s of warm-up, {} round(s), binaries alternating.\n\n\
         | backfilld | sessions | primary CPU, % of one CPU: median (range) |\n|---|---|---|\n",
        plan.load.describe(),
        plan.window.as_secs(),
        plan.warmup.as_secs(),
        plan.rounds
    );
    for cost in costs {
        let percent: Vec<f64> = cost.cpu_shares.iter().map(|s| s * 100.0).collect();
        let low = percent.iter().copied().reduce(f64::min).unwrap_or(f64::NAN);
        let high = peak(&percent).unwrap_or(f64::NAN);
        let sessions: Vec<String> = cost.backends.iter().map(usize::to_string).collect();
        out.push_str(&format!(
            "| {} | {} | {:.2} ({low:.2}–{high:.2}) |\n",
            cost.binary.display(),
            sessions.join(", "),
            median(&percent).unwrap_or(f64::NAN)
        ));
    }
    out
}
