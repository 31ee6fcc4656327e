//! Running PostgreSQL programs: as which user, with which environment, from which thread,
//! and with bounded waits.

use std::ffi::{CStr, CString, OsStr};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::TestkitError;

/// How much of a log or stderr to quote in errors.
const TAIL_BYTES: u64 = 4096;

/// The system user server-side programs run as when we are root.
#[derive(Debug)]
pub(crate) struct ServerUser {
    uid: u32,
    gid: u32,
    name: String,
    home: PathBuf,
}

/// The user initdb/postgres/pg_ctl/pg_basebackup must run as: `None` means ourselves.
///
/// These programs refuse to run as root, so a root process (CI containers) runs them as the
/// `postgres` system user instead.
pub(crate) fn server_user() -> Result<Option<&'static ServerUser>, TestkitError> {
    static USER: OnceLock<Result<Option<ServerUser>, ()>> = OnceLock::new();
    let user = USER.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        lookup_user("postgres").map(Some).ok_or(())
    });
    match user {
        Ok(user) => Ok(user.as_ref()),
        Err(()) => Err(TestkitError::NoServerUser),
    }
}

fn lookup_user(name: &str) -> Option<ServerUser> {
    let c_name = CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: passwd is plain old data; getpwnam_r fills it with pointers into `buf`,
        // which outlives every use below.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        // SAFETY: on success pw_dir points to a NUL-terminated string inside `buf`.
        let home = unsafe { CStr::from_ptr(pwd.pw_dir) };
        return Some(ServerUser {
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            name: name.to_owned(),
            home: PathBuf::from(OsStr::from_bytes(home.to_bytes())),
        });
    }
}

/// " as user `postgres`" when server programs run as another user, else "", for error
/// contexts: permission problems are otherwise puzzling.
pub(crate) fn as_server_user() -> String {
    match server_user() {
        Ok(Some(user)) => format!(" as user `{}`", user.name),
        _ => String::new(),
    }
}

/// Gives `path` to the server user (a no-op unless we run as root), so that postgres can
/// write into directories we created or read files we wrote.
pub(crate) fn chown_to_server_user(path: &Path) -> Result<(), TestkitError> {
    if let Some(user) = server_user()? {
        std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid)).map_err(|source| {
            TestkitError::Io {
                action: "chown to the postgres user",
                path: path.to_path_buf(),
                source,
            }
        })?;
    }
    Ok(())
}

