//! Security: passwords stay out of every output, TLS to PostgreSQL (require,
//! verify-ca, verify-full) on both planes, a least-privilege role, and a role that
//! cannot see what the throttle's probes read.
//!
//! The test kit's clusters trust every loopback connection, so these tests start their
//! own with password authentication (`scram-sha-256`) for every role but `postgres`, and
//! TLS with a certificate from a CA made here for `localhost` only.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use backfilld_e2e::{
    backfilld_at, env_refs, free_port, http_get, quick_worker, readme_engineer_grants, wait_until,
    Daemon, Session, TestDb,
};
use pg_testkit::PgCluster;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Files a server reads: a directory the server user can enter, kept for the process.
struct ServerFiles {
    dir: tempfile::TempDir,
    /// The CA every server certificate here is signed by, for `sslrootcert`.
    ca_cert: PathBuf,
}

impl ServerFiles {
    fn new() -> ServerFiles {
        let dir = tempfile::tempdir().expect("tempdir");
        // The server runs as another user; it must reach the files.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        let ca = CertifiedIssuer::self_signed(ca_params("backfilld test CA"), key_pair())
            .expect("CA certificate");
        let ca_cert = dir.path().join("ca.crt");
        write(&ca_cert, &ca.pem(), 0o644);
        let server_key = key_pair();
        let server_cert = CertificateParams::new(vec!["localhost".to_string()])
            .expect("server params")
            .signed_by(&server_key, &ca)
            .expect("server certificate");
        write(&dir.path().join("server.crt"), &server_cert.pem(), 0o644);
        let key = dir.path().join("server.key");
        write(&key, &server_key.serialize_pem(), 0o600);
        pg_testkit::chown_to_server_user(&key).expect("chown server.key");
        // Password authentication for every role but the test kit's superuser.
        write(
            &dir.path().join("pg_hba.conf"),
            "local all all trust\n\
             host all postgres 127.0.0.1/32 trust\n\
             host replication postgres 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
            0o644,
        );
        ServerFiles { dir, ca_cert }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    /// A primary with TLS and password authentication.
    fn start_primary(&self) -> PgCluster {
        PgCluster::start_primary_with(&[
            ("ssl", "on"),
            ("ssl_cert_file", &self.path("server.crt")),
            ("ssl_key_file", &self.path("server.key")),
            ("hba_file", &self.path("pg_hba.conf")),
        ])
        .expect("start a primary with TLS and passwords")
    }
}

fn key_pair() -> KeyPair {
    KeyPair::generate().expect("key pair")
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).expect("write file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod file");
}

/// One TLS-and-password primary for the tests of this file (roles are per cluster, so
/// each test uses its own).
fn secured() -> &'static (ServerFiles, PgCluster) {
    static SECURED: OnceLock<(ServerFiles, PgCluster)> = OnceLock::new();
    SECURED.get_or_init(|| {
        let files = ServerFiles::new();
        let cluster = files.start_primary();
        (files, cluster)
    })
}

/// `postgres://user[:password]@host:port/db?query`.
fn url(
    user: &str,
    password: Option<&str>,
    host: &str,
    cluster: &PgCluster,
    db: &str,
    query: &str,
) -> String {
    let password = password.map_or(String::new(), |p| format!(":{p}"));
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!(
        "postgres://{user}{password}@{host}:{}/{db}{query}",
        cluster.port()
    )
}

/// `items(k bigint, v int)` with `rows` rows and a job `fill` setting every `v` to 1.
fn items_and_job(db: &TestDb, rows: i64, batch_sql_tail: &str) {
    db.sql(&format!(
        "CREATE TABLE items (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO items (k) SELECT g FROM generate_series(1, {rows}) g;"
    ));
    db.migrate();
    db.sql(&format!(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, batch_size)
         VALUES ('fill', 'items', 'k', $$UPDATE items SET v = 1 WHERE k = ANY(:keys){batch_sql_tail}$$, 'v = 0', 500)"
    ));
}

