//! backfill-bench: how close backfilld comes to the database's own speed on an idle
//! primary, and how little production notices it on a busy one — in one run, side by side.
//!
//! On a throwaway primary with a streaming standby it seeds the split-name table once,
//! then runs on a fresh copy each: (1) the single UPDATE, (2) a PL/pgSQL keyset loop
//! committing every 10 000 keys, (3) backfilld with its limits off, (4) backfilld with
//! default throttling under a fixed-rate pgbench load, and pgbench alone as the baseline,
//! (5) backfilld with its limits off without and with undo data (`keep_undo`);
//! then, unless `--quick`, memory-only runs of backfilld at other table sizes. It prints
//! one table and the targets, and writes them into docs/BENCHMARKS.md.
//! `scripts/bench` builds the release binaries and runs this.

mod daemon;
mod fixture;
mod frontier;
mod idle_cost;
mod lockwaits;
mod pgbench;
mod procfs;
mod report;
mod sampler;
mod scenarios;
mod sli;
mod stats;
mod walwaits;

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, ValueEnum};

use crate::daemon::Daemon;
use crate::fixture::Fixture;
use crate::pgbench::LoadShape;
use crate::report::Report;
use crate::scenarios::{expected_standby_setting, Bench, JobForm};

/// backfilld's best settings with its limits off (scenario 3 and the memory runs): lag
/// limits out of reach, no sharing with production, neither the duty cycle nor the impact
/// budget (the benchmark's own sampler is a session at work on the primary); the batch size is each statement form's best
/// (`JobForm::batch_keys`, see docs/BENCHMARKS.md).
const UNTHROTTLED_SETTINGS: &[(&str, &str)] = &[
    ("BACKFILLD_THROTTLE__MAX_LAG", "1h"),
    ("BACKFILLD_THROTTLE__MAX_LAG_BYTES", "1099511627776"),
    ("BACKFILLD_THROTTLE__BUSY_DUTY_CYCLE", "1"),
    ("BACKFILLD_THROTTLE__IMPACT_BUDGET_RATIO", "0"),
];

/// The benchmark's scenarios, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Single,
    Plpgsql,
    Unthrottled,
    Throttled,
    Memory,
    /// Scenario 5: the key-array job with and without keep_undo (issue 17).
    Undo,
    /// The impact budget's frontier: rows/s against production's p99 (issue 19).
    Frontier,
    /// What a daemon with nothing to backfill costs the primary's CPU (issue 19).
    IdleCost,
}

