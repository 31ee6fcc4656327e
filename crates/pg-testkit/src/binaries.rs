//! Finding the PostgreSQL programs on this machine.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::TestkitError;

/// Programs that must all live in one directory for that directory to be usable.
const REQUIRED_TOOLS: &[&str] = &[
    "initdb",
    "postgres",
    "pg_ctl",
    "pg_basebackup",
    "psql",
    "pg_isready",
];

/// Parent directories of versioned installs (`<root>/<version>/bin`), newest version wins.
const VERSIONED_ROOTS: &[&str] = &["/usr/lib/postgresql", "/usr/pgsql-"];

/// How to install the binaries, appended to every "not found" error.
const INSTALL_HINT: &str = "\
Install the PostgreSQL server binaries, for example:
  Debian/Ubuntu:  apt-get install -y postgresql
  Fedora/RHEL:    dnf install -y postgresql-server
  Alpine:         apk add postgresql
  macOS:          brew install postgresql@16
or set PG_BINDIR to the directory that holds initdb and postgres.";

/// A directory holding the PostgreSQL server and client programs of one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgBinaries {
    dir: PathBuf,
}

impl PgBinaries {
    /// Finds initdb/postgres/pg_ctl/pg_basebackup/psql/pg_isready: `$PG_BINDIR`, then the
    /// directory of `initdb` on `PATH`, then `pg_config --bindir`, then the newest
    /// `/usr/lib/postgresql/*/bin` (or `/usr/pgsql-*/bin`).
    ///
    /// When nothing usable is found the error says exactly how to install PostgreSQL.
    pub fn locate() -> Result<PgBinaries, TestkitError> {
        SearchEnv::from_process().search()
    }

    /// Uses `dir` as is, after checking that every required program is in it.
    pub fn from_dir(dir: impl Into<PathBuf>) -> Result<PgBinaries, TestkitError> {
        let dir = dir.into();
        match missing_tools(&dir) {
            None => Ok(PgBinaries { dir }),
            Some(missing) => Err(TestkitError::BinariesNotFound(format!(
                "{} lacks {missing}.\n{INSTALL_HINT}",
                dir.display()
            ))),
        }
    }

    /// The directory the programs are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The full path of `tool` (e.g. `"psql"`) in this directory.
    pub fn path(&self, tool: &str) -> PathBuf {
        self.dir.join(tool)
    }
}

/// Everything `locate` looks at, separated from the process environment so the search
/// order can be unit-tested without mutating global state.
#[derive(Debug, Default)]
pub(crate) struct SearchEnv {
    pub(crate) pg_bindir: Option<OsString>,
    pub(crate) path: Option<OsString>,
    pub(crate) versioned_roots: Vec<PathBuf>,
}

impl SearchEnv {
    fn from_process() -> SearchEnv {
        SearchEnv {
            pg_bindir: env::var_os("PG_BINDIR").filter(|v| !v.is_empty()),
            path: env::var_os("PATH"),
            versioned_roots: VERSIONED_ROOTS.iter().map(PathBuf::from).collect(),
        }
    }

    pub(crate) fn search(&self) -> Result<PgBinaries, TestkitError> {
        let mut tried = String::new();

        // An explicit PG_BINDIR that is wrong is a configuration mistake: report it rather
        // than silently using some other installation.
        if let Some(dir) = &self.pg_bindir {
            return PgBinaries::from_dir(PathBuf::from(dir)).map_err(|_| {
                TestkitError::BinariesNotFound(format!(
                    "PG_BINDIR={} does not contain all of {}.\n{INSTALL_HINT}",
                    Path::new(dir).display(),
                    REQUIRED_TOOLS.join(", ")
                ))
            });
        }
        tried.push_str("  - $PG_BINDIR: not set\n");

        match self.find_on_path("initdb") {
            Some(initdb) => {
                // Distributions often put only a few symlinks on PATH (this very machine
                // has /usr/local/bin/initdb but no pg_basebackup there), so prefer the
                // directory the symlink resolves to.
                let mut candidates = Vec::new();
                if let Ok(real) = initdb.canonicalize() {
                    candidates.extend(real.parent().map(Path::to_path_buf));
                }
                candidates.extend(initdb.parent().map(Path::to_path_buf));
                if let Some(found) = first_complete(&candidates) {
                    return Ok(found);
                }
                let _ = writeln!(
                    tried,
                    "  - PATH: {} found, but its directory lacks {}",
                    initdb.display(),
                    candidates
                        .first()
                        .and_then(|d| missing_tools(d))
                        .unwrap_or_default()
                );
            }
            None => tried.push_str("  - PATH: no initdb on PATH\n"),
        }

        match self.find_on_path("pg_config") {
            Some(pg_config) => match pg_config_bindir(&pg_config) {
                Some(dir) => match missing_tools(&dir) {
                    None => return Ok(PgBinaries { dir }),
                    Some(missing) => {
                        let _ = writeln!(
                            tried,
                            "  - pg_config --bindir: {} lacks {missing}",
                            dir.display()
                        );
                    }
                },
                None => {
                    let _ = writeln!(
                        tried,
                        "  - pg_config --bindir: {} gave no answer",
                        pg_config.display()
                    );
                }
            },
            None => tried.push_str("  - pg_config --bindir: no pg_config on PATH\n"),
        }

        for root in &self.versioned_roots {
            let mut versions = versioned_bindirs(root);
            // Newest first.
            versions.sort_by(|a, b| b.0.cmp(&a.0));
            let dirs: Vec<PathBuf> = versions.into_iter().map(|(_, dir)| dir).collect();
            if let Some(found) = first_complete(&dirs) {
                return Ok(found);
            }
            let pattern = if root.is_dir() { "/*/bin" } else { "*/bin" };
            let _ = writeln!(
                tried,
                "  - {}{pattern}: no complete installation",
                root.display()
            );
        }

        Err(TestkitError::BinariesNotFound(format!(
            "PostgreSQL binaries not found (need {} in one directory). Searched:\n{tried}{INSTALL_HINT}",
            REQUIRED_TOOLS.join(", ")
        )))
    }