#[test]
fn passwords_never_reach_logs_status_metrics_or_connection_errors() {
    let (_, cluster) = secured();
    let db = TestDb::on(cluster, "passwords");
    // Characters that must be percent-encoded in a URL: both forms are searched for.
    let password = "Pa55:w@rd/Sec;ret";
    let encoded = "Pa55%3Aw%40rd%2FSec%3Bret";
    db.sql(&format!(
        "CREATE ROLE app_pw LOGIN PASSWORD '{password}';
         ALTER DATABASE \"{0}\" OWNER TO app_pw; GRANT pg_monitor TO app_pw;",
        db.name
    ));
    db.sql("CREATE TABLE items (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0); ALTER TABLE items OWNER TO app_pw;
            INSERT INTO items (k) SELECT g FROM generate_series(1, 3000) g;");
    let with_password = url("app_pw", Some(encoded), "127.0.0.1", cluster, &db.name, "");
    let mut outputs: Vec<(String, String)> = Vec::new();

    // The password is needed: the cluster does not trust this role.
    let without = backfilld_at(
        &url("app_pw", None, "127.0.0.1", cluster, &db.name, ""),
        &["migrate"],
        &[],
    );
    assert_eq!(
        without.usage_error(),
        format!("backfilld: cannot connect to the database at postgres://app_pw@127.0.0.1:{}/{}: error returned from database: password authentication failed for user \"app_pw\"", cluster.port(), db.name)
    );
    let wrong = backfilld_at(
        &url(
            "app_pw",
            Some("wrong-Pa55"),
            "127.0.0.1",
            cluster,
            &db.name,
            "",
        ),
        &["migrate"],
        &[],
    );
    assert_eq!(
        wrong.usage_error(),
        format!("backfilld: cannot connect to the database at postgres://app_pw:***@127.0.0.1:{}/{}: error returned from database: password authentication failed for user \"app_pw\"", cluster.port(), db.name)
    );
    outputs.push(("failed login".into(), format!("{wrong:?}")));
    // A failing connection with the right password: the server is not there.
    let gone = backfilld_at(
        &format!("postgres://app_pw:{encoded}@127.0.0.1:{}/x", free_port()),
        &["status"],
        &[("BACKFILLD_DATABASE__STARTUP_TIMEOUT", "0s")],
    );
    // Possibly a failover: a runtime error (exit 1, after start-up retries), not config.
    assert_eq!(gone.status.code(), Some(1));
    outputs.push(("unreachable".into(), format!("{gone:?}")));
    // Configuration errors about a URL that holds it.
    for bad in ["&sslmode=bogus", "&sslcert=/x.crt"] {
        let refused = backfilld_at(
            &format!("{with_password}?application_name=x{bad}"),
            &["status"],
            &[],
        );
        assert_eq!(refused.status.code(), Some(2));
        outputs.push((format!("config {bad}"), format!("{refused:?}")));
    }

    let migrated = backfilld_at(&with_password, &["migrate"], &[]);
    assert!(migrated.status.success(), "{migrated:?}");
    // Enqueued as the daemon's own role: its jobs run as it.
    db.sql(
        "SET ROLE app_pw;
         INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, batch_size)
         VALUES ('fill', 'items', 'k', $$UPDATE items SET v = 1 WHERE k = ANY(:keys)$$, 'v = 0', 500),
                ('broken', 'items', 'k', $$UPDATE items SET nope = 1 WHERE k = ANY(:keys)$$, NULL, 500)",
    );
    let port = free_port();
    let mut env = quick_worker("passwords");
    env.push(("BACKFILLD_HTTP__LISTEN", format!("127.0.0.1:{port}")));
    env.push(("RUST_LOG", "debug".to_string()));
    env.push(("BACKFILLD_LOG__FORMAT", "json".to_string()));
    let mut daemon = Daemon::start(&with_password, &[], &env_refs(&env));
    wait_until("both jobs to end", RUN_LIMIT, || {
        db.sql("SELECT string_agg(state, ',' ORDER BY name) FROM backfill.jobs")
            == "failed,succeeded"
    });
    let (status, metrics) = http_get(port, "/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("backfill_rows_processed_total{backfill_job=\"fill\"}"),
        "{metrics}"
    );
    outputs.push(("/metrics".into(), metrics));
    for args in [
        &["status", "--json"][..],
        &["status"],
        &["status", "broken"],
        &["plan", "fill"],
    ] {
        let out = backfilld_at(&with_password, args, &[]);
        assert!(out.status.code().is_some(), "{out:?}");
        outputs.push((args.join(" "), format!("{out:?}")));
    }
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(Duration::from_secs(10));
    let log = daemon.log_text();
    assert!(
        log.contains("postgres://app_pw:***@127.0.0.1"),
        "the log names the database, redacted:\n{log}"
    );
    assert!(
        log.lines().count() > 50,
        "a debug log with something to search"
    );
    outputs.push(("daemon log".into(), log));
    for (what, text) in &outputs {
        for secret in [password, encoded, "Sec;ret", "Pa55"] {
            assert!(
                !text.contains(secret),
                "{what} holds the password ({secret}):\n{text}"
            );
        }
    }
}

