//! The server process: a postmaster that is our direct child, launched on a free port and
//! waited for, and [`PgCluster`]'s stop, start and liveness on top of it.

use std::fs::{self, OpenOptions};
use std::net::TcpListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::setup::Layout;
use super::{PgCluster, LOOPBACK, POLL_INTERVAL, SUPERUSER};
use crate::binaries::PgBinaries;
use crate::error::TestkitError;
use crate::process::{client_command, log_tail, server_command, spawn_tied_to_process};

/// Longest a server may take to accept connections (crash recovery included).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a fast shutdown may take before we escalate.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest an immediate shutdown may take before we SIGKILL.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How many free ports to try when another process steals the one we picked.
const PORT_ATTEMPTS: u32 = 5;

/// How to stop a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect clients, roll back open transactions, checkpoint and exit
    /// (`pg_ctl stop -m fast`).
    Fast,
    /// Quit at once without a checkpoint, like a crash; the next start runs crash recovery
    /// (`pg_ctl stop -m immediate`).
    Immediate,
}

impl StopMode {
    /// The signal `pg_ctl` would send the postmaster for this mode.
    fn signal(self) -> libc::c_int {
        match self {
            StopMode::Fast => libc::SIGINT,
            StopMode::Immediate => libc::SIGQUIT,
        }
    }
}

impl PgCluster {
    /// Stops the server (a no-op if it is not running), waiting until it has exited.
    ///
    /// Sends the postmaster the same signal `pg_ctl stop -m fast|immediate` would; the data
    /// directory and port are kept for [`start`](Self::start).
    pub fn stop(&self, mode: StopMode) -> Result<(), TestkitError> {
        let mut state = self.lock_state();
        let Some(mut postmaster) = state.postmaster.take() else {
            return Ok(());
        };
        let timeout = match mode {
            StopMode::Fast => STOP_TIMEOUT,
            StopMode::Immediate => QUIT_TIMEOUT,
        };
        if postmaster.shut_down(mode, timeout).is_some() {
            return Ok(());
        }
        // Dropping escalates to SIGKILL so the port and data dir are free afterwards.
        drop(postmaster);
        Err(self.timeout_error(format!("{mode:?} shutdown of the server"), timeout))
    }

    /// Starts the server again on the same port and data directory (a no-op if it is
    /// running), returning once it accepts connections.
    ///
    /// After an immediate stop this includes crash recovery. A standby resumes streaming on
    /// its own shortly after.
    pub fn start(&self) -> Result<(), TestkitError> {
        let mut state = self.lock_state();
        if state.dir.is_none() {
            return Err(TestkitError::TornDown {
                port: self.port(),
                data_dir: self.data_dir().to_path_buf(),
            });
        }
        if let Some(postmaster) = &mut state.postmaster {
            if postmaster.exit_status().is_none() {
                return Ok(());
            }
        }
        state.postmaster = None;
        match launch(&self.inner.binaries, &self.inner.layout, self.port()) {
            Ok(postmaster) => {
                state.postmaster = Some(postmaster);
                Ok(())
            }
            // The port must stay the same (URLs were handed out), so no retry elsewhere.
            Err(LaunchError::PortInUse { log_tail }) => Err(TestkitError::PortUnavailable {
                port: self.port(),
                data_dir: self.data_dir().to_path_buf(),
                attempts: 1,
                log_tail,
            }),
            Err(LaunchError::Other(e)) => Err(e),
        }
    }

    /// Simulates a crash: immediate stop, then start (with crash recovery).
    pub fn restart_immediate(&self) -> Result<(), TestkitError> {
        self.stop(StopMode::Immediate)?;
        self.start()
    }

    /// The postmaster's process id, or `None` while stopped.
    pub fn pid(&self) -> Option<u32> {
        let mut state = self.lock_state();
        let postmaster = state.postmaster.as_mut()?;
        postmaster.exit_status().is_none().then(|| postmaster.pid())
    }

    /// Whether the server process is alive (it may still be starting or recovering).
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    pub(super) fn exit_status(&self) -> Option<ExitStatus> {
        self.lock_state().postmaster.as_mut()?.exit_status()
    }
}

/// A postmaster that is our direct child.
pub(super) struct Postmaster {
    child: Child,
    exited: Option<ExitStatus>,
}

impl Postmaster {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status once the process has exited (reaping it), else `None`.
    fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = match self.child.try_wait() {
                Ok(status) => status,
                // Someone else reaped it: it is gone either way, and its pid must not be
                // signalled any more.
                Err(_) => Some(ExitStatus::from_raw(0)),
            };
        }
        self.exited
    }

    /// Signals the postmaster as `mode` asks and waits up to `timeout` for it to exit.
    fn shut_down(&mut self, mode: StopMode, timeout: Duration) -> Option<ExitStatus> {
        self.send(mode.signal());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn send(&mut self, signal: libc::c_int) {
        // Only while unreaped: until we reap it, the pid cannot belong to anyone else.
        if self.exit_status().is_none() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(self.pid() as libc::pid_t, signal);
            }
        }
    }
}

