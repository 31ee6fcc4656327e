//! What setting up a primary and a standby share: the cluster's private directory, the
//! binaries, running a server-side tool (initdb, pg_basebackup) and appending settings to
//! its configuration files.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

use crate::binaries::PgBinaries;
use crate::error::TestkitError;
use crate::process::{
    check_server_user_reaches, chown_to_server_user, run_captured, tail_of, RunError,
};

/// Longest initdb or pg_basebackup may run; generous for a loaded 2-core CI box.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a cluster keeps its files: `root/` holds the log and the unix socket, `root/data`
/// is PGDATA.
pub(super) struct Layout {
    pub(super) root: PathBuf,
    pub(super) data_dir: PathBuf,
    pub(super) log_path: PathBuf,
}

impl Layout {
    pub(super) fn create() -> Result<(TempDir, Layout), TestkitError> {
        let parent = std::env::temp_dir();
        let dir = tempfile::Builder::new()
            .prefix("pg-testkit-")
            // Private like PGDATA itself: it holds the log and the unix socket.
            .permissions(fs::Permissions::from_mode(0o700))
            .tempdir_in(&parent)
            .map_err(|source| TestkitError::Io {
                action: "create a temp dir under",
                path: parent.clone(),
                source,
            })?;
        // initdb/pg_basebackup create `data` inside it as the server user.
        chown_to_server_user(dir.path())?;
        check_server_user_reaches(dir.path())?;
        let root = dir.path().to_path_buf();
        let layout = Layout {
            data_dir: root.join("data"),
            log_path: root.join("postgres.log"),
            root,
        };
        Ok((dir, layout))
    }
}

/// Runs a short-lived server-side tool to successful completion.
pub(super) fn run_tool(
    mut command: Command,
    binary: PathBuf,
    context: String,
) -> Result<(), TestkitError> {
    match run_captured(&mut command, None, Some(TOOL_TIMEOUT)) {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(TestkitError::CommandFailed {
            binary,
            context,
            status: out.status,
            stderr_tail: tail_of(&format!("{}{}", out.stdout, out.stderr)),
        }),
        Err(RunError::Spawn(source)) => Err(TestkitError::Spawn { binary, source }),
        Err(RunError::TimedOut { output_tail }) => Err(TestkitError::CommandTimedOut {
            binary,
            context,
            timeout: TOOL_TIMEOUT,
            output_tail,
        }),
    }
}

/// Appends `name = 'value'` lines to a configuration file; later lines win over earlier.
pub(super) fn append_conf(path: &Path, settings: &[(&str, &str)]) -> Result<(), TestkitError> {
    let mut text = String::from("\n# Added by pg-testkit.\n");
    for (name, value) in settings {
        // postgresql.conf strings: '' for a quote, and backslash escapes are interpreted.
        let value = value.replace('\\', "\\\\").replace('\'', "''");
        text.push_str(&format!("{name} = '{value}'\n"));
    }
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(|source| TestkitError::Io {
            action: "append settings to",
            path: path.to_path_buf(),
            source,
        })
}

/// Locates the binaries once per process: every cluster uses the same installation.
pub(super) fn cached_binaries() -> Result<PgBinaries, TestkitError> {
    static FOUND: OnceLock<PgBinaries> = OnceLock::new();
    if let Some(found) = FOUND.get() {
        return Ok(found.clone());
    }
    let found = PgBinaries::locate()?;
    Ok(FOUND.get_or_init(|| found).clone())
}
