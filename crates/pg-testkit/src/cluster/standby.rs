//! Starting a streaming standby of a primary: clone it with `pg_basebackup -R`, name the
//! standby, launch it and wait until the primary sees it streaming.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::thread;
use std::time::{Duration, Instant};

use super::names::validate_standby_name;
use super::server::launch_on_free_port;
use super::setup::{append_conf, run_tool, Layout};
use super::{PgCluster, LOOPBACK, POLL_INTERVAL, SUPERUSER};
use crate::error::TestkitError;
use crate::process::{as_server_user, server_command};

/// Longest a new standby may take to show up as streaming on its primary.
const STREAM_TIMEOUT: Duration = Duration::from_secs(30);

impl PgCluster {
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
}
