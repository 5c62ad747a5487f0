//! `outbox-bench`: throughput, latency and drain figures for webhook_outbox, each measured
//! on a fresh cluster with the delivery worker preloaded, delivering to a receiver inside
//! this process. Run it through `bench/run.sh`, which installs a release build of the
//! extension first; `--help` lists scenarios and options.

#[path = "../../tests/common/mod.rs"]
mod common;

mod cpu;
mod drain;
mod enqueue_cost;
mod fanout;
mod harness;
mod latency;
mod memory;
mod nginx;
mod options;
mod report;
mod sink;
mod snapshot;
mod soak;
mod throughput;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use serde_json::{json, Value};

use harness::Bench;
use options::{Options, Parsed, Scenario};
use report::{Row, Rows};

/// Errors end a scenario; threads hand them back, hence `Send + Sync`.
pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn main() -> ExitCode {
    let options = match options::parse(std::env::args().skip(1)) {
        Ok(Parsed::Run(options)) => options,
        Ok(Parsed::Help) => {
            println!("{}", options::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("outbox-bench: {e}\n\n{}", options::USAGE);
            return ExitCode::from(2);
        }
    };
    let started = SystemTime::now();
    let machine = report::machine_info();
    let settings: Vec<String> = options
        .settings
        .iter()
        .map(|(name, value)| options::conf_line(name, value))
        .collect();

    let mut rows: Vec<Row> = Vec::new();
    let mut server = Value::Null;
    let mut error = None;
    for &scenario in &options.scenarios {
        eprintln!("== {scenario}: starting a fresh cluster");
        match run_scenario(scenario, &options, &settings, &mut server) {
            Ok(r) => rows.extend(r.rows),
            Err(e) => {
                eprintln!("outbox-bench: {scenario} failed: {e}");
                error = Some(format!("{scenario}: {e}"));
                break;
            }
        }
    }

    println!("\n{}", report::table(&rows));
    let results = json!({
        "command": command_line(),
        "started_at": report::rfc3339(started),
        "finished_at": report::rfc3339(SystemTime::now()),
        "machine": machine,
        "git": report::git_info(harness::repo_root()),
        "postgresql": server,
        "extra_settings": settings,
        "options": {
            "scenarios": options.scenarios.iter().map(|s| s.name()).collect::<Vec<_>>(),
            "n": options.n,
            "rate": options.rate,
            "seconds": options.seconds,
        },
        "results": report::rows_json(&rows),
        "error": error,
    });
    let path = results_path();
    match report::write_json(&path, &results) {
        Ok(()) => eprintln!("results written to {}", path.display()),
        Err(e) => eprintln!("outbox-bench: cannot write {}: {e}", path.display()),
    }
    if error.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs one scenario on its own cluster. The first cluster's version and settings are
/// recorded in `server`; all clusters are started alike.
fn run_scenario(
    scenario: Scenario,
    options: &Options,
    settings: &[String],
    server: &mut Value,
) -> Result<Rows> {
    let settings: Vec<String> = scenario
        .settings()
        .iter()
        .map(|s| s.to_string())
        .chain(settings.iter().cloned())
        .collect();
    let bench = Bench::start(&settings)?;
    if server.is_null() {
        *server = bench.server_info()?;
    }
    let rows = match scenario {
        Scenario::Throughput => throughput::run(&bench, options.n),
        Scenario::Latency => latency::run(&bench, options.rate, options.seconds),
        Scenario::Drain => drain::run(&bench, options.n, drain::DRAIN),
        Scenario::Backlog => drain::run(
            &bench,
            if options.n_given {
                options.n
            } else {
                1_000_000
            },
            drain::BACKLOG,
        ),
        Scenario::Fanout => fanout::run(&bench, options.n),
        Scenario::Memory => memory::run(&bench, if options.n_given { options.n } else { 10_000 }),
        Scenario::EnqueueCost => enqueue_cost::run(&bench, options.seconds),
        Scenario::Soak => soak::run(&bench, options.rate, options.seconds, true),
        Scenario::SoakNoVacuum => soak::run(&bench, options.rate, options.seconds, false),
        Scenario::Snapshot => snapshot::run(&bench, options.rate, options.seconds),
        Scenario::Nginx => nginx::run(&bench, if options.n_given { options.n } else { 100_000 }),
    };
    rows.map_err(|e| format!("{e}\nserver log (tail):\n{}", bench.log_tail()).into())
}

/// The command as typed: `bench/run.sh` passes it in `OUTBOX_BENCH_COMMAND`; run directly,
/// the binary's own arguments.
fn command_line() -> String {
    std::env::var("OUTBOX_BENCH_COMMAND")
        .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" "))
}

fn results_path() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/results/latest.json"))
}
