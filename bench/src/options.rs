//! The command line: scenario names plus options shared by every scenario.
//!
//! Options are global rather than per scenario so that `throughput drain --n 50000` sizes
//! both runs alike, which is what comparing them needs.

use std::fmt;

pub const USAGE: &str = "\
usage: bench/run.sh [SCENARIO ...] [OPTIONS]

Scenarios (each on a fresh cluster, in the order given):
  throughput   N events in transactions of 1000 from 2 producer connections while the
               worker delivers; enqueue rate, delivery rate, time until all delivered,
               CPU split between PostgreSQL, the worker and this process
  latency      one event per transaction at a steady rate; commit -> receipt percentiles
  drain        N deliveries queued for a disabled endpoint, then enabled; drain time and
               table sizes before, after the drain, and after retention (purge + VACUUM)
  backlog      drain with a large backlog queued fast (one statement per 50,000 events):
               N deliveries (default 1000000), drain time and rate, table and index sizes
               before, after the drain, and after retention (purge + VACUUM)
  fanout       N deliveries over 10 endpoints, first all healthy, then with one always
               answering 500 and one stalling past its 5 s timeout; the healthy eight's
               rate in both runs, the slowest healthy endpoint's, and the ratio (target
               >= 90 %)
  memory       N deliveries held by a receiver that answers after 20 s, with the limits
               raised so that all are in flight at once; the worker's peak RSS (VmRSS
               sampled, VmHWM) and how many were in flight at the peak (target <= 128 MiB)
  enqueue-cost pgbench inserting one row per transaction into a table (--seconds per run,
               1 client then 4): plain, with PgQ's pgq.logutriga, with a bare one-row
               append trigger, and with outbox.trigger, side by side; tps, the share of
               the plain insert's kept (target >= 80 %, not behind PgQ) and microseconds
               added per event
  soak         one event per transaction at --rate for --seconds (every other one with a
               caller's event id) with retention at one minute; per minute: deliveries, commit -> receipt p50/p99, worker RSS and
               table sizes
  soak-novacuum  soak with autovacuum off for the outbox tables (target: sizes flat
               after minute 2)
  snapshot     latency at --rate for --seconds, then the same with a REPEATABLE READ
               snapshot held open throughout; both sets of percentiles and their ratio
               (target: p99 at most 2x)
  nginx        N events (default 100000) in 10 transactions from one connection while the
               worker delivers them to nginx answering 200 on loopback; end-to-end rate
               (target >= 30k/s) and CPU split
  all          every scenario above (soak for --seconds)
  (none)       throughput, then latency with --seconds 30

Options:
  --n N              events for throughput, drain, backlog and fanout (deliveries over all
                     ten endpoints for fanout); requests in flight for memory
                     (default 200000; backlog 1000000, memory 10000)
  --rate R           events per second for latency and soak (default 500)
  --seconds S        duration of latency and soak, and of each enqueue-cost run
                     (default 60, or 30 when no scenario is named)
  --set NAME=VALUE   extra postgresql.conf line, repeatable, e.g. --set outbox.batch_size=500
  -h, --help         this text

Results: a table on stdout, and bench/results/latest.json (with machine information and
the command line).";

/// A benchmark scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Throughput,
    Latency,
    Drain,
    Backlog,
    Fanout,
    Memory,
    EnqueueCost,
    Soak,
    SoakNoVacuum,
    Snapshot,
    Nginx,
}

/// Every scenario, in the order `all` runs them.
pub const ALL: &[Scenario] = &[
    Scenario::Throughput,
    Scenario::Latency,
    Scenario::Drain,
    Scenario::Backlog,
    Scenario::Fanout,
    Scenario::Memory,
    Scenario::EnqueueCost,
    Scenario::Soak,
    Scenario::SoakNoVacuum,
    Scenario::Snapshot,
    Scenario::Nginx,
];

