//! CPU time of process trees from `/proc`, and a child's resource usage from `wait4`.

use std::fs;
use std::process::{Child, ExitStatus};
use std::time::Duration;

use anyhow::Context as _;

/// What a child used over its whole life, from the kernel's accounting at exit.
#[derive(Debug, Clone, Copy)]
pub struct ChildUsage {
    pub status: ExitStatus,
    /// User plus system CPU time.
    pub cpu: Duration,
    /// Peak resident set size: `ru_maxrss`, which counts the parent's resident size at
    /// exec too — the daemon's run replaces it with the daemon's own VmHWM (see daemon.rs).
    pub peak_rss_bytes: u64,
}

/// Waits for `child` and returns its exit status with its rusage.
///
/// `wait4` rather than sampling `/proc/<pid>`: the kernel's own totals, exact to the last
/// tick, with no sampling interval that could miss a short peak.
pub fn wait_with_usage(child: Child) -> anyhow::Result<ChildUsage> {
    let pid = libc::pid_t::try_from(child.id()).context("child pid out of range")?;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data, valid when zeroed.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: pid is our own unreaped child (std never waits for it: we own `child`
        // and drop it without waiting); status and usage point to live locals.
        let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if reaped == pid {
            break;
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error).with_context(|| format!("waiting for process {pid}"));
        }
    }
    drop(child);
    let timeval = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    Ok(ChildUsage {
        status: std::os::unix::process::ExitStatusExt::from_raw(status),
        cpu: timeval(usage.ru_utime) + timeval(usage.ru_stime),
        // Linux reports ru_maxrss in KiB.
        peak_rss_bytes: u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024,
    })
}

/// CPU time used so far by `pid` and its children, living or reaped, in clock ticks
/// converted to seconds.
///
/// For a postmaster this is the whole server: its own time, the time of every backend
/// it has reaped (cutime/cstime) and that of the ones still running. Differences of two
/// readings give the server's CPU over a scenario.
pub fn tree_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let own = read_stat(pid).with_context(|| format!("reading /proc/{pid}/stat"))?;
    let mut ticks = own.utime + own.stime + own.cutime + own.cstime;
    for entry in fs::read_dir("/proc").context("listing /proc")? {
        let Some(child) = entry
            .ok()
            .and_then(|e| e.file_name().to_str()?.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit between listing and reading: skip it, it is in cutime soon.
        if let Some(stat) = read_stat(child).filter(|stat| stat.ppid == pid) {
            ticks += stat.utime + stat.stime;
        }
    }
    Ok(ticks as f64 / clock_ticks_per_second())
}

/// CPU time used so far by `pid` itself (user plus system), in seconds; `None` once it
/// is gone.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = read_stat(pid)?;
    Some((stat.utime + stat.stime) as f64 / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// The fields of `/proc/<pid>/stat` used here.
struct Stat {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

fn read_stat(pid: u32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses a `/proc/<pid>/stat` line; the command name may hold spaces and parentheses,
/// so fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let fields: Vec<&str> = text
        .get(text.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // fields[0] is field 3 (state) of proc(5).
    let field = |n: usize| fields.get(n - 3)?.parse::<i64>().ok();
    let ticks = |n: usize| field(n).and_then(|v| u64::try_from(v).ok());
    Some(Stat {
        ppid: u32::try_from(field(4)?).ok()?,
        utime: ticks(14)?,
        stime: ticks(15)?,
        cutime: ticks(16)?,
        cstime: ticks(17)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_tricky_command_name() {
        let line = "4242 (post (gres) x) S 17 4242 4242 0 -1 4194560 100 0 0 0 \
                    250 50 30 20 20 0 1 0 123 456 789";
        let stat = parse_stat(line).unwrap();
        assert_eq!(stat.ppid, 17);
        assert_eq!(
            (stat.utime, stat.stime, stat.cutime, stat.cstime),
            (250, 50, 30, 20)
        );
    }

    #[test]
    fn our_own_cpu_time_is_readable() {
        assert!(tree_cpu_seconds(std::process::id()).unwrap() >= 0.0);
        let own = process_cpu_seconds(std::process::id()).unwrap();
        assert!(own >= 0.0 && own <= tree_cpu_seconds(std::process::id()).unwrap());
    }
}
