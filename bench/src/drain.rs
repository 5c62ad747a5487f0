//! Backlog drain: how fast the worker catches up after an outage of the receiver, what a
//! large backlog does to the tables, and what is left of them after retention.

use std::time::{Duration, SystemTime};

use crate::harness::{seconds_between, Bench};
use crate::report::Rows;
use crate::{cpu, Result};

/// Producer connections used to build the backlog (not measured as such).
const PRODUCERS: usize = 2;

const MB: f64 = 1024.0 * 1024.0;

/// Queues `n` deliveries for the endpoint while it is disabled, enables it, and times the
/// drain until the table shows nothing open. Enabling does not wake the worker by itself,
/// so the wait until the first receipt (up to `outbox.poll_interval`) is reported apart
/// from the rate once deliveries flow.
pub fn run(bench: &Bench, n: u32) -> Result<Rows> {
    let mut rows = Rows::new("drain");
    let mut client = bench.client();
    client.execute(
        "SELECT outbox.disable_endpoint($1::text::uuid)",
        &[&bench.endpoint],
    )?;
    eprintln!("drain: queueing {n} deliveries for the disabled endpoint");
    let queued = bench.enqueue(n, PRODUCERS, Some(&bench.endpoint))?;
    let sizes_before = bench.table_sizes()?;
    bench.sink.reset(false);
    let before = bench.cpu_snapshot();

    eprintln!("drain: enabling the endpoint");
    let enabled = SystemTime::now();
    client.execute(
        "SELECT outbox.enable_endpoint($1::text::uuid)",
        &[&bench.endpoint],
    )?;
    let arrived = bench.sink.wait_for(u64::from(n), Duration::from_secs(60))?;
    let settled = bench.wait_settled(Duration::from_secs(120))?;
    let usage = cpu::Usage::between(&before, &bench.cpu_snapshot());
    let sizes_after = bench.table_sizes()?;
    let delivered = bench.delivered("bench.item")?;
    // Retention as the worker would do it after its age, then VACUUM: what a steady state
    // keeps of the tables once the backlog is history.
    eprintln!("drain: purging what was delivered, then VACUUM");
    let purge_started = std::time::Instant::now();
    let purged: i64 = client
        .query_one("SELECT outbox.purge('0 seconds')", &[])?
        .get(0);
    let purge_seconds = purge_started.elapsed().as_secs_f64();
    client.batch_execute("VACUUM outbox.delivery, outbox.event, outbox.attempt")?;
    let sizes_purged = bench.table_sizes()?;

    let n_f = f64::from(n);
    let total = seconds_between(enabled, settled);
    rows.add("deliveries", n_f, "deliveries");
    rows.add("backlog enqueue rate", n_f / queued.seconds(), "events/s");
    rows.add("drain time, enable to all delivered", total, "s");
    rows.add(
        "drain rate, enable to all delivered",
        n_f / total,
        "deliveries/s",
    );
    if let (Some(first), Some(last)) = (arrived.first, arrived.last) {
        rows.add(
            "wait for first receipt after enable",
            seconds_between(enabled, first),
            "s",
        );
        rows.add(
            "delivery rate, first to last receipt",
            (arrived.count.saturating_sub(1)) as f64 / seconds_between(first, last).max(1e-9),
            "deliveries/s",
        );
    }
    rows.add("requests received", arrived.count as f64, "requests");
    rows.add("rows delivered", delivered as f64, "deliveries");
    rows.add("retention: deliveries purged", purged as f64, "deliveries");
    rows.add("retention: purge time", purge_seconds, "s");
    for ((table, _), (_, purged)) in sizes_before.iter().zip(&sizes_purged) {
        rows.add(
            format!("{table} size after retention + VACUUM"),
            *purged as f64 / MB,
            "MB",
        );
    }
    for ((table, before), (_, after)) in sizes_before.iter().zip(&sizes_after) {
        rows.add(
            format!("{table} size before drain"),
            *before as f64 / MB,
            "MB",
        );
        rows.add(
            format!("{table} size after drain"),
            *after as f64 / MB,
            "MB",
        );
    }
    rows.add_cpu(&usage);
    Ok(rows)
}
