//! Throwaway PostgreSQL clusters: a primary, and streaming standbys of it.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, OnceLock, PoisonError, TryLockError, Weak};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::binaries::PgBinaries;
use crate::error::TestkitError;
use crate::process::{
    as_server_user, check_server_user_reaches, chown_to_server_user, client_command, log_tail,
    run_captured, server_command, server_user, spawn_tied_to_process, tail_of, RunError,
};

/// Servers listen on this address only: nothing outside the machine can reach them.
const LOOPBACK: &str = "127.0.0.1";
/// The superuser initdb creates; every connection uses it.
const SUPERUSER: &str = "postgres";
/// Longest a server may take to accept connections (crash recovery included).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a new standby may take to show up as streaming on its primary.
const STREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a fast shutdown may take before we escalate.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest an immediate shutdown may take before we SIGKILL.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest initdb or pg_basebackup may run; generous for a loaded 2-core CI box.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// How many free ports to try when another process steals the one we picked.
const PORT_ATTEMPTS: u32 = 5;
/// Pause between readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// PostgreSQL identifiers longer than this are truncated by the server.
const MAX_IDENTIFIER_LEN: usize = 63;

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

/// A throwaway PostgreSQL cluster (primary or standby) on a free loopback port, living in
/// its own temporary directory.
///
/// The server runs as a direct child of this process and is stopped (and its directory
/// removed) when the value is dropped, when the process exits normally, and — through a
/// parent-death signal — even when the process is SIGKILLed.
///
/// Connections use trust authentication as the `postgres` superuser on 127.0.0.1.
///
/// # Example: replication lag on demand
///
/// ```no_run
/// use pg_testkit::PgCluster;
///
/// let primary = PgCluster::start_primary()?;
/// let standby = primary.start_standby("replica_a")?;
/// // Freeze replay on the standby: WAL keeps arriving but is not applied, so
/// // pg_stat_replication on the primary shows growing replay lag.
/// standby.psql("postgres", "select pg_wal_replay_pause()")?;
/// primary.psql("postgres", "create table t as select generate_series(1, 1000) as id")?;
/// let lag = primary.psql(
///     "postgres",
///     "select pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn) \
///        from pg_stat_replication where application_name = 'replica_a'",
/// )?;
/// assert!(lag.parse::<f64>().unwrap() > 0.0);
/// // Let it catch up again.
/// standby.psql("postgres", "select pg_wal_replay_resume()")?;
/// # Ok::<(), pg_testkit::TestkitError>(())
/// ```
pub struct PgCluster {
    inner: Arc<Inner>,
}

struct Inner {
    binaries: PgBinaries,
    layout: Layout,
    port: u16,
    standby_name: Option<String>,
    state: Mutex<State>,
}

struct State {
    postmaster: Option<Postmaster>,
    /// `None` once torn down; dropping it removes the directory.
    dir: Option<TempDir>,
}

/// Where a cluster keeps its files: `root/` holds the log and the unix socket, `root/data`
/// is PGDATA.
struct Layout {
    root: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
}