    fn find_on_path(&self, program: &str) -> Option<PathBuf> {
        let path = self.path.as_deref()?;
        env::split_paths(path)
            .filter(|dir| !dir.as_os_str().is_empty())
            .map(|dir| dir.join(program))
            .find(|candidate| is_executable(candidate))
    }
}

/// Returns the first directory that has every required tool.
fn first_complete(dirs: &[PathBuf]) -> Option<PgBinaries> {
    dirs.iter()
        .find(|dir| missing_tools(dir).is_none())
        .map(|dir| PgBinaries { dir: dir.clone() })
}

/// Names the required tools absent from `dir`, or `None` if all are present.
fn missing_tools(dir: &Path) -> Option<String> {
    let missing: Vec<&str> = REQUIRED_TOOLS
        .iter()
        .copied()
        .filter(|tool| !is_executable(&dir.join(tool)))
        .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn pg_config_bindir(pg_config: &Path) -> Option<PathBuf> {
    let output = Command::new(pg_config)
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let dir = String::from_utf8(output.stdout).ok()?;
    let dir = dir.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// Lists `(version, bin dir)` under `root`: a directory of versions
/// (`/usr/lib/postgresql` → `/usr/lib/postgresql/15/bin`) or a path prefix
/// (`/usr/pgsql-` → `/usr/pgsql-15/bin`).
fn versioned_bindirs(root: &Path) -> Vec<(Vec<u32>, PathBuf)> {
    let (parent, prefix) = if root.is_dir() {
        (root.to_path_buf(), String::new())
    } else {
        match (root.parent(), root.file_name()) {
            (Some(parent), Some(prefix)) => {
                (parent.to_path_buf(), prefix.to_string_lossy().into_owned())
            }
            _ => return Vec::new(),
        }
    };
    let Ok(entries) = parent.read_dir() else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            let version = parse_version(OsStr::new(&name).to_str()?.strip_prefix(&prefix)?)?;
            Some((version, entry.path().join("bin")))
        })
        .collect()
}

/// Parses "15" or "9.6" into comparable numbers; anything else is not a version dir.
fn parse_version(text: &str) -> Option<Vec<u32>> {
    text.split('.').map(|part| part.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty_env() -> SearchEnv {
        SearchEnv {
            pg_bindir: None,
            path: Some(OsString::new()),
            versioned_roots: Vec::new(),
        }
    }

    #[test]
    fn nothing_found_explains_how_to_install() {
        let err = empty_env().search().unwrap_err().to_string();
        assert!(err.contains("apt-get install -y postgresql"), "{err}");
        assert!(err.contains("PG_BINDIR"), "{err}");
        assert!(err.contains("no initdb on PATH"), "{err}");
    }

    #[test]
    fn wrong_pg_bindir_is_reported_not_ignored() {
        let env = SearchEnv {
            pg_bindir: Some("/nonexistent/pg/bin".into()),
            ..SearchEnv::from_process()
        };
        let err = env.search().unwrap_err().to_string();
        assert!(err.contains("PG_BINDIR=/nonexistent/pg/bin"), "{err}");
        assert!(err.contains("apt-get install -y postgresql"), "{err}");
    }

    #[test]
    fn versioned_root_picks_newest_complete_version() {
        let root = tempfile::tempdir().unwrap();
        for (version, complete) in [("9.6", true), ("15", true), ("16", false)] {
            let bin = root.path().join(version).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            for tool in REQUIRED_TOOLS {
                if complete || *tool == "initdb" {
                    let path = bin.join(tool);
                    std::fs::write(&path, "#!/bin/sh\n").unwrap();
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                        .unwrap();
                }
            }
        }
        let env = SearchEnv {
            versioned_roots: vec![root.path().to_path_buf()],
            ..empty_env()
        };
        let found = env.search().unwrap();
        assert_eq!(found.dir(), root.path().join("15").join("bin"));
        assert_eq!(found.path("psql"), root.path().join("15/bin/psql"));
    }

    #[test]
    fn locate_finds_a_real_installation() {
        let bins = PgBinaries::locate().unwrap();
        for tool in REQUIRED_TOOLS {
            assert!(is_executable(&bins.path(tool)), "{tool} in {bins:?}");
        }
    }

    #[test]
    fn version_parsing() {
        assert_eq!(parse_version("15"), Some(vec![15]));
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert_eq!(parse_version("15-beta"), None);
        assert!(parse_version("16") > parse_version("9.6"));
    }
}
