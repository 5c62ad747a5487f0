//! Helpers for tests that run the background worker against a real receiver.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;

use super::Cluster;

/// postgresql.conf lines for a cluster whose worker retries fast.
pub const FAST: &[&str] = &[
    "shared_preload_libraries = 'webhook_outbox'",
    "outbox.retry_schedule = '300ms, 300ms, 300ms'",
    "outbox.poll_interval = '200ms'",
    "outbox.lease = 10",
];

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn scalar_i64(c: &mut postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

pub fn scalar_text(c: &mut postgres::Client, sql: &str) -> String {
    c.query_one(sql, &[]).unwrap().get(0)
}

/// Creates an endpoint at `url` with the test secret and returns its id.
pub fn endpoint(c: &mut postgres::Client, url: &str, extra: &str) -> String {
    scalar_text(
        c,
        &format!("SELECT outbox.create_endpoint('{url}', secret => '{SECRET}'{extra})::text"),
    )
}

/// Reads everything committed so far from the log, as the worker or an `outbox.claim`
/// outside a transaction block does, for tests that run without a worker.
pub fn read_log(c: &mut postgres::Client) {
    c.batch_execute("SELECT outbox._read_log(1000000)").unwrap();
}

/// Waits until every event committed so far has been read from the log (and so has its
/// deliveries), by the worker or by an `outbox.claim`.
pub fn wait_read(c: &mut postgres::Client) {
    assert!(
        wait_until(Duration::from_secs(20), || scalar_i64(
            c,
            "SELECT unread FROM outbox.log_status"
        ) == 0),
        "events stay unread in the log"
    );
}

/// Deliveries pending or in flight, and committed events not yet read from the log (an
/// older release, before an upgrade, has no log).
fn unsettled(c: &mut postgres::Client) -> Result<i64, postgres::Error> {
    let has_log: bool = c
        .query_one("SELECT to_regclass('outbox.log_status') IS NOT NULL", &[])?
        .get(0);
    let unread = if has_log {
        "coalesce((SELECT sum(unread)::int8 FROM outbox.log_status), 0)"
    } else {
        "0"
    };
    c.query_one(
        &format!(
            "SELECT count(*) + {unread} FROM outbox.delivery WHERE status IN ('pending', 'in_flight')"
        ),
        &[],
    )
    .map(|r| r.get(0))
}

/// Waits until no delivery is pending or in flight, and every committed event was read.
pub fn wait_settled(cluster: &Cluster, timeout: Duration) -> bool {
    let mut c = cluster.client();
    wait_until(timeout, || unsettled(&mut c).unwrap() == 0)
}

/// Waits until nothing is pending or in flight, connecting afresh each time so that it
/// carries on through crashes and restarts of the server.
pub fn wait_settled_through_restarts(cluster: &Cluster, timeout: Duration) -> bool {
    wait_until(timeout, || {
        let Ok(mut c) = postgres::Client::connect(&cluster.conninfo(), postgres::NoTls) else {
            return false;
        };
        unsettled(&mut c).map(|n| n == 0).unwrap_or(false)
    })
}

/// The worker's process id, once it runs.
pub fn worker_pid(cluster: &Cluster) -> i32 {
    let mut c = cluster.client();
    let mut pid = 0;
    assert!(
        wait_until(Duration::from_secs(20), || {
            let rows = c
                .query(
                    "SELECT pid FROM pg_stat_activity WHERE backend_type = 'webhook_outbox worker'",
                    &[],
                )
                .unwrap();
            pid = rows.first().map(|r| r.get(0)).unwrap_or(0);
            pid != 0
        }),
        "the worker did not start:\n{}",
        cluster.log()
    );
    pid
}

/// Collects notifications (channel, JSON payload) until `until` says enough or `timeout` passes.
pub fn collect_notifications(
    c: &mut postgres::Client,
    timeout: Duration,
    until: impl Fn(&[(String, serde_json::Value)]) -> bool,
) -> Vec<(String, serde_json::Value)> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while Instant::now() < deadline && !until(&got) {
        let mut n = c.notifications();
        let mut it = n.timeout_iter(Duration::from_millis(200));
        while let Ok(Some(note)) = it.next() {
            got.push((
                note.channel().to_string(),
                serde_json::from_str(note.payload()).unwrap(),
            ));
        }
    }
    got
}