#[test]
fn tls_with_require_and_verify_full_encrypts_both_planes_and_cancels_over_tls() {
    let (files, cluster) = secured();
    let db = TestDb::on(cluster, "tls");
    // Each batch takes 0.3 s on the server: long enough to look at the sessions.
    db.sql("CREATE FUNCTION slow_true(seconds float8) RETURNS boolean LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(seconds); RETURN true; END $$");
    items_and_job(&db, 2000, " AND slow_true(0.3 / 500)");
    let ca = files.ca_cert.display();
    let encrypted_sessions = |worker: &str| {
        db.sql(&format!(
            "SELECT string_agg(DISTINCT a.application_name || '=' || s.ssl, ',' ORDER BY a.application_name || '=' || s.ssl)
               FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
              WHERE a.application_name IN ('backfilld-control', 'backfilld/{worker}')"
        ))
    };
    for (mode, host, query) in [
        ("require", "127.0.0.1", "sslmode=require".to_string()),
        (
            "verify-full",
            "localhost",
            format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
    ] {
        db.sql("UPDATE items SET v = 0; UPDATE backfill.jobs SET state = 'pending', phase = 'scan', checkpoint = NULL, rows_done = 0, verify_sweeps = 0, finished_at = NULL");
        let mut env = quick_worker(mode);
        env.push(("BACKFILLD_HTTP__LISTEN", String::new()));
        let mut daemon = Daemon::start(
            &url("postgres", None, host, cluster, &db.name, &query),
            &[],
            &env_refs(&env),
        );
        wait_until("both planes connected over TLS", RUN_LIMIT, || {
            encrypted_sessions(mode) == format!("backfilld-control=true,backfilld/{mode}=true")
        });
        wait_until("the job to succeed", RUN_LIMIT, || {
            db.job_state("fill") == "succeeded"
        });
        assert_eq!(
            db.int("SELECT count(*) FROM items WHERE v = 1"),
            2000,
            "{mode}"
        );
        daemon.signal(libc::SIGTERM);
        daemon.expect_success(Duration::from_secs(10));
    }

    // A batch cut short on SIGTERM is cancelled with a cancel request, itself over TLS:
    // tokio-postgres refuses to send one in the clear when the pool requires TLS.
    // A succeeded job's definition is what it ran: a new job takes the slow statement.
    db.sql("UPDATE items SET v = 0;
            INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, batch_size)
            VALUES ('slow', 'items', 'k', $$UPDATE items SET v = 1 WHERE k = ANY(:keys) AND slow_true(60)$$, 'v = 0', 500)");
    let mut env = quick_worker("cancelled");
    env.push(("BACKFILLD_WORKER__SHUTDOWN_GRACE", "500ms".to_string()));
    let mut daemon = Daemon::start(
        &url(
            "postgres",
            None,
            "localhost",
            cluster,
            &db.name,
            &format!("sslmode=verify-full&sslrootcert={ca}"),
        ),
        &[],
        &env_refs(&env),
    );
    wait_until("a batch in flight", RUN_LIMIT, || {
        db.int("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'backfilld/cancelled' AND state = 'active' AND query LIKE 'UPDATE items%'") > 0
    });
    let signalled = Instant::now();
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(Duration::from_secs(10));
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "took {:?}",
        signalled.elapsed()
    );
    assert_eq!(
        db.int("SELECT count(*) FROM items WHERE v = 1"),
        0,
        "the batch rolled back"
    );
}

