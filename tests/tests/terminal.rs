//! The operator's terminal: `status` fits 80 columns and escapes control characters in
//! job names, the demo's progress line fits a real 80-column terminal (tmux), `enqueue`
//! documents every option and takes `--not-before` and `--paused`, and fatal errors are
//! JSON lines when the logs are.

use std::process::Command;
use std::time::Duration;

use backfilld_e2e::{backfilld_at, backfilld_bin, readme_engineer_grants, wait_until, TestDb};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(90);

/// Lines of `text` wider than `width` characters.
fn wider_than(text: &str, width: usize) -> Vec<&str> {
    text.lines()
        .filter(|line| line.chars().count() > width)
        .collect()
}

/// The test database as `role` instead of the superuser.
fn url_as(db: &TestDb, role: &str) -> String {
    db.url().replacen("postgres@", &format!("{role}@"), 1)
}

/// A tmux server of the test's own (its socket in a tempdir), killed on drop.
struct Tmux {
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmux {
    /// Runs `command` in an 80x40 terminal; the pane stays after it exits, saying `exit N`.
    fn run(command: &str) -> Tmux {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("tmux.sock");
        let script = dir.path().join("run.sh");
        // `exec cat` keeps the pane (and what it shows) after the command ends.
        std::fs::write(&script, format!("{command}\necho \"exit $?\"\nexec cat\n"))
            .expect("write run.sh");
        let status = Command::new("tmux")
            .arg("-S")
            .arg(&socket)
            .args([
                "-f",
                "/dev/null",
                "new-session",
                "-d",
                "-x",
                "80",
                "-y",
                "40",
            ])
            .arg(format!("sh {}", script.display()))
            .env("TERM", "xterm")
            .status()
            .expect("tmux not found (Debian: apt-get install tmux)");
        assert!(status.success(), "tmux new-session failed");
        Tmux { socket, _dir: dir }
    }

    /// The pane's text, lines that wrapped at the edge joined back into one.
    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(["capture-pane", "-p", "-J", "-S", "-", "-t", "0"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits for the command to end; returns the screen.
    fn wait_for_exit(&self) -> String {
        let mut screen = String::new();
        wait_until("the command in tmux to end", LIMIT, || {
            screen = self.screen();
            screen.lines().any(|line| line.starts_with("exit "))
        });
        screen
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .status();
    }
}

/// `env NAME=value … backfilld args…` for a shell in tmux (values quoted).
fn shell_command(env: &[(&str, &str)], args: &[&str]) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    let mut words: Vec<String> = ["env", "-u", "COLUMNS", "BACKFILLD_HTTP__LISTEN="]
        .map(str::to_string)
        .to_vec();
    words.extend(env.iter().map(|(k, v)| format!("{k}={}", quote(v))));
    words.push(quote(&backfilld_bin().display().to_string()));
    words.extend(args.iter().map(|a| quote(a)));
    words.join(" ")
}

fn enqueue_two_jobs(db: &TestDb) {
    db.sql(
        "CREATE TABLE items (k int PRIMARY KEY, v int NOT NULL DEFAULT 0);
         INSERT INTO items (k) SELECT generate_series(1, 100);
         INSERT INTO backfill.jobs (name, table_name, key_column, batch_sql, pending_predicate)
         VALUES ('a_rather_long_job_name_for_a_narrow_terminal', 'public.items', 'k',
                 $$UPDATE items SET v = 1 WHERE k = ANY(:keys)$$, 'v = 0'),
                (E'evil\\n\\x1b[2J', 'public.items', 'k',
                 $$UPDATE items SET v = 2 WHERE k = ANY(:keys)$$, 'v = 0');",
    );
}

#[test]
fn status_fits_80_columns_and_escapes_control_characters() {
    let db = TestDb::new("term_status");
    db.migrate();
    enqueue_two_jobs(&db);
    // Not a terminal, no COLUMNS: 80 columns; COLUMNS is obeyed.
    for (columns, width) in [(None, 80), (Some("80"), 80), (Some("60"), 60)] {
        let env: Vec<(&str, &str)> = columns.map(|c| ("COLUMNS", c)).into_iter().collect();
        let out = backfilld_at(&db.url(), &["status"], &env);
        assert!(out.status.success(), "{out:?}");
        assert!(
            wider_than(&out.stdout, width).is_empty(),
            "lines wider than {width}:\n{}",
            out.stdout
        );
        // Each job's state and progress bar stay on one line (its name may wrap).
        let rows: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| l.contains(" pending "))
            .collect();
        assert_eq!(rows.len(), 2, "{}", out.stdout);
        assert!(
            rows.iter().all(|row| row.contains("..........   0.0%")),
            "{}",
            out.stdout
        );
        assert!(
            !out.stdout.contains('\u{1b}'),
            "a raw ESC reached the terminal"
        );
    }
    // Wide enough for every cell on one line: the evil name is one line, escaped.
    let out = backfilld_at(&db.url(), &["status"], &[("COLUMNS", "200")]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        out.stdout.lines().count(),
        3,
        "a header and two jobs:\n{}",
        out.stdout
    );
    assert!(
        out.stdout
            .lines()
            .any(|line| line.starts_with(r"evil\n\u{1b}[2J ")),
        "{}",
        out.stdout
    );
    // On a real 80-column terminal (tmux), nothing wraps.
    let tmux = Tmux::run(&shell_command(&[("DATABASE_URL", &db.url())], &["status"]));
    let screen = tmux.wait_for_exit();
    assert!(screen.contains("exit 0"), "{screen}");
    assert!(screen.contains("a_rather_long"), "{screen}");
    assert!(
        wider_than(&screen, 80).is_empty(),
        "wrapped at 80 columns:\n{screen}"
    );
}

#[test]
fn the_demo_progress_line_fits_an_80_column_terminal() {
    let tmux = Tmux::run(&shell_command(
        &[("PATH", &std::env::var("PATH").unwrap_or_default())],
        &["demo", "--rows", "20000"],
    ));
    let screen = tmux.wait_for_exit();
    assert!(screen.contains("exit 0"), "the demo failed:\n{screen}");
    let progress: Vec<&str> = screen
        .lines()
        .filter(|line| line.starts_with("split_full_name ["))
        .collect();
    assert!(!progress.is_empty(), "no progress line:\n{screen}");
    assert!(
        progress.iter().any(|line| line.contains("100.0%")),
        "the last progress line shows the job done:\n{screen}"
    );
    // (The SQL the demo echoes keeps its own layout; the progress line must not wrap.)
    let wide: Vec<&str> = progress
        .into_iter()
        .filter(|l| l.chars().count() > 80)
        .collect();
    assert!(
        wide.is_empty(),
        "progress wrapped at 80 columns: {wide:?}\n{screen}"
    );
}

/// The options of `backfilld enqueue --help` without a description.
fn undocumented_options(help: &str) -> Vec<String> {
    let mut options: Vec<(String, String)> = Vec::new();
    for line in help.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('-') {
            // "-x, --long <VALUE>  Description" or the description on the next lines.
            let (spec, description) = trimmed.split_once("  ").unwrap_or((trimmed, ""));
            options.push((spec.to_string(), description.trim().to_string()));
        } else if let Some((_, description)) = options.last_mut() {
            if line.starts_with("  ") {
                description.push_str(trimmed);
            }
        }
    }
    assert!(options.len() >= 16, "options found: {options:?}\n{help}");
    options
        .into_iter()
        .filter(|(_, description)| description.is_empty())
        .map(|(spec, _)| spec)
        .collect()
}

