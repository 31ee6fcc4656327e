//! A throwaway Prometheus server for the tests that need a real one (Debian's `prometheus`
//! package; scripts/test installs it, `PROMETHEUS_BIN` overrides the binary).

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{free_port, http_get, wait_until};

/// A Prometheus on a free loopback port, its data and log in a tempdir; killed on drop.
pub struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts one with `config` as its prometheus.yml and waits up to `timeout` until it is
    /// ready; panics with its log if it exits first.
    pub fn start(config: &str, timeout: Duration) -> Prometheus {
        let binary = std::env::var("PROMETHEUS_BIN").unwrap_or_else(|_| "prometheus".into());
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let mut command = Command::new(&binary);
        command
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        // Dies with the test binary even on SIGKILL, where drop does not run.
        let child = pg_testkit::spawn_tied_to_process(command, libc::SIGKILL)
            .unwrap_or_else(|e| {
                panic!("cannot start {binary}: {e} (Debian: apt-get install prometheus; scripts/test does)")
            });
        let mut prometheus = Prometheus { child, port, dir };
        wait_until("Prometheus to be ready", timeout, || {
            if let Some(status) = prometheus.child.try_wait().expect("try_wait") {
                panic!("prometheus exited with {status}:\n{}", prometheus.log());
            }
            matches!(http_get(port, "/-/ready"), Some((200, _)))
        });
        prometheus
    }

    /// The loopback port its HTTP API listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What it logged so far (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Runs an instant query: the HTTP status and the parsed answer.
    pub fn query(&self, expr: &str) -> (u16, Value) {
        let encoded =
            percent_encoding::utf8_percent_encode(expr, percent_encoding::NON_ALPHANUMERIC);
        let (status, body) = http_get(self.port, &format!("/api/v1/query?query={encoded}"))
            .expect("Prometheus answers");
        let answer = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("not JSON ({e}) from Prometheus: {body}"));
        (status, answer)
    }

    /// The result vector of a query that must succeed.
    pub fn vector(&self, expr: &str) -> Vec<Value> {
        match self.query(expr) {
            (200, answer) if answer["status"] == "success" => answer["data"]["result"]
                .as_array()
                .expect("a result vector")
                .clone(),
            (status, answer) => panic!("{expr} failed with HTTP {status}: {answer}"),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
