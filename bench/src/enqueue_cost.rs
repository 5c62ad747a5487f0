//! Enqueue cost: what an `outbox.trigger` adds to an application's own writes, measured
//! with pgbench on a small insert workload without and with the trigger.
//!
//! The workload runs in a database of its own where the extension is created but no worker
//! delivers (the worker serves `outbox.database`), so the figures are the producer's side
//! alone: the event and delivery rows, the fan-out, the live feed and the wake-up.

use crate::harness::Bench;
use crate::report::Rows;
use crate::Result;

const DATABASE: &str = "enqueue_cost";

/// Runs pgbench with `clients` connections for `seconds` and returns its tps.
fn pgbench(bench: &Bench, script: &std::path::Path, clients: u32, seconds: f64) -> Result<f64> {
    // As the cluster's OS user, like every PostgreSQL program the harness runs.
    let mut cmd = crate::common::pg_command("pgbench");
    let threads = clients.min(2);
    cmd.args(["-h", "127.0.0.1", "-U", "postgres", "-n"])
        .args(["-p", &bench.cluster.port.to_string()])
        .args(["-c", &clients.to_string(), "-j", &threads.to_string()])
        .args(["-T", &format!("{}", seconds.round().max(1.0) as u64)])
        .arg("-f")
        .arg(script)
        .arg(DATABASE);
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "pgbench failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    text.lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .ok_or_else(|| format!("no tps in pgbench's output: {text}").into())
}

pub fn run(bench: &Bench, seconds: f64) -> Result<Rows> {
    let mut rows = Rows::new("enqueue-cost");
    bench
        .client()
        .batch_execute(&format!("CREATE DATABASE {DATABASE}"))?;
    let mut c = bench.cluster.client_to(DATABASE);
    c.batch_execute(
        "CREATE EXTENSION webhook_outbox;
         CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL,
                              total numeric NOT NULL, created_at timestamptz NOT NULL DEFAULT now());",
    )?;
    c.execute(
        "SELECT outbox.create_endpoint($1::text, event_types => '{order.*}')",
        &[&bench.sink.url()],
    )?;
    // The script lives beside the data directory, readable by the cluster's OS user.
    let script = bench.cluster.dir.join("insert_order.sql");
    std::fs::write(
        &script,
        "\\set c random(1, 100000)\n\
         INSERT INTO orders (customer, total) VALUES ('customer-' || :c, :c / 100.0);\n",
    )?;

    let measure = |label: &str| -> Result<(f64, f64)> {
        eprintln!("enqueue-cost: pgbench {label}, 1 client then 4, {seconds} s each");
        Ok((
            pgbench(bench, &script, 1, seconds)?,
            pgbench(bench, &script, 4, seconds)?,
        ))
    };
    let (plain_1, plain_4) = measure("without the trigger")?;
    c.batch_execute(
        "CREATE TRIGGER orders_outbox AFTER INSERT ON orders
             FOR EACH ROW EXECUTE FUNCTION outbox.trigger('order')",
    )?;
    let (hooked_1, hooked_4) = measure("with outbox.trigger('order')")?;
    let queued: i64 = c
        .query_one("SELECT count(*) FROM outbox.delivery", &[])?
        .get(0);

    rows.add("tps without trigger, 1 client", plain_1, "tps");
    rows.add("tps with trigger, 1 client", hooked_1, "tps");
    // One event per transaction: the difference in time per transaction at one client is
    // what the trigger adds to each insert.
    rows.add(
        "added per event, 1 client (1e6/tps_with - 1e6/tps_without)",
        1e6 / hooked_1 - 1e6 / plain_1,
        "us",
    );
    rows.add("tps without trigger, 4 clients", plain_4, "tps");
    rows.add("tps with trigger, 4 clients", hooked_4, "tps");
    rows.add("tps kept, 4 clients", 100.0 * hooked_4 / plain_4, "%");
    rows.add(
        "deliveries queued by the trigger",
        queued as f64,
        "deliveries",
    );
    Ok(rows)
}