/// Fails if the server user cannot search every directory above `dir`, which would
/// otherwise surface as a bare "Permission denied" from initdb.
pub(crate) fn check_server_user_reaches(dir: &Path) -> Result<(), TestkitError> {
    use std::os::unix::fs::MetadataExt;
    let Some(user) = server_user()? else {
        return Ok(());
    };
    for ancestor in dir.ancestors().skip(1) {
        let Ok(meta) = ancestor.metadata() else {
            continue;
        };
        // Supplementary groups are dropped when we switch user, so only uid/gid count.
        let search_bit = if meta.uid() == user.uid {
            0o100
        } else if meta.gid() == user.gid {
            0o010
        } else {
            0o001
        };
        if meta.mode() & search_bit == 0 {
            return Err(TestkitError::DirNotReachable {
                user: user.name.clone(),
                path: dir.to_path_buf(),
                blocker: ancestor.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// A command for a client program (psql, pg_isready) run as ourselves.
///
/// `PG*` variables are removed because a developer's PGHOST/PGPORT/PGDATABASE/PGSSLMODE
/// would otherwise silently redirect or alter our connections.
pub(crate) fn client_command(program: &Path) -> Command {
    let mut command = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.as_bytes().starts_with(b"PG") {
            command.env_remove(key);
        }
    }
    command.stdin(Stdio::null());
    command
}

/// A command for a server-side program (initdb, postgres, pg_basebackup), run as the server
/// user from `cwd`.
///
/// The working directory matters: when we are root, our own cwd is often unreadable by the
/// `postgres` user, and PostgreSQL programs fail when they cannot resolve it.
pub(crate) fn server_command(program: &Path, cwd: &Path) -> Result<Command, TestkitError> {
    let mut command = client_command(program);
    command.current_dir(cwd);
    if let Some(user) = server_user()? {
        command
            .uid(user.uid)
            .gid(user.gid)
            .env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
    Ok(command)
}

/// Spawns a long-lived child so that it dies with this process, even on SIGKILL.
///
/// The child asks the kernel for `death_signal` when its parent goes away (postgres gets
/// SIGQUIT: its immediate shutdown, which also stops its backends). The kernel tracks the
/// parent *thread*, not the process, and the test harness runs every test on a short-lived
/// thread; so all such children are forked from one dedicated thread that lives as long as
/// the process.
pub(crate) fn spawn_tied_to_process(
    mut command: Command,
    death_signal: libc::c_int,
) -> io::Result<Child> {
    let parent_pid = std::process::id() as libc::pid_t;
    // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid) and does
    // not allocate, as required between fork and exec.
    unsafe {
        command.pre_exec(move || {
            #[cfg(target_os = "linux")]
            {
                // Runs after std's setuid/setgid, which would otherwise clear the setting.
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    death_signal as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            // If we were orphaned before prctl took effect, no signal will ever come.
            if libc::getppid() != parent_pid {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    spawner()?
        .send(SpawnRequest {
            command,
            reply: reply_tx,
        })
        .map_err(|_| io::Error::other("pg-testkit spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("pg-testkit spawner thread is gone"))?
}

struct SpawnRequest {
    command: Command,
    reply: mpsc::SyncSender<io::Result<Child>>,
}

/// The channel to the process-lifetime thread that forks every server.
fn spawner() -> io::Result<&'static mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Result<mpsc::Sender<SpawnRequest>, String>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("pg-testkit-spawner".into())
            .spawn(move || {
                // The sender lives in a static and is never dropped, so this loop (and the
                // thread) lasts until the process exits.
                for mut request in rx {
                    let _ = request.reply.send(request.command.spawn());
                }
            })
            .map(|_| tx)
            .map_err(|e| format!("could not start the pg-testkit spawner thread: {e}"))
    });
    spawner.as_ref().map_err(|e| io::Error::other(e.clone()))
}

/// What a finished short-lived program printed.
pub(crate) struct Captured {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Why [`run_captured`] did not produce a [`Captured`].
pub(crate) enum RunError {
    Spawn(io::Error),
    TimedOut { output_tail: String },
}

/// Runs `command` to completion, feeding it `stdin`, capturing stdout and stderr, and
/// killing it if it outlives `timeout`.
pub(crate) fn run_captured(
    command: &mut Command,
    stdin: Option<Vec<u8>>,
    timeout: Option<Duration>,
) -> Result<Captured, RunError> {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(RunError::Spawn)?;

    // Separate threads for every pipe: a child blocked writing a full stdout pipe while we
    // block writing its stdin would otherwise deadlock.
    let writer = child.stdin.take().zip(stdin).map(|(mut pipe, input)| {
        thread::spawn(move || {
            // A child that exits early (e.g. on an SQL error) closes the pipe: not our error.
            let _ = pipe.write_all(&input);
        })
    });
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());

    let status = match timeout {
        None => child.wait().map_err(RunError::Spawn)?,
        Some(timeout) => match wait_timeout(&mut child, timeout).map_err(RunError::Spawn)? {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                let output = format!("{}{}", join(stdout), join(stderr));
                return Err(RunError::TimedOut {
                    output_tail: tail_of(&output),
                });
            }
        },
    };
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    Ok(Captured {
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    })
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> Option<thread::JoinHandle<Vec<u8>>> {
    pipe.map(|mut pipe| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    })
}

fn join(reader: Option<thread::JoinHandle<Vec<u8>>>) -> String {
    reader
        .and_then(|r| r.join().ok())
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// Waits for `child` at most `timeout`; `None` if it is still running.
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The last few KiB of `text`, starting at a line boundary.
pub(crate) fn tail_of(text: &str) -> String {
    let limit = TAIL_BYTES as usize;
    if text.len() <= limit {
        return text.trim_end().to_owned();
    }
    let mut start = text.len() - limit;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    let tail = &text[start..];
    let tail = tail.split_once('\n').map_or(tail, |(_, rest)| rest);
    format!("[...]\n{}", tail.trim_end())
}

/// The last few KiB written to the log at `path` since byte offset `from`.
pub(crate) fn log_tail(path: &Path, from: u64) -> String {
    let read = || -> io::Result<String> {
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        let start = from.max(len.saturating_sub(TAIL_BYTES * 2)).min(len);
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) if text.trim().is_empty() => format!("(log {} is empty)", path.display()),
        Ok(text) => tail_of(&text),
        Err(e) => format!("(could not read log {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_short_text_and_cuts_long_text_at_a_line() {
        assert_eq!(tail_of("a\nb\n"), "a\nb");
        let long: String = (0..2000).map(|i| format!("line {i}\n")).collect();
        let tail = tail_of(&long);
        assert!(tail.starts_with("[...]\nline "), "{}", &tail[..20]);
        assert!(tail.ends_with("line 1999"));
        assert!(tail.len() <= TAIL_BYTES as usize + 8);
    }

    #[test]
    fn unreachable_dirs_are_reported_when_root() {
        use std::os::unix::fs::PermissionsExt;
        let private = tempfile::Builder::new()
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .unwrap();
        let inside = private.path().join("cluster");
        let result = check_server_user_reaches(&inside);
        if server_user().unwrap().is_some() {
            let err = result.unwrap_err();
            assert!(
                matches!(&err, TestkitError::DirNotReachable { blocker, .. } if blocker == private.path()),
                "{err}"
            );
        } else {
            // Not root: the server runs as us, and we own the directory.
            result.unwrap();
        }
    }

    #[test]
    fn run_captured_feeds_stdin_and_enforces_timeout() {
        let out = run_captured(&mut Command::new("cat"), Some(b"hello".to_vec()), None)
            .ok()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, "hello");

        let started = Instant::now();
        let mut sleeper = Command::new("sleep");
        sleeper.arg("30");
        let result = run_captured(&mut sleeper, None, Some(Duration::from_millis(200)));
        assert!(matches!(result, Err(RunError::TimedOut { .. })));
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
