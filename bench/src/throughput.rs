//! Sustained throughput: producers enqueue while the worker delivers, as in production.

use std::time::Duration;

use crate::harness::{seconds_between, Bench};
use crate::report::Rows;
use crate::{cpu, Result};

/// Producer connections, each in its own thread.
const PRODUCERS: usize = 2;

/// `n` events from [`PRODUCERS`] connections in transactions of 1000, delivered to one
/// endpoint; the clock runs from the first enqueue until the table shows nothing open.
pub fn run(bench: &Bench, n: u32) -> Result<Rows> {
    let mut rows = Rows::new("throughput");
    bench.sink.reset(false);
    let before = bench.cpu_snapshot();

    eprintln!("throughput: enqueueing {n} events from {PRODUCERS} connections");
    let enqueued = bench.enqueue(n, PRODUCERS, None)?;
    eprintln!(
        "throughput: enqueued in {:.1} s, waiting for deliveries",
        enqueued.seconds()
    );
    let arrived = bench.sink.wait_for(u64::from(n), Duration::from_secs(60))?;
    let settled = bench.wait_settled(Duration::from_secs(120))?;
    let usage = cpu::Usage::between(&before, &bench.cpu_snapshot());

    let n_f = f64::from(n);
    rows.add("events", n_f, "events");
    rows.add("enqueue rate", n_f / enqueued.seconds(), "events/s");
    if let (Some(first), Some(last)) = (arrived.first, arrived.last) {
        rows.add(
            "delivery rate, first to last receipt",
            (arrived.count.saturating_sub(1)) as f64 / seconds_between(first, last).max(1e-9),
            "deliveries/s",
        );
    }
    let total = seconds_between(enqueued.start, settled);
    rows.add("all delivered, from first enqueue", total, "s");
    rows.add(
        "all delivered, after last commit",
        seconds_between(enqueued.end, settled),
        "s",
    );
    rows.add("end-to-end rate", n_f / total, "events/s");
    rows.add("requests received", arrived.count as f64, "requests");
    rows.add(
        "rows delivered",
        bench.delivered("bench.item")? as f64,
        "deliveries",
    );
    rows.add_cpu(&usage);
    Ok(rows)
}
