//! Lock waits read from the primary's log (`log_lock_waits`, see the fixture's server
//! settings): who waited, on whose lock, and for how long in the end.

use std::collections::{HashMap, HashSet};
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::Path;

use anyhow::Context as _;

/// One lock wait that lasted longer than `deadlock_timeout` and then got its lock.
#[derive(Debug, Clone, PartialEq)]
pub struct LockWait {
    /// The waiting session's application_name.
    pub waiter: String,
    /// Backends holding the lock when the wait was first logged.
    pub holders: Vec<i32>,
    /// The whole wait, as the server measured it.
    pub wait_ms: f64,
}

/// The log's current length, to read only what a scenario adds.
pub fn log_offset(log: &Path) -> anyhow::Result<u64> {
    Ok(std::fs::metadata(log)
        .with_context(|| format!("reading the size of {}", log.display()))?
        .len())
}

/// Lock waits logged in `log` from byte `offset` on.
pub fn read_since(log: &Path, offset: u64) -> anyhow::Result<Vec<LockWait>> {
    let mut file =
        std::fs::File::open(log).with_context(|| format!("opening {}", log.display()))?;
    file.seek(SeekFrom::Start(offset))
        .with_context(|| format!("seeking in {}", log.display()))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", log.display()))?;
    Ok(parse(&String::from_utf8_lossy(&bytes)))
}

/// The longest wait of an `application` session on a lock held by one of `holders`.
pub fn longest_wait_on(waits: &[LockWait], application: &str, holders: &HashSet<i32>) -> f64 {
    waits
        .iter()
        .filter(|w| w.waiter == application && w.holders.iter().any(|h| holders.contains(h)))
        .map(|w| w.wait_ms)
        .fold(0.0, f64::max)
}

/// Parses log lines written with `log_line_prefix = '%m [%p] %a: '`.
///
/// A wait shows as `process P still waiting for … after X ms`, a DETAIL line naming the
/// holders, and later `process P acquired … after Y ms`: Y is the whole wait.
fn parse(text: &str) -> Vec<LockWait> {
    let mut waiting: HashMap<i32, LockWait> = HashMap::new();
    let mut done = Vec::new();
    for line in text.lines() {
        let Some((pid, application, message)) = split_prefix(line) else {
            continue; // continuation of a multi-line message
        };
        if let Some(rest) = message.strip_prefix("LOG:  process ") {
            if rest.contains(" still waiting for ") {
                waiting.insert(
                    pid,
                    LockWait {
                        waiter: application.to_string(),
                        holders: Vec::new(),
                        wait_ms: 0.0,
                    },
                );
            } else if rest.contains(" acquired ") {
                if let (Some(mut wait), Some(ms)) = (waiting.remove(&pid), after_ms(rest)) {
                    wait.wait_ms = ms;
                    done.push(wait);
                }
            }
        } else if let Some(detail) = message.strip_prefix("DETAIL:  ") {
            let holders = detail
                .strip_prefix("Process holding the lock: ")
                .or_else(|| detail.strip_prefix("Processes holding the lock: "))
                .and_then(|rest| rest.split(". Wait queue").next());
            if let (Some(wait), Some(holders)) = (waiting.get_mut(&pid), holders) {
                wait.holders = holders
                    .split(", ")
                    .filter_map(|h| h.trim().parse().ok())
                    .collect();
            }
        }
    }
    done
}

/// `(pid, application_name, message)` of a prefixed log line.
fn split_prefix(line: &str) -> Option<(i32, &str, &str)> {
    let open = line.find(" [")?;
    let close = open + line[open..].find("] ")?;
    let pid = line[open + 2..close].parse().ok()?;
    let rest = &line[close + 2..];
    let colon = rest.find(": ")?;
    Some((pid, &rest[..colon], &rest[colon + 2..]))
}

/// The `X` of a message ending in `after X ms`.
fn after_ms(message: &str) -> Option<f64> {
    message
        .rsplit_once(" after ")?
        .1
        .strip_suffix(" ms")?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
2025-01-01 10:00:00.000 UTC [200] pgbench: LOG:  process 200 still waiting for ShareLock on transaction 900 after 50.120 ms
2025-01-01 10:00:00.000 UTC [200] pgbench: DETAIL:  Process holding the lock: 77. Wait queue: 200.
2025-01-01 10:00:00.000 UTC [200] pgbench: CONTEXT:  while updating tuple (3,4) in relation \"users\"
2025-01-01 10:00:00.000 UTC [200] pgbench: STATEMENT:  UPDATE public.users
\t   SET last_seen_at = now() WHERE id = 5;
2025-01-01 10:00:00.100 UTC [201] pgbench: LOG:  process 201 still waiting for ExclusiveLock on tuple (1,2) of relation 16384 of database 5 after 51.000 ms
2025-01-01 10:00:00.100 UTC [201] pgbench: DETAIL:  Processes holding the lock: 200, 78. Wait queue: 201.
2025-01-01 10:00:00.180 UTC [200] pgbench: LOG:  process 200 acquired ShareLock on transaction 900 after 180.500 ms
2025-01-01 10:00:00.200 UTC [201] pgbench: LOG:  process 201 acquired ExclusiveLock on tuple (1,2) of relation 16384 of database 5 after 99.000 ms
2025-01-01 10:00:00.300 UTC [300] backfilld: LOG:  process 300 still waiting for ShareLock on transaction 901 after 50.000 ms
2025-01-01 10:00:00.300 UTC [300] backfilld: DETAIL:  Process holding the lock: 200. Wait queue: 300.
2025-01-01 10:00:00.400 UTC [300] backfilld: LOG:  process 300 acquired ShareLock on transaction 901 after 70.000 ms
";

    #[test]
    fn reads_whole_waits_with_their_holders() {
        let waits = parse(LOG);
        assert_eq!(waits.len(), 3);
        assert_eq!(
            waits[0],
            LockWait {
                waiter: "pgbench".to_string(),
                holders: vec![77],
                wait_ms: 180.5
            }
        );
        assert_eq!(waits[1].holders, vec![200, 78]);
        assert_eq!(waits[2].waiter, "backfilld");
    }

    #[test]
    fn longest_wait_counts_only_the_named_holders_and_waiter() {
        let waits = parse(LOG);
        assert_eq!(
            longest_wait_on(&waits, "pgbench", &HashSet::from([77])),
            180.5
        );
        assert_eq!(
            longest_wait_on(&waits, "pgbench", &HashSet::from([78])),
            99.0
        );
        assert_eq!(longest_wait_on(&waits, "pgbench", &HashSet::from([5])), 0.0);
    }
}