/// Benchmarks backfilld against a single UPDATE and a PL/pgSQL loop, idle and under load.
#[derive(Debug, Parser)]
#[command(name = "backfill-bench")]
struct Options {
    /// Rows in the table each scenario backfills.
    #[arg(long, default_value_t = 2_000_000)]
    rows: i64,
    /// A short run for CI: no memory-only runs, short pgbench warm-up and baseline, and the
    /// doc is left alone unless --out is given.
    #[arg(long)]
    quick: bool,
    /// The backfilld binary (default: the one next to this program).
    #[arg(long)]
    backfilld: Option<PathBuf>,
    /// Markdown file whose generated section receives the results
    /// (default: docs/BENCHMARKS.md, except with --quick).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Transactions per second pgbench offers.
    #[arg(long, default_value_t = 200)]
    pgbench_rate: u32,
    /// pgbench client sessions.
    #[arg(long, default_value_t = 8)]
    pgbench_clients: u32,
    /// Table sizes of the memory-only runs.
    #[arg(long, value_delimiter = ',', default_values_t = [100_000, 10_000_000])]
    memory_rows: Vec<i64>,
    /// Run only these scenarios (comma-separated).
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Scenario>,
    /// Job statement forms of the limits-off runs (each its own row); the memory-only
    /// runs use the first (by default the best measured, like the slice count below).
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [JobForm::Range, JobForm::KeyArray])]
    forms: Vec<JobForm>,
    /// Slices (`parallelism`, run by one daemon with as many job slots) of the limits-off
    /// runs: each count with each form; the memory-only runs use the first.
    #[arg(long, value_delimiter = ',', default_values_t = [2, 1, 4])]
    parallelism: Vec<u32>,
    /// Extra KEY=VALUE environment for the limits-off runs, e.g.
    /// BACKFILLD_BATCH__MAX_SIZE=50000 (to try settings).
    #[arg(long = "unthrottled-setting", value_parser = parse_setting)]
    unthrottled_settings: Vec<(String, String)>,
    /// Extra KEY=VALUE environment for the run under load, on top of the defaults (e.g.
    /// BACKFILLD_THROTTLE__MAX_ROWS_PER_SECOND=20000, to see what it takes).
    #[arg(long = "throttled-setting", value_parser = parse_setting)]
    throttled_settings: Vec<(String, String)>,
    /// Skip scenario 4b (default throttling with sharing the primary turned off, to show
    /// what sharing buys; never run with --quick).
    #[arg(long)]
    skip_unshared: bool,
    /// Also run scenario 4 with this `throttle.max_rows_per_second` as 4c (0: don't; never
    /// with --quick).
    #[arg(long, default_value_t = 0)]
    rate_limited: u32,
    /// Rows of the frontier's orders table (`--frontier-full`: the 2,000,000): at
    /// light load the default climbs past 40,000 rows/s, and the job must not end within
    /// the window.
    #[arg(long, default_value_t = 600_000)]
    frontier_rows: i64,
    /// The frontier at full size: 2,000,000 orders rows (slow: the copies dominate).
    #[arg(long)]
    frontier_full: bool,
    /// pgbench rates of the frontier: light, medium, heavy (600: near what the 2-core
    /// benchmark machine serves with durable commits; 1,000 overloaded it by itself while
    /// others were building).
    #[arg(long, value_delimiter = ',', default_values_t = [20, 200, 600])]
    frontier_rates: Vec<u32>,
    /// Rounds of the frontier (medians and ranges over them).
    #[arg(long, default_value_t = 3)]
    frontier_rounds: u32,
    /// Seconds each frontier competitor runs before its window opens.
    #[arg(long, default_value_t = 3)]
    frontier_settle: u64,
    /// Seconds backfilld's default settles on top of --frontier-settle (its pace climbs:
    /// a first rest of about five seconds, then it doubles from 1,000 rows/s each time some
    /// two hundred canaries show calm, ten seconds or more at the default 50 ms interval, and
    /// then creeps: at 25 s it was still climbing, and the window measured the climb).
    #[arg(long, default_value_t = 55)]
    frontier_climb: u64,
    /// Seconds of each frontier competitor's measured window.
    #[arg(long, default_value_t = 10)]
    frontier_window: u64,
    /// Fewest pgbench transactions in a frontier window (the window stretches at low rates:
    /// a p99 needs a few hundred).
    #[arg(long, default_value_t = 1000)]
    frontier_min_transactions: u32,
    /// Fixed `max_rows_per_second` of the frontier's fixed-rate backfilld runs (0: none).
    #[arg(long, value_delimiter = ',', default_values_t = [500, 1000, 2500])]
    frontier_fixed_rates: Vec<u32>,
    /// A variant of backfilld's default in the frontier, KEY=VALUE, or several separated by
    /// spaces (repeatable; e.g. BACKFILLD_THROTTLE__IMPACT_FLOOR=3ms, to compare a setting
    /// with its default).
    #[arg(long = "frontier-variant", value_parser = parse_settings)]
    frontier_variants: Vec<Vec<(String, String)>>,
    /// Another backfilld binary whose default runs in the frontier too (repeatable; e.g.
    /// the parent commit's build, to compare a code change with it in the same run).
    #[arg(long = "frontier-compare-binary")]
    frontier_compare_binaries: Vec<PathBuf>,
    /// Also run backfilld's default reading production's p99 from Prometheus
    /// (`throttle.impact_sli_query`) over a range of this many seconds, one run for each
    /// range given (e.g. 10,20): pgbench's latencies served to a Prometheus the bench
    /// starts, scraping every second (0: not run); each `--frontier-compare-binary` reads
    /// it too.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    frontier_sli_range: Vec<u64>,
    /// backfilld daemons per frontier run of backfilld (the pods of one Job; the job is
    /// cut into as many slices, and a fixed rate is each daemon's).
    #[arg(long, default_value_t = 1)]
    frontier_pods: u32,
    /// Seconds between the starts of a frontier run's pods (a Job's pods start apart).
    #[arg(long, default_value_t = 13.37)]
    frontier_pod_stagger: f64,
    /// Sleeps (ms) of the frontier's naive batch-then-sleep loops (0: none).
    #[arg(long, value_delimiter = ',', default_values_t = [200, 1000])]
    frontier_sleeps: Vec<u64>,
    /// The frontier's load step, once per round: pgbench FROM tx/s, then TO, then FROM
    /// again, next to backfilld's default.
    #[arg(long, value_delimiter = ',', default_values_t = [20, 200])]
    frontier_step: Vec<u32>,
    /// Seconds of each phase of the load step (0: no step).
    #[arg(long, default_value_t = 20)]
    frontier_step_phase: u64,
    /// Rows of the load step's orders table.
    #[arg(long, default_value_t = 1_000_000)]
    frontier_step_rows: i64,
    /// backfilld binaries of the idle-cost runs (repeatable; default: the one under test),
    /// e.g. the parent commit's build next to this one.
    #[arg(long = "idle-cost-binary")]
    idle_cost_binaries: Vec<PathBuf>,
    /// Rounds of the idle-cost runs (the binaries alternate within each).
    #[arg(long, default_value_t = 3)]
    idle_cost_rounds: u32,
    /// Seconds of each idle-cost run's measured window.
    #[arg(long, default_value_t = 30)]
    idle_cost_window: u64,
    /// Keep the daemon logs in this directory (default: a temporary one).
    #[arg(long)]
    logs: Option<PathBuf>,
}

