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
               table sizes before and after
  (none)       throughput, then latency with --seconds 30

Options:
  --n N              events for throughput and drain (default 200000)
  --rate R           events per second for latency (default 500)
  --seconds S        duration of latency (default 60, or 30 when no scenario is named)
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
}

impl Scenario {
    fn parse(name: &str) -> Option<Scenario> {
        match name {
            "throughput" => Some(Scenario::Throughput),
            "latency" => Some(Scenario::Latency),
            "drain" => Some(Scenario::Drain),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Throughput => "throughput",
            Scenario::Latency => "latency",
            Scenario::Drain => "drain",
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
    /// Events for `throughput` and `drain`.
    pub n: u32,
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
            "--n" => n = number(&flag, &value()?)?,
            "--rate" => rate = number(&flag, &value()?)?,
            "--seconds" => seconds = Some(number(&flag, &value()?)?),
            "--set" => settings.push(setting(&value()?)?),
            _ if flag.starts_with('-') => return Err(format!("unknown option {flag}")),
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
