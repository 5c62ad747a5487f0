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

/// The receiver's path that holds requests.
const PATH: &str = "/hold";

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
/// answering), and reports the peak against the idle worker, with how many deliveries were
/// in flight (by their status) and how many requests the receiver was holding at the
/// sample that saw the peak: a peak reached with few in flight would point elsewhere than
/// at per-request state.
pub fn run(bench: &Bench, n: u32) -> Result<Rows> {
    let mut rows = Rows::new("memory");
    let pid = bench.worker_pid();
    let idle = status_kib(pid, "VmRSS").ok_or("cannot read the worker's memory")?;
    let mut client = bench.client();
    let url = bench.sink.url_answering(PATH, Reply::Delay(HOLD, 200));
    let endpoint: String = client
        .query_one(
            "SELECT outbox.create_endpoint($1::text, timeout => '60 seconds')::text",
            &[&url],
        )?
        .get(0);
    eprintln!("memory: {n} deliveries held {HOLD:?} each by the receiver");
    bench.sink.reset(false);
    bench.enqueue(n, 2, Some(&endpoint))?;

    let started = Instant::now();
    let (mut peak_rss, mut peak_in_flight) = (idle, 0i64);
    // (in flight by status, requests held by the receiver) at the sample with the peak.
    let mut at_peak = (0i64, 0u64);
    while started.elapsed() < HOLD - Duration::from_secs(2) {
        let in_flight: i64 = client
            .query_one(
                "SELECT count(*) FROM outbox.delivery WHERE status = 'in_flight'",
                &[],
            )?
            .get(0);
        let held = bench.sink.arrivals_at(PATH).count;
        let rss = status_kib(pid, "VmRSS").unwrap_or(0);
        if rss > peak_rss {
            peak_rss = rss;
            at_peak = (in_flight, held);
        }
        peak_in_flight = peak_in_flight.max(in_flight);
        // All sent, not merely claimed: the requests' buffers exist only once sent.
        if held >= u64::from(n) && started.elapsed() > Duration::from_secs(5) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bench.wait_settled(HOLD * 3)?;
    // The high-water mark once all were answered: the answers arriving together may take
    // the worker higher than anything sampled while they were held.
    let hwm = status_kib(pid, "VmHWM").unwrap_or(peak_rss);
    let after = status_kib(pid, "VmRSS").unwrap_or(0);

    rows.add("requests asked in flight", f64::from(n), "requests");
    rows.add("peak requests in flight", peak_in_flight as f64, "requests");
    rows.add(
        "in flight (status) at the RSS peak",
        at_peak.0 as f64,
        "deliveries",
    );
    rows.add(
        "held by the receiver at the RSS peak",
        at_peak.1 as f64,
        "requests",
    );
    rows.add("worker RSS idle", idle as f64 / MIB, "MiB");
    rows.add(
        "worker RSS peak sampled while held",
        peak_rss as f64 / MIB,
        "MiB",
    );
    rows.add(
        "worker RSS high-water mark, whole run (VmHWM, target <= 128 MiB)",
        hwm as f64 / MIB,
        "MiB",
    );
    rows.add("worker RSS after all answered", after as f64 / MIB, "MiB");
    Ok(rows)
}