fn parse_setting(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    Ok((key.to_string(), value.to_string()))
}

/// Several KEY=VALUE settings separated by spaces (one variant that changes more than one
/// setting: e.g. a cap on the rate and rare rests, to tell their costs apart).
fn parse_settings(text: &str) -> Result<Vec<(String, String)>, String> {
    let settings = text
        .split_whitespace()
        .map(parse_setting)
        .collect::<Result<Vec<_>, _>>()?;
    if settings.is_empty() {
        return Err("a variant needs at least one KEY=VALUE".to_string());
    }
    Ok(settings)
}

/// backfilld's default settings (`base`) reading production's p99 over `range` from the
/// bench's Prometheus: the window covers the range, a scrape and pgbench's buffered log.
fn sli_settings(
    base: &[(String, String)],
    server: &sli::SliServer,
    range: Duration,
) -> Vec<(String, String)> {
    let mut settings = base.to_vec();
    settings.extend([
        (
            "BACKFILLD_THROTTLE__PROMETHEUS_URL".to_string(),
            server.url(),
        ),
        (
            "BACKFILLD_THROTTLE__IMPACT_SLI_QUERY".to_string(),
            sli::SliServer::p99_query(range),
        ),
        (
            "BACKFILLD_THROTTLE__IMPACT_SLI_WINDOW".to_string(),
            format!("{}s", range.as_secs() + 3),
        ),
    ]);
    settings
}

