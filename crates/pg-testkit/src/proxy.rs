//! A loopback TCP proxy that can cut every connection on demand, for fault tests.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::cluster::percent_encode;
use crate::error::TestkitError;

const LOOPBACK: &str = "127.0.0.1";

/// A loopback TCP proxy in front of a cluster that can cut every connection on demand.
///
/// Point a client at [`url`](Self::url) instead of the cluster's; [`cut_all`](Self::cut_all)
/// then looks to it like the network dropping (the server side sees its client vanish).
/// New connections are still accepted afterwards. Dropping the proxy stops it and closes
/// every connection.
///
/// ```no_run
/// use pg_testkit::{shared_primary, TcpProxy};
///
/// let proxy = TcpProxy::start(shared_primary().port())?;
/// let url = proxy.url("postgres"); // hand this to the code under test
/// // ... while it is connected:
/// proxy.cut_all();
/// # Ok::<(), pg_testkit::TestkitError>(())
/// ```
pub struct TcpProxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    target_port: u16,
    stopping: AtomicBool,
    next_id: AtomicU64,
    cut: AtomicU64,
    /// Live connections: a handle on each side, used to shut the sockets down from outside
    /// the threads that pump them.
    links: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
}

impl Shared {
    fn links(&self) -> MutexGuard<'_, HashMap<u64, (TcpStream, TcpStream)>> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes both sides of every live connection and returns how many there were.
    fn close_all(&self) -> u64 {
        let links: Vec<_> = self.links().drain().collect();
        for (_, (client, upstream)) in &links {
            // shutdown (not just drop) also wakes the pump threads blocked reading them.
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
        }
        links.len() as u64
    }
}

impl TcpProxy {
    /// Starts forwarding a fresh loopback port to `127.0.0.1:target_port`.
    pub fn start(target_port: u16) -> Result<TcpProxy, TestkitError> {
        let error = |action| {
            move |source| TestkitError::Proxy {
                target_port,
                action,
                source,
            }
        };
        let listener = TcpListener::bind((LOOPBACK, 0)).map_err(error("bind a loopback port"))?;
        let port = listener
            .local_addr()
            .map_err(error("read its listening port"))?
            .port();
        let shared = Arc::new(Shared {
            target_port,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            cut: AtomicU64::new(0),
            links: Mutex::new(HashMap::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("pg-testkit-proxy-{port}"))
                .spawn(move || accept_loop(&listener, &shared))
                .map_err(error("start its accept thread"))?
        };
        Ok(TcpProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The port clients should connect to (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PROXY_PORT/DB`.
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://postgres@{LOOPBACK}:{}/{}",
            self.port,
            percent_encode(db)
        )
    }

    /// Drops all live connections (new ones are still accepted).
    pub fn cut_all(&self) {
        let cut = self.shared.close_all();
        self.shared.cut.fetch_add(cut, Ordering::SeqCst);
    }

    /// How many connections [`cut_all`](Self::cut_all) has dropped so far.
    pub fn connections_cut(&self) -> u64 {
        self.shared.cut.load(Ordering::SeqCst)
    }

    /// How many connections are currently being forwarded.
    pub fn active_connections(&self) -> usize {
        self.shared.links().len()
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // accept() has no timeout: wake it with a connection of our own. If that fails the
        // thread may stay blocked, so only then do we skip joining it.
        let woke =
            TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_secs(1))
                .is_ok();
        if let Some(acceptor) = self.acceptor.take() {
            if woke {
                let _ = acceptor.join();
            }
        }
        self.shared.close_all();
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for client in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let client = match client {
            Ok(client) => client,
            Err(_) => {
                // E.g. EMFILE: back off instead of spinning, then keep serving.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // A refused upstream (server stopped) is passed on as an immediate close, which is
        // what a client talking to a dead server would see too.
        let Ok(upstream) = TcpStream::connect((LOOPBACK, shared.target_port)) else {
            continue;
        };
        // Out of threads or descriptors: this connection is lost, the proxy lives on.
        let _ = start_link(client, upstream, shared);
    }
}

/// Registers a client/upstream pair and starts one pump thread per direction.
fn start_link(client: TcpStream, upstream: TcpStream, shared: &Arc<Shared>) -> io::Result<()> {
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let handles = (client.try_clone()?, upstream.try_clone()?);
    let pumps = [
        (client.try_clone()?, upstream.try_clone()?),
        (upstream, client),
    ];
    shared.links().insert(id, handles);
    for (from, to) in pumps {
        let pump_shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name(format!("pg-testkit-proxy-link-{id}"))
            .spawn(move || pump(from, to, id, &pump_shared));
        if let Err(e) = spawned {
            // The registered handles would keep the sockets open forever; close them, which
            // also ends a pump thread already started for the other direction.
            if let Some((client, upstream)) = shared.links().remove(&id) {
                let _ = client.shutdown(Shutdown::Both);
                let _ = upstream.shutdown(Shutdown::Both);
            }
            return Err(e);
        }
    }
    Ok(())
}

/// Copies one direction until either side closes, then closes the whole connection: the
/// PostgreSQL protocol never half-closes, so one side ending means the session is over.
fn pump(mut from: TcpStream, mut to: TcpStream, id: u64, shared: &Shared) {
    let _ = io::copy(&mut from, &mut to);
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    shared.links().remove(&id);
}
