//! An old MVCC snapshot: the classic way a PostgreSQL job queue dies in production. A
//! REPEATABLE READ report (or a forgotten session) holds its snapshot open; no row version
//! deleted or updated after it can be cleaned up, and a queue that updates a row per state
//! change drags ever more dead versions through its indexes. Measured side by side in one
//! cluster: the latency scenario without, then with such a snapshot held for as long.

use std::time::Duration;

use crate::harness::Bench;
use crate::report::Rows;
use crate::{latency, Result};

const MB: f64 = 1024.0 * 1024.0;

pub fn run(bench: &Bench, rate: f64, seconds: f64) -> Result<Rows> {
    let mut rows = Rows::new("snapshot");
    eprintln!("snapshot: {seconds} s at {rate}/s with no snapshot held");
    let (free, _) = latency::measure_into(&mut rows, "no snapshot held: ", bench, rate, seconds)?;
    bench.wait_settled(Duration::from_secs(120))?;
    sizes(bench, &mut rows, "no snapshot held: ")?;

    // A report that reads the queue in REPEATABLE READ and then sits there.
    let mut report = bench.client();
    report.batch_execute(
        "BEGIN ISOLATION LEVEL REPEATABLE READ;
         SELECT count(*) FROM outbox.delivery;",
    )?;
    eprintln!("snapshot: {seconds} s at {rate}/s with a REPEATABLE READ snapshot held open");
    let (held, _) = latency::measure_into(&mut rows, "snapshot held: ", bench, rate, seconds)?;
    sizes(bench, &mut rows, "snapshot held: ")?;
    report.batch_execute("COMMIT")?;
    if let (Some(free), Some(held)) = (free, held) {
        rows.add(
            "p99 with the snapshot held / without (target <= 2)",
            held / free.max(1e-9),
            "x",
        );
    }
    Ok(rows)
}

/// The outbox tables' sizes now.
fn sizes(bench: &Bench, rows: &mut Rows, prefix: &str) -> Result<()> {
    let sizes = bench.relation_sizes()?;
    let all: i64 = sizes.iter().map(|s| s.total).sum();
    rows.add(format!("{prefix}outbox tables size"), all as f64 / MB, "MB");
    Ok(())
}