fn main() -> ExitCode {
    let options = Options::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build();
    let result = runtime
        .context("starting the async runtime")
        .and_then(|runtime| runtime.block_on(run(options)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("backfill-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: Options) -> anyhow::Result<()> {
    if options.rows < 1 {
        bail!("--rows must be at least 1, got {}", options.rows);
    }
    if options.frontier_step.len() != 2 {
        bail!(
            "--frontier-step takes two rates, FROM,TO; got {:?}",
            options.frontier_step
        );
    }
    let daemon = Daemon {
        binary: match &options.backfilld {
            Some(path) => path.clone(),
            None => std::env::current_exe()
                .context("locating this program")?
                .with_file_name("backfilld"),
        },
    };
    if !daemon.binary.is_file() {
        bail!(
            "{} is missing: build it first (scripts/bench does: cargo build --release -p backfilld)",
            daemon.binary.display()
        );
    }
    if let Some(missing) = options
        .frontier_compare_binaries
        .iter()
        .find(|binary| !binary.is_file())
    {
        bail!(
            "--frontier-compare-binary {}: no such file (build that backfilld first)",
            missing.display()
        );
    }
    let wants = |s: Scenario| options.only.is_empty() || options.only.contains(&s);
    let load_before = load_average();
    let temp_logs = tempfile::tempdir().context("creating a temp dir for daemon logs")?;
    let work_dir = options
        .logs
        .clone()
        .unwrap_or_else(|| temp_logs.path().to_path_buf());
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;

    progress(format_args!(
        "starting a throwaway primary and standby, seeding {} rows…",
        options.rows
    ));
    let fixture = Fixture::start()?;
    fixture.seed_template("bench_template", options.rows)?;
    let load = LoadShape {
        rate: options.pgbench_rate,
        clients: options.pgbench_clients,
        users_rows: options.rows,
    };
    let mut bench = Bench {
        fixture,
        daemon,
        template: "bench_template".to_string(),
        rows: options.rows,
        work_dir,
        load,
        warmup: Duration::from_secs(if options.quick { 1 } else { 3 }),
        reference: None,
    };
    let mut unthrottled: Vec<(String, String)> = UNTHROTTLED_SETTINGS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    unthrottled.extend(options.unthrottled_settings.iter().cloned());
    let mut throttled = vec![expected_standby_setting()];
    throttled.extend(options.throttled_settings.iter().cloned());

    let mut report = Report::default();
    if wants(Scenario::Single) {
        report.single = Some(done(bench.single_update().await?));
    }
    if wants(Scenario::Plpgsql) {
        report.plpgsql = Some(done(bench.plpgsql_loop().await?));
    }
    if wants(Scenario::Unthrottled) {
        for &form in &options.forms {
            for &parallelism in &options.parallelism {
                let measurement = bench
                    .backfilld_unthrottled(&unthrottled, form, parallelism)
                    .await?;
                report.unthrottled.push(done(measurement));
            }
        }
    }
    if wants(Scenario::Undo) {
        for undo in [None, Some(Some("first_name,last_name")), Some(None)] {
            let measurement = bench.backfilld_with_undo(&unthrottled, undo).await?;
            report.undo.push(done(measurement));
        }
    }
    if wants(Scenario::Throttled) {
        let bounds = if options.quick {
            (Duration::from_secs(2), Duration::from_secs(10))
        } else {
            (Duration::from_secs(10), Duration::from_secs(120))
        };
        let name = format!(
            "4. backfilld, default throttle, {}, under pgbench",
            JobForm::KeyArray.label()
        );
        let loaded = done(bench.backfilld_under_load(&throttled, &name).await?);
        let mut longest = loaded.observed.wall;
        report.loaded.push(loaded);
        let mut variants = Vec::new();
        if !options.skip_unshared && !options.quick {
            variants.push((
                "4b. backfilld, default throttle without sharing (impact_budget_ratio = 0, busy_duty_cycle = 1)"
                    .to_string(),
                vec![
                    ("BACKFILLD_THROTTLE__IMPACT_BUDGET_RATIO", "0".to_string()),
                    ("BACKFILLD_THROTTLE__BUSY_DUTY_CYCLE", "1".to_string()),
                ],
            ));
        }
        if options.rate_limited > 0 && !options.quick {
            let rate = options.rate_limited;
            variants.push((
                format!("4c. backfilld, default throttle + max_rows_per_second = {rate}"),
                vec![("BACKFILLD_THROTTLE__MAX_ROWS_PER_SECOND", rate.to_string())],
            ));
        }
        for (label, extra) in variants {
            let mut settings = throttled.clone();
            settings.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v)));
            let name = format!("{label}, under pgbench");
            let variant = done(bench.backfilld_under_load(&settings, &name).await?);
            longest = longest.max(variant.observed.wall);
            report.loaded.push(variant);
        }
        let length = longest
            .saturating_sub(bench.warmup)
            .clamp(bounds.0, bounds.1);
        report.baseline = Some(done(bench.pgbench_alone(length).await?));
    }
    let memory_form = options.forms.first().copied().unwrap_or(JobForm::KeyArray);
    let memory_slices = options.parallelism.first().copied().unwrap_or(1);
    if let Some(same_settings) = report.unthrottled.first() {
        // Scenario 3's first run has the memory runs' settings: the same curve.
        if let Some(run) = &same_settings.daemon {
            report.memory.push((options.rows, run.clone()));
        }
    }
    if wants(Scenario::Memory) && !options.quick {
        for &rows in &options.memory_rows {
            progress(format_args!("memory-only run at {rows} rows…"));
            let run = bench
                .daemon_memory(rows, &unthrottled, memory_form, memory_slices)
                .await?;
            progress(format_args!(
                "  {rows} rows: {:.1} s, peak RSS {:.1} MiB",
                run.wall.as_secs_f64(),
                run.usage.peak_rss_bytes as f64 / (1024.0 * 1024.0)
            ));
            report.memory.push((rows, run));
        }
    }
    report.memory.sort_by_key(|(rows, _)| *rows);
    let mut frontier_markdown = None;
    // Minutes long: with --quick (the CI smoke run) only when asked for by name.
    let frontier_wanted =
        options.only.contains(&Scenario::Frontier) || (options.only.is_empty() && !options.quick);
    if frontier_wanted {
        let mut competitors = frontier::default_competitors(
            &throttled,
            &options.frontier_fixed_rates,
            &options.frontier_sleeps,
            &options.frontier_variants,
            &options.frontier_compare_binaries,
        );
        let sli_ranges: Vec<u64> = options
            .frontier_sli_range
            .iter()
            .copied()
            .filter(|range| *range > 0)
            .collect();
        // Kept until the frontier is done: the Prometheus the SLI competitors read.
        let sli_server = if sli_ranges.is_empty() {
            None
        } else {
            Some(sli::SliServer::start().await?)
        };
        if let Some(server) = &sli_server {
            for range in &sli_ranges {
                let label =
                    format!("backfilld default, production's p99 over {range} s from Prometheus");
                let settings = sli_settings(&throttled, server, Duration::from_secs(*range));
                // The other binaries read it too: a change to the SLI judge is compared with
                // its parent in the same run.
                competitors.extend(options.frontier_compare_binaries.iter().map(|binary| {
                    frontier::Competitor::Backfilld {
                        label: format!("{label}, binary {}", binary.display()),
                        settings: settings.clone(),
                        binary: Some(binary.clone()),
                    }
                }));
                competitors.push(frontier::Competitor::backfilld(label, settings));
            }
        }
        let plan = frontier::FrontierPlan {
            rows: if options.frontier_full {
                2_000_000
            } else {
                options.frontier_rows
            },
            rates: options.frontier_rates.clone(),
            clients: 4,
            rounds: options.frontier_rounds.max(1),
            settle: Duration::from_secs(options.frontier_settle),
            climb: Duration::from_secs(options.frontier_climb),
            window: Duration::from_secs(options.frontier_window.max(1)),
            min_transactions: options.frontier_min_transactions,
            competitors,
            sli: sli_server.is_some(),
            pods: options.frontier_pods.max(1),
            pod_stagger: Duration::try_from_secs_f64(options.frontier_pod_stagger)
                .context("--frontier-pod-stagger: seconds, not negative")?,
            step: (options.frontier_step_phase > 0).then(|| frontier::LoadStep {
                from: options.frontier_step[0],
                to: options.frontier_step[1],
                phase: Duration::from_secs(options.frontier_step_phase),
                rows: options.frontier_step_rows,
            }),
        };
        let load_before = load_average();
        let (rows, steps) =
            frontier::run(&bench.fixture, &bench.daemon, &plan, &bench.work_dir).await?;
        let step = match &plan.step {
            Some(step) if !steps.is_empty() => {
                format!("\n{}", frontier::step_to_markdown(&steps, step))
            }
            _ => String::new(),
        };
        frontier_markdown = Some(format!(
            "{}{step}
Load average (1/5/15 min) before the frontier: {load_before}; after: {}
",
            frontier::to_markdown(&rows, &plan, frontier::BUDGET),
            load_average()
        ));
    }
    let mut idle_cost_markdown = None;
    // Minutes long, like the frontier: with --quick only when asked for by name.
    if options.only.contains(&Scenario::IdleCost) || (options.only.is_empty() && !options.quick) {
        let plan = idle_cost::IdleCostPlan {
            binaries: if options.idle_cost_binaries.is_empty() {
                vec![bench.daemon.binary.clone()]
            } else {
                options.idle_cost_binaries.clone()
            },
            rounds: options.idle_cost_rounds.max(1),
            warmup: Duration::from_secs(10),
            window: Duration::from_secs(options.idle_cost_window.max(1)),
            load: LoadShape { rate: 20, ..load },
        };
        progress(format_args!(
            "idle cost: {} binaries, {} rounds…",
            plan.binaries.len(),
            plan.rounds
        ));
        let costs = idle_cost::run(&bench.fixture, &bench.template, &plan, &bench.work_dir).await?;
        idle_cost_markdown = Some(idle_cost::to_markdown(&costs, &plan));
    }
    report.context = context_lines(&bench, &unthrottled, &throttled, load_before)?;
    if options.logs.is_some() {
        let log = bench.work_dir.join("postgres-primary.log");
        std::fs::copy(bench.fixture.primary.log_path(), &log)
            .with_context(|| format!("copying the primary's log to {}", log.display()))?;
    }

    let mut markdown = report.to_markdown();
    if let Some(frontier) = frontier_markdown {
        markdown.push_str("\n### Frontier: rows/s against production's p99\n\n");
        markdown.push_str(&frontier);
    }
    if let Some(idle_cost) = idle_cost_markdown {
        markdown.push_str("\n### What an idle daemon costs the primary\n\n");
        markdown.push_str(&idle_cost);
    }
    println!("\n{markdown}");
    let out = match (&options.out, options.quick) {
        (Some(out), _) => Some(out.clone()),
        (None, false) => Some(PathBuf::from("docs/BENCHMARKS.md")),
        (None, true) => None,
    };
    if let Some(out) = out {
        report::write_into_doc(&out, &markdown)?;
        progress(format_args!("results written to {}", out.display()));
    }
    Ok(())
}