impl Layout {
    fn create() -> Result<(TempDir, Layout), TestkitError> {
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

impl PgCluster {
    /// A fresh primary: initdb (trust auth on loopback, `-U postgres` superuser, UTF8,
    /// `--no-sync`), wal_level=replica, max_wal_senders=10, hot_standby=on, fsync=off,
    /// listening on 127.0.0.1 only, unix socket in the cluster's own dir, on a free port.
    pub fn start_primary() -> Result<PgCluster, TestkitError> {
        Self::start_primary_with(&[])
    }

    /// Like [`start_primary`](Self::start_primary) but with extra `postgresql.conf` lines,
    /// which override the defaults.
    ///
    /// Values are written quoted and escaped, so pass them raw: `("work_mem", "8MB")`,
    /// `("ssl_cert_file", "/path/server.crt")`. Files the server must read (such as an SSL
    /// key, which PostgreSQL wants owned by the server user with mode 0600) can be handed
    /// over with [`chown_to_server_user`](crate::chown_to_server_user).
    pub fn start_primary_with(settings: &[(&str, &str)]) -> Result<PgCluster, TestkitError> {
        for (name, _) in settings {
            validate_setting_name(name)?;
        }
        let binaries = cached_binaries()?;
        // Fail with the clear "no postgres user" message before touching the disk.
        server_user()?;
        let (dir, layout) = Layout::create()?;
        initdb(&binaries, &layout)?;

        let socket_dir = layout.root.to_string_lossy().into_owned();
        let mut conf: Vec<(&str, &str)> = vec![
            ("listen_addresses", LOOPBACK),
            // Our own dir: the default (/var/run/postgresql) is shared with any system
            // cluster and not writable by every user.
            ("unix_socket_directories", &socket_dir),
            ("wal_level", "replica"),
            ("max_wal_senders", "10"),
            ("max_replication_slots", "10"),
            ("hot_standby", "on"),
            // pg_basebackup -X stream starts streaming a moment after the backup starts; a
            // checkpoint in between (another clone's `-c fast`, heavy writes) may otherwise
            // recycle the WAL it needs ("requested WAL segment ... has already been removed").
            ("wal_keep_size", "256MB"),
            // Throwaway data: durability only costs startup and test time.
            ("fsync", "off"),
            ("shared_buffers", "32MB"),
            ("max_connections", "200"),
            ("log_min_messages", "warning"),
            ("logging_collector", "off"),
            // stderr is redirected to postgres.log, whose tail goes into our errors.
            ("log_destination", "stderr"),
        ];
        conf.extend_from_slice(settings);
        append_conf(&layout.data_dir.join("postgresql.conf"), &conf)?;

        let (postmaster, port) = launch_on_free_port(&binaries, &layout)?;
        Ok(Self::assemble(
            binaries, layout, dir, port, postmaster, None,
        ))
    }

    /// A streaming standby of this primary, made with `pg_basebackup -R`, whose
    /// `primary_conninfo` carries `application_name = name` (so it shows under that name in
    /// `pg_stat_replication`), started on its own free port.
    ///
    /// Returns once `pg_stat_replication` on the primary shows it in state `streaming`.
    /// `name` must be unique among this primary's standbys and consist of ASCII letters,
    /// digits, `_` and `-`. The standby reports its positions every second
    /// (`wal_receiver_status_interval = 1s`) so lag readings on the primary are fresh.
    pub fn start_standby(&self, name: &str) -> Result<PgCluster, TestkitError> {
        validate_standby_name(name)?;
        if !self.is_running() {
            return Err(self.not_running());
        }
        let binaries = self.inner.binaries.clone();
        let (dir, layout) = Layout::create()?;

        let conninfo = format!(
            "host={LOOPBACK} port={} user={SUPERUSER} application_name={name}",
            self.port()
        );
        let pg_basebackup = binaries.path("pg_basebackup");
        let mut command = server_command(&pg_basebackup, &layout.root)?;
        command.arg("-D").arg(&layout.data_dir).args([
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
            "-d",
            &conninfo,
        ]);
        run_tool(
            command,
            pg_basebackup,
            format!(
                "cloning the primary on port {} into {}{}",
                self.port(),
                layout.data_dir.display(),
                as_server_user()
            ),
        )?;

        // The copied postgresql.conf still names the primary's socket dir.
        let socket_dir = layout.root.to_string_lossy().into_owned();
        append_conf(
            &layout.data_dir.join("postgresql.conf"),
            &[
                ("unix_socket_directories", &socket_dir),
                ("hot_standby", "on"),
                ("wal_receiver_status_interval", "1s"),
            ],
        )?;
        // Written last so it wins over whatever pg_basebackup generated: the
        // application_name is what identifies this standby in pg_stat_replication.
        append_conf(
            &layout.data_dir.join("postgresql.auto.conf"),
            &[("primary_conninfo", &conninfo)],
        )?;

        // The port goes on the command line (`-c port=`): a -R clone would otherwise
        // inherit the primary's.
        let (postmaster, port) = launch_on_free_port(&binaries, &layout)?;
        let standby = Self::assemble(
            binaries,
            layout,
            dir,
            port,
            postmaster,
            Some(name.to_owned()),
        );
        standby.wait_until_streaming_from(self, name)?;
        Ok(standby)
    }

    /// The TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@{LOOPBACK}:{}/{}",
            self.port(),
            percent_encode(db)
        )
    }

