//! Backlog drain: how fast the worker catches up after an outage of the receiver, what a
//! large backlog does to the tables, and what is left of them after retention.
//!
//! Two scenarios share this code and differ only in how the backlog is built: `drain`
//! queues it as an application would (transactions of 1,000), `backlog` as fast as the
//! server takes it (statements of 50,000), so that a million is queued in reasonable time.

use std::time::{Duration, Instant, SystemTime};

use crate::harness::{seconds_between, Bench, RelationSize, BATCH};
use crate::report::Rows;
use crate::{cpu, Result};

/// Producer connections used to build the backlog (not measured as such).
const PRODUCERS: usize = 2;

const MB: f64 = 1024.0 * 1024.0;

/// How a scenario builds its backlog.
#[derive(Clone, Copy, Debug)]
pub struct Fill {
    /// The scenario the rows belong to.
    pub scenario: &'static str,
    /// Events per enqueue statement (one transaction each).
    pub batch: u32,
}

/// `drain`: transactions of [`BATCH`], like the throughput scenario's producers.
pub const DRAIN: Fill = Fill {
    scenario: "drain",
    batch: BATCH,
};

/// `backlog`: one `SELECT outbox.enqueue(...) FROM generate_series(...)` per 50,000.
pub const BACKLOG: Fill = Fill {
    scenario: "backlog",
    batch: 50_000,
};

/// Queues `n` deliveries for the endpoint while it is disabled, enables it (which wakes
/// the worker), and times the drain until the table shows nothing open. The wait until the
/// first receipt is reported apart from the rate once deliveries flow. Table sizes are
/// taken before the drain, after it, and after retention of everything delivered.
pub fn run(bench: &Bench, n: u32, fill: Fill) -> Result<Rows> {
    let name = fill.scenario;
    let mut rows = Rows::new(name);
    let mut client = bench.client();
    client.execute(
        "SELECT outbox.disable_endpoint($1::text::uuid)",
        &[&bench.endpoint],
    )?;
    eprintln!(
        "{name}: queueing {n} deliveries for the disabled endpoint, {} per statement",
        fill.batch
    );
    let queued = bench.enqueue_batched(n, fill.batch, PRODUCERS, Some(&bench.endpoint))?;
    let sizes_before = bench.relation_sizes()?;
    bench.sink.reset(false);
    let before = bench.cpu_snapshot();

    eprintln!(
        "{name}: queued in {:.1} s, enabling the endpoint",
        queued.seconds()
    );
    let enabled = SystemTime::now();
    client.execute(
        "SELECT outbox.enable_endpoint($1::text::uuid)",
        &[&bench.endpoint],
    )?;
    let arrived = bench.sink.wait_for(u64::from(n), Duration::from_secs(60))?;
    let settled = bench.wait_settled(Duration::from_secs(120))?;
    let usage = cpu::Usage::between(&before, &bench.cpu_snapshot());
    let sizes_after = bench.relation_sizes()?;
    let delivered = bench.delivered("bench.item")?;
    // Retention as the worker would do it after its age, then VACUUM: what a steady state
    // keeps of the tables once the backlog is history.
    eprintln!("{name}: purging what was delivered, then VACUUM");
    let purge_started = Instant::now();
    let purged: i64 = client
        .query_one("SELECT outbox.purge('0 seconds')", &[])?
        .get(0);
    let purge_seconds = purge_started.elapsed().as_secs_f64();
    client.batch_execute("VACUUM outbox.delivery, outbox.event, outbox.attempt")?;
    let sizes_purged = bench.relation_sizes()?;

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
    let moments = [
        ("before drain", &sizes_before),
        ("after drain", &sizes_after),
        ("after retention + VACUUM", &sizes_purged),
    ];
    for (moment, sizes) in moments {
        add_sizes(&mut rows, moment, sizes);
    }
    rows.add_cpu(&usage);
    Ok(rows)
}

/// Each table's total size and its indexes' share at one moment, plus the three together.
fn add_sizes(rows: &mut Rows, moment: &str, sizes: &[RelationSize]) {
    for s in sizes {
        let table = s.table;
        rows.add(format!("{table} size {moment}"), s.total as f64 / MB, "MB");
        rows.add(
            format!("{table} indexes {moment}"),
            s.indexes as f64 / MB,
            "MB",
        );
    }
    let all: i64 = sizes.iter().map(|s| s.total).sum();
    rows.add(
        format!("all outbox tables size {moment}"),
        all as f64 / MB,
        "MB",
    );
}