/// Reports a finished scenario on stderr and passes it on.
fn done(measurement: scenarios::Measurement) -> scenarios::Measurement {
    progress(format_args!(
        "{}: {:.2} s",
        measurement.name,
        measurement.observed.wall.as_secs_f64()
    ));
    measurement
}

fn progress(message: std::fmt::Arguments<'_>) {
    eprintln!("backfill-bench: {message}");
}

/// Where, when and how the run happened, one line each.
fn context_lines(
    bench: &Bench,
    unthrottled: &[(String, String)],
    throttled: &[(String, String)],
    load_before: String,
) -> anyhow::Result<Vec<String>> {
    let fixture = &bench.fixture;
    let when = fixture.psql(
        "postgres",
        "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') || ' UTC'",
    )?;
    let postgres = fixture.psql("postgres", "SHOW server_version")?;
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map_or("unknown CPU", |l| l.trim_start_matches([' ', '\t', ':']));
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let describe = |settings: &[(String, String)]| {
        let pairs: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.join(" ")
    };
    // The command as it was given: a run of some scenarios must not read as a full one.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = std::iter::once("scripts/bench".to_string())
        .chain(args.iter().map(|arg| {
            shlex::try_quote(arg).map_or_else(|_| format!("{arg:?}"), |quoted| quoted.into_owned())
        }))
        .collect::<Vec<_>>()
        .join(" ");
    Ok(vec![
        format!("Run: {when}, commit {}, `{command}`", git_commit()),
        format!(
            "Machine: {cpu}, {cpus} CPUs, {memory_gib:.1} GiB RAM, Linux {}; PostgreSQL {postgres} \
             (primary + streaming standby on the same machine, fsync on, shared_buffers 512MB)",
            kernel.trim()
        ),
        format!(
            "Load average (1/5/15 min) before: {load_before}; after: {}",
            load_average()
        ),
        format!("Load of scenario 4: {}", bench.load.describe()),
        format!(
            "Scenario 3 (limits off): config/default.toml with {}, batch.size = batch.max_size = \
             {} keys for the range form and {} for the key array; scenario 4: \
             config/default.toml with {}",
            describe(unthrottled),
            JobForm::Range.batch_keys(),
            JobForm::KeyArray.batch_keys(),
            describe(throttled)
        ),
    ])
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

/// The commit the benchmarked code came from, `-dirty` with uncommitted changes.
fn git_commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(commit) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            format!("{commit}{}", if dirty { "-dirty" } else { "" })
        }
        None => "unknown".to_string(),
    }
}