#[test]
fn verify_full_against_a_certificate_for_another_host_fails_with_one_line() {
    let (files, cluster) = secured();
    let db = TestDb::on(cluster, "wrong_host");
    db.migrate();
    let ca = files.ca_cert.display();
    // The certificate names localhost; 127.0.0.1 is another name.
    let mismatch = url(
        "postgres",
        None,
        "127.0.0.1",
        cluster,
        &db.name,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    for verb in ["status", "run"] {
        let out = backfilld_at(&mismatch, &[verb], &[]);
        assert_eq!(
            out.usage_error(),
            format!("backfilld: cannot connect to the database at {mismatch}: error communicating with database: invalid peer certificate: certificate not valid for name \"127.0.0.1\"; certificate is only valid for DnsName(\"localhost\")"),
            "{verb}"
        );
    }
    // A chain-only check (verify-ca, or require with sslrootcert as in libpq) is refused
    // for the main database: sqlx, the control plane's driver, fails it on the host name.
    for query in [
        format!("sslmode=verify-ca&sslrootcert={ca}"),
        format!("sslmode=require&sslrootcert={ca}"),
    ] {
        let chain_only = url("postgres", None, "127.0.0.1", cluster, &db.name, &query);
        let what = if query.starts_with("sslmode=verify-ca") {
            "sslmode=verify-ca"
        } else {
            "sslmode=require with sslrootcert (which verifies the chain only, as in libpq)"
        };
        assert_eq!(
            backfilld_at(&chain_only, &["status"], &[]).usage_error(),
            format!("backfilld: configuration error: database.url: {what} is not supported for the main database (its control-plane driver cannot check a certificate chain without the host name); use sslmode=verify-full")
        );
    }
    // The data plane alone can, as replicas are probed: the first replica (our primary,
    // reached by a name its certificate lacks) connects and is found not to be a
    // standby; the second trusts a root that did not sign the certificate.
    let other_ca = files.dir.path().join("other-ca.crt");
    let other = CertifiedIssuer::self_signed(ca_params("another CA"), key_pair()).expect("CA");
    write(&other_ca, &other.pem(), 0o644);
    let untrusted = url(
        "postgres",
        None,
        "localhost",
        cluster,
        &db.name,
        &format!("sslmode=verify-full&sslrootcert={}", other_ca.display()),
    );
    assert_eq!(
        backfilld_at(&untrusted, &["status"], &[]).usage_error(),
        format!("backfilld: cannot connect to the database at {untrusted}: error communicating with database: invalid peer certificate: UnknownIssuer")
    );
    let replicas = [
        url(
            "postgres",
            None,
            "127.0.0.1",
            cluster,
            &db.name,
            &format!("sslmode=verify-ca&sslrootcert={ca}"),
        ),
        url(
            "postgres",
            None,
            "localhost",
            cluster,
            &db.name,
            &format!("sslmode=verify-ca&sslrootcert={}", other_ca.display()),
        ),
    ];
    let mut env = quick_worker("replica_tls");
    env.push(("BACKFILLD_THROTTLE__REPLICA_URLS", replicas.join(",")));
    let mut daemon = Daemon::start(&db.url(), &[], &env_refs(&env));
    let probe_failure = |daemon: &Daemon, replica: &str| {
        daemon
            .log_text()
            .lines()
            .find(|line| line.contains("health probe failed") && line.contains(replica))
            .map(str::to_string)
    };
    wait_until("both replica probes to report", RUN_LIMIT, || {
        probe_failure(&daemon, "replica0").is_some() && probe_failure(&daemon, "replica1").is_some()
    });
    let replica0 = probe_failure(&daemon, "replica0").unwrap_or_default();
    assert!(
        replica0.contains("it is not a standby (pg_is_in_recovery() is false)"),
        "{replica0}"
    );
    let replica1 = probe_failure(&daemon, "replica1").unwrap_or_default();
    assert!(
        replica1.contains("invalid peer certificate: UnknownIssuer"),
        "{replica1}"
    );
    daemon.signal(libc::SIGTERM);
    daemon.expect_success(Duration::from_secs(10));
}

/// The grants README.md's "Least privilege" section documents for the daemon's role
/// `role` on `db`: the queue's schema and the monitoring role, no table.
fn least_privilege_role(db: &TestDb, role: &str, monitor: bool) {
    db.sql(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}';
         CREATE SCHEMA backfill AUTHORIZATION {role};"
    ));
    if monitor {
        db.sql(&format!("GRANT pg_monitor TO {role}"));
    }
}

