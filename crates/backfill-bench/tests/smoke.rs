//! Keeps the benchmark from rotting: a tiny `--quick` run must complete and print every
//! row of the table. Timings are printed, never asserted.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The backfilld binary next to the benchmark's.
fn backfilld() -> PathBuf {
    let backfilld = Path::new(env!("CARGO_BIN_EXE_backfill-bench")).with_file_name("backfilld");
    assert!(
        backfilld.is_file(),
        "{} is missing: build it first (`cargo build -p backfilld`, which scripts/test does)",
        backfilld.display()
    );
    backfilld
}

/// Runs the benchmark with `args` on [`backfilld`] and returns what it printed; it must
/// succeed.
fn run_bench(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_backfill-bench"))
        .args(args)
        .arg("--backfilld")
        .arg(backfilld())
        .output()
        .expect("run backfill-bench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "backfill-bench failed ({}):\n{}\n{stdout}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn a_tiny_quick_run_prints_every_scenario() {
    // 5,000 rows: every scenario still runs start to end (scenario 4 through the impact
    // budget's first rest and a few doublings of its pace); a bigger table only makes
    // scenario 4, paced from 1,000 rows/s, take longer. Slice counts 2 and 1 (the default's
    // first two, in its order): the rows checked below; a third count runs the same code.
    let stdout = run_bench(&["--rows", "5000", "--quick", "--parallelism", "2,1"]);
    for row in [
        "| 1. single UPDATE |",
        "| 2. PL/pgSQL loop",
        "| 3. backfilld, limits off, = ANY(:keys), 1 slice |",
        "| 3. backfilld, limits off, = ANY(:keys), 2 slices |",
        "| 3. backfilld, limits off, BETWEEN :first_key AND :last_key, 1 slice |",
        "| 3. backfilld, limits off, BETWEEN :first_key AND :last_key, 2 slices |",
        "| 4. backfilld, default throttle",
        "| pgbench alone (baseline) |",
        "| 3. backfilld at its best settings (",
        "| target | measured | met |",
    ] {
        assert!(stdout.contains(row), "no {row:?} in:\n{stdout}");
    }
}

/// The idle-cost scenario (not in `--quick` unless named): one short round must complete
/// and print its row, with the daemon's sessions found on the primary.
#[test]
fn a_short_idle_cost_run_prints_its_row() {
    let stdout = run_bench(&[
        "--rows",
        "1000",
        "--quick",
        "--only",
        "idle-cost",
        "--idle-cost-rounds",
        "1",
        "--idle-cost-window",
        "2",
    ]);
    assert!(
        stdout.contains("### What an idle daemon costs the primary"),
        "no idle-cost section in:\n{stdout}"
    );
    let backfilld = backfilld();
    let row = stdout
        .lines()
        .find(|line| line.starts_with(&format!("| {} |", backfilld.display())))
        .unwrap_or_else(|| panic!("no row for {} in:\n{stdout}", backfilld.display()));
    let sessions: usize = row
        .split('|')
        .nth(2)
        .unwrap_or("")
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(sessions > 0, "the daemon's sessions were not found: {row}");
}
