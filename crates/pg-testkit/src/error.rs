//! The one error type of this crate.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// Everything that can go wrong while setting up or driving a throwaway cluster.
///
/// Every variant carries enough context (binary, port, data dir, stderr or log tail) to
/// diagnose a CI failure from the message alone.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestkitError {
    /// The PostgreSQL binaries could not be found; the message says how to install them.
    #[error("{0}")]
    BinariesNotFound(String),

    /// Running as root, but there is no `postgres` system user to run the server as.
    #[error(
        "running as root, but there is no `postgres` system user to run initdb/postgres as \
         (they refuse to run as root); create one (`useradd --system --create-home postgres`) \
         or run as an unprivileged user"
    )]
    NoServerUser,

    /// Running as root, the `postgres` user could not reach the cluster's directory.
    #[error(
        "the `{user}` user (which runs the server because this process is root) cannot reach \
         {path}: {blocker} is not searchable by it; point TMPDIR at a directory it can \
         reach, such as /tmp"
    )]
    DirNotReachable {
        /// The server user's name.
        user: String,
        /// The directory it needs.
        path: PathBuf,
        /// The ancestor directory that blocks it.
        blocker: PathBuf,
    },

    /// A program could not be started at all.
    #[error("could not start {binary}: {source}")]
    Spawn {
        /// The program we tried to run.
        binary: PathBuf,
        /// Why the OS refused.
        source: io::Error,
    },

    /// A program ran but exited unsuccessfully.
    #[error("{binary} failed ({status}) while {context}; stderr tail:\n{stderr_tail}")]
    CommandFailed {
        /// The program that failed.
        binary: PathBuf,
        /// What it was doing, e.g. "initializing /tmp/pg-testkit-x/data".
        context: String,
        /// Its exit status.
        status: ExitStatus,
        /// The last lines of its stderr (and stdout, for tools that report there).
        stderr_tail: String,
    },

    /// A program did not finish in time and was killed.
    #[error("{binary} did not finish within {timeout:?} while {context}; killed it; output tail:\n{output_tail}")]
    CommandTimedOut {
        /// The program that hung.
        binary: PathBuf,
        /// What it was doing.
        context: String,
        /// How long we waited.
        timeout: Duration,
        /// The last lines of what it printed.
        output_tail: String,
    },

    /// The OS would not hand out a free loopback port.
    #[error("could not reserve a free port on 127.0.0.1: {source}")]
    FreePort {
        /// The OS error.
        source: io::Error,
    },

    /// The server exited while we waited for it to accept connections.
    #[error("postgres on port {port} (data dir {data_dir}) exited during startup ({status}); log tail:\n{log_tail}")]
    ServerExited {
        /// The port it was told to listen on.
        port: u16,
        /// Its data directory.
        data_dir: PathBuf,
        /// Its exit status.
        status: ExitStatus,
        /// The last lines of its log.
        log_tail: String,
    },

    /// The server could not bind its port (another process took it).
    #[error("postgres (data dir {data_dir}) could not bind a loopback port after {attempts} attempt(s), last tried port {port}; log tail:\n{log_tail}")]
    PortUnavailable {
        /// The last port tried.
        port: u16,
        /// Its data directory.
        data_dir: PathBuf,
        /// How many ports were tried.
        attempts: u32,
        /// The last lines of its log.
        log_tail: String,
    },

    /// A bounded wait ran out.
    #[error("timed out after {waited:?} waiting for {what} (port {port}, data dir {data_dir}); log tail:\n{log_tail}")]
    Timeout {
        /// What we were waiting for.
        what: String,
        /// The port of the cluster concerned.
        port: u16,
        /// Its data directory.
        data_dir: PathBuf,
        /// How long we waited.
        waited: Duration,
        /// The last lines of its log.
        log_tail: String,
    },

    /// psql reported an error (connection failure or SQL error).
    #[error("psql on port {port}, database {db:?} failed ({status}); stderr:\n{stderr}")]
    Psql {
        /// The port it connected to.
        port: u16,
        /// The database it connected to.
        db: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr.
        stderr: String,
    },

    /// A file system operation failed.
    #[error("could not {action} {path}: {source}")]
    Io {
        /// What we tried to do, e.g. "create temp dir under".
        action: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },

    /// An argument was rejected before anything was run.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidArgument {
        /// Which argument, e.g. "standby name".
        what: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// The operation needs a running server, but this cluster is stopped.
    #[error("the cluster on port {port} (data dir {data_dir}) is not running")]
    NotRunning {
        /// The cluster's port.
        port: u16,
        /// Its data directory.
        data_dir: PathBuf,
    },

    /// The cluster was already torn down (at process exit) and its directory removed.
    #[error("the cluster on port {port} (data dir {data_dir}) was already torn down")]
    TornDown {
        /// The cluster's port.
        port: u16,
        /// Its (now removed) data directory.
        data_dir: PathBuf,
    },

    /// The TCP proxy could not be set up.
    #[error("TCP proxy for port {target_port}: could not {action}: {source}")]
    Proxy {
        /// The port the proxy forwards to.
        target_port: u16,
        /// What failed, e.g. "bind a loopback port".
        action: &'static str,
        /// The OS error.
        source: io::Error,
    },
}