    /// A libpq key/value connection string for `db`, e.g. for `pgbench` or `psql -d`.
    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host={LOOPBACK} port={} user={SUPERUSER} dbname={} connect_timeout=10",
            self.port(),
            conninfo_quote(db)
        )
    }

    /// Creates a fresh database with a unique name derived from `prefix` (safe for
    /// concurrent tests in one process) and returns its name.
    pub fn create_database(&self, prefix: &str) -> Result<String, TestkitError> {
        let name = unique_database_name(prefix);
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(name)
    }

    /// Runs `sql` through `psql -X -q -v ON_ERROR_STOP=1 -At` on database `db` and returns
    /// its stdout without the final newline.
    ///
    /// The script is fed on stdin, so it may hold several statements (each in its own
    /// transaction unless you write BEGIN/COMMIT), including ones like `CREATE DATABASE`
    /// that cannot run in a transaction block. Rows are printed unaligned, `|`-separated,
    /// one per line; command tags are suppressed. The first failing statement stops the
    /// script and becomes an error carrying psql's stderr.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, TestkitError> {
        let psql = self.inner.binaries.path("psql");
        let mut command = client_command(&psql);
        command
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-d"])
            .arg(self.conninfo(db))
            // Output is decoded as UTF-8, whatever the caller's locale says.
            .env("PGCLIENTENCODING", "UTF8");
        match run_captured(&mut command, Some(sql.as_bytes().to_vec()), None) {
            Ok(out) if out.status.success() => {
                let mut stdout = out.stdout;
                if stdout.ends_with('\n') {
                    stdout.pop();
                }
                Ok(stdout)
            }
            Ok(out) => Err(TestkitError::Psql {
                port: self.port(),
                db: db.to_owned(),
                status: out.status,
                stderr: out.stderr.trim_end().to_owned(),
            }),
            Err(RunError::Spawn(source)) => Err(TestkitError::Spawn {
                binary: psql,
                source,
            }),
            Err(RunError::TimedOut { .. }) => unreachable!("psql runs without a timeout"),
        }
    }

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

    /// The data directory (PGDATA).
    pub fn data_dir(&self) -> &Path {
        &self.inner.layout.data_dir
    }

    /// The server log (postgres' stderr), kept across restarts.
    pub fn log_path(&self) -> &Path {
        &self.inner.layout.log_path
    }

    /// The last few KiB of the server log, for assertion messages.
    pub fn log_tail(&self) -> String {
        log_tail(self.log_path(), 0)
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

    /// For a standby, the application_name it streams under; `None` for a primary.
    pub fn standby_name(&self) -> Option<&str> {
        self.inner.standby_name.as_deref()
    }

    /// The binaries this cluster runs.
    pub fn binaries(&self) -> &PgBinaries {
        &self.inner.binaries
    }

    fn assemble(
        binaries: PgBinaries,
        layout: Layout,
        dir: TempDir,
        port: u16,
        postmaster: Postmaster,
        standby_name: Option<String>,
    ) -> PgCluster {
        let inner = Arc::new(Inner {
            binaries,
            layout,
            port,
            standby_name,
            state: Mutex::new(State {
                postmaster: Some(postmaster),
                dir: Some(dir),
            }),
        });
        register_for_exit_teardown(&inner);
        PgCluster { inner }
    }

    fn wait_until_streaming_from(
        &self,
        primary: &PgCluster,
        name: &str,
    ) -> Result<(), TestkitError> {
        let on_primary = format!(
            "select count(*) from pg_stat_replication \
              where application_name = '{name}' and state = 'streaming'"
        );
        let on_standby = "select count(*) from pg_stat_wal_receiver where status = 'streaming'";
        let started = Instant::now();
        loop {
            if !self.is_running() {
                return Err(TestkitError::ServerExited {
                    port: self.port(),
                    data_dir: self.data_dir().to_path_buf(),
                    status: self
                        .exit_status()
                        .unwrap_or_else(|| ExitStatus::from_raw(0)),
                    log_tail: self.log_tail(),
                });
            }
            if self.psql("postgres", on_standby)? == "1"
                && primary.psql("postgres", &on_primary)? != "0"
            {
                return Ok(());
            }
            if started.elapsed() > STREAM_TIMEOUT {
                return Err(self.timeout_error(
                    format!(
                        "standby {name:?} to stream from the primary on port {}",
                        primary.port()
                    ),
                    STREAM_TIMEOUT,
                ));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn exit_status(&self) -> Option<ExitStatus> {
        self.lock_state().postmaster.as_mut()?.exit_status()
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves State consistent (every field is
        // updated in one assignment), so poisoning is safe to ignore.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn not_running(&self) -> TestkitError {
        TestkitError::NotRunning {
            port: self.port(),
            data_dir: self.data_dir().to_path_buf(),
        }
    }

    fn timeout_error(&self, what: String, waited: Duration) -> TestkitError {
        TestkitError::Timeout {
            what,
            port: self.port(),
            data_dir: self.data_dir().to_path_buf(),
            waited,
            log_tail: self.log_tail(),
        }
    }
}

impl fmt::Debug for PgCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgCluster")
            .field("port", &self.port())
            .field("data_dir", &self.data_dir())
            .field("standby_name", &self.standby_name())
            .finish()
    }
}

impl Drop for PgCluster {
    /// Stops the server immediately and removes the cluster's directory; never panics.
    fn drop(&mut self) {
        let mut state = self.lock_state();
        self.inner.teardown(&mut state);
    }
}

impl Inner {
    fn teardown(&self, state: &mut State) {
        // The server must be gone before its files are removed from under it.
        drop(state.postmaster.take());
        if let Some(dir) = state.dir.take() {
            if let Err(e) = dir.close() {
                // Not eprintln!: that panics if stderr is closed, and this runs in Drop.
                let _ = writeln!(
                    io::stderr(),
                    "pg-testkit: could not remove {}: {e}",
                    self.layout.root.display()
                );
            }
        }
    }
}

/// One primary shared by all tests of a test binary, started on first use and stopped and
/// removed at process exit.
///
/// Isolate tests from each other with [`PgCluster::create_database`].
///
/// # Panics
///
/// If the primary cannot be started, e.g. with instructions to install PostgreSQL when its
/// binaries are absent.
pub fn shared_primary() -> &'static PgCluster {
    static SHARED: OnceLock<PgCluster> = OnceLock::new();
    // Statics are never dropped: the exit-time teardown registered by every cluster is what
    // stops this one.
    SHARED.get_or_init(|| {
        PgCluster::start_primary()
            .unwrap_or_else(|e| panic!("pg-testkit: could not start the shared primary: {e}"))
    })
}

/// Clusters still alive, for teardown when the process exits.
static LIVE: Mutex<Vec<Weak<Inner>>> = Mutex::new(Vec::new());

fn register_for_exit_teardown(inner: &Arc<Inner>) {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // The test harness leaves through libc exit(), which runs atexit hooks but no Rust
        // destructors for statics or leaked values.
        // SAFETY: the hook is a plain extern "C" function that never unwinds.
        unsafe {
            libc::atexit(teardown_live_clusters);
        }
    });
    let mut live = LIVE.lock().unwrap_or_else(PoisonError::into_inner);
    live.retain(|cluster| cluster.strong_count() > 0);
    live.push(Arc::downgrade(inner));
}

