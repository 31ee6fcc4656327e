//! A process that owns a cluster, or a child started with `spawn_tied_to_process`, and is
//! SIGKILLed must not leave either behind.
//!
//! The test re-runs its own binary as the owner (the ignored helper test below), so no extra
//! executable has to be located.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use pg_testkit::PgCluster;

const CHILD_ENV: &str = "PG_TESTKIT_ORPHAN_CHILD";

#[test]
#[ignore = "helper process for sigkilled_owner_leaves_no_server; does nothing when run directly"]
fn owner_process() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    // Started from a thread that exits at once, like a test thread would.
    let pg = thread::spawn(|| PgCluster::start_primary().unwrap())
        .join()
        .unwrap();
    println!(
        "READY pid={} port={} root={}",
        pg.pid().unwrap(),
        pg.port(),
        pg.data_dir().parent().unwrap().display()
    );
    // Bounded, in case the parent test dies without killing us.
    thread::sleep(Duration::from_secs(60));
}

/// Kills the owner process if the test fails before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn process_is_gone(pid: i32) -> bool {
    // Once orphaned, its reaper may be slow (or absent in a container), so a zombie counts
    // as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Runs the ignored helper test `helper` as an owner process and returns it with its
/// `READY …` line.
fn start_owner(helper: &str) -> (KillOnDrop, String) {
    let mut owner = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args([helper, "--exact", "--ignored", "--nocapture"])
            .env(CHILD_ENV, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stdout = BufReader::new(owner.0.stdout.take().unwrap());
    let ready = stdout
        .lines()
        .map_while(Result::ok)
        .find(|line| line.starts_with("READY "))
        .unwrap_or_else(|| panic!("{helper} exited before reporting what it started"));
    (owner, ready)
}

#[test]
fn sigkilled_owner_leaves_no_server() {
    let (mut owner, ready) = start_owner("owner_process");
    let field = |key: &str| {
        ready
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .unwrap()
            .to_owned()
    };
    let pid: i32 = field("pid=").parse().unwrap();
    let port: u16 = field("port=").parse().unwrap();
    let root = PathBuf::from(field("root="));
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());

    owner.0.kill().unwrap(); // SIGKILL: no destructor or atexit hook runs.
    owner.0.wait().unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_ok() || !process_is_gone(pid) {
        assert!(
            Instant::now() < deadline,
            "postgres {pid} on port {port} survived its owner's SIGKILL"
        );
        thread::sleep(Duration::from_millis(50));
    }
    // It was the parent-death SIGQUIT that stopped it.
    let log = std::fs::read_to_string(root.join("postgres.log")).unwrap();
    assert!(log.contains("received immediate shutdown request"), "{log}");
    // A SIGKILLed owner cannot clean up after itself; we can.
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
#[ignore = "helper process for sigkilled_owner_leaves_no_tied_child; does nothing when run directly"]
fn tied_child_owner_process() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    // Started from a thread that exits at once, as a daemon under test would be.
    let child = KillOnDrop(
        thread::spawn(|| {
            let mut sleeper = Command::new("sleep");
            sleeper.arg("60").stdin(Stdio::null());
            pg_testkit::spawn_tied_to_process(sleeper, libc::SIGKILL).unwrap()
        })
        .join()
        .unwrap(),
    );
    println!("READY child={}", child.0.id());
    // Bounded, in case the parent test dies without killing us; dropping `child` reaps it.
    thread::sleep(Duration::from_secs(60));
}

#[test]
fn sigkilled_owner_leaves_no_tied_child() {
    let (mut owner, ready) = start_owner("tied_child_owner_process");
    let pid: i32 = ready
        .strip_prefix("READY child=")
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected line from the owner: {ready}"));
    assert!(!process_is_gone(pid), "the tied child {pid} never ran");

    owner.0.kill().unwrap(); // SIGKILL: no destructor runs, only the kernel's signal.
    owner.0.wait().unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    while !process_is_gone(pid) {
        assert!(
            Instant::now() < deadline,
            "the tied child {pid} survived its owner's SIGKILL"
        );
        thread::sleep(Duration::from_millis(50));
    }
}
