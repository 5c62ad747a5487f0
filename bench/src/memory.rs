//! Memory: the worker's resident set with many requests in flight at once, held open by a
//! receiver that answers late.

use std::time::{Duration, Instant};

use outbox_receiver::Reply;

use crate::harness::Bench;
use crate::report::Rows;
use crate::Result;

/// How long the receiver holds each request: longer than it takes to claim and send them
/// all, so that they are all in flight together.
const HOLD: Duration = Duration::from_secs(20);

const MIB: f64 = 1024.0;

/// A `kB` field of `/proc/<pid>/status` (VmRSS, VmHWM), in KiB.
pub(crate) fn status_kib(pid: i32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Sends `n` deliveries to an endpoint whose receiver holds every request for [`HOLD`],
/// samples the worker's RSS until all of them are in flight (or the receiver starts
/// answering), and reports the peak against the idle worker.
pub fn run(bench: &Bench, n: u32) -> Result<Rows> {
    let mut rows = Rows::new("memory");
    let pid = bench.worker_pid();
    let idle = status_kib(pid, "VmRSS").ok_or("cannot read the worker's memory")?;
    let mut client = bench.client();
    let url = bench.sink.url_answering("/hold", Reply::Delay(HOLD, 200));
    let endpoint: String = client
        .query_one(
            "SELECT outbox.create_endpoint($1::text, timeout => '60 seconds')::text",
            &[&url],
        )?
        .get(0);
    eprintln!("memory: {n} deliveries held {HOLD:?} each by the receiver");
    bench.enqueue(n, 2, Some(&endpoint))?;

    let started = Instant::now();
    let (mut peak_rss, mut peak_in_flight) = (idle, 0i64);
    while started.elapsed() < HOLD - Duration::from_secs(2) {
        peak_rss = peak_rss.max(status_kib(pid, "VmRSS").unwrap_or(0));
        let in_flight: i64 = client
            .query_one("SELECT in_flight FROM outbox.stats()", &[])?
            .get(0);
        peak_in_flight = peak_in_flight.max(in_flight);
        if in_flight >= i64::from(n) && started.elapsed() > Duration::from_secs(5) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let hwm = status_kib(pid, "VmHWM").unwrap_or(peak_rss);
    bench.wait_settled(HOLD * 3)?;
    let after = status_kib(pid, "VmRSS").unwrap_or(0);

    rows.add("requests asked in flight", f64::from(n), "requests");
    rows.add("peak requests in flight", peak_in_flight as f64, "requests");
    rows.add("worker RSS idle", idle as f64 / MIB, "MiB");
    rows.add("worker RSS peak (sampled)", peak_rss as f64 / MIB, "MiB");
    rows.add(
        "worker RSS high-water mark (VmHWM)",
        hwm as f64 / MIB,
        "MiB",
    );
    rows.add("worker RSS after all answered", after as f64 / MIB, "MiB");
    Ok(rows)
}
