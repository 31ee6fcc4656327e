//! Starting a primary: initdb, the settings every throwaway primary runs with, and its
//! first launch.

use super::names::validate_setting_name;
use super::server::launch_on_free_port;
use super::setup::{append_conf, cached_binaries, run_tool, Layout};
use super::{PgCluster, LOOPBACK, SUPERUSER};
use crate::binaries::PgBinaries;
use crate::error::TestkitError;
use crate::process::{as_server_user, server_command, server_user};

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
