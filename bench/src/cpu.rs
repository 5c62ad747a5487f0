//! Where the CPU time goes during a measurement, from `/proc`.
//!
//! Three groups: the cluster's processes other than the worker (the backends of the
//! producers, autovacuum, the WAL writer, the checkpointer, …), the delivery worker, and
//! this process (producers' client side plus the in-process receiver). Comparing them shows
//! which side limits a run; the machine-wide figure shows whether the cores were simply
//! full (the machine may be shared with other work, which that figure includes). The
//! worker's main thread, the only one that runs SQL, is also reported on its own: near
//! 100 % of a core it is the limit whatever the sender threads do.

use std::path::Path;
use std::time::Instant;

/// User plus system time of one process, and of its reaped children.
#[derive(Clone, Copy, Debug, Default)]
struct ProcStat {
    ppid: i32,
    /// utime + stime, in clock ticks.
    own: u64,
    /// cutime + cstime: children that exited and were waited for.
    reaped_children: u64,
}

/// Reads `/proc/<which>/stat`, where `which` is a pid, `self` or `<pid>/task/<tid>`
/// (`None` once the process or thread is gone).
fn proc_stat(which: &str) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{which}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: fields start after it.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 of proc(5) (state), so field k is fields[k - 3].
    let field = |k: usize| fields.get(k - 3).and_then(|f| f.parse::<u64>().ok());
    Some(ProcStat {
        ppid: fields.get(1)?.parse().ok()?,
        own: field(14)? + field(15)?,
        reaped_children: field(16)? + field(17)?,
    })
}

/// Busy and total jiffies of the whole machine, from the `cpu` line of `/proc/stat`.
fn machine_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let values: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = values.iter().take(8).sum();
    // idle and iowait are the 4th and 5th values.
    let idle = values.get(3).unwrap_or(&0) + values.get(4).unwrap_or(&0);
    (total.saturating_sub(idle), total)
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`, 100 on Linux in practice).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The postmaster's pid, the first line of `postmaster.pid` in the data directory.
pub fn postmaster_pid(data_dir: &Path) -> Result<i32, String> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid"))
        .map_err(|e| format!("reading postmaster.pid: {e}"))?;
    text.lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| "postmaster.pid has no pid".to_owned())
}

/// Cumulative CPU ticks of the three groups at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    at: Instant,
    server: u64,
    worker: u64,
    worker_main: u64,
    bench: u64,
    machine_busy: u64,
    machine_total: u64,
}

/// Takes a snapshot. The server group is the postmaster, its live children except the
/// worker, and its reaped children (so a backend or autovacuum worker that exits during the
/// measurement is still counted).
pub fn snapshot(postmaster: i32, worker: i32) -> Snapshot {
    let mut server = proc_stat(&postmaster.to_string())
        .map(|p| p.own + p.reaped_children)
        .unwrap_or(0);
    let mut worker_ticks = 0;
    let entries = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    for entry in entries {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Some(stat) = proc_stat(pid).filter(|s| s.ppid == postmaster) else {
            continue;
        };
        if pid.parse() == Ok(worker) {
            worker_ticks = stat.own;
        } else {
            server += stat.own;
        }
    }
    // The main thread's id is the process id.
    let worker_main = proc_stat(&format!("{worker}/task/{worker}"))
        .map(|p| p.own)
        .unwrap_or(0);
    let (machine_busy, machine_total) = machine_jiffies();
    Snapshot {
        at: Instant::now(),
        server,
        worker: worker_ticks,
        worker_main,
        bench: proc_stat("self").map(|p| p.own).unwrap_or(0),
        machine_busy,
        machine_total,
    }
}

/// CPU used between two snapshots.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    /// Wall-clock seconds between the snapshots.
    pub wall: f64,
    /// CPU seconds of the cluster except the worker.
    pub server: f64,
    /// CPU seconds of the delivery worker (all its threads).
    pub worker: f64,
    /// CPU seconds of the worker's main thread (claims and records through SQL).
    pub worker_main: f64,
    /// CPU seconds of this process (producers' client side and the receiver).
    pub bench: f64,
    /// Share of all cores busy, machine-wide, in percent.
    pub machine_busy_pct: f64,
}

impl Usage {
    pub fn between(start: &Snapshot, end: &Snapshot) -> Usage {
        let hz = clock_ticks();
        let secs = |a: u64, b: u64| b.saturating_sub(a) as f64 / hz;
        let total = end.machine_total.saturating_sub(start.machine_total).max(1);
        let busy = end.machine_busy.saturating_sub(start.machine_busy);
        Usage {
            wall: end.at.duration_since(start.at).as_secs_f64(),
            server: secs(start.server, end.server),
            worker: secs(start.worker, end.worker),
            worker_main: secs(start.worker_main, end.worker_main),
            bench: secs(start.bench, end.bench),
            machine_busy_pct: 100.0 * busy as f64 / total as f64,
        }
    }
}
