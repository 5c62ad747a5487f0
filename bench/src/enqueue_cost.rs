//! Enqueue cost: what an `outbox.trigger` adds to an application's own writes, measured
//! with pgbench on a small insert workload without and with the trigger.
//!
//! The workload runs in a database of its own where the extension is created but no worker
//! delivers (the worker serves `outbox.database`), so the figures are the producer's side
//! alone: the one row appended to the event log, its checks and the wake-up.

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

/// One way of hooking the orders table: SQL that puts it on, SQL that takes it off.
struct Variant {
    label: &'static str,
    on: &'static str,
    off: &'static str,
}

/// What is measured side by side, in one run, on the same table: nothing, PgQ's trigger
/// (the anchor: a durable event in the same transaction), a bare one-row append into an
/// indexed log table (the least any transactional log can cost), and `outbox.trigger`.
const VARIANTS: &[Variant] = &[
    Variant {
        label: "PgQ pgq.logutriga",
        on: "CREATE TRIGGER orders_pgq AFTER INSERT ON orders
                 FOR EACH ROW EXECUTE FUNCTION pgq.logutriga('orders')",
        off: "DROP TRIGGER orders_pgq ON orders",
    },
    Variant {
        label: "bare one-row append",
        on: "CREATE TRIGGER orders_append AFTER INSERT ON orders
                 FOR EACH ROW EXECUTE FUNCTION bare_append()",
        off: "DROP TRIGGER orders_append ON orders",
    },
    Variant {
        label: "outbox.trigger",
        on: "CREATE TRIGGER orders_outbox AFTER INSERT ON orders
                 FOR EACH ROW EXECUTE FUNCTION outbox.trigger('order')",
        off: "DROP TRIGGER orders_outbox ON orders",
    },
];

pub fn run(bench: &Bench, seconds: f64) -> Result<Rows> {
    let mut rows = Rows::new("enqueue-cost");
    bench
        .client()
        .batch_execute(&format!("CREATE DATABASE {DATABASE}"))?;
    let mut c = bench.cluster.client_to(DATABASE);
    c.batch_execute(
        "CREATE EXTENSION webhook_outbox;
         CREATE EXTENSION pgq;
         SELECT pgq.create_queue('orders');
         CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL,
                              total numeric NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE bare_log (id bigserial PRIMARY KEY,
                                txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
                                payload jsonb NOT NULL);
         CREATE INDEX ON bare_log (txid);
         CREATE FUNCTION bare_append() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO bare_log (payload)
             VALUES (jsonb_build_object('table', TG_TABLE_NAME, 'record', to_jsonb(NEW)));
             RETURN NULL;
         END $$;",
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
    // The plain insert is measured before and after the others, and its mean is the
    // reference: the table grows during the run, and this way that weighs on both sides.
    let (first_1, first_4) = measure("plain insert")?;
    let mut hooked = Vec::new();
    for v in VARIANTS {
        c.batch_execute(v.on)?;
        hooked.push((v.label, measure(v.label)?));
        c.batch_execute(v.off)?;
    }
    let (last_1, last_4) = measure("plain insert, again")?;
    let (plain_1, plain_4) = ((first_1 + last_1) / 2.0, (first_4 + last_4) / 2.0);
    let queued: i64 = c.query_one("SELECT count(*) FROM outbox.log", &[])?.get(0);

    rows.add(
        "plain insert, 1 client (mean of before and after)",
        plain_1,
        "tps",
    );
    rows.add(
        "plain insert, 4 clients (mean of before and after)",
        plain_4,
        "tps",
    );
    for (label, (one, four)) in hooked {
        rows.add(format!("{label}, 1 client"), one, "tps");
        rows.add(
            format!("{label}, 1 client, kept"),
            100.0 * one / plain_1,
            "%",
        );
        // One event per transaction: the difference in time per transaction at one client
        // is what the trigger adds to each insert.
        rows.add(
            format!("{label}, added per event, 1 client (1e6/tps - 1e6/tps_plain)"),
            1e6 / one - 1e6 / plain_1,
            "us",
        );
        rows.add(format!("{label}, 4 clients"), four, "tps");
        rows.add(
            format!("{label}, 4 clients, kept"),
            100.0 * four / plain_4,
            "%",
        );
    }
    rows.add("events appended by outbox.trigger", queued as f64, "events");
    Ok(rows)
}