#[test]
fn a_least_privilege_role_runs_a_backfill_end_to_end() {
    let (_, cluster) = secured();
    let db = TestDb::on(cluster, "least_privilege");
    db.sql(
        "CREATE TABLE items (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO items (k) SELECT g FROM generate_series(1, 3000) g;
         CREATE TABLE secrets (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO secrets (k) SELECT g FROM generate_series(1, 10) g;",
    );
    least_privilege_role(&db, "backfiller", true);
    let as_role = url(
        "backfiller",
        Some("pw-backfiller"),
        "127.0.0.1",
        cluster,
        &db.name,
        "",
    );
    let migrated = backfilld_at(&as_role, &["migrate"], &[]);
    assert!(migrated.status.success(), "{migrated:?}");
    // An engineer with README's grants enqueues and steers; one job reaches beyond the
    // daemon's grants.
    // The engineer may read secrets but not write them; the daemon's role may become
    // the engineer (its jobs run as the engineer) and has no table grants of its own.
    db.sql(&format!(
        "CREATE ROLE engineer LOGIN PASSWORD 'pw-engineer';
         {}
         GRANT SELECT ON public.secrets TO engineer;
         GRANT engineer TO backfiller;",
        readme_engineer_grants("engineer", "public.items")
    ));
    let engineer = Session::connect(&url(
        "engineer",
        Some("pw-engineer"),
        "127.0.0.1",
        cluster,
        &db.name,
        "",
    ));
    engineer.execute(
        "INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate, batch_size)
         VALUES ('fill', 'items', 'k', $$UPDATE items SET v = 1 WHERE k = ANY(:keys)$$, 'v = 0', 500),
                ('beyond', 'secrets', 'k', $$UPDATE secrets SET v = 1 WHERE k = ANY(:keys)$$, 'v = 0', 500);
         SELECT backfill.pause('fill'); SELECT backfill.resume('fill');
         SELECT * FROM backfill.job_status;",
    );
    let env = quick_worker("least_privilege");
    let mut daemon = Daemon::start(&as_role, &["--exit-when-idle"], &env_refs(&env));
    daemon.expect_success(RUN_LIMIT);
    assert_eq!(db.job_state("fill"), "succeeded", "{}", daemon.log_text());
    assert_eq!(db.int("SELECT count(*) FROM items WHERE v = 1"), 3000);
    assert_eq!(
        db.sql("SELECT last_error FROM backfill.jobs WHERE name = 'beyond'"),
        "job \"beyond\", keys 1..=10: batch statement: permission denied for table secrets (SQLSTATE 42501)"
    );
    assert_eq!(db.int("SELECT count(*) FROM secrets WHERE v <> 0"), 0);
    assert!(
        !daemon.log_text().contains("blind"),
        "{}",
        daemon.log_text()
    );
    engineer.execute("SELECT backfill.retry_failed('beyond')");
    assert_eq!(db.job_state("beyond"), "pending");
    let status = backfilld_at(&as_role, &["status", "fill"], &[]);
    assert!(
        status.status.success() && status.stdout.contains("succeeded"),
        "{status:?}"
    );
}

#[test]
fn a_role_without_pg_monitor_is_refused_unless_blind_running_is_allowed() {
    // Own primary and a standby, so there is a standby position to hide.
    let files = ServerFiles::new();
    let primary = files.start_primary();
    let _standby = primary.start_standby("standby_a").expect("standby");
    let db = TestDb::on(&primary, "blind");
    db.sql(
        "CREATE TABLE items (k bigint PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO items (k) SELECT g FROM generate_series(1, 2000) g;",
    );
    least_privilege_role(&db, "unmonitored", false);
    let as_role = url(
        "unmonitored",
        Some("pw-unmonitored"),
        "127.0.0.1",
        &primary,
        &db.name,
        "",
    );
    let migrated = backfilld_at(&as_role, &["migrate"], &[]);
    assert!(migrated.status.success(), "{migrated:?}");
    // Enqueued as the daemon's own role, which may write items: its jobs run as it.
    db.sql("GRANT SELECT, UPDATE ON items TO unmonitored; SET ROLE unmonitored;
            INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate) VALUES ('fill', 'items', 'k', $$UPDATE items SET v = 1 WHERE k = ANY(:keys)$$, 'v = 0')");
    // What the role sees: the standby, without its positions.
    let seen = Session::connect(&as_role);
    let rows = seen.query(
        "SELECT application_name, state IS NULL, replay_lsn IS NULL FROM pg_stat_replication",
    );
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (
            rows[0].get::<_, String>(0),
            rows[0].get::<_, bool>(1),
            rows[0].get::<_, bool>(2)
        ),
        ("standby_a".to_string(), true, true)
    );

    let blind = "role unmonitored cannot see other sessions' statistics (it has neither pg_monitor nor pg_read_all_stats): pg_stat_replication hides standby positions from it (standbys hidden from it now: 1) and pg_stat_activity hides other sessions' lock waits, so the replication-lag and lock probes are blind";
    let env = quick_worker("blind");
    let refused = backfilld_at(&as_role, &["run", "--exit-when-idle"], &env_refs(&env));
    assert_eq!(
        refused.usage_error(),
        format!("backfilld: {blind}; GRANT pg_monitor to it, or set throttle.allow_blind = true to run without these probes")
    );
    assert_eq!(db.job_state("fill"), "pending", "nothing ran");

    let mut env = quick_worker("blind");
    env.push(("BACKFILLD_THROTTLE__ALLOW_BLIND", "true".to_string()));
    let mut daemon = Daemon::start(&as_role, &["--exit-when-idle"], &env_refs(&env));
    daemon.expect_success(RUN_LIMIT);
    assert_eq!(db.job_state("fill"), "succeeded", "{}", daemon.log_text());
    assert!(
        daemon.log_text().contains(&format!(
            "{blind}; running anyway (throttle.allow_blind = true)"
        )),
        "{}",
        daemon.log_text()
    );
}

#[test]
fn a_role_that_may_not_create_the_schema_gets_one_line_naming_the_cause_once() {
    let (_, cluster) = secured();
    let db = TestDb::on(cluster, "no_create");
    db.sql("CREATE ROLE no_create LOGIN PASSWORD 'pw-no_create'");
    let as_role = url(
        "no_create",
        Some("pw-no_create"),
        "127.0.0.1",
        cluster,
        &db.name,
        "",
    );
    let env = [("BACKFILLD_THROTTLE__ALLOW_BLIND", "true")];
    let out = backfilld_at(&as_role, &["run", "--exit-when-idle"], &env);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let fatal: Vec<&str> = out
        .stderr
        .lines()
        .filter(|line| line.starts_with("backfilld: "))
        .collect();
    let cause = format!("permission denied for database {}", db.name);
    assert_eq!(
        fatal,
        [format!(
            "backfilld: applying the backfill schema: creating schema backfill: error returned from database: {cause}"
        )],
        "{}",
        out.stderr
    );
}