extern "C" fn teardown_live_clusters() {
    // Unwinding out of an extern "C" function aborts; swallow any panic instead.
    let _ = std::panic::catch_unwind(|| {
        // try_lock: a thread stuck while holding a lock must not hang process exit. A
        // server we skip still dies by its parent-death signal; only its dir is left.
        let clusters: Vec<Arc<Inner>> = match LIVE.try_lock() {
            Ok(live) => live.iter().filter_map(Weak::upgrade).collect(),
            Err(TryLockError::Poisoned(live)) => {
                live.into_inner().iter().filter_map(Weak::upgrade).collect()
            }
            Err(TryLockError::WouldBlock) => return,
        };
        for cluster in clusters {
            let state = match cluster.state.try_lock() {
                Ok(state) => Some(state),
                Err(TryLockError::Poisoned(state)) => Some(state.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            };
            if let Some(mut state) = state {
                cluster.teardown(&mut state);
            }
        }
    });
}

/// A postmaster that is our direct child.
struct Postmaster {
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
fn launch_on_free_port(
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
    let child = spawn_tied_to_process(command).map_err(|source| TestkitError::Spawn {
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
fn free_port() -> Result<u16, TestkitError> {
    TcpListener::bind((LOOPBACK, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|source| TestkitError::FreePort { source })
}

fn initdb(binaries: &PgBinaries, layout: &Layout) -> Result<(), TestkitError> {
    let initdb = binaries.path("initdb");
    let mut command = server_command(&initdb, &layout.root)?;
    command.arg("-D").arg(&layout.data_dir).args([
        "-U",
        SUPERUSER,
        "--auth=trust",
        "--encoding=UTF8",
        // C collation: identical on every machine, and always installed.
        "--locale=C",
        "--no-sync",
    ]);
    run_tool(
        command,
        initdb,
        format!(
            "initializing {}{}",
            layout.data_dir.display(),
            as_server_user()
        ),
    )
}

/// Runs a short-lived server-side tool to successful completion.
fn run_tool(mut command: Command, binary: PathBuf, context: String) -> Result<(), TestkitError> {
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
fn append_conf(path: &Path, settings: &[(&str, &str)]) -> Result<(), TestkitError> {
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
fn cached_binaries() -> Result<PgBinaries, TestkitError> {
    static FOUND: OnceLock<PgBinaries> = OnceLock::new();
    if let Some(found) = FOUND.get() {
        return Ok(found.clone());
    }
    let found = PgBinaries::locate()?;
    Ok(FOUND.get_or_init(|| found).clone())
}

fn validate_setting_name(name: &str) -> Result<(), TestkitError> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if valid {
        Ok(())
    } else {
        Err(TestkitError::InvalidArgument {
            what: "setting name",
            value: name.to_owned(),
            reason: "expected ASCII letters, digits, '_' and '.'",
        })
    }
}

/// Standby names end up inside SQL literals and conninfo strings unquoted, so only a safe
/// alphabet is accepted.
fn validate_standby_name(name: &str) -> Result<(), TestkitError> {
    let valid = !name.is_empty()
        && name.len() <= MAX_IDENTIFIER_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err(TestkitError::InvalidArgument {
            what: "standby name",
            value: name.to_owned(),
            reason: "expected 1 to 63 ASCII letters, digits, '_' or '-'",
        })
    }
}

/// `prefix` reduced to a lowercase identifier, plus the process id and a process-wide
/// counter, kept within PostgreSQL's 63-byte identifier limit.
fn unique_database_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    let suffix = format!(
        "_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let mut stem: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if !stem.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
        stem.insert_str(0, "db_");
    }
    stem.truncate(MAX_IDENTIFIER_LEN - suffix.len());
    stem + &suffix
}

/// Quotes a conninfo value: single quotes, with `\` and `'` backslash-escaped.
fn conninfo_quote(value: &str) -> String {
    let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
    format!("'{escaped}'")
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub(crate) fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_unique_valid_identifiers() {
        let a = unique_database_name("My Test-DB");
        let b = unique_database_name("My Test-DB");
        assert_ne!(a, b);
        assert!(a.starts_with("my_test_db_"), "{a}");
        let long = unique_database_name(&"x".repeat(200));
        assert!(long.len() <= MAX_IDENTIFIER_LEN, "{long}");
        assert!(unique_database_name("9lives").starts_with("db_9lives_"));
        assert!(unique_database_name("").starts_with("db__"));
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_standby_name("replica-1_a").is_ok());
        assert!(validate_standby_name("").is_err());
        assert!(validate_standby_name("x'; drop").is_err());
        assert!(validate_standby_name(&"a".repeat(64)).is_err());
        assert!(validate_setting_name("auto_explain.log_min_duration").is_ok());
        assert!(validate_setting_name("work_mem = 1; x").is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(conninfo_quote(r"a'b\c"), r"'a\'b\\c'");
        assert_eq!(percent_encode("db 1/ä"), "db%201%2F%C3%A4");
    }
}
