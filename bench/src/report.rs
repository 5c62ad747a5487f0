//! Results: rows of (scenario, metric, value, unit), the table printed at the end, and
//! `bench/results/latest.json` with everything needed to compare runs later — machine,
//! PostgreSQL version and settings, git commit, exact command line.

use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::cpu::Usage;

/// One measured figure.
#[derive(Clone, Debug)]
pub struct Row {
    pub scenario: &'static str,
    pub metric: String,
    pub value: f64,
    pub unit: &'static str,
}

/// The rows of one scenario, built up as it measures.
pub struct Rows {
    scenario: &'static str,
    pub rows: Vec<Row>,
}

impl Rows {
    pub fn new(scenario: &'static str) -> Rows {
        Rows {
            scenario,
            rows: Vec::new(),
        }
    }

    pub fn add(&mut self, metric: impl Into<String>, value: f64, unit: &'static str) {
        self.rows.push(Row {
            scenario: self.scenario,
            metric: metric.into(),
            value,
            unit,
        });
    }

    /// The CPU split of a measurement: seconds per group and the same as load on one core
    /// (over 100 % means more than one core's worth, e.g. the worker's sender threads).
    pub fn add_cpu(&mut self, usage: &Usage) {
        self.add("cpu window (wall clock)", usage.wall, "s");
        let groups = [
            ("cpu postgres except worker", usage.server),
            ("cpu worker", usage.worker),
            ("cpu worker main thread (SQL)", usage.worker_main),
            ("cpu bench process (receiver + producers)", usage.bench),
        ];
        for (name, seconds) in groups {
            self.add(name, seconds, "CPU s");
            self.add(
                format!("{name}, load"),
                100.0 * seconds / usage.wall.max(1e-9),
                "% of a core",
            );
        }
        self.add(
            "cpu machine busy (all processes)",
            usage.machine_busy_pct,
            "% of all cores",
        );
    }
}

/// A value as a person reads it: integers whole, small numbers with more decimals.
fn format_value(v: f64) -> String {
    let whole = v.fract() == 0.0 && v.abs() < 1e15;
    if whole || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The results table, columns sized to their contents.
pub fn table(rows: &[Row]) -> String {
    let cells: Vec<[String; 4]> = rows
        .iter()
        .map(|r| {
            [
                r.scenario.to_owned(),
                r.metric.clone(),
                format_value(r.value),
                r.unit.to_owned(),
            ]
        })
        .collect();
    let header = ["scenario", "metric", "value", "unit"].map(str::to_owned);
    let width = |i: usize| {
        cells
            .iter()
            .chain([&header])
            .map(|c| c[i].chars().count())
            .max()
            .unwrap_or(0)
    };
    let (w0, w1, w2) = (width(0), width(1), width(2));
    let line = |c: &[String; 4]| {
        format!("{:<w0$}  {:<w1$}  {:>w2$}  {}", c[0], c[1], c[2], c[3])
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(&header), "-".repeat(w0 + w1 + w2 + 6 + width(3))];
    out.extend(cells.iter().map(line));
    out.join("\n")
}

/// The machine the figures come from. The load average matters because the machine may
/// be shared: figures taken next to a compiler are not comparable with quiet ones.
pub fn machine_info() -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned());
    let mem_total = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .map(|l| l.trim_start_matches("MemTotal:").trim().to_owned());
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu_model,
        "mem_total": mem_total,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "loadavg_at_start": read("/proc/loadavg").trim(),
    })
}

/// The checked-out commit, and whether the work tree differs from it.
pub fn git_info(repo: &Path) -> Value {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    json!({
        "commit": git(&["rev-parse", "HEAD"]),
        "dirty": git(&["status", "--porcelain"]).map(|s| !s.is_empty()),
    })
}

/// The rows as JSON objects.
pub fn rows_json(rows: &[Row]) -> Value {
    rows.iter()
        .map(|r| json!({"scenario": r.scenario, "metric": r.metric, "value": r.value, "unit": r.unit}))
        .collect()
}

/// Writes `value` as pretty JSON, creating the directory if needed.
pub fn write_json(path: &Path, value: &Value) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    std::fs::write(path, text + "\n")
}

/// `2025-01-31T12:34:56Z`: UTC, to the second.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Calendar date of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661); // 2000-02-29
        assert_eq!(rfc3339(t), "2000-02-29T01:01:01Z");
    }

    #[test]
    fn values() {
        assert_eq!(format_value(200000.0), "200000");
        assert_eq!(format_value(6170.4), "6170");
        assert_eq!(format_value(12.34), "12.3");
        assert_eq!(format_value(2.814), "2.81");
    }
}
