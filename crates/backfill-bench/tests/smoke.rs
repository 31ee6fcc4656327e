//! Keeps the benchmark from rotting: a tiny `--quick` run must complete and print every
//! row of the table. Timings are printed, never asserted.

use std::path::Path;
use std::process::Command;

#[test]
fn a_tiny_quick_run_prints_every_scenario() {
    let bench = Path::new(env!("CARGO_BIN_EXE_backfill-bench"));
    let backfilld = bench.with_file_name("backfilld");
    assert!(
        backfilld.is_file(),
        "{} is missing: build it first (`cargo build -p backfilld`, which scripts/test does)",
        backfilld.display()
    );
    // 5,000 rows: every scenario still runs start to end (scenario 4 through the impact
    // budget's first rest and a few doublings of its pace); a bigger table only makes
    // scenario 4, paced from 1,000 rows/s, take longer. Slice counts 2 and 1 (the default's
    // first two, in its order): the rows checked below; a third count runs the same code.
    let output = Command::new(bench)
        .args(["--rows", "5000", "--quick", "--parallelism", "2,1"])
        .arg("--backfilld")
        .arg(&backfilld)
        .output()
        .expect("run backfill-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "backfill-bench failed ({}):\n{stderr}\n{stdout}",
        output.status
    );
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
