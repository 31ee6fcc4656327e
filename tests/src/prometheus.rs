//! A throwaway Prometheus server for the tests that need a real one (Debian's `prometheus`
//! package; scripts/test installs it, `PROMETHEUS_BIN` overrides the binary).

use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::{http_get, wait_until};

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
        let dir = tempfile::tempdir().expect("tempdir");
        // Dies with the test binary even on SIGKILL, where drop does not run.
        let (child, port) =
            pg_testkit::spawn_prometheus(config, dir.path()).unwrap_or_else(|e| panic!("{e}"));
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

impl Prometheus {
    /// One scraping 127.0.0.1:`target` every second, ready within `timeout`.
    pub fn scraping_every_second(target: u16, timeout: Duration) -> Prometheus {
        Prometheus::start(
            &format!(
                "global:\n  scrape_interval: 1s\n\
                 scrape_configs:\n  - job_name: app\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
            timeout,
        )
    }

    /// `app_latency_seconds` (see [`serve_app_latency`]) as it has it now, if it has it.
    pub fn app_latency(&self) -> Option<f64> {
        let (_, body) = http_get(self.port, "/api/v1/query?query=app_latency_seconds")?;
        let answer: Value = serde_json::from_str(&body).ok()?;
        answer["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()
    }
}

/// A tiny `/metrics` endpoint serving `app_latency_seconds <value>`, an application's
/// latency SLI whose value the test sets; serves until the process ends. Returns its port.
pub fn serve_app_latency(value: Arc<Mutex<f64>>) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request);
            let body = format!(
                "# TYPE app_latency_seconds gauge\napp_latency_seconds {}\n",
                *value.lock().expect("value")
            );
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