#[test]
fn enqueue_documents_every_option_and_takes_not_before_and_paused() {
    let help = Command::new(backfilld_bin())
        .args(["enqueue", "--help"])
        .output()
        .expect("backfilld enqueue --help");
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    assert_eq!(undocumented_options(&help), Vec::<String>::new(), "{help}");

    let db = TestDb::new("term_enqueue");
    db.migrate();
    db.sql(&format!(
        "CREATE TABLE items (k int PRIMARY KEY, v int NOT NULL DEFAULT 0);
         CREATE ROLE eng_{name} LOGIN; {grants}",
        name = db.name,
        grants = readme_engineer_grants(&format!("eng_{}", db.name), "items")
    ));
    // As an engineer with README's grants, who may not write the state column.
    let url = url_as(&db, &format!("eng_{}", db.name));
    let job = |name: &str| -> Vec<String> {
        [
            "enqueue",
            "--name",
            name,
            "--table",
            "items",
            "--key",
            "k",
            "--sql",
            "UPDATE items SET v = 1 WHERE k = ANY(:keys)",
            "--pending",
            "v = 0",
        ]
        .map(str::to_string)
        .to_vec()
    };
    let run = |args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        backfilld_at(&url, &args, &[])
    };
    let mut later = job("later");
    later.extend(["--not-before".into(), "2030-01-31T23:00:00+01:00".into()]);
    let out = run(&later);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        db.sql("SELECT state || ' ' || (not_before AT TIME ZONE 'UTC') FROM backfill.jobs WHERE name = 'later'"),
        "pending 2030-01-31 22:00:00"
    );
    let mut held = job("held");
    held.push("--paused".into());
    let out = run(&held);
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("(paused)"), "{}", out.stdout);
    assert_eq!(db.job_state("held"), "paused");
    assert_eq!(
        db.sql("SELECT enqueued_by FROM backfill.jobs WHERE name = 'held'"),
        format!("eng_{}", db.name)
    );
    let out = backfilld_at(&url, &["resume", "held"], &[]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(db.job_state("held"), "pending");
    // A refused definition leaves no job behind, paused or not.
    let mut bad = job("bad");
    bad.extend(["--paused".into(), "--batch-size".into(), "0".into()]);
    let out = run(&bad);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        db.int("SELECT count(*) FROM backfill.jobs WHERE name = 'bad'"),
        0
    );
    // A time that is not RFC 3339 is refused, naming the option.
    let mut vague = job("vague");
    vague.extend(["--not-before".into(), "tomorrow".into()]);
    let line = run(&vague).usage_error().to_string();
    assert!(
        line.contains("--not-before") && line.contains("RFC 3339"),
        "{line}"
    );
}