impl Scenario {
    fn parse(name: &str) -> Option<Scenario> {
        match name {
            "throughput" => Some(Scenario::Throughput),
            "latency" => Some(Scenario::Latency),
            "drain" => Some(Scenario::Drain),
            "backlog" => Some(Scenario::Backlog),
            "fanout" => Some(Scenario::Fanout),
            "memory" => Some(Scenario::Memory),
            "enqueue-cost" => Some(Scenario::EnqueueCost),
            "soak" => Some(Scenario::Soak),
            "soak-novacuum" => Some(Scenario::SoakNoVacuum),
            "snapshot" => Some(Scenario::Snapshot),
            "nginx" => Some(Scenario::Nginx),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Throughput => "throughput",
            Scenario::Latency => "latency",
            Scenario::Drain => "drain",
            Scenario::Backlog => "backlog",
            Scenario::Fanout => "fanout",
            Scenario::Memory => "memory",
            Scenario::EnqueueCost => "enqueue-cost",
            Scenario::Soak => "soak",
            Scenario::SoakNoVacuum => "soak-novacuum",
            Scenario::Snapshot => "snapshot",
            Scenario::Nginx => "nginx",
        }
    }

    /// postgresql.conf lines the scenario needs (the command line's --set lines win).
    pub fn settings(self) -> &'static [&'static str] {
        match self {
            // Every request in flight at once: no per-worker, per-endpoint or batch cap
            // below the number asked for, and leases longer than the receiver's delay.
            Scenario::Memory => &[
                "outbox.max_in_flight = 10000",
                "outbox.endpoint_max_in_flight = 0",
                "outbox.batch_size = 10000",
                "outbox.lease = 120",
                "outbox.request_timeout = '60s'",
            ],
            Scenario::Soak | Scenario::SoakNoVacuum => &[
                "outbox.retention_delivered = '1min'",
                "outbox.retention_dead = '1min'",
            ],
            _ => &[],
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to run and how.
#[derive(Clone, Debug)]
pub struct Options {
    pub scenarios: Vec<Scenario>,
    /// Events for `throughput`, `drain`, `backlog` and `fanout`.
    pub n: u32,
    /// Whether `--n` was given (`backlog` and `memory` have their own defaults).
    pub n_given: bool,
    /// Events per second for `latency`.
    pub rate: f64,
    /// Duration of `latency`, in seconds.
    pub seconds: f64,
    /// `(name, value)` pairs appended to postgresql.conf.
    pub settings: Vec<(String, String)>,
}

/// The parsed command line, or a request for the usage text.
pub enum Parsed {
    Run(Options),
    Help,
}

/// Parses the arguments after the program name.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Parsed, String> {
    let mut scenarios = Vec::new();
    let mut n = 200_000;
    let mut n_given = false;
    let mut rate = 500.0;
    let mut seconds = None;
    let mut settings = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        // Both `--n 5` and `--n=5`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "--n" => {
                n = number(&flag, &value()?)?;
                n_given = true;
            }
            "--rate" => rate = number(&flag, &value()?)?,
            "--seconds" => seconds = Some(number(&flag, &value()?)?),
            "--set" => settings.push(setting(&value()?)?),
            _ if flag.starts_with('-') => return Err(format!("unknown option {flag}")),
            "all" => scenarios.extend_from_slice(ALL),
            name => scenarios
                .push(Scenario::parse(name).ok_or_else(|| format!("unknown scenario {name:?}"))?),
        }
    }
    if n == 0 || rate <= 0.0 || seconds.is_some_and(|s: f64| s <= 0.0) {
        return Err("--n, --rate and --seconds must be positive".into());
    }
    // With no scenario named, the default pair stays short unless --seconds says otherwise.
    let default_run = scenarios.is_empty();
    if default_run {
        scenarios = vec![Scenario::Throughput, Scenario::Latency];
    }
    let seconds = seconds.unwrap_or(if default_run { 30.0 } else { 60.0 });
    Ok(Parsed::Run(Options {
        scenarios,
        n,
        n_given,
        rate,
        seconds,
        settings,
    }))
}

fn number<T: std::str::FromStr>(flag: &str, text: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{flag}: {text:?} is not a valid number"))
}

/// `name=value`, with a name PostgreSQL accepts as a (possibly dotted) parameter name.
fn setting(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("--set {text:?}: expected NAME=VALUE"))?;
    let name = name.trim();
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if !valid {
        return Err(format!("--set {text:?}: {name:?} is not a parameter name"));
    }
    Ok((name.to_owned(), value.trim().to_owned()))
}

/// A postgresql.conf line for a setting. The value is always quoted, which PostgreSQL
/// accepts for every parameter type and which keeps lists such as retry schedules intact.
pub fn conf_line(name: &str, value: &str) -> String {
    format!("{name} = '{}'", value.replace('\'', "''"))
}
