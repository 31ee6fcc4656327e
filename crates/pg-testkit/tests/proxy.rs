//! The fault-injection TCP proxy in front of a real PostgreSQL.

use std::io::{ErrorKind, Read};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use pg_testkit::{shared_primary, TcpProxy};

fn psql_through(proxy: &TcpProxy, sql: &str) -> Command {
    let mut command = Command::new(shared_primary().binaries().path("psql"));
    command
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=5",
            proxy.port()
        ))
        .arg("-c")
        .arg(sql)
        .stdin(Stdio::null());
    command
}

fn wait_for(what: &str, limit: Duration, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !probe() {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn proxy_forwards_queries() {
    let proxy = TcpProxy::start(shared_primary().port()).unwrap();
    assert_ne!(proxy.port(), shared_primary().port());
    assert_eq!(
        proxy.url("postgres"),
        format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port())
    );
    let out = psql_through(&proxy, "select 40 + 2").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    wait_for(
        "the finished session to be unregistered",
        Duration::from_secs(5),
        || proxy.active_connections() == 0,
    );
    assert_eq!(proxy.connections_cut(), 0);
}

#[test]
fn cut_all_breaks_open_connections_and_keeps_accepting() {
    let primary = shared_primary();
    let proxy = TcpProxy::start(primary.port()).unwrap();
    let marker = "pg_sleep(30.0001)";
    let mut sleeper = psql_through(&proxy, &format!("select {marker}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(
        "the query to run on the server",
        Duration::from_secs(10),
        || {
            primary
                .psql(
                    "postgres",
                    &format!(
                        "select count(*) from pg_stat_activity \
                      where query like '%{marker}%' and pid <> pg_backend_pid()"
                    ),
                )
                .unwrap()
                == "1"
        },
    );
    assert_eq!(proxy.active_connections(), 1);

    let cut_at = Instant::now();
    proxy.cut_all();
    let status = loop {
        if let Some(status) = sleeper.try_wait().unwrap() {
            break status;
        }
        if cut_at.elapsed() > Duration::from_secs(5) {
            let _ = sleeper.kill();
            panic!("psql still running 5 s after cut_all");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stderr = sleeper.wait_with_output().unwrap().stderr;
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(!status.success());
    assert!(stderr.contains("server closed the connection"), "{stderr}");
    assert_eq!(proxy.connections_cut(), 1);
    assert_eq!(proxy.active_connections(), 0);

    // The proxy still accepts new connections after a cut.
    let out = psql_through(&proxy, "select 'again'").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "again");
}

#[test]
fn dropped_proxy_stops_listening() {
    let proxy = TcpProxy::start(shared_primary().port()).unwrap();
    let port = proxy.port();
    let mut held = TcpStream::connect(("127.0.0.1", port)).unwrap();
    drop(proxy);

    // The connection it was forwarding is closed (EOF if it had been accepted, a reset if it
    // was still in the backlog), not left hanging.
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    match held.read(&mut [0u8; 1]) {
        Ok(0) => {}
        Ok(n) => panic!("read {n} bytes from a connection of a dropped proxy"),
        Err(e) => assert!(
            !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "the held connection is still open 5 s after the proxy was dropped"
        ),
    }

    // Nobody listens on the port any more: we can bind it ourselves. (A bare connect() can
    // succeed on Linux by connecting a socket to itself when the kernel happens to pick that
    // port as the source port.) Waited for rather than checked once: a sibling test spawning
    // psql at this moment holds a copy of the listening descriptor from fork until exec.
    wait_for(
        "the proxy's port to be free again",
        Duration::from_secs(5),
        || TcpListener::bind(("127.0.0.1", port)).is_ok(),
    );
}
