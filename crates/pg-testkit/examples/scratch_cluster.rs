//! Starts a throwaway primary (and, with `--standby`, a streaming standby), prints how to
//! connect, and removes everything when you press Enter or kill the process.
//!
//! ```sh
//! cargo run -p pg-testkit --example scratch_cluster -- --standby
//! ```

use std::io::BufRead;
use std::process::ExitCode;

use pg_testkit::{PgCluster, TestkitError};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), TestkitError> {
    let primary = PgCluster::start_primary()?;
    println!(
        "primary  {}  (data dir {})",
        primary.url("postgres"),
        primary.data_dir().display()
    );
    let standby = if std::env::args().any(|arg| arg == "--standby") {
        let standby = primary.start_standby("scratch_standby")?;
        println!(
            "standby  {}  (data dir {})",
            standby.url("postgres"),
            standby.data_dir().display()
        );
        Some(standby)
    } else {
        None
    };
    println!("press Enter to stop and remove the cluster(s)");
    let _ = std::io::stdin().lock().lines().next();
    // Standby first, so the primary does not log its walsender being cut off.
    drop(standby);
    Ok(())
}