#[test]
fn fatal_errors_are_json_lines_with_json_logs() {
    let db = TestDb::new("term_json_errors");
    db.migrate();
    // Exit 2 (no such job) and exit 1 (the database never answers).
    let usage = backfilld_at(
        &db.url(),
        &["pause", "nosuchjob"],
        &[("BACKFILLD_LOG__FORMAT", "json")],
    );
    let unreachable = backfilld_at(
        "postgres://postgres@127.0.0.1:1/none",
        &["status"],
        &[
            ("BACKFILLD_LOG__FORMAT", "json"),
            ("BACKFILLD_DATABASE__STARTUP_TIMEOUT", "1s"),
        ],
    );
    for (out, code, says) in [
        (&usage, 2, "nosuchjob"),
        (&unreachable, 1, "cannot connect"),
    ] {
        assert_eq!(out.status.code(), Some(code), "{out:?}");
        let lines: Vec<Value> = out
            .stderr
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
            })
            .collect();
        let last = lines.last().expect("an error line");
        assert_eq!(last["level"], "ERROR", "{last}");
        assert_eq!(last["exit_code"], code, "{last}");
        assert!(
            last["message"].as_str().is_some_and(|m| m.contains(says)),
            "{last}"
        );
    }
    // Text logs keep the plain line.
    let text = backfilld_at(
        &db.url(),
        &["pause", "nosuchjob"],
        &[("BACKFILLD_LOG__FORMAT", "text")],
    );
    let line = text.usage_error();
    assert!(
        line.starts_with("backfilld: ") && line.contains("nosuchjob"),
        "{line}"
    );
}