impl Drop for Postmaster {
    fn drop(&mut self) {
        if self.shut_down(StopMode::Immediate, QUIT_TIMEOUT).is_none() {
            self.send(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

enum LaunchError {
    /// Another process holds the port; worth retrying on a different one.
    PortInUse {
        log_tail: String,
    },
    Other(TestkitError),
}

impl From<TestkitError> for LaunchError {
    fn from(e: TestkitError) -> Self {
        LaunchError::Other(e)
    }
}

/// Starts the server on a fresh free port, retrying when the port is taken between our
/// probe and postgres' bind.
pub(super) fn launch_on_free_port(
    binaries: &PgBinaries,
    layout: &Layout,
) -> Result<(Postmaster, u16), TestkitError> {
    let mut last_failure = (0, String::new());
    for _ in 0..PORT_ATTEMPTS {
        let port = free_port()?;
        match launch(binaries, layout, port) {
            Ok(postmaster) => return Ok((postmaster, port)),
            Err(LaunchError::PortInUse { log_tail }) => last_failure = (port, log_tail),
            Err(LaunchError::Other(e)) => return Err(e),
        }
    }
    Err(TestkitError::PortUnavailable {
        port: last_failure.0,
        data_dir: layout.data_dir.clone(),
        attempts: PORT_ATTEMPTS,
        log_tail: last_failure.1,
    })
}

/// Runs `postgres` as a direct child (not daemonized by `pg_ctl start`, which would escape
/// the parent-death signal) and waits until it accepts connections.
fn launch(binaries: &PgBinaries, layout: &Layout, port: u16) -> Result<Postmaster, LaunchError> {
    let log_start = fs::metadata(&layout.log_path).map_or(0, |m| m.len());
    let open_log = || {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&layout.log_path)
            .map_err(|source| TestkitError::Io {
                action: "open log file",
                path: layout.log_path.clone(),
                source,
            })
    };
    let postgres = binaries.path("postgres");
    let mut command = server_command(&postgres, &layout.root)?;
    command
        .arg("-D")
        .arg(&layout.data_dir)
        .arg("-c")
        .arg(format!("port={port}"))
        .stdin(Stdio::null())
        .stdout(open_log()?)
        .stderr(open_log()?)
        // Its own process group, so a Ctrl-C meant for the test run does not fast-stop the
        // server behind our back; our own death is covered by the parent-death signal.
        .process_group(0);
    let child =
        spawn_tied_to_process(command, libc::SIGQUIT).map_err(|source| TestkitError::Spawn {
            binary: postgres,
            source,
        })?;
    let mut postmaster = Postmaster {
        child,
        exited: None,
    };

    let started = Instant::now();
    loop {
        if let Some(status) = postmaster.exit_status() {
            let log_tail = log_tail(&layout.log_path, log_start);
            if log_tail.contains("Address already in use") {
                return Err(LaunchError::PortInUse { log_tail });
            }
            return Err(LaunchError::Other(TestkitError::ServerExited {
                port,
                data_dir: layout.data_dir.clone(),
                status,
                log_tail,
            }));
        }
        if pid_file_says_ready(&layout.data_dir, postmaster.pid()) && is_ready(binaries, port) {
            return Ok(postmaster);
        }
        if started.elapsed() > START_TIMEOUT {
            return Err(LaunchError::Other(TestkitError::Timeout {
                what: "postgres to accept connections".into(),
                port,
                data_dir: layout.data_dir.clone(),
                waited: START_TIMEOUT,
                log_tail: log_tail(&layout.log_path, log_start),
            }));
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Whether `postmaster.pid` in `data_dir` is our postmaster's and reports it ready (what
/// `pg_ctl start -w` checks). Unlike probing the port alone, this cannot be fooled by some
/// other server that holds our port while ours fails to bind it.
fn pid_file_says_ready(data_dir: &Path, pid: u32) -> bool {
    let Ok(text) = fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return false;
    };
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    // Line 1: postmaster pid; line 8: status ("starting", "ready", "standby", "stopping").
    lines.first() == Some(&pid.to_string().as_str()) && lines.get(7) == Some(&"ready")
}

/// Whether the server on `port` accepts connections over TCP, per `pg_isready`.
fn is_ready(binaries: &PgBinaries, port: u16) -> bool {
    client_command(&binaries.path("pg_isready"))
        .args([
            "-q", "-h", LOOPBACK, "-U", SUPERUSER, "-d", "postgres", "-t", "5",
        ])
        .arg("-p")
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// A port that was free a moment ago.
///
/// Bind-then-close leaves a window in which another process may take the port; `launch`
/// detects that ("Address already in use") and the caller retries with a new one.
pub(crate) fn free_port() -> Result<u16, TestkitError> {
    TcpListener::bind((LOOPBACK, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|source| TestkitError::FreePort { source })
}
